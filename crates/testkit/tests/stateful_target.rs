//! The `shadow` test target (built only on the public `TargetCx`: child I/O, park and unpark,
//! a timer, a copy job, per-reactor state) under random I/O against a flat reference, inline
//! and on 1 and 2 reactor threads in every completion mode; and suspend / `noflush` suspend
//! with its bios parked.

use stackbd_core::runtime::{Frontend, FrontendCx, Mode, RuntimeConfig};
use stackbd_core::{
    Completion, DataBuf, DevId, Engine, Op, ReactorConfig, Request, Sector, Status, SuspendOpts,
    SECTOR_SIZE,
};
use stackbd_testkit::model::pattern;
use stackbd_testkit::rng::Rng;
use stackbd_testkit::shadow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SIZE: Sector = 4096;

/// `t` (linear) over `v` (shadow at offset 64) over `s` (striped over m0, m1), backup on leaf
/// `b` at offset 0.
fn build(e: &mut Engine, delay_ms: u64) -> (DevId, DevId) {
    let s_size = SIZE + 64;
    for (n, sectors) in [("m0", s_size / 2), ("m1", s_size / 2), ("b", SIZE)] {
        let leaf = stackbd_leaves::MemLeaf::new(sectors * SECTOR_SIZE as u64).unwrap();
        e.add_leaf(n, Arc::new(leaf)).unwrap();
    }
    e.create("s", Some(&format!("0 {s_size} striped 2 16 m0 0 m1 0")))
        .unwrap();
    let v = e
        .create("v", Some(&format!("0 {SIZE} shadow s 64 b 0 {delay_ms}")))
        .unwrap();
    let t = e
        .create("t", Some(&format!("0 {SIZE} linear v 0")))
        .unwrap();
    (t, v)
}

/// One random op over `[base, base + len)`.
#[derive(Clone, Copy, Debug)]
enum Step {
    Read(Sector, u32),
    Write(Sector, u32, u8),
    Zero(Sector, u32),
    Discard(Sector, u32),
    Flush,
}

fn step(rng: &mut Rng, base: Sector, len: Sector) -> Step {
    let n = rng.range(1, 64.min(len)) as u32;
    let s = base + rng.range(0, len - n as Sector);
    match rng.range(0, 99) {
        0..=39 => Step::Read(s, n),
        40..=79 => Step::Write(s, n, rng.next_u64() as u8),
        80..=87 => Step::Zero(s, n),
        88..=95 => Step::Discard(s, n),
        _ => Step::Flush,
    }
}

fn range(s: Sector, n: u32) -> std::ops::Range<usize> {
    s as usize * SECTOR_SIZE..(s as usize + n as usize) * SECTOR_SIZE
}

#[test]
fn random_io_inline_matches_the_reference_and_backs_up_each_write() {
    let mut e = Engine::new(shadow::registry(), ReactorConfig::default());
    let (t, _) = build(&mut e, 1);
    let b = e.dev_id("b").unwrap();
    let mut reference = vec![0u8; SIZE as usize * SECTOR_SIZE];
    let mut rng = Rng::new(7);
    for i in 0..600 {
        let op = step(&mut rng, 0, SIZE);
        match op {
            Step::Read(s, n) => {
                let mut buf = vec![0xeeu8; n as usize * SECTOR_SIZE];
                assert_eq!(e.read_at(t, s, &mut buf), Status::Ok, "op {i} {op:?}");
                assert!(buf == reference[range(s, n)], "op {i} {op:?}: data differs");
            }
            Step::Write(s, n, seed) => {
                let mut buf = vec![0u8; n as usize * SECTOR_SIZE];
                pattern(&mut buf, s, seed);
                let before = reference[range(s, n)].to_vec();
                assert_eq!(e.write_at(t, s, &buf), Status::Ok, "op {i} {op:?}");
                reference[range(s, n)].copy_from_slice(&buf);
                // The copy job saved what the range held before the write.
                let mut saved = vec![0u8; before.len()];
                assert_eq!(e.read_at(b, s, &mut saved), Status::Ok);
                assert!(
                    saved == before,
                    "op {i} {op:?}: backup is not the pre-image"
                );
            }
            Step::Zero(s, n) => {
                assert_eq!(e.write_zeroes(t, s, n), Status::Ok, "op {i} {op:?}");
                reference[range(s, n)].fill(0);
            }
            Step::Discard(s, n) => {
                assert_eq!(e.discard(t, s, n), Status::Ok, "op {i} {op:?}");
                reference[range(s, n)].fill(0);
            }
            Step::Flush => assert_eq!(e.flush(t), Status::Ok),
        }
    }
    let st = e.status("v").unwrap();
    assert!(
        st.contains("children") && !st.contains("children 0 "),
        "{st}"
    );
    assert_eq!(e.reactor().parked_total(), 0);
    assert!(e.reactor().stats.child_ios > 0);
}

/// Runs its own random script, one op at a time, over its own region, checking reads.
struct Script {
    vol: DevId,
    base: Sector,
    len: Sector,
    rng: Rng,
    left: usize,
    busy: Option<Step>,
    buf: Vec<u8>,
    reference: Vec<u8>,
    errors: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicUsize>,
    finished: bool,
}

impl Frontend for Script {
    fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize {
        if self.busy.is_some() || self.finished {
            return 0;
        }
        if self.left == 0 {
            self.finished = true;
            self.done.fetch_add(1, Ordering::SeqCst);
            return 1;
        }
        let op = step(&mut self.rng, self.base, self.len);
        let req = match op {
            Step::Read(s, n) | Step::Write(s, n, _) => {
                self.buf.resize(n as usize * SECTOR_SIZE, 0);
                if let Step::Write(_, _, seed) = op {
                    pattern(&mut self.buf, s, seed);
                } else {
                    self.buf.fill(0xee);
                }
                let o = if matches!(op, Step::Read(..)) {
                    Op::Read
                } else {
                    Op::Write
                };
                // SAFETY: `buf` is not touched until this op's completion arrives.
                let data = unsafe { DataBuf::from_slice(&mut self.buf) };
                Request::new(o, self.vol, s, n, data, 1)
            }
            Step::Zero(s, n) => Request::new(Op::WriteZeroes, self.vol, s, n, DataBuf::EMPTY, 1),
            Step::Discard(s, n) => Request::new(Op::Discard, self.vol, s, n, DataBuf::EMPTY, 1),
            Step::Flush => Request::new(Op::Flush, self.vol, 0, 0, DataBuf::EMPTY, 1),
        };
        if cx.submit(&req).is_ok() {
            self.busy = Some(op);
            self.left -= 1;
            return 1;
        }
        0
    }

    fn complete(&mut self, _cx: &mut FrontendCx<'_>, c: Completion) {
        let op = self.busy.take().expect("a completion for an op in flight");
        if c.status != Status::Ok {
            self.errors
                .lock()
                .unwrap()
                .push(format!("{op:?}: {:?}", c.status));
            return;
        }
        let local = |s: Sector, n: u32| range(s - self.base, n);
        match op {
            Step::Read(s, n) => {
                if self.buf[..] != self.reference[local(s, n)] {
                    self.errors
                        .lock()
                        .unwrap()
                        .push(format!("{op:?}: data differs"));
                }
            }
            Step::Write(s, n, _) => self.reference[local(s, n)].copy_from_slice(&self.buf),
            Step::Zero(s, n) | Step::Discard(s, n) => self.reference[local(s, n)].fill(0),
            Step::Flush => {}
        }
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

fn run_threads(reactors: usize, mode: Mode) {
    let cfg = RuntimeConfig {
        reactors,
        mode,
        ..RuntimeConfig::default()
    };
    let mut e = Engine::with_threads(shadow::registry(), cfg).unwrap();
    let (t, _) = build(&mut e, 1);
    let errors = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let scripts = 4;
    let region = SIZE / scripts as Sector;
    for i in 0..scripts {
        let fe = Script {
            vol: t,
            base: i as Sector * region,
            len: region,
            rng: Rng::new(100 + i as u64),
            left: 150,
            busy: None,
            buf: Vec::new(),
            reference: vec![0u8; region as usize * SECTOR_SIZE],
            errors: errors.clone(),
            done: done.clone(),
            finished: false,
        };
        e.threads()
            .unwrap()
            .attach(Box::new(fe), Some(i % reactors));
    }
    let start = Instant::now();
    while done.load(Ordering::SeqCst) < scripts {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{reactors} reactors, {mode}: scripts did not finish ({} of {scripts})",
            done.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{reactors} reactors, {mode}: {:?}",
        &errors[..errors.len().min(5)]
    );
    let st = e.status("v").unwrap();
    assert!(!st.contains("timers 0 "), "{st}");
}

#[test]
fn random_io_on_reactor_threads_in_every_mode() {
    for reactors in [1, 2] {
        for mode in [Mode::Interrupt, Mode::Poll, Mode::Hybrid] {
            run_threads(reactors, mode);
        }
    }
}

/// Starts `n` writes of 8 sectors at 0, 64, 128... and runs the reactor until every one is
/// parked waiting for its timer (copies done). Returns their buffers (kept alive).
fn park_writes(e: &mut Engine, t: DevId, n: usize, seed: u8) -> Vec<Vec<u8>> {
    let mut bufs = Vec::new();
    for i in 0..n {
        let s = i as Sector * 64;
        let mut buf = vec![0u8; 8 * SECTOR_SIZE];
        pattern(&mut buf, s, seed);
        // SAFETY: the buffer's heap memory stays put in `bufs` until the write completes.
        let data = unsafe { DataBuf::from_raw(buf.as_mut_ptr(), buf.len()) };
        e.submit(&Request::new(Op::Write, t, s, 8, data, i as u64))
            .unwrap();
        bufs.push(buf);
    }
    let start = Instant::now();
    while e.reactor().parked_total() < n || e.reactor().stats.child_ios < n as u64 {
        e.poll();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "writes never parked"
        );
    }
    bufs
}

fn reap_all(e: &mut Engine, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < n {
        e.drive(|c| out.push(c));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "writes never completed"
        );
    }
    out
}

fn check_written(e: &mut Engine, t: DevId, bufs: &[Vec<u8>]) {
    for (i, want) in bufs.iter().enumerate() {
        let mut got = vec![0u8; want.len()];
        assert_eq!(e.read_at(t, i as Sector * 64, &mut got), Status::Ok);
        assert!(&got == want, "write {i} not on the device");
    }
}

#[test]
fn suspend_waits_for_parked_bios_and_noflush_pushes_them_back() {
    let mut e = Engine::new(shadow::registry(), ReactorConfig::default());
    let (t, v) = build(&mut e, 300);

    // A flushing suspend waits for the parked writes: their timers fire, they complete.
    let bufs = park_writes(&mut e, t, 4, 1);
    let start = Instant::now();
    e.suspend("v", SuspendOpts::default()).unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "suspend returned before the delayed writes were done ({:?})",
        start.elapsed()
    );
    assert_eq!(e.reactor().parked_total(), 0);
    e.resume("v").unwrap();
    let c = reap_all(&mut e, 4);
    assert!(c.iter().all(|c| c.status == Status::Ok), "{c:?}");
    check_written(&mut e, t, &bufs);

    // A noflush suspend pushes them back to `v` at once; resume maps them again.
    let bufs = park_writes(&mut e, t, 4, 2);
    let start = Instant::now();
    e.suspend(
        "v",
        SuspendOpts {
            noflush: true,
            ..SuspendOpts::default()
        },
    )
    .unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "noflush suspend waited for the delay ({:?})",
        start.elapsed()
    );
    assert_eq!(e.reactor().parked_total(), 0, "parked bios pushed back");
    assert_eq!(e.reactor().held(v), 4, "held at the volume");
    assert!(e.reactor().stats.pushed_back >= 4);
    // Timers of the pushed-back bios fire into nothing while suspended.
    let pause = Instant::now();
    while pause.elapsed() < Duration::from_millis(400) {
        e.poll();
    }
    assert_eq!(e.reactor().held(v), 4, "still held: nothing completed them");
    e.resume("v").unwrap();
    let c = reap_all(&mut e, 4);
    assert!(c.iter().all(|c| c.status == Status::Ok), "{c:?}");
    check_written(&mut e, t, &bufs);
}
