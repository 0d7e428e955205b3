//! `snapshot-merge <origin> <COW device> <P|PO> <chunksize> [features]`: takes the origin's
//! place and copies the COW's chunks back into the origin in the background, through the copy
//! engine, one exception at a time from the end of the table (so the table on disk stays a
//! prefix): wait for I/O in flight on the chunk, copy COW -> origin, flush the origin, clear
//! the entry in its metadata area, flush the COW, then the chunk reads from the origin again.
//! I/O goes on meanwhile: a chunk not merged yet is read and written on the COW device, the
//! chunk being merged waits (parked), merged chunks go to the origin. `status` is dm's (the
//! merge is done when `<sectors_allocated>` equals `<metadata_sectors>`), `Merge failed` after
//! an error; the volume's event counter is raised when the merge ends.
//!
//! The merge is driven by the reactor that takes the store's token (a doorbell rung when the
//! table goes live starts it); every step is child I/O or a copy of that reactor. Other
//! snapshots of the same origin are refused while a merge runs (not supported yet).

use super::registry::OriginEntry;
use super::snap::{parse, Parsed};
use super::store::{tag, untag, Lookup, Persistence, Store, DONE, PENDING, READY};
use arc_swap::ArcSwapOption;
use stackbd_core::events::Events;
use stackbd_core::target::TargetEnv;
use stackbd_core::{
    ArgError, Bio, BioFlags, ChildIo, CopyIo, CtorCx, DataBuf, DevId, DevRef, Endio, Limits,
    MapResult, Op, ReactorInit, Sector, Status, Target, TargetCx,
};
use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const K_MCOPY: u64 = 20;
const K_MFLUSH1: u64 = 21;
const K_MREAD: u64 = 22;
const K_MWRITE: u64 = 23;
const K_MFLUSH2: u64 = 24;
const K_MWAIT: u64 = 25;

const M_IDLE: u8 = 0;
const M_RUNNING: u8 = 1;
const M_DONE: u8 = 2;
const M_FAILED: u8 = 3;

impl Store {
    /// dm's status of a merging snapshot.
    pub(super) fn merge_status(&self) -> String {
        if self.merge_state.load(Ordering::Acquire) == M_FAILED {
            return "Merge failed".into();
        }
        let cs = self.geo.chunk_sectors as u64;
        if self.state.load(Ordering::Acquire) != READY {
            // Not read yet: say so rather than print figures that look like a finished merge.
            return "Loading".into();
        }
        let left = self.remaining.load(Ordering::Acquire);
        let area = left.saturating_sub(1) / self.geo.entries_per_area();
        let alloc = (2 + area + left).saturating_mul(cs);
        format!(
            "{alloc}/{} {}",
            self.cow_sectors,
            (area + 2).saturating_mul(cs)
        )
    }

    /// Loads the store if needed and starts the merge once. True if the merge finished in this
    /// call (nothing to merge). Reactor thread.
    pub(super) fn merge_kick(&self, cx: &mut TargetCx<'_>) -> bool {
        if !self.is_ready() {
            self.ensure_loaded(cx);
            return false;
        }
        if !self.is_valid() {
            if self.merge_state.swap(M_FAILED, Ordering::AcqRel) != M_FAILED {
                tracing::error!(store = self.id, "merge failed: the snapshot is invalid");
            }
            return false;
        }
        if self
            .merge_state
            .compare_exchange(M_IDLE, M_RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        if self.token.swap(true, Ordering::AcqRel) {
            // A load or a commit holds it (not expected for a merge store): later.
            self.merge_state.store(M_IDLE, Ordering::Release);
            return false;
        }
        let n = self.cs_mut().order.len() as u64;
        self.remaining.store(n, Ordering::Release);
        tracing::info!(store = self.id, exceptions = n, "snapshot merge started");
        self.merge_next(cx)
    }

    fn merge_next(&self, cx: &mut TargetCx<'_>) -> bool {
        let mut cs = self.cs_mut();
        let Some((old, new)) = cs.order.pop() else {
            drop(cs);
            self.merge_state.store(M_DONE, Ordering::Release);
            self.token.store(false, Ordering::Release);
            tracing::info!(store = self.id, "snapshot merge finished");
            self.entry.ring();
            return true;
        };
        let index = cs.order.len() as u64;
        cs.merge_step = Some((old, new, index));
        drop(cs);
        let w = &self.map[old as usize];
        if w.load(Ordering::Acquire) == DONE | new {
            w.store(PENDING | new, Ordering::Release);
            self.merge_copy(cx);
        } else {
            // An older entry for a chunk a later one replaced: only its slot is cleared.
            self.merge_clear(cx);
        }
        false
    }

    fn step(&self) -> (u64, u64, u64) {
        self.cs_mut().merge_step.unwrap_or((0, 0, 0))
    }

    fn merge_copy(&self, cx: &mut TargetCx<'_>) {
        let (old, new, _) = self.step();
        if self.reads_in_flight(old) {
            cx.timer_at(
                std::time::Instant::now() + std::time::Duration::from_micros(50),
                tag(K_MWAIT, self.id, 0),
            );
            return;
        }
        let cs = self.geo.chunk_sectors as u64;
        let len = cs.min(self.origin_sectors() - old * cs) as u32;
        cx.copy(CopyIo {
            src_dev: self.cow,
            src: new * cs,
            dst_dev: self.origin,
            dst: old * cs,
            sectors: len,
            tag: tag(K_MCOPY, self.id, 0),
        });
    }

    fn merge_clear(&self, cx: &mut TargetCx<'_>) {
        let (_, _, index) = self.step();
        let Some(b) = cx.bounce(self.geo.chunk_bytes()) else {
            return self.merge_failed(cx, "no bounce buffer for a metadata area");
        };
        self.cs_mut().buf = Some(b.id());
        let area = index / self.geo.entries_per_area();
        match self.geo.area_chunk(area) {
            Ok(a) => self.chunk_io(cx, Op::Read, K_MREAD, a, b.data(), 0),
            Err(e) => self.merge_failed(cx, &e.to_string()),
        }
    }

    fn merge_failed(&self, cx: &mut TargetCx<'_>, why: &str) {
        tracing::error!(store = self.id, "snapshot merge failed: {why}");
        let (old, new, _) = self.step();
        let w = &self.map[old as usize];
        if w.load(Ordering::Acquire) == PENDING | new {
            w.store(DONE | new, Ordering::Release);
        }
        if let Some(b) = self.cs_mut().buf.take() {
            cx.release(b);
        }
        self.merge_state.store(M_FAILED, Ordering::Release);
        self.token.store(false, Ordering::Release);
        self.entry.ring();
    }

    /// A merge step's child, copy or retry timer ended. True if the merge finished.
    pub(super) fn merge_event(&self, cx: &mut TargetCx<'_>, kind: u64, status: Status) -> bool {
        if !status.is_ok() {
            self.merge_failed(cx, &format!("merge I/O failed ({status:?})"));
            return false;
        }
        match kind {
            K_MWAIT => self.merge_copy(cx),
            K_MCOPY => cx.submit_child(ChildIo {
                op: Op::Flush,
                flags: BioFlags::NONE,
                dev: self.origin,
                sector: 0,
                sectors: 0,
                copy_src: 0,
                data: DataBuf::EMPTY,
                tag: tag(K_MFLUSH1, self.id, 0),
            }),
            K_MFLUSH1 => self.merge_clear(cx),
            K_MREAD => {
                let (_, _, index) = self.step();
                let Some(b) = self.cs_mut().buf else {
                    return false;
                };
                let d = cx.bounce_data(b);
                let slot = (index % self.geo.entries_per_area()) as usize;
                d.write_from(slot * 16, &[0u8; 16]);
                let area = self.geo.area_chunk(index / self.geo.entries_per_area());
                self.chunk_io(cx, Op::Write, K_MWRITE, area.unwrap_or(0), d, 0);
            }
            K_MWRITE => self.flush(cx, K_MFLUSH2),
            K_MFLUSH2 => {
                let (old, new, index) = self.step();
                if let Some(b) = self.cs_mut().buf.take() {
                    cx.release(b);
                }
                let w = &self.map[old as usize];
                if w.load(Ordering::Acquire) == PENDING | new {
                    w.store(0, Ordering::Release);
                }
                self.remaining.store(index, Ordering::Release);
                self.entry.ring();
                return self.merge_next(cx);
            }
            _ => {}
        }
        false
    }
}

/// A `snapshot-merge` table line. Shared by every reactor; see the module docs.
#[derive(Debug)]
pub struct Merge {
    origin: DevRef,
    cow: DevRef,
    store: Arc<Store>,
    events: ArcSwapOption<Events>,
    /// Owner id of this instance's doorbells in the origin's entry.
    owner: u64,
}

impl Merge {
    /// Builds the target. Control plane; allocates the exception table.
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        let p: Parsed = parse(cx, args)?;
        if p.kind == Persistence::Transient {
            return Err(ArgError::new(
                "persistent?",
                "snapshot-merge needs a persistent COW device (P or PO)",
            ));
        }
        let entry = OriginEntry::get(cx.namespace(), p.origin.id);
        if !entry.snaps.load().is_empty() {
            return Err(ArgError::new(
                "origin",
                format!(
                    "'{}' has snapshots attached: remove them (and the snapshot being merged) \
                     before merging",
                    p.origin
                ),
            ));
        }
        if entry.merging.load(Ordering::Acquire) > 0 {
            return Err(ArgError::new(
                "origin",
                format!("'{}' is already being merged into", p.origin),
            ));
        }
        let store = Store::new(
            entry.clone(),
            p.origin.id,
            p.origin_sectors,
            p.cow.id,
            p.cow_sectors,
            p.kind,
            p.chunk,
        )
        .map_err(|e| ArgError::new("COW device", e))?
        .for_merge();
        entry.merging.fetch_add(1, Ordering::AcqRel);
        Ok(Box::new(Merge {
            origin: p.origin,
            cow: p.cow,
            store: Arc::new(store),
            events: ArcSwapOption::empty(),
            owner: OriginEntry::new_owner(),
        }))
    }

    fn finished(&self) {
        if let Some(e) = &*self.events.load() {
            e.raise();
        }
    }

    fn kick(&self, cx: &mut TargetCx<'_>) {
        if self.store.merge_kick(cx) {
            self.finished();
        }
    }
}

impl Drop for Merge {
    fn drop(&mut self) {
        self.store.entry.merging.fetch_sub(1, Ordering::AcqRel);
        self.store.entry.remove_bells(self.owner);
    }
}

impl Target for Merge {
    fn kind(&self) -> &'static str {
        "snapshot-merge"
    }

    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        let s = &*self.store;
        if !s.is_ready() || s.merge_state.load(Ordering::Acquire) == M_IDLE {
            self.kick(cx);
            if !s.is_ready() {
                return MapResult::Park { key: 0 };
            }
        }
        if !s.is_valid() {
            return MapResult::Done(Status::IoError);
        }
        if bio.op == Op::Flush {
            bio.dev = self.origin.id;
            return MapResult::Remapped;
        }
        let cs = s.chunk_sectors() as u64;
        let (c, off) = (bio.sector / cs, bio.sector % cs);
        match s.lookup(c) {
            Lookup::Wait => MapResult::Park { key: 0 },
            Lookup::None => {
                bio.dev = self.origin.id;
                MapResult::Remapped
            }
            Lookup::Cow(n) => {
                // Counted until done: the merge of this chunk waits for it.
                let bucket = s.read_started(c);
                cx.push(bio, &(bucket as u64));
                bio.dev = self.cow.id;
                bio.sector = n * cs + off;
                MapResult::Remapped
            }
        }
    }

    fn end_io(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> Endio {
        let bucket: u64 = bio.popped_ctx();
        self.store.read_done(bucket as u32);
        Endio::Done
    }

    fn frame_bytes(&self) -> usize {
        8
    }

    fn max_io_len(&self, offset: Sector) -> Sector {
        let cs = self.store.chunk_sectors() as u64;
        cs - offset % cs
    }

    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.origin.id, self.cow.id]
    }

    fn reactor_state(&self, init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        self.store.entry.add_bell(self.owner, init.doorbell.clone());
        None
    }

    fn activate(&self, env: &TargetEnv) {
        self.events.store(Some(env.events.clone()));
        // Start the merge on a reactor (its `wake`).
        self.store.entry.ring();
    }

    fn child_done(&self, cx: &mut TargetCx<'_>, tag: u64, status: Status) {
        let (kind, _, v) = untag(tag);
        if kind >= K_MCOPY {
            if self.store.merge_event(cx, kind, status) {
                self.finished();
            }
        } else {
            self.store.child_done(cx, kind, v, status);
        }
    }

    fn copy_done(&self, cx: &mut TargetCx<'_>, _tag: u64, status: Status) {
        if self.store.merge_event(cx, K_MCOPY, status) {
            self.finished();
        }
    }

    fn timer(&self, cx: &mut TargetCx<'_>, token: u64) {
        if untag(token).0 == K_MWAIT && self.store.merge_event(cx, K_MWAIT, Status::Ok) {
            self.finished();
        }
    }

    fn wake(&self, cx: &mut TargetCx<'_>) {
        cx.unpark_where(|_| true);
        if self.store.merge_state.load(Ordering::Acquire) == M_IDLE {
            self.kick(cx);
        }
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        child(self.origin.id)
    }

    fn devices(&self) -> Vec<DevId> {
        vec![self.origin.id, self.cow.id]
    }

    fn args(&self) -> String {
        format!(
            "{} {} {} {}",
            self.origin,
            self.cow,
            self.store.kind.as_str(),
            self.store.chunk_sectors()
        )
    }

    fn status(&self) -> String {
        self.store.status()
    }
}

/// True once the merge has finished (for tests and the CLI through `status`).
pub fn merge_finished(status: &str) -> bool {
    let mut f = status.split_whitespace();
    match (f.next().and_then(|a| a.split('/').next()), f.next()) {
        (Some(a), Some(m)) => a == m,
        _ => false,
    }
}
