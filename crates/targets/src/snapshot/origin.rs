//! `snapshot-origin <origin>`: reads go straight to the origin; a write to a chunk some
//! snapshot has not copied yet first has that chunk copied to each such snapshot's COW device
//! (through the core's copy engine), waiting parked until the copies are committed; then it
//! goes to the origin. Writes to other chunks, and reads, never wait.
//!
//! The instance holds its origin's [`OriginEntry`]; the data path reads the snapshot list with
//! one `ArcSwap` load and the exception words with atomics: no lock, no allocation.

use super::registry::OriginEntry;
use super::store::{untag, Lookup, K_COPY, K_RETRY};
use stackbd_core::target::expect_args;
use stackbd_core::target::TargetEnv;
use stackbd_core::{
    ArgError, Bio, CtorCx, DevId, DevRef, Limits, MapResult, ReactorInit, Sector, Status, Target,
    TargetCx,
};
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A `snapshot-origin` table line. Shared by every reactor; see the module docs.
#[derive(Debug)]
pub struct Origin {
    dev: DevRef,
    entry: Arc<OriginEntry>,
    /// Live (between `activate` and `deactivate`): counted in the entry's `origins`.
    live: AtomicBool,
    /// Owner id of this instance's doorbells in the origin's entry.
    owner: u64,
}

impl Origin {
    /// Builds the target. Control plane.
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        expect_args(args, 1, "<origin>")?;
        let (dev, _) = cx.device("origin", args[0], 0, cx.len)?;
        let entry = OriginEntry::get(cx.namespace(), dev.id);
        tracing::debug!(origin = %dev, "snapshot-origin built");
        Ok(Box::new(Origin {
            dev,
            entry,
            live: AtomicBool::new(false),
            owner: OriginEntry::new_owner(),
        }))
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.deactivate();
        self.entry.remove_bells(self.owner);
    }
}

/// Copies what an origin write to `sector` (a bio within one chunk of every snapshot) needs:
/// true if the bio must wait. Reactor thread.
pub(crate) fn copy_out(entry: &OriginEntry, sector: Sector, cx: &mut TargetCx<'_>) -> bool {
    let snaps = entry.snaps.load();
    let mut wait = false;
    let mut reads = false;
    for s in snaps.iter() {
        if !s.is_valid() {
            continue;
        }
        if !s.is_ready() {
            s.ensure_loaded(cx);
            wait |= !s.is_ready();
            if !s.is_ready() {
                continue;
            }
        }
        let c = sector / s.chunk_sectors() as u64;
        match s.lookup(c) {
            // Copied: but a snapshot read that went to the origin before the exception was
            // committed may still be reading the old data there.
            Lookup::Cow(_) => reads |= s.reads_in_flight(c),
            Lookup::Wait => wait = true,
            Lookup::None => {
                if s.claim(c) {
                    match s.alloc() {
                        Some(n) => {
                            s.start_copy(cx, c, n);
                            wait = true;
                        }
                        None => {
                            s.unclaim(c);
                            s.invalidate(cx, "the COW device is full");
                        }
                    }
                } else {
                    wait = true;
                }
            }
        }
    }
    if reads && !wait {
        cx.timer_at(
            std::time::Instant::now() + std::time::Duration::from_micros(50),
            super::store::tag(K_RETRY, 0, 0),
        );
        return true;
    }
    wait
}

/// Routes a store's child, copy or timer end to the store its tag names. Reactor thread.
pub(crate) fn route(
    entry: &OriginEntry,
    cx: &mut TargetCx<'_>,
    tag: u64,
    status: Status,
    copy: bool,
) {
    let (kind, id, v) = untag(tag);
    if let Some(s) = entry.store(id) {
        if kind == K_RETRY {
            return;
        }
        if copy {
            s.copy_done(cx, v, status);
        } else if kind == K_COPY {
            s.retry_ready(cx, v);
        } else {
            s.child_done(cx, kind, v, status);
        }
    }
}

impl Target for Origin {
    fn kind(&self) -> &'static str {
        "snapshot-origin"
    }

    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        if bio.op.is_write() && copy_out(&self.entry, bio.sector, cx) {
            return MapResult::Park { key: 0 };
        }
        bio.dev = self.dev.id;
        MapResult::Remapped
    }

    fn max_io_len(&self, offset: Sector) -> Sector {
        match self.entry.min_chunk.load(Ordering::Acquire) {
            0 => Sector::MAX,
            m => m - offset % m,
        }
    }

    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn reactor_state(&self, init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        self.entry.add_bell(self.owner, init.doorbell.clone());
        None
    }

    fn child_done(&self, cx: &mut TargetCx<'_>, tag: u64, status: Status) {
        route(&self.entry, cx, tag, status, false);
    }

    fn copy_done(&self, cx: &mut TargetCx<'_>, tag: u64, status: Status) {
        route(&self.entry, cx, tag, status, true);
    }

    fn timer(&self, cx: &mut TargetCx<'_>, token: u64) {
        if untag(token).0 == K_RETRY {
            cx.unpark_where(|_| true);
            return;
        }
        route(&self.entry, cx, token, Status::Ok, false);
    }

    fn wake(&self, cx: &mut TargetCx<'_>) {
        cx.unpark_where(|_| true);
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        child(self.dev.id)
    }

    fn devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn args(&self) -> String {
        self.dev.to_string()
    }

    fn activate(&self, _env: &TargetEnv) {
        if !self.live.swap(true, Ordering::AcqRel) {
            self.entry.origins.fetch_add(1, Ordering::AcqRel);
            self.entry.suspended.store(0, Ordering::Release);
        }
    }

    fn deactivate(&self) {
        if self.live.swap(false, Ordering::AcqRel) {
            self.entry.origins.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn presuspend(&self, _noflush: bool) {
        self.entry.suspended.store(1, Ordering::Release);
    }

    fn resume(&self) {
        self.entry.suspended.store(0, Ordering::Release);
    }

    fn message(&self, argv: &[&str]) -> Result<String, String> {
        Err(format!(
            "snapshot-origin takes no messages (got '{}')",
            argv.join(" ")
        ))
    }
}
