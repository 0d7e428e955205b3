//! Allocation gate: zero heap allocations per I/O in steady state through a `snapshot-origin`
//! with two persistent snapshots, with writes that copy chunks out (copy, flush, metadata
//! write, flush, release) and reads of the origin and the snapshots.

use stackbd_core::alloc_count::{thread_allocs, CountingAlloc};
use stackbd_core::{Engine, ReactorConfig, Status, SuspendOpts};
use stackbd_leaves::MemLeaf;
use std::sync::Arc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const ORIGIN: u64 = 64 * 2048; // 64 MiB
const COW: u64 = 80 * 2048;

fn allocated(e: &Engine, name: &str) -> u64 {
    let s = e.status(name).unwrap();
    let f = s.split_whitespace().nth(3).unwrap();
    f.split('/').next().unwrap().parse().unwrap()
}

#[test]
fn zero_heap_allocations_per_io_with_two_snapshots_and_copy_outs() {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    for (n, s) in [("base", ORIGIN), ("cow0", COW), ("cow1", COW)] {
        e.add_leaf(n, Arc::new(MemLeaf::new(s * 512).unwrap()))
            .unwrap();
    }
    let o = e
        .create("o", Some(&format!("0 {ORIGIN} snapshot-origin base")))
        .unwrap();
    e.suspend("o", SuspendOpts::default()).unwrap();
    let s0 = e
        .create("s0", Some(&format!("0 {ORIGIN} snapshot base cow0 P 8")))
        .unwrap();
    let s1 = e
        .create("s1", Some(&format!("0 {ORIGIN} snapshot base cow1 P 8")))
        .unwrap();
    e.resume("o").unwrap();
    let mut x = 0x1234_5678_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; 4096];
    let mut run = |e: &mut Engine, n: u64| {
        for i in 0..n {
            let sector = (next() % (ORIGIN / 8)) * 8;
            let dev = match i % 4 {
                0 | 1 => o,
                2 => s0,
                _ => s1,
            };
            let s = if i % 4 == 0 {
                e.write_at(dev, sector, &buf)
            } else {
                e.read_at(dev, sector, &mut buf)
            };
            assert_eq!(s, Status::Ok);
        }
    };
    // Warm up: pools, bounce buffers, copy tasks, the leaf pages.
    run(&mut e, 4_000);
    let copied0 = allocated(&e, "s0");
    let before = thread_allocs();
    run(&mut e, 20_000);
    let allocs = thread_allocs() - before;
    let copies = (allocated(&e, "s0") - copied0) / 8;
    assert!(
        copies > 3_000,
        "the writes must copy chunks out (got {copies})"
    );
    assert_eq!(
        allocs, 0,
        "heap allocations over 20,000 I/Os with {copies} copy-outs"
    );
}
