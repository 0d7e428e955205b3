//! Resync throughput, for BENCHMARKS.md (`scripts/bench-raid.sh`; run in release with
//! `--ignored`): a full rebuild of one leg of a raid1 over two mem leaves (`rebuild 1`, through
//! the copy engine, region by region) next to a plain copy of the same bytes from one mem leaf
//! to another through the same engine (1 MiB reads and writes). Prints one table row each.

#[path = "raid_util.rs"]
mod util;

use stackbd_core::Status;
use std::time::Instant;
use util::*;

const SECTORS: u64 = 512 * 2048; // 512 MiB

#[test]
#[ignore = "benchmark: run in release with --ignored"]
fn resync_throughput_vs_plain_copy() {
    let mut r = Rig::new(2, SECTORS, &["nosync", "region_size", "2048"]);
    let d0 = r.data_leaf[0];
    let d1 = r.data_leaf[1];
    let chunk = pattern(3, 1 << 20);
    for s in (0..SECTORS).step_by(2048) {
        assert_eq!(r.e.write_at(d0, s, &chunk), Status::Ok);
    }
    // Plain copy: 1 MiB read from leg 0, 1 MiB write to leg 1, synchronously.
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    for s in (0..SECTORS).step_by(2048) {
        assert_eq!(r.e.read_at(d0, s, &mut buf), Status::Ok);
        assert_eq!(r.e.write_at(d1, s, &buf), Status::Ok);
    }
    let plain = t.elapsed();
    let mib = (SECTORS * 512) as f64 / (1 << 20) as f64;
    // Resync: reload with `rebuild 1`, first I/O loads, wait until in sync.
    let t = Instant::now();
    r.e.reload(
        "r",
        &table(2, SECTORS, &["region_size", "2048", "rebuild", "1"]),
    )
    .unwrap();
    let _ = r.read(0, 1);
    // Poll without sleeping (the inline engine copies only while polled).
    let done = format!("AA {SECTORS}/{SECTORS} idle");
    let mut n = 0u64;
    loop {
        r.e.poll();
        n += 1;
        if n.is_multiple_of(256) && r.status().contains(&done) {
            break;
        }
    }
    let resync = t.elapsed();
    assert_eq!(r.stat("copied_regions"), SECTORS / 2048);
    r.assert_legs_identical();
    println!("| operation | MiB | seconds | MiB/s |");
    println!("|---|---:|---:|---:|");
    for (what, d) in [
        ("plain copy (1 MiB read + write)", plain),
        ("raid1 resync (rebuild 1)", resync),
    ] {
        println!(
            "| {what} | {mib:.0} | {:.3} | {:.0} |",
            d.as_secs_f64(),
            mib / d.as_secs_f64()
        );
    }
    println!(
        "| resync / plain copy | | | {:.2}x |",
        plain.as_secs_f64() / resync.as_secs_f64()
    );
}
