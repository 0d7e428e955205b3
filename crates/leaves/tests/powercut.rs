//! The power-cut leaf driven through the engine: what a cut keeps (flushed, FUA, PREFLUSH), what
//! it loses or tears and that the seed decides it, the automatic cut points, I/O after the cut,
//! the reboot from a saved image, and channels on several threads over one device.

use stackbd_core::{
    BioFlags, DataBuf, DevId, Engine, Leaf, Op, ReactorConfig, Request, Status, SECTOR_SIZE,
};
use stackbd_leaves::{PowerCutLeaf, PowerCutOptions, PowerCutStats};
use std::collections::HashSet;
use std::sync::Arc;

const SS: usize = SECTOR_SIZE;
/// Device size in sectors for most tests.
const SECTORS: u64 = 256;

fn opts(seed: u64, tear: bool, reorder: bool) -> PowerCutOptions {
    PowerCutOptions {
        seed,
        tear,
        reorder,
        ..PowerCutOptions::default()
    }
}

fn leaf(o: PowerCutOptions) -> PowerCutLeaf {
    PowerCutLeaf::new(SECTORS * SS as u64, o).unwrap()
}

/// An engine with `leaf` as `p0` under a linear volume `v` over all of it.
fn rig(leaf: &PowerCutLeaf) -> (Engine, DevId) {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    let n = leaf.size();
    e.add_leaf("p0", Arc::new(leaf.clone())).unwrap();
    let v = e.create("v", Some(&format!("0 {n} linear p0 0"))).unwrap();
    (e, v)
}

/// Bytes that differ with `seed` and with position.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` at `sector` with `flags`.
fn write(e: &mut Engine, v: DevId, sector: u64, data: &[u8], flags: BioFlags) -> Status {
    let mut buf = data.to_vec();
    // SAFETY: `buf` outlives the synchronous `io`, which returns after the bio completed.
    let d = unsafe { DataBuf::from_slice(&mut buf) };
    let sectors = (data.len() / SS) as u32;
    e.io(Request {
        flags,
        ..Request::new(Op::Write, v, sector, sectors, d, 0)
    })
}

fn read(e: &mut Engine, v: DevId, sector: u64, sectors: usize) -> Vec<u8> {
    let mut buf = vec![0u8; sectors * SS];
    assert_eq!(e.read_at(v, sector, &mut buf), Status::Ok);
    buf
}

/// `sectors` sectors of the image at `sector`.
fn at(img: &[u8], sector: u64, sectors: usize) -> &[u8] {
    &img[sector as usize * SS..][..sectors * SS]
}

#[test]
fn writes_before_a_completed_flush_survive_cut_and_reboot() {
    let l = leaf(opts(1, false, false));
    let (mut e, v) = rig(&l);
    let a = pattern(1, 8 * SS);
    let b = pattern(2, 16 * SS);
    assert_eq!(write(&mut e, v, 0, &a, BioFlags::NONE), Status::Ok);
    assert_eq!(write(&mut e, v, 100, &b, BioFlags::NONE), Status::Ok);
    // Reads see the cache before anything is durable.
    assert_eq!(read(&mut e, v, 100, 16), b);
    assert_eq!(at(&l.durable_image(), 100, 16), vec![0u8; 16 * SS]);
    assert_eq!(e.flush(v), Status::Ok);
    // After the flush: overwrite part of `a` and write elsewhere, unflushed.
    let c = pattern(3, 4 * SS);
    assert_eq!(write(&mut e, v, 2, &c, BioFlags::NONE), Status::Ok);
    assert_eq!(write(&mut e, v, 200, &c, BioFlags::NONE), Status::Ok);
    assert!(l.cut());
    let img = l.durable_image();
    assert_eq!(
        at(&img, 0, 8),
        a,
        "flushed write kept, unflushed overwrite lost"
    );
    assert_eq!(at(&img, 100, 16), b);
    assert_eq!(at(&img, 200, 4), vec![0u8; 4 * SS]);

    // Reboot: a new leaf from the image, through a new engine.
    let l2 = PowerCutLeaf::from_image(img, opts(1, false, false)).unwrap();
    let (mut e2, v2) = rig(&l2);
    assert_eq!(read(&mut e2, v2, 0, 8), a);
    assert_eq!(read(&mut e2, v2, 100, 16), b);
    let st = l.stats();
    assert_eq!(
        (st.writes, st.flushes, st.unflushed_at_cut, st.lost_at_cut),
        (4, 1, 2, 2)
    );
}

#[test]
fn fua_writes_survive_without_a_flush() {
    let l = leaf(opts(1, false, false));
    let (mut e, v) = rig(&l);
    let a = pattern(4, 8 * SS);
    let b = pattern(5, 8 * SS);
    assert_eq!(write(&mut e, v, 0, &a, BioFlags::NONE), Status::Ok);
    assert_eq!(write(&mut e, v, 50, &b, BioFlags::FUA), Status::Ok);
    // FUA is durable at completion, before any cut.
    assert_eq!(at(&l.durable_image(), 50, 8), b);
    l.cut();
    let img = l.durable_image();
    assert_eq!(at(&img, 50, 8), b, "the FUA write is kept");
    assert_eq!(at(&img, 0, 8), vec![0u8; 8 * SS], "the plain one is lost");
    assert_eq!(l.stats().fua_writes, 1);
}

#[test]
fn preflush_makes_what_came_before_durable() {
    let l = leaf(opts(1, false, false));
    let (mut e, v) = rig(&l);
    let (a, b, c) = (pattern(6, 8 * SS), pattern(7, 8 * SS), pattern(8, 8 * SS));
    assert_eq!(write(&mut e, v, 0, &a, BioFlags::NONE), Status::Ok);
    // PREFLUSH alone: `a` becomes durable, `b` itself stays in the cache.
    assert_eq!(write(&mut e, v, 16, &b, BioFlags::PREFLUSH), Status::Ok);
    assert_eq!(at(&l.durable_image(), 0, 8), a);
    assert_eq!(at(&l.durable_image(), 16, 8), vec![0u8; 8 * SS]);
    // A discard in the cache, then PREFLUSH | FUA: both before it and itself durable.
    assert_eq!(e.discard(v, 0, 8), Status::Ok);
    assert_eq!(
        write(&mut e, v, 32, &c, BioFlags::PREFLUSH | BioFlags::FUA),
        Status::Ok
    );
    l.cut();
    let img = l.durable_image();
    assert_eq!(at(&img, 0, 8), vec![0u8; 8 * SS], "discard before PREFLUSH");
    assert_eq!(at(&img, 16, 8), b);
    assert_eq!(at(&img, 32, 8), c);
    assert_eq!(l.stats().flushes, 2);
}

#[test]
fn an_older_cached_write_never_lands_over_a_fua_write() {
    let (a, c) = (pattern(9, 4 * SS), pattern(10, 4 * SS));
    for (tear, reorder) in [(true, false), (false, true), (true, true)] {
        for seed in 0..32 {
            let l = leaf(opts(seed, tear, reorder));
            let (mut e, v) = rig(&l);
            assert_eq!(write(&mut e, v, 0, &a, BioFlags::NONE), Status::Ok);
            assert_eq!(write(&mut e, v, 2, &c, BioFlags::FUA), Status::Ok);
            // Durable already, while it waits in the log behind the older write.
            assert_eq!(at(&l.durable_image(), 2, 4), c);
            l.cut();
            let img = l.durable_image();
            assert_eq!(
                at(&img, 2, 4),
                c,
                "seed {seed} tear {tear} reorder {reorder}"
            );
            let s01 = at(&img, 0, 2);
            assert!(s01 == &a[..2 * SS] || s01 == vec![0u8; 2 * SS] || tear);
        }
    }
}

/// Flushes a base pattern, then writes `n` unflushed 4-sector writes (some overlapping) plus a
/// write-zeroes, cuts, and returns the durable image and the counters.
fn scenario(o: PowerCutOptions, n: u64) -> (Vec<u8>, PowerCutStats) {
    let l = leaf(o);
    let (mut e, v) = rig(&l);
    assert_eq!(
        write(&mut e, v, 0, &pattern(99, 64 * SS), BioFlags::NONE),
        Status::Ok
    );
    assert_eq!(e.flush(v), Status::Ok);
    for i in 0..n {
        let sector = (i * 3) % 60;
        assert_eq!(
            write(&mut e, v, sector, &pattern(i + 100, 4 * SS), BioFlags::NONE),
            Status::Ok
        );
    }
    assert_eq!(e.write_zeroes(v, 70, 8), Status::Ok);
    l.cut();
    (l.durable_image(), l.stats())
}

#[test]
fn unflushed_writes_are_lost_without_tear_or_reorder() {
    for seed in 0..4 {
        let (img, st) = scenario(opts(seed, false, false), 12);
        assert_eq!(at(&img, 0, 64), pattern(99, 64 * SS), "seed {seed}");
        assert_eq!(img[64 * SS..], vec![0u8; (SECTORS as usize - 64) * SS]);
        assert_eq!((st.unflushed_at_cut, st.lost_at_cut), (13, 13));
    }
}

#[test]
fn the_seed_decides_what_survives() {
    for (tear, reorder) in [(true, false), (false, true), (true, true)] {
        let mut outcomes = HashSet::new();
        for seed in 0..16 {
            let a = scenario(opts(seed, tear, reorder), 12);
            let b = scenario(opts(seed, tear, reorder), 12);
            assert!(
                a.0 == b.0,
                "same seed {seed}, different images ({tear} {reorder})"
            );
            assert_eq!(a.1, b.1);
            let st = a.1;
            assert_eq!(
                st.persisted_at_cut + st.lost_at_cut + st.torn_at_cut,
                st.unflushed_at_cut
            );
            outcomes.insert(a.0);
        }
        assert!(
            outcomes.len() > 4,
            "tear {tear} reorder {reorder}: only {} outcomes over 16 seeds",
            outcomes.len()
        );
    }
}

/// Disjoint unflushed writes; returns, per write, how many of its 4 sectors persisted.
fn survivors(o: PowerCutOptions, n: u64) -> Vec<usize> {
    let l = leaf(o);
    let (mut e, v) = rig(&l);
    for i in 0..n {
        assert_eq!(
            write(&mut e, v, i * 4, &pattern(i + 1, 4 * SS), BioFlags::NONE),
            Status::Ok
        );
    }
    l.cut();
    let img = l.durable_image();
    (0..n)
        .map(|i| {
            let p = pattern(i + 1, 4 * SS);
            (0..4)
                .filter(|&s| at(&img, i * 4 + s, 1) == &p[s as usize * SS..][..SS])
                .count()
        })
        .collect()
}

#[test]
fn without_reorder_a_prefix_persists_with_reorder_any_subset() {
    let mut prefixes = HashSet::new();
    for seed in 0..32 {
        let s = survivors(opts(seed, true, false), 10);
        // Whole writes, then at most one partial one, then nothing.
        let whole = s.iter().take_while(|&&k| k == 4).count();
        assert!(
            s[whole..].iter().skip(1).all(|&k| k == 0),
            "seed {seed}: {s:?}"
        );
        prefixes.insert(whole);
    }
    assert!(prefixes.len() > 3, "prefix lengths {prefixes:?}");
    // With reorder (no tear), some seed keeps a later write and loses an earlier one.
    let holes = (0..32).any(|seed| {
        let s = survivors(opts(seed, false, true), 10);
        assert!(
            s.iter().all(|&k| k == 0 || k == 4),
            "torn without tear: {s:?}"
        );
        s.windows(2).any(|w| w[0] == 0 && w[1] == 4)
    });
    assert!(holes, "reorder never persisted a non-prefix subset");
}

#[test]
fn a_torn_write_leaves_each_sector_all_old_or_all_new() {
    let old = pattern(20, 32 * SS);
    let new = pattern(21, 32 * SS);
    let mut mixed = 0;
    for seed in 0..16 {
        let l = leaf(opts(seed, true, true));
        let (mut e, v) = rig(&l);
        assert_eq!(write(&mut e, v, 8, &old, BioFlags::NONE), Status::Ok);
        assert_eq!(e.flush(v), Status::Ok);
        assert_eq!(write(&mut e, v, 8, &new, BioFlags::NONE), Status::Ok);
        l.cut();
        let img = l.durable_image();
        let (mut n_old, mut n_new) = (0, 0);
        for s in 0..32 {
            let got = at(&img, 8 + s, 1);
            if got == &old[s as usize * SS..][..SS] {
                n_old += 1;
            } else if got == &new[s as usize * SS..][..SS] {
                n_new += 1;
            } else {
                panic!("seed {seed}: sector {s} is neither all-old nor all-new");
            }
        }
        let st = l.stats();
        if n_old > 0 && n_new > 0 {
            mixed += 1;
            assert_eq!(st.torn_at_cut, 1, "seed {seed}");
        }
    }
    assert!(mixed > 0, "no seed tore the write");
}

#[test]
fn cut_after_n_cuts_right_after_the_nth_write() {
    let o = PowerCutOptions {
        cut_after: Some(3),
        ..opts(1, false, false)
    };
    let l = leaf(o);
    assert_eq!(l.cut_point(), Some(3));
    let (mut e, v) = rig(&l);
    for i in 0..3u64 {
        let s = write(&mut e, v, i * 8, &pattern(i, 8 * SS), BioFlags::FUA);
        assert_eq!(s, Status::Ok, "write {i}");
        assert_eq!(l.is_cut(), i == 2, "after write {i}");
    }
    // The machine is off: everything fails.
    assert_eq!(
        write(&mut e, v, 24, &pattern(3, 8 * SS), BioFlags::FUA),
        Status::IoError
    );
    let mut buf = vec![0u8; 8 * SS];
    assert_eq!(e.read_at(v, 0, &mut buf), Status::IoError);
    assert_eq!(e.flush(v), Status::IoError);
    assert_eq!(e.discard(v, 0, 8), Status::IoError);
    assert_eq!(e.write_zeroes(v, 0, 8), Status::IoError);
    assert!(!l.cut(), "already off");
    assert!(l.sync().is_err());
    let st = l.stats();
    assert_eq!(
        (st.writes, st.cut_at_write, st.failed_after_cut),
        (3, Some(3), 5)
    );
    let img = l.durable_image();
    for i in 0..3u64 {
        assert_eq!(at(&img, i * 8, 8), pattern(i, 8 * SS));
    }
    assert_eq!(at(&img, 24, 8), vec![0u8; 8 * SS]);
}

#[test]
fn cut_after_zero_is_off_from_the_start() {
    let l = leaf(PowerCutOptions {
        cut_after: Some(0),
        ..PowerCutOptions::default()
    });
    assert!(l.is_cut());
    let (mut e, v) = rig(&l);
    assert_eq!(e.flush(v), Status::IoError);
}

#[test]
fn a_random_cut_point_comes_from_the_seed() {
    let points: Vec<u64> = (0..32)
        .map(|seed| {
            let o = PowerCutOptions {
                cut_random: Some((5, 20)),
                ..opts(seed, false, false)
            };
            let p = leaf(o).cut_point().unwrap();
            assert_eq!(leaf(o).cut_point(), Some(p), "seed {seed}");
            assert!((5..=20).contains(&p), "seed {seed}: {p}");
            p
        })
        .collect();
    assert!(
        points.iter().collect::<HashSet<_>>().len() > 4,
        "{points:?}"
    );
    // The earlier of cut_after and the random point wins, and the cut happens there.
    let o = PowerCutOptions {
        cut_after: Some(2),
        cut_random: Some((5, 20)),
        ..opts(3, false, false)
    };
    let l = leaf(o);
    assert_eq!(l.cut_point(), Some(2));
    let (mut e, v) = rig(&l);
    let d = pattern(1, SS);
    assert_eq!(write(&mut e, v, 0, &d, BioFlags::NONE), Status::Ok);
    assert_eq!(write(&mut e, v, 1, &d, BioFlags::NONE), Status::Ok);
    assert_eq!(write(&mut e, v, 2, &d, BioFlags::NONE), Status::IoError);
    assert_eq!(l.stats().cut_at_write, Some(2));
    assert!(PowerCutLeaf::new(
        4096,
        PowerCutOptions {
            cut_random: Some((3, 2)),
            ..PowerCutOptions::default()
        }
    )
    .is_err());
}

#[test]
fn save_the_image_and_reboot_it_through_an_engine() {
    let l = leaf(opts(5, true, true));
    let (mut e, v) = rig(&l);
    let a = pattern(30, 64 * SS);
    assert_eq!(write(&mut e, v, 10, &a, BioFlags::NONE), Status::Ok);
    assert_eq!(e.flush(v), Status::Ok);
    assert_eq!(
        write(&mut e, v, 100, &pattern(31, 8 * SS), BioFlags::NONE),
        Status::Ok
    );
    l.cut();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("durable.img");
    l.save_durable(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), l.durable_image());

    let l2 = PowerCutLeaf::load(&path, PowerCutOptions::default()).unwrap();
    assert_eq!(l2.size(), SECTORS);
    assert!(!l2.is_cut());
    let (mut e2, v2) = rig(&l2);
    assert_eq!(read(&mut e2, v2, 10, 64), a);
    assert_eq!(read(&mut e2, v2, 0, SECTORS as usize), l.durable_image());
    // The rebooted device works and starts with an empty cache.
    let b = pattern(32, 8 * SS);
    assert_eq!(write(&mut e2, v2, 0, &b, BioFlags::NONE), Status::Ok);
    assert_eq!(read(&mut e2, v2, 0, 8), b);
    assert_eq!(l2.stats().writes, 1);
    assert!(PowerCutLeaf::from_image(vec![0; 1000], PowerCutOptions::default()).is_err());
}

#[test]
fn copy_and_write_zeroes_go_through_the_cache() {
    let l = leaf(opts(1, false, false));
    let (mut e, v) = rig(&l);
    let a = pattern(40, 8 * SS);
    assert_eq!(write(&mut e, v, 0, &a, BioFlags::NONE), Status::Ok);
    assert_eq!(e.flush(v), Status::Ok);
    assert_eq!(e.copy(v, 0, 64, 8), Status::Ok);
    assert_eq!(e.write_zeroes(v, 0, 4), Status::Ok);
    assert_eq!(read(&mut e, v, 64, 8), a);
    assert_eq!(read(&mut e, v, 0, 4), vec![0u8; 4 * SS]);
    l.cut();
    let img = l.durable_image();
    assert_eq!(at(&img, 0, 8), a, "write-zeroes was never flushed");
    assert_eq!(at(&img, 64, 8), vec![0u8; 8 * SS], "nor the copy");
}

#[test]
fn kind_args_and_limits() {
    let o = PowerCutOptions {
        seed: 7,
        tear: true,
        reorder: true,
        cut_after: Some(100),
        cut_random: Some((10, 50)),
    };
    let l = PowerCutLeaf::new(1 << 30, o).unwrap();
    assert_eq!(l.kind(), "powercut");
    assert_eq!(l.size(), 2 << 20);
    assert_eq!(
        l.args(),
        "1GiB seed=7 tear reorder cut_after=100 cut_random=10..50"
    );
    assert_eq!(PowerCutLeaf::parse_args(&l.args()), Ok((1 << 30, o)));
    let plain = PowerCutLeaf::from_args("64KiB").unwrap();
    assert_eq!(plain.args(), "64KiB seed=0");
    assert_eq!(plain.options(), PowerCutOptions::default());
    for bad in [
        "",
        "1GB",
        "1000",
        "64K tear=1",
        "64K cut_random=5..2",
        "64K seed=x",
        "64K fua",
    ] {
        assert!(PowerCutLeaf::parse_args(bad).is_err(), "{bad:?}");
    }
    let lim = l.limits();
    assert_eq!(
        (lim.logical_block_bytes, lim.physical_block_bytes),
        (512, 512)
    );
    assert!(lim.copy_native);
}

#[test]
fn channels_on_several_threads_share_one_device() {
    let l = leaf(opts(1, true, true));
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                // One engine (one reactor, one channel) per thread, over the same leaf.
                let (mut e, v) = rig(&l);
                for i in 0..50u64 {
                    let sector = t * 128 + (i % 16) * 8;
                    let d = pattern(t * 1000 + i, 8 * SS);
                    assert_eq!(write(&mut e, v, sector, &d, BioFlags::NONE), Status::Ok);
                    assert_eq!(read(&mut e, v, sector, 8), d, "thread {t} write {i}");
                }
                assert_eq!(e.flush(v), Status::Ok);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    l.cut();
    let img = l.durable_image();
    for t in 0..2u64 {
        for i in 34..50u64 {
            let sector = t * 128 + (i % 16) * 8;
            assert_eq!(at(&img, sector, 8), pattern(t * 1000 + i, 8 * SS));
        }
    }
    let st = l.stats();
    assert_eq!((st.writes, st.flushes, st.unflushed_at_cut), (100, 2, 0));
}
