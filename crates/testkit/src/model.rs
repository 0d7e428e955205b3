//! The flat reference: what the top volume must return, byte for byte, and where it must fail.

use crate::stackgen::{SectorKind, Stack};
use stackbd_core::{Sector, Status, SECTOR_SIZE};

/// One operation of a model sequence, in top-volume sectors.
#[derive(Clone, Debug)]
pub enum ModelOp {
    Read {
        sector: Sector,
        sectors: u32,
    },
    Write {
        sector: Sector,
        sectors: u32,
        seed: u8,
    },
    Discard {
        sector: Sector,
        sectors: u32,
    },
    WriteZeroes {
        sector: Sector,
        sectors: u32,
    },
    /// A copy within the volume (ranges may overlap: a memmove), through the copy engine.
    Copy {
        src: Sector,
        dst: Sector,
        sectors: u32,
    },
    Flush,
}

/// The reference device.
pub struct Reference {
    pub bytes: Vec<u8>,
    pub kinds: Vec<SectorKind>,
    /// Sectors whose content is unknown (a failed copy may have written some of its pieces);
    /// reads do not compare them until they are written again.
    pub poisoned: Vec<bool>,
}

/// Fills `buf` with a pattern that differs per sector and per seed, so misplaced sectors show.
pub fn pattern(buf: &mut [u8], sector: Sector, seed: u8) {
    for (i, chunk) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
        let s = sector + i as Sector;
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (s as u8).wrapping_mul(31) ^ (j as u8).wrapping_mul(7) ^ seed ^ ((s >> 8) as u8);
        }
    }
}

impl Reference {
    pub fn new(stack: &Stack) -> Reference {
        Reference {
            bytes: vec![0; stack.size as usize * SECTOR_SIZE],
            kinds: stack.kinds.clone(),
            poisoned: vec![false; stack.size as usize],
        }
    }

    fn range(&self, sector: Sector, sectors: u32) -> std::ops::Range<usize> {
        sector as usize..sector as usize + sectors as usize
    }

    /// The status the stack must return for an op over this range.
    pub fn expect(&self, sector: Sector, sectors: u32) -> Status {
        if self.kinds[self.range(sector, sectors)].contains(&SectorKind::Error) {
            Status::IoError
        } else {
            Status::Ok
        }
    }

    /// Applies a write (or zeroing with `data = None`) to the data sectors of the range. Pieces
    /// on error targets fail but the other pieces are still written, as in the engine.
    pub fn apply(&mut self, sector: Sector, sectors: u32, data: Option<&[u8]>) {
        for s in self.range(sector, sectors) {
            if self.kinds[s] == SectorKind::Data {
                self.poisoned[s] = false;
                let dst = &mut self.bytes[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE];
                match data {
                    Some(d) => {
                        let o = (s - sector as usize) * SECTOR_SIZE;
                        dst.copy_from_slice(&d[o..o + SECTOR_SIZE]);
                    }
                    None => dst.fill(0),
                }
            }
        }
    }

    /// What a successful read of the range returns.
    pub fn read(&self, sector: Sector, sectors: u32) -> Vec<u8> {
        let mut out = vec![0u8; sectors as usize * SECTOR_SIZE];
        for s in self.range(sector, sectors) {
            if self.kinds[s] == SectorKind::Data {
                let o = (s - sector as usize) * SECTOR_SIZE;
                out[o..o + SECTOR_SIZE]
                    .copy_from_slice(&self.bytes[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE]);
            }
        }
        out
    }
}

/// Runs `ops` against the stack and the reference; returns a description of the first
/// disagreement.
pub fn run(stack: &mut Stack, ops: &[ModelOp]) -> Result<(), String> {
    let mut r = Reference::new(stack);
    let top = stack.top;
    let e = &mut stack.engine;
    for (i, op) in ops.iter().enumerate() {
        let (got, want) = match *op {
            ModelOp::Read { sector, sectors } => {
                let mut buf = vec![0xeeu8; sectors as usize * SECTOR_SIZE];
                let got = e.read_at(top, sector, &mut buf);
                let want = r.expect(sector, sectors);
                if got == want && want.is_ok() {
                    let mut exp = r.read(sector, sectors);
                    // Unknown sectors compare as whatever was read.
                    for (i, s) in (sector as usize..sector as usize + sectors as usize).enumerate()
                    {
                        if r.poisoned[s] {
                            exp[i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE]
                                .copy_from_slice(&buf[i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE]);
                        }
                    }
                    if buf != exp {
                        let first = buf.iter().zip(&exp).position(|(a, b)| a != b).unwrap();
                        return Err(format!(
                            "op {i} {op:?}: data differs at byte {first} (sector {}): got {:#x}, want {:#x}",
                            sector + (first / SECTOR_SIZE) as Sector,
                            buf[first],
                            exp[first]
                        ));
                    }
                }
                (got, want)
            }
            ModelOp::Write {
                sector,
                sectors,
                seed,
            } => {
                let mut buf = vec![0u8; sectors as usize * SECTOR_SIZE];
                pattern(&mut buf, sector, seed);
                let got = e.write_at(top, sector, &buf);
                r.apply(sector, sectors, Some(&buf));
                (got, r.expect(sector, sectors))
            }
            ModelOp::Discard { sector, sectors } => {
                let got = e.discard(top, sector, sectors);
                r.apply(sector, sectors, None);
                (got, r.expect(sector, sectors))
            }
            ModelOp::WriteZeroes { sector, sectors } => {
                let got = e.write_zeroes(top, sector, sectors);
                r.apply(sector, sectors, None);
                (got, r.expect(sector, sectors))
            }
            ModelOp::Copy { src, dst, sectors } => {
                let got = e.copy(top, src, dst, sectors as Sector);
                let want = if r.expect(src, sectors).is_ok() {
                    r.expect(dst, sectors)
                } else {
                    Status::IoError
                };
                if want.is_ok() {
                    let data = r.read(src, sectors);
                    let poisoned: Vec<bool> =
                        r.poisoned[src as usize..src as usize + sectors as usize].to_vec();
                    r.apply(dst, sectors, Some(&data));
                    for (i, p) in poisoned.into_iter().enumerate() {
                        if p && r.kinds[dst as usize + i] == SectorKind::Data {
                            r.poisoned[dst as usize + i] = true;
                        }
                    }
                } else {
                    for s in dst as usize..dst as usize + sectors as usize {
                        if r.kinds[s] == SectorKind::Data {
                            r.poisoned[s] = true;
                        }
                    }
                }
                (got, want)
            }
            ModelOp::Flush => (e.flush(top), Status::Ok),
        };
        if got != want {
            return Err(format!(
                "op {i} {op:?}: status {got:?}, reference says {want:?}"
            ));
        }
    }
    Ok(())
}

/// A proptest strategy for op sequences over a device of `size` sectors. Offsets and lengths
/// are drawn so that many ops cross segment, chunk and volume boundaries.
pub fn ops_strategy(max_ops: usize) -> impl proptest::strategy::Strategy<Value = Vec<RawOp>> {
    use proptest::prelude::*;
    proptest::collection::vec((0u8..100, any::<u32>(), 1u32..160, any::<u8>()), 1..max_ops)
        .prop_map(|v| {
            v.into_iter()
                .map(|(k, o, l, s)| RawOp {
                    kind: k,
                    offset: o,
                    len: l,
                    seed: s,
                })
                .collect()
        })
}

/// A size-independent op, resolved against a stack by `resolve`.
#[derive(Clone, Debug)]
pub struct RawOp {
    pub kind: u8,
    pub offset: u32,
    pub len: u32,
    pub seed: u8,
}

/// Turns raw ops into ops that fit a device of `size` sectors.
pub fn resolve(raw: &[RawOp], size: Sector) -> Vec<ModelOp> {
    raw.iter()
        .map(|r| {
            let sectors = (r.len as Sector).min(size) as u32;
            let sector = r.offset as Sector % (size - sectors as Sector + 1);
            match r.kind {
                0..=39 => ModelOp::Read { sector, sectors },
                40..=79 => ModelOp::Write {
                    sector,
                    sectors,
                    seed: r.seed,
                },
                80..=87 => ModelOp::Discard { sector, sectors },
                88..=95 => ModelOp::WriteZeroes { sector, sectors },
                _ => ModelOp::Flush,
            }
        })
        .collect()
}
