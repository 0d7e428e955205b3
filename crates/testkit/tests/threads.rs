//! Reactor threads: frontends drive I/O on their own threads while the control plane reloads
//! tables under them; nothing is lost or failed and no I/O sees two tables.

use stackbd_core::runtime::{Frontend, FrontendCx, Mode, RuntimeConfig};
use stackbd_core::{
    Completion, DataBuf, DevId, Engine, Op, ReactorConfig, Request, Status, SuspendOpts,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LEAF_SECTORS: u64 = 4096;
const VOL_SECTORS: u64 = 4096;

fn table(side: char) -> String {
    format!("0 {VOL_SECTORS} striped 2 8 {side}0 0 {side}1 0")
}

#[derive(Default)]
struct Counters {
    done: AtomicU64,
    failed: AtomicU64,
    mixed: AtomicU64,
    stop: AtomicBool,
    finished: AtomicBool,
}

/// Keeps `QD` reads of 24 sectors (three stripe chunks) in flight; each read must come back
/// entirely from the `a` leaves or entirely from the `b` leaves.
struct Reader {
    vol: DevId,
    bufs: Vec<Vec<u8>>,
    busy: Vec<bool>,
    next: u64,
    c: Arc<Counters>,
}

const QD: usize = 8;

impl Frontend for Reader {
    fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize {
        if self.c.stop.load(Ordering::Relaxed) {
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
            let sector = (self.next >> 33) % (VOL_SECTORS - 24);
            // SAFETY: the buffer stays in `self.bufs` (not touched) until its completion arrives.
            let data = unsafe { DataBuf::from_slice(&mut self.bufs[i]) };
            if cx
                .submit(&Request::new(
                    Op::Read,
                    self.vol,
                    sector,
                    24,
                    data,
                    i as u64,
                ))
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
            self.c.failed.fetch_add(1, Ordering::Relaxed);
        }
        let b = &self.bufs[i];
        let first = b[0] & 0xf0;
        if !b.iter().all(|&x| x & 0xf0 == first) || (first != 0xa0 && first != 0xb0) {
            self.c.mixed.fetch_add(1, Ordering::Relaxed);
        }
        self.c.done.fetch_add(1, Ordering::Relaxed);
    }

    fn finished(&self) -> bool {
        let f = self.c.stop.load(Ordering::Relaxed) && !self.busy.iter().any(|&b| b);
        if f {
            self.c.finished.store(true, Ordering::Relaxed);
        }
        f
    }
}

fn run(mode: Mode) {
    let cfg = RuntimeConfig {
        reactors: 2,
        mode,
        reactor: ReactorConfig::default(),
        ..RuntimeConfig::default()
    };
    let mut e = Engine::with_threads(stackbd_targets::registry(), cfg).unwrap();
    for (name, tag) in [("a0", 0xa0u8), ("a1", 0xa1), ("b0", 0xb0), ("b1", 0xb1)] {
        let leaf = Arc::new(stackbd_leaves::MemLeaf::new(LEAF_SECTORS * 512).unwrap());
        // Fill through an inline engine over the same leaf (the memory is shared).
        let mut fill = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
        let id = fill.add_leaf(name, leaf.clone()).unwrap();
        assert_eq!(
            fill.write_at(id, 0, &vec![tag; LEAF_SECTORS as usize * 512]),
            Status::Ok
        );
        e.add_leaf(name, leaf).unwrap();
    }
    let vol = e.create("v", Some(&table('a'))).unwrap();
    let counters: Vec<Arc<Counters>> = (0..2).map(|_| Arc::new(Counters::default())).collect();
    for (i, c) in counters.iter().enumerate() {
        let fe = Reader {
            vol,
            bufs: (0..QD).map(|_| vec![0u8; 24 * 512]).collect(),
            busy: vec![false; QD],
            next: i as u64 + 1,
            c: c.clone(),
        };
        e.threads().unwrap().attach(Box::new(fe), Some(i));
    }
    let total = || {
        counters
            .iter()
            .map(|c| c.done.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let mut side = 'a';
    for _ in 0..40 {
        let before = total();
        let start = Instant::now();
        while total() < before + 200 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "I/O stopped flowing"
            );
            std::thread::yield_now();
        }
        side = if side == 'a' { 'b' } else { 'a' };
        e.load("v", &table(side)).unwrap();
        e.suspend("v", SuspendOpts::default()).unwrap();
        e.resume("v").unwrap();
    }
    for c in &counters {
        c.stop.store(true, Ordering::Relaxed);
    }
    let start = Instant::now();
    while !counters.iter().all(|c| c.finished.load(Ordering::Relaxed)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "frontends did not drain"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let failed: u64 = counters
        .iter()
        .map(|c| c.failed.load(Ordering::Relaxed))
        .sum();
    let mixed: u64 = counters
        .iter()
        .map(|c| c.mixed.load(Ordering::Relaxed))
        .sum();
    assert_eq!(failed, 0, "no I/O failed");
    assert_eq!(mixed, 0, "no read saw two tables");
    assert!(total() > 8_000);
    assert_eq!(e.info("v").unwrap().event_nr, 40);
    e.stop_threads();
}

#[test]
fn reloads_under_load_on_reactor_threads_interrupt_mode() {
    run(Mode::Interrupt);
}

#[test]
fn reloads_under_load_on_reactor_threads_poll_mode() {
    run(Mode::Poll);
}

#[test]
fn reloads_under_load_on_reactor_threads_hybrid_mode() {
    run(Mode::Hybrid);
}
