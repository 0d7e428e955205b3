//! NBD connections as reactor frontends: each connection lives on one reactor thread, reads
//! requests from its non-blocking socket, submits them as bios on that reactor and writes replies
//! as they complete (pipelined, in completion order). No thread per connection or per request,
//! no thread hop per I/O, no allocation per request in steady state.

use super::tls::TlsServer;
use openssl::ssl::{ErrorCode, SslStream};
use stackbd_core::leaf::Extent;
use stackbd_core::runtime::{Frontend, FrontendCx};
use stackbd_core::{BioFlags, Completion, DataBuf, DevId, Op, Request, Status, SECTOR_SIZE};
use stackbd_nbd::server::{
    ExportInfo, ExportSummary, Exports, Io, IoKind, ServerConfig, ServerConn, State,
};
use stackbd_nbd::Errno;
use std::collections::{BTreeMap, VecDeque};
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One export as the daemon serves it.
#[derive(Clone, Debug)]
pub struct ExportEntry {
    pub name: String,
    pub volume: String,
    pub dev: DevId,
    pub size_bytes: u64,
    pub read_only: bool,
    pub description: String,
    /// This export's own handle (never reused), which connections quote in every request.
    pub id: u64,
    /// Set when the export goes away: its connections stop submitting and close, so they never
    /// reach a device that a later volume reuses the id of.
    pub revoked: Arc<AtomicBool>,
}

impl ExportEntry {
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }
}

/// The exports, shared by the control plane (which updates them) and connections (which read
/// them during the handshake, and once more to bind their export).
#[derive(Default)]
pub struct ExportTable {
    map: Mutex<BTreeMap<String, ExportEntry>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl ExportTable {
    /// A fresh export handle.
    pub fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The device and revocation flag behind an export handle.
    pub fn by_handle(&self, id: u64) -> Option<(DevId, Arc<AtomicBool>)> {
        self.map
            .lock()
            .unwrap()
            .values()
            .find(|e| e.id == id)
            .map(|e| (e.dev, e.revoked.clone()))
    }

    pub fn set(&self, e: ExportEntry) {
        self.map.lock().unwrap().insert(e.name.clone(), e);
    }

    pub fn remove(&self, name: &str) -> Option<ExportEntry> {
        self.map.lock().unwrap().remove(name)
    }

    pub fn all(&self) -> Vec<ExportEntry> {
        self.map.lock().unwrap().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<ExportEntry> {
        self.map.lock().unwrap().get(name).cloned()
    }

    /// Updates the size of every export of `volume` (after a reload).
    pub fn resize(&self, volume: &str, size_bytes: u64) {
        for e in self.map.lock().unwrap().values_mut() {
            if e.volume == volume {
                e.size_bytes = size_bytes;
            }
        }
    }
}

impl Exports for ExportTable {
    fn list(&self) -> Vec<ExportSummary> {
        self.all()
            .into_iter()
            .map(|e| ExportSummary {
                name: e.name,
                description: e.description,
            })
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let e = self.get(name)?;
        let mut info = ExportInfo::new(e.name, e.size_bytes, e.id);
        info.description = e.description;
        info.read_only = e.read_only;
        info.can_trim = !e.read_only;
        info.can_write_zeroes = !e.read_only;
        info.can_fast_zero = !e.read_only;
        info.can_cache = true;
        // Flushes reach every leaf under the volume, so a flush on one connection covers writes
        // completed on any other.
        info.can_multi_conn = true;
        Some(info)
    }

    fn default_export(&self) -> Option<String> {
        let m = self.map.lock().unwrap();
        // An empty name picks the only export, or the one named "demo".
        if m.len() == 1 {
            return m.keys().next().cloned();
        }
        m.contains_key("demo").then(|| "demo".to_string())
    }
}

/// A client socket.
pub enum Sock {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Sock {
    fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }

    fn write_vectored(&mut self, iov: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(iov),
            Sock::Unix(s) => s.write_vectored(iov),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Sock::read(self, buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, iov: &[IoSlice<'_>]) -> std::io::Result<usize> {
        Sock::write_vectored(self, iov)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The connection's transport: plain, or TLS once `STARTTLS` was acknowledged.
enum Link {
    Plain(Sock),
    /// `done`: the TLS handshake finished.
    Tls {
        s: Box<SslStream<Sock>>,
        done: bool,
    },
    /// Only while switching from one to the other.
    Gone,
}

fn would_block() -> std::io::Error {
    std::io::ErrorKind::WouldBlock.into()
}

/// An OpenSSL error as an I/O error: "would block" when it wants the socket to be ready.
fn tls_io(e: openssl::ssl::Error, want_write: &mut bool) -> std::io::Error {
    match e.code() {
        ErrorCode::WANT_READ => would_block(),
        ErrorCode::WANT_WRITE => {
            *want_write = true;
            would_block()
        }
        // A clean close_notify from the peer.
        ErrorCode::ZERO_RETURN => std::io::ErrorKind::UnexpectedEof.into(),
        _ => e
            .into_io_error()
            .unwrap_or_else(|e| std::io::Error::other(e.to_string())),
    }
}

impl Link {
    fn sock(&self) -> Option<&Sock> {
        match self {
            Link::Plain(s) => Some(s),
            Link::Tls { s, .. } => Some(s.get_ref()),
            Link::Gone => None,
        }
    }

    fn read(&mut self, buf: &mut [u8], want_write: &mut bool) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Tls { s, done: true } => match s.ssl_read(buf) {
                Ok(n) => Ok(n),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(0),
                Err(e) => Err(tls_io(e, want_write)),
            },
            Link::Tls { .. } | Link::Gone => Err(would_block()),
        }
    }

    /// Writes what it can of `iov` (TLS: record by record, slice by slice).
    fn write_vectored(
        &mut self,
        iov: &[IoSlice<'_>],
        want_write: &mut bool,
    ) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.write_vectored(iov),
            Link::Tls { s, done: true } => {
                let mut total = 0;
                for b in iov.iter().filter(|b| !b.is_empty()) {
                    match s.ssl_write(b) {
                        Ok(n) => {
                            total += n;
                            if n < b.len() {
                                break;
                            }
                        }
                        Err(_) if total > 0 => break,
                        Err(e) => return Err(tls_io(e, want_write)),
                    }
                }
                Ok(total)
            }
            Link::Tls { .. } | Link::Gone => Err(would_block()),
        }
    }

    /// Buffered plaintext a read would return without touching the socket.
    fn pending(&self) -> bool {
        matches!(self, Link::Tls { s, done: true } if s.ssl().pending() > 0)
    }
}

/// Bytes read from the socket at a time; requests larger than this arrive over several reads.
const READ_CHUNK: usize = 256 << 10;
const IOV_MAX: usize = 64;
/// Once the daemon asks connections to close, how long a client has to read the replies it is
/// owed. Then they are dropped and the connection closes (after its I/O completed), so a client
/// that stopped reading cannot hold the daemon's exit forever.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

pub struct NbdFrontend {
    link: Link,
    /// The TLS context, when the server has one.
    tls: Option<Arc<TlsServer>>,
    /// The client's TLS identity (certificate CN or PSK username), once TLS is up.
    identity: Option<String>,
    /// OpenSSL is waiting for the socket to become writable.
    tls_want_write: bool,
    conn: ServerConn,
    exports: Arc<ExportTable>,
    shutdown: Arc<AtomicBool>,
    inbuf: Vec<u8>,
    /// Bytes of `inbuf` holding unconsumed input.
    have: usize,
    /// Requests that found the pool full; retried on the next poll.
    waiting: VecDeque<Io>,
    extents: Vec<Extent>,
    pairs: Vec<(u32, u32)>,
    /// Bios in flight (submitted, not completed).
    running: usize,
    closed: bool,
    eof: bool,
    /// When the daemon's shutdown was first seen.
    closing_since: Option<Instant>,
    /// The export this connection serves, bound on its first request: (handle, device, revoked).
    bound: Option<(u64, DevId, Arc<AtomicBool>)>,
    /// When a client still haggling over options is dropped (see [`NbdFrontend::limit_handshake`]).
    handshake_deadline: Option<Instant>,
    /// Held while the connection lives (the server's connection count).
    _guard: Option<super::listen::ConnGuard>,
}

impl NbdFrontend {
    pub fn new(
        sock: Sock,
        exports: Arc<ExportTable>,
        shutdown: Arc<AtomicBool>,
    ) -> std::io::Result<NbdFrontend> {
        match &sock {
            Sock::Tcp(s) => {
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
            }
            Sock::Unix(s) => s.set_nonblocking(true)?,
        }
        let mut conn = ServerConn::new(ServerConfig::default());
        conn.greeting();
        Ok(NbdFrontend {
            link: Link::Plain(sock),
            tls: None,
            identity: None,
            tls_want_write: false,
            conn,
            exports,
            shutdown,
            inbuf: vec![0u8; READ_CHUNK],
            have: 0,
            waiting: VecDeque::with_capacity(256),
            extents: Vec::with_capacity(1024),
            pairs: Vec::with_capacity(1024),
            running: 0,
            closed: false,
            eof: false,
            closing_since: None,
            bound: None,
            handshake_deadline: None,
            _guard: None,
        })
    }

    /// Drops the connection if it has not finished the handshake within `t`.
    pub fn limit_handshake(mut self, t: Duration) -> Self {
        self.handshake_deadline = Instant::now().checked_add(t);
        self
    }

    /// Offers TLS (`STARTTLS`) with `tls`, as its policy says.
    pub fn with_tls(mut self, tls: Option<Arc<TlsServer>>) -> Self {
        if let Some(t) = &tls {
            self.conn.set_tls(t.policy());
        }
        self.tls = tls;
        self
    }

    /// Ends the connection at once, owing nothing more to the client.
    fn abort(&mut self) {
        self.eof = true;
        self.conn.shutdown();
        let len = self.conn.output_len();
        self.conn.consume_output(len);
    }

    /// After `STARTTLS` was acknowledged (and the `ACK` sent): starts the TLS session on the
    /// socket, then drives its handshake, non-blocking, until it is done.
    fn drive_tls(&mut self) -> usize {
        let Some(tls) = self.tls.clone() else {
            return 0;
        };
        if matches!(self.link, Link::Plain(_)) {
            if !self.conn.tls_wanted() || self.conn.output_len() > 0 {
                return 0;
            }
            if self.have > 0 {
                // Bytes sent before our ACK: no client may do that.
                super::tls::log_failure(&"the client sent data before STARTTLS was answered");
                self.abort();
                return 1;
            }
            let Link::Plain(sock) = std::mem::replace(&mut self.link, Link::Gone) else {
                return 0;
            };
            match tls.session().and_then(|ssl| SslStream::new(ssl, sock)) {
                Ok(s) => {
                    self.link = Link::Tls {
                        s: Box::new(s),
                        done: false,
                    }
                }
                Err(e) => {
                    super::tls::log_failure(&e);
                    self.abort();
                    self.closed = true;
                    return 1;
                }
            }
        }
        let Link::Tls { s, done } = &mut self.link else {
            return 0;
        };
        if *done {
            return 0;
        }
        match s.accept() {
            Ok(()) => {
                *done = true;
                self.identity = tls.identity(s.ssl());
                let version = s.ssl().version_str();
                let cipher = s.ssl().current_cipher().map_or("?", |c| c.name());
                tracing::info!(
                    identity = self.identity.as_deref().unwrap_or("-"),
                    version,
                    cipher,
                    "NBD client started TLS"
                );
                self.conn.tls_started();
                1
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => 0,
            Err(e) if e.code() == ErrorCode::WANT_WRITE => {
                self.tls_want_write = true;
                0
            }
            Err(e) => {
                super::tls::log_failure(&e);
                self.abort();
                1
            }
        }
    }

    /// Keeps `g` (a place in the server's connection count) until the connection is dropped.
    pub fn with_guard(mut self, g: super::listen::ConnGuard) -> Self {
        self._guard = Some(g);
        self
    }

    fn read_input(&mut self) -> usize {
        let mut work = 0;
        loop {
            if self.have > 0 {
                let n = match &self.tls {
                    // Only during the handshake (plain connections never get here).
                    Some(t) if self.conn.state() == State::Handshake => {
                        let view = Allowed {
                            table: &self.exports,
                            tls: t,
                            identity: self.identity.as_deref(),
                        };
                        self.conn.input(&self.inbuf[..self.have], &view)
                    }
                    _ => self
                        .conn
                        .input(&self.inbuf[..self.have], self.exports.as_ref()),
                };
                if n > 0 {
                    self.inbuf.copy_within(n..self.have, 0);
                    self.have -= n;
                    work += 1;
                }
            }
            if self.eof || !self.conn.wants_input() || self.have == self.inbuf.len() {
                return work;
            }
            match self
                .link
                .read(&mut self.inbuf[self.have..], &mut self.tls_want_write)
            {
                Ok(0) => {
                    // The client went away (perhaps mid-request): finish what was acknowledged
                    // to nobody, drop the rest.
                    self.eof = true;
                    self.conn.shutdown();
                    return work + 1;
                }
                Ok(n) => {
                    self.have += n;
                    work += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return work,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.eof = true;
                    self.conn.shutdown();
                    return work + 1;
                }
            }
        }
    }

    fn write_output(&mut self) -> usize {
        let mut work = 0;
        while self.conn.output_len() > 0 {
            let mut iov = [IoSlice::new(&[]); IOV_MAX];
            let n = self.conn.output_iovecs(&mut iov);
            match self
                .link
                .write_vectored(&iov[..n], &mut self.tls_want_write)
            {
                Ok(0) => break,
                Ok(w) => {
                    self.conn.consume_output(w);
                    work += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The peer is gone: nothing more can be sent.
                    self.eof = true;
                    self.conn.shutdown();
                    let len = self.conn.output_len();
                    self.conn.consume_output(len);
                    break;
                }
            }
        }
        work
    }

    /// Starts one request; false if the pool is full and it must wait.
    fn start(&mut self, cx: &mut FrontendCx<'_>, io: Io) -> bool {
        let Some(dev) = self.device(io.export) else {
            self.conn.complete(io.slot, Err(Errno::Eshutdown));
            return true;
        };
        let sector = io.offset / SECTOR_SIZE as u64;
        let sectors = io.length / SECTOR_SIZE as u32;
        let mut flags = if io.fua {
            BioFlags::FUA
        } else {
            BioFlags::NONE
        };
        let (op, data) = match io.kind {
            IoKind::Read | IoKind::Write => {
                let buf = self.conn.buffer(io.slot);
                // SAFETY: the slot's buffer stays owned by the connection, untouched, until
                // `complete` is called for this slot, which happens only after the bio (and
                // every clone of it) completed.
                let data = unsafe { DataBuf::from_slice(buf) };
                (
                    if io.kind == IoKind::Read {
                        Op::Read
                    } else {
                        Op::Write
                    },
                    data,
                )
            }
            IoKind::Flush => (Op::Flush, DataBuf::EMPTY),
            IoKind::Trim => (Op::Discard, DataBuf::EMPTY),
            IoKind::WriteZeroes { no_hole, fast_zero } => {
                // Zeroing is as fast as it gets on every leaf we have (punch or zero range).
                let _ = fast_zero;
                if no_hole {
                    flags = flags | BioFlags::NO_HOLE;
                }
                (Op::WriteZeroes, DataBuf::EMPTY)
            }
            IoKind::Cache => {
                self.conn.complete(io.slot, Ok(()));
                return true;
            }
            IoKind::BlockStatus { req_one } => {
                self.block_status(cx, io, req_one);
                return true;
            }
        };
        let req = Request {
            op,
            flags,
            dev,
            sector,
            sectors: if op == Op::Flush { 0 } else { sectors },
            copy_src: 0,
            data,
            user_data: io.slot as u64,
        };
        match cx.submit(&req) {
            Ok(()) => {
                self.running += 1;
                true
            }
            Err(Status::Again) => false,
            Err(s) => {
                self.conn.complete(io.slot, Err(errno(s)));
                true
            }
        }
    }

    /// The device behind an export handle: bound once per connection (one look-up), and never
    /// again once the export was revoked.
    fn device(&mut self, handle: u64) -> Option<DevId> {
        match &self.bound {
            Some((h, dev, revoked)) if *h == handle => {
                (!revoked.load(Ordering::Acquire)).then_some(*dev)
            }
            _ => {
                let (dev, revoked) = self.exports.by_handle(handle)?;
                self.bound = Some((handle, dev, revoked.clone()));
                (!revoked.load(Ordering::Acquire)).then_some(dev)
            }
        }
    }

    fn block_status(&mut self, cx: &mut FrontendCx<'_>, io: Io, req_one: bool) {
        let Some(dev) = self.device(io.export) else {
            self.conn.complete(io.slot, Err(Errno::Eshutdown));
            return;
        };
        self.extents.clear();
        let max = if req_one { 1 } else { 1024 };
        let sector = io.offset / SECTOR_SIZE as u64;
        let sectors = (io.length as u64).div_ceil(SECTOR_SIZE as u64);
        cx.reactor
            .block_status(dev, sector, sectors, max, &mut self.extents);
        self.pairs.clear();
        let mut left = io.length as u64;
        for e in &self.extents {
            if left == 0 {
                break;
            }
            let bytes = (e.sectors * SECTOR_SIZE as u64)
                .min(left)
                .min(u32::MAX as u64 & !511);
            self.pairs.push((bytes as u32, e.flags));
            left -= bytes;
        }
        if self.pairs.is_empty() {
            self.conn.complete(io.slot, Ok(()));
        } else {
            self.conn.complete_block_status(io.slot, &self.pairs);
        }
    }
}

/// The exports as one TLS client may see them: those whose allow-list names its identity,
/// or that have none.
struct Allowed<'a> {
    table: &'a ExportTable,
    tls: &'a TlsServer,
    identity: Option<&'a str>,
}

impl Exports for Allowed<'_> {
    fn list(&self) -> Vec<ExportSummary> {
        let mut v = self.table.list();
        v.retain(|e| self.tls.allows(&e.name, self.identity));
        v
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if !self.tls.allows(name, self.identity) {
            return None;
        }
        self.table.lookup(name)
    }

    fn default_export(&self) -> Option<String> {
        self.table.default_export()
    }
}

/// The NBD error for a status: the program's one errno mapping (`Status::nbd_errno`).
fn errno(s: Status) -> Errno {
    Errno::from_wire(s.nbd_errno()).unwrap_or(Errno::Eio)
}

impl Frontend for NbdFrontend {
    fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize {
        if self.closed {
            return 0;
        }
        // The export went away: answer nothing new, finish what runs, close.
        if self
            .bound
            .as_ref()
            .is_some_and(|b| b.2.load(Ordering::Acquire))
            && !self.eof
        {
            self.conn.shutdown();
            self.eof = true;
        }
        if self.shutdown.load(Ordering::Relaxed) {
            self.closing_since.get_or_insert_with(Instant::now);
            if self.conn.state() != State::Closed && !self.eof {
                self.conn.shutdown();
                self.eof = true;
            }
        }
        if self.conn.state() == State::Handshake
            && self.handshake_deadline.is_some_and(|t| Instant::now() >= t)
        {
            tracing::warn!("NBD handshake timed out; dropping the connection");
            eprintln!("stackbd: NBD client did not finish the handshake in time; dropped");
            self.handshake_deadline = None;
            self.conn.shutdown();
            self.eof = true;
            let len = self.conn.output_len();
            self.conn.consume_output(len);
        }
        self.tls_want_write = false;
        let mut work = self.drive_tls();
        work += self.read_input();
        work += self.drive_tls();
        if self.link.pending() && self.conn.wants_input() {
            // TLS holds decrypted bytes the socket will not signal: poll again.
            work += 1;
        }
        while let Some(io) = self.waiting.pop_front() {
            if !self.start(cx, io) {
                self.waiting.push_front(io);
                break;
            }
            work += 1;
        }
        if self.waiting.is_empty() {
            while let Some(io) = self.conn.next_io() {
                work += 1;
                if !self.start(cx, io) {
                    self.waiting.push_back(io);
                    break;
                }
            }
        }
        work += self.write_output();
        if self.conn.output_len() > 0
            && self
                .closing_since
                .is_some_and(|t| t.elapsed() >= CLOSE_GRACE)
        {
            // The client is not reading what it is owed: give up on it.
            let len = self.conn.output_len();
            self.conn.consume_output(len);
            work += 1;
        }
        if self.conn.state() == State::Closed && self.running == 0 && self.conn.output_len() == 0 {
            if let Link::Tls { s, done: true } = &mut self.link {
                // Best effort, never waited for.
                let _ = s.shutdown();
            }
            if let Some(s) = self.link.sock() {
                s.shutdown();
            }
            self.closed = true;
            work += 1;
        }
        work
    }

    fn complete(&mut self, _cx: &mut FrontendCx<'_>, c: Completion) {
        self.running -= 1;
        let r = if c.status.is_ok() {
            Ok(())
        } else {
            Err(errno(c.status))
        };
        self.conn.complete(c.user_data as u32, r);
        // Send at once: a reply waiting for the next poll is latency.
        self.write_output();
    }

    fn wait_fds(&self, out: &mut Vec<(RawFd, bool)>) {
        if let (false, Some(s)) = (self.closed, self.link.sock()) {
            out.push((s.fd(), self.conn.output_len() > 0 || self.tls_want_write));
        }
    }

    fn finished(&self) -> bool {
        self.closed && self.running == 0
    }
}
