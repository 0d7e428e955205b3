//! Where a snapshot finds its origin: a process-wide registry of [`OriginEntry`]s keyed by
//! (engine namespace, origin `DevId`), so engines in one process never mix. Entries are found
//! and changed on the control plane only (table loads, target drops, reactor installs); the data
//! path reads an entry's snapshot list and doorbells through `ArcSwap` loads, lock-free.

use super::store::Store;
use arc_swap::ArcSwap;
use stackbd_core::{DevId, Doorbell};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Everything attached to one origin device in one engine: its snapshots and the doorbells of
/// every target that may park bios waiting on them. Shared by the `snapshot-origin` and
/// `snapshot` targets over that device; dropped with the last of them.
#[derive(Debug)]
pub struct OriginEntry {
    pub(crate) key: (u64, DevId),
    /// The snapshots, in creation order; swapped whole on the control plane.
    pub(crate) snaps: ArcSwap<Vec<Arc<Store>>>,
    /// Doorbells (one per target per reactor) rung when a store finishes loading or committing,
    /// so parked bios look again.
    pub(crate) bells: ArcSwap<Vec<(u64, Doorbell)>>,
    /// Smallest chunk size among the snapshots (sectors), 0 with none: where origin bios split.
    pub(crate) min_chunk: AtomicU64,
    /// Live `snapshot-origin` target instances over this device (tables in use, not loaded).
    pub(crate) origins: AtomicU32,
    /// Of those, how many are suspended (presuspend .. resume).
    pub(crate) suspended: AtomicU32,
    /// Live `snapshot-merge` targets over this device (new snapshots are refused meanwhile).
    pub(crate) merging: AtomicU32,
    next_id: AtomicU32,
}

static REGISTRY: Mutex<Vec<Weak<OriginEntry>>> = Mutex::new(Vec::new());

impl OriginEntry {
    /// The entry for `(namespace, origin)`, made if there is none. Control plane; allocates;
    /// takes the registry lock.
    pub fn get(namespace: u64, origin: DevId) -> Arc<OriginEntry> {
        let mut reg = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
        reg.retain(|w| w.strong_count() > 0);
        if let Some(e) = reg
            .iter()
            .filter_map(Weak::upgrade)
            .find(|e| e.key == (namespace, origin))
        {
            return e;
        }
        let e = Arc::new(OriginEntry {
            key: (namespace, origin),
            snaps: ArcSwap::from_pointee(Vec::new()),
            bells: ArcSwap::from_pointee(Vec::new()),
            min_chunk: AtomicU64::new(0),
            origins: AtomicU32::new(0),
            suspended: AtomicU32::new(0),
            merging: AtomicU32::new(0),
            next_id: AtomicU32::new(1),
        });
        reg.push(Arc::downgrade(&e));
        e
    }

    /// A store id unique within this entry (tags of child I/O carry it). Control plane.
    pub(crate) fn next_id(&self) -> u16 {
        // Wraps after 65535 snapshots of one origin: ids of live stores stay distinct in practice.
        (self.next_id.fetch_add(1, Ordering::Relaxed) & 0xffff) as u16
    }

    /// Adds a store. Control plane.
    pub(crate) fn add(&self, s: Arc<Store>) {
        self.snaps.rcu(|v| {
            let mut v = (**v).clone();
            v.push(s.clone());
            v
        });
        self.update_min_chunk();
    }

    /// Removes the store with this id. Control plane.
    pub(crate) fn remove(&self, id: u16) {
        self.snaps
            .rcu(|v| v.iter().filter(|s| s.id != id).cloned().collect::<Vec<_>>());
        self.update_min_chunk();
    }

    fn update_min_chunk(&self) {
        let m = self
            .snaps
            .load()
            .iter()
            .map(|s| s.chunk_sectors() as u64)
            .min()
            .unwrap_or(0);
        self.min_chunk.store(m, Ordering::Release);
    }

    /// Registers a doorbell of target instance `owner`. Control plane (`reactor_state`).
    pub(crate) fn add_bell(&self, owner: u64, b: Doorbell) {
        self.bells.rcu(|v| {
            let mut v = (**v).clone();
            v.push((owner, b.clone()));
            v
        });
    }

    /// Drops the doorbells of target instance `owner` (it is being dropped). Control plane.
    pub(crate) fn remove_bells(&self, owner: u64) {
        self.bells.rcu(|v| {
            v.iter()
                .filter(|(o, _)| *o != owner)
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// A number for a new target instance (owner of doorbells). Control plane.
    pub(crate) fn new_owner() -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    /// Rings every doorbell. Any thread; never blocks or allocates.
    pub(crate) fn ring(&self) {
        for (_, b) in self.bells.load().iter() {
            b.ring();
        }
    }

    /// The store with this id, if it is still attached. Reactor thread; lock-free.
    pub(crate) fn store(&self, id: u16) -> Option<Arc<Store>> {
        self.snaps.load().iter().find(|s| s.id == id).cloned()
    }
}
