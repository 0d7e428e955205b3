//! One snapshot's exception store: the in-memory exception table (one atomic word per origin
//! chunk, lock-free for every reactor), COW chunk allocation, and the load and commit state
//! machines that do the store's I/O as child bios of whichever target asked.
//!
//! Ownership: a `Store` is shared (`Arc`) by its `snapshot` target and the origin's
//! [`OriginEntry`]. Its table words are read and written by any reactor with atomics. Loading
//! and committing are done by one reactor at a time, the one holding `token` (a flag taken with
//! a compare-and-swap, never waited on): the holder's child I/O completes on its own reactor, so
//! the commit state it keeps under `cs` (a mutex no one else touches while the token is held) is
//! never contended. Nothing here blocks; once warm nothing allocates.
//!
//! Chunk word states: `0` no exception; `PENDING | new` a copy to COW chunk `new` is running (or
//! `new` is not chosen yet); `COPIED | new` the copy is done and waits for its commit;
//! `DONE | new` the exception is committed: the snapshot's chunk lives at COW chunk `new`.

use super::format::{self, Exception, Geometry};
use super::registry::OriginEntry;
use stackbd_core::{BioFlags, ChildIo, CopyIo, DataBuf, DevId, Op, Status, TargetCx};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

pub(crate) const PENDING: u64 = 1 << 63;
pub(crate) const COPIED: u64 = 1 << 62;
pub(crate) const DONE: u64 = 1 << 61;
const CHUNK_MASK: u64 = DONE - 1;

/// Load states.
pub(super) const UNLOADED: u8 = 0;
pub(super) const LOADING: u8 = 1;
pub(super) const READY: u8 = 2;

/// Tag layout of the store's child I/O and copies: kind (8 bits), store id (16), value (40).
pub(crate) const K_COPY: u64 = 1;
pub(super) const K_LOAD_HDR: u64 = 2;
pub(super) const K_LOAD_AREA: u64 = 3;
pub(super) const K_FORMAT_HDR: u64 = 4;
pub(super) const K_FORMAT_AREA: u64 = 5;
pub(super) const K_FORMAT_FLUSH: u64 = 6;
pub(super) const K_FLUSH1: u64 = 7;
pub(super) const K_AREA: u64 = 8;
pub(super) const K_FLUSH2: u64 = 9;
pub(super) const K_INVALIDATE: u64 = 10;

/// Packs a tag (see the layout above).
pub(crate) fn tag(kind: u64, id: u16, value: u64) -> u64 {
    (kind << 56) | ((id as u64) << 40) | (value & ((1 << 40) - 1))
}

/// Splits a tag into (kind, store id, value).
pub(crate) fn untag(t: u64) -> (u64, u16, u64) {
    (t >> 56, ((t >> 40) & 0xffff) as u16, t & ((1 << 40) - 1))
}

/// Copies waiting for a commit, per store: slots hold `chunk + 1`, 0 when free.
const READY_SLOTS: usize = 4096;

/// Buckets counting the snapshot's reads in flight on the origin, by chunk (hashed): an origin
/// write to a chunk waits until no snapshot read of it is still reading the old data there.
pub(crate) const READ_BUCKETS: u64 = 256;
/// Timer token kind: look at parked origin writes again (reads in flight drained).
pub(crate) const K_RETRY: u64 = 11;

/// Store kind from the table: `P`, `PO` or `N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    Persistent,
    PersistentOverflow,
    Transient,
}

impl Persistence {
    /// As the table writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Persistence::Persistent => "P",
            Persistence::PersistentOverflow => "PO",
            Persistence::Transient => "N",
        }
    }

    /// `P` or `PO`: exceptions are written to the COW device.
    pub(crate) fn persistent(self) -> bool {
        self != Persistence::Transient
    }
}

/// The commit state, touched only by the token holder.
#[derive(Debug)]
pub(super) struct CommitState {
    /// The current metadata area as it is on disk plus the entries being committed.
    pub(super) area: Vec<u8>,
    pub(super) area_index: u64,
    pub(super) used: u64,
    /// Exceptions being committed: (origin chunk, COW chunk).
    pub(super) batch: Vec<(u64, u64)>,
    /// Bounce buffer held through a load or commit step.
    pub(super) buf: Option<u32>,
    /// A second bounce buffer (the zeroed next area).
    pub(super) buf2: Option<u32>,
    /// Child writes of the current step still out.
    pub(super) out: u32,
    pub(super) failed: bool,
    /// The header says invalid on disk already.
    pub(super) invalid_written: bool,
    /// Merge only: the exceptions in table order (filled by the load), and the one merging.
    pub(super) order: Vec<(u64, u64)>,
    pub(super) merge_step: Option<(u64, u64, u64)>,
}

/// One snapshot's exceptions and COW device. See the module docs.
#[derive(Debug)]
pub struct Store {
    pub(crate) id: u16,
    pub(crate) entry: Arc<OriginEntry>,
    pub(crate) origin: DevId,
    pub(crate) cow: DevId,
    pub(crate) cow_sectors: u64,
    pub(crate) kind: Persistence,
    pub(crate) geo: Geometry,
    pub(super) origin_chunks: u64,
    origin_size: u64,
    pub(super) map: Box<[AtomicU64]>,
    pub(super) next_free: AtomicU64,
    pub(super) state: AtomicU8,
    pub(super) valid: AtomicBool,
    pub(super) overflowed: AtomicBool,
    pub(super) token: AtomicBool,
    pub(super) ready: Box<[AtomicU64]>,
    pub(super) ready_hint: AtomicU64,
    /// Entries in `ready` (pushed, not yet drained).
    pub(super) ready_count: AtomicU64,
    /// Snapshot reads in flight on the origin, per chunk bucket.
    pub(super) origin_reads: Box<[std::sync::atomic::AtomicU32]>,
    /// Areas fully used (status: metadata sectors).
    pub(super) area_index: AtomicU64,
    pub(super) cs: Mutex<CommitState>,
    /// A `snapshot-merge` store: the load keeps the table order; see `merge.rs`.
    pub(super) merge: bool,
    pub(super) merge_state: AtomicU8,
    /// Exceptions left to merge.
    pub(super) remaining: AtomicU64,
}

/// What a data-path lookup found for one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Not loaded yet, or a copy of this chunk is running: wait.
    Wait,
    /// No exception.
    None,
    /// Committed at this COW chunk.
    Cow(u64),
}

impl Store {
    /// A store over `cow` for an origin of `origin_sectors`. Control plane; allocates the table
    /// (8 bytes per origin chunk).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        entry: Arc<OriginEntry>,
        origin: DevId,
        origin_sectors: u64,
        cow: DevId,
        cow_sectors: u64,
        kind: Persistence,
        chunk_sectors: u32,
    ) -> Result<Store, String> {
        let geo = Geometry::new(chunk_sectors, cow_sectors).map_err(|e| e.to_string())?;
        let origin_chunks = origin_sectors.div_ceil(chunk_sectors as u64);
        let n = usize::try_from(origin_chunks)
            .ok()
            .filter(|&n| n <= (1 << 34))
            .ok_or("origin has too many chunks for an in-memory exception table")?;
        let first = if kind.persistent() { 2 } else { 0 };
        if geo.cow_chunks <= first {
            return Err(format!(
                "COW device of {cow_sectors} sectors holds no data chunk of {chunk_sectors} sectors"
            ));
        }
        Ok(Store {
            id: entry.next_id(),
            entry,
            origin,
            cow,
            cow_sectors,
            kind,
            geo,
            origin_chunks,
            origin_size: origin_sectors,
            map: (0..n).map(|_| AtomicU64::new(0)).collect(),
            next_free: AtomicU64::new(first),
            state: AtomicU8::new(if kind.persistent() { UNLOADED } else { READY }),
            valid: AtomicBool::new(true),
            overflowed: AtomicBool::new(false),
            token: AtomicBool::new(false),
            ready: (0..READY_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            ready_hint: AtomicU64::new(0),
            ready_count: AtomicU64::new(0),
            origin_reads: (0..READ_BUCKETS)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            area_index: AtomicU64::new(0),
            cs: Mutex::new(CommitState {
                area: vec![0; geo.chunk_bytes()],
                area_index: 0,
                used: 0,
                batch: Vec::with_capacity(geo.entries_per_area() as usize),
                buf: None,
                buf2: None,
                out: 0,
                failed: false,
                invalid_written: false,
                order: Vec::new(),
                merge_step: None,
            }),
            merge: false,
            merge_state: AtomicU8::new(0),
            remaining: AtomicU64::new(0),
        })
    }

    /// The origin's size in sectors.
    pub(crate) fn origin_sectors(&self) -> u64 {
        self.origin_size
    }

    /// Makes this a store for `snapshot-merge` (before it is shared). Control plane.
    pub(crate) fn for_merge(mut self) -> Store {
        self.merge = true;
        self
    }

    /// The chunk size in sectors. Any thread.
    pub(crate) fn chunk_sectors(&self) -> u32 {
        self.geo.chunk_sectors
    }

    /// False once invalidated (or found invalid on load). Any thread, lock-free.
    pub(crate) fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    /// True once a `PO` snapshot's own write found the COW full. Any thread, lock-free.
    pub(crate) fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// True once the exceptions are loaded. Any thread, lock-free.
    pub(crate) fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == READY
    }

    /// `dmsetup status` of the snapshot.
    pub(crate) fn status(&self) -> String {
        if !self.is_valid() {
            return "Invalid".into();
        }
        if self.merge {
            return self.merge_status();
        }
        if !self.is_ready() {
            // The COW device is read when the table goes live (dm reads it in the constructor):
            // until then there are no figures to give.
            return "Loading".into();
        }
        if self.is_overflowed() {
            return "Overflow".into();
        }
        let cs = self.geo.chunk_sectors as u64;
        let alloc = self.next_free.load(Ordering::Acquire).saturating_mul(cs);
        let meta = if self.kind.persistent() {
            (self.area_index.load(Ordering::Acquire) + 2).saturating_mul(cs)
        } else {
            0
        };
        format!("{alloc}/{} {meta}", self.cow_sectors)
    }

    /// A snapshot read of chunk `c` goes to the origin: counted until [`Store::read_done`].
    /// Returns the bucket to keep in the bio's frame.
    pub(crate) fn read_started(&self, c: u64) -> u32 {
        let b = (c % READ_BUCKETS) as u32;
        self.origin_reads[b as usize].fetch_add(1, Ordering::AcqRel);
        b
    }

    /// The snapshot read counted in `bucket` completed.
    pub(crate) fn read_done(&self, bucket: u32) {
        if let Some(n) = self.origin_reads.get(bucket as usize) {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// True if a snapshot read of chunk `c` (or of a chunk in its bucket) may still be reading
    /// the origin.
    pub(crate) fn reads_in_flight(&self, c: u64) -> bool {
        self.origin_reads[(c % READ_BUCKETS) as usize].load(Ordering::Acquire) != 0
    }

    /// Looks chunk `c` up. Reactor thread; lock-free.
    pub(crate) fn lookup(&self, c: u64) -> Lookup {
        if !self.is_ready() {
            return Lookup::Wait;
        }
        match self.map.get(c as usize).map(|w| w.load(Ordering::Acquire)) {
            None | Some(0) => Lookup::None,
            Some(v) if v & (PENDING | COPIED) != 0 => Lookup::Wait,
            Some(v) => Lookup::Cow(v & CHUNK_MASK),
        }
    }

    /// Makes the snapshot invalid (a full COW on an origin write, a COW I/O error): its I/O
    /// fails from now on, origin writes stop copying to it. Writes the header's valid flag
    /// when the store is persistent (best effort). Reactor thread.
    pub(crate) fn invalidate(&self, cx: &mut TargetCx<'_>, why: &str) {
        if self.valid.swap(false, Ordering::AcqRel) {
            tracing::error!(store = self.id, "snapshot invalidated: {why}");
            if self.kind.persistent() {
                self.write_invalid_header(cx);
            }
            self.entry.ring();
        }
    }

    fn write_invalid_header(&self, cx: &mut TargetCx<'_>) {
        let Some(b) = cx.bounce(self.geo.chunk_bytes()) else {
            return;
        };
        let mut h = [0u8; 16];
        format::encode_header(&mut h, false, self.geo.chunk_sectors);
        b.data().fill_zero();
        b.data().write_from(0, &h);
        cx.submit_child(ChildIo {
            op: Op::Write,
            flags: BioFlags::FUA,
            dev: self.cow,
            sector: 0,
            sectors: self.geo.chunk_sectors,
            copy_src: 0,
            data: b.data(),
            tag: tag(K_INVALIDATE, self.id, b.id() as u64),
        });
    }

    /// Marks the snapshot overflowed (a `PO` snapshot's own write found the COW full).
    pub(crate) fn overflow(&self) {
        if !self.overflowed.swap(true, Ordering::AcqRel) {
            tracing::warn!(store = self.id, "snapshot overflowed: COW device is full");
        }
    }

    pub(super) fn cs_mut(&self) -> std::sync::MutexGuard<'_, CommitState> {
        // Only the token holder locks it, so this never waits.
        self.cs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn read_chunk(
        &self,
        cx: &mut TargetCx<'_>,
        kind: u64,
        chunk: u64,
        data: DataBuf,
        v: u64,
    ) {
        self.chunk_io(cx, Op::Read, kind, chunk, data, v);
    }

    pub(super) fn chunk_io(
        &self,
        cx: &mut TargetCx<'_>,
        op: Op,
        kind: u64,
        chunk: u64,
        data: DataBuf,
        v: u64,
    ) {
        cx.submit_child(ChildIo {
            op,
            flags: BioFlags::NONE,
            dev: self.cow,
            sector: chunk * self.geo.chunk_sectors as u64,
            sectors: self.geo.chunk_sectors,
            copy_src: 0,
            data,
            tag: tag(kind, self.id, v),
        });
    }

    pub(super) fn flush(&self, cx: &mut TargetCx<'_>, kind: u64) {
        cx.submit_child(ChildIo {
            op: Op::Flush,
            flags: BioFlags::NONE,
            dev: self.cow,
            sector: 0,
            sectors: 0,
            copy_src: 0,
            data: DataBuf::EMPTY,
            tag: tag(kind, self.id, 0),
        });
    }

    /// Allocates a COW data chunk; None when the device is full. Lock-free.
    pub(crate) fn alloc(&self) -> Option<u64> {
        let mut n = self.next_free.load(Ordering::Acquire);
        loop {
            let c = if self.kind.persistent() {
                self.geo.skip_metadata(n)
            } else {
                n
            };
            if c >= self.geo.cow_chunks {
                return None;
            }
            match self.next_free.compare_exchange_weak(
                n,
                c + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(c),
                Err(m) => n = m,
            }
        }
    }

    /// Claims chunk `c` for a copy: true if this caller now owns it (the word was 0).
    pub(crate) fn claim(&self, c: u64) -> bool {
        self.map.get(c as usize).is_some_and(|w| {
            w.compare_exchange(0, PENDING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// Gives a claimed chunk back (no space for it).
    pub(crate) fn unclaim(&self, c: u64) {
        if let Some(w) = self.map.get(c as usize) {
            w.store(0, Ordering::Release);
        }
    }

    /// Starts copying origin chunk `c` to COW chunk `new` (claimed by the caller).
    pub(crate) fn start_copy(&self, cx: &mut TargetCx<'_>, c: u64, new: u64) {
        self.map[c as usize].store(PENDING | new, Ordering::Release);
        let cs = self.geo.chunk_sectors as u64;
        // The last chunk of an origin whose size is not a multiple of the chunk is partial.
        let len = cs.min(self.origin_size - c * cs) as u32;
        cx.copy(CopyIo {
            src_dev: self.origin,
            src: c * cs,
            dst_dev: self.cow,
            dst: new * cs,
            sectors: len,
            tag: tag(K_COPY, self.id, c),
        });
    }

    /// A copy ended: the exception goes to the commit queue (persistent) or is done
    /// (transient). Reactor thread.
    pub(crate) fn copy_done(&self, cx: &mut TargetCx<'_>, c: u64, status: Status) {
        let Some(w) = self.map.get(c as usize) else {
            return;
        };
        if !status.is_ok() {
            self.invalidate(cx, "copying a chunk to the COW device failed");
            w.store(0, Ordering::Release);
            self.entry.ring();
            return;
        }
        let new = w.load(Ordering::Acquire) & CHUNK_MASK;
        if !self.kind.persistent() {
            w.store(new | DONE, Ordering::Release);
            self.entry.ring();
            return;
        }
        w.store(COPIED | new, Ordering::Release);
        if !self.push_ready(c) {
            // Every slot taken (more copies in flight than READY_SLOTS): a timer tries again.
            cx.timer_at(
                std::time::Instant::now() + std::time::Duration::from_micros(200),
                tag(K_COPY, self.id, c),
            );
            return;
        }
        self.try_commit(cx);
    }

    /// A retry timer of `copy_done` fired.
    pub(crate) fn retry_ready(&self, cx: &mut TargetCx<'_>, c: u64) {
        self.copy_done(cx, c, Status::Ok);
    }

    fn push_ready(&self, c: u64) -> bool {
        let start = self.ready_hint.fetch_add(1, Ordering::Relaxed) as usize;
        for i in 0..READY_SLOTS {
            let s = &self.ready[(start + i) % READY_SLOTS];
            if s.compare_exchange(0, c + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.ready_count.fetch_add(1, Ordering::AcqRel);
                return true;
            }
        }
        false
    }

    /// Starts a commit if there is work and nobody is committing. Reactor thread.
    pub(crate) fn try_commit(&self, cx: &mut TargetCx<'_>) {
        loop {
            if self.ready_count.load(Ordering::Acquire) == 0 || !self.is_ready() {
                return;
            }
            if self.token.swap(true, Ordering::AcqRel) {
                return; // the holder looks again when it is done
            }
            if self.begin_commit(cx) {
                return;
            }
            // Nothing drained (raced with another holder): give the token back and look again.
            self.token.store(false, Ordering::Release);
        }
    }

    /// Token held: drains ready slots into the batch and flushes the copies. False if the
    /// batch is empty.
    fn begin_commit(&self, cx: &mut TargetCx<'_>) -> bool {
        let mut cs = self.cs_mut();
        let room = self.geo.entries_per_area().saturating_sub(cs.used) as usize;
        cs.batch.clear();
        // Pushes take slots at a rotating hint, so the waiting ones sit mostly just behind it.
        let want = (self.ready_count.load(Ordering::Acquire) as usize).min(room);
        let hint = self.ready_hint.load(Ordering::Acquire) as usize;
        let start = hint.wrapping_sub(want) % READY_SLOTS;
        for i in 0..READY_SLOTS {
            if cs.batch.len() >= want {
                break;
            }
            let v = self.ready[(start + i) % READY_SLOTS].swap(0, Ordering::AcqRel);
            if v != 0 {
                self.ready_count.fetch_sub(1, Ordering::AcqRel);
                let c = v - 1;
                let new = self.map[c as usize].load(Ordering::Acquire) & CHUNK_MASK;
                cs.batch.push((c, new));
            }
        }
        if cs.batch.is_empty() {
            return false;
        }
        cs.failed = false;
        drop(cs);
        if !self.is_valid() {
            self.end_commit(cx, false);
            return true;
        }
        self.flush(cx, K_FLUSH1);
        true
    }

    /// A child of the store's load or commit completed (`kind`/`v` from its tag).
    pub(crate) fn child_done(&self, cx: &mut TargetCx<'_>, kind: u64, v: u64, status: Status) {
        match kind {
            K_LOAD_HDR => self.header_read(cx, status),
            K_LOAD_AREA => self.area_read(cx, v, status),
            K_FORMAT_HDR => {
                if !status.is_ok() {
                    return self.load_failed(cx, "writing the COW header failed");
                }
                let b = self.cs_mut().buf.expect("load buffer");
                let d = cx.bounce_data(b);
                d.fill_zero();
                self.chunk_io(cx, Op::Write, K_FORMAT_AREA, 1, d, 0);
            }
            K_FORMAT_AREA => {
                if !status.is_ok() {
                    return self.load_failed(cx, "zeroing the first COW area failed");
                }
                self.flush(cx, K_FORMAT_FLUSH);
            }
            K_FORMAT_FLUSH => {
                if !status.is_ok() {
                    return self.load_failed(cx, "flushing the new COW header failed");
                }
                self.finish_load(cx);
            }
            K_FLUSH1 => {
                if !status.is_ok() {
                    return self.end_commit(cx, false);
                }
                self.write_area(cx);
            }
            K_AREA => {
                let mut cs = self.cs_mut();
                cs.out -= 1;
                cs.failed |= !status.is_ok();
                let (out, failed) = (cs.out, cs.failed);
                drop(cs);
                if out == 0 {
                    if failed {
                        return self.end_commit(cx, false);
                    }
                    self.flush(cx, K_FLUSH2);
                }
            }
            K_FLUSH2 => self.end_commit(cx, status.is_ok()),
            K_INVALIDATE => cx.release(v as u32),
            _ => {}
        }
    }

    /// Flush 1 done: writes the current area with the batch added (and the next area, zeroed,
    /// when this one fills up).
    fn write_area(&self, cx: &mut TargetCx<'_>) {
        let mut cs = self.cs_mut();
        let CommitState {
            area, used, batch, ..
        } = &mut *cs;
        for (i, &(old, new)) in batch.iter().enumerate() {
            format::set_entry(area, *used as usize + i, Exception { old, new });
        }
        let full = *used + batch.len() as u64 >= self.geo.entries_per_area();
        let k = cs.area_index;
        let Some(b) = cx.bounce(self.geo.chunk_bytes()) else {
            drop(cs);
            return self.end_commit(cx, false);
        };
        b.data().write_from(0, &cs.area);
        cs.buf = Some(b.id());
        cs.out = 1;
        let area_chunk = self.geo.area_chunk(k).unwrap_or(u64::MAX);
        let next_chunk = self.geo.area_chunk(k + 1).unwrap_or(u64::MAX);
        let zero_next = full && next_chunk < self.geo.cow_chunks;
        let mut z = None;
        if zero_next {
            if let Some(b2) = cx.bounce(self.geo.chunk_bytes()) {
                b2.data().fill_zero();
                cs.buf2 = Some(b2.id());
                cs.out = 2;
                z = Some(b2.data());
            }
        }
        drop(cs);
        self.chunk_io(cx, Op::Write, K_AREA, area_chunk, b.data(), 0);
        if let Some(z) = z {
            self.chunk_io(cx, Op::Write, K_AREA, next_chunk, z, 0);
        }
    }

    /// The commit ended (`ok`: durable): publishes or drops the batch, gives the token back,
    /// rings the parked bios, and starts the next commit if copies are waiting.
    fn end_commit(&self, cx: &mut TargetCx<'_>, ok: bool) {
        let mut cs = self.cs_mut();
        for b in [cs.buf.take(), cs.buf2.take()].into_iter().flatten() {
            cx.release(b);
        }
        let n = cs.batch.len() as u64;
        if ok {
            for &(old, new) in cs.batch.iter() {
                self.map[old as usize].store(new | DONE, Ordering::Release);
            }
            cs.used += n;
            if cs.used >= self.geo.entries_per_area() {
                cs.area_index += 1;
                cs.used = 0;
                cs.area.fill(0);
                self.area_index.store(cs.area_index, Ordering::Release);
            }
        } else {
            // Take the entries back out of the area image: they never became durable.
            let used = cs.used as usize;
            let len = cs.batch.len();
            let CommitState { area, .. } = &mut *cs;
            for i in used..used + len {
                format::set_entry(area, i, Exception { old: 0, new: 0 });
            }
        }
        cs.batch.clear();
        drop(cs);
        if !ok {
            self.invalidate(cx, "committing exceptions to the COW device failed");
        }
        self.token.store(false, Ordering::Release);
        self.entry.ring();
        self.try_commit(cx);
    }
}
