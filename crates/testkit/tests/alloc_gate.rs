//! Allocation gate: zero heap allocations per I/O in steady state through
//! `linear -> striped -> linear -> mem`, with I/Os that split across stripe chunks.

use stackbd_core::{DataBuf, Engine, Op, ReactorConfig, Request};
use stackbd_testkit::alloc::{thread_allocs, CountingAlloc};
use stackbd_testkit::rng::Rng;
use std::sync::Arc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const CHUNK: u64 = 16;

fn four_layer_stack() -> (Engine, stackbd_core::DevId, u64) {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    let leaf_sectors = 32 * 1024; // 16 MiB per leaf
    for m in ["m0", "m1"] {
        e.add_leaf(
            m,
            Arc::new(stackbd_leaves::MemLeaf::new(leaf_sectors * 512).unwrap()),
        )
        .unwrap();
    }
    e.create("lo0", Some(&format!("0 {leaf_sectors} linear m0 0")))
        .unwrap();
    e.create("lo1", Some(&format!("0 {leaf_sectors} linear m1 0")))
        .unwrap();
    let size = 2 * leaf_sectors;
    e.create(
        "mid",
        Some(&format!("0 {size} striped 2 {CHUNK} lo0 0 lo1 0")),
    )
    .unwrap();
    let top = e
        .create("top", Some(&format!("0 {size} linear mid 0")))
        .unwrap();
    (e, top, size)
}

#[test]
fn zero_heap_allocations_per_io_through_four_layers() {
    let (mut e, top, size) = four_layer_stack();
    let mut rng = Rng::new(42);
    let mut buf = vec![0u8; 64 * 512];
    let mut run = |e: &mut Engine, n: u64, rng: &mut Rng| {
        for i in 0..n {
            let sectors = rng.range(1, 64) as u32;
            let sector = rng.range(0, size - sectors as u64);
            let b = &mut buf[..sectors as usize * 512];
            let s = if i % 2 == 0 {
                e.write_at(top, sector, b)
            } else {
                e.read_at(top, sector, b)
            };
            assert!(s.is_ok(), "{s:?}");
        }
    };
    // Warm up: the pool's frame areas, the queues and the leaf pages settle.
    run(&mut e, 2_000, &mut rng);
    let splits0 = e.reactor().stats.splits;
    let before = thread_allocs();
    run(&mut e, 100_000, &mut rng);
    let allocs = thread_allocs() - before;
    let splits = e.reactor().stats.splits - splits0;
    assert_eq!(allocs, 0, "heap allocations over 100,000 steady-state I/Os");
    assert!(
        splits > 50_000,
        "the I/Os must split across stripe chunks (got {splits} splits)"
    );
    assert_eq!(
        e.reactor().fallback().overflows,
        0,
        "frames fit the pooled areas"
    );
    assert_eq!(e.reactor().pool().stats.grown, 0);
}

/// Runs `rounds` rounds of 32 random reads and writes (1..64 sectors) at once on `top`, each
/// round reaped whole before the next; with `parked`, checks after the first poll that all 32
/// wait on a target's timer.
fn qd32_rounds(
    e: &mut Engine,
    top: stackbd_core::DevId,
    size: u64,
    bufs: &mut [Vec<u8>],
    rounds: u64,
    rng: &mut Rng,
    parked: bool,
) {
    for _ in 0..rounds {
        for (i, b) in bufs.iter_mut().enumerate() {
            let sectors = rng.range(1, 64) as u32;
            let sector = rng.range(0, size - sectors as u64);
            let op = if i % 2 == 0 { Op::Write } else { Op::Read };
            // SAFETY: `bufs` outlives the round, which reaps every completion before the
            // buffers are touched again.
            let data = unsafe { DataBuf::from_slice(&mut b[..sectors as usize * 512]) };
            e.submit(&Request::new(op, top, sector, sectors, data, i as u64))
                .unwrap();
        }
        if parked {
            e.poll();
            assert_eq!(
                e.reactor().parked_total(),
                bufs.len(),
                "every I/O waits for its timer"
            );
        }
        let mut done = 0;
        while done < bufs.len() {
            e.poll();
            while let Some(c) = e.reap() {
                assert!(c.status.is_ok());
                done += 1;
            }
        }
    }
}

#[test]
fn zero_heap_allocations_with_a_queue_depth_of_32() {
    let (mut e, top, size) = four_layer_stack();
    let mut rng = Rng::new(7);
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 64 * 512]).collect();
    let mut run = |e: &mut Engine, rounds: u64, rng: &mut Rng| {
        qd32_rounds(e, top, size, &mut bufs, rounds, rng, false)
    };
    run(&mut e, 100, &mut rng);
    let before = thread_allocs();
    run(&mut e, 3_200, &mut rng); // 102,400 I/Os
    assert_eq!(
        thread_allocs() - before,
        0,
        "heap allocations over 102,400 I/Os at QD32"
    );
}

/// The gate can fail: the counter sees this thread's allocations.
#[test]
fn the_counter_sees_allocations() {
    let before = thread_allocs();
    let v: Vec<u64> = std::hint::black_box(Vec::with_capacity(16));
    drop(v);
    assert_eq!(thread_allocs() - before, 1);
}

/// `delay -> flakey -> linear -> striped -> mem`, every I/O delayed 1 ms on a reactor timer
/// (parked, then unparked by the timer), at a queue depth of 32.
#[test]
fn zero_heap_allocations_through_delay_and_flakey_with_every_delay_on_a_timer() {
    let (mut e, _, size) = four_layer_stack();
    e.create("fl", Some(&format!("0 {size} flakey top 0 3600 1")))
        .unwrap();
    let top = e
        .create("dl", Some(&format!("0 {size} delay fl 0 1")))
        .unwrap();
    let mut rng = Rng::new(9);
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 64 * 512]).collect();
    let mut run = |e: &mut Engine, rounds: u64, rng: &mut Rng| {
        qd32_rounds(e, top, size, &mut bufs, rounds, rng, true)
    };
    run(&mut e, 50, &mut rng);
    let before = thread_allocs();
    run(&mut e, 500, &mut rng); // 16,000 I/Os
    assert_eq!(
        thread_allocs() - before,
        0,
        "heap allocations over 16,000 delayed I/Os at QD32"
    );
    assert_eq!(e.reactor().pool().stats.grown, 0);
}
