//! The flakey target through the engine: what a client reads and writes in the up and down
//! intervals with each feature, the table and status text, and refused tables.
//!
//! Most tests use tables that are always down (`<up> = 0`) or always up (`<down> = 0`), which
//! dm's interval arithmetic allows, so they do not depend on timing. The one test of the clock
//! measures where it is and retries a cycle that a slow machine made ambiguous.

use stackbd_core::{BioFlags, DataBuf, DevId, Engine, Op, ReactorConfig, Request, Status};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: stackbd_core::alloc_count::CountingAlloc = stackbd_core::alloc_count::CountingAlloc;

const LEAF_SECTORS: u64 = 2048;
const SECTOR: usize = 512;

/// The leaf's initial contents: every byte differs from its neighbours and from 0..=9.
fn pattern(i: usize) -> u8 {
    ((i * 7 + i / 512) % 200) as u8 + 20
}

fn engine() -> (Engine, DevId) {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    let leaf = e
        .add_leaf(
            "m0",
            Arc::new(stackbd_leaves::MemLeaf::new(LEAF_SECTORS * SECTOR as u64).unwrap()),
        )
        .unwrap();
    let init: Vec<u8> = (0..LEAF_SECTORS as usize * SECTOR).map(pattern).collect();
    assert_eq!(e.write_at(leaf, 0, &init), Status::Ok);
    (e, leaf)
}

/// An engine with volume `v` = one flakey line over the first 1024 sectors of `m0` (`args` after
/// the device).
fn rig(args: &str) -> (Engine, DevId, DevId) {
    let (mut e, leaf) = engine();
    let v = e
        .create("v", Some(&format!("0 1024 flakey m0 {args}")))
        .unwrap();
    (e, leaf, v)
}

fn read(e: &mut Engine, dev: DevId, sector: u64, sectors: usize) -> (Status, Vec<u8>) {
    let mut b = vec![0u8; sectors * SECTOR];
    let s = e.read_at(dev, sector, &mut b);
    (s, b)
}

fn leaf_bytes(e: &mut Engine, leaf: DevId, sector: u64, sectors: usize) -> Vec<u8> {
    let (s, b) = read(e, leaf, sector, sectors);
    assert_eq!(s, Status::Ok);
    b
}

fn expected(sector: u64, sectors: usize) -> Vec<u8> {
    let at = sector as usize * SECTOR;
    (at..at + sectors * SECTOR).map(pattern).collect()
}

/// Positions where `a` and `b` differ.
fn diff(a: &[u8], b: &[u8]) -> Vec<usize> {
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

fn read_with(e: &mut Engine, dev: DevId, sector: u64, buf: &mut [u8], flags: BioFlags) -> Status {
    // SAFETY: `buf` outlives the synchronous `io`, which returns after the bio completed.
    let data = unsafe { DataBuf::from_slice(buf) };
    let mut req = Request::new(Op::Read, dev, sector, (buf.len() / SECTOR) as u32, data, 0);
    req.flags = flags;
    e.io(req)
}

#[test]
fn down_without_features_fails_all_io() {
    let (mut e, leaf, v) = rig("0 0 1");
    assert_eq!(read(&mut e, v, 0, 8).0, Status::IoError);
    assert_eq!(e.write_at(v, 8, &[1u8; 4096]), Status::IoError);
    assert_eq!(e.flush(v), Status::IoError);
    assert_eq!(e.discard(v, 16, 8), Status::IoError);
    assert_eq!(e.write_zeroes(v, 16, 8), Status::IoError);
    assert_eq!(leaf_bytes(&mut e, leaf, 0, 32), expected(0, 32));
    assert_eq!(
        e.table("v", false).unwrap(),
        "0 1024 flakey m0 0 0 1 2 error_reads error_writes\n"
    );
    assert_eq!(e.status("v").unwrap(), "0 1024 flakey\n");
}

#[test]
fn up_interval_maps_linearly_at_the_offset() {
    let (mut e, leaf, v) = rig("64 3600 1");
    assert_eq!(read(&mut e, v, 8, 16), (Status::Ok, expected(72, 16)));
    assert_eq!(e.write_at(v, 0, &[5u8; 1024]), Status::Ok);
    assert_eq!(leaf_bytes(&mut e, leaf, 64, 2), vec![5u8; 1024]);
    assert_eq!(leaf_bytes(&mut e, leaf, 62, 2), expected(62, 2));
    assert_eq!(e.flush(v), Status::Ok);
    assert_eq!(
        e.table("v", false).unwrap(),
        "0 1024 flakey m0 64 3600 1 2 error_reads error_writes\n"
    );
    // `<down> = 0` is never down, whatever the features.
    let (mut e, _, v) = rig("0 1 0 1 error_reads");
    assert_eq!(read(&mut e, v, 0, 8), (Status::Ok, expected(0, 8)));
}

#[test]
fn error_reads_fails_reads_and_passes_writes() {
    let (mut e, leaf, v) = rig("0 0 1 1 error_reads");
    assert_eq!(read(&mut e, v, 0, 8).0, Status::IoError);
    assert_eq!(e.write_at(v, 8, &[3u8; 4096]), Status::Ok);
    assert_eq!(leaf_bytes(&mut e, leaf, 8, 8), vec![3u8; 4096]);
    assert_eq!(e.flush(v), Status::Ok);
    assert_eq!(
        e.table("v", false).unwrap(),
        "0 1024 flakey m0 0 0 1 1 error_reads\n"
    );
}

#[test]
fn drop_writes_acknowledges_and_drops() {
    let (mut e, leaf, v) = rig("0 0 1 1 drop_writes");
    assert_eq!(e.write_at(v, 8, &[3u8; 4096]), Status::Ok);
    assert_eq!(e.write_zeroes(v, 16, 8), Status::Ok);
    assert_eq!(e.discard(v, 24, 8), Status::Ok);
    assert_eq!(e.flush(v), Status::Ok);
    assert_eq!(leaf_bytes(&mut e, leaf, 0, 40), expected(0, 40));
    // Reads go through untouched.
    assert_eq!(read(&mut e, v, 8, 8), (Status::Ok, expected(8, 8)));
    assert_eq!(
        e.table("v", false).unwrap(),
        "0 1024 flakey m0 0 0 1 1 drop_writes\n"
    );
}

#[test]
fn copies_through_flakey_see_the_interval() {
    // A copy is a read and a write through the target, never offloaded past it.
    let (mut e, leaf, v) = rig("0 0 1 1 error_writes");
    assert_eq!(e.copy(v, 0, 64, 8), Status::IoError);
    let (mut e2, leaf2, v2) = rig("0 0 1 1 drop_writes");
    assert_eq!(e2.copy(v2, 0, 64, 8), Status::Ok);
    for (e, leaf) in [(&mut e, leaf), (&mut e2, leaf2)] {
        assert_eq!(leaf_bytes(e, leaf, 64, 8), expected(64, 8));
    }
    let (mut e, leaf, v) = rig("0 0 1 5 corrupt_bio_byte 2 r 0 0");
    assert_eq!(e.copy(v, 0, 64, 8), Status::Ok);
    let mut want = expected(0, 8);
    want[1] = 0;
    assert_eq!(leaf_bytes(&mut e, leaf, 64, 8), want);
    // Up: a plain copy.
    let (mut e, leaf, v) = rig("0 1 0");
    assert_eq!(e.copy(v, 0, 64, 8), Status::Ok);
    assert_eq!(leaf_bytes(&mut e, leaf, 64, 8), expected(0, 8));
}

#[test]
fn error_writes_fails_writes_and_passes_reads() {
    let (mut e, leaf, v) = rig("0 0 1 1 ERROR_WRITES");
    assert_eq!(e.write_at(v, 8, &[3u8; 4096]), Status::IoError);
    assert_eq!(e.write_zeroes(v, 16, 8), Status::IoError);
    assert_eq!(e.flush(v), Status::IoError);
    assert_eq!(leaf_bytes(&mut e, leaf, 0, 40), expected(0, 40));
    assert_eq!(read(&mut e, v, 8, 8), (Status::Ok, expected(8, 8)));
    assert_eq!(
        e.table("v", false).unwrap(),
        "0 1024 flakey m0 0 0 1 1 error_writes\n"
    );
}

#[test]
fn corrupt_bio_byte_sets_the_nth_byte_of_each_read() {
    let (mut e, leaf, v) = rig("16 0 1 5 corrupt_bio_byte 32 r 1 0");
    for (sector, sectors) in [(0u64, 8usize), (8, 1), (100, 3)] {
        let (s, got) = read(&mut e, v, sector, sectors);
        assert_eq!(s, Status::Ok);
        let mut want = expected(16 + sector, sectors);
        want[31] = 1;
        assert_eq!(got, want, "read at {sector}");
    }
    // The device keeps its data; writes go down intact.
    assert_eq!(leaf_bytes(&mut e, leaf, 16, 8), expected(16, 8));
    assert_eq!(e.write_at(v, 0, &[9u8; 512]), Status::Ok);
    assert_eq!(leaf_bytes(&mut e, leaf, 16, 1), vec![9u8; 512]);
    assert_eq!(
        e.table("v", false).unwrap(),
        "0 1024 flakey m0 16 0 1 5 corrupt_bio_byte 32 r 1 0\n"
    );
}

#[test]
fn a_failed_read_is_not_corrupted() {
    let (mut e, _) = engine();
    e.create("bad", Some("0 1024 error")).unwrap();
    let v = e
        .create(
            "v",
            Some("0 1024 flakey bad 0 0 1 5 corrupt_bio_byte 1 r 7 0"),
        )
        .unwrap();
    let mut buf = vec![0xaau8; 4096];
    assert_eq!(e.read_at(v, 0, &mut buf), Status::IoError);
    assert_eq!(buf, vec![0xaau8; 4096]);
}

#[test]
fn corrupt_bio_byte_past_the_bio_changes_nothing() {
    let (mut e, _, v) = rig("0 0 1 5 corrupt_bio_byte 600 r 0 0");
    assert_eq!(read(&mut e, v, 0, 1), (Status::Ok, expected(0, 1)));
    let (s, got) = read(&mut e, v, 0, 2);
    assert_eq!(s, Status::Ok);
    assert_eq!(diff(&got, &expected(0, 2)), vec![599]);
    assert_eq!(got[599], 0);
}

#[test]
fn corrupt_bio_byte_counts_from_each_targets_piece() {
    // A read across two flakey lines is split: each piece is a bio of its own line.
    let (mut e, _) = engine();
    let v = e
        .create(
            "v",
            Some(
                "0 512 flakey m0 0 0 1 5 corrupt_bio_byte 1 r 7 0\n\
                 512 512 flakey m0 512 0 1 5 corrupt_bio_byte 2 r 9 0",
            ),
        )
        .unwrap();
    let (s, got) = read(&mut e, v, 508, 8);
    assert_eq!(s, Status::Ok);
    let want = expected(508, 8);
    assert_eq!(diff(&got, &want), vec![0, 4 * SECTOR + 1]);
    assert_eq!((got[0], got[4 * SECTOR + 1]), (7, 9));
}

#[test]
fn corrupt_bio_byte_flags_select_bios_by_linux_opf() {
    const NOWAIT: u32 = 1 << 21; // REQ_NOWAIT
    const FUA: u32 = 1 << 17; // REQ_FUA
    let mut buf = vec![0u8; 4096];
    // Only bios with REQ_NOWAIT are corrupted.
    let (mut e, _, v) = rig(&format!("0 0 1 5 corrupt_bio_byte 3 r 0 {NOWAIT}"));
    assert_eq!(
        read_with(&mut e, v, 0, &mut buf, BioFlags::NONE),
        Status::Ok
    );
    assert_eq!(buf, expected(0, 8));
    assert_eq!(
        read_with(&mut e, v, 0, &mut buf, BioFlags::NOWAIT),
        Status::Ok
    );
    assert_eq!(diff(&buf, &expected(0, 8)), vec![2]);
    // REQ_NOWAIT | REQ_FUA: NOWAIT alone is not enough.
    let (mut e, _, v) = rig(&format!("0 0 1 5 corrupt_bio_byte 3 r 0 {}", NOWAIT | FUA));
    assert_eq!(
        read_with(&mut e, v, 0, &mut buf, BioFlags::NOWAIT),
        Status::Ok
    );
    assert_eq!(buf, expected(0, 8));
    // The op is part of bi_opf: mask 1 (REQ_OP_WRITE's bit) never matches a read.
    let (mut e, _, v) = rig("0 0 1 5 corrupt_bio_byte 3 r 0 1");
    assert_eq!(read(&mut e, v, 0, 8), (Status::Ok, expected(0, 8)));
}

#[test]
fn random_read_corrupt_changes_at_most_one_byte() {
    // Probability 1: every read is corrupted in one random byte, with a random value (which
    // may equal the old one, 1 time in 256).
    let (mut e, leaf, v) = rig("0 0 1 2 random_read_corrupt 1000000000");
    let mut changed = 0;
    let mut places = std::collections::BTreeSet::new();
    for _ in 0..32 {
        let (s, got) = read(&mut e, v, 0, 8);
        assert_eq!(s, Status::Ok);
        let d = diff(&got, &expected(0, 8));
        assert!(d.len() <= 1, "{d:?}");
        changed += d.len();
        places.extend(d);
    }
    assert!(changed >= 24, "only {changed} of 32 reads corrupted");
    assert!(places.len() > 1, "always the same byte: {places:?}");
    assert_eq!(leaf_bytes(&mut e, leaf, 0, 8), expected(0, 8));
    assert_eq!(
        e.table("v", false).unwrap(),
        "0 1024 flakey m0 0 0 1 2 random_read_corrupt 1000000000\n"
    );
    // Probability 1e-9: 32 reads come back intact (a false failure once in 3e7 runs).
    let (mut e, _, v) = rig("0 0 1 2 random_read_corrupt 1");
    for _ in 0..32 {
        assert_eq!(read(&mut e, v, 0, 8), (Status::Ok, expected(0, 8)));
    }
    // While up nothing is corrupted.
    let (mut e, _, v) = rig("0 1 0 2 random_read_corrupt 1000000000");
    for _ in 0..8 {
        assert_eq!(read(&mut e, v, 0, 8), (Status::Ok, expected(0, 8)));
    }
}

#[test]
fn corrupt_bio_byte_w_corrupts_what_lands_not_the_writers_buffer() {
    // Down from the start: byte 3 of every write becomes 0x07 on the device.
    let (mut e, leaf, v) = rig("0 0 1 5 corrupt_bio_byte 3 w 7 0");
    let buf: Vec<u8> = (0..8 * SECTOR).map(|i| (i % 251) as u8 + 1).collect();
    let before = buf.clone();
    assert_eq!(e.write_at(v, 16, &buf), Status::Ok);
    assert_eq!(buf, before, "the writer's buffer is untouched");
    let got = leaf_bytes(&mut e, leaf, 16, 8);
    assert_eq!(diff(&got, &before), vec![2], "only the third byte differs");
    assert_eq!(got[2], 7);
    // Split across two targets: each piece is its own bio with its own third byte.
    e.reload(
        "v",
        "0 8 flakey m0 0 0 1 5 corrupt_bio_byte 3 w 7 0\n8 1016 flakey m0 8 0 1 5 corrupt_bio_byte 3 w 7 0",
    )
    .unwrap();
    assert_eq!(e.write_at(v, 4, &buf), Status::Ok);
    let got = leaf_bytes(&mut e, leaf, 4, 8);
    assert_eq!(diff(&got, &before), vec![2, 4 * SECTOR + 2]);
    // Reads are not corrupted by a write-only feature.
    let (s, r) = read(&mut e, v, 4, 8);
    assert_eq!(s, Status::Ok);
    assert_eq!(r, got);
}

#[test]
fn random_write_corrupt_changes_one_byte_on_the_device_only() {
    let (mut e, leaf, v) = rig("0 0 1 2 random_write_corrupt 1000000000");
    let mut changed = 0;
    for i in 0..20u64 {
        let buf = vec![0x5au8; 2 * SECTOR];
        assert_eq!(e.write_at(v, i * 2, &buf), Status::Ok);
        assert!(
            buf.iter().all(|&b| b == 0x5a),
            "the writer's buffer is untouched"
        );
        let got = leaf_bytes(&mut e, leaf, i * 2, 2);
        let d = diff(&got, &buf);
        assert!(d.len() <= 1, "at most one byte per write: {d:?}");
        changed += d.len();
    }
    // A random value may equal 0x5a (1 in 256): most writes show their corruption.
    assert!(changed >= 15, "{changed} of 20 writes corrupted");
    // With probability 0 the feature is off: dm's default (all I/O fails while down) applies.
    let v2 = e
        .create("w", Some("0 1024 flakey m0 0 0 1 2 random_write_corrupt 0"))
        .unwrap();
    assert_eq!(
        e.table("w", false).unwrap(),
        "0 1024 flakey m0 0 0 1 2 error_reads error_writes\n"
    );
    assert_eq!(e.write_at(v2, 0, &[1u8; 512]), Status::IoError);
}

#[test]
fn corrupted_writes_allocate_nothing_once_warm() {
    let (mut e, _leaf, v) = rig("0 0 1 5 corrupt_bio_byte 1 w 0 0");
    let buf = vec![9u8; 8 * SECTOR];
    for i in 0..64 {
        assert_eq!(e.write_at(v, i * 8, &buf), Status::Ok);
    }
    let before = stackbd_core::alloc_count::thread_allocs();
    for i in 0..2000u64 {
        assert_eq!(e.write_at(v, (i % 120) * 8, &buf), Status::Ok);
    }
    let n = stackbd_core::alloc_count::thread_allocs() - before;
    assert_eq!(n, 0, "{n} allocations for 2000 corrupted writes");
}

#[test]
fn table_text_is_canonical_and_bad_tables_are_refused() {
    let (mut e, _) = engine();
    e.create(
        "v",
        Some("0 1024 flakey m0 0 3 2 8 random_read_corrupt 7 Drop_Writes corrupt_bio_byte 9 R 255 131072"),
    )
    .unwrap();
    assert_eq!(
        e.table("v", false).unwrap(),
        "0 1024 flakey m0 0 3 2 8 drop_writes corrupt_bio_byte 9 r 255 131072 random_read_corrupt 7\n"
    );
    for (args, why) in [
        ("m0 0 1", "Invalid argument count"),
        ("m0 0 x 1", "Invalid up interval"),
        ("m0 0 0 0", "Total (up + down) interval is zero"),
        (
            "m0 0 1 1 1 drop_writes error_writes",
            "after the 1 feature argument",
        ),
        (
            "m0 0 1 1 2 drop_writes error_writes",
            "conflicts with feature",
        ),
        ("m0 0 1 1 1 fast", "Unrecognised flakey feature requested"),
        ("nope 0 1 1", "unknown device 'nope'"),
        ("m0 1100 1 1", "passes the end"),
    ] {
        let err = e
            .create("w", Some(&format!("0 1024 flakey {args}")))
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{args}: {err}");
    }
}

/// Which interval the whole span `[t0, t1]` after the load falls in, for a `1 1` table loaded
/// somewhere in `[b, a]`: `Some(true)` down, `Some(false)` up, `None` too close to an edge.
fn phase(b: Instant, a: Instant, t0: Instant, t1: Instant) -> Option<bool> {
    const MARGIN: f64 = 0.05;
    let lo = t0.saturating_duration_since(a).as_secs_f64();
    let hi = t1.saturating_duration_since(b).as_secs_f64();
    let (slo, shi) = (lo.floor(), hi.floor());
    if slo != shi || lo - slo < MARGIN || shi + 1.0 - hi < MARGIN {
        return None;
    }
    Some(slo as u64 % 2 == 1)
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

#[test]
fn intervals_follow_the_clock_from_load() {
    // `1 1`: up during second 0, down during second 1, up during second 2. Each check is made
    // in the middle of its second; a check that the clock cannot place (a stalled machine) makes
    // the cycle start again, with a new table.
    let mut placed = [false; 3];
    for attempt in 0..5 {
        let (mut e, _) = engine();
        let b = Instant::now();
        let v = e.create("v", Some("0 1024 flakey m0 0 1 1")).unwrap();
        let a = Instant::now();
        let mut ok = true;
        for (i, at) in [0.5f64, 1.5, 2.5].into_iter().enumerate() {
            sleep_until(b + Duration::from_secs_f64(at));
            let t0 = Instant::now();
            let (s, got) = read(&mut e, v, 0, 8);
            let t1 = Instant::now();
            if phase(b, a, t0, t1) != Some(i == 1) {
                ok = false;
                eprintln!("attempt {attempt}: second {i} not placed, again");
                break;
            }
            if i == 1 {
                assert_eq!(s, Status::IoError, "second {i}");
            } else {
                assert_eq!((s, got), (Status::Ok, expected(0, 8)), "second {i}");
            }
            placed[i] = true;
        }
        if ok {
            return;
        }
    }
    panic!("the clock could not be placed in 5 cycles: {placed:?}");
}
