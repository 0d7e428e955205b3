//! snapshot-origin and snapshot through the engine on mem leaves: copy-out on origin writes,
//! snapshot writes, dm's status, the on-disk format against an independent reader and writer,
//! a restart, and a random model with 1-3 snapshots against reference arrays.

mod snapshot_common;

use snapshot_common::*;
use stackbd_core::{Status, SuspendOpts};

const SECTORS: u64 = 2048;

#[test]
fn origin_write_copies_the_chunk_out_first() {
    let mut r = Rig::new(SECTORS, 1024, 1);
    let before = r.read(r.base, 0, SECTORS);
    let s = r.snapshot("s0", "cow0", "P", 16);
    // The COW is read (here: formatted) when the table goes live, on the reactor.
    r.e.poll();
    assert_eq!(
        r.e.status("s0").unwrap(),
        format!("0 {SECTORS} snapshot 32/1024 32\n")
    );
    let o = r.o;
    assert_eq!(r.e.write_at(o, 5, &[7u8; 3 * SS]), Status::Ok);
    let now = r.read(o, 0, SECTORS);
    assert_eq!(&now[5 * SS..8 * SS], &[7u8; 3 * SS][..]);
    assert_eq!(&now[..5 * SS], &before[..5 * SS]);
    assert_eq!(
        r.read(s, 0, SECTORS),
        before,
        "the snapshot still reads the old data"
    );
    // One chunk allocated after the header and the first area.
    assert_eq!(
        r.e.status("s0").unwrap(),
        format!("0 {SECTORS} snapshot 48/1024 32\n")
    );
    // A second write to the same chunk copies nothing more.
    assert_eq!(r.e.write_at(o, 0, &[8u8; SS]), Status::Ok);
    assert_eq!(
        r.e.status("s0").unwrap(),
        format!("0 {SECTORS} snapshot 48/1024 32\n")
    );
    assert_eq!(r.read(s, 0, 16), before[..16 * SS].to_vec());
    assert_eq!(
        r.e.table("s0", false).unwrap(),
        format!("0 {SECTORS} snapshot base cow0 P 16\n")
    );
}

#[test]
fn a_cow_written_here_reads_back_with_the_independent_reader() {
    let mut r = Rig::new(SECTORS, 1024, 1);
    let before = r.read(r.base, 0, SECTORS);
    r.snapshot("s0", "cow0", "P", 8);
    let o = r.o;
    // Chunks 3, 0 and 100 (in that order) and a write spanning chunks 7 and 8.
    for (sector, n) in [(24u64, 1u64), (0, 8), (800, 2), (60, 8)] {
        assert_eq!(
            r.e.write_at(o, sector, &vec![0xee; n as usize * SS]),
            Status::Ok
        );
    }
    let cow = r.leaf_bytes("cow0");
    let d = dm_read(&cow).unwrap();
    assert!(d.valid);
    assert_eq!(d.chunk, 8);
    let olds: Vec<u64> = d.exceptions.keys().copied().collect();
    assert_eq!(olds, vec![0, 3, 7, 8, 100]);
    for (old, new) in &d.exceptions {
        let (o, n) = (*old as usize * 8 * SS, *new as usize * 8 * SS);
        assert_eq!(&cow[n..n + 8 * SS], &before[o..o + 8 * SS], "chunk {old}");
    }
}

#[test]
fn a_cow_made_by_the_independent_writer_opens_with_its_contents() {
    let mut r = Rig::new(SECTORS, 4096, 1);
    let origin = r.read(r.base, 0, SECTORS);
    let chunk = 8u64;
    let per_area = chunk as usize * SS / 16; // 256: use more to cross into a second area
    let chunks: Vec<(u64, Vec<u8>)> = (0..per_area as u64 + 3)
        .map(|i| {
            let c = (i * 7) % (SECTORS / chunk);
            (c, vec![(i % 251) as u8 + 1; chunk as usize * SS])
        })
        .collect();
    // Later entries for the same chunk win, as they do in dm's table.
    let mut want = origin.clone();
    for (c, d) in &chunks {
        let at = *c as usize * chunk as usize * SS;
        want[at..at + d.len()].copy_from_slice(d);
    }
    let img = dm_write(chunk, 4096 * SS, &chunks);
    let cow = r.e.dev_id("cow0").unwrap();
    assert_eq!(r.e.write_at(cow, 0, &img), Status::Ok);
    let s = r.snapshot("s0", "cow0", "P", chunk as u32);
    assert_eq!(r.read(s, 0, SECTORS), want);
    // Origin writes after the load copy only chunks with no exception yet.
    let o = r.o;
    assert_eq!(
        r.e.write_at(o, 0, &vec![1u8; SECTORS as usize * SS]),
        Status::Ok
    );
    assert_eq!(r.read(s, 0, SECTORS), want);
    let d = dm_read(&r.leaf_bytes("cow0")).unwrap();
    assert_eq!(d.exceptions.len() as u64, SECTORS / chunk);
}

#[test]
fn snapshot_writes_land_in_the_cow_and_survive_a_restart() {
    let mut r = Rig::new(SECTORS, 1024, 1);
    let before = r.read(r.base, 0, SECTORS);
    let s = r.snapshot("s0", "cow0", "P", 16);
    assert_eq!(r.e.write_at(s, 33, &[5u8; 2 * SS]), Status::Ok);
    let mut want = before.clone();
    want[33 * SS..35 * SS].fill(5);
    assert_eq!(r.read(s, 0, SECTORS), want);
    assert_eq!(
        r.read(r.base, 0, SECTORS),
        before,
        "the origin is untouched"
    );
    let o = r.o;
    assert_eq!(r.e.write_at(o, 100, &[6u8; SS]), Status::Ok);
    assert_eq!(r.e.flush(s), Status::Ok);

    let mut r2 = r.reboot();
    let s = r2.snapshot("s0", "cow0", "P", 16);
    assert_eq!(
        r2.read(s, 0, SECTORS),
        want,
        "exceptions reloaded from the COW"
    );
    assert_eq!(
        r2.e.status("s0").unwrap(),
        format!("0 {SECTORS} snapshot 64/1024 32\n")
    );
}

#[test]
fn a_snapshot_load_is_refused_while_the_origin_runs() {
    let mut r = Rig::new(SECTORS, 1024, 1);
    let err =
        r.e.create("s0", Some(&format!("0 {SECTORS} snapshot base cow0 P 16")))
            .unwrap_err()
            .to_string();
    assert!(err.contains("not suspended"), "{err}");
    r.e.suspend("o", SuspendOpts::default()).unwrap();
    for (bad, why) in [
        ("base cow0 X 16", "not P, PO or N"),
        ("base cow0 P 12", "power of two"),
        ("base cow0 P 16 1 bogus", "unknown feature"),
        ("base cow0 P 16 2 discard_zeroes_cow", "follow"),
        (
            "base cow0 P 16 1 discard_passdown_origin",
            "needs discard_zeroes_cow",
        ),
        ("base base P 16", "origin itself"),
        ("base cow0 P", "at least 4"),
    ] {
        let err =
            r.e.create("s0", Some(&format!("0 {SECTORS} snapshot {bad}")))
                .unwrap_err()
                .to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
    r.e.resume("o").unwrap();
}

#[test]
fn transient_snapshots_keep_exceptions_in_memory() {
    let mut r = Rig::new(SECTORS, 1024, 1);
    let before = r.read(r.base, 0, SECTORS);
    let s = r.snapshot("s0", "cow0", "N", 16);
    let o = r.o;
    assert_eq!(r.e.write_at(o, 0, &vec![3u8; 64 * SS]), Status::Ok);
    assert_eq!(r.read(s, 0, SECTORS), before);
    assert_eq!(
        r.e.status("s0").unwrap(),
        format!("0 {SECTORS} snapshot 64/1024 0\n")
    );
    // Nothing was written as metadata: no header.
    assert!(dm_read(&r.leaf_bytes("cow0")).is_err());
}

/// Random I/O to the origin and up to three snapshots (taken along the way), each checked
/// against its reference array; then a restart and every snapshot checked again.
fn model(seed: u64, kind: &str, chunk: u32) {
    let mut rng = Rng(seed);
    let mut r = Rig::new(SECTORS, 4096, 3);
    let mut origin = r.read(r.base, 0, SECTORS);
    let mut snaps: Vec<(String, stackbd_core::DevId, Vec<u8>)> = Vec::new();
    let take_at = [0usize, 150, 300];
    for step in 0..450 {
        if let Some(i) = take_at.iter().position(|&t| t == step) {
            let name = format!("s{i}");
            let id = r.snapshot(&name, &format!("cow{i}"), kind, chunk);
            snaps.push((name, id, origin.clone()));
        }
        let sectors = rng.range(1, 3 * chunk as u64);
        let sector = rng.range(0, SECTORS - sectors);
        let (a, b) = (sector as usize * SS, (sector + sectors) as usize * SS);
        let data: Vec<u8> = (0..b - a).map(|_| rng.next() as u8).collect();
        let target = rng.range(0, snaps.len() as u64 + 2) as usize;
        match target {
            0 | 1 => {
                let o = r.o;
                if rng.chance(60) {
                    assert_eq!(r.e.write_at(o, sector, &data), Status::Ok, "step {step}");
                    origin[a..b].copy_from_slice(&data);
                } else {
                    assert_eq!(
                        r.read(o, sector, sectors),
                        origin[a..b],
                        "origin step {step}"
                    );
                }
            }
            t => {
                let (name, id, img) = &mut snaps[t - 2];
                let id = *id;
                if rng.chance(40) {
                    assert_eq!(
                        r.e.write_at(id, sector, &data),
                        Status::Ok,
                        "{name} step {step}"
                    );
                    img[a..b].copy_from_slice(&data);
                } else {
                    let got = r.read(id, sector, sectors);
                    assert!(got == img[a..b], "{name} differs at step {step}");
                }
            }
        }
        if rng.chance(5) {
            let o = r.o;
            assert_eq!(r.e.flush(o), Status::Ok);
        }
    }
    for (name, id, img) in &snaps {
        assert!(r.read(*id, 0, SECTORS) == *img, "{name} at the end");
    }
    let o = r.o;
    assert!(r.read(o, 0, SECTORS) == origin, "origin at the end");
    if kind == "N" {
        return;
    }
    let mut r2 = r.reboot();
    for (i, (name, _, img)) in snaps.iter().enumerate() {
        let id = r2.snapshot(name, &format!("cow{i}"), kind, chunk);
        assert!(r2.read(id, 0, SECTORS) == *img, "{name} after the restart");
        assert!(r2.e.status(name).unwrap().contains('/'), "{name} valid");
    }
}

#[test]
fn model_persistent_small_chunks() {
    for seed in 1..=4 {
        model(seed, "P", 8);
    }
}

#[test]
fn model_persistent_large_chunks() {
    for seed in 11..=13 {
        model(seed, "P", 64);
    }
}

#[test]
fn model_transient() {
    for seed in 21..=23 {
        model(seed, "N", 16);
    }
}

#[test]
fn an_origin_whose_size_is_not_a_multiple_of_the_chunk() {
    // 2044 sectors: the last 16-sector chunk holds 12.
    let mut r = Rig::new(2044, 1024, 1);
    let before = r.read(r.base, 0, 2044);
    let s = r.snapshot("s0", "cow0", "P", 16);
    let o = r.o;
    assert_eq!(r.e.write_at(o, 2040, &[4u8; 4 * SS]), Status::Ok);
    assert_eq!(r.read(s, 0, 2044), before);
    assert_eq!(r.e.write_at(s, 2043, &[6u8; SS]), Status::Ok);
    let mut want = before.clone();
    want[2043 * SS..].fill(6);
    assert_eq!(r.read(s, 0, 2044), want);
    let mut r2 = r.reboot();
    let s = r2.snapshot("s0", "cow0", "P", 16);
    assert_eq!(r2.read(s, 0, 2044), want);
}
