//! Path selectors: which path of a priority group takes the next I/O.
//!
//! The four selectors of dm-multipath, with their table arguments and status words:
//!
//! | selector | selector args | path args | INFO per path |
//! |---|---|---|---|
//! | `round-robin` | none | `[repeat_count]` | nothing |
//! | `queue-length` | none | `[repeat_count]` | I/Os in flight |
//! | `service-time` | none | `[repeat_count [relative_throughput]]` | bytes in flight, relative throughput |
//! | `historical-service-time` | `[base_weight [threshold_multiplier]]` | `[repeat_count]` | service time estimate (fixed point, ns << 10), I/Os in flight, stale-after time (ns) |
//!
//! A selector's arguments ([`Selector`], [`PathArgs`]) are the table's and never change. The
//! load it decides on ([`PathLoad`]: I/Os and bytes in flight, service-time estimates) and the
//! round-robin position (the group's ticket) are plain integers that the caller owns: the
//! multipath target keeps one set per reactor, so a reactor decides on the load it put on each
//! path itself (see the module docs of `multipath`). Selection scans the group's paths in place
//! and allocates nothing.

use stackbd_core::ArgError;
use std::fmt::Write as _;

/// Fixed point used by the historical-service-time estimates: 10 fractional bits.
const HST_SHIFT: u32 = 10;
const HST_ONE: u64 = 1 << HST_SHIFT;
/// Default decay per bucket of elapsed time: 0.95 in fixed point.
pub const HST_DEFAULT_BASE_WEIGHT: u32 = 972;
/// Elapsed time is bucketed in units of 2^24 ns (about 16.8 ms) to look the decay up.
const HST_BUCKET_SHIFT: u32 = 24;
const HST_BUCKETS: usize = 64;
/// Past this many I/Os in flight the estimates are scaled down before multiplying.
const HST_MAX_INFLIGHT: u64 = HST_ONE;
/// relative_throughput is 0..=100 (dm's ST_MAX_RELATIVE_THROUGHPUT).
pub const ST_MAX_RELATIVE_THROUGHPUT: u32 = 100;

/// Which selector a group uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    RoundRobin,
    QueueLength,
    ServiceTime,
    HistoricalServiceTime,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::RoundRobin,
        Kind::QueueLength,
        Kind::ServiceTime,
        Kind::HistoricalServiceTime,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::RoundRobin => "round-robin",
            Kind::QueueLength => "queue-length",
            Kind::ServiceTime => "service-time",
            Kind::HistoricalServiceTime => "historical-service-time",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Words per path in the table (dm's `table_args`).
    pub fn table_args(self) -> usize {
        match self {
            Kind::ServiceTime => 2,
            _ => 1,
        }
    }

    /// Words per path in the status (dm's `info_args`).
    pub fn info_args(self) -> usize {
        match self {
            Kind::RoundRobin => 0,
            Kind::QueueLength => 1,
            Kind::ServiceTime => 2,
            Kind::HistoricalServiceTime => 3,
        }
    }

    /// The most path arguments the selector accepts (fewer take defaults).
    pub fn max_path_args(self) -> usize {
        self.table_args()
    }

    /// Whether `map` must read the clock for this selector.
    pub fn needs_clock(self) -> bool {
        self == Kind::HistoricalServiceTime
    }
}

/// A group's selector: its kind and its own arguments (immutable).
#[derive(Debug)]
pub struct Selector {
    pub kind: Kind,
    /// historical-service-time: the decay base (fixed point, < 1024).
    base_weight: u32,
    /// historical-service-time: paths whose estimates differ by less than this factor are
    /// compared by I/Os in flight only (0 and 1 compare estimates always).
    threshold_multiplier: u32,
    /// historical-service-time: `weights[b]` = base^(b + 1), the decay after `b` buckets of
    /// elapsed time; the last bucket forgets everything.
    weights: [u32; HST_BUCKETS],
}

/// One path's selector arguments (from the table; they never change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathArgs {
    pub repeat_count: u32,
    pub relative_throughput: u32,
}

/// One path's load as its owner sees it (the multipath target: one reactor). Plain integers:
/// only the owner's thread touches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathLoad {
    /// I/Os in flight.
    pub in_flight: u64,
    /// Bytes in flight.
    pub in_flight_bytes: u64,
    /// historical-service-time estimate, fixed point (ns << 10).
    pub hst: u64,
    /// When the last I/O on this path finished (ns on the target's clock).
    pub last_finish: u64,
    /// When the estimate stops being trusted unless an I/O finishes (ns).
    pub stale_after: u64,
}

impl Default for PathLoad {
    fn default() -> PathLoad {
        PathLoad {
            in_flight: 0,
            in_flight_bytes: 0,
            hst: HST_ONE,
            last_finish: 0,
            stale_after: 0,
        }
    }
}

impl PathLoad {
    /// Adds another owner's view of the same path, for the status: I/Os and bytes in flight
    /// add up; the service-time estimate is the one with the latest sample, and the estimate
    /// is trusted as long as any owner trusts it.
    pub fn merge(&mut self, o: &PathLoad) {
        self.in_flight = self.in_flight.wrapping_add(o.in_flight);
        self.in_flight_bytes = self.in_flight_bytes.wrapping_add(o.in_flight_bytes);
        if o.last_finish > self.last_finish {
            self.hst = o.hst;
            self.last_finish = o.last_finish;
        }
        self.stale_after = self.stale_after.max(o.stale_after);
    }
}

impl Selector {
    /// Parses the selector's own arguments.
    pub fn new(kind: Kind, args: &[&str]) -> Result<Selector, ArgError> {
        let mut base_weight = HST_DEFAULT_BASE_WEIGHT;
        let mut threshold_multiplier = 0;
        match kind {
            Kind::HistoricalServiceTime => {
                if args.len() > 2 {
                    return Err(ArgError::new(
                        "#selector_args",
                        format!(
                            "historical-service-time takes at most 2 arguments ([base_weight [threshold_multiplier]]), got {}",
                            args.len()
                        ),
                    ));
                }
                if let Some(a) = args.first() {
                    base_weight = stackbd_core::target::parse_num("base_weight", a)?;
                    if base_weight as u64 >= HST_ONE {
                        return Err(ArgError::new(
                            "base_weight",
                            format!(
                                "{base_weight} is not below {HST_ONE} (1.0 in 10-bit fixed point)"
                            ),
                        ));
                    }
                }
                if let Some(a) = args.get(1) {
                    threshold_multiplier =
                        stackbd_core::target::parse_num("threshold_multiplier", a)?;
                }
            }
            _ => {
                if !args.is_empty() {
                    return Err(ArgError::new(
                        "#selector_args",
                        format!(
                            "{} takes no selector arguments, got {}",
                            kind.name(),
                            args.len()
                        ),
                    ));
                }
            }
        }
        let mut weights = [0u32; HST_BUCKETS];
        for (i, w) in weights.iter_mut().enumerate().take(HST_BUCKETS - 1) {
            *w = fixed_pow(base_weight as u64, i as u32 + 1) as u32;
        }
        Ok(Selector {
            kind,
            base_weight,
            threshold_multiplier,
            weights,
        })
    }

    /// Parses one path's selector arguments (at most `max_path_args`, checked by the caller).
    pub fn path(&self, args: &[&str]) -> Result<PathArgs, ArgError> {
        let mut repeat_count = 1;
        let mut relative_throughput = 1;
        if let Some(a) = args.first() {
            repeat_count = stackbd_core::target::parse_num("repeat_count", a)?;
            if self.kind == Kind::RoundRobin && repeat_count == 0 {
                return Err(ArgError::new(
                    "repeat_count",
                    "round-robin needs at least 1 I/O per path in turn",
                ));
            }
        }
        if let Some(a) = args.get(1) {
            relative_throughput = stackbd_core::target::parse_num("relative_throughput", a)?;
            if relative_throughput > ST_MAX_RELATIVE_THROUGHPUT {
                return Err(ArgError::new(
                    "relative_throughput",
                    format!("{relative_throughput} is not in 0..={ST_MAX_RELATIVE_THROUGHPUT}"),
                ));
            }
        }
        Ok(PathArgs {
            repeat_count,
            relative_throughput,
        })
    }

    /// The selector's words in a table (after its name): `0`, or `2 <base> <threshold>`.
    pub fn table_words(&self, out: &mut String) {
        match self.kind {
            Kind::HistoricalServiceTime => {
                let _ = write!(out, "2 {} {}", self.base_weight, self.threshold_multiplier);
            }
            _ => out.push('0'),
        }
    }

    /// A path's words in a table.
    pub fn path_table_words(&self, p: &PathArgs, out: &mut String) {
        match self.kind {
            Kind::ServiceTime => {
                let _ = write!(out, "{} {}", p.repeat_count, p.relative_throughput);
            }
            _ => {
                let _ = write!(out, "{}", p.repeat_count);
            }
        }
    }

    /// A path's words in the status (none for round-robin), from its load `l`.
    pub fn path_info_words(&self, p: &PathArgs, l: &PathLoad, out: &mut String) {
        match self.kind {
            Kind::RoundRobin => {}
            Kind::QueueLength => {
                let _ = write!(out, " {}", l.in_flight);
            }
            Kind::ServiceTime => {
                let _ = write!(out, " {} {}", l.in_flight_bytes, p.relative_throughput);
            }
            Kind::HistoricalServiceTime => {
                let _ = write!(out, " {} {} {}", l.hst, l.in_flight, l.stale_after);
            }
        }
    }

    /// Picks a path among the group's `loads.len()` paths, of which `active(i)` are usable;
    /// `args(i)` are their table arguments. `ticket` counts the I/Os this owner placed in the
    /// group: the round-robin position and the start of every scan, so equal choices rotate
    /// over the paths. `bytes` is the size of the I/O to place, `now` the clock
    /// (historical-service-time only).
    #[inline]
    pub fn select<'a>(
        &self,
        ticket: &mut u64,
        loads: &[PathLoad],
        active: impl Fn(usize) -> bool,
        args: impl Fn(usize) -> &'a PathArgs,
        bytes: u64,
        now: u64,
    ) -> Option<usize> {
        let n = loads.len();
        if n == 0 {
            return None;
        }
        let t = *ticket;
        *ticket = t.wrapping_add(1);
        match self.kind {
            Kind::RoundRobin => {
                // Each active path takes `repeat_count` consecutive tickets of the cycle.
                let cycle: u64 = (0..n)
                    .filter(|&i| active(i))
                    .map(|i| args(i).repeat_count as u64)
                    .sum();
                if cycle == 0 {
                    return None;
                }
                let mut pos = t % cycle;
                for i in 0..n {
                    if !active(i) {
                        continue;
                    }
                    let rc = args(i).repeat_count as u64;
                    if pos < rc {
                        return Some(i);
                    }
                    pos -= rc;
                }
                // A path failed between the two scans: take any active one.
                (0..n).find(|&i| active(i))
            }
            Kind::QueueLength => {
                let mut best: Option<(usize, u64)> = None;
                for k in 0..n {
                    let i = (t as usize).wrapping_add(k) % n;
                    if !active(i) {
                        continue;
                    }
                    let q = loads[i].in_flight;
                    if best.is_none_or(|(_, bq)| q < bq) {
                        best = Some((i, q));
                        if q == 0 {
                            break;
                        }
                    }
                }
                best.map(|(i, _)| i)
            }
            Kind::ServiceTime => {
                let mut best: Option<usize> = None;
                for k in 0..n {
                    let i = (t as usize).wrapping_add(k) % n;
                    if !active(i) {
                        continue;
                    }
                    if best.is_none_or(|b| {
                        st_better((args(i), &loads[i]), (args(b), &loads[b]), bytes)
                    }) {
                        best = Some(i);
                    }
                }
                best
            }
            Kind::HistoricalServiceTime => {
                let mut best: Option<usize> = None;
                for k in 0..n {
                    let i = (t as usize).wrapping_add(k) % n;
                    if !active(i) {
                        continue;
                    }
                    if best.is_none_or(|b| self.hst_order(&loads[i], &loads[b], now) < 0) {
                        best = Some(i);
                    }
                }
                best
            }
        }
    }

    /// An I/O of `bytes` was sent down path `p`.
    #[inline]
    pub fn start_io(&self, p: &mut PathLoad, bytes: u64) {
        p.in_flight = p.in_flight.wrapping_add(1);
        if self.kind == Kind::ServiceTime {
            p.in_flight_bytes = p.in_flight_bytes.wrapping_add(bytes);
        }
    }

    /// An I/O of `bytes` that started at `start` finished on path `p` at `now`; `valid` is the
    /// number of usable paths in the group (for historical-service-time's staleness).
    #[inline]
    pub fn end_io(&self, p: &mut PathLoad, bytes: u64, start: u64, now: u64, valid: u64) {
        p.in_flight = p.in_flight.saturating_sub(1);
        match self.kind {
            Kind::ServiceTime => {
                p.in_flight_bytes = p.in_flight_bytes.saturating_sub(bytes);
            }
            Kind::HistoricalServiceTime => {
                // I/Os that overlapped on the path are counted as if served one after another.
                let begin = start.max(p.last_finish);
                p.last_finish = now;
                let st = now.saturating_sub(begin);
                let bucket = ((st >> HST_BUCKET_SHIFT) as usize).min(HST_BUCKETS - 1);
                let w = self.weights[bucket] as u64;
                let sample = st.saturating_mul(HST_ONE).min(u64::MAX >> HST_SHIFT);
                let old = p.hst.min(u64::MAX >> HST_SHIFT);
                let est = ema(old, sample, w);
                p.hst = est;
                p.stale_after = now.saturating_add(valid.saturating_mul(est >> HST_SHIFT));
            }
            _ => {}
        }
    }

    /// historical-service-time's comparison: negative if `a` should take the I/O rather than
    /// `b`, positive if `b`, zero if either will do.
    fn hst_order(&self, a: &PathLoad, b: &PathLoad, now: u64) -> i64 {
        let (mut h1, o1, s1) = (a.hst, a.in_flight, a.stale_after);
        let (mut h2, o2, s2) = (b.hst, b.in_flight, b.stale_after);
        let by_load = o1 as i64 - o2 as i64;
        let m = self.threshold_multiplier as u64;
        // Estimates within the threshold factor of each other: the less loaded path wins.
        let apart = if h1 > h2 {
            h1 > m.saturating_mul(h2)
        } else {
            h2 > m.saturating_mul(h1)
        };
        if !apart {
            return by_load;
        }
        let (stale1, stale2) = (s1 < now, s2 < now);
        // An idle stale path gets one probe I/O; between two idle paths, the staler one.
        if (o1 == 0 && stale1) || (o2 == 0 && stale2) || (o1 == 0 && o2 == 0) {
            let a_side = if o2 == 0 { s1 as i128 } else { 0 };
            let b_side = if o1 == 0 { s2 as i128 } else { 0 };
            return (a_side - b_side).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        }
        let b_better = if o1 == o2 {
            h1 > h2
        } else {
            if o1 >= HST_MAX_INFLIGHT || o2 >= HST_MAX_INFLIGHT {
                h1 >>= HST_SHIFT;
                h2 >>= HST_SHIFT;
            }
            (1 + o1 as u128) * h1 as u128 > (1 + o2 as u128) * h2 as u128
        };
        // A stale winner only gets its fair share, by load.
        if b_better {
            if stale2 {
                by_load
            } else {
                1
            }
        } else if stale1 {
            by_load
        } else {
            -1
        }
    }
}

/// service-time: true if `a` should take an I/O of `incoming` bytes rather than `b`: the least
/// (bytes in flight + incoming) / relative_throughput, compared by cross-multiplying; equal
/// estimates go to the higher throughput, and a throughput of 0 only when no other path is left.
fn st_better(a: (&PathArgs, &PathLoad), b: (&PathArgs, &PathLoad), incoming: u64) -> bool {
    let (s1, s2) = (a.1.in_flight_bytes, b.1.in_flight_bytes);
    let (t1, t2) = (a.0.relative_throughput, b.0.relative_throughput);
    if t1 == t2 {
        return s1 < s2;
    }
    if s1 == s2 || t1 == 0 || t2 == 0 {
        return t1 > t2;
    }
    let e1 = (s1 as u128 + incoming as u128) * t2 as u128;
    let e2 = (s2 as u128 + incoming as u128) * t1 as u128;
    if e1 != e2 {
        return e1 < e2;
    }
    t1 > t2
}

/// x^n in 10-bit fixed point, rounding at each step.
fn fixed_pow(mut x: u64, mut n: u32) -> u64 {
    let half = 1u64 << (HST_SHIFT - 1);
    let mut r = HST_ONE;
    while n > 0 {
        if n & 1 == 1 {
            r = (r * x + half) >> HST_SHIFT;
        }
        n >>= 1;
        if n > 0 {
            x = (x * x + half) >> HST_SHIFT;
        }
    }
    r
}

/// Exponential moving average in fixed point: `last * w + next * (1 - w)`.
fn ema(last: u64, next: u64, w: u64) -> u64 {
    let v = last as u128 * w as u128 + next as u128 * (HST_ONE - w) as u128 + (HST_ONE as u128 / 2);
    (v >> HST_SHIFT).min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(kind: Kind, args: &[&str]) -> Selector {
        Selector::new(kind, args).unwrap()
    }

    /// A group as one owner sees it: arguments, loads, active flags and the ticket.
    struct G {
        s: Selector,
        args: Vec<PathArgs>,
        p: Vec<PathLoad>,
        a: Vec<bool>,
        ticket: u64,
    }

    impl G {
        fn new(s: Selector, args: &[&[&str]]) -> G {
            let args: Vec<PathArgs> = args.iter().map(|a| s.path(a).unwrap()).collect();
            let n = args.len();
            G {
                s,
                args,
                p: vec![PathLoad::default(); n],
                a: vec![true; n],
                ticket: 0,
            }
        }

        fn pick(&mut self, bytes: u64, now: u64) -> usize {
            let (a, args) = (&self.a, &self.args);
            self.s
                .select(
                    &mut self.ticket,
                    &self.p,
                    |i| a[i],
                    |i| &args[i],
                    bytes,
                    now,
                )
                .unwrap()
        }
    }

    #[test]
    fn round_robin_honours_repeat_counts_and_skips_failed_paths() {
        let mut g = G::new(sel(Kind::RoundRobin, &[]), &[&["2"], &["1"], &[]]);
        let seq: Vec<usize> = (0..8).map(|_| g.pick(4096, 0)).collect();
        assert_eq!(seq, [0, 0, 1, 2, 0, 0, 1, 2]);
        g.a[0] = false;
        let mut counts = [0; 3];
        for _ in 0..100 {
            counts[g.pick(4096, 0)] += 1;
        }
        assert_eq!(counts, [0, 50, 50]);
        assert!(g.s.path(&["0"]).is_err());
    }

    #[test]
    fn each_owner_keeps_its_own_round_robin_position() {
        let s = sel(Kind::RoundRobin, &[]);
        let args = [s.path(&[]).unwrap(), s.path(&[]).unwrap()];
        let p = [PathLoad::default(); 2];
        let (mut t1, mut t2) = (0u64, 0u64);
        let pick = |t: &mut u64| s.select(t, &p, |_| true, |i| &args[i], 0, 0).unwrap();
        // Two owners placing I/O alternately each go round the paths in turn.
        let seq: Vec<(usize, usize)> = (0..4).map(|_| (pick(&mut t1), pick(&mut t2))).collect();
        assert_eq!(seq, [(0, 0), (1, 1), (0, 0), (1, 1)]);
    }

    #[test]
    fn queue_length_picks_the_shortest_queue_and_rotates_ties() {
        let mut g = G::new(sel(Kind::QueueLength, &[]), &[&[], &[], &[]]);
        g.p[0].in_flight = 3;
        g.p[1].in_flight = 1;
        g.p[2].in_flight = 2;
        assert_eq!(g.pick(0, 0), 1);
        g.a[1] = false;
        assert_eq!(g.pick(0, 0), 2);
        for l in &mut g.p {
            l.in_flight = 0;
        }
        g.a[1] = true;
        let mut seen = [false; 3];
        for _ in 0..3 {
            seen[g.pick(0, 0)] = true;
        }
        assert_eq!(seen, [true; 3], "equal queues rotate");
    }

    #[test]
    fn start_and_end_count_what_is_in_flight() {
        let s = sel(Kind::ServiceTime, &[]);
        let mut l = PathLoad::default();
        s.start_io(&mut l, 4096);
        s.start_io(&mut l, 8192);
        assert_eq!((l.in_flight, l.in_flight_bytes), (2, 12288));
        s.end_io(&mut l, 4096, 0, 0, 1);
        s.end_io(&mut l, 8192, 0, 0, 1);
        assert_eq!((l.in_flight, l.in_flight_bytes), (0, 0));
        // An unmatched end (never expected) stays at zero rather than wrapping.
        s.end_io(&mut l, 4096, 0, 0, 1);
        assert_eq!((l.in_flight, l.in_flight_bytes), (0, 0));
    }

    #[test]
    fn merged_loads_add_in_flight_and_keep_the_latest_estimate() {
        let mut m = PathLoad::default();
        let a = PathLoad {
            in_flight: 2,
            in_flight_bytes: 8192,
            hst: 5000,
            last_finish: 10,
            stale_after: 100,
        };
        let b = PathLoad {
            in_flight: 1,
            in_flight_bytes: 4096,
            hst: 7000,
            last_finish: 20,
            stale_after: 50,
        };
        m.merge(&a);
        m.merge(&b);
        assert_eq!(
            m,
            PathLoad {
                in_flight: 3,
                in_flight_bytes: 12288,
                hst: 7000,
                last_finish: 20,
                stale_after: 100,
            }
        );
        let mut idle = PathLoad::default();
        idle.merge(&PathLoad::default());
        assert_eq!(idle, PathLoad::default(), "no sample: the initial estimate");
    }

    #[test]
    fn service_time_weighs_bytes_by_throughput() {
        let mut g = G::new(
            sel(Kind::ServiceTime, &[]),
            &[&["1", "1"], &["1", "4"], &["1", "0"]],
        );
        // Idle: the highest throughput wins.
        assert_eq!(g.pick(4096, 0), 1);
        // (0 + 4096) * 4 = 16384 < (12288 + 4096) * 1 = 16384? equal: higher throughput wins.
        g.p[1].in_flight_bytes = 12288;
        assert_eq!(g.pick(4096, 0), 1);
        g.p[1].in_flight_bytes = 16384;
        assert_eq!(g.pick(4096, 0), 0);
        // Throughput 0 only when nothing else is left, however loaded the others are.
        g.p[0].in_flight_bytes = 1 << 40;
        assert_ne!(g.pick(4096, 0), 2);
        g.a[0] = false;
        g.a[1] = false;
        assert_eq!(g.pick(4096, 0), 2);
        assert!(g.s.path(&["1", "101"]).is_err());
    }

    #[test]
    fn historical_service_time_prefers_the_faster_path() {
        let mut g = G::new(sel(Kind::HistoricalServiceTime, &[]), &[&[], &[]]);
        assert_eq!(g.s.weights[0], HST_DEFAULT_BASE_WEIGHT);
        assert_eq!(g.s.weights[HST_BUCKETS - 1], 0);
        // Path 0 answers in 1 ms, path 1 in 10 ms, many times over.
        let mut last = 0;
        for k in 0..200u64 {
            last = 1_000_000_000 + k * 40_000_000;
            for (i, d) in [(0usize, 1_000_000u64), (1, 10_000_000)] {
                g.s.start_io(&mut g.p[i], 4096);
                g.s.end_io(&mut g.p[i], 4096, last, last + d, 2);
            }
        }
        // Soon after the last completions, while neither estimate is stale.
        let now = last + 2_000_000;
        let h0 = g.p[0].hst >> HST_SHIFT;
        let h1 = g.p[1].hst >> HST_SHIFT;
        assert!(h0 < h1, "estimates {h0} vs {h1}");
        assert!((500_000..2_000_000).contains(&h0), "{h0}");
        // Equal load: the lower estimate wins.
        g.p[0].in_flight = 1;
        g.p[1].in_flight = 1;
        assert_eq!(g.pick(4096, now), 0);
        // Path 0 with 8 in flight: 9 * 1 ms < 2 * 10 ms still favours it.
        g.p[0].in_flight = 8;
        assert_eq!(g.pick(4096, now), 0);
        g.p[0].in_flight = 30;
        assert_eq!(g.pick(4096, now), 1);
    }

    #[test]
    fn selector_arguments_are_checked() {
        assert!(Selector::new(Kind::RoundRobin, &["1"]).is_err());
        assert!(Selector::new(Kind::HistoricalServiceTime, &["1024"]).is_err());
        assert!(Selector::new(Kind::HistoricalServiceTime, &["1", "2", "3"]).is_err());
        let s = sel(Kind::HistoricalServiceTime, &["900", "3"]);
        let mut t = String::new();
        s.table_words(&mut t);
        assert_eq!(t, "2 900 3");
        assert_eq!(fixed_pow(972, 1), 972);
        assert_eq!(fixed_pow(512, 2), 256);
    }
}
