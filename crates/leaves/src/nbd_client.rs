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

use rustix::event::{epoll, eventfd, EventfdFlags};
use stackbd_core::leaf::WaitHint;
use stackbd_core::{
    BioFlags, BioId, DataBuf, Leaf, LeafChannel, LeafCx, Limits, Op, Sector, Status, SECTOR_SIZE,
};
use stackbd_nbd::{
    encode_export_name, encode_export_request, ClientFlags, CmdFlags, Command, Errno,
    ExportNameReply, HandshakeFlags, Info, InfoType, Opt, OptionReply, OptionReplyHeader, RepError,
    ReplyHeader, Request, ServerGreeting, SimpleReply, TransmissionFlags,
};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A parsed `nbd://` or `nbd+unix://` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
}

fn invalid_input(msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

fn protocol(msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NBD: {msg}"))
}

impl NbdUri {
    /// `nbd://host[:port][/export]` or `nbd+unix:///[export]?socket=PATH`.
    pub fn parse(uri: &str) -> io::Result<NbdUri> {
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
            });
        }
        let Some(rest) = uri.strip_prefix("nbd://") else {
            return Err(invalid_input(format!(
                "{uri}: not an NBD URI (nbd://host[:port]/export or nbd+unix:///export?socket=PATH)"
            )));
        };
        let (auth, export) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
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

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects, giving up at `deadline`.
    fn connect(addr: &NbdAddr, deadline: Instant) -> io::Result<Stream> {
        match addr {
            NbdAddr::Unix(p) => connect_unix(p, deadline).map(Stream::Unix),
            NbdAddr::Tcp(hp) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for a in hp.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, remaining(deadline)?) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(nb),
            Stream::Unix(s) => s.set_nonblocking(nb),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    /// Blocking `read_exact` that gives up at `deadline` (however the bytes trickle in).
    fn read_exact_by(&mut self, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
        while !buf.is_empty() {
            self.set_timeouts(Some(remaining(deadline)?))?;
            match self.read(buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ))
                }
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Blocking `write_all` that gives up at `deadline`.
    fn write_all_by(&mut self, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
        while !buf.is_empty() {
            self.set_timeouts(Some(remaining(deadline)?))?;
            match self.write_vectored(&[IoSlice::new(buf)]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// Time left until `deadline`; a `TimedOut` error once it has passed.
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(timed_out())
    } else {
        Ok(left)
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

/// A blocking socket call that ran into its `SO_RCVTIMEO` / `SO_SNDTIMEO`.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `UnixStream::connect` bounded by `deadline`: a listener whose accept queue is full (a server
/// that stopped accepting) makes a blocking connect wait forever, a non-blocking one says
/// `EAGAIN` and is retried until the deadline. Returns a blocking stream.
fn connect_unix(path: &std::path::Path, deadline: Instant) -> io::Result<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                remaining(deadline)?;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let s = UnixStream::from(fd);
    s.set_nonblocking(false)?;
    Ok(s)
}

/// Connects and negotiates within `timeout`; returns a non-blocking stream in the
/// transmission phase.
fn open(uri: &NbdUri, timeout: Duration) -> io::Result<(Stream, ExportInfo)> {
    let deadline = Instant::now() + timeout;
    let mut s = Stream::connect(&uri.addr, deadline)?;
    let info = handshake(&mut s, &uri.export, deadline)?;
    s.set_timeouts(None)?;
    s.set_nonblocking(true)?;
    Ok((s, info))
}

/// [`open`] for a data connection: the export must still have the size the leaf was made with.
fn open_checked(sh: &Shared, timeout: Duration) -> io::Result<Stream> {
    let (s, info) = open(&sh.uri, timeout)?;
    if info.size != sh.info.size {
        return Err(protocol(format!(
            "export size changed from {} to {}",
            sh.info.size, info.size
        )));
    }
    Ok(s)
}

fn read_vec(s: &mut Stream, n: usize, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact_by(&mut v, deadline)?;
    Ok(v)
}

/// The fixed-newstyle handshake with `OPT_GO`, on a blocking stream, finished by `deadline`.
fn handshake(s: &mut Stream, export: &str, deadline: Instant) -> io::Result<ExportInfo> {
    let g = read_vec(s, ServerGreeting::SIZE, deadline)?;
    let (greeting, _) = ServerGreeting::decode(&g)
        .map_err(protocol)?
        .ok_or_else(|| protocol("short greeting"))?;
    if !greeting.flags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
        return Err(protocol("server does not speak fixed newstyle"));
    }
    let cflags = ClientFlags::for_greeting(&greeting);
    let no_zeroes = cflags.contains(ClientFlags::NO_ZEROES);
    let mut out = Vec::with_capacity(64 + export.len());
    cflags.encode(&mut out);
    encode_export_request(&mut out, Opt::Go, export, &[InfoType::BlockSize]).map_err(protocol)?;
    s.write_all_by(&out, deadline)?;
    let mut export_info: Option<(u64, TransmissionFlags)> = None;
    let mut block = None;
    loop {
        let h = read_vec(s, OptionReplyHeader::SIZE, deadline)?;
        let (hdr, _) = OptionReplyHeader::decode(&h, 64 * 1024)
            .map_err(protocol)?
            .ok_or_else(|| protocol("short option reply"))?;
        let data = read_vec(s, hdr.length as usize, deadline)?;
        match OptionReply::parse(&hdr, &data).map_err(protocol)? {
            OptionReply::Info(Info::Export { size, flags }) => export_info = Some((size, flags)),
            OptionReply::Info(Info::BlockSize(bs)) => block = Some(bs),
            OptionReply::Info(_) | OptionReply::Unknown { .. } => {}
            OptionReply::Ack => break,
            OptionReply::Error {
                error: RepError::Unsup,
                ..
            } => {
                // An old server without `GO`: `EXPORT_NAME` cannot fail softly, but works.
                out.clear();
                encode_export_name(&mut out, export).map_err(protocol)?;
                s.write_all_by(&out, deadline)?;
                let r = read_vec(s, ExportNameReply::wire_len(no_zeroes), deadline)?;
                let (reply, _) = ExportNameReply::decode(&r, no_zeroes)
                    .map_err(protocol)?
                    .ok_or_else(|| protocol("short export reply"))?;
                export_info = Some((reply.size, reply.flags));
                break;
            }
            OptionReply::Error { error, message } => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "NBD server refused export '{export}': {error:?} {}",
                        String::from_utf8_lossy(message)
                    ),
                ));
            }
            other => return Err(protocol(format!("unexpected reply to GO: {other:?}"))),
        }
    }
    let (size, flags) = export_info.ok_or_else(|| protocol("no export information"))?;
    let (min_block, preferred_block, max_block) = match block {
        Some(bs) => (bs.min.max(1), bs.preferred.max(1), bs.max.max(1)),
        None => (1, 4096, MAX_REQUEST_BYTES),
    };
    Ok(ExportInfo {
        size,
        flags,
        min_block,
        preferred_block,
        max_block,
    })
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
        let parsed = NbdUri::parse(uri)?;
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
        let mut s =
            Stream::connect(&sh.uri.addr, deadline).map_err(|e| format!("connect {uri}: {e}"))?;
        let info = handshake(&mut s, &sh.uri.export, deadline)
            .map_err(|e| format!("handshake {uri}: {e}"))?;
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

/// One request in flight (or waiting to be sent).
struct Slot {
    bio: BioId,
    busy: bool,
    /// A flush header (PREFLUSH) then the request header.
    hdr: [u8; 2 * Request::SIZE],
    hlen: u8,
    /// Write payload to send after the header (empty otherwise).
    wdata: DataBuf,
    /// Read destination (empty otherwise).
    rdata: DataBuf,
    /// Bytes of header + payload sent.
    sent: usize,
    /// Replies still owed (2 with a preflush).
    owed: u8,
    status: Status,
    started: Instant,
}

impl Slot {
    fn total(&self) -> usize {
        self.hlen as usize + self.wdata.len()
    }
}

/// Receives into `d[off..]` straight from the socket.
fn read_into(stream: &mut Stream, d: &DataBuf, off: usize) -> io::Result<usize> {
    assert!(off < d.len());
    // SAFETY: `d` is the data of a read this channel holds (submitted, not completed): its bytes
    // are this leaf's alone until it completes the bio (`LeafChannel::submit`'s contract).
    stream.read(unsafe { d.slice(off, d.len() - off).as_bytes_mut() })
}

enum ConnState {
    Up(Stream),
    /// A connector thread is opening it (lookup, connect, handshake), off the reactor.
    Connecting {
        since: Instant,
    },
    Down {
        next_attempt: Instant,
    },
}

/// What a connector thread hands back: the connection index, the attempt number, and the
/// transmission-phase stream.
type Connected = (usize, u64, io::Result<Stream>);

/// A connection attempt that has not reported back this long after the leaf's timeout (a name
/// lookup that hangs) is given up; its late result, if any, is dropped.
const CONNECT_GRACE: Duration = Duration::from_secs(1);

struct Conn {
    state: ConnState,
    backoff: Duration,
    /// Number of the latest connection attempt: a result for an older one is stale.
    attempt: u64,
    /// First slot index owned by this connection.
    base: u32,
    free: Vec<u32>,
    sendq: VecDeque<u32>,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    /// A read reply whose data is arriving: (slot, bytes received).
    cur: Option<(u32, usize)>,
    /// Set by `prepare_wait` when a send failed (no completion context there).
    broken: bool,
}

impl Conn {
    fn up(&self) -> bool {
        matches!(self.state, ConnState::Up(_))
    }

    fn fd(&self) -> Option<RawFd> {
        match &self.state {
            ConnState::Up(s) => Some(s.fd()),
            ConnState::Connecting { .. } | ConnState::Down { .. } => None,
        }
    }

    fn inflight(&self, depth: u32) -> u32 {
        depth - self.free.len() as u32
    }

    /// Writes queued output. Ok(true) when all of it went out.
    fn flush_out(&mut self, slots: &mut [Slot]) -> io::Result<bool> {
        let ConnState::Up(stream) = &mut self.state else {
            return Ok(true);
        };
        while !self.sendq.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for &i in self.sendq.iter() {
                if n + 2 > MAX_IOV {
                    break;
                }
                let s = &slots[i as usize];
                let h = s.hlen as usize;
                if s.sent < h {
                    iov[n] = IoSlice::new(&s.hdr[s.sent..h]);
                    n += 1;
                }
                // SAFETY: the data of a write this channel holds (submitted, not completed);
                // nothing writes it meanwhile (`LeafChannel::submit`'s contract).
                let d = unsafe { s.wdata.as_bytes() };
                let off = s.sent.saturating_sub(h);
                if off < d.len() {
                    iov[n] = IoSlice::new(&d[off..]);
                    n += 1;
                }
            }
            let mut w = match stream.write_vectored(&iov[..n]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            while w > 0 {
                let i = *self.sendq.front().expect("wrote more than queued") as usize;
                let s = &mut slots[i];
                let rem = s.total() - s.sent;
                if w >= rem {
                    s.sent = s.total();
                    w -= rem;
                    self.sendq.pop_front();
                } else {
                    s.sent += w;
                    w = 0;
                }
            }
        }
        Ok(true)
    }
}

/// Why a connection failed.
enum Fail {
    Path,
    Timeout,
}

fn errno_status(e: Errno) -> Status {
    match e.for_client() {
        Errno::Eio | Errno::Enomem => Status::IoError,
        Errno::Enospc => Status::NoSpace,
        Errno::Einval | Errno::Eperm | Errno::Eoverflow | Errno::Other(_) => Status::Invalid,
        Errno::Enotsup => Status::NotSupported,
        // The server is going away: a transport problem, not the data's.
        Errno::Eshutdown => Status::PathError,
    }
}

struct NbdChannel {
    sh: Arc<Shared>,
    depth: u32,
    slots: Vec<Slot>,
    conns: Vec<Conn>,
    backlog: VecDeque<BioId>,
    /// Round-robin cursor over connections.
    next_conn: usize,
    /// One epoll set over all connections when there are several.
    epoll: Option<OwnedFd>,
    next_timeout_check: Instant,
    completed: usize,
    /// The leaf's probe epoch as of the last time this channel looked (or lost a connection).
    seen_epoch: u64,
    /// Connections opened by connector threads, adopted by `reconnect_due`.
    connected_tx: Sender<Connected>,
    connected_rx: Receiver<Connected>,
    /// Readable when a connector thread has handed back a result: the reactor sleeps on it
    /// (directly, or through `epoll`) while a connect is pending instead of spinning.
    wake: Arc<OwnedFd>,
    /// Attempts given up while their thread still runs: until their late results are taken,
    /// `poll` keeps looking (a late result's wake-up would otherwise keep `epoll` readable).
    abandoned: u32,
}

/// `epoll` data of the wake eventfd (connections use their index).
const WAKE_DATA: u64 = u64::MAX;

impl NbdChannel {
    fn new(sh: Arc<Shared>) -> NbdChannel {
        let depth = sh.opts.queue_depth.clamp(1, 4096);
        let n = sh.conns;
        let now = Instant::now();
        let slots = (0..depth * n)
            .map(|_| Slot {
                bio: BioId(0),
                busy: false,
                hdr: [0; 2 * Request::SIZE],
                hlen: 0,
                wdata: DataBuf::EMPTY,
                rdata: DataBuf::EMPTY,
                sent: 0,
                owed: 0,
                status: Status::Ok,
                started: now,
            })
            .collect();
        let conns = (0..n)
            .map(|c| Conn {
                state: ConnState::Down { next_attempt: now },
                backoff: BACKOFF_MIN,
                attempt: 0,
                base: c * depth,
                free: (c * depth..(c + 1) * depth).rev().collect(),
                sendq: VecDeque::with_capacity(depth as usize),
                rx: vec![0u8; RX_BYTES].into_boxed_slice(),
                rx_start: 0,
                rx_end: 0,
                cur: None,
                broken: false,
            })
            .collect();
        let epoll = if n > 1 {
            epoll::create(epoll::CreateFlags::CLOEXEC).ok()
        } else {
            None
        };
        let (connected_tx, connected_rx) = channel();
        let wake = Arc::new(
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .expect("eventfd for the nbd channel"),
        );
        if let Some(ep) = &epoll {
            let data = epoll::EventData::new_u64(WAKE_DATA);
            let _ = epoll::add(ep, &*wake, data, epoll::EventFlags::IN);
        }
        let mut ch = NbdChannel {
            connected_tx,
            connected_rx,
            wake,
            abandoned: 0,
            depth,
            slots,
            conns,
            backlog: VecDeque::with_capacity(4 * (depth * n) as usize),
            next_conn: 0,
            epoll,
            next_timeout_check: now,
            completed: 0,
            seen_epoch: sh.epoch.load(Ordering::Relaxed),
            sh,
        };
        // Channels are made on their reactor: even the first connections are opened by
        // connector threads. Bios that come before them wait (up to `RECONNECT_WAIT`).
        for c in 0..ch.conns.len() {
            ch.start_connect(c, now);
        }
        ch
    }

    /// Starts a reconnect on a connector thread; its result comes back through `connected_rx`.
    fn start_connect(&mut self, c: usize, now: Instant) {
        let sh = self.sh.clone();
        let tx = self.connected_tx.clone();
        let wake = self.wake.clone();
        self.conns[c].attempt += 1;
        let attempt = self.conns[c].attempt;
        let spawned = std::thread::Builder::new()
            .name("nbd-connect".into())
            .spawn(move || {
                let res = std::panic::catch_unwind(|| open_checked(&sh, sh.opts.timeout))
                    .unwrap_or_else(|_| Err(io::Error::other("the connector panicked")));
                // Wake first, then send: the reactor takes results before it resets the
                // eventfd, so a result is never left behind a reset, and a readable eventfd
                // is never left behind an adopted result. The channel may be gone by now:
                // the stream then just closes.
                let _ = rustix::io::write(&*wake, &1u64.to_ne_bytes());
                let _ = tx.send((c, attempt, res));
            });
        match spawned {
            Ok(_) => self.conns[c].state = ConnState::Connecting { since: now },
            Err(e) => self.adopt(c, Err(e)),
        }
    }

    /// Takes a finished connection attempt: up, or down with a doubled backoff.
    fn adopt(&mut self, c: usize, res: io::Result<Stream>) {
        let conn = &mut self.conns[c];
        bump(if res.is_ok() {
            &self.sh.counters.connects
        } else {
            &self.sh.counters.connect_failures
        });
        match res {
            Ok(s) => {
                if let Some(ep) = &self.epoll {
                    let data = epoll::EventData::new_u64(c as u64);
                    let _ = epoll::add(ep, s.borrowed(), data, epoll::EventFlags::IN);
                }
                conn.state = ConnState::Up(s);
                conn.backoff = BACKOFF_MIN;
                conn.broken = false;
                conn.rx_start = 0;
                conn.rx_end = 0;
                conn.cur = None;
            }
            Err(_) => {
                conn.state = ConnState::Down {
                    next_attempt: Instant::now() + conn.backoff,
                };
                conn.backoff = (conn.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Reconnects connections whose backoff has passed, or all that are down when a probe
    /// succeeded since this channel last looked (the path checker saw the server answer).
    fn reconnect_due(&mut self, now: Instant) {
        let epoch = self.sh.epoch.load(Ordering::Relaxed);
        if epoch != self.seen_epoch {
            self.seen_epoch = epoch;
            bump(&self.sh.counters.nudges);
            for conn in &mut self.conns {
                if let ConnState::Down { next_attempt } = &mut conn.state {
                    *next_attempt = now;
                    conn.backoff = BACKOFF_MIN;
                }
            }
        }
        // Results come only from attempts in flight or given up: with none, a connection that
        // is merely down (backing off) costs no system call per reactor round.
        let expecting = self.abandoned > 0
            || self
                .conns
                .iter()
                .any(|c| matches!(c.state, ConnState::Connecting { .. }));
        if expecting {
            while let Ok((c, attempt, res)) = self.connected_rx.try_recv() {
                let conn = &self.conns[c];
                if matches!(conn.state, ConnState::Connecting { .. }) && conn.attempt == attempt {
                    self.adopt(c, res);
                } else {
                    self.abandoned = self.abandoned.saturating_sub(1);
                }
            }
            // After the results (see `start_connect`): a result sent after this read comes
            // with a fresh wake-up, or is taken by the next call (its connection is not up).
            let _ = rustix::io::read(&*self.wake, &mut [0u8; 8]);
        }
        let give_up = self.sh.opts.timeout + CONNECT_GRACE;
        for c in 0..self.conns.len() {
            match self.conns[c].state {
                ConnState::Down { next_attempt } if now >= next_attempt => {
                    self.start_connect(c, now);
                }
                ConnState::Connecting { since } if now.duration_since(since) > give_up => {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "connect did not report back");
                    self.abandoned += 1;
                    self.adopt(c, Err(e));
                }
                _ => {}
            }
        }
    }

    /// True while a reconnect started less than [`RECONNECT_WAIT`] ago is in flight: bios
    /// wait for it in the backlog rather than fail.
    fn reconnect_pending(&self, now: Instant) -> bool {
        self.conns.iter().any(|c| match c.state {
            ConnState::Connecting { since } => now.duration_since(since) < RECONNECT_WAIT,
            _ => false,
        })
    }

    /// With no connection up and no reconnect worth waiting for, the backlog fails with path
    /// errors (a multipath above fails the path and goes elsewhere).
    fn fail_stranded_backlog(&mut self, cx: &mut LeafCx<'_>, now: Instant) {
        if self.backlog.is_empty() || self.conns.iter().any(Conn::up) || self.reconnect_pending(now)
        {
            return;
        }
        while let Some(id) = self.backlog.pop_front() {
            cx.complete(id, Status::PathError);
            self.completed += 1;
        }
    }

    /// Fails a connection: every bio in flight on it completes with a path error.
    fn fail_conn(&mut self, cx: &mut LeafCx<'_>, c: usize, why: Fail, now: Instant) {
        let timeout = self.sh.opts.timeout;
        // Only probes from now on speak for the server being back.
        self.seen_epoch = self.sh.epoch.load(Ordering::Relaxed);
        bump(&self.sh.counters.connection_losses);
        let conn = &mut self.conns[c];
        if let ConnState::Up(s) = &conn.state {
            if let Some(ep) = &self.epoll {
                let _ = epoll::delete(ep, s.borrowed());
            }
        }
        conn.state = ConnState::Down {
            next_attempt: now + conn.backoff,
        };
        conn.backoff = (conn.backoff * 2).min(BACKOFF_MAX);
        conn.sendq.clear();
        conn.cur = None;
        conn.broken = false;
        conn.rx_start = 0;
        conn.rx_end = 0;
        for i in conn.base..conn.base + self.depth {
            let s = &mut self.slots[i as usize];
            if !s.busy {
                continue;
            }
            let st = match why {
                Fail::Timeout if now.duration_since(s.started) >= timeout => Status::Timeout,
                _ => Status::PathError,
            };
            s.busy = false;
            s.wdata = DataBuf::EMPTY;
            s.rdata = DataBuf::EMPTY;
            cx.complete(s.bio, st);
            self.completed += 1;
            conn.free.push(i);
        }
        self.fail_stranded_backlog(cx, now);
    }

    /// Picks a connected connection with a free slot; `Err(true)` if some are up but full.
    fn pick(&mut self) -> Result<usize, bool> {
        let n = self.conns.len();
        let mut any_up = false;
        for k in 0..n {
            let c = (self.next_conn + k) % n;
            let conn = &self.conns[c];
            if conn.up() && !conn.broken {
                any_up = true;
                if !conn.free.is_empty() {
                    self.next_conn = (c + 1) % n;
                    return Ok(c);
                }
            }
        }
        Err(any_up)
    }

    /// Bios that need no request. Returns the status if `id` is done without one.
    fn immediate(&self, cx: &mut LeafCx<'_>, id: BioId) -> Option<Status> {
        let f = self.sh.info.flags;
        match cx.bio(id).op {
            Op::Copy => Some(Status::NotSupported),
            Op::Flush if !f.contains(TransmissionFlags::SEND_FLUSH) => Some(Status::Ok),
            Op::Discard if !f.contains(TransmissionFlags::SEND_TRIM) => Some(Status::NotSupported),
            Op::WriteZeroes if !f.contains(TransmissionFlags::SEND_WRITE_ZEROES) => {
                Some(Status::NotSupported)
            }
            _ => None,
        }
    }

    /// Starts `id` on connection `c` (which has a free slot).
    fn start(&mut self, cx: &mut LeafCx<'_>, id: BioId, c: usize, now: Instant) {
        let f = self.sh.info.flags;
        let conn = &mut self.conns[c];
        let i = conn.free.pop().expect("picked a full connection");
        let bio = cx.bio(id);
        let mut flags = CmdFlags::empty();
        let (command, length) = match bio.op {
            Op::Read => (Command::Read, bio.bytes() as u32),
            Op::Write => (Command::Write, bio.bytes() as u32),
            Op::Flush => (Command::Flush, 0),
            Op::Discard => (Command::Trim, bio.bytes() as u32),
            Op::WriteZeroes => {
                if bio.flags.contains(BioFlags::NO_HOLE) {
                    flags = flags.union(CmdFlags::NO_HOLE);
                }
                (Command::WriteZeroes, bio.bytes() as u32)
            }
            Op::Copy => unreachable!("copy is refused before start"),
        };
        if bio.op.is_write()
            && bio.flags.contains(BioFlags::FUA)
            && f.contains(TransmissionFlags::SEND_FUA)
        {
            flags = flags.union(CmdFlags::FUA);
        }
        let preflush = bio.op.is_write()
            && bio.flags.contains(BioFlags::PREFLUSH)
            && f.contains(TransmissionFlags::SEND_FLUSH);
        let s = &mut self.slots[i as usize];
        let mut h = 0;
        if preflush {
            // Earlier writes completed before this bio was submitted, so a flush sent with it
            // covers them whatever order the server runs the two in.
            let fl = Request {
                flags: CmdFlags::empty(),
                command: Command::Flush,
                cookie: PREFLUSH_COOKIE | u64::from(i),
                offset: 0,
                length: 0,
            };
            s.hdr[..Request::SIZE].copy_from_slice(&fl.to_bytes());
            h = Request::SIZE;
        }
        let req = Request {
            flags,
            command,
            cookie: u64::from(i),
            offset: bio.sector * SECTOR_SIZE as u64,
            length,
        };
        s.hdr[h..h + Request::SIZE].copy_from_slice(&req.to_bytes());
        s.hlen = (h + Request::SIZE) as u8;
        s.bio = id;
        s.busy = true;
        s.sent = 0;
        s.owed = 1 + preflush as u8;
        s.status = Status::Ok;
        s.started = now;
        s.wdata = if bio.op == Op::Write {
            bio.data
        } else {
            DataBuf::EMPTY
        };
        s.rdata = if bio.op == Op::Read {
            bio.data
        } else {
            DataBuf::EMPTY
        };
        conn.sendq.push_back(i);
    }

    fn finish(&mut self, cx: &mut LeafCx<'_>, c: usize, i: u32) {
        let s = &mut self.slots[i as usize];
        s.busy = false;
        s.wdata = DataBuf::EMPTY;
        s.rdata = DataBuf::EMPTY;
        cx.complete(s.bio, s.status);
        self.completed += 1;
        self.conns[c].free.push(i);
    }

    /// Reads replies on connection `c`. Err on a lost connection or a protocol violation.
    fn receive(&mut self, cx: &mut LeafCx<'_>, c: usize) -> io::Result<()> {
        loop {
            let conn = &mut self.conns[c];
            let ConnState::Up(stream) = &mut conn.state else {
                return Ok(());
            };
            if let Some((i, got)) = conn.cur {
                let s = &self.slots[i as usize];
                let d = s.rdata;
                let mut got = got;
                let avail = conn.rx_end - conn.rx_start;
                if avail > 0 {
                    let k = avail.min(d.len() - got);
                    d.write_from(got, &conn.rx[conn.rx_start..conn.rx_start + k]);
                    conn.rx_start += k;
                    got += k;
                }
                while got < d.len() {
                    match read_into(stream, &d, got) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            conn.cur = Some((i, got));
                            return Ok(());
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                conn.cur = None;
                let s = &mut self.slots[i as usize];
                s.owed -= 1;
                if s.owed == 0 {
                    self.finish(cx, c, i);
                }
                continue;
            }
            // A reply header.
            let avail = conn.rx_end - conn.rx_start;
            let hdr = match ReplyHeader::decode(&conn.rx[conn.rx_start..conn.rx_end]) {
                Ok(Some((ReplyHeader::Simple(r), n))) => {
                    conn.rx_start += n;
                    r
                }
                Ok(Some((ReplyHeader::Structured(_), _))) => {
                    return Err(protocol("structured reply without negotiation"))
                }
                Err(e) => return Err(protocol(e)),
                Ok(None) => {
                    // Need more bytes: compact and read.
                    if conn.rx_start > 0 {
                        conn.rx.copy_within(conn.rx_start..conn.rx_end, 0);
                        conn.rx_start = 0;
                        conn.rx_end = avail;
                    }
                    match stream.read(&mut conn.rx[conn.rx_end..]) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => conn.rx_end += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                    continue;
                }
            };
            if conn.rx_start == conn.rx_end {
                conn.rx_start = 0;
                conn.rx_end = 0;
            }
            let cookie = hdr.cookie;
            let i = (cookie & !PREFLUSH_COOKIE) as u32;
            let companion = cookie & PREFLUSH_COOKIE != 0;
            if cookie >> 33 != 0
                || i < conn.base
                || i >= conn.base + self.depth
                || !self.slots[i as usize].busy
            {
                return Err(protocol(format!("reply to unknown cookie {cookie:#x}")));
            }
            let s = &mut self.slots[i as usize];
            if s.sent < s.total() {
                return Err(protocol(format!("reply to unsent request {cookie:#x}")));
            }
            match hdr.error {
                Some(e) => s.status.merge(errno_status(e)),
                None if !companion && !s.rdata.is_empty() => {
                    conn.cur = Some((i, 0));
                    continue;
                }
                None => {}
            }
            s.owed -= 1;
            if s.owed == 0 {
                self.finish(cx, c, i);
            }
        }
    }

    /// Starts backlogged bios while slots are free.
    fn drain_backlog(&mut self, cx: &mut LeafCx<'_>, now: Instant) {
        while let Some(&id) = self.backlog.front() {
            match self.pick() {
                Ok(c) => {
                    self.backlog.pop_front();
                    self.start(cx, id, c, now);
                }
                Err(_) => break,
            }
        }
    }

    fn check_timeouts(&mut self, cx: &mut LeafCx<'_>, now: Instant) {
        let timeout = self.sh.opts.timeout;
        self.next_timeout_check = now + (timeout / 4).min(Duration::from_millis(100));
        for c in 0..self.conns.len() {
            let conn = &self.conns[c];
            if !conn.up() || conn.inflight(self.depth) == 0 {
                continue;
            }
            let base = conn.base as usize;
            let old = self.slots[base..base + self.depth as usize]
                .iter()
                .any(|s| s.busy && now.duration_since(s.started) >= timeout);
            if old {
                self.fail_conn(cx, c, Fail::Timeout, now);
            }
        }
    }
}

impl LeafChannel for NbdChannel {
    fn submit(&mut self, cx: &mut LeafCx<'_>, id: BioId) {
        if let Some(st) = self.immediate(cx, id) {
            cx.complete(id, st);
            return;
        }
        if !self.backlog.is_empty() {
            self.backlog.push_back(id);
            return;
        }
        let now = Instant::now();
        match self.pick() {
            Ok(c) => self.start(cx, id, c, now),
            Err(true) => self.backlog.push_back(id),
            Err(false) => {
                self.reconnect_due(now);
                match self.pick() {
                    Ok(c) => self.start(cx, id, c, now),
                    Err(true) => self.backlog.push_back(id),
                    Err(false) if self.reconnect_pending(now) => {
                        if cx.bio(id).flags.contains(BioFlags::NOWAIT) {
                            // It would have to wait for the connection.
                            cx.complete(id, Status::Again);
                        } else {
                            self.backlog.push_back(id);
                        }
                    }
                    Err(false) => cx.complete(id, Status::PathError),
                }
            }
        }
    }

    fn poll(&mut self, cx: &mut LeafCx<'_>) -> usize {
        let before = self.completed;
        let now = Instant::now();
        for c in 0..self.conns.len() {
            let conn = &mut self.conns[c];
            if !conn.up() {
                continue;
            }
            let ok = !conn.broken
                && conn.flush_out(&mut self.slots).is_ok()
                && self.receive(cx, c).is_ok();
            if !ok {
                self.fail_conn(cx, c, Fail::Path, now);
            }
        }
        if self.abandoned > 0 || self.conns.iter().any(|c| !c.up()) {
            self.reconnect_due(now);
            self.fail_stranded_backlog(cx, now);
        }
        if now >= self.next_timeout_check {
            self.check_timeouts(cx, now);
        }
        self.drain_backlog(cx, now);
        // What the backlog just started goes out now rather than on the next round.
        for c in 0..self.conns.len() {
            let conn = &mut self.conns[c];
            if conn.up() && !conn.sendq.is_empty() && conn.flush_out(&mut self.slots).is_err() {
                conn.broken = true;
            }
        }
        self.completed - before
    }

    fn needs_poll(&self) -> bool {
        true
    }

    fn prepare_wait(&mut self) -> WaitHint {
        let mut pending = false;
        let mut busy = 0;
        let mut fd = None;
        for conn in &mut self.conns {
            if !conn.up() {
                continue;
            }
            match conn.flush_out(&mut self.slots) {
                Ok(true) => {}
                Ok(false) => pending = true,
                Err(_) => conn.broken = true,
            }
            if conn.broken {
                pending = true;
            }
            if conn.inflight(self.depth) > 0 {
                busy += 1;
                fd = conn.fd();
            }
        }
        let connecting = self
            .conns
            .iter()
            .any(|c| matches!(c.state, ConnState::Connecting { .. }));
        if pending || (!self.backlog.is_empty() && self.conns.iter().any(Conn::up)) {
            return WaitHint::Spin;
        }
        if !self.backlog.is_empty() {
            // No connection up: the backlog waits for a connector thread, which wakes us (or
            // for the reactor's next look around, which fails it after `RECONNECT_WAIT`).
            return WaitHint::Fd(self.wake.as_raw_fd());
        }
        match (busy, fd, &self.epoll) {
            (0, _, _) if connecting => WaitHint::Fd(self.wake.as_raw_fd()),
            (0, _, _) => WaitHint::Idle,
            (1, Some(fd), _) => WaitHint::Fd(fd),
            (_, _, Some(ep)) => WaitHint::Fd(ep.as_raw_fd()),
            _ => WaitHint::Spin,
        }
    }
}

impl Drop for NbdChannel {
    fn drop(&mut self) {
        for conn in &mut self.conns {
            if let ConnState::Up(s) = &mut conn.state {
                if conn.sendq.is_empty() {
                    disconnect(s);
                }
            }
        }
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
    fn errors_map_to_target_statuses() {
        assert_eq!(errno_status(Errno::Eio), Status::IoError);
        assert_eq!(errno_status(Errno::Enospc), Status::NoSpace);
        assert_eq!(errno_status(Errno::Einval), Status::Invalid);
        assert_eq!(errno_status(Errno::Eperm), Status::Invalid);
        assert_eq!(errno_status(Errno::Enotsup), Status::NotSupported);
        assert_eq!(errno_status(Errno::Other(77)), Status::Invalid);
    }
}
