//! The request queue of request-based volumes: bursts merge into fewer, larger requests (the
//! counters say how many), merged reads and writes move the right bytes, the schedulers keep
//! data intact, nothing allocates in steady state, and a request-based table over a volume is
//! refused.

use stackbd_core::target::{expect_args, parse_num};
use stackbd_core::{
    ArgError, Bio, BioFlags, CtorCx, DataBuf, DevId, DevRef, Engine, Limits, MapResult, Op,
    QueueOpts, ReactorConfig, Request, Scheduler, Sector, Status, Target, TargetCx,
};
use stackbd_testkit::alloc::{thread_allocs, CountingAlloc};
use stackbd_testkit::rng::Rng;
use std::sync::Arc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// `rq-linear <device> <offset>`: linear, but request-based (the volume gets a request queue).
#[derive(Debug)]
struct RqLinear {
    dev: DevRef,
    offset: Sector,
}

impl RqLinear {
    fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        expect_args(args, 2, "<device> <offset>")?;
        let offset = parse_num::<Sector>("offset", args[1])?;
        let (dev, _) = cx.device("device", args[0], offset, cx.len)?;
        Ok(Box::new(RqLinear { dev, offset }))
    }
}

impl Target for RqLinear {
    fn kind(&self) -> &'static str {
        "rq-linear"
    }
    fn map(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> MapResult {
        bio.dev = self.dev.id;
        bio.sector += self.offset;
        MapResult::Remapped
    }
    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }
    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        let mut l = Limits::TOP;
        l.stack(&child(self.dev.id));
        l
    }
    fn devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }
    fn args(&self) -> String {
        format!("{} {}", self.dev, self.offset)
    }
    fn request_based(&self) -> bool {
        true
    }
}

const LEAF_SECTORS: u64 = 16 * 1024; // 8 MiB

fn engine(sched: Scheduler, nr_requests: u32) -> (Engine, DevId) {
    let mut reg = stackbd_targets::registry();
    reg.register("rq-linear", RqLinear::ctor);
    let mut e = Engine::new(reg, ReactorConfig::default());
    e.add_leaf(
        "m0",
        Arc::new(stackbd_leaves::MemLeaf::new(LEAF_SECTORS * 512).unwrap()),
    )
    .unwrap();
    // Two targets, so requests must not merge across the boundary between them.
    let half = LEAF_SECTORS / 2;
    let id = e
        .create(
            "rq",
            Some(&format!(
                "0 {half} rq-linear m0 {half}\n{half} {half} rq-linear m0 0"
            )),
        )
        .unwrap();
    e.set_queue(
        "rq",
        QueueOpts {
            scheduler: sched,
            nr_requests,
        },
    )
    .unwrap();
    (e, id)
}

/// Submits every I/O at once (one plugged burst), runs the reactor until all complete, and
/// returns their statuses in submission order.
fn burst(e: &mut Engine, ios: &[Request]) -> Vec<Status> {
    for (i, r) in ios.iter().enumerate() {
        let mut r = *r;
        r.user_data = i as u64;
        e.submit(&r).expect("submit");
    }
    let mut out = vec![None; ios.len()];
    let mut left = ios.len();
    let mut idle = 0;
    while left > 0 {
        if e.poll() == 0 {
            idle += 1;
            assert!(idle < 1_000_000, "burst never completed ({left} left)");
        }
        while let Some(c) = e.reap() {
            out[c.user_data as usize] = Some(c.status);
            left -= 1;
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn io(op: Op, dev: DevId, sector: Sector, buf: &mut [u8]) -> Request {
    let sectors = (buf.len() / 512) as u32;
    let data = if op.has_data() {
        // SAFETY: every buffer outlives the burst that uses it (the burst waits for all).
        unsafe { DataBuf::from_slice(buf) }
    } else {
        DataBuf::EMPTY
    };
    Request::new(op, dev, sector, sectors, data, 0)
}

#[test]
fn a_sequential_burst_becomes_few_large_requests() {
    let (mut e, dev) = engine(Scheduler::None, 16);
    let mut bufs: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i + 1; 4096]).collect();
    let ios: Vec<Request> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| io(Op::Write, dev, i as u64 * 8, b))
        .collect();
    let before = e.reactor().stats;
    assert!(burst(&mut e, &ios).iter().all(|s| s.is_ok()));
    let s = e.reactor().stats;
    assert_eq!(s.rq_bios - before.rq_bios, 64);
    assert_eq!(s.rq_merges - before.rq_merges, 63, "one request of 64 bios");
    assert_eq!(s.rq_requests - before.rq_requests, 1);
    assert_eq!(
        s.leaf_ios - before.leaf_ios,
        1,
        "one leaf I/O for 64 writes"
    );

    // Read it back as one burst of 64 reads: merged too, and each bio gets its own bytes.
    let mut back: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 4096]).collect();
    let ios: Vec<Request> = back
        .iter_mut()
        .enumerate()
        .map(|(i, b)| io(Op::Read, dev, i as u64 * 8, b))
        .collect();
    let before = e.reactor().stats;
    assert!(burst(&mut e, &ios).iter().all(|s| s.is_ok()));
    assert_eq!(e.reactor().stats.leaf_ios - before.leaf_ios, 1);
    for (i, b) in back.iter().enumerate() {
        assert!(
            b.iter().all(|&x| x == i as u8 + 1),
            "bio {i} read wrong bytes"
        );
    }
}

#[test]
fn requests_stop_at_target_boundaries_size_and_op() {
    let (mut e, dev) = engine(Scheduler::None, 16);
    let half = LEAF_SECTORS / 2;
    // 8 writes straddling the boundary between the two targets: 4 below, 4 above.
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![7u8; 4096]).collect();
    let ios: Vec<Request> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| io(Op::Write, dev, half - 32 + i as u64 * 8, b))
        .collect();
    let before = e.reactor().stats;
    assert!(burst(&mut e, &ios).iter().all(|s| s.is_ok()));
    assert_eq!(e.reactor().stats.rq_requests - before.rq_requests, 2);

    // 130 sequential 4 KiB writes: 256 KiB requests at most, so 3 of them.
    let mut bufs: Vec<Vec<u8>> = (0..130).map(|_| vec![1u8; 4096]).collect();
    let ios: Vec<Request> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| io(Op::Write, dev, i as u64 * 8, b))
        .collect();
    let before = e.reactor().stats;
    assert!(burst(&mut e, &ios).iter().all(|s| s.is_ok()));
    assert_eq!(e.reactor().stats.rq_requests - before.rq_requests, 3);

    // Alternating reads and writes of neighbours do not merge; FUA only with FUA.
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![1u8; 4096]).collect();
    let mut ios: Vec<Request> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| {
            io(
                if i % 2 == 0 { Op::Read } else { Op::Write },
                dev,
                i as u64 * 8,
                b,
            )
        })
        .collect();
    ios[1].flags = BioFlags::FUA;
    let before = e.reactor().stats;
    assert!(burst(&mut e, &ios).iter().all(|s| s.is_ok()));
    assert_eq!(e.reactor().stats.rq_requests - before.rq_requests, 8);

    // Flushes go through as requests of their own; discards merge.
    let mut none = [0u8; 0];
    let mut ios = vec![io(Op::Flush, dev, 0, &mut none)];
    for i in 0..4 {
        let mut r = io(Op::Discard, dev, 1000 + i * 8, &mut none);
        r.sectors = 8;
        ios.push(r);
    }
    let before = e.reactor().stats;
    assert!(burst(&mut e, &ios).iter().all(|s| s.is_ok()));
    assert_eq!(e.reactor().stats.rq_requests - before.rq_requests, 2);
}

/// Random disjoint bursts of reads and writes under both schedulers and small depths, checked
/// against a flat reference after every burst.
fn model(sched: Scheduler, nr_requests: u32, seed: u64) {
    let (mut e, dev) = engine(sched, nr_requests);
    let size = LEAF_SECTORS as usize * 512;
    let mut reference = vec![0u8; size];
    let mut rng = Rng::new(seed);
    for round in 0..150 {
        // Cut a random region into disjoint pieces: runs of neighbours, with gaps.
        let n = rng.range(1, 48) as usize;
        let mut sector = rng.range(0, LEAF_SECTORS / 2);
        let mut plan = Vec::new();
        for _ in 0..n {
            let len = rng.range(1, 17) * 8 / 8;
            if sector + len > LEAF_SECTORS {
                break;
            }
            let op = if rng.chance(50) { Op::Write } else { Op::Read };
            plan.push((op, sector, len));
            sector += len + if rng.chance(20) { rng.range(1, 9) } else { 0 };
        }
        let mut bufs: Vec<Vec<u8>> = plan
            .iter()
            .map(|&(op, s, len)| {
                let mut b = vec![0u8; len as usize * 512];
                if op == Op::Write {
                    for (i, x) in b.iter_mut().enumerate() {
                        *x = (s as usize * 3 + i + round) as u8;
                    }
                }
                b
            })
            .collect();
        let ios: Vec<Request> = plan
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&(op, s, _), b)| io(op, dev, s, b))
            .collect();
        let st = burst(&mut e, &ios);
        assert!(st.iter().all(|s| s.is_ok()), "{st:?}");
        for ((op, s, len), b) in plan.iter().zip(&bufs) {
            let r = &mut reference[*s as usize * 512..(*s + *len) as usize * 512];
            match op {
                Op::Write => r.copy_from_slice(b),
                _ => assert!(r == &b[..], "round {round}: read of {s}+{len} differs"),
            }
        }
    }
    let s = e.reactor().stats;
    assert!(s.rq_merges > 0, "random runs of neighbours merged");
    assert!(s.leaf_ios < s.rq_bios, "fewer leaf I/Os than bios");
    let mut all = vec![0u8; size];
    for (i, chunk) in all.chunks_mut(64 * 1024).enumerate() {
        assert!(e.read_at(dev, i as u64 * 128, chunk).is_ok());
    }
    assert!(all == reference, "final contents differ from the reference");
}

#[test]
fn data_stays_right_under_none() {
    model(Scheduler::None, 16, 1);
    model(Scheduler::None, 1, 2);
}

#[test]
fn data_stays_right_under_deadline() {
    model(Scheduler::Deadline, 16, 3);
    model(Scheduler::Deadline, 2, 4);
}

#[test]
fn no_heap_allocation_per_io_in_steady_state() {
    let (mut e, dev) = engine(Scheduler::Deadline, 8);
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![5u8; 4096]).collect();
    let mut rng = Rng::new(9);
    let mut ios: Vec<Request> = Vec::with_capacity(32);
    let mut run = |e: &mut Engine, rounds: usize, ios: &mut Vec<Request>, rng: &mut Rng| {
        for _ in 0..rounds {
            ios.clear();
            let base = rng.range(0, LEAF_SECTORS - 32 * 8);
            let op = if rng.chance(50) { Op::Write } else { Op::Read };
            for (i, b) in bufs.iter_mut().enumerate() {
                let sector = if i % 4 == 3 {
                    rng.range(0, LEAF_SECTORS / 8 - 1) * 8 // some random ones in between
                } else {
                    base + i as u64 * 8
                };
                ios.push(io(op, dev, sector, b));
            }
            for (i, r) in ios.iter().enumerate() {
                let mut r = *r;
                r.user_data = i as u64;
                e.submit(&r).unwrap();
            }
            let mut left = ios.len();
            while left > 0 {
                e.poll();
                while e.reap().is_some() {
                    left -= 1;
                }
            }
        }
    };
    run(&mut e, 200, &mut ios, &mut rng);
    let before = thread_allocs();
    let merges = e.reactor().stats.rq_merges;
    run(&mut e, 1000, &mut ios, &mut rng);
    let allocs = thread_allocs() - before;
    assert!(e.reactor().stats.rq_merges - merges > 10_000);
    assert_eq!(allocs, 0, "{allocs} heap allocations over 32,000 I/Os");
}

#[test]
fn a_request_based_table_over_a_volume_is_refused() {
    let (mut e, _) = engine(Scheduler::None, 16);
    e.create("lin", Some("0 1024 linear m0 0")).unwrap();
    let err = e
        .create("bad", Some("0 1024 rq-linear lin 0"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("leaves only"), "{err}");
    let err = e
        .create("mixed", Some("0 8 rq-linear m0 0\n8 8 linear m0 0"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot mix"), "{err}");
    assert!(e.dev_info("bad").is_err() && e.dev_info("mixed").is_err());
    assert!(e
        .set_queue(
            "lin",
            QueueOpts {
                nr_requests: 0,
                ..QueueOpts::default()
            }
        )
        .is_err());
}
