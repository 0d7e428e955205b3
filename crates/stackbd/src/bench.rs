//! `stackbd bench`: an in-process load generator, like SPDK's bdevperf. It builds the stack a
//! config file describes on reactor threads (`--threads`, one per core), attaches one bench job
//! (a [`Frontend`]) to each, and keeps `--qd` I/Os in flight on the volume from each of them.
//!
//! A job allocates everything up front: one page-aligned buffer per slot, the slot table, the
//! latency histogram. In steady state it allocates nothing, formats nothing and locks nothing; it
//! reads the clock once per reactor turn for its submissions and once per turn for the
//! completions reaped in it. The first 5% of the run (in I/Os or in time) is a warm-up that the
//! figures leave out. Over the measured window it counts, on its own reactor thread, the heap
//! allocations (the binary's global allocator counts them per thread), the frame overflows and
//! the splits, from the reactor's counters.
//!
//! Exit status: 0 if every I/O succeeded; 1 if one failed, or the run could not start (no such
//! volume, a bad config), with the reason on stderr.

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use stackbd::config;
use stackbd_core::alloc_count::thread_allocs;
use stackbd_core::runtime::{Frontend, FrontendCx, Mode, RuntimeConfig};
use stackbd_core::{
    Completion, DataBuf, DevId, Engine, EngineError, Op, ReactorConfig, Request, Status,
    SECTOR_SIZE,
};
use std::alloc::Layout;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The I/O pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, `--rwmix` percent reads.
    Randrw,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
            Rw::Read => "read",
            Rw::Write => "write",
        }
    }
}

/// How the reactors wait for completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Sleep in the kernel when there is nothing to do.
    Interrupt,
    /// Never sleep: reap every queue in a loop.
    Poll,
    /// Spin for `--hybrid-spin`, then sleep.
    Hybrid,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Interrupt => Mode::Interrupt,
            ModeArg::Poll => Mode::Poll,
            ModeArg::Hybrid => Mode::Hybrid,
        }
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The configuration file (TOML) that declares the volume.
    #[arg(long)]
    pub config: PathBuf,
    /// The volume to load.
    #[arg(long)]
    pub volume: String,
    /// I/O pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: Rw,
    /// Block size: bytes, or with a unit (4k, 64K, 1M).
    #[arg(long, default_value = "4k", value_parser = parse_bs)]
    pub bs: u64,
    /// I/Os in flight per thread.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub qd: u32,
    /// Reactor threads, one bench job on each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
    /// Measure this many I/Os in all (split over the threads), after a warm-up of 5% more.
    #[arg(long, conflicts_with = "time", value_parser = clap::value_parser!(u64).range(1..))]
    pub ios: Option<u64>,
    /// Measure for this long (10s, 500ms, 1m), after a warm-up of 5% more. Default 10s.
    #[arg(long, value_parser = parse_duration)]
    pub time: Option<Duration>,
    /// Completion mode of the reactors.
    #[arg(long, value_enum, default_value = "interrupt")]
    pub mode: ModeArg,
    /// Hybrid mode: how long a reactor spins without work before it sleeps.
    #[arg(long, default_value = "50us", value_parser = parse_duration)]
    pub hybrid_spin: Duration,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix: u8,
    /// Do not pin reactor i to CPU i.
    #[arg(long)]
    pub no_pin: bool,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `4k`, `4K`, `4KiB`, `4096`: bytes, a whole number of sectors.
fn parse_bs(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let fixed = match t.as_bytes().last() {
        Some(b'k' | b'm' | b'g') => {
            format!("{}{}", &t[..t.len() - 1], &t[t.len() - 1..].to_uppercase())
        }
        _ => t.to_string(),
    };
    config::parse_size(&fixed).map_err(|e| e.replace("a leaf cannot be empty", "must not be 0"))
}

/// `10s`, `500ms`, `250us`, `1m`, `1.5s`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration '{s}' (examples: 10s, 500ms, 1m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        u => {
            return Err(format!(
                "invalid duration '{s}': unknown unit '{u}' (ns, us, ms, s, m)"
            ))
        }
    };
    Duration::try_from_secs_f64(n * scale).map_err(|e| format!("invalid duration '{s}': {e}"))
}

// ---------------------------------------------------------------------------------------------
// The clock
// ---------------------------------------------------------------------------------------------

/// A cheap monotonic tick counter for latencies: the TSC where it is invariant (as SPDK's
/// bdevperf does; `clock_gettime` costs several times more in a VM), else nanoseconds from
/// `Instant`. Ticks become nanoseconds at the end, against `Instant` over the measured window.
#[derive(Clone, Copy, Debug)]
struct Clock {
    tsc: bool,
    epoch: Instant,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            tsc: invariant_tsc(),
            epoch: Instant::now(),
        }
    }

    #[inline]
    fn ticks(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        if self.tsc {
            // SAFETY: RDTSC has no preconditions; `tsc` is set only where the CPU has it.
            return unsafe { std::arch::x86_64::_rdtsc() };
        }
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Ticks per second, measured against `Instant` over `d`.
    fn calibrate(&self, d: Duration) -> f64 {
        if !self.tsc {
            return 1e9;
        }
        let (i0, t0) = (Instant::now(), self.ticks());
        std::thread::sleep(d);
        let (i1, t1) = (Instant::now(), self.ticks());
        (t1 - t0) as f64 / i1.duration_since(i0).as_secs_f64()
    }
}

/// CPUID 8000_0007h EDX bit 8: the TSC runs at a constant rate in every P-, C- and T-state.
fn invariant_tsc() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // `__cpuid` is safe from Rust 1.89 on and unsafe before.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is available on every x86_64 CPU; leaf 8000_0000h gives the highest
        // extended leaf, checked before 8000_0007h is asked for.
        let max = unsafe { __cpuid(0x8000_0000) }.eax;
        if max < 0x8000_0007 {
            return false;
        }
        #[allow(unused_unsafe)]
        // SAFETY: as above, the leaf exists.
        let edx = unsafe { __cpuid(0x8000_0007) }.edx;
        edx & (1 << 8) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// The job on each reactor
// ---------------------------------------------------------------------------------------------

/// Page-aligned, zero-initialised memory: the slots' data buffers.
struct SlotBufs {
    ptr: NonNull<u8>,
    layout: Layout,
    /// Never free: I/O may still be in flight into it.
    leak: bool,
}

// SAFETY: plain memory owned by this value; the job that owns it moves to its reactor thread once.
unsafe impl Send for SlotBufs {}

impl SlotBufs {
    fn new(len: usize, fill: u8) -> SlotBufs {
        let layout = Layout::from_size_align(len.max(1), 4096).expect("buffer layout");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: `ptr` is valid for `layout.size()` bytes, just allocated.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), fill, layout.size()) };
        SlotBufs {
            ptr,
            layout,
            leak: false,
        }
    }
}

impl Drop for SlotBufs {
    fn drop(&mut self) {
        if !self.leak {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measure,
    /// The window closed: no new I/O; waits for what is in flight.
    Drain,
    /// Drained and published.
    Done,
}

/// When the warm-up and the measured window end (per job).
#[derive(Clone, Copy, Debug)]
enum Plan {
    Ios { warmup: u64, measure: u64 },
    Time { warmup: Duration, measure: Duration },
}

/// What a job hands back when it is done.
struct JobResult {
    hist: Histogram<u64>,
    ios: u64,
    reads: u64,
    writes: u64,
    seconds: f64,
    /// Clock ticks over the window, to turn the histogram's ticks into nanoseconds.
    window_ticks: u64,
    errors: u64,
    first_error: Option<Status>,
    submit_errors: u64,
    allocs: u64,
    splits: u64,
    leaf_ios: u64,
    rq_merges: u64,
    overflows: u64,
    fallback_allocs: u64,
    pool_grown: u64,
    loops_per_io: f64,
}

/// Reactor counters at the start of the measured window.
#[derive(Clone, Copy, Default)]
struct Marks {
    allocs: u64,
    splits: u64,
    leaf_ios: u64,
    rq_merges: u64,
    overflows: u64,
    fallback_allocs: u64,
    pool_grown: u64,
    turns: u64,
}

impl Marks {
    fn now(cx: &FrontendCx<'_>, turns: u64) -> Marks {
        // Read first, so nothing this function does could be counted.
        let allocs = thread_allocs();
        Marks {
            allocs,
            splits: cx.reactor.stats.splits,
            leaf_ios: cx.reactor.stats.leaf_ios,
            rq_merges: cx.reactor.stats.rq_merges,
            overflows: cx.reactor.fallback().overflows,
            fallback_allocs: cx.reactor.fallback().allocations,
            pool_grown: cx.reactor.pool().stats.grown,
            turns,
        }
    }
}

struct Job {
    vol: DevId,
    rw: Rw,
    rwmix: u8,
    bs: usize,
    bs_sectors: u32,
    /// Blocks of `bs` in the volume.
    blocks: u64,
    /// Next block, for sequential patterns.
    seq: u64,
    rng: u64,
    bufs: SlotBufs,
    clock: Clock,
    /// Estimated ticks per second, for the time plan's deadlines.
    ticks_per_sec: f64,
    /// When each slot's I/O was submitted (ticks), and whether it is a write.
    started: Box<[u64]>,
    is_write: Box<[bool]>,
    /// Free slots: a stack in `free[..nfree]`.
    free: Box<[u32]>,
    nfree: usize,
    inflight: usize,
    plan: Plan,
    phase: Phase,
    /// The tick at which the current phase ends (time plan).
    deadline: u64,
    window_start: Instant,
    window_start_ticks: u64,
    window_ticks: u64,
    /// Completion time for this turn's completions: read once, at the first of them.
    turn_now: Option<u64>,
    turns: u64,
    completed: u64,
    measured: u64,
    reads: u64,
    writes: u64,
    seconds: f64,
    errors: u64,
    first_error: Option<Status>,
    submit_errors: u64,
    marks: Marks,
    delta: Marks,
    hist: Option<Histogram<u64>>,
    out: Arc<Mutex<Option<JobResult>>>,
    progress: Arc<AtomicU64>,
}

/// xorshift64*: a few instructions, no allocation; `state` must not be 0.
#[inline]
fn xorshift64star(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// A uniform index below `n` (Lemire's multiply-shift, no division).
#[inline]
fn below(r: u64, n: u64) -> u64 {
    ((r as u128 * n as u128) >> 64) as u64
}

/// Latencies are recorded in clock ticks, 1 .. 10^12 (over 100 s at any TSC rate), 3
/// significant digits.
const HIST_MAX_TICKS: u64 = 1_000_000_000_000;

impl Job {
    #[inline]
    fn next_rand(&mut self) -> u64 {
        xorshift64star(&mut self.rng)
    }

    /// The next I/O: (is a write, block index).
    #[inline]
    fn next_io(&mut self) -> (bool, u64) {
        match self.rw {
            Rw::Read | Rw::Write => {
                let b = self.seq;
                self.seq += 1;
                if self.seq >= self.blocks {
                    self.seq = 0;
                }
                (self.rw == Rw::Write, b)
            }
            Rw::Randread | Rw::Randwrite | Rw::Randrw => {
                let r = self.next_rand();
                let block = below(r, self.blocks);
                let write = match self.rw {
                    Rw::Randread => false,
                    Rw::Randwrite => true,
                    _ => below(self.next_rand(), 100) as u8 >= self.rwmix,
                };
                (write, block)
            }
        }
    }

    fn begin_measure(&mut self, cx: &FrontendCx<'_>, now: u64) {
        self.phase = Phase::Measure;
        self.window_start = Instant::now();
        self.window_start_ticks = now;
        if let Plan::Time { measure, .. } = self.plan {
            self.deadline = now + (measure.as_secs_f64() * self.ticks_per_sec) as u64;
        }
        self.marks = Marks::now(cx, self.turns);
    }

    fn end_measure(&mut self, cx: &FrontendCx<'_>, now: u64) {
        let end = Marks::now(cx, self.turns);
        let m = &self.marks;
        self.delta = Marks {
            allocs: end.allocs - m.allocs,
            splits: end.splits - m.splits,
            leaf_ios: end.leaf_ios - m.leaf_ios,
            rq_merges: end.rq_merges - m.rq_merges,
            overflows: end.overflows - m.overflows,
            fallback_allocs: end.fallback_allocs - m.fallback_allocs,
            pool_grown: end.pool_grown - m.pool_grown,
            turns: end.turns - m.turns,
        };
        self.seconds = self.window_start.elapsed().as_secs_f64();
        self.window_ticks = now.saturating_sub(self.window_start_ticks);
        self.phase = Phase::Drain;
    }

    fn error(&mut self, s: Status) {
        self.errors += 1;
        self.first_error.get_or_insert(s);
    }

    /// Hands the result over once nothing is in flight (allocates: after the window).
    fn publish_if_drained(&mut self) {
        if self.phase != Phase::Drain || self.inflight > 0 {
            return;
        }
        self.phase = Phase::Done;
        let d = self.delta;
        let r = JobResult {
            hist: self.hist.take().expect("published once"),
            ios: self.measured,
            reads: self.reads,
            writes: self.writes,
            seconds: self.seconds,
            window_ticks: self.window_ticks,
            errors: self.errors,
            first_error: self.first_error,
            submit_errors: self.submit_errors,
            allocs: d.allocs,
            splits: d.splits,
            leaf_ios: d.leaf_ios,
            rq_merges: d.rq_merges,
            overflows: d.overflows,
            fallback_allocs: d.fallback_allocs,
            pool_grown: d.pool_grown,
            loops_per_io: d.turns as f64 / self.measured.max(1) as f64,
        };
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }
}

impl Frontend for Job {
    fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize {
        self.turn_now = None;
        if self.phase == Phase::Done {
            return 0;
        }
        self.turns += 1;
        let now = self.clock.ticks();
        if self.turns == 1 {
            if let Plan::Time { warmup, .. } = self.plan {
                self.deadline = now + (warmup.as_secs_f64() * self.ticks_per_sec) as u64;
            }
        }
        match (self.phase, self.plan) {
            (Phase::Warmup, Plan::Time { .. }) if now >= self.deadline => {
                self.begin_measure(cx, now)
            }
            (Phase::Warmup, Plan::Ios { warmup: 0, .. }) => self.begin_measure(cx, now),
            (Phase::Measure, Plan::Time { .. }) if now >= self.deadline => {
                self.end_measure(cx, now)
            }
            _ => {}
        }
        let mut n = 0;
        if matches!(self.phase, Phase::Warmup | Phase::Measure) {
            while self.nfree > 0 {
                let slot = self.free[self.nfree - 1] as usize;
                let (write, block) = self.next_io();
                // SAFETY: slot `slot`'s range of `bufs` is used by this one I/O only; it is not
                // touched until the completion comes back, and the buffers outlive every I/O
                // (the job is finished, hence dropped, only when nothing is in flight, and a job
                // dropped with I/O in flight leaks them, see `Drop`).
                let data = unsafe {
                    DataBuf::from_raw(self.bufs.ptr.as_ptr().add(slot * self.bs), self.bs)
                };
                let op = if write { Op::Write } else { Op::Read };
                let sector = block * self.bs_sectors as u64;
                let req = Request::new(op, self.vol, sector, self.bs_sectors, data, slot as u64);
                match cx.submit(&req) {
                    Ok(()) => {
                        self.nfree -= 1;
                        self.started[slot] = now;
                        self.is_write[slot] = write;
                        self.inflight += 1;
                        n += 1;
                    }
                    // The bio pool is full: the slot waits for a completion.
                    Err(Status::Again) => break,
                    Err(s) => {
                        // Refused outright: it would be refused again. Stop the run.
                        self.submit_errors += 1;
                        self.error(s);
                        if self.phase == Phase::Warmup {
                            self.begin_measure(cx, now);
                        }
                        self.end_measure(cx, now);
                        break;
                    }
                }
            }
        }
        self.publish_if_drained();
        self.progress.store(self.completed, Ordering::Relaxed);
        n
    }

    fn complete(&mut self, cx: &mut FrontendCx<'_>, c: Completion) {
        let slot = c.user_data as usize;
        self.free[self.nfree] = slot as u32;
        self.nfree += 1;
        self.inflight -= 1;
        self.completed += 1;
        if c.status != Status::Ok {
            self.error(c.status);
        }
        match self.phase {
            Phase::Warmup => {
                if let Plan::Ios { warmup, .. } = self.plan {
                    if self.completed >= warmup {
                        let clock = self.clock;
                        let now = *self.turn_now.get_or_insert_with(|| clock.ticks());
                        self.begin_measure(cx, now);
                    }
                }
            }
            Phase::Measure => {
                let clock = self.clock;
                let now = *self.turn_now.get_or_insert_with(|| clock.ticks());
                let ticks = now.saturating_sub(self.started[slot]);
                if let Some(h) = self.hist.as_mut() {
                    h.saturating_record(ticks.clamp(1, HIST_MAX_TICKS));
                }
                self.measured += 1;
                if self.is_write[slot] {
                    self.writes += 1;
                } else {
                    self.reads += 1;
                }
                if let Plan::Ios { measure, .. } = self.plan {
                    if self.measured >= measure {
                        self.end_measure(cx, now);
                    }
                }
            }
            Phase::Drain => self.publish_if_drained(),
            Phase::Done => {}
        }
    }

    fn finished(&self) -> bool {
        self.phase == Phase::Done
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.inflight > 0 {
            // Dropped with I/O in flight (a reactor that panicked): the kernel or a leaf may still
            // write into the buffers, so they are never freed.
            self.bufs.leak = true;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------------

fn fail(msg: &str) -> ExitCode {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "stackbd bench: {msg}");
    ExitCode::FAILURE
}

/// Writes to stdout; a closed pipe is not worth a panic.
fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
}

/// The merged figures of a run.
struct Report {
    ios: u64,
    reads: u64,
    writes: u64,
    seconds: f64,
    iops: f64,
    mib_s: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    mean: f64,
    max: f64,
    errors: u64,
    first_error: Option<Status>,
    allocs: u64,
    splits: u64,
    leaf_ios: u64,
    rq_merges: u64,
    overflows: u64,
    fallback_allocs: u64,
    pool_grown: u64,
    loops_per_io: f64,
    per_thread_iops: Vec<f64>,
}

fn merge(results: Vec<JobResult>, bs: u64) -> Report {
    let mut hist = Histogram::<u64>::new_with_bounds(1, HIST_MAX_TICKS, 3)
        .expect("histogram bounds are valid");
    let mut r = Report {
        ios: 0,
        reads: 0,
        writes: 0,
        seconds: 0.0,
        iops: 0.0,
        mib_s: 0.0,
        p50: 0.0,
        p99: 0.0,
        p999: 0.0,
        mean: 0.0,
        max: 0.0,
        errors: 0,
        first_error: None,
        allocs: 0,
        splits: 0,
        leaf_ios: 0,
        rq_merges: 0,
        overflows: 0,
        fallback_allocs: 0,
        pool_grown: 0,
        loops_per_io: 0.0,
        per_thread_iops: Vec::new(),
    };
    let n = results.len().max(1) as f64;
    let (ticks, secs) = results.iter().fold((0u64, 0f64), |(t, s), j| {
        (t + j.window_ticks, s + j.seconds)
    });
    // Ticks per microsecond over the measured windows.
    let per_us = if secs > 0.0 && ticks > 0 {
        ticks as f64 / (secs * 1e6)
    } else {
        1000.0
    };
    for j in &results {
        let _ = hist.add(&j.hist);
        r.ios += j.ios;
        r.reads += j.reads;
        r.writes += j.writes;
        r.seconds += j.seconds / n;
        let iops = if j.seconds > 0.0 {
            j.ios as f64 / j.seconds
        } else {
            0.0
        };
        r.iops += iops;
        r.per_thread_iops.push(iops);
        r.errors += j.errors;
        r.first_error = r.first_error.or(j.first_error);
        r.allocs += j.allocs;
        r.splits += j.splits;
        r.leaf_ios += j.leaf_ios;
        r.rq_merges += j.rq_merges;
        r.overflows += j.overflows;
        r.fallback_allocs += j.fallback_allocs;
        r.pool_grown += j.pool_grown;
        r.loops_per_io += j.loops_per_io / n;
    }
    r.mib_s = r.iops * bs as f64 / (1u64 << 20) as f64;
    if !hist.is_empty() {
        let us = |t: u64| t as f64 / per_us;
        r.p50 = us(hist.value_at_quantile(0.50));
        r.p99 = us(hist.value_at_quantile(0.99));
        r.p999 = us(hist.value_at_quantile(0.999));
        r.mean = hist.mean() / per_us;
        r.max = us(hist.max());
    }
    r
}

/// Rounds for printing (JSON keeps 3 decimals).
fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn run(args: &BenchArgs) -> ExitCode {
    let cfg = match config::load(&args.config) {
        Ok(c) => c,
        Err(errors) => {
            let mut e = std::io::stderr().lock();
            for err in &errors {
                let _ = writeln!(e, "{err}");
            }
            return fail(&format!(
                "{}: not a usable config ({} errors; `stackbd check` tells more)",
                args.config.display(),
                errors.len()
            ));
        }
    };
    let qd = args.qd as usize;
    let threads = args.threads as usize;
    let rt = RuntimeConfig {
        reactors: threads,
        mode: args.mode.into(),
        hybrid_spin: args.hybrid_spin,
        pin: !args.no_pin,
        reactor: ReactorConfig {
            // Room for every slot's bio and its clones without growing the pool.
            pool_capacity: (qd * 4).max(ReactorConfig::default().pool_capacity),
            ..ReactorConfig::default()
        },
    };
    let engine = match Engine::with_threads(stackbd_targets::registry(), rt) {
        Ok(e) => e,
        Err(e) => return fail(&format!("cannot start {threads} reactor threads: {e}")),
    };
    let built = match config::build_on(&cfg, engine) {
        Ok(b) => b,
        Err(errors) => {
            let mut e = std::io::stderr().lock();
            for err in &errors {
                let _ = writeln!(e, "{err}");
            }
            return fail(&format!(
                "{}: the stack could not be built",
                args.config.display()
            ));
        }
    };
    let mut engine = built.engine;
    let name = &args.volume;
    let (vol, sectors) = match engine.info(name) {
        Ok(info) => (info.dev, info.size),
        Err(EngineError::NoDevice(_)) => {
            let vols: Vec<&str> = cfg.volumes.iter().map(|v| v.name.as_str()).collect();
            return fail(&format!(
                "volume '{name}' does not exist in {} (volumes: {})",
                args.config.display(),
                if vols.is_empty() {
                    "none".to_string()
                } else {
                    vols.join(", ")
                }
            ));
        }
        Err(_) => {
            return fail(&format!(
                "'{name}' is a leaf, not a volume; bench runs on volumes (declare one with \
                 table = \"0 <sectors> linear {name} 0\")"
            ))
        }
    };
    let lbs = engine
        .live_table(name)
        .ok()
        .flatten()
        .map_or(SECTOR_SIZE as u32, |t| t.limits().logical_block_bytes) as u64;
    let bs = args.bs;
    if !bs.is_multiple_of(lbs) {
        return fail(&format!(
            "--bs {bs}: not a multiple of the volume's logical block size ({lbs} bytes)"
        ));
    }
    let bytes = sectors * SECTOR_SIZE as u64;
    let blocks = bytes / bs;
    if blocks == 0 {
        return fail(&format!(
            "--bs {bs}: larger than volume '{name}' ({bytes} bytes)"
        ));
    }
    if bs > u32::MAX as u64 * SECTOR_SIZE as u64 || (bs as usize).checked_mul(qd).is_none() {
        return fail(&format!("--bs {bs} --qd {qd}: too large"));
    }
    let _ = engine.open(name);

    // Each job measures its share of --ios, or the whole --time; 5% more of warm-up before.
    let plans: Vec<Plan> = (0..threads as u64)
        .map(|i| match (args.ios, args.time) {
            (Some(total), _) => {
                let t = threads as u64;
                let measure = total / t + u64::from(i < total % t);
                Plan::Ios {
                    warmup: measure / 20,
                    measure: measure.max(1),
                }
            }
            (None, time) => {
                let measure = time.unwrap_or(Duration::from_secs(10));
                Plan::Time {
                    warmup: measure / 20,
                    measure,
                }
            }
        })
        .collect();
    let write_fill = 0x5a;
    let mut slots = Vec::new();
    let mut progress = Vec::new();
    let threads_handle = engine.threads().expect("an engine with reactor threads");
    let clock = Clock::new();
    let ticks_per_sec = clock.calibrate(Duration::from_millis(20));
    let now = Instant::now();
    for (i, plan) in plans.iter().enumerate() {
        let out = Arc::new(Mutex::new(None));
        let prog = Arc::new(AtomicU64::new(0));
        let job = Job {
            vol,
            rw: args.rw,
            rwmix: args.rwmix,
            bs: bs as usize,
            bs_sectors: (bs / SECTOR_SIZE as u64) as u32,
            blocks,
            seq: blocks * i as u64 / threads as u64,
            rng: 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1) | 1,
            bufs: SlotBufs::new(bs as usize * qd, write_fill),
            clock,
            ticks_per_sec,
            started: vec![0; qd].into_boxed_slice(),
            is_write: vec![false; qd].into_boxed_slice(),
            free: (0..qd as u32).rev().collect(),
            nfree: qd,
            inflight: 0,
            plan: *plan,
            phase: Phase::Warmup,
            deadline: 0,
            window_start: now,
            window_start_ticks: 0,
            window_ticks: 0,
            turn_now: None,
            turns: 0,
            completed: 0,
            measured: 0,
            reads: 0,
            writes: 0,
            seconds: 0.0,
            errors: 0,
            first_error: None,
            submit_errors: 0,
            marks: Marks::default(),
            delta: Marks::default(),
            hist: Some(
                Histogram::new_with_bounds(1, HIST_MAX_TICKS, 3)
                    .expect("histogram bounds are valid"),
            ),
            out: out.clone(),
            progress: prog.clone(),
        };
        threads_handle.attach(Box::new(job), Some(i));
        slots.push(out);
        progress.push(prog);
    }

    // Wait, without disturbing the reactors (no messages): poll the result slots.
    let stall = Duration::from_secs(30);
    let mut last = (0u64, Instant::now());
    loop {
        if slots
            .iter()
            .all(|s| s.lock().unwrap_or_else(|e| e.into_inner()).is_some())
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        let p: u64 = progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();
        if p != last.0 {
            last = (p, Instant::now());
        } else if last.1.elapsed() > stall {
            // The reactors still own I/O in flight: leave without tearing them down.
            let _ = fail(&format!(
                "no I/O completed for {}s ({p} completed in all): the stack is stuck",
                stall.as_secs()
            ));
            std::process::exit(1);
        }
    }
    let results: Vec<JobResult> = slots
        .iter()
        .map(|s| {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .expect("checked above")
        })
        .collect();
    let submit_errors: u64 = results.iter().map(|r| r.submit_errors).sum();
    let rep = merge(results, bs);
    engine.close(vol);
    engine.stop_threads();

    let warmup_seconds = match plans[0] {
        Plan::Time { warmup, .. } => warmup.as_secs_f64(),
        Plan::Ios { .. } => 0.0,
    };
    let allocs_per_io = rep.allocs as f64 / rep.ios.max(1) as f64;
    if args.json {
        let v: Value = json!({
            "config": args.config.display().to_string(),
            "volume": name,
            "rw": args.rw.name(),
            "rwmix": args.rwmix,
            "bs": bs,
            "qd": qd,
            "threads": threads,
            "mode": Mode::from(args.mode).to_string(),
            "ios": rep.ios,
            "reads": rep.reads,
            "writes": rep.writes,
            "seconds": r3(rep.seconds),
            "warmup_seconds": r3(warmup_seconds),
            "iops": r3(rep.iops),
            "mib_s": r3(rep.mib_s),
            "ns_per_io": r3(if rep.iops > 0.0 { threads as f64 * 1e9 / rep.iops } else { 0.0 }),
            "lat_us_p50": r3(rep.p50),
            "lat_us_p99": r3(rep.p99),
            "lat_us_p999": r3(rep.p999),
            "lat_us_mean": r3(rep.mean),
            "lat_us_max": r3(rep.max),
            "allocs": rep.allocs,
            "allocs_per_io": allocs_per_io,
            "frame_overflows": rep.overflows,
            "frame_fallback_allocs": rep.fallback_allocs,
            "pool_grown": rep.pool_grown,
            "splits": rep.splits,
            "splits_per_io": r3(rep.splits as f64 / rep.ios.max(1) as f64),
            "leaf_ios": rep.leaf_ios,
            "leaf_ios_per_io": r3(rep.leaf_ios as f64 / rep.ios.max(1) as f64),
            "rq_merges": rep.rq_merges,
            "loops_per_io": r3(rep.loops_per_io),
            "errors": rep.errors,
            "first_error": rep.first_error.map(|s| format!("{s:?}")),
            "per_thread_iops": rep.per_thread_iops.iter().map(|&x| r3(x)).collect::<Vec<_>>(),
        });
        out(&format!("{v}\n"));
    } else {
        let mut t = String::new();
        use std::fmt::Write as _;
        let _ = writeln!(
            t,
            "stackbd bench: volume {name}, {} bs={bs} qd={qd} threads={threads} mode={}{}",
            args.rw.name(),
            Mode::from(args.mode),
            if args.rw == Rw::Randrw {
                format!(" rwmix={}", args.rwmix)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            t,
            "  ios        {} in {:.3} s ({} reads, {} writes; warm-up excluded)",
            rep.ios, rep.seconds, rep.reads, rep.writes
        );
        let _ = writeln!(t, "  iops       {:.0}", rep.iops);
        let _ = writeln!(t, "  bandwidth  {:.1} MiB/s", rep.mib_s);
        let _ = writeln!(
            t,
            "  latency    p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us (mean {:.2}, max {:.2})",
            rep.p50, rep.p99, rep.p999, rep.mean, rep.max
        );
        let _ = writeln!(
            t,
            "  allocs/io  {allocs_per_io} ({} heap allocations on the reactor threads)",
            rep.allocs
        );
        let _ = writeln!(
            t,
            "  frames     {} overflows, {} splits ({:.2} per I/O)",
            rep.overflows,
            rep.splits,
            rep.splits as f64 / rep.ios.max(1) as f64
        );
        let _ = writeln!(
            t,
            "  leaf I/Os  {} ({:.3} per I/O), {} request-queue merges",
            rep.leaf_ios,
            rep.leaf_ios as f64 / rep.ios.max(1) as f64,
            rep.rq_merges
        );
        let _ = writeln!(t, "  errors     {}", rep.errors);
        out(&t);
    }
    if rep.errors > 0 {
        let first = rep
            .first_error
            .map_or(String::new(), |s| format!(" (first: {s:?})"));
        let refused = if submit_errors > 0 {
            format!("; {submit_errors} refused at submission, run stopped")
        } else {
            String::new()
        };
        return fail(&format!("{} I/O errors{first}{refused}", rep.errors));
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes() {
        assert_eq!(parse_bs("4k"), Ok(4096));
        assert_eq!(parse_bs("4K"), Ok(4096));
        assert_eq!(parse_bs("64KiB"), Ok(65536));
        assert_eq!(parse_bs("1m"), Ok(1 << 20));
        assert_eq!(parse_bs("512"), Ok(512));
        assert!(parse_bs("100").is_err());
        assert!(parse_bs("0").is_err());
        assert!(parse_bs("4kb").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn random_blocks_stay_in_range_and_spread() {
        let mut seen = [0u32; 16];
        let mut rng = 0x9E37_79B9_7F4A_7C15u64 | 1;
        for _ in 0..16_000 {
            seen[below(xorshift64star(&mut rng), 16) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
