//! The control connections that are open, so there are never more than a cap of them: each
//! one's thread says when it waits for a request (idle) and when it works on one; a connection
//! that would go over the cap first evicts the one idle the longest, and is refused only when
//! every connection is busy with a request. An idle connection is also closed after the idle
//! timeout by its own thread (a read timeout).

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounds on the control socket's connections.
#[derive(Clone, Copy, Debug)]
pub struct ControlLimits {
    /// Connections open at once.
    pub max_conns: usize,
    /// A connection waiting this long for its next request is closed.
    pub idle_timeout: Duration,
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            max_conns: 64,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

struct Entry {
    /// A handle on the socket, to shut it down on eviction.
    sock: UnixStream,
    /// Since when it waits for a request; `None` while it works on one.
    idle_since: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    open: BTreeMap<u64, Entry>,
}

/// The open control connections.
#[derive(Clone, Default)]
pub struct Conns(Arc<Mutex<Inner>>);

/// What [`Conns::admit`] decided.
pub enum Admit {
    /// Take the connection; it is registered (idle) as `Slot`.
    Yes(Slot),
    /// Every one of the `max` connections is busy with a request.
    Full,
}

/// A registered connection; unregistered when dropped.
pub struct Slot {
    conns: Conns,
    id: u64,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new connection, evicting the longest-idle one if the cap is reached.
    /// Returns the decision and, if one was evicted, how long it had been idle.
    pub fn admit(&self, s: &UnixStream, max: usize) -> (Admit, Option<Duration>) {
        let Ok(sock) = s.try_clone() else {
            return (Admit::Full, None);
        };
        let mut g = self.lock();
        let mut evicted = None;
        while g.open.len() >= max.max(1) {
            let oldest = g
                .open
                .iter()
                .filter_map(|(id, e)| e.idle_since.map(|t| (t, *id)))
                .min();
            let Some((since, id)) = oldest else {
                return (Admit::Full, evicted);
            };
            if let Some(e) = g.open.remove(&id) {
                let _ = e.sock.shutdown(std::net::Shutdown::Both);
            }
            evicted = Some(since.elapsed());
        }
        let id = g.next;
        g.next += 1;
        g.open.insert(
            id,
            Entry {
                sock,
                idle_since: Some(Instant::now()),
            },
        );
        (
            Admit::Yes(Slot {
                conns: self.clone(),
                id,
            }),
            evicted,
        )
    }
}

impl Slot {
    /// The connection waits for its next request (it may be evicted).
    pub fn idle(&self) {
        if let Some(e) = self.conns.lock().open.get_mut(&self.id) {
            e.idle_since = Some(Instant::now());
        }
    }

    /// The connection works on a request (it is not evicted). False if it was evicted already.
    pub fn busy(&self) -> bool {
        match self.conns.lock().open.get_mut(&self.id) {
            Some(e) => {
                e.idle_since = None;
                true
            }
            None => false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.lock().open.remove(&self.id);
    }
}
