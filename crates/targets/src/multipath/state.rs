//! Multipath's per-reactor state: each reactor's own view of the load on every path, and the
//! copies of it that `status` reads.
//!
//! A reactor decides on its [`ReactorState`] alone: plain integers (I/Os and bytes in flight,
//! service-time estimates, one round-robin ticket per group) that only its thread touches, so
//! `map` and `end_io` neither share a cache line with another reactor nor do a read-modify-write.
//!
//! `status` prints the load of every path, which lives on the reactors. Each reactor therefore
//! also publishes its view into a [`Published`] block of its own: written only by that reactor
//! (relaxed stores of values it already has, no read-modify-write, on cache lines no other
//! reactor writes), read only by the control path, which adds up the reactors' views. The block
//! is kept per reactor index for the target's life: if the core makes the state anew (the table
//! installed on that reactor again), the new state starts from what the reactor last published,
//! so the estimates survive it.

use super::selector::PathLoad;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// This target's state on one reactor (made by `reactor_state`, used through `TargetCx::state`).
#[derive(Debug)]
pub(super) struct ReactorState {
    /// Per group: the I/Os this reactor placed in it (the round-robin position).
    pub(super) tickets: Box<[u64]>,
    /// Per path (index as in `Shared::paths`): the load this reactor put on it.
    pub(super) loads: Box<[PathLoad]>,
    /// Where this reactor publishes `loads` for `status`.
    published: Arc<Published>,
}

impl ReactorState {
    /// Publishes path `i`'s load for `status`. Reactor thread; five plain stores.
    #[inline]
    pub(super) fn publish(&self, i: usize) {
        self.published.store(i, &self.loads[i]);
    }
}

/// One path's load, as one reactor last published it.
#[derive(Debug, Default)]
#[repr(align(64))]
struct PathCell {
    in_flight: AtomicU64,
    in_flight_bytes: AtomicU64,
    hst: AtomicU64,
    last_finish: AtomicU64,
    stale_after: AtomicU64,
}

/// One reactor's published loads, one cache line per path.
#[derive(Debug)]
struct Published {
    paths: Box<[PathCell]>,
}

impl Published {
    fn new(n: usize) -> Published {
        let init = PathLoad::default();
        let p = Published {
            paths: (0..n).map(|_| PathCell::default()).collect(),
        };
        for i in 0..n {
            p.store(i, &init);
        }
        p
    }

    /// Only the owning reactor stores.
    #[inline]
    fn store(&self, i: usize, l: &PathLoad) {
        let c = &self.paths[i];
        c.in_flight.store(l.in_flight, Relaxed);
        c.in_flight_bytes.store(l.in_flight_bytes, Relaxed);
        c.hst.store(l.hst, Relaxed);
        c.last_finish.store(l.last_finish, Relaxed);
        c.stale_after.store(l.stale_after, Relaxed);
    }

    fn load(&self, i: usize) -> PathLoad {
        let c = &self.paths[i];
        PathLoad {
            in_flight: c.in_flight.load(Relaxed),
            in_flight_bytes: c.in_flight_bytes.load(Relaxed),
            hst: c.hst.load(Relaxed),
            last_finish: c.last_finish.load(Relaxed),
            stale_after: c.stale_after.load(Relaxed),
        }
    }
}

/// Every reactor's published loads, by reactor index (control path).
#[derive(Debug, Default)]
pub(super) struct Reactors {
    published: Mutex<Vec<Option<Arc<Published>>>>,
}

impl Reactors {
    /// The state for reactor `reactor` (table going live there): `groups` tickets and `paths`
    /// loads, starting from what that reactor last published for this table, if anything.
    pub(super) fn state(&self, reactor: usize, groups: usize, paths: usize) -> ReactorState {
        let mut all = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if all.len() <= reactor {
            all.resize(reactor + 1, None);
        }
        let published = all[reactor]
            .get_or_insert_with(|| Arc::new(Published::new(paths)))
            .clone();
        drop(all);
        ReactorState {
            tickets: vec![0; groups].into_boxed_slice(),
            loads: (0..paths).map(|i| published.load(i)).collect(),
            published,
        }
    }

    /// Path `i`'s load over every reactor, for `status`.
    pub(super) fn total(&self, i: usize) -> PathLoad {
        let all = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = PathLoad::default();
        for p in all.iter().flatten() {
            t.merge(&p.load(i));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_adds_up_what_each_reactor_published() {
        let r = Reactors::default();
        let mut a = r.state(0, 1, 2);
        let mut b = r.state(3, 1, 2);
        assert_eq!(r.total(1), PathLoad::default());
        a.loads[1].in_flight = 2;
        b.loads[1].in_flight = 5;
        a.publish(1);
        assert_eq!(r.total(1).in_flight, 2, "unpublished load is not seen");
        b.publish(1);
        assert_eq!(r.total(1).in_flight, 7);
        assert_eq!(r.total(0).in_flight, 0);
        // A state made again on reactor 3 starts from what it published.
        b.loads[1].hst = 4242;
        b.loads[1].last_finish = 9;
        b.loads[1].in_flight = 0;
        b.publish(1);
        let b2 = r.state(3, 1, 2);
        assert_eq!(b2.loads[1].hst, 4242);
        assert_eq!(b2.tickets.len(), 1);
        assert_eq!(r.total(1).hst, 4242);
    }
}
