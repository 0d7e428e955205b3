//! snapshot-merge: the origin re-tabled as `snapshot-merge` over the snapshot's COW copies the
//! snapshot's chunks back in the background while random I/O goes on; the volume reads as the
//! snapshot did (plus the new writes) throughout, and after the merge the origin device holds
//! exactly that, the COW's table is empty, status says done and the event counter moved.

mod snapshot_common;

use snapshot_common::*;
use stackbd_core::{Status, SuspendOpts};
use stackbd_targets::snapshot::merge::merge_finished;
use std::time::{Duration, Instant};

const SECTORS: u64 = 2048;

fn merge(seed: u64, chunk: u64) {
    let mut rng = Rng(seed);
    let mut r = Rig::new(SECTORS, 4096, 1);
    let s = r.snapshot("s0", "cow0", "P", chunk as u32);
    let mut snap = r.read(s, 0, SECTORS);
    let o = r.o;
    let rand_write = |r: &mut Rig, dev, img: Option<&mut Vec<u8>>, rng: &mut Rng| {
        let sectors = rng.range(1, 2 * chunk);
        let sector = rng.range(0, SECTORS - sectors);
        let data: Vec<u8> = (0..sectors as usize * SS)
            .map(|_| rng.next() as u8)
            .collect();
        assert_eq!(r.e.write_at(dev, sector, &data), Status::Ok);
        if let Some(img) = img {
            img[sector as usize * SS..(sector + sectors) as usize * SS].copy_from_slice(&data);
        }
    };
    for _ in 0..200 {
        if rng.chance(50) {
            rand_write(&mut r, o, None, &mut rng);
        } else {
            rand_write(&mut r, s, Some(&mut snap), &mut rng);
        }
    }
    let exceptions = dm_read(&r.leaf_bytes("cow0")).unwrap().exceptions.len();
    assert!(exceptions > 20, "{exceptions}");

    // As lvconvert --merge does it: the snapshot goes, the origin takes the merge table.
    r.e.remove("s0", false).unwrap();
    r.e.suspend("o", SuspendOpts::default()).unwrap();
    r.e.load(
        "o",
        &format!("0 {SECTORS} snapshot-merge base cow0 P {chunk}"),
    )
    .unwrap();
    r.e.resume("o").unwrap();
    let ev = r.e.info("o").unwrap().event_nr;
    // I/O while the merge runs: the volume is the snapshot's view.
    for i in 0..60 {
        if i % 2 == 0 {
            rand_write(&mut r, o, Some(&mut snap), &mut rng);
        } else {
            let sector = rng.range(0, SECTORS - 16);
            let got = r.read(o, sector, 16);
            assert!(
                got == snap[sector as usize * SS..(sector + 16) as usize * SS],
                "seed {seed}: read during the merge at {sector}"
            );
        }
    }
    let start = Instant::now();
    loop {
        let st = r.e.status("o").unwrap();
        let st = st.splitn(4, ' ').nth(3).unwrap().trim().to_string();
        assert_ne!(st, "Merge failed");
        if merge_finished(&st) {
            assert_eq!(st, format!("{}/4096 {}", 2 * chunk, 2 * chunk));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "merge stuck: {st}"
        );
        r.e.poll();
    }
    assert!(
        r.e.info("o").unwrap().event_nr > ev,
        "no event at the end of the merge"
    );
    assert!(
        r.read(o, 0, SECTORS) == snap,
        "seed {seed}: the volume after the merge"
    );
    assert!(
        r.read(r.base, 0, SECTORS) == snap,
        "seed {seed}: the origin device"
    );
    assert!(dm_read(&r.leaf_bytes("cow0"))
        .unwrap()
        .exceptions
        .is_empty());
}

#[test]
fn merge_leaves_the_origin_equal_to_the_snapshot() {
    for seed in 1..=3 {
        merge(seed, 8);
    }
    merge(9, 32);
}

#[test]
fn merge_is_refused_while_other_snapshots_exist() {
    let mut r = Rig::new(SECTORS, 4096, 2);
    r.snapshot("s0", "cow0", "P", 8);
    r.snapshot("s1", "cow1", "P", 8);
    r.e.remove("s0", false).unwrap();
    r.e.suspend("o", SuspendOpts::default()).unwrap();
    let err =
        r.e.load("o", &format!("0 {SECTORS} snapshot-merge base cow0 P 8"))
            .unwrap_err()
            .to_string();
    assert!(err.contains("has snapshots attached"), "{err}");
    let err =
        r.e.load("o", &format!("0 {SECTORS} snapshot-merge base cow0 N 8"))
            .unwrap_err()
            .to_string();
    assert!(err.contains("persistent"), "{err}");
    r.e.resume("o").unwrap();
}
