//! `nbd`: a leaf on a remote NBD server (stackbd, nbdkit, qemu-nbd...).
//!
//! [`NbdLeaf::connect`] does the fixed-newstyle handshake once (`NBD_OPT_GO` with
//! `NBD_INFO_BLOCK_SIZE`) to learn the export's size, flags and block sizes. Each reactor's
//! [`LeafChannel`] then opens its own connection(s): non-blocking sockets, requests encoded into
//! preallocated per-slot headers (cookie = slot index), write payloads sent straight from the
//! bio's buffer with `writev`, read payloads received straight into it. Simple replies only
//! (structured replies are not negotiated).
//!
//! Errors: an error reply is a target error (`EIO` -> `IoError`, `ENOSPC` -> `NoSpace`,
//! `EINVAL`/`EPERM` -> `Invalid`, `ENOTSUP` -> `NotSupported`). A lost connection (EOF, reset,
//! protocol violation) fails every bio in flight on it with `PathError`, a request older than the
//! timeout with `Timeout`; the connection then reconnects with exponential backoff (10 ms ..
//! 2 s). No connect ever runs on the reactor, the first ones included: `poll`/`submit` hand it
//! to a connector thread (name lookup, connect and handshake; connect and handshake bounded as
//! a whole by the leaf's timeout, and an attempt silent for 1 s past it is given up) and adopt
//! the finished connection on a later round; the connector thread wakes the reactor through an
//! eventfd, so it sleeps rather than spins while a connect is pending. While no connection is
//! up, new bios wait for an attempt in flight for at most 200 ms (`NOWAIT` bios get `Again`),
//! and otherwise fail at once with `PathError`.
//! Connects and handshakes are bounded as a whole by their budget (a unix listener that stopped
//! accepting included), not per system call.
//!
//! [`Leaf::probe`] (a path checker's call, never on a reactor) opens a fresh connection, does the
//! same handshake, reads one logical block at offset 0 and disconnects, all within its timeout.
//! A successful probe bumps an epoch in the leaf's shared state; a channel with a connection
//! down sees it on its next `submit`/`poll` (one relaxed atomic load, only while a connection
//! is down) and reconnects at once instead of waiting out its backoff, so a path the checker
//! reinstated does not fail its next bio with `PathError`.
//!
//! Health ([`Leaf::health`], see `health.rs`): `ok` while every channel's connections are up,
//! `degraded` with some down, `reconnecting` with none up, `failed` once attempts keep failing;
//! with the last error (request timeout, EOF, reset, or the connect error's text) and when.
//! Reactors update it only when a connection comes up, is lost or fails to connect.

mod channel;
mod conn;
mod health;
mod tls;
mod wire;

pub use tls::TlsClient;

use channel::NbdChannel;
use stackbd_core::{Leaf, LeafChannel, LeafHealth, Limits, Sector, SECTOR_SIZE};
use stackbd_nbd::{CmdFlags, Command, Errno, Request, SimpleReply, TransmissionFlags};
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::{handshake, open, Stream};

/// Largest I/O sent in one request (the leaf's `max_sectors` is capped to this).
pub const MAX_REQUEST_BYTES: u32 = 32 << 20;
/// Largest trim / write-zeroes sent in one request (fits the 32-bit length field).
const MAX_ZERO_SECTORS: u32 = (1 << 31) / SECTOR_SIZE as u32;
const DEFAULT_PORT: u16 = 10809;
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// While no connection is up, a bio waits this long at most for a reconnect in flight before it
/// fails with a path error (the attempt itself goes on, up to the leaf's timeout).
const RECONNECT_WAIT: Duration = Duration::from_millis(200);
/// Receive staging buffer per connection.
const RX_BYTES: usize = 64 * 1024;
/// At most this many iovecs per `writev`.
const MAX_IOV: usize = 64;
/// Cookie bit of the flush sent ahead of a `PREFLUSH` write.
const PREFLUSH_COOKIE: u64 = 1 << 32;

/// Options of an NBD leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// Connections per channel (per reactor); 1 unless the server allows `CAN_MULTI_CONN`.
    pub connections: u32,
    /// A request older than this fails its connection with `Timeout`; also bounds the handshake.
    pub timeout: Duration,
    /// Requests in flight per connection; more wait in the channel's backlog.
    pub queue_depth: u32,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            connections: 1,
            timeout: Duration::from_secs(30),
            queue_depth: 64,
        }
    }
}

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// `host:port`, resolved at each connect.
    Tcp(String),
    Unix(PathBuf),
}

/// A parsed `nbd://`, `nbd+unix://`, `nbds://` or `nbds+unix://` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
    /// TLS (`nbds`), with the URI's `tls-*` parameters.
    pub tls: Option<TlsClient>,
}

fn invalid_input(msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

fn protocol(msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NBD: {msg}"))
}

impl NbdUri {
    /// `nbd[s]://[user@]host[:port][/export][?tls-...]` or
    /// `nbd[s]+unix:///[export]?socket=PATH[&tls-...]`; `nbds` means TLS (see [`TlsClient`]
    /// for the `tls-certificates`, `tls-psk-file`, `tls-username` and `tls-verify-peer`
    /// parameters, and `user@` for the PSK username).
    pub fn parse(uri: &str) -> io::Result<NbdUri> {
        let (plain, tls) = match uri.strip_prefix("nbds") {
            Some(rest) => (format!("nbd{rest}"), true),
            None => (uri.to_string(), false),
        };
        let mut u = Self::parse_plain(&plain)
            .map_err(|e| io::Error::new(e.kind(), e.to_string().replacen(&plain, uri, 1)))?;
        let query = uri.split_once('?').map_or("", |q| q.1);
        let mut t = TlsClient {
            verify_peer: true,
            ..TlsClient::default()
        };
        let mut any = false;
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            any |= t.param(k, v)?;
        }
        if let Some(user) = uri
            .split_once("://")
            .and_then(|(_, r)| r.split(['/', '?']).next())
            .and_then(|auth| auth.rsplit_once('@'))
            .map(|(user, _)| user)
        {
            t.username.get_or_insert_with(|| user.to_string());
        }
        if tls {
            t.check()
                .map_err(|e| invalid_input(format!("{uri}: {e}")))?;
            u.tls = Some(t);
        } else if any {
            return Err(invalid_input(format!(
                "{uri}: tls-* parameters need an nbds:// or nbds+unix:// URI"
            )));
        }
        Ok(u)
    }

    fn parse_plain(uri: &str) -> io::Result<NbdUri> {
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !path.is_empty() && !path.starts_with('/') {
                return Err(invalid_input(format!(
                    "{uri}: nbd+unix URIs take no host (nbd+unix:///export?socket=PATH)"
                )));
            }
            let export = path.strip_prefix('/').unwrap_or(path).to_string();
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid_input(format!("{uri}: missing ?socket=PATH")))?;
            return Ok(NbdUri {
                addr: NbdAddr::Unix(PathBuf::from(socket)),
                export,
                tls: None,
            });
        }
        let Some(rest) = uri.strip_prefix("nbd://") else {
            return Err(invalid_input(format!(
                "{uri}: not an NBD URI (nbd://host[:port]/export or nbd+unix:///export?socket=PATH)"
            )));
        };
        let rest = rest.split_once('?').map_or(rest, |r| r.0);
        let (auth, export) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        // `user@`: the PSK username (see `parse`).
        let auth = auth.rsplit_once('@').map_or(auth, |a| a.1);
        if auth.is_empty() {
            return Err(invalid_input(format!("{uri}: missing host")));
        }
        // `[v6]:port`, `[v6]`, `host:port`, `host`.
        let has_port = match auth.rfind(':') {
            Some(i) => {
                !auth[i..].contains(']') && (auth.starts_with('[') || !auth[..i].contains(':'))
            }
            None => false,
        };
        let hostport = if has_port {
            auth.to_string()
        } else {
            format!("{auth}:{DEFAULT_PORT}")
        };
        Ok(NbdUri {
            addr: NbdAddr::Tcp(hostport),
            export: export.to_string(),
            tls: None,
        })
    }
}

/// What the handshake learnt about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: TransmissionFlags,
    /// Minimum, preferred, maximum block sizes (defaults 1, 4096, 32 MiB if not sent).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}
#[derive(Debug)]
struct Shared {
    text: String,
    uri: NbdUri,
    opts: NbdOptions,
    info: ExportInfo,
    /// Connections per channel, after the server's `CAN_MULTI_CONN`.
    conns: u32,
    /// Bumped by each successful probe: a channel with a connection down that sees it change
    /// reconnects at once instead of waiting out its backoff.
    epoch: AtomicU64,
    counters: Counters,
    /// Connections up, failed attempts, the last error: see [`health`].
    health: health::Health,
}

/// Counters of an NBD leaf, summed over its channels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Data connections opened (at channel creation and on reconnects).
    pub connects: u64,
    /// Data connection attempts that failed (each one doubles that connection's backoff).
    pub connect_failures: u64,
    /// Data connections lost (EOF, reset, protocol violation, request timeout).
    pub connection_losses: u64,
    /// Times a channel cut its reconnect backoff short after a successful probe.
    pub nudges: u64,
    /// Probes that succeeded / failed.
    pub probes_ok: u64,
    pub probes_failed: u64,
}

/// Slow-path counters only (connects, losses, probes): nothing here is touched per I/O.
#[derive(Debug, Default)]
struct Counters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    connection_losses: AtomicU64,
    nudges: AtomicU64,
    probes_ok: AtomicU64,
    probes_failed: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Cookie of the probe's read.
const PROBE_COOKIE: u64 = 0x0070_726f_6265; // "probe"

/// A leaf on an NBD export.
#[derive(Debug, Clone)]
pub struct NbdLeaf {
    sh: Arc<Shared>,
}

impl NbdLeaf {
    /// Connects once to learn the export; each channel then opens its own connections.
    pub fn connect(uri: &str, opts: NbdOptions) -> io::Result<NbdLeaf> {
        Self::connect_uri(uri, NbdUri::parse(uri)?, opts)
    }

    /// [`connect`](Self::connect) with the URI already parsed (and perhaps its TLS settings
    /// completed from the leaf's parameters); `uri` is its text, for messages.
    pub fn connect_uri(uri: &str, parsed: NbdUri, opts: NbdOptions) -> io::Result<NbdLeaf> {
        if opts.timeout.is_zero() {
            return Err(invalid_input("timeout must be > 0"));
        }
        let (mut s, info) = open(&parsed, opts.timeout)
            .map_err(|e| io::Error::new(e.kind(), format!("{uri}: {e}")))?;
        disconnect(&mut s);
        let multi = info.flags.contains(TransmissionFlags::CAN_MULTI_CONN);
        let conns = if multi {
            opts.connections.clamp(1, 64)
        } else {
            1
        };
        Ok(NbdLeaf {
            sh: Arc::new(Shared {
                text: uri.to_string(),
                uri: parsed,
                opts,
                info,
                conns,
                epoch: AtomicU64::new(0),
                counters: Counters::default(),
                health: health::Health::default(),
            }),
        })
    }

    pub fn stats(&self) -> NbdStats {
        let c = &self.sh.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NbdStats {
            connects: g(&c.connects),
            connect_failures: g(&c.connect_failures),
            connection_losses: g(&c.connection_losses),
            nudges: g(&c.nudges),
            probes_ok: g(&c.probes_ok),
            probes_failed: g(&c.probes_failed),
        }
    }

    /// One probe: a fresh connection, the handshake, a read of one logical block at offset 0,
    /// then `NBD_CMD_DISC`; all by `deadline`.
    fn probe_by(&self, deadline: Instant) -> Result<(), String> {
        let sh = &self.sh;
        let uri = &sh.text;
        let s =
            Stream::connect(&sh.uri.addr, deadline).map_err(|e| format!("connect {uri}: {e}"))?;
        let (mut s, info) =
            handshake(s, &sh.uri, deadline).map_err(|e| format!("handshake {uri}: {e}"))?;
        if info.size != sh.info.size {
            return Err(format!(
                "{uri}: export size changed from {} to {}",
                sh.info.size, info.size
            ));
        }
        let len = u64::from(self.limits().logical_block_bytes).min(info.size) as u32;
        if len > 0 {
            probe_read(&mut s, len, deadline).map_err(|e| format!("read {uri}: {e}"))?;
        }
        disconnect(&mut s);
        Ok(())
    }

    pub fn export_info(&self) -> ExportInfo {
        self.sh.info
    }

    /// Connections each channel opens.
    pub fn connections(&self) -> u32 {
        self.sh.conns
    }
}

/// Reads `len` bytes at offset 0 on a blocking stream in the transmission phase. An error
/// reply is fine (the server answered), except `ESHUTDOWN`: the server is going away.
fn probe_read(s: &mut Stream, len: u32, deadline: Instant) -> io::Result<()> {
    let req = Request {
        flags: CmdFlags::empty(),
        command: Command::Read,
        cookie: PROBE_COOKIE,
        offset: 0,
        length: len,
    };
    s.write_all_by(&req.to_bytes(), deadline)?;
    let mut h = [0u8; SimpleReply::SIZE];
    s.read_exact_by(&mut h, deadline)?;
    let (reply, _) = SimpleReply::decode(&h)
        .map_err(protocol)?
        .ok_or_else(|| protocol("short reply"))?;
    if reply.cookie != PROBE_COOKIE {
        return Err(protocol(format!(
            "reply to unknown cookie {:#x}",
            reply.cookie
        )));
    }
    match reply.error.map(Errno::for_client) {
        None => {
            let mut data = vec![0u8; len as usize];
            s.read_exact_by(&mut data, deadline)
        }
        Some(Errno::Eshutdown) => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the server is shutting down (ESHUTDOWN)",
        )),
        Some(_) => Ok(()),
    }
}

/// Polite goodbye (`NBD_CMD_DISC`), best effort.
fn disconnect(s: &mut Stream) {
    let req = Request {
        flags: CmdFlags::empty(),
        command: Command::Disc,
        cookie: 0,
        offset: 0,
        length: 0,
    };
    let _ = s.set_nonblocking(true);
    let _ = s.write_vectored(&[IoSlice::new(&req.to_bytes())]);
}

impl Leaf for NbdLeaf {
    fn kind(&self) -> &'static str {
        "nbd"
    }

    fn size(&self) -> Sector {
        self.sh.info.size / SECTOR_SIZE as u64
    }

    fn limits(&self) -> Limits {
        let i = &self.sh.info;
        let lbs = i.min_block.max(SECTOR_SIZE as u32).next_power_of_two();
        let pbs = i.preferred_block.max(lbs).next_power_of_two();
        let max = i.max_block.min(MAX_REQUEST_BYTES) / lbs * lbs;
        let f = i.flags;
        let ro = f.contains(TransmissionFlags::READ_ONLY);
        Limits {
            logical_block_bytes: lbs,
            physical_block_bytes: pbs,
            io_min_bytes: pbs,
            io_opt_bytes: pbs,
            max_sectors: (max / SECTOR_SIZE as u32).max(lbs / SECTOR_SIZE as u32),
            max_discard_sectors: if f.contains(TransmissionFlags::SEND_TRIM) && !ro {
                MAX_ZERO_SECTORS
            } else {
                0
            },
            max_write_zeroes_sectors: if f.contains(TransmissionFlags::SEND_WRITE_ZEROES) && !ro {
                MAX_ZERO_SECTORS
            } else {
                0
            },
            max_copy_sectors: 0,
            copy_native: false,
            poll: false,
            nowait: true,
            ..Limits::TOP
        }
    }

    fn args(&self) -> String {
        self.sh.text.clone()
    }

    fn channel(&self) -> Box<dyn LeafChannel> {
        Box::new(NbdChannel::new(self.sh.clone()))
    }

    /// From its channels' connections: `ok` with all up, `degraded` with some, `reconnecting`
    /// with none (attempts going on), `failed` once several attempts in a row failed; the last
    /// error (request timeout, EOF, reset, the connect error's text) and when.
    fn health(&self) -> LeafHealth {
        self.sh.health.get(self.sh.opts.timeout)
    }

    /// Connect, handshake, read one logical block at offset 0, disconnect; all within
    /// `timeout`. On success the channels reconnect at once where a connection is down.
    fn probe(&self, timeout: Duration) -> Result<(), String> {
        let res = self.probe_by(Instant::now() + timeout);
        let c = &self.sh.counters;
        match res {
            Ok(()) => {
                bump(&c.probes_ok);
                self.sh.epoch.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => bump(&c.probes_failed),
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        let u = NbdUri::parse("nbd://localhost:1234/exp").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("localhost:1234".into()));
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbd://host").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("host:10809".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]:99/a/b").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("[::1]:99".into()));
        assert_eq!(u.export, "a/b");
        let u = NbdUri::parse("nbd://[::1]/").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("[::1]:10809".into()));
        let u = NbdUri::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbd+unix://?socket=/s").unwrap();
        assert_eq!(u.export, "");
        assert!(NbdUri::parse("nbd+unix:///exp").is_err());
        assert!(NbdUri::parse("nbd+unix://host/exp?socket=/s").is_err());
        assert!(NbdUri::parse("http://x").is_err());
        assert!(NbdUri::parse("nbd:///x").is_err());
    }

    #[test]
    fn parses_tls_uris() {
        let u = NbdUri::parse("nbds://h:1/e?tls-certificates=/d").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("h:1".into()));
        assert_eq!(u.export, "e");
        let t = u.tls.unwrap();
        assert_eq!(t.certificates, Some("/d".into()));
        assert!(t.verify_peer);
        let u = NbdUri::parse("nbds://alice@h/e?tls-psk-file=/k").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("h:10809".into()));
        let t = u.tls.unwrap();
        assert_eq!(t.username.as_deref(), Some("alice"));
        assert_eq!(t.psk_file, Some("/k".into()));
        let u = NbdUri::parse("nbds+unix:///e?socket=/s&tls-psk-file=/k&tls-username=bob").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/s".into()));
        assert_eq!(u.tls.unwrap().username.as_deref(), Some("bob"));
        assert!(NbdUri::parse("nbd://h/e").unwrap().tls.is_none());
        let e = NbdUri::parse("nbd://h/e?tls-certificates=/d").unwrap_err();
        assert!(e.to_string().contains("nbds://"), "{e}");
        let e = NbdUri::parse("nbds://h/e?tls-psk-file=/k").unwrap_err();
        assert!(e.to_string().contains("username"), "{e}");
        assert!(NbdUri::parse("nbds://h/e?tls-verify-peer=maybe").is_err());
        assert!(NbdUri::parse("nbds:///e").is_err());
    }
}
