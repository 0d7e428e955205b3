//! Allocation gate: zero heap allocations per I/O in steady state through raid1 (mirrored
//! writes as child bios, balanced reads), and with the bitmap daemon clearing and writes
//! setting bits again (metadata batches through bounce buffers).

#[path = "raid_util.rs"]
mod util;

use stackbd_core::alloc_count::{thread_allocs, CountingAlloc};
use std::time::Duration;
use util::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const SECTORS: u64 = 8192;

/// `n` random reads and writes of 1..=32 sectors; `buf` is the caller's (no allocation here).
fn run(r: &mut Rig, n: u64, seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let sectors = 1 + (x % 32) as u32;
        let sector = (x >> 8) % (SECTORS - sectors as u64);
        let b = &mut buf[..sectors as usize * SECTOR];
        let s = if i % 2 == 0 {
            r.e.write_at(r.v, sector, b)
        } else {
            r.e.read_at(r.v, sector, b)
        };
        assert!(s.is_ok(), "{s:?}");
        if i % 64 == 0 {
            r.e.poll();
        }
    }
}

#[test]
fn zero_allocations_per_io_with_bits_set() {
    let mut r = Rig::new(
        2,
        SECTORS,
        &["nosync", "region_size", "128", "daemon_sleep", "3600000"],
    );
    let mut buf = vec![0u8; 32 * SECTOR];
    run(&mut r, 3_000, 7, &mut buf);
    let before = thread_allocs();
    run(&mut r, 20_000, 9, &mut buf);
    assert_eq!(thread_allocs() - before, 0, "allocations per I/O");
    r.assert_legs_identical();
}

#[test]
fn zero_allocations_while_bits_are_set_and_cleared() {
    let mut r = Rig::new(
        2,
        SECTORS,
        &["nosync", "region_size", "128", "daemon_sleep", "1"],
    );
    let mut buf = vec![0u8; 32 * SECTOR];
    let mut go = |r: &mut Rig, rounds: u64, seed: u64| {
        for k in 0..rounds {
            run(r, 200, seed + k, &mut buf);
            std::thread::sleep(Duration::from_millis(3));
            for _ in 0..20 {
                r.e.poll();
            }
        }
    };
    go(&mut r, 20, 100);
    let events0 = r.stat("events");
    let before = thread_allocs();
    go(&mut r, 40, 1000);
    let allocs = thread_allocs() - before;
    let batches = r.stat("events") - events0;
    assert!(batches > 10, "only {batches} metadata batches ran");
    assert_eq!(allocs, 0, "allocations over {batches} metadata batches");
}
