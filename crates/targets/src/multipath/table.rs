//! Multipath's control-path text: the table line (parsed by the constructor, printed back by
//! `args`), the status and the messages. See the parent module for the formats.

use super::selector::{Kind, Selector};
use super::state::Reactors;
use super::{
    lock, Config, Group, Multipath, Path, QueueMode, Shared, DEFAULT_CHECKER_INTERVAL_MS, NO_GROUP,
    NO_PATH_FAIL, NO_PATH_QUEUE, NO_PATH_RETRY,
};
use stackbd_core::target::parse_num;
use stackbd_core::{ArgError, CtorCx, Target};
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
                let args = sel.path(pargs)?;
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
                    args,
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
                reactors: Reactors::default(),
            }),
            cfg,
            checker: Mutex::new(None),
        })
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

    /// dm's TABLE format: the constructor line, with the current group as `initial_pg`, the
    /// queueing mode as messages left it, and every path's selector arguments spelled out.
    pub(super) fn table_line(&self) -> String {
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
                g.sel.path_table_words(&p.args, &mut o);
            }
        }
        o
    }

    /// dm's INFO format (see the module docs), with every path's load added up over the
    /// reactors.
    pub(super) fn info(&self) -> String {
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
            for (i, p) in s.paths.iter().enumerate().skip(g.first).take(g.n) {
                let _ = write!(
                    o,
                    " {} {} {}",
                    p.dev,
                    if p.active.load(Relaxed) { 'A' } else { 'F' },
                    p.fail_count.load(Relaxed)
                );
                g.sel.path_info_words(&p.args, &s.reactors.total(i), &mut o);
            }
        }
        o
    }

    /// A `dmsetup message` (see the module docs).
    pub(super) fn handle_message(&self, argv: &[&str]) -> Result<String, String> {
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
