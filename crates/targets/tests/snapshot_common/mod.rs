//! Shared by the snapshot tests: rigs on mem leaves, a seeded PRNG, and an independent reader
//! and writer of dm's persistent COW format written from the format description (little-endian
//! header `magic valid version chunk_size`; areas of `{old, new}` u64 pairs at chunk
//! `1 + k * (per_area + 1)`, each followed by `per_area` data chunks; the table ends at the first
//! entry whose new chunk is 0), not from the crate's `format` module.
#![allow(dead_code)]

use stackbd_core::{DevId, Engine, ReactorConfig, Status, SuspendOpts};
use stackbd_leaves::MemLeaf;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const SS: usize = 512;

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// In `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
}

/// An engine with leaves `base` (the origin's data, patterned) and `cow0..cowN`, and volume `o`
/// = `snapshot-origin base`.
pub struct Rig {
    pub e: Engine,
    pub base: DevId,
    pub o: DevId,
    pub sectors: u64,
    pub leaves: Vec<(String, Arc<MemLeaf>)>,
}

pub fn pattern(sectors: u64, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    (0..sectors as usize * SS / 8)
        .flat_map(|_| r.next().to_le_bytes())
        .collect()
}

impl Rig {
    pub fn new(sectors: u64, cow_sectors: u64, ncows: usize) -> Rig {
        Rig::with_cows(sectors, &vec![cow_sectors; ncows])
    }

    /// As `new`, with COW leaves of these sizes (sectors).
    pub fn with_cows(sectors: u64, cows: &[u64]) -> Rig {
        let mut leaves = vec![(
            "base".to_string(),
            Arc::new(MemLeaf::new(sectors * SS as u64).unwrap()),
        )];
        for (i, c) in cows.iter().enumerate() {
            leaves.push((
                format!("cow{i}"),
                Arc::new(MemLeaf::new(c * SS as u64).unwrap()),
            ));
        }
        let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
        for (n, l) in &leaves {
            e.add_leaf(n, l.clone()).unwrap();
        }
        let base = e.dev_id("base").unwrap();
        assert_eq!(e.write_at(base, 0, &pattern(sectors, 99)), Status::Ok);
        let o = e
            .create("o", Some(&format!("0 {sectors} snapshot-origin base")))
            .unwrap();
        Rig {
            e,
            base,
            o,
            sectors,
            leaves,
        }
    }

    /// A new engine over the same leaves (their contents as they are), with `o` again.
    pub fn reboot(&self) -> Rig {
        let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
        for (n, l) in &self.leaves {
            e.add_leaf(n, l.clone()).unwrap();
        }
        let base = e.dev_id("base").unwrap();
        let o = e
            .create(
                "o",
                Some(&format!("0 {} snapshot-origin base", self.sectors)),
            )
            .unwrap();
        Rig {
            e,
            base,
            o,
            sectors: self.sectors,
            leaves: self.leaves.clone(),
        }
    }

    /// Takes snapshot `name` on `cow` as LVM does: origin suspended around the snapshot load.
    pub fn snapshot(&mut self, name: &str, cow: &str, kind: &str, chunk: u32) -> DevId {
        self.e.suspend("o", SuspendOpts::default()).unwrap();
        let r = self.e.create(
            name,
            Some(&format!(
                "0 {} snapshot base {cow} {kind} {chunk}",
                self.sectors
            )),
        );
        self.e.resume("o").unwrap();
        r.unwrap()
    }

    pub fn read(&mut self, dev: DevId, sector: u64, sectors: u64) -> Vec<u8> {
        let mut b = vec![0u8; sectors as usize * SS];
        assert_eq!(self.e.read_at(dev, sector, &mut b), Status::Ok);
        b
    }

    pub fn leaf_bytes(&mut self, name: &str) -> Vec<u8> {
        let id = self.e.dev_id(name).unwrap();
        let l = &self.leaves.iter().find(|(n, _)| n == name).unwrap().1;
        let sectors = stackbd_core::Leaf::size(&**l);
        self.read(id, 0, sectors)
    }
}

/// What the independent reader found in a COW image.
#[derive(Debug, PartialEq, Eq)]
pub struct DmCow {
    pub valid: bool,
    pub chunk: u64,
    /// origin chunk -> COW chunk
    pub exceptions: BTreeMap<u64, u64>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Reads a persistent COW image the way the kernel's persistent store does.
pub fn dm_read(cow: &[u8]) -> Result<DmCow, String> {
    if u32_at(cow, 0) != 0x7041_6e53 {
        return Err(format!("bad magic {:#x}", u32_at(cow, 0)));
    }
    if u32_at(cow, 8) != 1 {
        return Err("bad version".into());
    }
    let chunk = u32_at(cow, 12) as u64;
    let bytes = chunk as usize * SS;
    let per_area = bytes / 16;
    let mut exceptions = BTreeMap::new();
    let mut area = 0usize;
    loop {
        let at = (1 + area * (per_area + 1)) * bytes;
        if at + bytes > cow.len() {
            break;
        }
        let mut full = true;
        for i in 0..per_area {
            let old = u64_at(cow, at + i * 16);
            let new = u64_at(cow, at + i * 16 + 8);
            if new == 0 {
                full = false;
                break;
            }
            exceptions.insert(old, new);
        }
        if !full {
            break;
        }
        area += 1;
    }
    Ok(DmCow {
        valid: u32_at(cow, 4) != 0,
        chunk,
        exceptions,
    })
}

/// Writes a persistent COW image of `cow_bytes` holding `chunks` (origin chunk, its data), data
/// chunks allocated in order, areas as the kernel lays them out.
pub fn dm_write(chunk: u64, cow_bytes: usize, chunks: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let bytes = chunk as usize * SS;
    let per_area = bytes / 16;
    let mut img = vec![0u8; cow_bytes];
    img[0..4].copy_from_slice(&0x7041_6e53u32.to_le_bytes());
    img[4..8].copy_from_slice(&1u32.to_le_bytes());
    img[8..12].copy_from_slice(&1u32.to_le_bytes());
    img[12..16].copy_from_slice(&(chunk as u32).to_le_bytes());
    for (i, (old, data)) in chunks.iter().enumerate() {
        let (area, slot) = (i / per_area, i % per_area);
        let area_chunk = 1 + area * (per_area + 1);
        let new = area_chunk + 1 + slot;
        let e = area_chunk * bytes + slot * 16;
        img[e..e + 8].copy_from_slice(&old.to_le_bytes());
        img[e + 8..e + 16].copy_from_slice(&(new as u64).to_le_bytes());
        img[new * bytes..(new + 1) * bytes].copy_from_slice(data);
    }
    img
}
