//! The reactor: one thread's run loop. It owns its bio pool, its queues and its view of every
//! device (a leaf channel, or a volume's cached table, suspend state and in-flight count), so the
//! data path takes no lock and touches no shared counter. Submissions and completions go through
//! queues and are run to the end by `poll`, so neither ever recurses.

use crate::bio::{BioFlags, BioId, BioPool, FrameFallback, FrameKind, Op};
use crate::buf::DataBuf;
use crate::leaf::{LeafChannel, LeafCx};
use crate::rq::{QueueOpts, RequestQueue, RqCtx};
use crate::status::Status;
use crate::table::Table;
use crate::target::{Endio, MapResult, TargetIo};

mod stateful;
use crate::{DevId, Sector, SECTOR_SIZE};
use stateful::{map_with, Bell, Tx, VolTargets};
use std::collections::VecDeque;
use std::sync::Arc;

/// Context of a split frame: the parent's geometry at the split, and the pieces still out.
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct SplitCtx {
    sector: u64,
    copy_src: u64,
    /// Bytes the parent's data window was advanced by the split.
    data_advanced: u64,
    sectors: u32,
    /// Pieces not yet completed: the clones plus the remainder itself.
    pending: u32,
    status: u8,
    /// A piece was pushed back (noflush suspend): the whole bio goes back up to its volume.
    pushback: u8,
    _pad: [u8; 6],
}

impl SplitCtx {
    fn merge(&mut self, s: Status, pushback: bool) {
        let mut st = Status::from_u8(self.status);
        st.merge(s);
        self.status = st as u8;
        self.pushback |= pushback as u8;
    }
}

/// One top-level I/O to start.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub op: Op,
    pub flags: BioFlags,
    pub dev: DevId,
    pub sector: Sector,
    pub sectors: u32,
    pub copy_src: Sector,
    pub data: DataBuf,
    pub user_data: u64,
}

impl Request {
    pub fn new(
        op: Op,
        dev: DevId,
        sector: Sector,
        sectors: u32,
        data: DataBuf,
        user_data: u64,
    ) -> Request {
        Request {
            op,
            flags: BioFlags::NONE,
            dev,
            sector,
            sectors,
            copy_src: 0,
            data,
            user_data,
        }
    }
}

/// A finished top-level I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    pub status: Status,
}

/// Reactor counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReactorStats {
    pub submitted: u64,
    pub completed: u64,
    /// Top-level requests refused before a bio was allocated (bad request or no bio).
    pub refused: u64,
    /// Leading pieces cut off by splits (one clone each).
    pub splits: u64,
    /// Bios held by a suspended volume.
    pub held: u64,
    /// Bios a target requeued while their volume suspended with `noflush`: sent back up to
    /// the volume and held there for the next table (counted again in `held`).
    pub pushed_back: u64,
    /// Bios (or requests) a target put back to be mapped again: no usable path, or failover
    /// after a path error.
    pub requeued: u64,
    /// Bios and requests handed to leaves.
    pub leaf_ios: u64,
    /// Bios that entered a request queue (request-based volumes).
    pub rq_bios: u64,
    /// Requests dispatched from request queues to their target.
    pub rq_requests: u64,
    /// Bios merged into a request another bio started (back or front merges).
    pub rq_merges: u64,
    /// Copy bytes done natively by a leaf (the copy travelled down to it).
    pub copy_offloaded_bytes: u64,
    /// Copy bytes copied by the kernel between two file leaves (`copy_file_range`).
    pub copy_kernel_bytes: u64,
    /// Copy bytes emulated by a layer (read into a bounce buffer, then written).
    pub copy_emulated_bytes: u64,
    /// Child bios targets sent to their devices (their own I/O: copies, legs, metadata).
    pub child_ios: u64,
}

/// A reactor's view of one volume.
#[derive(Debug, Default)]
struct VolState {
    table: Option<Arc<Table>>,
    suspended: bool,
    /// Suspended with `noflush`: I/O a target requeues is pushed back to the volume's hold
    /// list instead of waiting inside the target, so the suspend drains.
    noflush: bool,
    inflight: u64,
    held: VecDeque<BioId>,
    /// Bios pushed back since the suspend: they go ahead of the I/O that arrived while
    /// suspended (they came first), in the order they were pushed back.
    pushed: usize,
    /// The request queue of a request-based table.
    rq: Option<RequestQueue>,
    rq_opts: QueueOpts,
}

struct LeafState {
    chan: Box<dyn LeafChannel>,
    size: Sector,
    lbs_sectors: u32,
    /// This leaf's bit in `Bio::touched` (0 for leaves that complete inline).
    poll_bit: u64,
}

enum Slot {
    Empty,
    Leaf(LeafState),
    Volume(VolState),
}

/// Sizes of a reactor's pools and queues.
#[derive(Clone, Copy, Debug)]
pub struct ReactorConfig {
    /// Bios in the pool (top-level I/O in flight is bounded a little below this).
    pub pool_capacity: usize,
    /// Initial frame area per bio; notifications resize it.
    pub per_io_bytes: usize,
    /// Extension chunks for frames that do not fit.
    pub fallback_chunks: usize,
    pub fallback_chunk_bytes: usize,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            pool_capacity: 1024,
            per_io_bytes: 256,
            fallback_chunks: 64,
            fallback_chunk_bytes: 512,
        }
    }
}

pub struct Reactor {
    pool: BioPool,
    fallback: FrameFallback,
    devs: Vec<Slot>,
    /// Leaves that complete asynchronously and must be polled.
    pollers: Vec<DevId>,
    submit_q: VecDeque<BioId>,
    complete_q: VecDeque<BioId>,
    done: VecDeque<Completion>,
    /// Bios a target asked to map again later (no usable path) or at once (failover).
    requeue: VecDeque<Requeued>,
    /// Request-based volumes with requests to dispatch at the end of this round (plugged).
    unplug: Vec<DevId>,
    copy_bufs: CopyBufs,
    /// Per-volume target slots (per-reactor target state and parked bios), by device id.
    targets: Vec<VolTargets>,
    /// Target work queued by callbacks: children, copies, unparks, timers, bounce buffers.
    tio: TargetIo,
    /// Wakes this reactor from another thread (messages, doorbells).
    waker: Arc<crate::service::Waker>,
    /// Every target doorbell of this reactor.
    bells: Vec<Bell>,
    /// This reactor's index among its engine's reactors.
    index: usize,
    /// Volumes suspended with `noflush` (their parked bios are pushed back each round).
    noflush_vols: usize,
    pub stats: ReactorStats,
}

/// A bio waiting on a volume's requeue list to be mapped again by target `target`.
#[derive(Clone, Copy, Debug)]
struct Requeued {
    id: BioId,
    vol: DevId,
    target: u16,
    /// None: at the next round (failover); else not before this instant.
    due: Option<std::time::Instant>,
}

/// Bounce buffers for emulated copies: a bounded set, made on first use and kept, so emulation
/// allocates nothing in steady state and never has more than `max` chunks in flight.
#[derive(Debug)]
struct CopyBufs {
    bufs: Vec<Box<[u8]>>,
    free: Vec<u32>,
    /// Pieces waiting for a buffer, in arrival order.
    waiting: VecDeque<BioId>,
    max: usize,
}

/// Sectors per emulated copy step (the bounce buffer size).
pub const COPY_CHUNK_SECTORS: u32 = 2048;

impl CopyBufs {
    fn acquire(&mut self) -> Option<u32> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        if self.bufs.len() < self.max {
            self.bufs
                .push(vec![0u8; COPY_CHUNK_SECTORS as usize * SECTOR_SIZE].into_boxed_slice());
            return Some(self.bufs.len() as u32 - 1);
        }
        None
    }

    /// The first `sectors` of buffer `i` as a bio data window.
    fn window(&mut self, i: u32, sectors: u32) -> DataBuf {
        let b = &mut self.bufs[i as usize][..sectors as usize * SECTOR_SIZE];
        // SAFETY: the buffer is a boxed slice owned by this reactor; it never moves (only the Box
        // pointer lives in the Vec) and is not freed or reused until the emulation step that
        // holds index `i` has completed both its read and its write.
        unsafe { DataBuf::from_slice(b) }
    }
}

/// Context of an emulated copy piece.
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct CopyEmuCtx {
    /// Source and destination, relative to their targets.
    src: u64,
    dst: u64,
    done: u32,
    total: u32,
    /// Sectors in the step in flight.
    chunk: u32,
    buf: u32,
    src_target: u16,
    dst_target: u16,
    /// 0: reading the chunk; 1: writing it.
    phase: u8,
    status: u8,
    _pad: [u8; 2],
}

const NO_BUF: u32 = u32::MAX;

impl Reactor {
    /// A reactor run by the caller's thread (index 0, a waker of its own).
    pub fn new(cfg: ReactorConfig) -> Reactor {
        let waker = crate::service::Waker::new().expect("eventfd for the reactor's waker");
        Reactor::with_waker(cfg, 0, waker)
    }

    /// Reactor `index` of a set of reactor threads, woken through `waker`.
    pub fn with_waker(
        cfg: ReactorConfig,
        index: usize,
        waker: Arc<crate::service::Waker>,
    ) -> Reactor {
        let cap = cfg.pool_capacity.max(16);
        Reactor {
            pool: BioPool::new(cap, cfg.per_io_bytes),
            fallback: FrameFallback::new(cfg.fallback_chunks, cfg.fallback_chunk_bytes),
            devs: Vec::new(),
            pollers: Vec::new(),
            // Every bio is in at most one queue at a time, so pool-sized queues never grow
            // (the pool itself grows only for clones beyond its reserve).
            submit_q: VecDeque::with_capacity(cap * 2),
            complete_q: VecDeque::with_capacity(cap * 2),
            done: VecDeque::with_capacity(cap * 2),
            requeue: VecDeque::with_capacity(cap * 2),
            unplug: Vec::with_capacity(64),
            copy_bufs: CopyBufs {
                bufs: Vec::new(),
                free: Vec::new(),
                waiting: VecDeque::with_capacity(cap),
                max: 16,
            },
            targets: Vec::new(),
            tio: TargetIo::new(cap * 2),
            waker,
            bells: Vec::new(),
            index,
            noflush_vols: 0,
            stats: ReactorStats::default(),
        }
    }

    /// The waker other threads use to wake this reactor.
    pub fn waker(&self) -> &Arc<crate::service::Waker> {
        &self.waker
    }

    /// This reactor's index.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn pool(&self) -> &BioPool {
        &self.pool
    }

    pub fn fallback(&self) -> &FrameFallback {
        &self.fallback
    }

    /// Seed 000's notification: the stacked frame need changed.
    pub fn notify_frame_bytes(&mut self, per_io_bytes: usize) {
        self.pool.notify_frame_bytes(per_io_bytes);
    }

    fn slot_mut(&mut self, dev: DevId) -> &mut Slot {
        let i = dev.0 as usize;
        if self.devs.len() <= i {
            self.devs.resize_with(i + 1, || Slot::Empty);
        }
        &mut self.devs[i]
    }

    fn vol_mut(&mut self, dev: DevId) -> &mut VolState {
        match self.devs.get_mut(dev.0 as usize) {
            Some(Slot::Volume(v)) => v,
            _ => panic!("{dev:?} is not a volume on this reactor"),
        }
    }

    pub fn install_leaf(
        &mut self,
        dev: DevId,
        chan: Box<dyn LeafChannel>,
        size: Sector,
        lbs_sectors: u32,
    ) {
        let poll_bit = if chan.needs_poll() {
            self.pollers.push(dev);
            1u64 << (self.pollers.len() - 1).min(63)
        } else {
            0
        };
        *self.slot_mut(dev) = Slot::Leaf(LeafState {
            chan,
            size,
            lbs_sectors: lbs_sectors.max(1),
            poll_bit,
        });
    }

    pub fn install_volume(&mut self, dev: DevId) {
        *self.slot_mut(dev) = Slot::Volume(VolState::default());
    }

    /// Removes a device; bios held for it fail with `Shutdown`.
    pub fn remove(&mut self, dev: DevId) {
        let old = std::mem::replace(self.slot_mut(dev), Slot::Empty);
        self.pollers.retain(|&d| d != dev);
        if let Slot::Volume(mut v) = old {
            assert_eq!(v.inflight, 0, "removing a volume with I/O in flight");
            if v.noflush {
                self.noflush_vols -= 1;
            }
            self.install_slots(dev, None);
            while let Some(id) = v.held.pop_front() {
                self.pool.get_mut(id).status = Status::Shutdown;
                self.complete_q.push_back(id);
            }
        }
    }

    /// Installs a volume's table. Only while it has nothing in flight (suspended and drained, or
    /// never used), so no bio ever sees two tables.
    pub fn set_table(&mut self, dev: DevId, table: Option<Arc<Table>>) {
        let cap = self.pool.capacity() * 2;
        let v = self.vol_mut(dev);
        assert_eq!(v.inflight, 0, "table swap with I/O in flight");
        v.rq = table
            .as_deref()
            .filter(|t| t.request_based())
            .map(|t| RequestQueue::new(v.rq_opts, t.limits().max_sectors, cap));
        v.table = table.clone();
        // The targets' per-reactor state is made here, on this reactor's thread.
        self.install_slots(dev, table.as_deref());
    }

    /// Sets a volume's request queue settings (scheduler, depth); they apply to its request
    /// queue whenever its table is request-based.
    pub fn set_queue_opts(&mut self, dev: DevId, opts: QueueOpts) {
        let v = self.vol_mut(dev);
        v.rq_opts = opts;
        if let Some(q) = &mut v.rq {
            q.set_opts(opts);
        }
    }

    /// Requests of a request-based volume waiting in its queue, and dispatched and not done.
    pub fn queued_requests(&self, dev: DevId) -> (usize, u32) {
        match self.devs.get(dev.0 as usize) {
            Some(Slot::Volume(VolState { rq: Some(q), .. })) => (q.waiting(), q.inflight),
            _ => (0, 0),
        }
    }

    /// Holds new I/O for the volume; in-flight I/O goes on and drains. With `noflush`, I/O its
    /// targets requeue (no usable path) is pushed back and held too, so it survives a table
    /// swap instead of keeping the suspend from draining.
    pub fn suspend(&mut self, dev: DevId, noflush: bool) {
        let v = self.vol_mut(dev);
        v.suspended = true;
        if noflush && !v.noflush {
            self.noflush_vols += 1;
        }
        let v = self.vol_mut(dev);
        v.noflush = noflush;
        v.pushed = 0;
        if noflush {
            self.push_back_parked(dev);
            for _ in 0..self.requeue.len() {
                let Some(r) = self.requeue.pop_front() else {
                    break;
                };
                if r.vol == dev {
                    self.push_back(r);
                } else {
                    self.requeue.push_back(r);
                }
            }
        }
    }

    /// Sends a requeued bio back up to its volume (a noflush suspend): its sector goes back
    /// from the target's to the volume's (a target gives a bio back to requeue as `map` got
    /// it), and it completes with `Pushback`, which its volume's entry frame turns into a held
    /// bio.
    fn push_back(&mut self, r: Requeued) {
        self.stats.pushed_back += 1;
        let start = match self.devs.get(r.vol.0 as usize) {
            Some(Slot::Volume(VolState { table: Some(t), .. })) => {
                t.entries()[r.target as usize].start
            }
            _ => 0,
        };
        let bio = self.pool.get_mut(r.id);
        match bio.op {
            Op::Flush => bio.sector = 0,
            Op::Copy => {
                bio.sector += start;
                bio.copy_src += start;
            }
            _ => bio.sector += start,
        }
        bio.status = Status::Ok;
        bio.pushback = true;
        self.complete_q.push_back(r.id);
    }

    /// Lets held I/O go, in arrival order.
    pub fn resume(&mut self, dev: DevId) {
        let v = self.vol_mut(dev);
        v.suspended = false;
        if std::mem::take(&mut v.noflush) {
            self.noflush_vols -= 1;
        }
        let v = self.vol_mut(dev);
        let held = std::mem::take(&mut v.held);
        self.submit_q.extend(held);
    }

    pub fn inflight(&self, dev: DevId) -> u64 {
        match self.devs.get(dev.0 as usize) {
            Some(Slot::Volume(v)) => v.inflight,
            _ => 0,
        }
    }

    pub fn held(&self, dev: DevId) -> usize {
        match self.devs.get(dev.0 as usize) {
            Some(Slot::Volume(v)) => v.held.len(),
            _ => 0,
        }
    }

    /// Size and logical block (sectors) of a device as this reactor sees it.
    fn geometry(&self, dev: DevId) -> Option<(Sector, u32)> {
        match self.devs.get(dev.0 as usize)? {
            Slot::Leaf(l) => Some((l.size, l.lbs_sectors)),
            Slot::Volume(v) => Some(match &v.table {
                Some(t) => (t.size(), t.limits().logical_block_sectors()),
                None => (0, 1),
            }),
            Slot::Empty => None,
        }
    }

    /// Checks and queues a top-level I/O. Bad requests and a full pool are refused here, before
    /// anything is allocated; the caller sees the status at once.
    pub fn submit(&mut self, req: &Request) -> Result<(), Status> {
        self.submit_id(req).map(|_| ())
    }

    /// As `submit`, and returns the bio, for a polled wait on it.
    pub fn submit_id(&mut self, req: &Request) -> Result<BioId, Status> {
        let r = self.check(req);
        if let Err(s) = r {
            self.stats.refused += 1;
            return Err(s);
        }
        let Some(id) = self.pool.alloc(true) else {
            self.stats.refused += 1;
            return Err(Status::Again);
        };
        let bio = self.pool.get_mut(id);
        bio.op = req.op;
        bio.flags = req.flags;
        bio.dev = req.dev;
        bio.sector = req.sector;
        bio.sectors = req.sectors;
        bio.copy_src = req.copy_src;
        bio.data = req.data;
        bio.user_data = req.user_data;
        bio.status = Status::Ok;
        bio.parent = None;
        bio.root = id;
        bio.touched = 0;
        self.submit_q.push_back(id);
        self.stats.submitted += 1;
        Ok(id)
    }

    fn check(&self, req: &Request) -> Result<(), Status> {
        let (size, lbs) = self.geometry(req.dev).ok_or(Status::Invalid)?;
        let lbs = lbs as u64;
        match req.op {
            Op::Read | Op::Write => {
                if req.sectors == 0 || req.data.len() != req.sectors as usize * SECTOR_SIZE {
                    return Err(Status::Invalid);
                }
            }
            Op::Flush => {
                if req.sectors != 0 || !req.data.is_empty() {
                    return Err(Status::Invalid);
                }
                return Ok(());
            }
            Op::Discard | Op::WriteZeroes => {
                if req.sectors == 0 || !req.data.is_empty() {
                    return Err(Status::Invalid);
                }
            }
            Op::Copy => {
                if req.sectors == 0 || !req.data.is_empty() {
                    return Err(Status::Invalid);
                }
                let n = req.sectors as u64;
                // Overlapping copies are ordered by the copy engine, which cuts them into
                // pieces that do not overlap; a single bio's pieces may run in any order.
                if req.copy_src < req.sector.saturating_add(n)
                    && req.sector < req.copy_src.saturating_add(n)
                {
                    return Err(Status::Invalid);
                }
                if !req.copy_src.is_multiple_of(lbs) {
                    return Err(Status::Invalid);
                }
                match req.copy_src.checked_add(n) {
                    Some(end) if end <= size => {}
                    _ => return Err(Status::OutOfRange),
                }
            }
        }
        if !req.sector.is_multiple_of(lbs) || !(req.sectors as u64).is_multiple_of(lbs) {
            return Err(Status::Invalid);
        }
        match req.sector.checked_add(req.sectors as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Status::OutOfRange),
        }
    }

    /// Runs queued submissions and completions to the end, and polls asynchronous leaves once.
    /// Returns the number of steps taken (0 = nothing to do).
    pub fn poll(&mut self) -> usize {
        self.run_queues(None)
    }

    /// Runs the queues to the end; polls the asynchronous leaves once per round: all of them,
    /// or (for a polled wait on `root`) only the ones its bio reached.
    fn run_queues(&mut self, root: Option<BioId>) -> usize {
        let mut work = 0;
        loop {
            let mut round = self.run_target_work();
            if self.noflush_vols > 0 {
                self.sweep_noflush();
            }
            if !self.requeue.is_empty() {
                round += self.run_requeue();
            }
            while let Some(id) = self.submit_q.pop_front() {
                self.run_submit(id);
                round += 1;
            }
            // Unplug: the round's bios have all arrived and merged; let requests out.
            while let Some(vol) = self.unplug.pop() {
                round += self.dispatch(vol);
            }
            while let Some(id) = self.complete_q.pop_front() {
                self.run_complete(id);
                round += 1;
            }
            let touched = root.map_or(0, |r| self.pool.get(r).touched);
            for i in 0..self.pollers.len() {
                let dev = self.pollers[i];
                if let Some(Slot::Leaf(l)) = self.devs.get_mut(dev.0 as usize) {
                    if touched == 0 || touched & l.poll_bit != 0 {
                        round += l.chan.poll(&mut LeafCx {
                            pool: &mut self.pool,
                            complete_q: &mut self.complete_q,
                        });
                    }
                }
            }
            work += round;
            if self.submit_q.is_empty()
                && self.complete_q.is_empty()
                && self.unplug.is_empty()
                && !self.tio.has_work()
            {
                return work;
            }
        }
    }

    /// Bios parked while their volume suspends with `noflush` go back up to it at once.
    fn sweep_noflush(&mut self) {
        for i in 0..self.devs.len() {
            if matches!(&self.devs[i], Slot::Volume(VolState { noflush: true, .. }))
                && self.targets.get(i).is_some_and(|vt| vt.parked() > 0)
            {
                self.push_back_parked(DevId(i as u32));
            }
        }
    }

    /// Maps again the requeued bios that are due. Returns how many were.
    fn run_requeue(&mut self) -> usize {
        let now = std::time::Instant::now();
        let mut ran = 0;
        for _ in 0..self.requeue.len() {
            let Some(r) = self.requeue.pop_front() else {
                break;
            };
            let pushback = matches!(
                self.devs.get(r.vol.0 as usize),
                Some(Slot::Volume(VolState { noflush: true, .. }))
            );
            if pushback {
                ran += 1;
                self.push_back(r);
                continue;
            }
            if r.due.is_some_and(|d| d > now) {
                self.requeue.push_back(r);
                continue;
            }
            ran += 1;
            let index = self.index;
            let Reactor {
                pool,
                fallback,
                devs,
                submit_q,
                complete_q,
                requeue,
                stats,
                targets,
                tio,
                ..
            } = self;
            let table = match devs.get(r.vol.0 as usize) {
                Some(Slot::Volume(v)) => v.table.as_deref(),
                _ => None,
            };
            let Some(table) = table else {
                pool.get_mut(r.id).status = Status::Shutdown;
                complete_q.push_back(r.id);
                continue;
            };
            pool.get_mut(r.id).dev = r.vol;
            let mut tx = Tx {
                vol: r.vol,
                reactor: index,
                vt: vol_targets(targets, r.vol),
                tio,
            };
            let t = &*table.entries()[r.target as usize].target;
            let res = map_with(t, r.target, r.id, pool, fallback, &mut tx, None);
            if finish_map(res, r.id, r.vol, r.target, pool, complete_q, requeue, stats) {
                submit_q.push_back(r.id);
            }
        }
        ran
    }

    /// How long the reactor may sleep before a requeued bio is due (None: nothing timed).
    pub fn next_timer(&self) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        let timer = self
            .next_target_timer()
            .map(|d| d.saturating_duration_since(now));
        self.requeue
            .iter()
            .map(|r| {
                r.due.map_or(std::time::Duration::ZERO, |d| {
                    d.saturating_duration_since(now)
                })
            })
            .chain(timer)
            .min()
    }

    /// Bios waiting on requeue lists (to be mapped again).
    pub fn requeued(&self) -> usize {
        self.requeue.len()
    }

    /// Before sleeping: every asynchronous leaf hands the kernel what it still holds, and says
    /// what to wait on. Returns false if the reactor must not sleep (work queued, or a leaf that
    /// completes only by polling has I/O in flight).
    pub fn prepare_wait(&mut self, fds: &mut Vec<std::os::fd::RawFd>) -> bool {
        let mut may_sleep = self.is_idle()
            && !self.requeue.iter().any(|r| r.due.is_none())
            && !self.waker.is_rung();
        for i in 0..self.pollers.len() {
            if let Some(Slot::Leaf(l)) = self.devs.get_mut(self.pollers[i].0 as usize) {
                match l.chan.prepare_wait() {
                    crate::leaf::WaitHint::Idle => {}
                    crate::leaf::WaitHint::Fd(fd) => fds.push(fd),
                    crate::leaf::WaitHint::Spin => may_sleep = false,
                }
            }
        }
        may_sleep
    }

    /// Block status of `[sector, sector + sectors)` of `dev`, walked down this reactor's tables to
    /// the leaves. Appends at most `max_extents` runs (merging neighbours with equal flags) and
    /// returns the sectors covered, which may be less than asked: NBD allows a short answer.
    pub fn block_status(
        &self,
        dev: DevId,
        sector: Sector,
        sectors: Sector,
        max_extents: usize,
        out: &mut Vec<crate::leaf::Extent>,
    ) -> Sector {
        let start = out.len();
        let mut covered = 0;
        while covered < sectors && out.len() - start < max_extents {
            let n = self.status_at(dev, sector + covered, sectors - covered, 0, out, start);
            if n == 0 {
                break;
            }
            covered += n;
        }
        covered
    }

    /// One step of the walk: answers a leading part of the range; returns its length.
    fn status_at(
        &self,
        dev: DevId,
        sector: Sector,
        sectors: Sector,
        depth: usize,
        out: &mut Vec<crate::leaf::Extent>,
        start: usize,
    ) -> Sector {
        use crate::leaf::Extent;
        use crate::target::TargetExtent;
        let push = |out: &mut Vec<Extent>, e: Extent| match out[start..].last_mut() {
            Some(last) if last.flags == e.flags => last.sectors += e.sectors,
            _ => out.push(e),
        };
        match self.devs.get(dev.0 as usize) {
            Some(Slot::Leaf(l)) => {
                let n = sectors.min(l.size.saturating_sub(sector));
                // The leaf appends in place; then its runs merge with their neighbours.
                let from = out.len();
                l.chan.extents(sector, n, out);
                let mut w = from;
                for r in from..out.len() {
                    let e = out[r];
                    if w > start && out[w - 1].flags == e.flags {
                        out[w - 1].sectors += e.sectors;
                    } else {
                        out[w] = e;
                        w += 1;
                    }
                }
                out.truncate(w);
                n
            }
            Some(Slot::Volume(v)) if depth < crate::bio::MAX_FRAMES => {
                let Some(t) = v.table.as_deref() else {
                    return 0;
                };
                if sector >= t.size() {
                    return 0;
                }
                let e = &t.entries()[t.find(sector)];
                let off = sector - e.start;
                let len = sectors.min(e.len - off);
                match e.target.extent(off, len) {
                    TargetExtent::Dev { dev, sector, len } => {
                        self.status_at(dev, sector, len, depth + 1, out, start)
                    }
                    TargetExtent::Zero { len } => {
                        push(
                            out,
                            Extent {
                                sectors: len,
                                flags: Extent::HOLE | Extent::ZERO,
                            },
                        );
                        len
                    }
                    TargetExtent::Data { len } => {
                        push(
                            out,
                            Extent {
                                sectors: len,
                                flags: 0,
                            },
                        );
                        len
                    }
                }
            }
            _ => 0,
        }
    }

    /// True if some leaf completes asynchronously (the reactor must keep polling it).
    pub fn has_async_leaves(&self) -> bool {
        !self.pollers.is_empty()
    }

    /// A polled wait's step: runs the queues and polls only the asynchronous leaf queues that
    /// top-level bio `root` reached (all of them if it reached none yet). Returns work done.
    pub fn poll_touched(&mut self, root: BioId) -> usize {
        self.run_queues(Some(root))
    }

    /// Which asynchronous leaf queues a top-level bio reached so far (one bit per queue).
    pub fn touched(&self, root: BioId) -> u64 {
        self.pool.get(root).touched
    }

    /// True when nothing is queued inside the reactor (leaves may still have I/O in flight).
    pub fn is_idle(&self) -> bool {
        self.submit_q.is_empty()
            && self.complete_q.is_empty()
            && self.unplug.is_empty()
            && !self.tio.has_work()
    }

    /// Dispatches what volume `vol`'s request queue lets out now: each request becomes a bio
    /// of its own, which the target maps (choosing a path) like any bio. Returns how many.
    fn dispatch(&mut self, vol: DevId) -> usize {
        let index = self.index;
        let Reactor {
            pool,
            fallback,
            devs,
            submit_q,
            complete_q,
            requeue,
            stats,
            targets,
            tio,
            ..
        } = self;
        let mut tx = Tx {
            vol,
            reactor: index,
            vt: vol_targets(targets, vol),
            tio,
        };
        let Some(Slot::Volume(VolState {
            table: Some(table),
            rq: Some(q),
            ..
        })) = devs.get_mut(vol.0 as usize)
        else {
            return 0;
        };
        q.plugged = false;
        let mut n = 0;
        while let Some(p) = q.next() {
            n += 1;
            q.inflight += 1;
            stats.rq_requests += 1;
            let (data, buf) = if p.nsegs == 1 {
                (pool.get(p.head).data, crate::rq::NO_BUF)
            } else if p.op.has_data() {
                let (i, w) = q.take_buf(p.sectors);
                if p.op == Op::Write {
                    let mut off = 0;
                    let mut m = Some(p.head);
                    while let Some(id) = m {
                        let b = pool.get(id);
                        b.data.copy_to(0, &w, off, b.data.len());
                        off += b.data.len();
                        m = b.rq_next;
                    }
                }
                (w, i)
            } else {
                (DataBuf::EMPTY, crate::rq::NO_BUF)
            };
            let head = pool.get(p.head);
            let (user_data, root, map_index) = (head.user_data, head.root, head.map_index);
            let r = pool.alloc(false).expect("clone allocation never fails");
            let rb = pool.get_mut(r);
            rb.op = p.op;
            rb.flags = p.flags;
            rb.dev = vol;
            rb.sector = p.sector;
            rb.sectors = p.sectors;
            rb.copy_src = 0;
            rb.data = data;
            rb.status = Status::Ok;
            rb.map_index = map_index;
            rb.user_data = user_data;
            rb.parent = None;
            rb.root = root;
            rb.touched = 0;
            rb.rq_next = Some(p.head);
            let ctx = RqCtx {
                sector: p.sector,
                sectors: p.sectors,
                buf,
                target: p.target,
                nsegs: p.nsegs,
                _pad: [0; 4],
            };
            rb.frames.push(FrameKind::Request, vol, &ctx, fallback);
            let t = &*table.entries()[p.target as usize].target;
            let res = map_with(t, p.target, r, pool, fallback, &mut tx, None);
            if finish_map(res, r, vol, p.target, pool, complete_q, requeue, stats) {
                submit_q.push_back(r);
            }
        }
        n
    }

    /// Takes the next finished top-level I/O.
    pub fn reap(&mut self) -> Option<Completion> {
        self.done.pop_front()
    }

    /// Takes the first completion that `f` accepts, leaving the others queued.
    pub fn reap_if(&mut self, f: impl Fn(&Completion) -> bool) -> Option<Completion> {
        let i = self.done.iter().position(f)?;
        self.done.remove(i)
    }

    /// Takes the completion with this tag, leaving the others queued.
    pub fn reap_tag(&mut self, user_data: u64) -> Option<Completion> {
        let i = self.done.iter().position(|c| c.user_data == user_data)?;
        self.done.remove(i)
    }

    /// Top-level I/O started and not yet reaped as finished.
    pub fn outstanding(&self) -> u64 {
        self.stats.submitted - self.stats.completed
    }

    /// Routes a bio down until a leaf takes it, a target keeps it, or it completes.
    fn run_submit(&mut self, id: BioId) {
        let Reactor {
            pool,
            fallback,
            devs,
            submit_q,
            complete_q,
            requeue,
            unplug,
            stats,
            copy_bufs,
            targets,
            tio,
            index,
            ..
        } = self;
        loop {
            let dev = pool.get(id).dev;
            match devs.get_mut(dev.0 as usize) {
                Some(Slot::Leaf(l)) => {
                    let bio = pool.get(id);
                    let src_end = if bio.op == Op::Copy {
                        bio.copy_src + bio.sectors as u64
                    } else {
                        0
                    };
                    if bio.op != Op::Flush && (bio.end() > l.size || src_end > l.size) {
                        pool.get_mut(id).status = Status::OutOfRange;
                        complete_q.push_back(id);
                    } else {
                        if bio.op == Op::Copy {
                            stats.copy_offloaded_bytes += bio.bytes() as u64;
                        }
                        stats.leaf_ios += 1;
                        if l.poll_bit != 0 {
                            let root = bio.root;
                            pool.get_mut(root).touched |= l.poll_bit;
                        }
                        l.chan.submit(&mut LeafCx { pool, complete_q }, id);
                    }
                    return;
                }
                Some(Slot::Volume(v)) => {
                    if v.suspended {
                        v.held.push_back(id);
                        stats.held += 1;
                        return;
                    }
                    v.inflight += 1;
                    let bio = pool.get_mut(id);
                    bio.frames.push(FrameKind::Volume, dev, &(), fallback);
                    let Some(table) = v.table.as_deref() else {
                        bio.status = Status::IoError;
                        complete_q.push_back(id);
                        return;
                    };
                    let src_end = if bio.op == Op::Copy {
                        bio.copy_src + bio.sectors as u64
                    } else {
                        0
                    };
                    if bio.op != Op::Flush && (bio.end() > table.size() || src_end > table.size()) {
                        bio.status = Status::OutOfRange;
                        complete_q.push_back(id);
                        return;
                    }
                    if bio.op == Op::Copy {
                        // Copies may look further down the stack (kernel copies between files).
                        let Some(Slot::Volume(v)) = devs.get(dev.0 as usize) else {
                            unreachable!()
                        };
                        let table = v.table.as_deref().expect("checked above");
                        let mut cx = CopyCx {
                            devs,
                            pool,
                            fallback,
                            submit_q,
                            complete_q,
                            requeue,
                            stats,
                            bufs: copy_bufs,
                            targets,
                            tio,
                            index: *index,
                        };
                        if !cx.map_copy(table, dev, id) {
                            return;
                        }
                        continue;
                    }
                    let Some(Slot::Volume(v)) = devs.get_mut(dev.0 as usize) else {
                        unreachable!()
                    };
                    let table = v.table.as_deref().expect("checked above");
                    let rq = v.rq.as_mut().map(|q| (q, &mut *unplug));
                    let mut tx = Tx {
                        vol: dev,
                        reactor: *index,
                        vt: vol_targets(targets, dev),
                        tio,
                    };
                    if !map_in_table(
                        table, dev, id, pool, fallback, submit_q, complete_q, requeue, stats, rq,
                        &mut tx,
                    ) {
                        return;
                    }
                }
                _ => {
                    pool.get_mut(id).status = Status::Shutdown;
                    complete_q.push_back(id);
                    return;
                }
            }
        }
    }

    /// Pops frames until a layer keeps the bio, a split waits for its other pieces, or the
    /// top-level I/O is done.
    fn run_complete(&mut self, id: BioId) {
        if let Some((child, vol, target)) = self.run_complete_frames(id) {
            self.child_complete(child, vol, target);
        }
    }

    /// `run_complete`'s frame walk. Returns a child bio whose bottom frame was reached: the
    /// caller hands it to `child_complete`, which needs the whole reactor.
    fn run_complete_frames(&mut self, mut id: BioId) -> Option<(BioId, DevId, u16)> {
        let Reactor {
            pool,
            fallback,
            devs,
            submit_q,
            complete_q,
            done,
            requeue,
            unplug,
            stats,
            copy_bufs,
            targets,
            tio,
            index,
            ..
        } = self;
        loop {
            let bio = pool.get_mut(id);
            match bio.frames.peek() {
                Some(h) => match h.kind {
                    FrameKind::Volume => {
                        bio.frames.pop();
                        let Some(Slot::Volume(v)) = devs.get_mut(h.dev.0 as usize) else {
                            continue;
                        };
                        v.inflight -= 1;
                        if std::mem::take(&mut bio.pushback) {
                            // Back as it entered (`push_back` and split restores made its
                            // sector the volume's again): held for the next table, or
                            // (resumed meanwhile) mapped again at once.
                            bio.status = Status::Ok;
                            bio.dev = h.dev;
                            if v.suspended {
                                let at = v.pushed.min(v.held.len());
                                v.held.insert(at, id);
                                v.pushed += 1;
                                stats.held += 1;
                            } else {
                                submit_q.push_back(id);
                            }
                            return None;
                        }
                    }
                    FrameKind::Split => {
                        let mut ctx: SplitCtx = bio.frames.ctx_at(h.ctx_off);
                        ctx.merge(bio.status, bio.pushback);
                        ctx.pending -= 1;
                        if ctx.pending > 0 {
                            // Park: the last clone to finish resumes the parent.
                            bio.frames.set_ctx_at(h.ctx_off, &ctx);
                            return None;
                        }
                        bio.frames.pop();
                        restore(pool, id, &ctx, h.dev);
                    }
                    FrameKind::Target { target } => {
                        bio.frames.pop();
                        let Some(Slot::Volume(v)) = devs.get(h.dev.0 as usize) else {
                            unreachable!("target frame of a volume that is gone")
                        };
                        let table = v.table.as_deref().expect("target frame without a table");
                        let t = &table.entries()[target as usize].target;
                        let root = bio.root;
                        let mut tx = Tx {
                            vol: h.dev,
                            reactor: *index,
                            vt: vol_targets(targets, h.dev),
                            tio,
                        };
                        let mut cx = tx.cx(target, Some(id), Some(root), fallback);
                        let r = t.end_io(bio, &mut cx);
                        match r {
                            Endio::Done => {}
                            Endio::Park { key } | Endio::Hold { key } => {
                                // Parked as `map` saw it: the target put the sector back.
                                bio.dev = h.dev;
                                tx.vt.slots[target as usize].parked.push(
                                    crate::target::cx::Parked {
                                        id,
                                        key,
                                        pinned: matches!(r, Endio::Hold { .. }),
                                    },
                                );
                                return None;
                            }
                            Endio::Requeue => {
                                // Failover: map again through the same target at once.
                                bio.dev = h.dev;
                                bio.status = Status::Ok;
                                stats.requeued += 1;
                                requeue.push_back(Requeued {
                                    id,
                                    vol: h.dev,
                                    target,
                                    due: None,
                                });
                                return None;
                            }
                        }
                    }
                    FrameKind::Child { target } => return Some((id, h.dev, target)),
                    FrameKind::CopyEmu => {
                        unreachable!(
                            "a parked copy piece completes through its steps, not its queue"
                        )
                    }
                    FrameKind::Request => {
                        // The request is done: its members complete with its status, reads
                        // copied out of the bounce buffer they shared.
                        let ctx: RqCtx = bio.frames.ctx_at(h.ctx_off);
                        bio.frames.pop();
                        let (status, op, pushback) = (bio.status, bio.op, bio.pushback);
                        let mut m = bio.rq_next.take();
                        pool.free(id, fallback);
                        let Some(Slot::Volume(VolState {
                            rq: Some(q), table, ..
                        })) = devs.get_mut(h.dev.0 as usize)
                        else {
                            unreachable!("request of a volume without a request queue")
                        };
                        let window = (ctx.buf != crate::rq::NO_BUF)
                            .then(|| q.buf_window(ctx.buf, ctx.sectors));
                        // Members were queued target-relative; pushed back, they go up to the
                        // volume, which maps them again from its own sectors.
                        let start = match (pushback, table.as_deref()) {
                            (true, Some(t)) => t.entries()[ctx.target as usize].start,
                            _ => 0,
                        };
                        let mut off = 0;
                        while let Some(mid) = m {
                            let mb = pool.get_mut(mid);
                            if let (Some(w), Op::Read, true) = (&window, op, status.is_ok()) {
                                w.copy_to(off, &mb.data, 0, mb.data.len());
                            }
                            off += mb.data.len();
                            mb.status = status;
                            mb.pushback = pushback;
                            if start > 0 && mb.op != Op::Flush {
                                mb.sector += start;
                            }
                            m = mb.rq_next.take();
                            complete_q.push_back(mid);
                        }
                        if ctx.buf != crate::rq::NO_BUF {
                            q.put_buf(ctx.buf);
                        }
                        q.inflight -= 1;
                        if !q.plugged && !q.is_empty() {
                            q.plugged = true;
                            unplug.push(h.dev);
                        }
                        return None;
                    }
                },
                None => match bio
                    .parent
                    .map(|(p, off)| (p, off, is_copy_emu(pool, p, off)))
                {
                    Some((parent, _, true)) => {
                        let child = pool.get(id);
                        // A step pushed back ends the piece; the piece goes back up whole.
                        let status = if child.pushback {
                            pool.get_mut(parent).pushback = true;
                            Status::IoError
                        } else {
                            child.status
                        };
                        pool.free(id, fallback);
                        let mut cx = CopyCx {
                            devs,
                            pool,
                            fallback,
                            submit_q,
                            complete_q,
                            requeue,
                            stats,
                            bufs: copy_bufs,
                            targets,
                            tio,
                            index: *index,
                        };
                        if !cx.emu_step_done(parent, status) {
                            return None;
                        }
                        // The piece is done: complete it upward.
                        id = parent;
                    }
                    Some((parent, off, false)) => {
                        let (status, pushback) = (pool.get(id).status, pool.get(id).pushback);
                        pool.free(id, fallback);
                        let p = pool.get_mut(parent);
                        let mut ctx: SplitCtx = p.frames.ctx_at(off);
                        ctx.merge(status, pushback);
                        ctx.pending -= 1;
                        if ctx.pending > 0 {
                            p.frames.set_ctx_at(off, &ctx);
                            return None;
                        }
                        // The parent is parked on that split frame: finish it.
                        let h = p
                            .frames
                            .pop()
                            .expect("parked parent without its split frame");
                        debug_assert!(h.kind == FrameKind::Split && h.ctx_off == off);
                        restore(pool, parent, &ctx, h.dev);
                        id = parent;
                    }
                    None => {
                        let bio = pool.get(id);
                        debug_assert!(
                            !bio.pushback,
                            "a pushback always stops at its volume's entry frame"
                        );
                        let status = if bio.pushback {
                            Status::IoError
                        } else {
                            bio.status
                        };
                        done.push_back(Completion {
                            user_data: bio.user_data,
                            status,
                        });
                        pool.free(id, fallback);
                        stats.completed += 1;
                        return None;
                    }
                },
            }
        }
    }
}

/// The target slots of volume `dev` (made empty if this reactor has none yet).
fn vol_targets(targets: &mut Vec<VolTargets>, dev: DevId) -> &mut VolTargets {
    let i = dev.0 as usize;
    if targets.len() <= i {
        targets.resize_with(i + 1, VolTargets::default);
    }
    &mut targets[i]
}

fn is_copy_emu(pool: &BioPool, parent: BioId, off: u32) -> bool {
    pool.get(parent).frames.kind_at(off) == Some(FrameKind::CopyEmu)
}

/// Puts a split parent back as it was at the split, with the merged status.
fn restore(pool: &mut BioPool, id: BioId, ctx: &SplitCtx, vol: DevId) {
    let bio = pool.get_mut(id);
    bio.dev = vol;
    bio.sector = ctx.sector;
    bio.sectors = ctx.sectors;
    bio.copy_src = ctx.copy_src;
    if ctx.data_advanced > 0 {
        bio.data = bio.data.unadvance(ctx.data_advanced as usize);
    }
    bio.status = Status::from_u8(ctx.status);
    bio.pushback = ctx.pushback != 0;
}

/// Maps a bio that entered volume `vol` with `table`. Leading pieces that cross a target
/// boundary (or a target's own boundary) are cut off as clones and mapped at once; the remainder
/// goes on as the original bio (seed 001). Returns true if the original was remapped and should
/// keep descending.
#[allow(clippy::too_many_arguments)]
fn map_in_table(
    table: &Table,
    vol: DevId,
    id: BioId,
    pool: &mut BioPool,
    fallback: &mut FrameFallback,
    submit_q: &mut VecDeque<BioId>,
    complete_q: &mut VecDeque<BioId>,
    requeue: &mut VecDeque<Requeued>,
    stats: &mut ReactorStats,
    mut rq: Option<(&mut RequestQueue, &mut Vec<DevId>)>,
    tx: &mut Tx<'_>,
) -> bool {
    let entries = table.entries();
    let mut split_off: Option<u32> = None;

    // Pushes the split frame once per volume level, then counts one more piece.
    let mut add_piece = |pool: &mut BioPool, fallback: &mut FrameFallback| -> u32 {
        let bio = pool.get_mut(id);
        let off = *split_off.get_or_insert_with(|| {
            let ctx = SplitCtx {
                sector: bio.sector,
                copy_src: bio.copy_src,
                sectors: bio.sectors,
                pending: 1,
                ..SplitCtx::default()
            };
            bio.frames.push(FrameKind::Split, vol, &ctx, fallback)
        });
        let mut ctx: SplitCtx = bio.frames.ctx_at(off);
        ctx.pending += 1;
        bio.frames.set_ctx_at(off, &ctx);
        off
    };

    if pool.get(id).op == Op::Flush {
        // An empty flush goes once to every distinct device under the table.
        let plan = table.flush_plan();
        let Some((&last, rest)) = plan.split_last() else {
            complete_q.push_back(id);
            return false;
        };
        for &(ti, k) in rest {
            let off = add_piece(pool, fallback);
            let c = pool.alloc(false).expect("clone allocation never fails");
            let (flags, user_data, root) = {
                let b = pool.get(id);
                (b.flags, b.user_data, b.root)
            };
            let cb = pool.get_mut(c);
            cb.op = Op::Flush;
            cb.flags = flags;
            cb.dev = vol;
            cb.sector = 0;
            cb.sectors = 0;
            cb.data = DataBuf::EMPTY;
            cb.user_data = user_data;
            cb.root = root;
            cb.map_index = k;
            cb.parent = Some((id, off));
            if let Some((q, unplug)) = rq.as_mut() {
                enqueue(q, unplug, vol, pool, c, ti, stats);
                continue;
            }
            let r = map_with(
                &*entries[ti as usize].target,
                ti,
                c,
                pool,
                fallback,
                tx,
                None,
            );
            if finish_map(r, c, vol, ti, pool, complete_q, requeue, stats) {
                submit_q.push_back(c);
            }
        }
        let (ti, k) = last;
        let b = pool.get_mut(id);
        b.sector = 0;
        b.map_index = k;
        if let Some((q, unplug)) = rq {
            enqueue(q, unplug, vol, pool, id, ti, stats);
            return false;
        }
        let r = map_with(
            &*entries[ti as usize].target,
            ti,
            id,
            pool,
            fallback,
            tx,
            None,
        );
        return finish_map(r, id, vol, ti, pool, complete_q, requeue, stats);
    }

    loop {
        let bio = pool.get_mut(id);
        let ti = table.find(bio.sector);
        let e = &entries[ti];
        let off = bio.sector - e.start;
        let avail = (e.len - off).min(e.target.max_io_len(off));
        if bio.sectors as Sector <= avail {
            bio.sector = off;
            if let Some((q, unplug)) = rq {
                enqueue(q, unplug, vol, pool, id, ti as u16, stats);
                return false;
            }
            let r = map_with(&*e.target, ti as u16, id, pool, fallback, tx, None);
            return finish_map(r, id, vol, ti as u16, pool, complete_q, requeue, stats);
        }
        // Cut the leading `n` sectors off as a clone pointing into the parent's data.
        let n = avail as u32;
        let frame_off = add_piece(pool, fallback);
        let c = pool.alloc(false).expect("clone allocation never fails");
        let bio = pool.get(id);
        let (op, flags, user_data, copy_src, root) =
            (bio.op, bio.flags, bio.user_data, bio.copy_src, bio.root);
        let lead = if op.has_data() {
            bio.data.slice(0, n as usize * SECTOR_SIZE)
        } else {
            DataBuf::EMPTY
        };
        {
            let cb = pool.get_mut(c);
            cb.op = op;
            cb.flags = flags;
            cb.dev = vol;
            cb.sector = off;
            cb.sectors = n;
            cb.copy_src = copy_src;
            cb.data = lead;
            cb.user_data = user_data;
            cb.root = root;
            cb.parent = Some((id, frame_off));
        }
        {
            let bio = pool.get_mut(id);
            bio.sector += n as Sector;
            bio.sectors -= n;
            bio.copy_src += n as Sector;
            if op.has_data() {
                let adv = n as usize * SECTOR_SIZE;
                bio.data = bio.data.slice(adv, bio.data.len() - adv);
                let mut ctx: SplitCtx = bio.frames.ctx_at(frame_off);
                ctx.data_advanced += adv as u64;
                bio.frames.set_ctx_at(frame_off, &ctx);
            }
        }
        stats.splits += 1;
        if let Some((q, unplug)) = rq.as_mut() {
            enqueue(q, unplug, vol, pool, c, ti as u16, stats);
            continue;
        }
        let r = map_with(&*e.target, ti as u16, c, pool, fallback, tx, None);
        if finish_map(r, c, vol, ti as u16, pool, complete_q, requeue, stats) {
            submit_q.push_back(c);
        }
    }
}

/// Puts a bio (target-relative, split at target boundaries) on a request queue, and the
/// volume on the unplug list.
fn enqueue(
    q: &mut RequestQueue,
    unplug: &mut Vec<DevId>,
    vol: DevId,
    pool: &mut BioPool,
    id: BioId,
    target: u16,
    stats: &mut ReactorStats,
) {
    stats.rq_bios += 1;
    if q.add(pool, id, target) {
        stats.rq_merges += 1;
    }
    if !q.plugged {
        q.plugged = true;
        unplug.push(vol);
    }
}

/// Applies a map result; true if the bio was remapped and goes on down.
#[inline]
#[allow(clippy::too_many_arguments)]
fn finish_map(
    r: MapResult,
    id: BioId,
    vol: DevId,
    target: u16,
    pool: &mut BioPool,
    complete_q: &mut VecDeque<BioId>,
    requeue: &mut VecDeque<Requeued>,
    stats: &mut ReactorStats,
) -> bool {
    match r {
        MapResult::Remapped => true,
        // Recorded on the target's parked list by `map_with`.
        MapResult::Park { .. } | MapResult::Hold { .. } => false,
        MapResult::Done(s) => {
            pool.get_mut(id).status = s;
            complete_q.push_back(id);
            false
        }
        MapResult::Requeue => {
            stats.requeued += 1;
            requeue.push_back(Requeued {
                id,
                vol,
                target,
                due: Some(std::time::Instant::now() + crate::target::REQUEUE_DELAY),
            });
            false
        }
    }
}

/// What the copy paths touch: the reactor's parts, borrowed apart.
struct CopyCx<'a> {
    targets: &'a mut Vec<VolTargets>,
    tio: &'a mut TargetIo,
    index: usize,
    devs: &'a [Slot],
    pool: &'a mut BioPool,
    fallback: &'a mut FrameFallback,
    submit_q: &'a mut VecDeque<BioId>,
    complete_q: &'a mut VecDeque<BioId>,
    requeue: &'a mut VecDeque<Requeued>,
    stats: &'a mut ReactorStats,
    bufs: &'a mut CopyBufs,
}

impl CopyCx<'_> {
    /// Maps a copy that entered `vol`. Pieces are cut where the source or the destination
    /// crosses a boundary. Returns true if the original was remapped and goes on down.
    fn map_copy(&mut self, table: &Table, vol: DevId, id: BioId) -> bool {
        let entries = table.entries();
        let mut split_off: Option<u32> = None;
        loop {
            let bio = self.pool.get(id);
            let (dti, sti) = (table.find(bio.sector), table.find(bio.copy_src));
            let (de, se) = (&entries[dti], &entries[sti]);
            let (doff, soff) = (bio.sector - de.start, bio.copy_src - se.start);
            let avail = (de.len - doff)
                .min(de.target.max_io_len(doff))
                .min(se.len - soff)
                .min(se.target.max_io_len(soff));
            if bio.sectors as Sector <= avail {
                let n = bio.sectors;
                return self.route_piece(table, vol, id, (dti, doff), (sti, soff), n);
            }
            let n = avail as u32;
            let bio = self.pool.get_mut(id);
            let off = *split_off.get_or_insert_with(|| {
                let ctx = SplitCtx {
                    sector: bio.sector,
                    copy_src: bio.copy_src,
                    sectors: bio.sectors,
                    pending: 1,
                    ..SplitCtx::default()
                };
                bio.frames.push(FrameKind::Split, vol, &ctx, self.fallback)
            });
            let mut ctx: SplitCtx = bio.frames.ctx_at(off);
            ctx.pending += 1;
            bio.frames.set_ctx_at(off, &ctx);
            let (flags, user_data, root, sector, copy_src) =
                (bio.flags, bio.user_data, bio.root, bio.sector, bio.copy_src);
            bio.sector += n as Sector;
            bio.copy_src += n as Sector;
            bio.sectors -= n;
            let c = self
                .pool
                .alloc(false)
                .expect("clone allocation never fails");
            let cb = self.pool.get_mut(c);
            cb.op = Op::Copy;
            cb.flags = flags;
            cb.dev = vol;
            cb.sector = sector;
            cb.copy_src = copy_src;
            cb.sectors = n;
            cb.data = DataBuf::EMPTY;
            cb.user_data = user_data;
            cb.root = root;
            cb.parent = Some((id, off));
            self.stats.splits += 1;
            if self.route_piece(table, vol, c, (dti, doff), (sti, soff), n) {
                self.submit_q.push_back(c);
            }
        }
    }

    /// Sends one piece on its way: down as a copy when both ends land on one device, to the
    /// kernel when both end on files of one filesystem, else emulated here. True if the piece
    /// was remapped and goes on down.
    fn route_piece(
        &mut self,
        table: &Table,
        vol: DevId,
        id: BioId,
        dst: (usize, Sector),
        src: (usize, Sector),
        n: u32,
    ) -> bool {
        use crate::target::TargetExtent;
        let entries = table.entries();
        let len = n as Sector;
        let dx = entries[dst.0].target.extent(dst.1, len);
        let sx = entries[src.0].target.extent(src.1, len);
        if self.pool.get(id).flags.contains(BioFlags::NO_OFFLOAD) {
            self.emulate(vol, id, dst, src, n);
            return false;
        }
        if let (
            TargetExtent::Dev {
                dev: dd,
                sector: ds,
                len: dl,
            },
            TargetExtent::Dev {
                dev: sd,
                sector: ss,
                len: sl,
            },
        ) = (dx, sx)
        {
            if dl >= len && sl >= len {
                if dd == sd {
                    let bio = self.pool.get_mut(id);
                    bio.dev = dd;
                    bio.sector = ds;
                    bio.copy_src = ss;
                    return true;
                }
                if let Some(s) = self.kernel_copy((sd, ss), (dd, ds), len) {
                    self.stats.copy_kernel_bytes += len * SECTOR_SIZE as u64;
                    self.pool.get_mut(id).status = s;
                    self.complete_q.push_back(id);
                    return false;
                }
            }
        }
        self.emulate(vol, id, dst, src, n);
        false
    }

    /// Follows pure remaps down to a leaf; `None` if the range does not stay on one device the
    /// whole way, or passes a suspended volume.
    fn resolve(&self, mut dev: DevId, mut sector: Sector, len: Sector) -> Option<(DevId, Sector)> {
        for _ in 0..crate::bio::MAX_FRAMES {
            match self.devs.get(dev.0 as usize)? {
                Slot::Leaf(l) => return (sector + len <= l.size).then_some((dev, sector)),
                Slot::Volume(v) => {
                    let t = v.table.as_deref()?;
                    if v.suspended || sector + len > t.size() {
                        return None;
                    }
                    let e = &t.entries()[t.find(sector)];
                    let off = sector - e.start;
                    if e.len - off < len {
                        return None;
                    }
                    match e.target.extent(off, len) {
                        crate::target::TargetExtent::Dev {
                            dev: d,
                            sector: s,
                            len: l,
                        } if l >= len => {
                            dev = d;
                            sector = s;
                        }
                        _ => return None,
                    }
                }
                Slot::Empty => return None,
            }
        }
        None
    }

    /// Copies between two file leaves on one filesystem in the kernel, within this reactor turn
    /// (so no drain can interleave with it). `None` when the ends are not such files.
    fn kernel_copy(
        &self,
        src: (DevId, Sector),
        dst: (DevId, Sector),
        len: Sector,
    ) -> Option<Status> {
        let (sl, ss) = self.resolve(src.0, src.1, len)?;
        let (dl, ds) = self.resolve(dst.0, dst.1, len)?;
        let fd_of = |d: DevId| match self.devs.get(d.0 as usize) {
            Some(Slot::Leaf(l)) => l.chan.copy_fd(),
            _ => None,
        };
        let ((sfd, sfs), (dfd, dfs)) = (fd_of(sl)?, fd_of(dl)?);
        if sfs != dfs {
            return None;
        }
        // SAFETY: both fds belong to leaf channels of this reactor, open for this whole call.
        let (sf, df) = unsafe {
            (
                std::os::fd::BorrowedFd::borrow_raw(sfd),
                std::os::fd::BorrowedFd::borrow_raw(dfd),
            )
        };
        let (mut so, mut d_o) = (ss * SECTOR_SIZE as u64, ds * SECTOR_SIZE as u64);
        let mut left = (len * SECTOR_SIZE as u64) as usize;
        while left > 0 {
            match rustix::fs::copy_file_range(sf, Some(&mut so), df, Some(&mut d_o), left) {
                Ok(0) => return Some(Status::IoError),
                Ok(n) => left -= n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::NOSPC) => return Some(Status::NoSpace),
                // Cross-device or unsupported after all: let the layer emulate instead.
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::INVAL,
                ) if left == (len * SECTOR_SIZE as u64) as usize => return None,
                Err(_) => return Some(Status::IoError),
            }
        }
        Some(Status::Ok)
    }

    /// Parks the piece on a `CopyEmu` frame and starts its first read (or waits for a buffer).
    fn emulate(
        &mut self,
        vol: DevId,
        id: BioId,
        dst: (usize, Sector),
        src: (usize, Sector),
        n: u32,
    ) {
        let buf = self.bufs.acquire().unwrap_or(NO_BUF);
        let ctx = CopyEmuCtx {
            src: src.1,
            dst: dst.1,
            total: n,
            buf,
            src_target: src.0 as u16,
            dst_target: dst.0 as u16,
            ..CopyEmuCtx::default()
        };
        self.pool
            .get_mut(id)
            .frames
            .push(FrameKind::CopyEmu, vol, &ctx, self.fallback);
        if buf == NO_BUF {
            self.bufs.waiting.push_back(id);
        } else {
            self.issue(id);
        }
    }

    /// Issues the current step of an emulated piece: a read of the next chunk of the source,
    /// or the write of it to the destination, each mapped by its target directly (no re-entry
    /// into the volume, whose in-flight count already holds the piece).
    fn issue(&mut self, piece: BioId) {
        let p = self.pool.get(piece);
        let h = p.frames.peek().expect("emulated piece without its frame");
        let mut ctx: CopyEmuCtx = p.frames.ctx_at(h.ctx_off);
        let (flags, user_data, root) = (p.flags, p.user_data, p.root);
        let vol = h.dev;
        if ctx.phase == 0 {
            ctx.chunk = (ctx.total - ctx.done).min(COPY_CHUNK_SECTORS);
        }
        let read = ctx.phase == 0;
        let data = self.bufs.window(ctx.buf, ctx.chunk);
        self.pool.get_mut(piece).frames.set_ctx_at(h.ctx_off, &ctx);
        let c = self
            .pool
            .alloc(false)
            .expect("clone allocation never fails");
        let cb = self.pool.get_mut(c);
        cb.op = if read { Op::Read } else { Op::Write };
        cb.flags = if read {
            BioFlags::NONE
        } else {
            BioFlags(flags.0 & BioFlags::FUA.0)
        };
        cb.dev = vol;
        cb.sector = if read { ctx.src } else { ctx.dst } + ctx.done as Sector;
        cb.sectors = ctx.chunk;
        cb.data = data;
        cb.user_data = user_data;
        cb.root = root;
        cb.parent = Some((piece, h.ctx_off));
        let ti = if read { ctx.src_target } else { ctx.dst_target };
        // The volume's table: unchanged while the piece is in flight (swaps wait for drains).
        let devs = self.devs;
        let t = match devs.get(vol.0 as usize) {
            Some(Slot::Volume(v)) => {
                &v.table.as_deref().expect("table").entries()[ti as usize].target
            }
            _ => unreachable!(),
        };
        let mut tx = Tx {
            vol,
            reactor: self.index,
            vt: vol_targets(self.targets, vol),
            tio: self.tio,
        };
        let r = map_with(&**t, ti, c, self.pool, self.fallback, &mut tx, None);
        if finish_map(
            r,
            c,
            vol,
            ti,
            self.pool,
            self.complete_q,
            self.requeue,
            self.stats,
        ) {
            self.submit_q.push_back(c);
        }
    }

    /// A step of an emulated piece finished with `status`. Returns true when the whole piece is
    /// done (its frame popped, status set): the caller completes it upward.
    fn emu_step_done(&mut self, piece: BioId, status: Status) -> bool {
        let p = self.pool.get_mut(piece);
        let h = p.frames.peek().expect("emulated piece without its frame");
        let mut ctx: CopyEmuCtx = p.frames.ctx_at(h.ctx_off);
        let mut finished = !status.is_ok();
        if finished {
            ctx.status = status as u8;
        } else if ctx.phase == 0 {
            ctx.phase = 1;
        } else {
            ctx.done += ctx.chunk;
            self.stats.copy_emulated_bytes += ctx.chunk as u64 * SECTOR_SIZE as u64;
            ctx.phase = 0;
            finished = ctx.done == ctx.total;
        }
        p.frames.set_ctx_at(h.ctx_off, &ctx);
        if !finished {
            self.issue(piece);
            return false;
        }
        p.frames.pop();
        let mut st = p.status;
        st.merge(Status::from_u8(ctx.status));
        p.status = st;
        // Hand the buffer to the next waiting piece, if any.
        if let Some(next) = self.bufs.waiting.pop_front() {
            let n = self.pool.get_mut(next);
            let nh = n.frames.peek().expect("waiting piece without its frame");
            let mut nctx: CopyEmuCtx = n.frames.ctx_at(nh.ctx_off);
            nctx.buf = ctx.buf;
            n.frames.set_ctx_at(nh.ctx_off, &nctx);
            self.issue(next);
        } else {
            self.bufs.free.push(ctx.buf);
        }
        true
    }
}
