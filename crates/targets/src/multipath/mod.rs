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
//! Data path: `map` and `end_io` take no lock and allocate nothing; path states and selector
//! counters are atomics. A path error (`PathError`, `Timeout`) fails the path and sends the bio
//! back to be mapped again (`Endio::Requeue`); any other error is the caller's. With no usable
//! path, I/O is requeued while queueing is on (`MapResult::Requeue`; a `NOWAIT` bio gets
//! `Again` instead), else fails with `IoError`. A flushing suspend (`presuspend(false)`) turns
//! queueing off until `resume`, so the volume can drain.
//!
//! Path checker: `activate` starts a thread (`mpath-check-<volume>`) that probes every leaf path
//! each `checker_interval_ms` (`Leaf::probe`, timeout the interval, at most 5 s), fails paths
//! that do not answer and reinstates those that do (including paths failed by message). Paths
//! that are volumes (`queue_mode bio`) are not probed: only `reinstate_path` brings them back.

pub mod selector;

use selector::{Kind, PathLoad, Selector};
use stackbd_core::engine::Events;
use stackbd_core::leaf::Leaf;
use stackbd_core::target::{parse_num, TargetEnv, TargetExtent};
use stackbd_core::{
    ArgError, Bio, BioFlags, CtorCx, DevId, DevRef, Endio, Limits, MapResult, Sector, Status,
    Target, TargetCx, SECTOR_SIZE,
};
use std::fmt::{self, Write as _};
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The path checker's default period.
pub const DEFAULT_CHECKER_INTERVAL_MS: u64 = 1000;
/// The longest a probe may take, whatever the interval.
pub const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

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
    load: PathLoad,
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

/// State shared by the data path, the control path and the checker thread.
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
    /// Checker stop flag and its wake-up.
    stop: Mutex<bool>,
    wake: Condvar,
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
    checker: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the table's words in order, with errors that name the field.
struct Words<'a> {
    args: &'a [&'a str],
    pos: usize,
}

impl<'a> Words<'a> {
    fn next(&mut self, field: &str, context: &str) -> Result<&'a str, ArgError> {
        let w = self.args.get(self.pos).ok_or_else(|| {
            ArgError::new(field, format!("missing{context}: the table ends early"))
        })?;
        self.pos += 1;
        Ok(w)
    }

    fn num<T: std::str::FromStr>(&mut self, field: &str, context: &str) -> Result<T, ArgError> {
        let w = self.next(field, context)?;
        parse_num(field, w).map_err(|e| ArgError::new(field, format!("{}{context}", e.reason)))
    }

    fn take(&mut self, n: usize, field: &str, context: &str) -> Result<&'a [&'a str], ArgError> {
        let left = self.args.len() - self.pos;
        if left < n {
            return Err(ArgError::new(
                field,
                format!("{n} words announced{context}, only {left} left in the table"),
            ));
        }
        let s = &self.args[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
}

fn keyword(w: &str, k: &str) -> bool {
    w.eq_ignore_ascii_case(k)
}

impl Multipath {
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        Ok(Box::new(Multipath::new(cx, args)?))
    }

    fn new(cx: &CtorCx<'_>, args: &[&str]) -> Result<Multipath, ArgError> {
        let mut w = Words { args, pos: 0 };

        // Features.
        let nfeat: usize = w.num("#features", "")?;
        let feats = w.take(nfeat, "#features", " by #features")?;
        let mut cfg = Config {
            queue_mode: QueueMode::Rq,
            pg_init_retries: 0,
            pg_init_delay_msecs: None,
            retain_attached_hw_handler: false,
            checker_interval_ms: DEFAULT_CHECKER_INTERVAL_MS,
            hw_handler: Vec::new(),
            start: cx.start,
        };
        let mut no_path = NO_PATH_FAIL;
        let mut retry_count = 0u32;
        let mut f = Words {
            args: feats,
            pos: 0,
        };
        while f.pos < feats.len() {
            let name = f.next("features", "")?;
            if keyword(name, "queue_if_no_path") {
                no_path = NO_PATH_QUEUE;
            } else if keyword(name, "retain_attached_hw_handler") {
                cfg.retain_attached_hw_handler = true;
            } else if keyword(name, "no_path_retry") {
                let v = f.next("no_path_retry", " (a count, 'queue' or 'fail')")?;
                if keyword(v, "queue") {
                    no_path = NO_PATH_QUEUE;
                } else if keyword(v, "fail") {
                    no_path = NO_PATH_FAIL;
                } else {
                    let n: u32 = parse_num("no_path_retry", v).map_err(|_| {
                        ArgError::new(
                            "no_path_retry",
                            format!("'{v}' is not a count of checker intervals, 'queue' or 'fail'"),
                        )
                    })?;
                    if n == 0 {
                        no_path = NO_PATH_FAIL;
                    } else {
                        no_path = NO_PATH_RETRY;
                        retry_count = n;
                    }
                }
            } else if keyword(name, "queue_mode") {
                let v = f.next("queue_mode", " (rq or bio)")?;
                cfg.queue_mode = if keyword(v, "rq") {
                    QueueMode::Rq
                } else if keyword(v, "bio") {
                    QueueMode::Bio
                } else {
                    return Err(ArgError::new(
                        "queue_mode",
                        format!("unknown queue mode '{v}' (rq or bio)"),
                    ));
                };
            } else if keyword(name, "checker_interval_ms") {
                let n: u64 = f.num("checker_interval_ms", "")?;
                if !(1..=3_600_000).contains(&n) {
                    return Err(ArgError::new(
                        "checker_interval_ms",
                        format!("{n} is not in 1..=3600000"),
                    ));
                }
                cfg.checker_interval_ms = n;
            } else if keyword(name, "pg_init_retries") {
                let n: u32 = f.num("pg_init_retries", "")?;
                if !(1..=50).contains(&n) {
                    return Err(ArgError::new(
                        "pg_init_retries",
                        format!("{n} is not in 1..=50"),
                    ));
                }
                cfg.pg_init_retries = n;
            } else if keyword(name, "pg_init_delay_msecs") {
                let n: u32 = f.num("pg_init_delay_msecs", "")?;
                if n > 60_000 {
                    return Err(ArgError::new(
                        "pg_init_delay_msecs",
                        format!("{n} is not in 0..=60000"),
                    ));
                }
                cfg.pg_init_delay_msecs = Some(n);
            } else {
                return Err(ArgError::new(
                    "features",
                    format!(
                        "unknown feature '{name}' (queue_if_no_path, no_path_retry, queue_mode, \
                         checker_interval_ms, pg_init_retries, pg_init_delay_msecs, \
                         retain_attached_hw_handler)"
                    ),
                ));
            }
        }

        // Hardware handler: kept for the table, no effect.
        let nhw: usize = w.num("#hw_handler_args", "")?;
        let hw = w.take(nhw, "#hw_handler_args", " by #hw_handler_args")?;
        cfg.hw_handler = hw.iter().map(|s| s.to_string()).collect();
        if let Some(name) = hw.first() {
            tracing::info!(
                handler = %name,
                "multipath: hardware handler accepted; stackbd has none, it has no effect"
            );
        }

        // Priority groups.
        let npgs: usize = w.num("#pgs", "")?;
        if npgs > 1024 {
            return Err(ArgError::new("#pgs", format!("{npgs} is more than 1024")));
        }
        let initial: usize = w.num("initial_pg", "")?;
        if npgs == 0 && initial != 0 {
            return Err(ArgError::new(
                "initial_pg",
                format!("{initial} names a group, but there are none (#pgs is 0; use 0)"),
            ));
        }
        if npgs > 0 && !(1..=npgs).contains(&initial) {
            return Err(ArgError::new(
                "initial_pg",
                format!("{initial} is not a group: groups are numbered 1..={npgs}"),
            ));
        }
        let mut groups = Vec::with_capacity(npgs);
        let mut paths: Vec<Path> = Vec::new();
        for g in 0..npgs {
            let ctx = format!(" for priority group {} of {npgs}", g + 1);
            let name = w.next("selector", &ctx)?;
            let kind = Kind::from_name(name).ok_or_else(|| {
                ArgError::new(
                    "selector",
                    format!(
                        "unknown path selector '{name}'{ctx} (round-robin, queue-length, \
                         service-time, historical-service-time)"
                    ),
                )
            })?;
            let nsel: usize = w.num("#selector_args", &ctx)?;
            let sel_args = w.take(nsel, "#selector_args", &ctx)?;
            let sel = Selector::new(kind, sel_args)?;
            let npaths: usize = w.num("#paths", &ctx)?;
            if !(1..=1024).contains(&npaths) {
                return Err(ArgError::new(
                    "#paths",
                    format!("{npaths}{ctx}: a group has 1..=1024 paths"),
                ));
            }
            let npargs: usize = w.num("#path_args", &ctx)?;
            if npargs > kind.max_path_args() {
                return Err(ArgError::new(
                    "#path_args",
                    format!(
                        "{npargs}{ctx}: {} takes at most {} argument{} per path ({})",
                        kind.name(),
                        kind.max_path_args(),
                        if kind.max_path_args() == 1 { "" } else { "s" },
                        match kind {
                            Kind::ServiceTime => "[repeat_count [relative_throughput]]",
                            _ => "[repeat_count]",
                        }
                    ),
                ));
            }
            let first = paths.len();
            for _ in 0..npaths {
                let dev = w.next("path", &ctx)?;
                let pargs = w.take(npargs, "#path_args", &format!(" for path '{dev}'"))?;
                let load = sel.path(pargs)?;
                if let Some(p) = paths.iter().find(|p| p.dev.name == dev) {
                    return Err(ArgError::new(
                        "path",
                        format!(
                            "'{dev}' is listed twice (groups {} and {})",
                            p.group + 1,
                            g + 1
                        ),
                    ));
                }
                let (dev, info) = cx.device("path", dev, 0, cx.len)?;
                if cfg.queue_mode == QueueMode::Rq && info.leaf.is_none() {
                    return Err(ArgError::new(
                        "path",
                        format!(
                            "queue_mode rq maps requests onto leaves; '{dev}' is a volume \
                             (use queue_mode bio)"
                        ),
                    ));
                }
                paths.push(Path {
                    dev,
                    leaf: info.leaf,
                    group: g,
                    active: AtomicBool::new(true),
                    fail_count: AtomicU32::new(0),
                    load,
                });
            }
            groups.push(Group {
                sel,
                first,
                n: npaths,
                bypassed: AtomicBool::new(false),
                active: AtomicUsize::new(npaths),
            });
        }
        if w.pos < args.len() {
            return Err(ArgError::new(
                "#pgs",
                format!(
                    "'{}' follows the last of the {npgs} priority groups",
                    args[w.pos..].join(" ")
                ),
            ));
        }

        let interval = Duration::from_millis(cfg.checker_interval_ms);
        let clock = groups.iter().any(|g| g.sel.kind.needs_clock());
        let valid = paths.len();
        Ok(Multipath {
            shared: Arc::new(Shared {
                groups,
                paths,
                current: AtomicUsize::new(if npgs == 0 { NO_GROUP } else { initial - 1 }),
                valid: AtomicUsize::new(valid),
                no_path: AtomicU8::new(no_path),
                retry_count,
                retry_ns: (interval.as_nanos() as u64).saturating_mul(retry_count as u64),
                interval,
                down_since: AtomicU64::new(0),
                expiry_reported: AtomicBool::new(false),
                flush_suspend: AtomicBool::new(false),
                clock,
                epoch: Instant::now(),
                events: OnceLock::new(),
                volume: OnceLock::new(),
                ctl: Mutex::new(()),
                stop: Mutex::new(false),
                wake: Condvar::new(),
            }),
            cfg,
            checker: Mutex::new(None),
        })
    }

    /// Stops and joins the path checker, if it runs.
    fn stop_checker(&self) {
        let handle = lock(&self.checker).take();
        if let Some(h) = handle {
            *lock(&self.shared.stop) = true;
            self.shared.wake.notify_all();
            let _ = h.join();
        }
    }

    fn group_arg(&self, msg: &str, n: &str) -> Result<usize, String> {
        let ng = self.shared.groups.len();
        match n.parse::<usize>() {
            Ok(g) if (1..=ng).contains(&g) => Ok(g - 1),
            _ if ng == 0 => Err(format!("{msg}: there are no priority groups")),
            _ => Err(format!("{msg}: '{n}' is not a priority group (1..={ng})")),
        }
    }

    fn path_arg(&self, msg: &str, dev: &str) -> Result<usize, String> {
        self.shared
            .paths
            .iter()
            .position(|p| p.dev.name == dev)
            .ok_or_else(|| {
                let names: Vec<&str> = self
                    .shared
                    .paths
                    .iter()
                    .map(|p| p.dev.name.as_str())
                    .collect();
                format!(
                    "{msg}: '{dev}' is not a path of this multipath (paths: {})",
                    names.join(", ")
                )
            })
    }
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

    /// A path of group `g` for an I/O of `bytes`, if the group has an active one.
    #[inline]
    fn pick_in(&self, g: usize, bytes: u64, now: u64) -> Option<usize> {
        let grp = &self.groups[g];
        if grp.active.load(Relaxed) == 0 {
            return None;
        }
        let paths = &self.paths[grp.first..grp.first + grp.n];
        grp.sel
            .select(
                grp.n,
                |i| paths[i].active.load(Relaxed),
                |i| &paths[i].load,
                bytes,
                now,
            )
            .map(|i| grp.first + i)
    }

    /// The path for the next I/O: in the current group while it has an active path, else in
    /// the first enabled group with one (which becomes current), else in a disabled one.
    #[inline]
    fn pick(&self, bytes: u64, now: u64) -> Option<usize> {
        if self.valid.load(Relaxed) == 0 {
            return None;
        }
        let cur = self.current.load(Relaxed);
        if cur < self.groups.len() {
            if let Some(p) = self.pick_in(cur, bytes, now) {
                return Some(p);
            }
        }
        for bypassed in [false, true] {
            for g in 0..self.groups.len() {
                if g == cur || self.groups[g].bypassed.load(Relaxed) != bypassed {
                    continue;
                }
                if let Some(p) = self.pick_in(g, bytes, now) {
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

    /// Sleeps for `d` or until told to stop; false if stopping.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut stop = lock(&self.stop);
        loop {
            if *stop {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            stop = self
                .wake
                .wait_timeout(stop, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn stopping(&self) -> bool {
        *lock(&self.stop)
    }

    /// A probe's verdict on path `i`: reinstate it if it answers, fail it if not.
    fn apply_probe(&self, i: usize, r: Result<(), String>) {
        let p = &self.paths[i];
        let _g = lock(&self.ctl);
        match r {
            Ok(()) => {
                if !p.active.load(Relaxed) {
                    self.reinstate_path(i, "path checker: the device answers");
                }
            }
            Err(e) => {
                if p.active.load(Relaxed) {
                    self.fail_path(i, format_args!("path checker: {e}"));
                }
            }
        }
    }

    /// One round of the path checker: probe every leaf path, fail the ones that do not answer
    /// and reinstate the ones that do; then the no_path_retry clock. The probes run side by
    /// side, one thread each, and each verdict applies as soon as it is in: a round takes one
    /// probe timeout however many paths hang, and a path refused at once fails at once.
    fn check_paths(&self, timeout: Duration) {
        std::thread::scope(|sc| {
            let (tx, rx) = std::sync::mpsc::channel();
            for (i, p) in self.paths.iter().enumerate() {
                let Some(leaf) = p.leaf.as_deref() else {
                    continue;
                };
                let tx = tx.clone();
                let spawned = std::thread::Builder::new()
                    .name("mp-probe".into())
                    .spawn_scoped(sc, move || {
                        let _ = tx.send((i, leaf.probe(timeout)));
                    });
                if spawned.is_err() {
                    // No thread to be had: probe from this one.
                    self.apply_probe(i, leaf.probe(timeout));
                }
            }
            drop(tx);
            // Ends when every probe has answered (a probe that panicked just drops its sender).
            for (i, r) in rx {
                if self.stopping() {
                    return;
                }
                self.apply_probe(i, r);
            }
        });
        if self.stopping() {
            return;
        }
        let _g = lock(&self.ctl);
        self.refresh_current();
        if self.no_path.load(Relaxed) == NO_PATH_RETRY
            && self.retry_expired()
            && !self.expiry_reported.swap(true, Relaxed)
        {
            tracing::warn!(
                volume = self.volume(),
                "multipath: no path for {} checker intervals (no_path_retry): failing I/O until a path is back",
                self.retry_count
            );
            self.raise();
        }
    }
}

fn checker_loop(s: Arc<Shared>) {
    let timeout = s.interval.min(MAX_PROBE_TIMEOUT);
    while s.sleep(s.interval) {
        s.check_paths(timeout);
    }
}

impl Drop for Multipath {
    fn drop(&mut self) {
        self.stop_checker();
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
        let Some(i) = s.pick(bytes, now) else {
            return s.no_path(bio.flags);
        };
        let p = &s.paths[i];
        s.groups[p.group].sel.start_io(&p.load, bytes);
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
    fn end_io(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> Endio {
        let s = &*self.shared;
        let f: Frame = bio.popped_ctx();
        let i = f.path as usize;
        let p = &s.paths[i];
        let g = &s.groups[p.group];
        let now = if g.sel.kind.needs_clock() { s.now() } else { 0 };
        g.sel.end_io(
            &p.load,
            f.sectors as u64 * SECTOR_SIZE as u64,
            f.start,
            now,
            g.active.load(Relaxed) as u64,
        );
        if bio.status.is_path_error() {
            s.fail_path(i, bio.status);
            bio.sector = f.sector;
            return Endio::Requeue;
        }
        Endio::Done
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
        let s = &*self.shared;
        let _g = lock(&s.ctl);
        s.refresh_current();
        let mut feats: Vec<String> = Vec::new();
        match s.no_path.load(Relaxed) {
            NO_PATH_QUEUE => feats.push("queue_if_no_path".into()),
            NO_PATH_RETRY => {
                feats.push("no_path_retry".into());
                feats.push(s.retry_count.to_string());
            }
            _ => {}
        }
        if self.cfg.pg_init_retries > 0 {
            feats.push("pg_init_retries".into());
            feats.push(self.cfg.pg_init_retries.to_string());
        }
        if let Some(d) = self.cfg.pg_init_delay_msecs {
            feats.push("pg_init_delay_msecs".into());
            feats.push(d.to_string());
        }
        if self.cfg.retain_attached_hw_handler {
            feats.push("retain_attached_hw_handler".into());
        }
        if self.cfg.queue_mode == QueueMode::Bio {
            feats.push("queue_mode".into());
            feats.push("bio".into());
        }
        if self.cfg.checker_interval_ms != DEFAULT_CHECKER_INTERVAL_MS {
            feats.push("checker_interval_ms".into());
            feats.push(self.cfg.checker_interval_ms.to_string());
        }
        let mut o = feats.len().to_string();
        for f in &feats {
            o.push(' ');
            o.push_str(f);
        }
        let _ = write!(o, " {}", self.cfg.hw_handler.len());
        for w in &self.cfg.hw_handler {
            o.push(' ');
            o.push_str(w);
        }
        let _ = write!(o, " {} {}", s.groups.len(), self.current_pg());
        for g in &s.groups {
            let _ = write!(o, " {} ", g.sel.kind.name());
            g.sel.table_words(&mut o);
            let _ = write!(o, " {} {}", g.n, g.sel.kind.table_args());
            for p in &s.paths[g.first..g.first + g.n] {
                let _ = write!(o, " {} ", p.dev);
                g.sel.path_table_words(&p.load, &mut o);
            }
        }
        o
    }

    /// dm's INFO format (see the module docs).
    fn status(&self) -> String {
        let s = &*self.shared;
        let _g = lock(&s.ctl);
        s.refresh_current();
        let queue_io = s.valid.load(Relaxed) == 0 && s.queueing();
        let mut o = format!(
            "2 {} 0 0 {} {}",
            queue_io as u8,
            s.groups.len(),
            self.current_pg()
        );
        let cur = s.current.load(Relaxed);
        for (gi, g) in s.groups.iter().enumerate() {
            let state = if g.bypassed.load(Relaxed) {
                'D'
            } else if gi == cur {
                'A'
            } else {
                'E'
            };
            let _ = write!(o, " {state} ");
            g.sel.table_words(&mut o);
            let _ = write!(o, " {} {}", g.n, g.sel.kind.info_args());
            for p in &s.paths[g.first..g.first + g.n] {
                let _ = write!(
                    o,
                    " {} {} {}",
                    p.dev,
                    if p.active.load(Relaxed) { 'A' } else { 'F' },
                    p.fail_count.load(Relaxed)
                );
                g.sel.path_info_words(&p.load, &mut o);
            }
        }
        o
    }

    fn message(&self, argv: &[&str]) -> Result<String, String> {
        let s = &*self.shared;
        let _g = lock(&s.ctl);
        let Some((&msg, rest)) = argv.split_first() else {
            return Err("multipath: empty message".into());
        };
        let want = |n: usize, usage: &str| -> Result<(), String> {
            if rest.len() == n {
                Ok(())
            } else {
                Err(format!("multipath: usage: {usage}"))
            }
        };
        match msg {
            "queue_if_no_path" => {
                want(0, "queue_if_no_path")?;
                s.no_path.store(NO_PATH_QUEUE, Relaxed);
            }
            "fail_if_no_path" => {
                want(0, "fail_if_no_path")?;
                s.no_path.store(NO_PATH_FAIL, Relaxed);
            }
            "fail_path" => {
                want(1, "fail_path <device>")?;
                let i = self.path_arg(msg, rest[0])?;
                s.fail_path(i, "message");
                s.refresh_current();
            }
            "reinstate_path" => {
                want(1, "reinstate_path <device>")?;
                let i = self.path_arg(msg, rest[0])?;
                s.reinstate_path(i, "message");
                s.refresh_current();
            }
            "switch_group" => {
                want(1, "switch_group <group number>")?;
                let g = self.group_arg(msg, rest[0])?;
                for grp in &s.groups {
                    grp.bypassed.store(false, Relaxed);
                }
                s.current.store(g, Relaxed);
                s.raise();
            }
            "enable_group" | "disable_group" => {
                want(1, &format!("{msg} <group number>"))?;
                let g = self.group_arg(msg, rest[0])?;
                s.groups[g].bypassed.store(msg == "disable_group", Relaxed);
                // As dm: the next I/O chooses the group again, by priority.
                if let Some(n) = s.first_usable() {
                    s.current.store(n, Relaxed);
                }
                s.raise();
            }
            _ => {
                return Err(format!(
                    "multipath: unknown message '{}' (fail_path <dev>, reinstate_path <dev>, \
                     switch_group <n>, enable_group <n>, disable_group <n>, queue_if_no_path, \
                     fail_if_no_path)",
                    argv.join(" ")
                ))
            }
        }
        Ok(String::new())
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
        *lock(&self.shared.stop) = false;
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name(format!("mpath-check-{}", env.volume))
            .spawn(move || checker_loop(shared))
        {
            Ok(j) => *h = Some(j),
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
    /// The number `status` and `args` print for the group in use (1-based; 0 without groups).
    fn current_pg(&self) -> usize {
        let s = &*self.shared;
        let cur = s.current.load(Relaxed);
        if cur < s.groups.len() {
            cur + 1
        } else {
            usize::from(!s.groups.is_empty())
        }
    }
}
