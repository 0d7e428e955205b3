//! The request queue of a request-based volume (seed 004), one per volume per reactor.
//!
//! Bios arrive already split at target boundaries. The queue merges each into a pending
//! request when it is contiguous with one (same target, op and flags, within `max_sectors` and
//! the segment limit), orders pending requests with its scheduler, and lets at most `depth`
//! requests out at once: while the paths are busy, later bios merge into what waits. Within a
//! reactor turn the queue is plugged: nothing is dispatched until the turn's submissions have
//! all arrived, so a burst merges before any of it goes out.
//!
//! A request is a bio of its own (taken from the reactor's pool) whose members hang off it in a
//! list. One member lends its data window; several share a bounce buffer owned by the queue,
//! filled from the members' buffers before a write and copied back to them after a read.

use crate::bio::{BioFlags, BioId, BioPool, Op};
use crate::buf::DataBuf;
use crate::{Sector, SECTOR_SIZE};
use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// How a request queue orders what waits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheduler {
    /// Arrival order; merges only (blk-mq's `none`).
    #[default]
    None,
    /// Sorted batches in one direction at a time, reads preferred, each direction with a FIFO
    /// expiry so nothing starves (after the kernel's `mq-deadline`).
    Deadline,
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduler::None => "none",
            Scheduler::Deadline => "deadline",
        })
    }
}

impl FromStr for Scheduler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Scheduler::None),
            "deadline" | "mq-deadline" => Ok(Scheduler::Deadline),
            _ => Err(format!("unknown scheduler '{s}' (known: none, deadline)")),
        }
    }
}

/// Settings of a volume's request queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOpts {
    pub scheduler: Scheduler,
    /// Requests dispatched at once per reactor (`nr_requests`).
    pub nr_requests: u32,
}

impl Default for QueueOpts {
    fn default() -> Self {
        QueueOpts {
            scheduler: Scheduler::None,
            nr_requests: DEFAULT_NR_REQUESTS,
        }
    }
}

pub const DEFAULT_NR_REQUESTS: u32 = 32;
/// Largest merged request when the devices set no smaller limit (256 KiB).
pub const DEFAULT_MAX_REQUEST_SECTORS: u32 = 512;
/// Bios per request at most.
pub const MAX_SEGMENTS: u16 = 128;
/// Pending requests looked at for a merge under `none` (the most recent ones).
const NONE_MERGE_WINDOW: usize = 8;
/// `mq-deadline`'s defaults.
const READ_EXPIRE: Duration = Duration::from_millis(500);
const WRITE_EXPIRE: Duration = Duration::from_secs(5);
const FIFO_BATCH: u32 = 16;
const WRITES_STARVED: u32 = 2;

/// A request not yet dispatched.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pending {
    /// Target-relative first sector, and the target.
    pub(crate) sector: Sector,
    pub(crate) sectors: u32,
    pub(crate) target: u16,
    pub(crate) op: Op,
    pub(crate) flags: BioFlags,
    /// Members, first to last (linked through `Bio::rq_next`).
    pub(crate) head: BioId,
    pub(crate) tail: BioId,
    pub(crate) nsegs: u16,
    arrival: Instant,
}

impl Pending {
    fn end(&self) -> Sector {
        self.sector + self.sectors as Sector
    }

    fn is_write(&self) -> bool {
        self.op != Op::Read
    }
}

/// Context of a request's own frame (the bottom one of the request bio).
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub(crate) struct RqCtx {
    pub(crate) sector: u64,
    pub(crate) sectors: u32,
    /// Bounce buffer index, or `NO_BUF` when the single member lent its window.
    pub(crate) buf: u32,
    pub(crate) target: u16,
    pub(crate) nsegs: u16,
    pub(crate) _pad: [u8; 4],
}

pub(crate) const NO_BUF: u32 = u32::MAX;

#[derive(Debug)]
pub(crate) struct RequestQueue {
    pub(crate) opts: QueueOpts,
    /// `none`: arrival order. `deadline`: sorted by (target, sector).
    pending: VecDeque<Pending>,
    /// Flushes and other bios that never merge: out first, in order.
    urgent: VecDeque<Pending>,
    pub(crate) inflight: u32,
    max_sectors: u32,
    bufs: Vec<Box<[u8]>>,
    free_bufs: Vec<u32>,
    /// Set while the volume is on the reactor's unplug list.
    pub(crate) plugged: bool,
    // Deadline state.
    next_sector: (u16, Sector),
    batch_left: u32,
    batch_write: bool,
    starved: u32,
}

impl RequestQueue {
    /// A queue for a table whose devices accept `max_sectors` (0 = no limit); `capacity` bounds
    /// the bios that can wait (the pool size), so the queues never grow on the data path.
    pub(crate) fn new(opts: QueueOpts, max_sectors: u32, capacity: usize) -> RequestQueue {
        let max_sectors = match max_sectors {
            0 => DEFAULT_MAX_REQUEST_SECTORS,
            m => m.min(DEFAULT_MAX_REQUEST_SECTORS),
        };
        let depth = opts.nr_requests.max(1);
        RequestQueue {
            opts: QueueOpts {
                nr_requests: depth,
                ..opts
            },
            pending: VecDeque::with_capacity(capacity),
            urgent: VecDeque::with_capacity(capacity),
            inflight: 0,
            max_sectors,
            bufs: Vec::with_capacity(depth as usize),
            free_bufs: Vec::with_capacity(depth as usize),
            plugged: false,
            next_sector: (0, 0),
            batch_left: 0,
            batch_write: false,
            starved: 0,
        }
    }

    /// New settings; a switch to `deadline` sorts what waits.
    pub(crate) fn set_opts(&mut self, opts: QueueOpts) {
        self.opts = QueueOpts {
            nr_requests: opts.nr_requests.max(1),
            ..opts
        };
        if opts.scheduler == Scheduler::Deadline {
            self.pending
                .make_contiguous()
                .sort_by_key(|p| (p.target, p.sector));
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.urgent.is_empty()
    }

    /// Queues bio `id` (target-relative sector, target `target`). Returns true if it merged
    /// into a pending request.
    pub(crate) fn add(&mut self, pool: &mut BioPool, id: BioId, target: u16) -> bool {
        let now = Instant::now();
        let b = pool.get_mut(id);
        b.rq_next = None;
        let p = Pending {
            sector: b.sector,
            sectors: b.sectors,
            target,
            op: b.op,
            flags: b.flags,
            head: id,
            tail: id,
            nsegs: 1,
            arrival: now,
        };
        let mergeable = matches!(p.op, Op::Read | Op::Write | Op::Discard | Op::WriteZeroes)
            && !p.flags.contains(BioFlags::PREFLUSH)
            && !p.flags.contains(BioFlags::NOMERGE);
        if !mergeable {
            self.urgent.push_back(p);
            return false;
        }
        match self.opts.scheduler {
            Scheduler::None => {
                let n = self.pending.len();
                for i in (n.saturating_sub(NONE_MERGE_WINDOW)..n).rev() {
                    if self.try_merge(pool, i, &p) {
                        return true;
                    }
                }
                self.pending.push_back(p);
                false
            }
            Scheduler::Deadline => {
                let key = (p.target, p.sector);
                let i = self.pending.partition_point(|q| (q.target, q.sector) < key);
                // The request before may end where this starts; the one at `i` may start
                // where this ends (one of possibly several at that sector).
                if i > 0 && self.try_merge(pool, i - 1, &p) {
                    return true;
                }
                if i < self.pending.len() && self.try_merge(pool, i, &p) {
                    return true;
                }
                self.pending.insert(i, p);
                false
            }
        }
    }

    /// Merges `p` (one bio) into pending request `i` at its back or front, if it may.
    fn try_merge(&mut self, pool: &mut BioPool, i: usize, p: &Pending) -> bool {
        let max = self.max_sectors;
        let q = &mut self.pending[i];
        if q.target != p.target
            || q.op != p.op
            || q.flags != p.flags
            || q.nsegs >= MAX_SEGMENTS
            || q.sectors + p.sectors > max
        {
            return false;
        }
        if q.end() == p.sector {
            pool.get_mut(q.tail).rq_next = Some(p.head);
            q.tail = p.head;
        } else if p.end() == q.sector {
            pool.get_mut(p.head).rq_next = Some(q.head);
            q.head = p.head;
            q.sector = p.sector;
        } else {
            return false;
        }
        q.sectors += p.sectors;
        q.nsegs += 1;
        true
    }

    /// The next request to dispatch, if the queue may dispatch one now.
    pub(crate) fn next(&mut self) -> Option<Pending> {
        if self.inflight >= self.opts.nr_requests {
            return None;
        }
        if let Some(p) = self.urgent.pop_front() {
            return Some(p);
        }
        if self.pending.is_empty() {
            return None;
        }
        let i = match self.opts.scheduler {
            Scheduler::None => 0,
            Scheduler::Deadline => self.deadline_pick(),
        };
        let p = self.pending.remove(i).expect("picked index in range");
        self.next_sector = (p.target, p.end());
        Some(p)
    }

    /// Chooses the next pending request: go on with the current sorted batch, or start a new
    /// one (reads first unless writes starved), from an expired request if there is one.
    fn deadline_pick(&mut self) -> usize {
        let has = |w: bool| self.pending.iter().any(|p| p.is_write() == w);
        if self.batch_left > 0 {
            if let Some(i) = self.scan_from(self.batch_write) {
                self.batch_left -= 1;
                return i;
            }
        }
        let (reads, writes) = (has(false), has(true));
        let write = if reads && (!writes || self.starved < WRITES_STARVED) {
            if writes {
                self.starved += 1;
            }
            false
        } else {
            self.starved = 0;
            true
        };
        self.batch_write = write;
        self.batch_left = FIFO_BATCH - 1;
        let expire = if write { WRITE_EXPIRE } else { READ_EXPIRE };
        let oldest = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_write() == write)
            .min_by_key(|(_, p)| p.arrival)
            .map(|(i, p)| (i, p.arrival));
        match oldest {
            Some((i, t)) if t.elapsed() >= expire => i,
            _ => self
                .scan_from(write)
                .or_else(|| oldest.map(|o| o.0))
                .expect("a request in the chosen direction"),
        }
    }

    /// The first request in direction `write` at or after the elevator position, wrapping.
    fn scan_from(&self, write: bool) -> Option<usize> {
        let key = self.next_sector;
        let start = self.pending.partition_point(|q| (q.target, q.sector) < key);
        (start..self.pending.len())
            .chain(0..start)
            .find(|&i| self.pending[i].is_write() == write)
    }

    /// A bounce buffer window of `sectors` for a request with several members. There is one
    /// buffer per request that may be in flight, made on first use and kept.
    pub(crate) fn take_buf(&mut self, sectors: u32) -> (u32, DataBuf) {
        let i = match self.free_bufs.pop() {
            Some(i) => i,
            None => {
                assert!(
                    self.bufs.len() < self.opts.nr_requests as usize,
                    "more bounce buffers than requests in flight"
                );
                self.bufs
                    .push(vec![0u8; self.max_sectors as usize * SECTOR_SIZE].into_boxed_slice());
                self.bufs.len() as u32 - 1
            }
        };
        let b = &mut self.bufs[i as usize][..sectors as usize * SECTOR_SIZE];
        // SAFETY: the buffer is a boxed slice owned by this queue; it never moves (only the
        // Box pointer lives in the Vec), is not freed while the queue lives, and index `i` is
        // not handed out again until the request holding it has completed (`put_buf`).
        (i, unsafe { DataBuf::from_slice(b) })
    }

    /// The window of buffer `i` again (a read's completion copies out of it).
    pub(crate) fn buf_window(&mut self, i: u32, sectors: u32) -> DataBuf {
        let b = &mut self.bufs[i as usize][..sectors as usize * SECTOR_SIZE];
        // SAFETY: as in `take_buf`: the request holding `i` is completing and is the only user.
        unsafe { DataBuf::from_slice(b) }
    }

    pub(crate) fn put_buf(&mut self, i: u32) {
        self.free_bufs.push(i);
    }

    /// Requests waiting (not dispatched).
    pub(crate) fn waiting(&self) -> usize {
        self.pending.len() + self.urgent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DevId;

    fn bio(pool: &mut BioPool, op: Op, sector: Sector, sectors: u32) -> BioId {
        let id = pool.alloc(false).unwrap();
        let b = pool.get_mut(id);
        b.op = op;
        b.flags = BioFlags::NONE;
        b.dev = DevId(0);
        b.sector = sector;
        b.sectors = sectors;
        id
    }

    fn members(pool: &BioPool, p: &Pending) -> Vec<Sector> {
        let mut out = Vec::new();
        let mut m = Some(p.head);
        while let Some(id) = m {
            out.push(pool.get(id).sector);
            m = pool.get(id).rq_next;
        }
        out
    }

    fn drain(q: &mut RequestQueue) -> Vec<Pending> {
        let mut out = Vec::new();
        while let Some(p) = q.next() {
            out.push(p);
            q.inflight += 1;
        }
        out
    }

    #[test]
    fn none_merges_back_and_front_in_arrival_order() {
        let mut pool = BioPool::new(64, 64);
        let mut q = RequestQueue::new(QueueOpts::default(), 0, 64);
        for s in [8, 16, 0, 100, 24] {
            let id = bio(&mut pool, Op::Write, s, 8);
            q.add(&mut pool, id, 0);
        }
        let r = drain(&mut q);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].sector, r[0].sectors, r[0].nsegs), (0, 32, 4));
        assert_eq!(members(&pool, &r[0]), vec![0, 8, 16, 24]);
        assert_eq!((r[1].sector, r[1].sectors), (100, 8));
    }

    #[test]
    fn merges_respect_op_flags_target_and_size() {
        let mut pool = BioPool::new(64, 64);
        let mut q = RequestQueue::new(QueueOpts::default(), 16, 64);
        let a = bio(&mut pool, Op::Write, 0, 8);
        q.add(&mut pool, a, 0);
        let b = bio(&mut pool, Op::Read, 8, 8);
        assert!(!q.add(&mut pool, b, 0), "read after write does not merge");
        let c = bio(&mut pool, Op::Write, 8, 8);
        pool.get_mut(c).flags = BioFlags::FUA;
        assert!(!q.add(&mut pool, c, 0), "different flags do not merge");
        let d = bio(&mut pool, Op::Write, 8, 8);
        assert!(!q.add(&mut pool, d, 1), "another target does not merge");
        let e = bio(&mut pool, Op::Write, 8, 8);
        assert!(q.add(&mut pool, e, 0));
        let f = bio(&mut pool, Op::Write, 16, 8);
        assert!(!q.add(&mut pool, f, 0), "16 sectors is the limit");
        let g = bio(&mut pool, Op::Flush, 0, 0);
        q.add(&mut pool, g, 0);
        let r = drain(&mut q);
        assert_eq!(r[0].op, Op::Flush, "flushes go first");
        assert_eq!(r.len(), 6);
    }

    #[test]
    fn depth_bounds_dispatch() {
        let mut pool = BioPool::new(64, 64);
        let opts = QueueOpts {
            nr_requests: 2,
            ..QueueOpts::default()
        };
        let mut q = RequestQueue::new(opts, 0, 64);
        for s in 0..5 {
            let id = bio(&mut pool, Op::Read, s * 100, 8);
            q.add(&mut pool, id, 0);
        }
        assert_eq!(drain(&mut q).len(), 2);
        q.inflight -= 1;
        assert!(q.next().is_some());
        assert!(q.next().is_some(), "inflight is counted by the caller");
    }

    #[test]
    fn deadline_sorts_and_prefers_reads() {
        let mut pool = BioPool::new(64, 64);
        let opts = QueueOpts {
            scheduler: Scheduler::Deadline,
            nr_requests: 64,
        };
        let mut q = RequestQueue::new(opts, 0, 64);
        for (op, s) in [
            (Op::Write, 500),
            (Op::Read, 300),
            (Op::Write, 100),
            (Op::Read, 200),
            (Op::Read, 900),
            (Op::Write, 108),
        ] {
            let id = bio(&mut pool, op, s, 8);
            q.add(&mut pool, id, 0);
        }
        let r: Vec<_> = drain(&mut q).iter().map(|p| (p.op, p.sector)).collect();
        assert_eq!(
            r,
            vec![
                (Op::Read, 200),
                (Op::Read, 300),
                (Op::Read, 900),
                (Op::Write, 100),
                (Op::Write, 500)
            ],
            "reads first, each direction in sector order, 100+108 merged"
        );
    }

    #[test]
    fn deadline_serves_expired_first() {
        let mut pool = BioPool::new(64, 64);
        let opts = QueueOpts {
            scheduler: Scheduler::Deadline,
            nr_requests: 64,
        };
        let mut q = RequestQueue::new(opts, 0, 64);
        let old = bio(&mut pool, Op::Read, 1000, 8);
        q.add(&mut pool, old, 0);
        q.pending[0].arrival -= READ_EXPIRE * 2;
        for s in [10, 20, 30] {
            let id = bio(&mut pool, Op::Read, s * 8, 8);
            q.add(&mut pool, id, 0);
        }
        let first = q.next().unwrap();
        assert_eq!(first.sector, 1000, "the expired read jumps the elevator");
    }

    #[test]
    fn bounce_buffers_are_bounded_and_reused() {
        let opts = QueueOpts {
            nr_requests: 2,
            ..QueueOpts::default()
        };
        let mut q = RequestQueue::new(opts, 0, 8);
        let (a, wa) = q.take_buf(16);
        let (b, _) = q.take_buf(8);
        assert_ne!(a, b);
        assert_eq!(wa.len(), 16 * SECTOR_SIZE);
        q.put_buf(a);
        let (c, _) = q.take_buf(4);
        assert_eq!(c, a);
    }
}
