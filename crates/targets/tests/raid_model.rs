//! raid1 against a flat model under random I/O with random leg failures and returns: every
//! read returns what the model holds, no client I/O fails while a leg in sync remains, and once
//! every leg is back and resynced the legs are byte-identical and `check` counts 0 mismatches.

#[path = "raid_util.rs"]
mod util;

use stackbd_core::Status;
use std::time::Duration;
use util::*;

const SECTORS: u64 = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn run(seed: u64, legs: usize) {
    let mut rng = Rng(seed);
    let mut r = Rig::new(
        legs,
        SECTORS,
        &["nosync", "region_size", "64", "daemon_sleep", "5"],
    );
    let mut model = vec![0u8; SECTORS as usize * SECTOR];
    let mut broken = vec![false; legs];
    let mut failures = 0;
    for op in 0..400u64 {
        for _ in 0..rng.below(3) {
            r.e.poll();
        }
        match rng.below(100) {
            0..=49 => {
                let n = 1 + rng.below(32);
                let at = rng.below(SECTORS - n);
                let data = pattern(seed << 20 | op, n as usize * SECTOR);
                assert_eq!(
                    r.write(at, &data),
                    Status::Ok,
                    "seed {seed} op {op}: write failed: {}",
                    r.status()
                );
                model[at as usize * SECTOR..(at + n) as usize * SECTOR].copy_from_slice(&data);
            }
            50..=84 => {
                let n = 1 + rng.below(32);
                let at = rng.below(SECTORS - n);
                let (s, b) = r.read(at, n as usize);
                assert_eq!(
                    s,
                    Status::Ok,
                    "seed {seed} op {op}: read failed: {}",
                    r.status()
                );
                assert!(
                    b == model[at as usize * SECTOR..(at + n) as usize * SECTOR],
                    "seed {seed} op {op}: read of {at}+{n} differs from the model ({})",
                    r.status()
                );
            }
            85..=89 => assert_eq!(r.e.flush(r.v), Status::Ok, "seed {seed} op {op}: flush"),
            90..=94 => {
                // Fail a leg, if another leg stays fully in sync.
                let i = rng.below(legs as u64) as usize;
                let h: Vec<char> = r.health().chars().collect();
                let others_ok = (0..legs).any(|j| j != i && h[j] == 'A' && !broken[j]);
                if !broken[i] && others_ok {
                    r.break_leg(i);
                    broken[i] = true;
                    failures += 1;
                }
            }
            _ => {
                // Return a broken leg.
                if let Some(i) = (0..legs).find(|&i| broken[i]) {
                    r.mend_leg(i);
                    broken[i] = false;
                    r.message("recover").unwrap();
                }
            }
        }
    }
    for (i, b) in broken.iter().enumerate() {
        if *b {
            r.mend_leg(i);
        }
    }
    r.message("recover").unwrap();
    r.settle();
    r.assert_legs_identical();
    assert!(r.leg(0) == model, "seed {seed}: legs differ from the model");
    r.message("check").unwrap();
    r.until("check", Duration::from_secs(30), |s| s.contains(" idle "));
    assert!(
        r.status().ends_with(" idle 0 0 -"),
        "seed {seed}: {}",
        r.status()
    );
    assert!(
        failures > 0 || seed > 1000,
        "seed {seed}: no failure injected"
    );
}

#[test]
fn two_legs_random_failures() {
    for seed in 1..=12 {
        run(seed, 2);
    }
}

#[test]
fn three_legs_random_failures() {
    for seed in 100..=106 {
        run(seed, 3);
    }
}
