//! Two reactor threads writing the origin and reading two snapshots at once: copy-outs of the
//! same chunk race between reactors (one claims it, the other's write waits for a commit made
//! on the other reactor and is woken by a doorbell), commits from both reactors share each
//! store. Every snapshot read, during the run and after a restart, reads the origin as it was.

use stackbd_core::runtime::{Frontend, FrontendCx, Mode, RuntimeConfig};
use stackbd_core::{
    Completion, DataBuf, DevId, Engine, Op, ReactorConfig, Request, Status, SuspendOpts,
};
use stackbd_leaves::MemLeaf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECTORS: u64 = 4096;
const COW: u64 = 8192;
const QD: usize = 8;
const PER_FRONTEND: u64 = 3000;

fn byte(sector: u64, off: usize) -> u8 {
    ((sector * 31 + off as u64 / 64) % 251) as u8
}

fn taken() -> Vec<u8> {
    (0..SECTORS as usize * 512)
        .map(|i| byte(i as u64 / 512, i % 512))
        .collect()
}

#[derive(Default)]
struct Counters {
    done: AtomicU64,
    failed: AtomicU64,
    mismatched: AtomicU64,
    stop: AtomicBool,
}

struct Mixer {
    o: DevId,
    snaps: [DevId; 2],
    bufs: Vec<Vec<u8>>,
    busy: Vec<Option<(Op, u64)>>,
    rng: u64,
    issued: u64,
    c: Arc<Counters>,
}

impl Frontend for Mixer {
    fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize {
        let mut n = 0;
        for i in 0..QD {
            if self.busy[i].is_some() || self.issued >= PER_FRONTEND {
                continue;
            }
            self.rng = self
                .rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = self.rng >> 33;
            // Hot: a quarter of the chunks, so both reactors meet on the same ones.
            let sector = (r % (SECTORS / 4 / 8)) * 8 + (r >> 20) % 8 * (SECTORS / 8);
            let sector = sector.min(SECTORS - 8);
            let (op, dev) = match r % 3 {
                0 => (Op::Write, self.o),
                k => (Op::Read, self.snaps[k as usize - 1]),
            };
            if op == Op::Write {
                self.bufs[i].fill((r & 0xff) as u8);
            }
            // SAFETY: the buffer stays in `self.bufs`, untouched until its completion arrives.
            let data = unsafe { DataBuf::from_slice(&mut self.bufs[i]) };
            if cx
                .submit(&Request::new(op, dev, sector, 8, data, i as u64))
                .is_ok()
            {
                self.busy[i] = Some((op, sector));
                self.issued += 1;
                n += 1;
            }
        }
        n
    }

    fn complete(&mut self, _cx: &mut FrontendCx<'_>, c: Completion) {
        let i = c.user_data as usize;
        let (op, sector) = self.busy[i].take().unwrap();
        if c.status != Status::Ok {
            self.c.failed.fetch_add(1, Ordering::Relaxed);
        }
        if op == Op::Read {
            let b = &self.bufs[i];
            let ok = b
                .iter()
                .enumerate()
                .all(|(j, &x)| x == byte(sector + j as u64 / 512, j % 512));
            if !ok {
                self.c.mismatched.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.c.done.fetch_add(1, Ordering::Relaxed);
    }

    fn finished(&self) -> bool {
        self.issued >= PER_FRONTEND && self.busy.iter().all(Option::is_none)
    }
}

fn snapshot(e: &mut Engine, name: &str, cow: &str) -> DevId {
    e.suspend("o", SuspendOpts::default()).unwrap();
    let s = e.create(name, Some(&format!("0 {SECTORS} snapshot base {cow} P 8")));
    e.resume("o").unwrap();
    s.unwrap()
}

#[test]
fn two_reactors_copy_out_and_read_two_snapshots() {
    let leaves: Vec<(&str, Arc<MemLeaf>)> = [("base", SECTORS), ("cow0", COW), ("cow1", COW)]
        .into_iter()
        .map(|(n, s)| (n, Arc::new(MemLeaf::new(s * 512).unwrap())))
        .collect();
    let mut fill = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    let id = fill.add_leaf("base", leaves[0].1.clone()).unwrap();
    assert_eq!(fill.write_at(id, 0, &taken()), Status::Ok);
    drop(fill);

    let cfg = RuntimeConfig {
        reactors: 2,
        mode: Mode::Interrupt,
        reactor: ReactorConfig::default(),
        ..RuntimeConfig::default()
    };
    let mut e = Engine::with_threads(stackbd_targets::registry(), cfg).unwrap();
    for (n, l) in &leaves {
        e.add_leaf(n, l.clone()).unwrap();
    }
    let o = e
        .create("o", Some(&format!("0 {SECTORS} snapshot-origin base")))
        .unwrap();
    let snaps = [
        snapshot(&mut e, "s0", "cow0"),
        snapshot(&mut e, "s1", "cow1"),
    ];
    let counters: Vec<Arc<Counters>> = (0..2).map(|_| Arc::new(Counters::default())).collect();
    for (i, c) in counters.iter().enumerate() {
        let fe = Mixer {
            o,
            snaps,
            bufs: (0..QD).map(|_| vec![0u8; 8 * 512]).collect(),
            busy: vec![None; QD],
            rng: 77 + i as u64,
            issued: 0,
            c: c.clone(),
        };
        e.threads().unwrap().attach(Box::new(fe), Some(i));
    }
    let start = Instant::now();
    while counters
        .iter()
        .map(|c| c.done.load(Ordering::Relaxed))
        .sum::<u64>()
        < 2 * PER_FRONTEND
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "I/O stopped: {} done",
            counters
                .iter()
                .map(|c| c.done.load(Ordering::Relaxed))
                .sum::<u64>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for c in &counters {
        c.stop.store(true, Ordering::Relaxed);
        assert_eq!(c.failed.load(Ordering::Relaxed), 0, "failed I/Os");
        assert_eq!(
            c.mismatched.load(Ordering::Relaxed),
            0,
            "snapshot reads that changed"
        );
    }
    for s in ["s0", "s1"] {
        let st = e.status(s).unwrap();
        assert!(!st.contains("Invalid"), "{st}");
    }
    e.stop_threads();
    drop(e);

    // Restart on an inline engine: both stores load and still read as the origin did.
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    for (n, l) in &leaves {
        e.add_leaf(n, l.clone()).unwrap();
    }
    e.create("o", Some(&format!("0 {SECTORS} snapshot-origin base")))
        .unwrap();
    let want = taken();
    for (s, cow) in [("s0", "cow0"), ("s1", "cow1")] {
        let id = snapshot(&mut e, s, cow);
        let mut b = vec![0u8; SECTORS as usize * 512];
        assert_eq!(e.read_at(id, 0, &mut b), Status::Ok);
        assert!(b == want, "{s} after the restart");
    }
}
