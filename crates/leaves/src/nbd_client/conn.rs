//! One data connection of a channel and its request slots (reactor thread only).

use super::health::LossCode;
use super::wire::Stream;
use super::MAX_IOV;
use stackbd_core::{BioId, DataBuf, Status};
use stackbd_nbd::{Errno, Request};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// One request in flight (or waiting to be sent).
pub(super) struct Slot {
    pub(super) bio: BioId,
    pub(super) busy: bool,
    /// A flush header (PREFLUSH) then the request header.
    pub(super) hdr: [u8; 2 * Request::SIZE],
    pub(super) hlen: u8,
    /// Write payload to send after the header (empty otherwise).
    pub(super) wdata: DataBuf,
    /// Read destination (empty otherwise).
    pub(super) rdata: DataBuf,
    /// Bytes of header + payload sent.
    pub(super) sent: usize,
    /// Replies still owed (2 with a preflush).
    pub(super) owed: u8,
    pub(super) status: Status,
    pub(super) started: Instant,
}

impl Slot {
    pub(super) fn total(&self) -> usize {
        self.hlen as usize + self.wdata.len()
    }
}

/// Receives into `d[off..]` straight from the socket.
pub(super) fn read_into(stream: &mut Stream, d: &DataBuf, off: usize) -> io::Result<usize> {
    assert!(off < d.len());
    // SAFETY: `d` is the data of a read this channel holds (submitted, not completed): its bytes
    // are this leaf's alone until it completes the bio (`LeafChannel::submit`'s contract).
    stream.read(unsafe { d.slice(off, d.len() - off).as_bytes_mut() })
}

pub(super) enum ConnState {
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
pub(super) type Connected = (usize, u64, io::Result<Stream>);

/// A connection attempt that has not reported back this long after the leaf's timeout (a name
/// lookup that hangs) is given up; its late result, if any, is dropped.
pub(super) const CONNECT_GRACE: Duration = Duration::from_secs(1);

pub(super) struct Conn {
    pub(super) state: ConnState,
    pub(super) backoff: Duration,
    /// Number of the latest connection attempt: a result for an older one is stale.
    pub(super) attempt: u64,
    /// First slot index owned by this connection.
    pub(super) base: u32,
    pub(super) free: Vec<u32>,
    pub(super) sendq: VecDeque<u32>,
    pub(super) rx: Box<[u8]>,
    pub(super) rx_start: usize,
    pub(super) rx_end: usize,
    /// A read reply whose data is arriving: (slot, bytes received).
    pub(super) cur: Option<(u32, usize)>,
    /// Set by `prepare_wait` when a send failed (no completion context there).
    pub(super) broken: bool,
}

impl Conn {
    pub(super) fn up(&self) -> bool {
        matches!(self.state, ConnState::Up(_))
    }

    pub(super) fn fd(&self) -> Option<RawFd> {
        match &self.state {
            ConnState::Up(s) => Some(s.fd()),
            ConnState::Connecting { .. } | ConnState::Down { .. } => None,
        }
    }

    pub(super) fn inflight(&self, depth: u32) -> u32 {
        depth - self.free.len() as u32
    }

    /// Writes queued output. Ok(true) when all of it went out.
    pub(super) fn flush_out(&mut self, slots: &mut [Slot]) -> io::Result<bool> {
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
pub(super) enum Fail {
    /// Lost (EOF, reset, protocol violation): what went wrong, unless recorded already.
    Path(Option<LossCode>),
    /// A request older than the timeout.
    Timeout,
}

pub(super) fn errno_status(e: Errno) -> Status {
    match e.for_client() {
        Errno::Eio | Errno::Enomem => Status::IoError,
        Errno::Enospc => Status::NoSpace,
        Errno::Einval | Errno::Eperm | Errno::Eoverflow | Errno::Other(_) => Status::Invalid,
        Errno::Enotsup => Status::NotSupported,
        // The server is going away: a transport problem, not the data's.
        Errno::Eshutdown => Status::PathError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
