//! The reactor: one thread's run loop. It owns its bio pool, its queues and its view of every
//! device (a leaf channel, or a volume's cached table, suspend state and in-flight count), so the
//! data path takes no lock and touches no shared counter. Submissions and completions go through
//! queues and are run to the end by `poll`, so neither ever recurses.

use crate::bio::{BioFlags, BioId, BioPool, FrameFallback, Op};
use crate::buf::DataBuf;
use crate::leaf::{LeafChannel, LeafCx};
use crate::rq::{QueueOpts, RequestQueue};
use crate::status::Status;
use crate::table::Table;
use crate::target::TargetIo;
use crate::volume::{self, Bell, CopyBufs, LeafState, Parts, Requeued, Slot, VolState, VolTargets};
pub use crate::volume::{Completion, ReactorStats, COPY_CHUNK_SECTORS};
use crate::{DevId, Sector, SECTOR_SIZE};
use std::collections::VecDeque;
use std::sync::Arc;

mod stateful;

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
            copy_bufs: CopyBufs::new(16, cap),
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
            // Target work (children, copies, unparks, timers, doorbells) is rare on most
            // rounds: a few loads decide, and its code stays out of this loop.
            let mut round = if self.tio.has_work()
                || !self.tio.timers.is_empty()
                || self.waker.is_rung_relaxed()
            {
                self.run_target_work()
            } else {
                0
            };
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
            self.pool.get_mut(r.id).dev = r.vol;
            volume::remap_at(self.parts(), r.vol, r.target, r.id, None);
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

    /// The reactor's parts the volume layer works with, borrowed apart for one step.
    #[inline(always)]
    fn parts(&mut self) -> Parts<'_> {
        Parts {
            pool: &mut self.pool,
            fallback: &mut self.fallback,
            devs: &mut self.devs,
            submit_q: &mut self.submit_q,
            complete_q: &mut self.complete_q,
            done: &mut self.done,
            requeue: &mut self.requeue,
            unplug: &mut self.unplug,
            stats: &mut self.stats,
            copy_bufs: &mut self.copy_bufs,
            targets: &mut self.targets,
            tio: &mut self.tio,
            index: self.index,
        }
    }

    /// Routes a bio down until a leaf takes it, a target keeps it, or it completes.
    fn run_submit(&mut self, id: BioId) {
        volume::route(self.parts(), id);
    }

    /// Dispatches what volume `vol`'s request queue lets out now. Returns how many.
    fn dispatch(&mut self, vol: DevId) -> usize {
        volume::dispatch(self.parts(), vol)
    }

    /// Sends a requeued bio back up to its volume (a noflush suspend).
    fn push_back(&mut self, r: Requeued) {
        volume::push_back(
            &self.devs,
            &mut self.pool,
            &mut self.complete_q,
            &mut self.stats,
            r,
        );
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
        volume::block_status(&self.devs, dev, sector, sectors, max_extents, out)
    }

    /// The completion step: dispatches on the frame kind until a layer keeps the bio, a split
    /// waits for its other pieces, or the top-level I/O is done; a child's end goes to its
    /// target.
    fn run_complete(&mut self, id: BioId) {
        if let Some((child, vol, target)) = volume::complete_frames(self.parts(), id) {
            self.child_complete(child, vol, target);
        }
    }
}
