//! The NBD leaf's blocking side: connecting (bounded by a deadline) and the fixed-newstyle
//! handshake. Connector threads, probes and `NbdLeaf::connect` run it; never a reactor.

use super::{protocol, ExportInfo, NbdAddr, NbdUri, Shared, MAX_REQUEST_BYTES};
use stackbd_nbd::{
    encode_export_name, encode_export_request, ClientFlags, ExportNameReply, HandshakeFlags, Info,
    InfoType, Opt, OptionReply, OptionReplyHeader, RepError, ServerGreeting, TransmissionFlags,
};
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS over one of the others, once `STARTTLS` was acknowledged.
    Tls(Box<openssl::ssl::SslStream<Stream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Stream::read(self, buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Stream::write_vectored(self, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An OpenSSL error as an I/O error ("would block" when it waits for the socket).
fn tls_io(e: openssl::ssl::Error) -> io::Error {
    use openssl::ssl::ErrorCode;
    match e.code() {
        ErrorCode::WANT_READ | ErrorCode::WANT_WRITE => io::ErrorKind::WouldBlock.into(),
        _ => e
            .into_io_error()
            .unwrap_or_else(|e| io::Error::other(format!("TLS: {e}"))),
    }
}

impl Stream {
    /// Connects, giving up at `deadline`.
    pub(super) fn connect(addr: &NbdAddr, deadline: Instant) -> io::Result<Stream> {
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

    pub(super) fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tls(s) => s.get_ref().set_timeouts(t),
        }
    }

    pub(super) fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(nb),
            Stream::Unix(s) => s.set_nonblocking(nb),
            Stream::Tls(s) => s.get_ref().set_nonblocking(nb),
        }
    }

    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => match s.ssl_read(buf) {
                Ok(n) => Ok(n),
                Err(e) if e.code() == openssl::ssl::ErrorCode::ZERO_RETURN => Ok(0),
                Err(e) => Err(tls_io(e)),
            },
        }
    }

    pub(super) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            // Slice by slice: each becomes TLS records anyway.
            Stream::Tls(s) => {
                let mut total = 0;
                for b in bufs.iter().filter(|b| !b.is_empty()) {
                    match s.ssl_write(b) {
                        Ok(n) => {
                            total += n;
                            if n < b.len() {
                                break;
                            }
                        }
                        Err(_) if total > 0 => break,
                        Err(e) => return Err(tls_io(e)),
                    }
                }
                Ok(total)
            }
        }
    }

    /// Blocking `read_exact` that gives up at `deadline` (however the bytes trickle in).
    pub(super) fn read_exact_by(
        &mut self,
        mut buf: &mut [u8],
        deadline: Instant,
    ) -> io::Result<()> {
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
    pub(super) fn write_all_by(&mut self, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
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

    pub(super) fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.get_ref().fd(),
        }
    }

    pub(super) fn borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
            Stream::Tls(s) => s.get_ref().borrowed(),
        }
    }
}

/// Time left until `deadline`; a `TimedOut` error once it has passed.
pub(super) fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(timed_out())
    } else {
        Ok(left)
    }
}

pub(super) fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

/// A blocking socket call that ran into its `SO_RCVTIMEO` / `SO_SNDTIMEO`.
pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `UnixStream::connect` bounded by `deadline`: a listener whose accept queue is full (a server
/// that stopped accepting) makes a blocking connect wait forever, a non-blocking one says
/// `EAGAIN` and is retried until the deadline. Returns a blocking stream.
pub(super) fn connect_unix(path: &std::path::Path, deadline: Instant) -> io::Result<UnixStream> {
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
pub(super) fn open(uri: &NbdUri, timeout: Duration) -> io::Result<(Stream, ExportInfo)> {
    let deadline = Instant::now() + timeout;
    let s = Stream::connect(&uri.addr, deadline)?;
    let (s, info) = handshake(s, uri, deadline)?;
    s.set_timeouts(None)?;
    s.set_nonblocking(true)?;
    Ok((s, info))
}

/// [`open`] for a data connection: the export must still have the size the leaf was made with.
pub(super) fn open_checked(sh: &Shared, timeout: Duration) -> io::Result<Stream> {
    let (s, info) = open(&sh.uri, timeout)?;
    if info.size != sh.info.size {
        return Err(protocol(format!(
            "export size changed from {} to {}",
            sh.info.size, info.size
        )));
    }
    Ok(s)
}

pub(super) fn read_vec(s: &mut Stream, n: usize, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact_by(&mut v, deadline)?;
    Ok(v)
}

/// The fixed-newstyle handshake (`STARTTLS` for `nbds://`, then `OPT_GO`), on a blocking
/// stream, finished by `deadline`. Returns the stream (TLS or not) in the transmission phase.
pub(super) fn handshake(
    mut s: Stream,
    uri: &NbdUri,
    deadline: Instant,
) -> io::Result<(Stream, ExportInfo)> {
    let no_zeroes = greet(&mut s, deadline)?;
    if let Some(tls) = &uri.tls {
        s = super::tls::starttls(s, &uri.addr, tls, deadline)?;
    }
    let info = go(&mut s, &uri.export, no_zeroes, deadline)?;
    Ok((s, info))
}

/// Reads the greeting and sends the client flags; returns whether `NO_ZEROES` is in force.
fn greet(s: &mut Stream, deadline: Instant) -> io::Result<bool> {
    let g = read_vec(s, ServerGreeting::SIZE, deadline)?;
    let (greeting, _) = ServerGreeting::decode(&g)
        .map_err(protocol)?
        .ok_or_else(|| protocol("short greeting"))?;
    if !greeting.flags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
        return Err(protocol("server does not speak fixed newstyle"));
    }
    let cflags = ClientFlags::for_greeting(&greeting);
    let mut out = Vec::with_capacity(4);
    cflags.encode(&mut out);
    s.write_all_by(&out, deadline)?;
    Ok(cflags.contains(ClientFlags::NO_ZEROES))
}

/// `OPT_GO` for `export` (`EXPORT_NAME` with an old server).
fn go(s: &mut Stream, export: &str, no_zeroes: bool, deadline: Instant) -> io::Result<ExportInfo> {
    let mut out = Vec::with_capacity(64 + export.len());
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
