//! raid1 crash consistency on the power-cut leaf: 200 seeded cut points (some tearing, some
//! reordering unflushed writes). All four devices (two data legs, two metadata devices) lose
//! power at the same moment. After each "reboot" the set loads, resyncs the regions its bitmap
//! marks dirty, and then: the legs are byte-identical, and every sector holds the last write
//! acknowledged before the last completed FLUSH, or a write issued after it (never older data,
//! never a mix inside a sector).

use stackbd_core::{DevId, Engine, ReactorConfig, Status};
use stackbd_leaves::{PowerCutLeaf, PowerCutOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECTORS: u64 = 1024;
const META: u64 = 64;
const SS: usize = 512;
const TABLE: &str = "raid raid1 6 0 nosync region_size 64 daemon_sleep 1 2 pm0 pd0 pm1 pd1";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Sector `j` as write `id` leaves it (id 0: never written, zeros).
fn sector_data(id: u64, j: u64) -> [u8; SS] {
    let mut s = [0u8; SS];
    if id != 0 {
        s[..8].copy_from_slice(&id.to_le_bytes());
        s[8..16].copy_from_slice(&j.to_le_bytes());
        s[16..].fill((id.wrapping_mul(31) ^ j) as u8);
    }
    s
}

fn engine(leaves: [Arc<PowerCutLeaf>; 4]) -> (Engine, Vec<DevId>, DevId) {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    let mut ids = Vec::new();
    for (name, l) in ["pd0", "pd1", "pm0", "pm1"].iter().zip(leaves) {
        ids.push(e.add_leaf(name, l).unwrap());
    }
    let v = e
        .create("r", Some(&format!("0 {SECTORS} {TABLE}")))
        .unwrap();
    (e, ids, v)
}

fn opts(seed: u64, k: u64, cut: Option<(u64, u64)>) -> PowerCutOptions {
    PowerCutOptions {
        seed: seed.wrapping_mul(7) + k,
        tear: seed.is_multiple_of(2),
        reorder: seed.is_multiple_of(3),
        cut_after: None,
        cut_random: cut,
    }
}

fn run(seed: u64) {
    let mk = |k: u64, size: u64, cut| {
        Arc::new(PowerCutLeaf::new(size * SS as u64, opts(seed, k, cut)).unwrap())
    };
    let leaves = [
        mk(0, SECTORS, Some((1, 70))),
        mk(1, SECTORS, None),
        mk(2, META, None),
        mk(3, META, None),
    ];
    let (mut e, _, v) = engine(leaves.clone());
    let mut rng = Rng(seed);
    let mut current = vec![0u64; SECTORS as usize];
    let mut durable = vec![0u64; SECTORS as usize];
    let mut since: Vec<Vec<u64>> = vec![Vec::new(); SECTORS as usize];
    let mut id = 0u64;
    for op in 0..200 {
        if leaves[0].is_cut() {
            break;
        }
        if op % 16 == 15 {
            // Let the bitmap daemon run (clears idle bits after a data flush).
            std::thread::sleep(Duration::from_millis(3));
            e.poll();
        }
        if rng.next().is_multiple_of(6) {
            if e.flush(v) == Status::Ok && !leaves[0].is_cut() {
                durable.copy_from_slice(&current);
                since.iter_mut().for_each(Vec::clear);
            }
            continue;
        }
        id += 1;
        let n = 1 + rng.next() % 24;
        let at = rng.next() % (SECTORS - n);
        let mut buf = Vec::with_capacity(n as usize * SS);
        for j in at..at + n {
            buf.extend_from_slice(&sector_data(id, j));
            since[j as usize].push(id);
        }
        if e.write_at(v, at, &buf) == Status::Ok {
            for j in at..at + n {
                current[j as usize] = id;
            }
        }
    }
    for l in &leaves {
        l.cut();
    }
    let images: Vec<Vec<u8>> = leaves.iter().map(|l| l.durable_image()).collect();
    drop(e);

    // Reboot.
    let fresh = |i: usize| {
        Arc::new(
            PowerCutLeaf::from_image(images[i].clone(), opts(seed, 10 + i as u64, None)).unwrap(),
        )
    };
    let (mut e, ids, v) = engine([fresh(0), fresh(1), fresh(2), fresh(3)]);
    let mut probe = vec![0u8; SS];
    assert_eq!(
        e.read_at(v, 0, &mut probe),
        Status::Ok,
        "seed {seed}: first read"
    );
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        e.poll();
        let s = e.status("r").unwrap();
        if s.contains(" AA ") && s.contains(&format!(" {SECTORS}/{SECTORS} idle ")) {
            break;
        }
        assert!(Instant::now() < end, "seed {seed}: no resync: {s}");
        std::thread::sleep(Duration::from_micros(100));
    }
    let mut a = vec![0u8; SECTORS as usize * SS];
    let mut b = vec![0u8; SECTORS as usize * SS];
    assert_eq!(e.read_at(ids[0], 0, &mut a), Status::Ok);
    assert_eq!(e.read_at(ids[1], 0, &mut b), Status::Ok);
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("seed {seed}: legs differ at sector {}", at / SS);
    }
    for j in 0..SECTORS {
        let got = &a[j as usize * SS..(j as usize + 1) * SS];
        let ok = std::iter::once(durable[j as usize])
            .chain(since[j as usize].iter().copied())
            .any(|cand| got == sector_data(cand, j));
        assert!(
            ok,
            "seed {seed}: sector {j} lost a flushed write (durable id {}, later {:?}, got id {})",
            durable[j as usize],
            since[j as usize],
            u64::from_le_bytes(got[..8].try_into().unwrap())
        );
    }
}

#[test]
fn two_hundred_cut_points() {
    for seed in 1..=200 {
        run(seed);
    }
}
