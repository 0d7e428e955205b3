//! An NBD leaf's health, shared by its channels: how many of their connections are up, how
//! many connect attempts failed in a row, the last error and when.
//!
//! Reactors update it only on transitions (a connection up or lost, an attempt failed), with
//! relaxed atomics: a reactor never takes a lock here and never allocates. Connector threads
//! (never a reactor) also keep the text of the last connect error under a mutex that only they
//! and the control plane take. [`Health::get`] (control plane, any thread) reads it all.

use stackbd_core::{HealthState, LeafHealth};
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// With no connection up, this many failed connect attempts in a row make the leaf `failed`
/// rather than `reconnecting`.
pub(super) const FAILED_AFTER: u32 = 2;

/// What a reactor saw go wrong, packed with its time into one atomic (see [`pack`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LossCode {
    /// A request got no reply within the leaf's timeout.
    Timeout,
    /// The server closed the connection.
    Eof,
    /// The server broke the protocol.
    Protocol,
    /// A system call failed with this errno.
    Errno(u16),
    /// A connect attempt never reported back.
    ConnectHung,
    /// No connector thread could be started.
    NoThread,
    /// Something else ended the connection.
    Other,
}

impl LossCode {
    /// The code of a lost connection's error.
    pub(super) fn of(e: &io::Error) -> LossCode {
        match (e.kind(), e.raw_os_error()) {
            (io::ErrorKind::UnexpectedEof | io::ErrorKind::WriteZero, _) => LossCode::Eof,
            (io::ErrorKind::InvalidData, _) => LossCode::Protocol,
            (_, Some(n)) if (1..0x0fff).contains(&n) => LossCode::Errno(n as u16),
            _ => LossCode::Other,
        }
    }

    fn to_bits(self) -> u64 {
        match self {
            LossCode::Timeout => 1 << 12,
            LossCode::Eof => 2 << 12,
            LossCode::Protocol => 3 << 12,
            LossCode::Errno(n) => (4 << 12) | u64::from(n & 0x0fff),
            LossCode::ConnectHung => 5 << 12,
            LossCode::NoThread => 6 << 12,
            LossCode::Other => 7 << 12,
        }
    }

    fn from_bits(b: u64) -> Option<LossCode> {
        Some(match b >> 12 {
            1 => LossCode::Timeout,
            2 => LossCode::Eof,
            3 => LossCode::Protocol,
            4 => LossCode::Errno((b & 0x0fff) as u16),
            5 => LossCode::ConnectHung,
            6 => LossCode::NoThread,
            7 => LossCode::Other,
            _ => return None,
        })
    }

    fn text(self, timeout: Duration) -> String {
        match self {
            LossCode::Timeout => format!("request timed out (no reply within {timeout:?})"),
            LossCode::Eof => "connection lost: the server closed it (EOF)".into(),
            LossCode::Protocol => "connection dropped: NBD protocol error".into(),
            LossCode::Errno(n) => format!(
                "connection lost: {}",
                io::Error::from_raw_os_error(i32::from(n))
            ),
            LossCode::ConnectHung => "reconnect: the attempt never reported back".into(),
            LossCode::NoThread => "reconnect: cannot start a connector thread".into(),
            LossCode::Other => "connection lost".into(),
        }
    }
}

/// Milliseconds since the Unix epoch, now (0 if the clock is before it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A code and the time it was seen, in one word: 48 bits of milliseconds, 16 of code.
fn pack(code: LossCode, ms: u64) -> u64 {
    (ms << 16) | code.to_bits()
}

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct Health {
    /// Connections of all channels, and those up.
    total: AtomicU32,
    up: AtomicU32,
    /// Connect attempts that failed in a row, over all channels; a connect resets it.
    failing: AtomicU32,
    /// When the state last changed (ms since the epoch; 0: never).
    changed_ms: AtomicU64,
    /// The last loss a reactor saw: [`pack`]ed code and time (0: none).
    loss: AtomicU64,
    /// The last connect error of a connector thread, and when. Never locked by a reactor.
    connect_err: Mutex<Option<(String, SystemTime)>>,
}

impl Health {
    fn changed(&self) {
        self.changed_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A channel with `conns` connections (none up yet) was made. Reactor thread.
    pub(super) fn channel_added(&self, conns: u32) {
        self.total.fetch_add(conns, Ordering::Relaxed);
        self.changed();
    }

    /// A channel went away with `conns` connections, `up` of them up. Reactor thread.
    pub(super) fn channel_dropped(&self, conns: u32, up: u32) {
        self.total.fetch_sub(conns, Ordering::Relaxed);
        self.up.fetch_sub(up, Ordering::Relaxed);
        self.changed();
    }

    /// A connection came up. Reactor thread.
    pub(super) fn conn_up(&self) {
        self.up.fetch_add(1, Ordering::Relaxed);
        self.failing.store(0, Ordering::Relaxed);
        self.changed();
    }

    /// A connection that was up is lost (`code`, if not recorded already). Reactor thread.
    pub(super) fn conn_lost(&self, code: Option<LossCode>) {
        self.up.fetch_sub(1, Ordering::Relaxed);
        if let Some(c) = code {
            self.record(c);
        }
        self.changed();
    }

    /// A connect attempt failed. Reactor thread.
    pub(super) fn attempt_failed(&self) {
        if self.failing.fetch_add(1, Ordering::Relaxed) + 1 == FAILED_AFTER {
            self.changed();
        }
    }

    /// Remembers what a reactor saw go wrong. Reactor thread.
    pub(super) fn record(&self, code: LossCode) {
        self.loss.store(pack(code, now_ms()), Ordering::Relaxed);
    }

    /// Remembers a connect error's text. Connector threads only (never a reactor).
    pub(super) fn connect_failed(&self, e: &io::Error) {
        let text = format!("reconnect: {e}");
        *self
            .connect_err
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((text, SystemTime::now()));
    }

    /// The leaf's health (control plane, any thread): `ok` with every connection up (or no
    /// channel yet), `degraded` with some up, else `reconnecting`, or `failed` once
    /// [`FAILED_AFTER`] attempts in a row failed. `timeout` words the timeout error.
    pub(super) fn get(&self, timeout: Duration) -> LeafHealth {
        let total = self.total.load(Ordering::Relaxed);
        let up = self.up.load(Ordering::Relaxed);
        let state = if up >= total {
            HealthState::Ok
        } else if up > 0 {
            HealthState::Degraded
        } else if self.failing.load(Ordering::Relaxed) >= FAILED_AFTER {
            HealthState::Failed
        } else {
            HealthState::Reconnecting
        };
        let loss = self.loss.load(Ordering::Relaxed);
        let reactor =
            LossCode::from_bits(loss & 0xffff).map(|c| (c.text(timeout), at_ms(loss >> 16)));
        let connect = self
            .connect_err
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let last_error = match (reactor, connect) {
            (Some(r), Some(c)) => Some(if c.1 > r.1 { c } else { r }),
            (r, c) => r.or(c),
        };
        let changed = self.changed_ms.load(Ordering::Relaxed);
        LeafHealth {
            state,
            since: (changed != 0).then(|| at_ms(changed)),
            last_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in [
            LossCode::Timeout,
            LossCode::Eof,
            LossCode::Protocol,
            LossCode::Errno(104),
            LossCode::ConnectHung,
            LossCode::NoThread,
            LossCode::Other,
        ] {
            let p = pack(c, 1_700_000_000_123);
            assert_eq!(LossCode::from_bits(p & 0xffff), Some(c));
            assert_eq!(p >> 16, 1_700_000_000_123);
        }
        assert_eq!(LossCode::from_bits(0), None);
    }

    #[test]
    fn state_follows_the_connections() {
        let h = Health::default();
        let t = Duration::from_secs(2);
        assert_eq!(h.get(t).state, HealthState::Ok);
        h.channel_added(2);
        assert_eq!(h.get(t).state, HealthState::Reconnecting);
        h.conn_up();
        assert_eq!(h.get(t).state, HealthState::Degraded);
        h.conn_up();
        assert_eq!(
            h.get(t),
            LeafHealth {
                since: h.get(t).since,
                ..LeafHealth::ok()
            }
        );
        h.conn_lost(Some(LossCode::Timeout));
        h.conn_lost(Some(LossCode::Eof));
        let g = h.get(t);
        assert_eq!(g.state, HealthState::Reconnecting);
        assert!(g.error().unwrap().contains("EOF"), "{g:?}");
        for _ in 0..FAILED_AFTER {
            h.attempt_failed();
        }
        assert_eq!(h.get(t).state, HealthState::Failed);
        h.connect_failed(&io::Error::from_raw_os_error(111));
        assert!(h.get(t).error().unwrap().contains("refused"));
        h.conn_up();
        assert_eq!(h.get(t).state, HealthState::Degraded);
        h.channel_dropped(2, 1);
        assert_eq!(h.get(t).state, HealthState::Ok);
    }
}
