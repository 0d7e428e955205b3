//! Shared rig for the raid tests (included with `#[path]`; as its own test binary it is empty).
//!
//! Legs: data volumes `d<i>` (linear over mem leaves `m<i>`, reloadable to `error` to fail the
//! leg) and metadata mem leaves `meta<i>`; the raid volume `r` over them.
#![allow(dead_code)]

use stackbd_core::{DevId, Engine, ReactorConfig, Status};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SECTOR: usize = 512;
/// Metadata leaf size: 4 KiB + a bitmap of up to 4 KiB... rounded to 64 KiB.
pub const META_SECTORS: u64 = 128;

pub struct Rig {
    pub e: Engine,
    pub legs: usize,
    pub sectors: u64,
    pub data_leaf: Vec<DevId>,
    pub meta_leaf: Vec<DevId>,
    pub v: DevId,
    /// The leaves themselves (data, meta per leg), to "restart" over the same bytes.
    pub leaves: Vec<(Arc<stackbd_leaves::MemLeaf>, Arc<stackbd_leaves::MemLeaf>)>,
}

/// The raid table for `legs` legs of `sectors` with `params` (after chunk_size).
pub fn table(legs: usize, sectors: u64, params: &[&str]) -> String {
    let mut t = format!("0 {sectors} raid raid1 {} 0", params.len() + 1);
    for p in params {
        t.push(' ');
        t.push_str(p);
    }
    t.push_str(&format!(" {legs}"));
    for i in 0..legs {
        t.push_str(&format!(" meta{i} d{i}"));
    }
    t
}

impl Rig {
    /// Fresh leaves (zeroed), data volumes, and the raid volume with `params`.
    pub fn new(legs: usize, sectors: u64, params: &[&str]) -> Rig {
        let leaves = (0..legs)
            .map(|_| {
                (
                    Arc::new(stackbd_leaves::MemLeaf::new(sectors * SECTOR as u64).unwrap()),
                    Arc::new(stackbd_leaves::MemLeaf::new(META_SECTORS * SECTOR as u64).unwrap()),
                )
            })
            .collect();
        Rig::over(leaves, sectors, params)
    }

    /// A new engine (a restart) over the same leaves, with `params`.
    pub fn restart(self, params: &[&str]) -> Rig {
        let (leaves, sectors) = (self.leaves.clone(), self.sectors);
        drop(self);
        Rig::over(leaves, sectors, params)
    }

    fn over(
        leaves: Vec<(Arc<stackbd_leaves::MemLeaf>, Arc<stackbd_leaves::MemLeaf>)>,
        sectors: u64,
        params: &[&str],
    ) -> Rig {
        let legs = leaves.len();
        let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
        let mut data_leaf = Vec::new();
        let mut meta_leaf = Vec::new();
        for (i, (d, m)) in leaves.iter().enumerate() {
            data_leaf.push(e.add_leaf(&format!("m{i}"), d.clone()).unwrap());
            meta_leaf.push(e.add_leaf(&format!("meta{i}"), m.clone()).unwrap());
            e.create(
                &format!("d{i}"),
                Some(&format!("0 {sectors} linear m{i} 0")),
            )
            .unwrap();
        }
        let v = e.create("r", Some(&table(legs, sectors, params))).unwrap();
        Rig {
            e,
            legs,
            sectors,
            data_leaf,
            meta_leaf,
            v,
            leaves,
        }
    }

    pub fn status(&self) -> String {
        self.e.status("r").unwrap().trim().to_string()
    }

    /// The health characters.
    pub fn health(&self) -> String {
        self.status()
            .split_whitespace()
            .nth(5)
            .unwrap_or("")
            .to_string()
    }

    pub fn message(&mut self, m: &str) -> Result<String, String> {
        let argv: Vec<&str> = m.split_whitespace().collect();
        self.e.message("r", 0, &argv).map_err(|e| e.to_string())
    }

    pub fn stat(&mut self, name: &str) -> u64 {
        let s = self.message("stats").unwrap();
        let w: Vec<&str> = s.split_whitespace().collect();
        let i = w.iter().position(|x| *x == name).expect(name);
        w[i + 1].parse().unwrap()
    }

    /// Polls the engine until `f(status)` holds (timers and background work run).
    pub fn until(&mut self, what: &str, timeout: Duration, mut f: impl FnMut(&str) -> bool) {
        let end = Instant::now() + timeout;
        loop {
            self.e.poll();
            let s = self.status();
            if f(&s) {
                return;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}: {s}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits until every leg is `A` and nothing is left to copy.
    pub fn settle(&mut self) {
        let legs = self.legs;
        let len = self.sectors;
        self.until("in sync", Duration::from_secs(30), |s| {
            let w: Vec<&str> = s.split_whitespace().collect();
            w.get(5) == Some(&"A".repeat(legs).as_str())
                && w.get(6) == Some(&format!("{len}/{len}").as_str())
                && w.get(7) == Some(&"idle")
        });
    }

    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Status {
        self.e.write_at(self.v, sector, buf)
    }

    pub fn read(&mut self, sector: u64, sectors: usize) -> (Status, Vec<u8>) {
        let mut b = vec![0u8; sectors * SECTOR];
        let s = self.e.read_at(self.v, sector, &mut b);
        (s, b)
    }

    /// A whole leaf's bytes.
    pub fn leaf_bytes(&mut self, leaf: DevId, sectors: u64) -> Vec<u8> {
        let mut b = vec![0u8; sectors as usize * SECTOR];
        assert_eq!(self.e.read_at(leaf, 0, &mut b), Status::Ok);
        b
    }

    /// Leg `i`'s data.
    pub fn leg(&mut self, i: usize) -> Vec<u8> {
        let (d, n) = (self.data_leaf[i], self.sectors);
        self.leaf_bytes(d, n)
    }

    /// Leg `i`'s metadata area.
    pub fn meta(&mut self, i: usize) -> Vec<u8> {
        let d = self.meta_leaf[i];
        self.leaf_bytes(d, META_SECTORS)
    }

    /// Fails leg `i`'s data device (its volume now maps to `error`).
    pub fn break_leg(&mut self, i: usize) {
        let t = format!("0 {} error", self.sectors);
        self.e.reload(&format!("d{i}"), &t).unwrap();
    }

    /// Gives leg `i` its device back (no `recover` yet).
    pub fn mend_leg(&mut self, i: usize) {
        let t = format!("0 {} linear m{i} 0", self.sectors);
        self.e.reload(&format!("d{i}"), &t).unwrap();
    }

    /// Asserts that every leg holds the same bytes.
    pub fn assert_legs_identical(&mut self) {
        let first = self.leg(0);
        for i in 1..self.legs {
            let other = self.leg(i);
            if let Some(at) = first.iter().zip(&other).position(|(a, b)| a != b) {
                panic!(
                    "leg {i} differs from leg 0 at byte {at} (sector {})",
                    at / SECTOR
                );
            }
        }
    }
}

/// Deterministic bytes for a write.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

/// A test-side reader of dm-raid's superblock, written from the kernel's struct definition
/// (`struct dm_raid_superblock` in drivers/md/dm-raid.c), independent of the target's module.
#[derive(Debug, Clone, Copy)]
pub struct KernelSb {
    pub magic: [u8; 4],
    pub compat_features: u32,
    pub num_devices: u32,
    pub array_position: u32,
    pub events: u64,
    pub failed_devices: u64,
    pub disk_recovery_offset: u64,
    pub array_resync_offset: u64,
    pub level: u32,
    pub sectors: u64,
}

pub fn kernel_sb(b: &[u8]) -> KernelSb {
    let le32 = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let le64 = |o: usize| u64::from(le32(o)) | u64::from(le32(o + 4)) << 32;
    // __le32 magic, compat_features, num_devices, array_position; __le64 events,
    // failed_devices, disk_recovery_offset, array_resync_offset; __le32 level, layout,
    // stripe_sectors, flags; __le64 reshape_position; __le32 new_level, new_layout,
    // new_stripe_sectors, delta_disks; __le64 array_sectors, data_offset, new_data_offset,
    // sectors; ... (packed).
    let mut o = 0;
    let mut next = |n: usize| {
        let at = o;
        o += n;
        at
    };
    let magic_at = next(4);
    let compat = next(4);
    let ndev = next(4);
    let pos = next(4);
    let ev = next(8);
    let failed = next(8);
    let dro = next(8);
    let aro = next(8);
    let level = next(4);
    let _layout = next(4);
    let _stripe = next(4);
    let _flags = next(4);
    let _reshape = next(8);
    let _nl = next(4);
    let _nlay = next(4);
    let _nss = next(4);
    let _dd = next(4);
    let _as = next(8);
    let _do = next(8);
    let _ndo = next(8);
    let sectors = next(8);
    KernelSb {
        magic: [
            b[magic_at],
            b[magic_at + 1],
            b[magic_at + 2],
            b[magic_at + 3],
        ],
        compat_features: le32(compat),
        num_devices: le32(ndev),
        array_position: le32(pos),
        events: le64(ev),
        failed_devices: le64(failed),
        disk_recovery_offset: le64(dro),
        array_resync_offset: le64(aro),
        level: le32(level),
        sectors: le64(sectors),
    }
}
