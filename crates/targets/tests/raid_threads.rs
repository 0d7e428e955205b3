//! raid1 on two reactor threads: two frontends (one per reactor) write and read interleaved
//! 4 KiB blocks of the same regions (so bit setting, parking and unparking cross reactors),
//! while the test thread fails leg 1, brings it back with `recover`, and lets the daemon clear
//! bits. No I/O fails, every read returns the block's last write, and at the end the legs are
//! byte-identical and `check` counts 0 mismatches.

use stackbd_core::runtime::{Frontend, FrontendCx, Mode, RuntimeConfig};
use stackbd_core::{Completion, DataBuf, DevId, Engine, Op, Request, Status};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECTORS: u64 = 8192;
const BLOCKS: u64 = SECTORS / 8;
const QD: usize = 8;

#[derive(Default)]
struct Counters {
    done: AtomicU64,
    failed: AtomicU64,
    corrupt: AtomicU64,
    stop: AtomicBool,
}

/// Writes and reads blocks `b` with `b % 2 == me`; remembers each block's last write.
struct Worker {
    me: u64,
    vol: DevId,
    bufs: Vec<Vec<u8>>,
    /// Slot -> (block, is_write, seq) in flight.
    busy: Vec<Option<(u64, bool, u64)>>,
    last: Vec<u64>,
    inflight_block: Vec<bool>,
    seq: u64,
    rng: u64,
    c: Arc<Counters>,
}

fn fill(buf: &mut [u8], block: u64, seq: u64) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        w.copy_from_slice(&(seq << 32 | block << 12 | i as u64).to_le_bytes());
    }
}

impl Frontend for Worker {
    fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize {
        if self.c.stop.load(Relaxed) {
            return 0;
        }
        let mut n = 0;
        for i in 0..QD {
            if self.busy[i].is_some() {
                continue;
            }
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let block = (self.rng % (BLOCKS / 2)) * 2 + self.me;
            if self.inflight_block[block as usize] {
                continue;
            }
            let write = self.rng >> 40 & 1 == 0;
            let seq = if write {
                self.seq += 1;
                fill(&mut self.bufs[i], block, self.seq);
                self.seq
            } else {
                self.bufs[i].fill(0);
                self.last[block as usize]
            };
            // SAFETY: the buffer stays in `self.bufs`, untouched, until its completion.
            let data = unsafe { DataBuf::from_slice(&mut self.bufs[i]) };
            let op = if write { Op::Write } else { Op::Read };
            if cx
                .submit(&Request::new(op, self.vol, block * 8, 8, data, i as u64))
                .is_ok()
            {
                self.busy[i] = Some((block, write, seq));
                self.inflight_block[block as usize] = true;
                n += 1;
            }
        }
        n
    }

    fn complete(&mut self, _cx: &mut FrontendCx<'_>, c: Completion) {
        let i = c.user_data as usize;
        let (block, write, seq) = self.busy[i].take().expect("slot in flight");
        self.inflight_block[block as usize] = false;
        if c.status != Status::Ok {
            self.c.failed.fetch_add(1, Relaxed);
        } else if write {
            self.last[block as usize] = seq;
        } else {
            let mut want = vec![0u8; 4096];
            if seq != 0 {
                fill(&mut want, block, seq);
            }
            if self.bufs[i] != want {
                self.c.corrupt.fetch_add(1, Relaxed);
            }
        }
        self.c.done.fetch_add(1, Relaxed);
    }

    fn finished(&self) -> bool {
        self.c.stop.load(Relaxed) && self.busy.iter().all(Option::is_none)
    }
}

fn status(e: &Engine) -> String {
    e.status("r").unwrap().trim().to_string()
}

fn wait(e: &Engine, what: &str, f: impl Fn(&str) -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !f(&status(e)) {
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}: {}",
            status(e)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn two_reactors_with_a_leg_failing_and_coming_back() {
    let cfg = RuntimeConfig {
        reactors: 2,
        mode: Mode::Poll,
        ..RuntimeConfig::default()
    };
    let mut e = Engine::with_threads(stackbd_targets::registry(), cfg).unwrap();
    let legs: Vec<Arc<stackbd_leaves::MemLeaf>> = (0..2)
        .map(|_| Arc::new(stackbd_leaves::MemLeaf::new(SECTORS * 512).unwrap()))
        .collect();
    for (i, leg) in legs.iter().enumerate() {
        e.add_leaf(&format!("m{i}"), leg.clone()).unwrap();
        e.add_leaf(
            &format!("meta{i}"),
            Arc::new(stackbd_leaves::MemLeaf::new(64 * 1024).unwrap()),
        )
        .unwrap();
        e.create(
            &format!("d{i}"),
            Some(&format!("0 {SECTORS} linear m{i} 0")),
        )
        .unwrap();
    }
    let vol = e
        .create(
            "r",
            Some(&format!(
                "0 {SECTORS} raid raid1 6 0 nosync region_size 128 daemon_sleep 2 \
                 2 meta0 d0 meta1 d1"
            )),
        )
        .unwrap();
    let counters: Vec<Arc<Counters>> = (0..2).map(|_| Arc::new(Counters::default())).collect();
    for (me, c) in counters.iter().enumerate() {
        let w = Worker {
            me: me as u64,
            vol,
            bufs: (0..QD).map(|_| vec![0u8; 4096]).collect(),
            busy: vec![None; QD],
            last: vec![0; BLOCKS as usize],
            inflight_block: vec![false; BLOCKS as usize],
            seq: 0,
            rng: 0x9e37_79b9 + me as u64,
            c: c.clone(),
        };
        e.threads().unwrap().attach(Box::new(w), Some(me));
    }
    let total = || counters.iter().map(|c| c.done.load(Relaxed)).sum::<u64>();
    let flow = |n: u64| {
        let (before, start) = (total(), Instant::now());
        while total() < before + n {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "I/O stopped flowing"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    for round in 0..6 {
        flow(2000);
        e.reload("d1", &format!("0 {SECTORS} error")).unwrap();
        wait(&e, "leg 1 D", |s| s.contains(" AD "));
        flow(2000);
        e.reload("d1", &format!("0 {SECTORS} linear m1 0")).unwrap();
        e.message("r", 0, &["recover"]).unwrap();
        wait(&e, "leg 1 back", |s| s.contains(" AA "));
        assert_eq!(
            counters.iter().map(|c| c.failed.load(Relaxed)).sum::<u64>(),
            0,
            "round {round}: client I/O failed"
        );
    }
    flow(2000);
    for c in &counters {
        c.stop.store(true, Relaxed);
    }
    std::thread::sleep(Duration::from_millis(50));
    for c in &counters {
        assert_eq!(c.failed.load(Relaxed), 0, "client I/O failed");
        assert_eq!(
            c.corrupt.load(Relaxed),
            0,
            "a read returned stale or wrong data"
        );
    }
    wait(&e, "in sync", |s| {
        s.contains(&format!(" AA {SECTORS}/{SECTORS} idle "))
    });
    e.message("r", 0, &["check"]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    wait(&e, "check", |s| s.contains(" idle "));
    assert!(status(&e).ends_with(" idle 0 0 -"), "{}", status(&e));
    e.stop_threads();
    drop(e);
    // Compare the legs through an inline engine over the same leaves.
    let mut e = Engine::new(stackbd_targets::registry(), Default::default());
    let m0 = e.add_leaf("m0", legs[0].clone()).unwrap();
    let m1 = e.add_leaf("m1", legs[1].clone()).unwrap();
    let mut a = vec![0u8; SECTORS as usize * 512];
    let mut b = vec![0u8; SECTORS as usize * 512];
    assert_eq!(e.read_at(m0, 0, &mut a), Status::Ok);
    assert_eq!(e.read_at(m1, 0, &mut b), Status::Ok);
    assert!(a == b, "legs differ");
}
