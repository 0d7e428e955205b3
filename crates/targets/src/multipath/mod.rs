//! `multipath`: one device reached over several paths, with failover between them.
//!
//! Table (dmsetup's syntax):
//!
//! ```text
//! <start> <len> multipath <#features> [features...] <#hw_handler_args> [hw_handler [args...]]
//!     <#pgs> <initial_pg>
//!     (<selector> <#selector_args> [selector_args...] <#paths> <#path_args> (<dev> [path_args...])+)+
//! ```
//!
//! Features (the count counts words, as dm does):
//! - `queue_if_no_path`: with no usable path, I/O waits (requeued) until a path comes back.
//! - `no_path_retry <N|queue|fail>` (multipathd's setting, here in the table): queue for `N`
//!   checker intervals after the last path went down, then fail queued and new I/O until a path
//!   is back; `queue` is `queue_if_no_path`, `fail` the default. The last of the two wins.
//! - `queue_mode <rq|bio>`: `rq` (the default) makes the table request-based: the volume gets a
//!   request queue, and every path must be a leaf. `bio` maps bios and accepts volumes as paths.
//! - `checker_interval_ms <N>` (stackbd's): the path checker's period, 1000 by default.
//! - `pg_init_retries <1..=50>`, `pg_init_delay_msecs <0..=60000>`, `retain_attached_hw_handler`:
//!   accepted and printed back; there are no hardware handlers to initialise.
//!
//! A hardware handler (`1 alua`, ...) is accepted and printed back, and has no effect.
//!
//! Priority groups are listed highest priority first and numbered from 1. I/O goes to the current
//! group: the one `initial_pg` or `switch_group` named, else the first enabled group with an
//! active path. The current group is kept while it has an active path (no automatic failback:
//! as in dm, that is the policy daemon's call, or `switch_group`'s). Disabled (bypassed) groups
//! are used only when no enabled group has an active path.
//!
//! Selectors: see [`selector`]. Messages: `fail_path <dev>`, `reinstate_path <dev>`,
//! `switch_group <n>`, `enable_group <n>`, `disable_group <n>`, `queue_if_no_path`,
//! `fail_if_no_path`.
//!
//! Status (dm's INFO): `2 <queue_io> <pg_init_count> 0 <#pgs> <current_pg>` then per group
//! `<A|E|D> <#selector status words> [words] <#paths> <#path status words>` and per path
//! `<dev> <A|F> <fail_count> [selector words]`. `queue_io` is 1 while I/O is being queued for
//! lack of a path; `pg_init_count` is always 0.
//!
//! The table prints back in dm's TABLE form (`args`): features in dm's order (then stackbd's
//! `no_path_retry N` and a non-default `checker_interval_ms`), every path's selector arguments
//! spelled out, and the current group as `initial_pg`. Unlike dm, historical-service-time paths
//! print their `repeat_count` (dm prints 0), so the table reloads as it was.
//!
//! Data path: `map` and `end_io` take no lock and allocate nothing. A path error (`PathError`,
//! `Timeout`) fails the path and sends the bio back to be mapped again (`Endio::Requeue`); any
//! other error is the caller's. With no usable path, I/O is requeued while queueing is on
//! (`MapResult::Requeue`; a `NOWAIT` bio gets `Again` instead), else fails with `IoError`. A
//! flushing suspend (`presuspend(false)`) turns queueing off until `resume`, so the volume can
//! drain.
//!
//! State, and who touches it:
//!
//! - **Selector load: per reactor.** Each reactor keeps its own counters for every path (I/Os
//!   and bytes in flight, the historical-service-time estimate) and its own round-robin
//!   position per group, as plain integers in its per-reactor state (`reactor_state`, see
//!   [`state`]); `map` and `end_io` update only those (a bio completes on the reactor that
//!   mapped it). So `queue-length`, `service-time` and `historical-service-time` decide on the
//!   load *this reactor* put on each path; the I/O other reactors have in flight is not seen.
//!   That is the per-CPU view a kernel driver would take, with the reactor as the CPU, and it
//!   is acceptable: each reactor balances its own I/O, so the paths' total load is balanced up
//!   to the imbalance between the reactors' own loads; a slow or stalled path is seen by every
//!   reactor that sends it I/O, since that reactor's own I/O piles up there (queue-length
//!   avoids such a path after one I/O); and the alternative, counters every reactor shares,
//!   costs a contended cache line and a read-modify-write per I/O for a better estimate.
//!   Round-robin keeps its exact `repeat_count` rotation per reactor. `status` adds up what the
//!   reactors publish (I/Os and bytes in flight: the sum; the estimate: the latest sample).
//! - **Path health: shared, rarely written.** Active/failed flags, fail counts, active counts
//!   per group and overall, the current group, bypassed groups and the no-path mode are atomics
//!   in one shared struct. They change only on a path error, a message or a checker verdict, so
//!   the data path reads them with relaxed loads of cache lines that nobody writes in steady
//!   state. A reactor may see a change a moment late: one more I/O goes down a path just failed
//!   (it completes, or comes back with a path error and is mapped again), or a requeued bio
//!   waits one more requeue delay for a reinstated path. Nothing else is ordered by these
//!   flags. Writers (the control path, the checker, a reactor failing a path on a path error)
//!   flip a path's flag with a compare-and-swap, so its counts change once per transition;
//!   control-path changes are serialised by a lock the data path never takes.
//!
//! Path checker: see [`checker`]. `activate` starts it on a service thread
//! (`mpath-check-<volume>`); paths that are volumes (`queue_mode bio`) are not probed: only
//! `reinstate_path` brings them back.

mod checker;
pub mod selector;
mod state;
mod table;

pub use checker::MAX_PROBE_TIMEOUT;
use selector::{PathArgs, Selector};
use stackbd_core::engine::Events;
use stackbd_core::leaf::Leaf;
use stackbd_core::target::{TargetEnv, TargetExtent};
use stackbd_core::{
    Bio, BioFlags, DevId, DevRef, Endio, Limits, MapResult, ReactorInit, Sector, Service, Status,
    Target, TargetCx, SECTOR_SIZE,
};
use state::{ReactorState, Reactors};
use std::any::Any;
use std::fmt;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The path checker's default period.
pub const DEFAULT_CHECKER_INTERVAL_MS: u64 = 1000;

/// What happens to I/O when no path is usable.
const NO_PATH_FAIL: u8 = 0;
const NO_PATH_QUEUE: u8 = 1;
const NO_PATH_RETRY: u8 = 2;

/// No current group.
const NO_GROUP: usize = usize::MAX;

/// How the table maps I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueMode {
    /// Request-based: a request queue merges bios first; paths must be leaves.
    Rq,
    /// Bio-based: bios are mapped as they come; paths may be volumes.
    Bio,
}

/// This target's frame on each bio it maps.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Frame {
    /// The target-relative sector `map` saw, to map the bio again after a path error.
    sector: u64,
    /// When `map` ran (ns on the target's clock), for historical-service-time; else 0.
    start: u64,
    /// Length at map time, for the selector's byte accounting.
    sectors: u32,
    /// Index of the path in `Shared::paths`.
    path: u32,
}

#[derive(Debug)]
struct Path {
    dev: DevRef,
    /// The leaf under this path, for the checker's probes (None for a volume).
    leaf: Option<Arc<dyn Leaf>>,
    group: usize,
    active: AtomicBool,
    fail_count: AtomicU32,
    /// The path's selector arguments (its load is per reactor: [`state`]).
    args: PathArgs,
}

#[derive(Debug)]
struct Group {
    sel: Selector,
    /// The group's paths are `Shared::paths[first..first + n]`.
    first: usize,
    n: usize,
    bypassed: AtomicBool,
    /// Active paths in this group.
    active: AtomicUsize,
}

/// State shared by the data path, the control path and the checker (path health: see the
/// module docs).
#[derive(Debug)]
struct Shared {
    groups: Vec<Group>,
    paths: Vec<Path>,
    /// Index of the current group, or `NO_GROUP`.
    current: AtomicUsize,
    /// Active paths in all groups.
    valid: AtomicUsize,
    /// `NO_PATH_FAIL`, `NO_PATH_QUEUE` or `NO_PATH_RETRY`.
    no_path: AtomicU8,
    /// `no_path_retry N`: N (kept when messages switch the mode, for the table's history).
    retry_count: u32,
    /// How long `no_path_retry` queues: N checker intervals, in ns.
    retry_ns: u64,
    interval: Duration,
    /// When the last path went down (ns on the clock, plus one); 0 while a path is up.
    down_since: AtomicU64,
    /// The no_path_retry expiry was reported (once per outage).
    expiry_reported: AtomicBool,
    /// A normal (flushing) suspend is under way: I/O with no path fails instead of queueing.
    flush_suspend: AtomicBool,
    /// Some group's selector reads the clock in `map`.
    clock: bool,
    epoch: Instant,
    events: OnceLock<Arc<Events>>,
    volume: OnceLock<String>,
    /// Serialises control-path changes (messages, status, checker).
    ctl: Mutex<()>,
    /// What each reactor published of its load, for `status`.
    reactors: Reactors,
}

/// Constructor settings kept for `args()`.
#[derive(Debug, Clone)]
struct Config {
    queue_mode: QueueMode,
    pg_init_retries: u32,
    pg_init_delay_msecs: Option<u32>,
    retain_attached_hw_handler: bool,
    checker_interval_ms: u64,
    /// The hardware handler words as given (name first), empty for none.
    hw_handler: Vec<String>,
    start: Sector,
}

/// A multipath target instance.
#[derive(Debug)]
pub struct Multipath {
    shared: Arc<Shared>,
    cfg: Config,
    /// The path checker's service thread while the table is live.
    checker: Mutex<Option<Service>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Nanoseconds since the target was built (never 0 in practice, but callers add 1 where 0
    /// means "unset").
    #[inline]
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn volume(&self) -> &str {
        self.volume.get().map_or("?", String::as_str)
    }

    fn raise(&self) {
        if let Some(e) = self.events.get() {
            e.raise();
        }
    }

    /// A path of group `g` for an I/O of `bytes`, if the group has an active one, chosen on
    /// reactor state `st`.
    #[inline]
    fn pick_in(&self, st: &mut ReactorState, g: usize, bytes: u64, now: u64) -> Option<usize> {
        let grp = &self.groups[g];
        if grp.active.load(Relaxed) == 0 {
            return None;
        }
        let range = grp.first..grp.first + grp.n;
        let paths = &self.paths[range.clone()];
        grp.sel
            .select(
                &mut st.tickets[g],
                &st.loads[range],
                |i| paths[i].active.load(Relaxed),
                |i| &paths[i].args,
                bytes,
                now,
            )
            .map(|i| grp.first + i)
    }

    /// The path for the next I/O: in the current group while it has an active path, else in
    /// the first enabled group with one (which becomes current), else in a disabled one.
    #[inline]
    fn pick(&self, st: &mut ReactorState, bytes: u64, now: u64) -> Option<usize> {
        if self.valid.load(Relaxed) == 0 {
            return None;
        }
        let cur = self.current.load(Relaxed);
        if cur < self.groups.len() {
            if let Some(p) = self.pick_in(st, cur, bytes, now) {
                return Some(p);
            }
        }
        for bypassed in [false, true] {
            for g in 0..self.groups.len() {
                if g == cur || self.groups[g].bypassed.load(Relaxed) != bypassed {
                    continue;
                }
                if let Some(p) = self.pick_in(st, g, bytes, now) {
                    self.current.store(g, Relaxed);
                    return Some(p);
                }
            }
        }
        None
    }

    /// The group `pick` would move to: the first enabled group with an active path, else the
    /// first disabled one with one.
    fn first_usable(&self) -> Option<usize> {
        [false, true].into_iter().find_map(|bypassed| {
            (0..self.groups.len()).find(|&g| {
                let grp = &self.groups[g];
                grp.bypassed.load(Relaxed) == bypassed && grp.active.load(Relaxed) > 0
            })
        })
    }

    /// Control path: moves `current` off a group with no active path, as the next I/O would.
    fn refresh_current(&self) {
        let cur = self.current.load(Relaxed);
        if cur < self.groups.len() && self.groups[cur].active.load(Relaxed) > 0 {
            return;
        }
        if let Some(g) = self.first_usable() {
            self.current.store(g, Relaxed);
        }
    }

    /// Takes a path out of use. Returns false if it already was.
    fn fail_path(&self, i: usize, why: impl fmt::Display) -> bool {
        let p = &self.paths[i];
        if p.active
            .compare_exchange(true, false, AcqRel, Relaxed)
            .is_err()
        {
            return false;
        }
        p.fail_count.fetch_add(1, Relaxed);
        self.groups[p.group].active.fetch_sub(1, Relaxed);
        let left = self.valid.fetch_sub(1, AcqRel) - 1;
        if left == 0 {
            self.down_since.store(self.now() + 1, Relaxed);
        }
        tracing::warn!(
            volume = self.volume(),
            path = %p.dev,
            remaining = left,
            "multipath: failing path ({why})"
        );
        self.raise();
        true
    }

    /// Puts a failed path back in use. Returns false if it was active.
    fn reinstate_path(&self, i: usize, why: impl fmt::Display) -> bool {
        let p = &self.paths[i];
        if p.active
            .compare_exchange(false, true, AcqRel, Relaxed)
            .is_err()
        {
            return false;
        }
        self.groups[p.group].active.fetch_add(1, Relaxed);
        if self.valid.fetch_add(1, AcqRel) == 0 {
            self.down_since.store(0, Relaxed);
            self.expiry_reported.store(false, Relaxed);
        }
        tracing::info!(
            volume = self.volume(),
            path = %p.dev,
            "multipath: reinstating path ({why})"
        );
        self.raise();
        true
    }

    /// `no_path_retry N`: true once N checker intervals passed since the last path went down.
    fn retry_expired(&self) -> bool {
        if self.valid.load(Relaxed) > 0 {
            return false;
        }
        let now = self.now() + 1;
        let since = match self.down_since.compare_exchange(0, now, Relaxed, Relaxed) {
            Ok(_) => now,
            Err(d) => d,
        };
        now.saturating_sub(since) >= self.retry_ns
    }

    /// Whether I/O with no usable path waits (requeued) rather than fails.
    #[inline]
    fn queueing(&self) -> bool {
        if self.flush_suspend.load(Relaxed) {
            return false;
        }
        match self.no_path.load(Relaxed) {
            NO_PATH_QUEUE => true,
            NO_PATH_RETRY => !self.retry_expired(),
            _ => false,
        }
    }

    /// What `map` answers when no path is usable.
    #[inline]
    fn no_path(&self, flags: BioFlags) -> MapResult {
        if !self.queueing() {
            MapResult::Done(Status::IoError)
        } else if flags.contains(BioFlags::NOWAIT) {
            MapResult::Done(Status::Again)
        } else {
            MapResult::Requeue
        }
    }
}

impl Target for Multipath {
    fn kind(&self) -> &'static str {
        "multipath"
    }

    #[inline]
    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        let s = &*self.shared;
        let now = if s.clock { s.now() } else { 0 };
        let bytes = bio.sectors as u64 * SECTOR_SIZE as u64;
        let st = cx.state::<ReactorState>();
        let Some(i) = s.pick(st, bytes, now) else {
            return s.no_path(bio.flags);
        };
        let p = &s.paths[i];
        s.groups[p.group].sel.start_io(&mut st.loads[i], bytes);
        st.publish(i);
        cx.push(
            bio,
            &Frame {
                sector: bio.sector,
                start: now,
                sectors: bio.sectors,
                path: i as u32,
            },
        );
        bio.dev = p.dev.id;
        MapResult::Remapped
    }

    #[inline]
    fn end_io(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> Endio {
        let s = &*self.shared;
        let f: Frame = bio.popped_ctx();
        let i = f.path as usize;
        let p = &s.paths[i];
        let g = &s.groups[p.group];
        let now = if g.sel.kind.needs_clock() { s.now() } else { 0 };
        let st = cx.state::<ReactorState>();
        g.sel.end_io(
            &mut st.loads[i],
            f.sectors as u64 * SECTOR_SIZE as u64,
            f.start,
            now,
            g.active.load(Relaxed) as u64,
        );
        st.publish(i);
        if bio.status.is_path_error() {
            s.fail_path(i, bio.status);
            bio.sector = f.sector;
            return Endio::Requeue;
        }
        Endio::Done
    }

    fn reactor_state(&self, init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        let s = &*self.shared;
        Some(Box::new(s.reactors.state(
            init.reactor,
            s.groups.len(),
            s.paths.len(),
        )))
    }

    fn frame_bytes(&self) -> usize {
        std::mem::size_of::<Frame>()
    }

    fn flush_devices(&self) -> Vec<DevId> {
        // One flush for the whole target; `map` sends it down a path like any bio.
        self.shared
            .paths
            .first()
            .map(|p| p.dev.id)
            .into_iter()
            .collect()
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        let mut l = Limits::TOP;
        for p in &self.shared.paths {
            let c = child(p.dev.id);
            l.stack(&c);
            l.check_alignment(&c, 0);
            if !(self.cfg.start * SECTOR_SIZE as u64).is_multiple_of(c.logical_block_bytes as u64) {
                l.misaligned = true;
            }
        }
        // A copy could fail over between paths mid-way: copies are emulated above multipath.
        l.max_copy_sectors = 0;
        l.copy_native = false;
        l
    }

    fn extent(&self, offset: Sector, len: Sector) -> TargetExtent {
        let s = &*self.shared;
        let cur = s.current.load(Relaxed);
        let in_current = s.groups.get(cur).and_then(|g| {
            s.paths[g.first..g.first + g.n]
                .iter()
                .find(|p| p.active.load(Relaxed))
        });
        let p = in_current
            .or_else(|| s.paths.iter().find(|p| p.active.load(Relaxed)))
            .or_else(|| s.paths.first());
        match p {
            Some(p) => TargetExtent::Dev {
                dev: p.dev.id,
                sector: offset,
                len,
            },
            None => TargetExtent::Data { len },
        }
    }

    fn devices(&self) -> Vec<DevId> {
        self.shared.paths.iter().map(|p| p.dev.id).collect()
    }

    /// dm's TABLE format: the constructor line, with the current group as `initial_pg`, the
    /// queueing mode as messages left it, and every path's selector arguments spelled out.
    fn args(&self) -> String {
        self.table_line()
    }

    fn status(&self) -> String {
        self.info()
    }

    fn message(&self, argv: &[&str]) -> Result<String, String> {
        self.handle_message(argv)
    }

    fn presuspend(&self, noflush: bool) {
        // A flushing suspend must drain: I/O with no path fails instead of waiting for one.
        if !noflush {
            self.shared.flush_suspend.store(true, Relaxed);
        }
    }

    fn resume(&self) {
        self.shared.flush_suspend.store(false, Relaxed);
    }

    fn request_based(&self) -> bool {
        self.cfg.queue_mode == QueueMode::Rq
    }

    fn activate(&self, env: &TargetEnv) {
        let _ = self.shared.events.set(env.events.clone());
        let _ = self.shared.volume.set(env.volume.clone());
        let mut h = lock(&self.checker);
        if h.is_some() {
            return;
        }
        match checker::start(self.shared.clone(), &env.volume) {
            Ok(svc) => *h = Some(svc),
            Err(e) => tracing::error!(
                volume = %env.volume,
                "multipath: cannot start the path checker: {e}"
            ),
        }
    }

    fn deactivate(&self) {
        self.stop_checker();
    }
}

impl Multipath {
    /// Stops and joins the path checker, if it runs.
    fn stop_checker(&self) {
        // Out of the lock before stopping: the stop joins the thread.
        let svc = lock(&self.checker).take();
        drop(svc);
    }
}

impl Drop for Multipath {
    fn drop(&mut self) {
        self.stop_checker();
    }
}
