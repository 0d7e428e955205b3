//! The multipath target through the real engine: tables, failover, queueing, selectors, groups,
//! the path checker, suspend, and zero allocations per I/O.
//!
//! Paths are [`PathLeaf`]s: several leaves over one shared byte array (one device reached over
//! several paths), each with its own switches to answer path errors, target errors, fail its
//! probe, or hold its I/O until released, and with per-op counters.

use stackbd_core::alloc_count::{thread_allocs, CountingAlloc};
use stackbd_core::engine::Events;
use stackbd_core::leaf::WaitHint;
use stackbd_core::target::TargetEnv;
use stackbd_core::{
    BioId, DataBuf, DevId, Engine, Leaf, LeafChannel, LeafCx, Limits, Op, ReactorConfig, Request,
    Sector, Status, SuspendOpts, SECTOR_SIZE,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const SECTORS: Sector = 2048;

/// A path's switches and counters.
#[derive(Debug, Default)]
struct Ctl {
    /// I/O answers `PathError`.
    path_fail: AtomicBool,
    /// I/O answers `IoError` (a target error).
    io_fail: AtomicBool,
    /// `probe` answers an error.
    probe_fail: AtomicBool,
    /// `probe` hangs until its timeout, then answers an error (a server that does not answer).
    probe_hang: AtomicBool,
    /// When each probe started and ended.
    probes: Mutex<Vec<(Instant, Instant)>>,
    /// I/O is held until this is cleared (then `poll` completes it).
    hold: AtomicBool,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
}

impl Ctl {
    /// The path is down: I/O gets path errors and probes fail.
    fn down(&self) {
        self.probe_fail.store(true, SeqCst);
        self.path_fail.store(true, SeqCst);
    }

    fn up(&self) {
        self.path_fail.store(false, SeqCst);
        self.probe_fail.store(false, SeqCst);
    }

    fn ios(&self) -> u64 {
        self.reads.load(SeqCst) + self.writes.load(SeqCst)
    }
}

#[derive(Debug)]
struct PathLeaf {
    data: Arc<Mutex<Vec<u8>>>,
    ctl: Arc<Ctl>,
    sectors: Sector,
}

impl Leaf for PathLeaf {
    fn kind(&self) -> &'static str {
        "test-path"
    }

    fn size(&self) -> Sector {
        self.sectors
    }

    fn limits(&self) -> Limits {
        Limits {
            max_copy_sectors: 0,
            copy_native: false,
            ..Limits::TOP
        }
    }

    fn args(&self) -> String {
        format!("{}", self.sectors)
    }

    fn channel(&self) -> Box<dyn LeafChannel> {
        Box::new(PathChan {
            data: self.data.clone(),
            ctl: self.ctl.clone(),
            held: VecDeque::with_capacity(64),
        })
    }

    fn probe(&self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        let r = if self.ctl.probe_hang.load(SeqCst) {
            std::thread::sleep(timeout);
            Err(format!("no answer within {timeout:?}"))
        } else if self.ctl.probe_fail.load(SeqCst) {
            Err("no answer".into())
        } else {
            Ok(())
        };
        self.ctl
            .probes
            .lock()
            .unwrap()
            .push((start, Instant::now()));
        r
    }
}

struct PathChan {
    data: Arc<Mutex<Vec<u8>>>,
    ctl: Arc<Ctl>,
    held: VecDeque<BioId>,
}

impl PathChan {
    fn run(&mut self, cx: &mut LeafCx<'_>, id: BioId) {
        let bio = cx.bio(id);
        let status = if self.ctl.path_fail.load(SeqCst) {
            Status::PathError
        } else if self.ctl.io_fail.load(SeqCst) {
            Status::IoError
        } else {
            let off = bio.sector as usize * SECTOR_SIZE;
            let mut d = self.data.lock().unwrap();
            match bio.op {
                Op::Read => bio.data.write_from(0, &d[off..off + bio.bytes()]),
                Op::Write => bio.data.read_into(0, &mut d[off..off + bio.bytes()]),
                _ => {}
            }
            Status::Ok
        };
        cx.complete(id, status);
    }
}

impl LeafChannel for PathChan {
    fn submit(&mut self, cx: &mut LeafCx<'_>, id: BioId) {
        let c = match cx.bio(id).op {
            Op::Read => &self.ctl.reads,
            Op::Write => &self.ctl.writes,
            Op::Flush => &self.ctl.flushes,
            _ => &self.ctl.writes,
        };
        c.fetch_add(1, SeqCst);
        if self.ctl.hold.load(SeqCst) {
            self.held.push_back(id);
        } else {
            self.run(cx, id);
        }
    }

    fn poll(&mut self, cx: &mut LeafCx<'_>) -> usize {
        if self.ctl.hold.load(SeqCst) {
            return 0;
        }
        let n = self.held.len();
        while let Some(id) = self.held.pop_front() {
            self.run(cx, id);
        }
        n
    }

    fn needs_poll(&self) -> bool {
        true
    }

    fn prepare_wait(&mut self) -> WaitHint {
        if self.held.is_empty() {
            WaitHint::Idle
        } else {
            WaitHint::Spin
        }
    }
}

/// An engine with leaves `p0..pN` (paths to one shared device) and helpers.
struct Rig {
    e: Engine,
    ctl: Vec<Arc<Ctl>>,
    done: HashMap<u64, Status>,
    next_tag: u64,
}

impl Rig {
    fn new(paths: usize) -> Rig {
        let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
        let data = Arc::new(Mutex::new(vec![0u8; SECTORS as usize * SECTOR_SIZE]));
        let mut ctl = Vec::new();
        for i in 0..paths {
            let c = Arc::new(Ctl::default());
            e.add_leaf(
                &format!("p{i}"),
                Arc::new(PathLeaf {
                    data: data.clone(),
                    ctl: c.clone(),
                    sectors: SECTORS,
                }),
            )
            .unwrap();
            ctl.push(c);
        }
        Rig {
            e,
            ctl,
            done: HashMap::new(),
            next_tag: 1,
        }
    }

    /// Creates volume `name` with `multipath <args>` over the whole size.
    fn create(&mut self, name: &str, args: &str) -> DevId {
        self.e
            .create(name, Some(&format!("0 {SECTORS} multipath {args}")))
            .unwrap()
    }

    fn status(&self, name: &str) -> String {
        let s = self.e.status(name).unwrap();
        s.trim_end()
            .strip_prefix(&format!("0 {SECTORS} multipath "))
            .unwrap_or_else(|| panic!("status line: {s}"))
            .to_string()
    }

    fn table(&self, name: &str) -> String {
        let s = self.e.table(name, false).unwrap();
        s.trim_end()
            .strip_prefix(&format!("0 {SECTORS} multipath "))
            .unwrap()
            .to_string()
    }

    fn msg(&mut self, name: &str, argv: &[&str]) -> Result<String, String> {
        self.e.message(name, 0, argv).map_err(|e| e.to_string())
    }

    fn events(&self, name: &str) -> u64 {
        self.e.info(name).unwrap().event_nr
    }

    fn write(&mut self, vol: DevId, sector: Sector, fill: u8) -> Status {
        let buf = vec![fill; 4096];
        self.e.write_at(vol, sector, &buf)
    }

    fn read(&mut self, vol: DevId, sector: Sector) -> (Status, Vec<u8>) {
        let mut buf = vec![0u8; 4096];
        let s = self.e.read_at(vol, sector, &mut buf);
        (s, buf)
    }

    /// Starts a 4 KiB write that may stay queued; returns its tag. The buffer is leaked so it
    /// outlives the I/O whatever the test does.
    fn submit_write(&mut self, vol: DevId, sector: Sector, fill: u8) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        let buf: &'static mut [u8] = Box::leak(vec![fill; 4096].into_boxed_slice());
        // SAFETY: the buffer is leaked, so it lives (untouched) past the I/O's completion.
        let data = unsafe { DataBuf::from_slice(buf) };
        self.e
            .submit(&Request::new(Op::Write, vol, sector, 8, data, tag))
            .unwrap();
        tag
    }

    /// Runs the reactor until `cond` holds on the completions so far, or `within` passes.
    fn run_until(
        &mut self,
        within: Duration,
        cond: impl Fn(&HashMap<u64, Status>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let n = self.e.poll();
            while let Some(c) = self.e.reap() {
                self.done.insert(c.user_data, c.status);
            }
            if cond(&self.done) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if n == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Waits for I/O `tag`; None if it did not complete within `within`.
    fn wait(&mut self, tag: u64, within: Duration) -> Option<Status> {
        self.run_until(within, |d| d.contains_key(&tag));
        self.done.get(&tag).copied()
    }

    /// Runs the reactor for `d`, checking that `tag` stays pending.
    fn stays_pending(&mut self, tag: u64, d: Duration) {
        assert!(
            !self.run_until(d, |done| done.contains_key(&tag)),
            "I/O {tag} completed ({:?}) while it should have been queued",
            self.done.get(&tag)
        );
    }

    /// Polls until `f` is true or `within` passes (for the checker thread's effects).
    fn eventually(&mut self, within: Duration, mut f: impl FnMut(&mut Rig) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if f(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.e.poll();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A long checker interval: the checker never interferes with message-driven tests.
const NO_CHECKER: &str = "checker_interval_ms 3600000";

// ---------------------------------------------------------------- constructor

fn ctor_rig() -> Rig {
    let mut r = Rig::new(3);
    let data = Arc::new(Mutex::new(vec![0u8; SECTORS as usize * SECTOR_SIZE]));
    r.e.add_leaf(
        "small",
        Arc::new(PathLeaf {
            data,
            ctl: Arc::new(Ctl::default()),
            sectors: SECTORS / 2,
        }),
    )
    .unwrap();
    r.e.create("lv", Some(&format!("0 {SECTORS} linear p2 0")))
        .unwrap();
    r
}

fn canonical(r: &Rig, args: &str) -> String {
    let t =
        r.e.check_table(&format!("0 {SECTORS} multipath {args}"))
            .unwrap_or_else(|e| panic!("'{args}' refused: {e}"));
    t.to_string()
        .trim_end()
        .strip_prefix(&format!("0 {SECTORS} multipath "))
        .unwrap()
        .to_string()
}

#[test]
fn good_tables_round_trip_through_their_canonical_form() {
    let r = ctor_rig();
    let cases = [
        (
            "0 0 1 1 round-robin 0 2 1 p0 1 p1 1",
            "0 0 1 1 round-robin 0 2 1 p0 1 p1 1",
        ),
        (
            "0 0 1 1 round-robin 0 2 0 p0 p1",
            "0 0 1 1 round-robin 0 2 1 p0 1 p1 1",
        ),
        (
            "1 queue_if_no_path 0 1 1 queue-length 0 2 1 p0 1 p1 1",
            "1 queue_if_no_path 0 1 1 queue-length 0 2 1 p0 1 p1 1",
        ),
        (
            "1 QUEUE_IF_NO_PATH 0 1 1 queue-length 0 1 0 p0",
            "1 queue_if_no_path 0 1 1 queue-length 0 1 1 p0 1",
        ),
        (
            "2 no_path_retry queue 0 1 1 round-robin 0 1 1 p0 1",
            "1 queue_if_no_path 0 1 1 round-robin 0 1 1 p0 1",
        ),
        (
            "2 no_path_retry fail 0 1 1 round-robin 0 1 1 p0 1",
            "0 0 1 1 round-robin 0 1 1 p0 1",
        ),
        (
            "3 queue_if_no_path no_path_retry 7 0 1 1 round-robin 0 1 1 p0 1",
            "2 no_path_retry 7 0 1 1 round-robin 0 1 1 p0 1",
        ),
        (
            "4 no_path_retry 5 checker_interval_ms 250 0 1 1 service-time 0 2 2 p0 1 4 p1 1 0",
            "4 no_path_retry 5 checker_interval_ms 250 0 1 1 service-time 0 2 2 p0 1 4 p1 1 0",
        ),
        (
            "0 0 1 1 service-time 0 2 1 p0 2 p1 1",
            "0 0 1 1 service-time 0 2 2 p0 2 1 p1 1 1",
        ),
        (
            "2 queue_mode bio 0 2 2 round-robin 0 1 1 p0 3 round-robin 0 1 1 lv 1",
            "2 queue_mode bio 0 2 2 round-robin 0 1 1 p0 3 round-robin 0 1 1 lv 1",
        ),
        (
            "2 queue_mode rq 0 1 1 round-robin 0 1 1 p0 1",
            "0 0 1 1 round-robin 0 1 1 p0 1",
        ),
        (
            "5 retain_attached_hw_handler pg_init_delay_msecs 100 pg_init_retries 3 0 1 1 round-robin 0 1 1 p0 1",
            "5 pg_init_retries 3 pg_init_delay_msecs 100 retain_attached_hw_handler 0 1 1 round-robin 0 1 1 p0 1",
        ),
        (
            "0 2 emc 1 1 1 round-robin 0 1 1 p0 1",
            "0 2 emc 1 1 1 round-robin 0 1 1 p0 1",
        ),
        (
            "0 1 alua 1 1 round-robin 0 1 1 p0 1",
            "0 1 alua 1 1 round-robin 0 1 1 p0 1",
        ),
        (
            "0 0 1 1 historical-service-time 0 2 0 p0 p1",
            "0 0 1 1 historical-service-time 2 972 0 2 1 p0 1 p1 1",
        ),
        (
            "0 0 1 1 historical-service-time 2 900 3 1 1 p0 1",
            "0 0 1 1 historical-service-time 2 900 3 1 1 p0 1",
        ),
        (
            "0 0 3 2 round-robin 0 1 1 p0 1 queue-length 0 1 1 p1 1 service-time 0 1 2 p2 1 1",
            "0 0 3 2 round-robin 0 1 1 p0 1 queue-length 0 1 1 p1 1 service-time 0 1 2 p2 1 1",
        ),
        ("0 0 0 0", "0 0 0 0"),
    ];
    for (input, want) in cases {
        let got = canonical(&r, input);
        assert_eq!(got, want, "canonical form of '{input}'");
        assert_eq!(
            canonical(&r, &got),
            got,
            "'{got}' is its own canonical form"
        );
    }
}

#[test]
fn bad_tables_are_refused_naming_the_field() {
    let r = ctor_rig();
    let devices = r.e.ls();
    let cases: &[(&str, &str, &str)] = &[
        ("", "#features", "missing"),
        ("x", "#features", "not a non-negative integer"),
        (
            "1 bogus 0 1 1 round-robin 0 1 1 p0 1",
            "features",
            "unknown feature 'bogus'",
        ),
        (
            "20 queue_if_no_path 0 1 1 round-robin 0 1 1 p0 1",
            "#features",
            "20 words announced",
        ),
        (
            "1 no_path_retry 0 1 1 round-robin 0 1 1 p0 1",
            "no_path_retry",
            "missing",
        ),
        (
            "2 no_path_retry soon 0 1 1 round-robin 0 1 1 p0 1",
            "no_path_retry",
            "'soon'",
        ),
        (
            "2 queue_mode nvme 0 1 1 round-robin 0 1 1 p0 1",
            "queue_mode",
            "unknown queue mode 'nvme'",
        ),
        (
            "1 queue_mode 0 1 1 round-robin 0 1 1 p0 1",
            "queue_mode",
            "missing",
        ),
        (
            "2 pg_init_retries 51 0 1 1 round-robin 0 1 1 p0 1",
            "pg_init_retries",
            "1..=50",
        ),
        (
            "2 pg_init_delay_msecs 60001 0 1 1 round-robin 0 1 1 p0 1",
            "pg_init_delay_msecs",
            "0..=60000",
        ),
        (
            "2 checker_interval_ms 0 0 1 1 round-robin 0 1 1 p0 1",
            "checker_interval_ms",
            "1..=3600000",
        ),
        ("0 5 alua", "#hw_handler_args", "5 words announced"),
        ("0 0", "#pgs", "missing"),
        ("0 0 1", "initial_pg", "missing"),
        ("0 0 1 2 round-robin 0 1 1 p0 1", "initial_pg", "1..=1"),
        ("0 0 1 0 round-robin 0 1 1 p0 1", "initial_pg", "1..=1"),
        ("0 0 0 1", "initial_pg", "there are none"),
        (
            "0 0 1 1 fancy 0 1 1 p0 1",
            "selector",
            "unknown path selector 'fancy'",
        ),
        (
            "0 0 1 1 round-robin 1 x 1 1 p0 1",
            "#selector_args",
            "takes no selector arguments",
        ),
        (
            "0 0 1 1 historical-service-time 3 1 2 3 1 1 p0 1",
            "#selector_args",
            "at most 2",
        ),
        (
            "0 0 1 1 historical-service-time 1 1024 1 1 p0 1",
            "base_weight",
            "1024",
        ),
        (
            "0 0 1 1 round-robin 0 1 2 p0 1 1",
            "#path_args",
            "round-robin takes at most 1",
        ),
        (
            "0 0 1 1 queue-length 0 1 2 p0 1 1",
            "#path_args",
            "queue-length takes at most 1",
        ),
        (
            "0 0 1 1 service-time 0 1 3 p0 1 1 1",
            "#path_args",
            "service-time takes at most 2",
        ),
        (
            "0 0 1 1 historical-service-time 0 1 2 p0 1 1",
            "#path_args",
            "historical-service-time takes at most 1",
        ),
        (
            "0 0 1 1 service-time 0 1 2 p0 1 101",
            "relative_throughput",
            "0..=100",
        ),
        (
            "0 0 1 1 round-robin 0 1 1 p0 0",
            "repeat_count",
            "at least 1",
        ),
        ("0 0 1 1 round-robin 0 1 1 p0 x", "repeat_count", "'x'"),
        ("0 0 1 1 round-robin 0 0 1", "#paths", "1..=1024"),
        ("0 0 1 1 round-robin 0 2 1 p0 1", "path", "missing"),
        (
            "0 0 1 1 round-robin 0 2 1 p0 1 p1",
            "#path_args",
            "only 0 left",
        ),
        (
            "0 0 1 1 round-robin 0 2 1 p0 1 p0 1",
            "path",
            "'p0' is listed twice",
        ),
        (
            "0 0 2 1 round-robin 0 1 1 p0 1 round-robin 0 1 1 p0 1",
            "path",
            "groups 1 and 2",
        ),
        (
            "0 0 1 1 round-robin 0 1 1 small 1",
            "path",
            "passes the end",
        ),
        (
            "0 0 1 1 round-robin 0 1 1 nope 1",
            "path",
            "unknown device 'nope'",
        ),
        (
            "0 0 1 1 round-robin 0 1 1 lv 1",
            "path",
            "queue_mode rq maps requests onto leaves; 'lv' is a volume (use queue_mode bio)",
        ),
        (
            "0 0 2 1 round-robin 0 1 1 p0 1",
            "selector",
            "priority group 2 of 2",
        ),
        (
            "0 0 1 1 round-robin 0 1 1 p0 1 extra",
            "#pgs",
            "'extra' follows the last",
        ),
    ];
    for &(args, field, reason) in cases {
        let e =
            r.e.check_table(&format!("0 {SECTORS} multipath {args}"))
                .err()
                .unwrap_or_else(|| panic!("'{args}' was accepted"));
        assert_eq!(e.field, format!("multipath {field}"), "'{args}': {e}");
        assert!(
            e.reason.contains(reason),
            "'{args}': reason '{}' lacks '{reason}'",
            e.reason
        );
    }
    // Nothing was built: the engine has only what the rig made.
    assert_eq!(r.e.ls(), devices);
}

// ---------------------------------------------------------------- failover and errors

#[test]
fn path_error_fails_over_to_the_next_path() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "fo",
        &format!("2 {NO_CHECKER} 0 1 1 round-robin 0 2 1 p0 1 p1 1"),
    );
    let ev0 = r.events("fo");
    r.ctl[0].down();
    for i in 0..8 {
        assert_eq!(r.write(vol, i * 8, 0x40 + i as u8), Status::Ok);
    }
    let st = r.status("fo");
    assert!(st.contains("p0 F 1"), "{st}");
    assert!(st.contains("p1 A 0"), "{st}");
    assert_eq!(st, "2 0 0 0 1 1 A 0 2 0 p0 F 1 p1 A 0");
    assert!(r.events("fo") > ev0, "failing a path raises an event");
    // p0 saw exactly one I/O (the one that failed over), p1 all of them.
    assert_eq!(r.ctl[0].ios(), 1);
    assert_eq!(r.ctl[1].ios(), 8);
    // The data is there, read back through the surviving path.
    for i in 0..8 {
        let (s, buf) = r.read(vol, i * 8);
        assert_eq!(s, Status::Ok);
        assert!(buf.iter().all(|&b| b == 0x40 + i as u8));
    }
    assert_eq!(r.ctl[0].ios(), 1);
    // Healed and reinstated: both paths take I/O again.
    r.ctl[0].up();
    r.msg("fo", &["reinstate_path", "p0"]).unwrap();
    for i in 0..4 {
        assert_eq!(r.write(vol, i * 8, 1), Status::Ok);
    }
    assert_eq!(r.ctl[0].ios(), 3);
    assert_eq!(r.status("fo"), "2 0 0 0 1 1 A 0 2 0 p0 A 1 p1 A 0");
    assert_eq!(r.e.reactor().stats.requeued, 1);
}

#[test]
fn path_error_fails_over_to_the_next_group() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "fg",
        &format!("2 {NO_CHECKER} 0 2 1 round-robin 0 1 1 p0 1 round-robin 0 1 1 p1 1"),
    );
    assert_eq!(r.write(vol, 0, 1), Status::Ok);
    assert_eq!(r.ctl[0].ios(), 1);
    r.ctl[0].down();
    assert_eq!(r.write(vol, 0, 2), Status::Ok);
    assert_eq!(r.status("fg"), "2 0 0 0 2 2 E 0 1 0 p0 F 1 A 0 1 0 p1 A 0");
    assert_eq!(r.ctl[1].ios(), 1);
}

#[test]
fn target_error_is_returned_and_the_path_stays_active() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "te",
        &format!("2 {NO_CHECKER} 0 2 1 round-robin 0 1 1 p0 1 round-robin 0 1 1 p1 1"),
    );
    let ev0 = r.events("te");
    r.ctl[0].io_fail.store(true, SeqCst);
    assert_eq!(r.write(vol, 0, 1), Status::IoError);
    assert_eq!(r.read(vol, 0).0, Status::IoError);
    assert_eq!(r.status("te"), "2 0 0 0 2 1 A 0 1 0 p0 A 0 E 0 1 0 p1 A 0");
    assert_eq!(r.ctl[1].ios(), 0, "a target error is not retried elsewhere");
    assert_eq!(r.events("te"), ev0);
    r.ctl[0].io_fail.store(false, SeqCst);
    assert_eq!(r.write(vol, 0, 1), Status::Ok);
}

// ---------------------------------------------------------------- queueing

#[test]
fn queue_if_no_path_holds_io_until_a_path_is_reinstated() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "qp",
        &format!("3 queue_if_no_path {NO_CHECKER} 0 1 1 round-robin 0 2 1 p0 1 p1 1"),
    );
    r.ctl[0].down();
    r.ctl[1].down();
    let tag = r.submit_write(vol, 16, 0x5a);
    r.stays_pending(tag, Duration::from_millis(150));
    let st = r.status("qp");
    assert!(
        st.starts_with("2 1 0 "),
        "queue_io is 1 while queueing: {st}"
    );
    assert!(st.contains("p0 F 1") && st.contains("p1 F 1"), "{st}");
    // Healing alone does nothing (no checker in this test); the message brings the path back.
    r.ctl[1].up();
    r.stays_pending(tag, Duration::from_millis(30));
    r.msg("qp", &["reinstate_path", "p1"]).unwrap();
    assert_eq!(r.wait(tag, Duration::from_secs(2)), Some(Status::Ok));
    let (s, buf) = r.read(vol, 16);
    assert_eq!(s, Status::Ok);
    assert!(buf.iter().all(|&b| b == 0x5a));
    assert!(r.status("qp").starts_with("2 0 0 "));
    assert!(r.e.reactor().stats.requeued > 2);
}

#[test]
fn checker_reinstates_a_healed_path_and_queued_io_goes_on() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "ck",
        "3 queue_if_no_path checker_interval_ms 20 0 1 1 round-robin 0 2 1 p0 1 p1 1",
    );
    r.ctl[0].down();
    r.ctl[1].down();
    let tag = r.submit_write(vol, 0, 7);
    r.stays_pending(tag, Duration::from_millis(120));
    let ev = r.events("ck");
    r.ctl[1].up();
    let t0 = Instant::now();
    assert_eq!(r.wait(tag, Duration::from_secs(2)), Some(Status::Ok));
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert!(r.events("ck") > ev, "reinstating raises an event");
    let st = r.status("ck");
    assert!(st.contains("p0 F 1") && st.contains("p1 A 1"), "{st}");
}

#[test]
fn checker_fails_a_path_whose_probe_fails() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "cf",
        "2 checker_interval_ms 20 0 1 1 round-robin 0 2 1 p0 1 p1 1",
    );
    let ev = r.events("cf");
    r.ctl[0].probe_fail.store(true, SeqCst);
    assert!(
        r.eventually(Duration::from_secs(2), |r| r
            .status("cf")
            .contains("p0 F 1")),
        "{}",
        r.status("cf")
    );
    assert!(r.events("cf") > ev);
    // No I/O goes to the failed path, and the checker brings it back once it answers.
    for i in 0..6 {
        assert_eq!(r.write(vol, i * 8, 1), Status::Ok);
    }
    assert_eq!(r.ctl[0].ios(), 0);
    r.ctl[0].probe_fail.store(false, SeqCst);
    assert!(
        r.eventually(Duration::from_secs(2), |r| r
            .status("cf")
            .contains("p0 A 1")),
        "{}",
        r.status("cf")
    );
}

/// Probes run side by side: two paths whose servers hang until the probe timeout are probed
/// at the same time, and a path refused at once is failed at once, not after the hanging ones.
#[test]
fn checker_probes_paths_side_by_side() {
    let mut r = Rig::new(4);
    let vol = r.create(
        "par",
        "2 checker_interval_ms 300 0 1 1 round-robin 0 4 1 p0 1 p1 1 p2 1 p3 1",
    );
    r.ctl[0].probe_hang.store(true, SeqCst);
    r.ctl[1].probe_hang.store(true, SeqCst);
    r.ctl[2].probe_fail.store(true, SeqCst);
    let mut early = false;
    assert!(
        r.eventually(Duration::from_secs(5), |r| {
            let st = r.status("par");
            early |= st.contains("p2 F 1") && st.contains("p0 A 0");
            st.contains("p0 F 1") && st.contains("p1 F 1") && st.contains("p2 F 1")
        }),
        "{}",
        r.status("par")
    );
    assert!(
        early,
        "the refused path was failed only with the hanging ones"
    );
    let (a, b) = (
        r.ctl[0].probes.lock().unwrap().clone(),
        r.ctl[1].probes.lock().unwrap().clone(),
    );
    assert!(
        a.iter().any(|x| b.iter().any(|y| x.0 < y.1 && y.0 < x.1)),
        "the two hanging probes never overlapped: {a:?} / {b:?}"
    );
    assert!(r.status("par").contains("p3 A 0"), "{}", r.status("par"));
    assert_eq!(r.write(vol, 0, 3), Status::Ok);
    assert_eq!(r.ctl[3].writes.load(SeqCst), 1);
}

#[test]
fn no_path_retry_fails_after_n_checker_intervals_not_before() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "npr",
        "4 no_path_retry 3 checker_interval_ms 50 0 1 1 round-robin 0 2 1 p0 1 p1 1",
    );
    let t0 = Instant::now();
    r.ctl[0].down();
    r.ctl[1].down();
    let tag = r.submit_write(vol, 0, 1);
    r.run_until(Duration::from_millis(60), |_| false);
    assert!(r.status("npr").starts_with("2 1 0 "), "{}", r.status("npr"));
    let st = r.wait(tag, Duration::from_secs(3));
    let took = t0.elapsed();
    assert_eq!(st, Some(Status::IoError));
    assert!(
        took >= Duration::from_millis(150),
        "failed after {took:?}, before 3 x 50 ms"
    );
    assert!(
        took < Duration::from_millis(1000),
        "failed only after {took:?}"
    );
    // Expired: new I/O fails at once, and status no longer says queueing.
    let t1 = Instant::now();
    assert_eq!(r.write(vol, 0, 1), Status::IoError);
    assert!(
        t1.elapsed() < Duration::from_millis(40),
        "{:?}",
        t1.elapsed()
    );
    assert!(r.status("npr").starts_with("2 0 0 "));
    // A path comes back (the checker sees it): I/O flows, and a new outage queues again.
    r.ctl[0].up();
    assert!(r.eventually(Duration::from_secs(2), |r| r.status("npr").contains("p0 A")));
    assert_eq!(r.write(vol, 0, 1), Status::Ok);
    r.ctl[0].down();
    let tag = r.submit_write(vol, 0, 1);
    r.stays_pending(tag, Duration::from_millis(80));
    assert_eq!(r.wait(tag, Duration::from_secs(3)), Some(Status::IoError));
}

#[test]
fn fail_if_no_path_fails_at_once_and_releases_queued_io() {
    let mut r = Rig::new(1);
    // Without queueing, no path means an error at once.
    let vol = r.create(
        "nq",
        &format!("2 {NO_CHECKER} 0 1 1 round-robin 0 1 1 p0 1"),
    );
    r.ctl[0].down();
    let t0 = Instant::now();
    assert_eq!(r.write(vol, 0, 1), Status::IoError);
    assert_eq!(r.write(vol, 0, 1), Status::IoError);
    assert!(t0.elapsed() < Duration::from_millis(100));
    r.ctl[0].up();
    r.msg("nq", &["reinstate_path", "p0"]).unwrap();

    let vol = r.create(
        "fq",
        &format!("3 queue_if_no_path {NO_CHECKER} 0 1 1 round-robin 0 1 1 p0 1"),
    );
    r.ctl[0].down();
    let a = r.submit_write(vol, 0, 1);
    let b = r.submit_write(vol, 8, 2);
    r.stays_pending(a, Duration::from_millis(60));
    assert!(!r.done.contains_key(&b));
    r.msg("fq", &["fail_if_no_path"]).unwrap();
    let t1 = Instant::now();
    assert_eq!(r.wait(a, Duration::from_secs(1)), Some(Status::IoError));
    assert_eq!(r.wait(b, Duration::from_secs(1)), Some(Status::IoError));
    assert!(
        t1.elapsed() < Duration::from_millis(100),
        "{:?}",
        t1.elapsed()
    );
    assert_eq!(r.write(vol, 0, 1), Status::IoError);
    assert_eq!(
        r.table("fq"),
        "2 checker_interval_ms 3600000 0 1 1 round-robin 0 1 1 p0 1",
        "the table shows the queueing mode messages left"
    );
    // And back to queueing.
    r.msg("fq", &["queue_if_no_path"]).unwrap();
    assert!(r.table("fq").starts_with("3 queue_if_no_path "));
    let c = r.submit_write(vol, 0, 3);
    r.stays_pending(c, Duration::from_millis(40));
    r.ctl[0].up();
    r.msg("fq", &["reinstate_path", "p0"]).unwrap();
    assert_eq!(r.wait(c, Duration::from_secs(1)), Some(Status::Ok));
}

#[test]
fn flushing_suspend_fails_queued_io_and_resume_queues_again() {
    let mut r = Rig::new(1);
    let vol = r.create(
        "sus",
        &format!("3 queue_if_no_path {NO_CHECKER} 0 1 1 round-robin 0 1 1 p0 1"),
    );
    r.ctl[0].down();
    let a = r.submit_write(vol, 0, 1);
    r.stays_pending(a, Duration::from_millis(40));
    r.e.suspend(
        "sus",
        SuspendOpts {
            noflush: false,
            deadline: None,
            drain_timeout: Duration::from_secs(2),
        },
    )
    .unwrap();
    assert_eq!(r.wait(a, Duration::from_secs(1)), Some(Status::IoError));
    r.e.resume("sus").unwrap();
    let b = r.submit_write(vol, 0, 2);
    r.stays_pending(b, Duration::from_millis(40));
    r.ctl[0].up();
    r.msg("sus", &["reinstate_path", "p0"]).unwrap();
    assert_eq!(r.wait(b, Duration::from_secs(1)), Some(Status::Ok));
    // Remove drains: a volume with nothing queued goes away cleanly, its checker with it.
    r.e.remove("sus", false).unwrap();
}

/// A table of two multipath targets, each over half of the volume, both on `path`: I/O that
/// crosses the middle is split into pieces, one per target.
fn two_halves(mode: &str, path: &str) -> String {
    let half = SECTORS / 2;
    (0..2)
        .map(|i| {
            format!(
                "{} {half} multipath 5 queue_if_no_path queue_mode {mode} {NO_CHECKER} \
                 0 1 1 round-robin 0 1 1 {path} 1\n",
                i * half
            )
        })
        .collect()
}

/// A rig of `paths` paths with volume `NAME-MODE` over [`two_halves`] on `p0`, which is down.
fn two_halves_on_a_dead_p0(paths: usize, name: &str, mode: &str) -> (Rig, String, DevId) {
    let mut r = Rig::new(paths);
    let name = format!("{name}-{mode}");
    let vol = r.e.create(&name, Some(&two_halves(mode, "p0"))).unwrap();
    r.ctl[0].down();
    (r, name, vol)
}

/// `reinstate_path p0` in both targets of a [`two_halves`] volume.
fn reinstate_p0_in_both_halves(r: &mut Rig, name: &str) {
    for line in 0..2 {
        r.e.message(name, line * (SECTORS / 2), &["reinstate_path", "p0"])
            .unwrap();
    }
}

const NOFLUSH: SuspendOpts = SuspendOpts {
    noflush: true,
    deadline: None,
    drain_timeout: Duration::from_secs(5),
};

#[test]
fn noflush_suspend_holds_queued_io_across_a_table_swap() {
    for mode in ["rq", "bio"] {
        let (mut r, name, vol) = two_halves_on_a_dead_p0(2, "nf", mode);
        let half = SECTORS / 2;
        // One write in each half, and one across the middle (split into two pieces).
        let writes = [(8, 0x11u8), (half - 4, 0x22), (half + 16, 0x33)];
        let tags: Vec<u64> = writes
            .iter()
            .map(|&(sector, fill)| r.submit_write(vol, sector, fill))
            .collect();
        r.stays_pending(tags[0], Duration::from_millis(60));
        // Without noflush the queued writes would fail; without pushback this suspend would
        // wait for them and give up after its drain timeout.
        let t0 = Instant::now();
        r.e.suspend(&name, NOFLUSH).unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{mode}: {:?}",
            t0.elapsed()
        );
        assert!(r.e.info(&name).unwrap().suspended);
        for &t in &tags {
            r.stays_pending(t, Duration::from_millis(20));
        }
        assert_eq!(r.e.reactor().held(vol), 3, "{mode}: held as they came");
        assert!(r.e.reactor().stats.pushed_back >= 3, "{mode}");
        // A new table over a working path: the held writes complete through it.
        let p1_before = r.ctl[1].writes.load(SeqCst);
        r.e.load(&name, &two_halves(mode, "p1")).unwrap();
        r.e.resume(&name).unwrap();
        for &t in &tags {
            assert_eq!(
                r.wait(t, Duration::from_secs(2)),
                Some(Status::Ok),
                "{mode}: write {t}"
            );
        }
        assert!(r.ctl[1].writes.load(SeqCst) >= p1_before + 4, "{mode}");
        for &(sector, fill) in &writes {
            let (s, buf) = r.read(vol, sector);
            assert_eq!(s, Status::Ok);
            assert!(
                buf.iter().all(|&b| b == fill),
                "{mode}: sector {sector} lost its data"
            );
        }
        // The old path saw the attempts only: nothing reached it after the swap.
        let p0 = r.ctl[0].writes.load(SeqCst);
        assert_eq!(r.write(vol, 0, 9), Status::Ok);
        assert_eq!(r.ctl[0].writes.load(SeqCst), p0);
        r.e.remove(&name, false).unwrap();
    }
}

/// Pushed-back I/O goes ahead of I/O that arrived while the volume was suspended: it came
/// first. With reactor threads, new I/O can be held while a noflush suspend still drains; here
/// the reactor is driven by hand to get that order of events: write A is in flight on its
/// path when the volume's reactor suspends, write B to the same place arrives and is held, then
/// A fails on its path and is pushed back. On resume A must be issued before B, so B's data is
/// what stays.
#[test]
fn pushed_back_io_goes_ahead_of_io_held_during_the_suspend() {
    for mode in ["rq", "bio"] {
        let mut r = Rig::new(1);
        let name = format!("ord-{mode}");
        let vol = r.e.create(&name, Some(&two_halves(mode, "p0"))).unwrap();
        r.ctl[0].hold.store(true, SeqCst);
        let a = r.submit_write(vol, 64, 0xaa);
        r.stays_pending(a, Duration::from_millis(20));
        r.e.reactor_mut().suspend(vol, true);
        let b = r.submit_write(vol, 64, 0xbb);
        r.stays_pending(b, Duration::from_millis(10));
        assert_eq!(r.e.reactor().held(vol), 1, "{mode}: B is held");
        // A's path fails under it: A is requeued, and pushed back.
        r.ctl[0].down();
        r.ctl[0].hold.store(false, SeqCst);
        assert!(
            r.eventually(Duration::from_secs(2), |r| r.e.reactor().held(vol) == 2),
            "{mode}: A was not pushed back"
        );
        r.ctl[0].up();
        reinstate_p0_in_both_halves(&mut r, &name);
        r.e.reactor_mut().resume(vol);
        assert_eq!(r.wait(a, Duration::from_secs(2)), Some(Status::Ok));
        assert_eq!(r.wait(b, Duration::from_secs(2)), Some(Status::Ok));
        let (s, buf) = r.read(vol, 64);
        assert_eq!(s, Status::Ok);
        assert!(
            buf.iter().all(|&x| x == 0xbb),
            "{mode}: the older write landed last"
        );
    }
}

#[test]
fn noflush_suspend_then_resume_on_the_same_table_queues_again() {
    for mode in ["rq", "bio"] {
        let (mut r, name, vol) = two_halves_on_a_dead_p0(1, "nfs", mode);
        let a = r.submit_write(vol, SECTORS / 2 - 4, 0x5c);
        r.stays_pending(a, Duration::from_millis(40));
        r.e.suspend(&name, NOFLUSH).unwrap();
        r.stays_pending(a, Duration::from_millis(20));
        r.e.resume(&name).unwrap();
        // Back in the same target: queued again, not failed.
        r.stays_pending(a, Duration::from_millis(60));
        r.ctl[0].up();
        reinstate_p0_in_both_halves(&mut r, &name);
        assert_eq!(r.wait(a, Duration::from_secs(2)), Some(Status::Ok));
        let (s, buf) = r.read(vol, SECTORS / 2 - 4);
        assert_eq!(s, Status::Ok);
        assert!(buf.iter().all(|&b| b == 0x5c), "{mode}");
    }
}

#[test]
fn nowait_io_with_no_path_gets_again_instead_of_queueing() {
    let mut r = Rig::new(1);
    let vol = r.create(
        "nw",
        &format!("3 queue_if_no_path {NO_CHECKER} 0 1 1 round-robin 0 1 1 p0 1"),
    );
    r.msg("nw", &["fail_path", "p0"]).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` outlives the I/O, which completes before `wait` returns.
    let data = unsafe { DataBuf::from_slice(&mut buf) };
    let mut req = Request::new(Op::Write, vol, 0, 8, data, 99);
    req.flags = stackbd_core::BioFlags::NOWAIT;
    r.e.submit(&req).unwrap();
    assert_eq!(r.wait(99, Duration::from_secs(1)), Some(Status::Again));
}

// ---------------------------------------------------------------- selectors

#[test]
fn round_robin_spreads_io_evenly_and_honours_repeat_count() {
    let mut r = Rig::new(3);
    let vol = r.create(
        "rr",
        &format!("2 {NO_CHECKER} 0 1 1 round-robin 0 2 1 p0 1 p1 1"),
    );
    for i in 0..100 {
        assert_eq!(r.write(vol, (i % 200) * 8, 1), Status::Ok);
    }
    assert_eq!(r.ctl[0].writes.load(SeqCst), 50);
    assert_eq!(r.ctl[1].writes.load(SeqCst), 50);

    let mut r = Rig::new(3);
    let vol = r.create(
        "rr3",
        &format!("2 {NO_CHECKER} 0 1 1 round-robin 0 3 1 p0 2 p1 1 p2 1"),
    );
    let mut seq = Vec::new();
    for _ in 0..8 {
        let before: Vec<u64> = r.ctl.iter().map(|c| c.ios()).collect();
        assert_eq!(r.write(vol, 0, 1), Status::Ok);
        seq.push((0..3).find(|&i| r.ctl[i].ios() > before[i]).unwrap());
    }
    assert_eq!(seq, [0, 0, 1, 2, 0, 0, 1, 2]);
    // A failed path's turns go to the others, still evenly.
    r.msg("rr3", &["fail_path", "p0"]).unwrap();
    let before: Vec<u64> = r.ctl.iter().map(|c| c.ios()).collect();
    for _ in 0..40 {
        assert_eq!(r.write(vol, 0, 1), Status::Ok);
    }
    assert_eq!(r.ctl[0].ios(), before[0]);
    assert_eq!(r.ctl[1].ios() - before[1], 20);
    assert_eq!(r.ctl[2].ios() - before[2], 20);
}

/// Submits `n` writes one at a time while path 0 holds its I/O; returns how many each path got.
fn spread_with_p0_holding(r: &mut Rig, vol: DevId, n: u64) -> [u64; 2] {
    let before = [r.ctl[0].ios(), r.ctl[1].ios()];
    r.ctl[0].hold.store(true, SeqCst);
    let mut tags = Vec::new();
    for i in 0..n {
        let t = r.submit_write(vol, i * 8, 1);
        tags.push(t);
        for _ in 0..4 {
            r.e.poll();
        }
        while let Some(c) = r.e.reap() {
            r.done.insert(c.user_data, c.status);
        }
    }
    let got = [r.ctl[0].ios() - before[0], r.ctl[1].ios() - before[1]];
    r.ctl[0].hold.store(false, SeqCst);
    assert!(r.run_until(Duration::from_secs(2), |d| tags
        .iter()
        .all(|t| d.contains_key(t))));
    assert!(tags.iter().all(|t| r.done[t] == Status::Ok));
    got
}

#[test]
fn queue_length_prefers_the_path_with_fewer_in_flight() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "ql",
        &format!("2 {NO_CHECKER} 0 1 1 queue-length 0 2 1 p0 1 p1 1"),
    );
    let got = spread_with_p0_holding(&mut r, vol, 20);
    assert!(got[0] <= 1, "p0 held I/O yet got {got:?}");
    assert_eq!(got[0] + got[1], 20);
    // Status shows the queue length while I/O is held.
    r.ctl[0].hold.store(true, SeqCst);
    let t = r.submit_write(vol, 0, 1);
    let t2 = r.submit_write(vol, 8, 1);
    r.run_until(Duration::from_millis(20), |_| false);
    let st = r.status("ql");
    assert!(
        st.contains("p0 A 0 1") || st.contains("p0 A 0 2"),
        "in-flight count in status: {st}"
    );
    r.ctl[0].hold.store(false, SeqCst);
    assert!(r.run_until(Duration::from_secs(1), |d| d.contains_key(&t)
        && d.contains_key(&t2)));
    assert_eq!(r.status("ql"), "2 0 0 0 1 1 A 0 2 1 p0 A 0 0 p1 A 0 0");
}

#[test]
fn service_time_prefers_less_loaded_and_faster_paths() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "st",
        &format!("2 {NO_CHECKER} 0 1 1 service-time 0 2 2 p0 1 1 p1 1 1"),
    );
    let got = spread_with_p0_holding(&mut r, vol, 20);
    assert!(got[0] <= 1, "p0 held I/O yet got {got:?}");
    // Bytes in flight and throughput in the status.
    r.ctl[0].hold.store(true, SeqCst);
    let t = r.submit_write(vol, 0, 1);
    let t2 = r.submit_write(vol, 8, 1);
    r.run_until(Duration::from_millis(20), |_| false);
    let st = r.status("st");
    assert!(
        st.contains("p0 A 0 4096 1") || st.contains("p0 A 0 8192 1"),
        "{st}"
    );
    r.ctl[0].hold.store(false, SeqCst);
    assert!(r.run_until(Duration::from_secs(1), |d| d.contains_key(&t)
        && d.contains_key(&t2)));

    // Throughput 0: used only when no other path is left.
    let mut r = Rig::new(2);
    let vol = r.create(
        "st0",
        &format!("2 {NO_CHECKER} 0 1 1 service-time 0 2 2 p0 1 0 p1 1 5"),
    );
    for _ in 0..20 {
        assert_eq!(r.write(vol, 0, 1), Status::Ok);
    }
    assert_eq!((r.ctl[0].ios(), r.ctl[1].ios()), (0, 20));
    r.msg("st0", &["fail_path", "p1"]).unwrap();
    for _ in 0..5 {
        assert_eq!(r.write(vol, 0, 1), Status::Ok);
    }
    assert_eq!((r.ctl[0].ios(), r.ctl[1].ios()), (5, 20));
    assert_eq!(r.status("st0"), "2 0 0 0 1 1 A 0 2 2 p0 A 0 0 0 p1 F 1 0 5");
}

#[test]
fn historical_service_time_avoids_a_path_holding_io() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "hst",
        &format!("2 {NO_CHECKER} 0 1 1 historical-service-time 0 2 1 p0 1 p1 1"),
    );
    // Warm up: both paths complete I/O, so both have estimates.
    for i in 0..20 {
        assert_eq!(r.write(vol, i * 8, 1), Status::Ok);
    }
    assert!(r.ctl[0].ios() > 0 && r.ctl[1].ios() > 0);
    let got = spread_with_p0_holding(&mut r, vol, 20);
    assert!(got[0] <= 1, "p0 held I/O yet got {got:?}");
    let st = r.status("hst");
    assert!(st.starts_with("2 0 0 0 1 1 A 2 972 0 2 3 p0 A 0 "), "{st}");
    assert_eq!(st.split(' ').count(), 6 + 6 + 2 * 6, "{st}");
}

// ---------------------------------------------------------------- groups and messages

#[test]
fn switch_disable_and_enable_groups() {
    let mut r = Rig::new(3);
    let vol = r.create(
        "grp",
        &format!(
            "2 {NO_CHECKER} 0 3 1 round-robin 0 1 1 p0 1 round-robin 0 1 1 p1 1 round-robin 0 1 1 p2 1"
        ),
    );
    let goes_to = |r: &mut Rig| {
        let before: Vec<u64> = r.ctl.iter().map(|c| c.ios()).collect();
        assert_eq!(r.write(vol, 0, 1), Status::Ok);
        (0..3).find(|&i| r.ctl[i].ios() > before[i]).unwrap()
    };
    let states = |r: &Rig| {
        let st = r.status("grp");
        let w: Vec<&str> = st.split(' ').collect();
        // 2 <q> <init> 0 3 <pg> then 7 words per group.
        let g: String = (0..3).map(|i| w[6 + 7 * i]).collect();
        format!("{} {g}", w[5])
    };
    assert_eq!(goes_to(&mut r), 0);
    assert_eq!(states(&r), "1 AEE");
    let ev = r.events("grp");

    r.msg("grp", &["switch_group", "3"]).unwrap();
    assert!(r.events("grp") > ev);
    assert_eq!(states(&r), "3 EEA");
    assert_eq!(goes_to(&mut r), 2);
    assert!(
        r.table("grp").contains(" 0 3 3 round-robin"),
        "{}",
        r.table("grp")
    );

    r.msg("grp", &["disable_group", "3"]).unwrap();
    assert_eq!(states(&r), "1 AED");
    assert_eq!(goes_to(&mut r), 0);

    r.msg("grp", &["disable_group", "1"]).unwrap();
    assert_eq!(states(&r), "2 DAD");
    assert_eq!(goes_to(&mut r), 1);

    // With every group disabled, a disabled group is still better than no path.
    r.msg("grp", &["disable_group", "2"]).unwrap();
    assert_eq!(states(&r), "1 DDD");
    assert_eq!(goes_to(&mut r), 0);

    r.msg("grp", &["enable_group", "2"]).unwrap();
    assert_eq!(states(&r), "2 DAD");
    assert_eq!(goes_to(&mut r), 1);

    // switch_group enables every group.
    r.msg("grp", &["switch_group", "1"]).unwrap();
    assert_eq!(states(&r), "1 AEE");
    assert_eq!(goes_to(&mut r), 0);

    // The current group is kept while it has a path: no failback on reinstate.
    r.msg("grp", &["fail_path", "p0"]).unwrap();
    assert_eq!(states(&r), "2 EAE");
    assert_eq!(goes_to(&mut r), 1);
    r.msg("grp", &["reinstate_path", "p0"]).unwrap();
    assert_eq!(states(&r), "2 EAE");
    assert_eq!(goes_to(&mut r), 1);
    assert_eq!(
        r.status("grp"),
        "2 0 0 0 3 2 E 0 1 0 p0 A 1 A 0 1 0 p1 A 0 E 0 1 0 p2 A 0"
    );
}

#[test]
fn bad_messages_are_refused() {
    let mut r = Rig::new(2);
    r.create(
        "bm",
        &format!("2 {NO_CHECKER} 0 2 1 round-robin 0 1 1 p0 1 round-robin 0 1 1 p1 1"),
    );
    let before = r.status("bm");
    for (argv, want) in [
        (&["switch_group", "0"][..], "not a priority group (1..=2)"),
        (&["switch_group", "3"][..], "not a priority group"),
        (&["enable_group", "x"][..], "not a priority group"),
        (
            &["disable_group"][..],
            "usage: disable_group <group number>",
        ),
        (&["fail_path", "p9"][..], "'p9' is not a path"),
        (&["reinstate_path", "p0", "p1"][..], "usage: reinstate_path"),
        (&["queue_if_no_path", "now"][..], "usage: queue_if_no_path"),
        (&["frobnicate"][..], "unknown message 'frobnicate'"),
        (&[][..], "empty message"),
    ] {
        let e = r
            .msg("bm", argv)
            .err()
            .unwrap_or_else(|| panic!("{argv:?} accepted"));
        assert!(e.contains(want), "{argv:?}: '{e}' lacks '{want}'");
    }
    assert_eq!(r.status("bm"), before);
    // Failing a failed path (or reinstating an active one) is not an error, and counts once.
    r.msg("bm", &["fail_path", "p1"]).unwrap();
    r.msg("bm", &["fail_path", "p1"]).unwrap();
    r.msg("bm", &["reinstate_path", "p0"]).unwrap();
    assert!(r.status("bm").contains("p1 F 1"));
}

// ---------------------------------------------------------------- modes, flush, lifecycle

#[test]
fn queue_mode_bio_fails_over_between_volumes_and_rq_is_request_based() {
    let mut r = Rig::new(2);
    r.e.create("lv0", Some(&format!("0 {SECTORS} linear p0 0")))
        .unwrap();
    r.e.create("lv1", Some(&format!("0 {SECTORS} linear p1 0")))
        .unwrap();
    let vol = r.create(
        "bio",
        &format!("4 queue_mode bio {NO_CHECKER} 0 1 1 round-robin 0 2 1 lv0 1 lv1 1"),
    );
    assert!(!r.e.live_table("bio").unwrap().unwrap().request_based());
    r.ctl[0].down();
    for i in 0..4 {
        assert_eq!(r.write(vol, i * 8, 9), Status::Ok);
    }
    assert_eq!(r.status("bio"), "2 0 0 0 1 1 A 0 2 0 lv0 F 1 lv1 A 0");

    let rq = r.create(
        "rq",
        &format!("2 {NO_CHECKER} 0 1 1 round-robin 0 2 1 p0 1 p1 1"),
    );
    assert!(r.e.live_table("rq").unwrap().unwrap().request_based());
    for i in 0..4 {
        assert_eq!(r.write(rq, i * 8, 3), Status::Ok);
    }
    assert!(r.status("rq").contains("p0 F 1"));
    let (s, buf) = r.read(rq, 8);
    assert_eq!(s, Status::Ok);
    assert!(buf.iter().all(|&b| b == 3));
}

#[test]
fn rq_mode_merges_bios_into_requests_and_fails_over_whole_requests() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "mrg",
        &format!("2 {NO_CHECKER} 0 1 1 round-robin 0 2 1 p0 1 p1 1"),
    );
    r.ctl[0].down();
    let before = r.e.reactor().stats;
    // A burst of 16 contiguous 4 KiB writes, submitted before the reactor runs.
    let tags: Vec<u64> = (0..16)
        .map(|i| r.submit_write(vol, i * 8, 0x30 + i as u8))
        .collect();
    assert!(r.run_until(Duration::from_secs(2), |d| tags
        .iter()
        .all(|t| d.contains_key(t))));
    assert!(tags.iter().all(|t| r.done[t] == Status::Ok), "{:?}", r.done);
    let after = r.e.reactor().stats;
    assert_eq!(after.rq_bios - before.rq_bios, 16);
    assert!(after.rq_merges - before.rq_merges > 0, "the burst merged");
    // The merged request that met p0 failed over whole: p0 saw one leaf I/O, p1 the rest.
    assert_eq!(r.ctl[0].ios(), 1);
    assert!(
        r.ctl[1].ios() < 16,
        "p1 got requests, not 16 bios: {}",
        r.ctl[1].ios()
    );
    assert_eq!(r.status("mrg"), "2 0 0 0 1 1 A 0 2 0 p0 F 1 p1 A 0");
    for i in 0..16 {
        let (s, buf) = r.read(vol, i * 8);
        assert_eq!(s, Status::Ok);
        assert!(buf.iter().all(|&b| b == 0x30 + i as u8), "sector {}", i * 8);
    }
}

#[test]
fn one_flush_goes_down_one_path_and_fails_over() {
    let mut r = Rig::new(2);
    let vol = r.create(
        "fl",
        &format!("2 {NO_CHECKER} 0 1 1 round-robin 0 2 1 p0 1 p1 1"),
    );
    let flushes = |r: &Rig| r.ctl[0].flushes.load(SeqCst) + r.ctl[1].flushes.load(SeqCst);
    assert_eq!(r.e.flush(vol), Status::Ok);
    assert_eq!(flushes(&r), 1);
    r.ctl[0].down();
    r.ctl[1].hold.store(false, SeqCst);
    for _ in 0..4 {
        assert_eq!(r.e.flush(vol), Status::Ok);
    }
    assert!(r.status("fl").contains("p0 F 1"));
    assert!(r.ctl[1].flushes.load(SeqCst) >= 4);
    r.ctl[1].down();
    assert_eq!(r.e.flush(vol), Status::IoError);
}

#[test]
fn limits_and_devices() {
    let mut r = Rig::new(2);
    r.create(
        "lim",
        &format!("2 {NO_CHECKER} 0 1 1 round-robin 0 2 1 p0 1 p1 1"),
    );
    let t = r.e.live_table("lim").unwrap().unwrap();
    assert_eq!(t.limits().max_copy_sectors, 0);
    assert!(!t.limits().copy_native);
    assert_eq!(r.e.deps("lim").unwrap(), ["p0", "p1"]);
    let tgt = &t.entries()[0].target;
    assert_eq!(tgt.flush_devices().len(), 1);
    assert!(tgt.frame_bytes() >= 16);
    match tgt.extent(8, 16) {
        stackbd_core::target::TargetExtent::Dev { sector, len, .. } => {
            assert_eq!((sector, len), (8, 16))
        }
        other => panic!("{other:?}"),
    }
}

/// Waits (briefly) until `volume` has `want` checker threads, and returns how many it has:
/// a new thread names itself once it runs.
fn checker_threads_become(volume: &str, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let n = checker_threads(volume);
        if n == want || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn checker_threads(volume: &str) -> usize {
    let name = format!("mpath-check-{volume}");
    let name = &name[..name.len().min(15)];
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim_end() == name)
        .count()
}

#[test]
fn one_checker_thread_per_live_table_stopped_on_remove() {
    let mut r = Rig::new(1);
    r.create("chk", "0 0 1 1 round-robin 0 1 1 p0 1");
    assert_eq!(checker_threads_become("chk", 1), 1);
    let t = r.e.live_table("chk").unwrap().unwrap();
    let env = TargetEnv {
        volume: "chk".into(),
        events: Arc::new(Events::default()),
    };
    t.entries()[0].target.activate(&env);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        checker_threads("chk"),
        1,
        "activate twice starts one thread"
    );
    let t0 = Instant::now();
    t.entries()[0].target.deactivate();
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "stopping is prompt"
    );
    assert_eq!(checker_threads_become("chk", 0), 0);
    t.entries()[0].target.activate(&env);
    assert_eq!(
        checker_threads_become("chk", 1),
        1,
        "a deactivated table can be activated again"
    );
    drop(t);
    r.e.remove("chk", false).unwrap();
    assert_eq!(checker_threads_become("chk", 0), 0);

    // A reload replaces the table: the old table's checker stops, the new one's starts.
    r.create("rld", "0 0 1 1 round-robin 0 1 1 p0 1");
    r.e.reload(
        "rld",
        &format!("0 {SECTORS} multipath 0 0 1 1 queue-length 0 1 1 p0 1"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(checker_threads_become("rld", 1), 1);
    drop(r);
    assert_eq!(checker_threads_become("rld", 0), 0);
}

/// Stopping the checker does not wait for a probe that hangs (a server that does not answer).
#[test]
fn deactivate_does_not_wait_for_a_hanging_probe() {
    let mut r = Rig::new(2);
    r.create(
        "hang",
        "2 checker_interval_ms 1000 0 1 1 round-robin 0 2 1 p0 1 p1 1",
    );
    r.ctl[0].probe_hang.store(true, SeqCst);
    assert_eq!(checker_threads_become("hang", 1), 1);
    // The first round starts after 1 s; its probe of p0 hangs for the 1 s timeout.
    std::thread::sleep(Duration::from_millis(1300));
    let t = r.e.live_table("hang").unwrap().unwrap();
    let t0 = Instant::now();
    t.entries()[0].target.deactivate();
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "stopping waited {:?} for the probe",
        t0.elapsed()
    );
    assert_eq!(checker_threads_become("hang", 0), 0);
    assert!(
        r.ctl[0].probes.lock().unwrap().is_empty(),
        "the probe was still hanging when the checker stopped"
    );
    drop(t);
    r.e.remove("hang", false).unwrap();
}

#[test]
fn status_formats_per_selector() {
    let mut r = Rig::new(3);
    r.create(
        "s1",
        "0 0 2 1 round-robin 0 2 1 p0 1 p1 1 queue-length 0 1 1 p2 1",
    );
    assert_eq!(
        r.status("s1"),
        "2 0 0 0 2 1 A 0 2 0 p0 A 0 p1 A 0 E 0 1 1 p2 A 0 0"
    );
    r.create("s2", "0 1 alua 1 1 service-time 0 2 2 p0 1 1 p1 1 2");
    assert_eq!(r.status("s2"), "2 0 0 0 1 1 A 0 2 2 p0 A 0 0 1 p1 A 0 0 2");
    r.create("s3", "0 0 1 1 historical-service-time 0 1 1 p0 1");
    assert_eq!(r.status("s3"), "2 0 0 0 1 1 A 2 972 0 1 3 p0 A 0 1024 0 0");
    r.create("s4", "0 0 0 0");
    assert_eq!(r.status("s4"), "2 0 0 0 0 0");
    let v = r.e.dev_id("s4").unwrap();
    assert_eq!(r.write(v, 0, 1), Status::IoError);
}

// ---------------------------------------------------------------- allocation gate

#[test]
fn zero_heap_allocations_per_io_with_each_selector() {
    for sel in [
        "round-robin 0 2 1 p0 1 p1 1",
        "queue-length 0 2 1 p0 1 p1 1",
        "service-time 0 2 2 p0 1 1 p1 1 1",
        "historical-service-time 0 2 1 p0 1 p1 1",
    ] {
        let mut r = Rig::new(2);
        let vol = r.create("alloc", &format!("2 {NO_CHECKER} 0 1 1 {sel}"));
        let mut buf = vec![0u8; 4096];
        let mut run = |r: &mut Rig, n: u64| {
            for i in 0..n {
                let s = if i % 2 == 0 {
                    r.e.write_at(vol, (i % 256) * 8, &buf)
                } else {
                    r.e.read_at(vol, (i % 256) * 8, &mut buf)
                };
                assert_eq!(s, Status::Ok);
            }
        };
        run(&mut r, 2_000);
        let before = thread_allocs();
        run(&mut r, 20_000);
        assert_eq!(thread_allocs() - before, 0, "allocations with {sel}");
        assert!(r.ctl[0].ios() > 1000 && r.ctl[1].ios() > 1000, "{sel}");
    }
}

// ---------------------------------------------------------------- reactor threads

mod threaded {
    use super::*;
    use stackbd_core::runtime::{Frontend, FrontendCx, Mode, RuntimeConfig};
    use stackbd_core::Completion;
    use std::sync::atomic::Ordering::Relaxed;

    #[derive(Default)]
    struct Counters {
        done: AtomicU64,
        failed: AtomicU64,
        corrupt: AtomicU64,
        stop: AtomicBool,
        finished: AtomicBool,
    }

    const QD: usize = 8;

    /// Keeps `QD` 4 KiB reads in flight over data that reads 0xab everywhere.
    struct Reader {
        vol: DevId,
        bufs: Vec<Vec<u8>>,
        busy: Vec<bool>,
        next: u64,
        c: Arc<Counters>,
    }

    impl Frontend for Reader {
        fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize {
            if self.c.stop.load(Relaxed) {
                return 0;
            }
            let mut n = 0;
            for i in 0..QD {
                if self.busy[i] {
                    continue;
                }
                self.next = self
                    .next
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let sector = ((self.next >> 33) % (SECTORS / 8 - 1)) * 8;
                self.bufs[i].fill(0);
                // SAFETY: the buffer stays in `self.bufs`, untouched, until its completion.
                let data = unsafe { DataBuf::from_slice(&mut self.bufs[i]) };
                if cx
                    .submit(&Request::new(Op::Read, self.vol, sector, 8, data, i as u64))
                    .is_ok()
                {
                    self.busy[i] = true;
                    n += 1;
                }
            }
            n
        }

        fn complete(&mut self, _cx: &mut FrontendCx<'_>, c: Completion) {
            let i = c.user_data as usize;
            self.busy[i] = false;
            if c.status != Status::Ok {
                self.c.failed.fetch_add(1, Relaxed);
            } else if !self.bufs[i].iter().all(|&b| b == 0xab) {
                self.c.corrupt.fetch_add(1, Relaxed);
            }
            self.c.done.fetch_add(1, Relaxed);
        }

        fn finished(&self) -> bool {
            let f = self.c.stop.load(Relaxed) && !self.busy.iter().any(|&b| b);
            if f {
                self.c.finished.store(true, Relaxed);
            }
            f
        }
    }

    /// Paths go down and come back (one, then both) under load from two reactor threads, with
    /// the checker reinstating them: with queue_if_no_path nothing fails and nothing is lost.
    fn flapping_paths(mode: Mode) {
        let cfg = RuntimeConfig {
            reactors: 2,
            mode,
            ..RuntimeConfig::default()
        };
        let mut e = Engine::with_threads(stackbd_targets::registry(), cfg).unwrap();
        let data = Arc::new(Mutex::new(vec![0xabu8; SECTORS as usize * SECTOR_SIZE]));
        let ctl: Vec<Arc<Ctl>> = (0..2).map(|_| Arc::new(Ctl::default())).collect();
        for (i, c) in ctl.iter().enumerate() {
            e.add_leaf(
                &format!("p{i}"),
                Arc::new(PathLeaf {
                    data: data.clone(),
                    ctl: c.clone(),
                    sectors: SECTORS,
                }),
            )
            .unwrap();
        }
        let vol = e
            .create(
                "thr",
                Some(&format!(
                    "0 {SECTORS} multipath 3 queue_if_no_path checker_interval_ms 10 \
                     0 1 1 queue-length 0 2 1 p0 1 p1 1"
                )),
            )
            .unwrap();
        let counters: Vec<Arc<Counters>> = (0..2).map(|_| Arc::new(Counters::default())).collect();
        for (i, c) in counters.iter().enumerate() {
            let fe = Reader {
                vol,
                bufs: (0..QD).map(|_| vec![0u8; 4096]).collect(),
                busy: vec![false; QD],
                next: i as u64 + 1,
                c: c.clone(),
            };
            e.threads().unwrap().attach(Box::new(fe), Some(i));
        }
        let total = || counters.iter().map(|c| c.done.load(Relaxed)).sum::<u64>();
        let flow = |n: u64| {
            let before = total();
            let start = Instant::now();
            while total() < before + n {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "I/O stopped flowing"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        };
        for round in 0..12 {
            flow(500);
            match round % 3 {
                0 => ctl[0].down(),
                1 => ctl[1].down(),
                _ => {
                    ctl[0].down();
                    ctl[1].down();
                }
            }
            // Let the paths fail (I/O and checker) and, for a full outage, I/O queue.
            std::thread::sleep(Duration::from_millis(30));
            if round % 3 != 2 {
                flow(500);
            }
            ctl[0].up();
            ctl[1].up();
            let start = Instant::now();
            while !e.status("thr").unwrap().contains("p0 A")
                || !e.status("thr").unwrap().contains("p1 A")
            {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "paths not reinstated"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        flow(500);
        for c in &counters {
            c.stop.store(true, Relaxed);
        }
        let start = Instant::now();
        while !counters.iter().all(|c| c.finished.load(Relaxed)) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "frontends did not drain"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let failed: u64 = counters.iter().map(|c| c.failed.load(Relaxed)).sum();
        let corrupt: u64 = counters.iter().map(|c| c.corrupt.load(Relaxed)).sum();
        assert_eq!(failed, 0, "no I/O failed");
        assert_eq!(corrupt, 0, "every read returned the data");
        let st = e.status("thr").unwrap();
        // Every path failed at least 8 times (4 single outages + 4 double ones)...
        for p in ["p0", "p1"] {
            let w: Vec<&str> = st.split_whitespace().collect();
            let i = w.iter().position(|&x| x == p).unwrap();
            assert_eq!(w[i + 1], "A", "{st}");
            assert!(w[i + 2].parse::<u32>().unwrap() >= 8, "{st}");
            // ...and nothing is left in flight on it.
            assert_eq!(w[i + 3], "0", "{st}");
        }
        e.remove("thr", true).unwrap();
        e.stop_threads();
    }

    /// Each reactor balances its own I/O over the paths (queue-length on its own counts), and
    /// the status adds up what every reactor has in flight.
    #[test]
    fn status_adds_up_the_in_flight_io_of_every_reactor() {
        let cfg = RuntimeConfig {
            reactors: 2,
            mode: Mode::Interrupt,
            ..RuntimeConfig::default()
        };
        let mut e = Engine::with_threads(stackbd_targets::registry(), cfg).unwrap();
        let data = Arc::new(Mutex::new(vec![0xabu8; SECTORS as usize * SECTOR_SIZE]));
        let ctl: Vec<Arc<Ctl>> = (0..2).map(|_| Arc::new(Ctl::default())).collect();
        for (i, c) in ctl.iter().enumerate() {
            c.hold.store(true, SeqCst);
            e.add_leaf(
                &format!("p{i}"),
                Arc::new(PathLeaf {
                    data: data.clone(),
                    ctl: c.clone(),
                    sectors: SECTORS,
                }),
            )
            .unwrap();
        }
        // Bio-based, so no request merges two reads.
        let vol = e
            .create(
                "sum",
                Some(&format!(
                    "0 {SECTORS} multipath 4 queue_mode bio {NO_CHECKER} \
                     0 1 1 queue-length 0 2 1 p0 1 p1 1"
                )),
            )
            .unwrap();
        let counters: Vec<Arc<Counters>> = (0..2).map(|_| Arc::new(Counters::default())).collect();
        for (i, c) in counters.iter().enumerate() {
            let fe = Reader {
                vol,
                bufs: (0..QD).map(|_| vec![0u8; 4096]).collect(),
                busy: vec![false; QD],
                next: i as u64 + 1,
                c: c.clone(),
            };
            e.threads().unwrap().attach(Box::new(fe), Some(i));
        }
        // Both reactors fill their queue depth; every I/O is held on a path.
        let want = format!("p0 A 0 {} p1 A 0 {}", QD, QD);
        let start = Instant::now();
        while !e.status("sum").unwrap().contains(&want) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "status: {}",
                e.status("sum").unwrap()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let held = ctl[0].ios() + ctl[1].ios();
        assert_eq!(held, 2 * QD as u64);
        for c in &counters {
            c.stop.store(true, Relaxed);
        }
        for c in &ctl {
            c.hold.store(false, SeqCst);
        }
        let start = Instant::now();
        while !counters.iter().all(|c| c.finished.load(Relaxed)) {
            assert!(start.elapsed() < Duration::from_secs(10), "no drain");
            std::thread::sleep(Duration::from_millis(1));
        }
        let st = e.status("sum").unwrap();
        assert!(st.trim_end().ends_with("p0 A 0 0 p1 A 0 0"), "{st}");
        let failed: u64 = counters.iter().map(|c| c.failed.load(Relaxed)).sum();
        assert_eq!(failed, 0);
        e.remove("sum", true).unwrap();
        e.stop_threads();
    }

    #[test]
    fn flapping_paths_under_load_interrupt_mode() {
        flapping_paths(Mode::Interrupt);
    }

    #[test]
    fn flapping_paths_under_load_poll_mode() {
        flapping_paths(Mode::Poll);
    }
}
