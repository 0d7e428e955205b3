//! `mem`: sparse RAM. Unwritten data reads as zeros; discard gives whole pages back.
//! A bitmap of written pages answers "was this ever written" for block status.

use crate::region::Region;
use crate::PAGE_BYTES;
use stackbd_core::leaf::Extent;
use stackbd_core::{
    BioFlags, BioId, Leaf, LeafChannel, LeafCx, Limits, Op, Sector, Status, SECTOR_SIZE,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
struct Shared {
    region: Region,
    /// One bit per page: set when written, cleared when the whole page is discarded.
    written: Box<[AtomicU64]>,
}

/// A RAM leaf.
#[derive(Debug, Clone)]
pub struct MemLeaf {
    shared: Arc<Shared>,
    size_bytes: u64,
}

impl MemLeaf {
    /// A RAM device of `size_bytes` (rounded down to whole sectors).
    pub fn new(size_bytes: u64) -> std::io::Result<MemLeaf> {
        let size_bytes = size_bytes / SECTOR_SIZE as u64 * SECTOR_SIZE as u64;
        let len = usize::try_from(size_bytes)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "size too large"))?;
        let pages = len.div_ceil(PAGE_BYTES);
        let region = Region::new(len)?;
        let written = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(MemLeaf {
            shared: Arc::new(Shared { region, written }),
            size_bytes,
        })
    }

    /// Whether the page holding byte `off` was written since it was last discarded.
    pub fn page_written(&self, off: u64) -> bool {
        self.shared.page_written(off)
    }

    /// Extents of `[sector, sector + sectors)` as (length in sectors, allocated) runs, by page.
    pub fn extents(&self, sector: Sector, sectors: u64) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        self.shared.runs(sector, sectors, |n, a| out.push((n, a)));
        out
    }
}

impl Shared {
    fn page_written(&self, off: u64) -> bool {
        let p = (off as usize) / PAGE_BYTES;
        self.written[p / 64].load(Ordering::Relaxed) & (1 << (p % 64)) != 0
    }

    /// Calls `f(sectors, written)` for each run of pages with the same state, merged.
    fn runs(&self, sector: Sector, sectors: u64, mut f: impl FnMut(u64, bool)) {
        let (mut s, end) = (sector, sector + sectors);
        let per_page = (PAGE_BYTES / SECTOR_SIZE) as u64;
        let mut run: Option<(u64, bool)> = None;
        while s < end {
            let n = (((s / per_page) + 1) * per_page).min(end) - s;
            let a = self.page_written(s * SECTOR_SIZE as u64);
            run = match run {
                Some((len, ra)) if ra == a => Some((len + n, a)),
                Some((len, ra)) => {
                    f(len, ra);
                    Some((n, a))
                }
                None => Some((n, a)),
            };
            s += n;
        }
        if let Some((len, a)) = run {
            f(len, a);
        }
    }

    fn mark(&self, off: usize, n: usize, set: bool) {
        if n == 0 {
            return;
        }
        for p in off / PAGE_BYTES..(off + n).div_ceil(PAGE_BYTES) {
            let w = &self.written[p / 64];
            let bit = 1u64 << (p % 64);
            // Skip the atomic RMW when the bit is already right: the common overwrite case.
            if (w.load(Ordering::Relaxed) & bit != 0) != set {
                if set {
                    w.fetch_or(bit, Ordering::Relaxed);
                } else {
                    w.fetch_and(!bit, Ordering::Relaxed);
                }
            }
        }
    }

    /// Punches `[off, off + n)`: whole pages are released, the partial edges zeroed.
    fn punch(&self, off: usize, n: usize) {
        let first = off.div_ceil(PAGE_BYTES) * PAGE_BYTES;
        let last = (off + n) / PAGE_BYTES * PAGE_BYTES;
        if first < last {
            self.region.zero(off, first - off);
            self.region.release(first, last - first);
            self.mark(first, last - first, false);
            self.region.zero(last, off + n - last);
        } else {
            self.region.zero(off, n);
        }
    }
}

impl Leaf for MemLeaf {
    fn kind(&self) -> &'static str {
        "mem"
    }

    fn size(&self) -> Sector {
        self.size_bytes / SECTOR_SIZE as u64
    }

    fn limits(&self) -> Limits {
        Limits {
            physical_block_bytes: PAGE_BYTES as u32,
            io_min_bytes: PAGE_BYTES as u32,
            // Copies inside the leaf are a memmove.
            max_copy_sectors: u32::MAX,
            copy_native: true,
            ..Limits::TOP
        }
    }

    fn args(&self) -> String {
        format!("{}", self.size_bytes)
    }

    fn channel(&self) -> Box<dyn LeafChannel> {
        Box::new(MemChannel {
            shared: self.shared.clone(),
        })
    }
}

struct MemChannel {
    shared: Arc<Shared>,
}

impl LeafChannel for MemChannel {
    fn extents(&self, sector: Sector, sectors: Sector, out: &mut Vec<Extent>) {
        // Appends without allocating (the caller's vector has room) or cloning the leaf.
        self.shared.runs(sector, sectors, |n, written| {
            let flags = if written {
                0
            } else {
                Extent::HOLE | Extent::ZERO
            };
            out.push(Extent { sectors: n, flags });
        });
    }

    fn submit(&mut self, cx: &mut LeafCx<'_>, id: BioId) {
        let bio = cx.bio(id);
        let off = bio.sector as usize * SECTOR_SIZE;
        let n = bio.bytes();
        let sh = &self.shared;
        let status = match bio.op {
            Op::Read => {
                sh.region.read(off, &bio.data);
                Status::Ok
            }
            Op::Write => {
                sh.region.write(off, &bio.data);
                sh.mark(off, n, true);
                Status::Ok
            }
            Op::Discard => {
                sh.punch(off, n);
                Status::Ok
            }
            Op::WriteZeroes => {
                if bio.flags.contains(BioFlags::NO_HOLE) {
                    sh.region.zero(off, n);
                    sh.mark(off, n, true);
                } else {
                    sh.punch(off, n);
                }
                Status::Ok
            }
            Op::Flush => Status::Ok,
            Op::Copy => {
                // Native copy: a move inside RAM.
                let src = bio.copy_src as usize * SECTOR_SIZE;
                sh.region.copy_within(src, off, n);
                sh.mark(off, n, true);
                Status::Ok
            }
        };
        cx.complete(id, status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_follow_writes_and_discards() {
        let m = MemLeaf::new(64 * 1024).unwrap();
        assert_eq!(m.extents(0, 128), vec![(128, false)]);
        m.shared.mark(8192, 4096, true);
        assert_eq!(
            m.extents(0, 128),
            vec![(16, false), (8, true), (104, false)]
        );
        m.shared.punch(4096, 12288);
        assert_eq!(m.extents(0, 128), vec![(128, false)]);
        assert_eq!(m.size(), 128);
    }

    #[test]
    fn punch_zeroes_partial_pages() {
        let m = MemLeaf::new(16384).unwrap();
        let mut src = vec![0xabu8; 16384];
        // SAFETY: `src` outlives the calls below.
        let buf = unsafe { stackbd_core::DataBuf::from_slice(&mut src) };
        m.shared.region.write(0, &buf);
        m.shared.punch(512, 8192);
        let mut out = vec![0u8; 16384];
        // SAFETY: as above.
        let ob = unsafe { stackbd_core::DataBuf::from_slice(&mut out) };
        m.shared.region.read(0, &ob);
        assert!(out[..512].iter().all(|&b| b == 0xab));
        assert!(out[512..8704].iter().all(|&b| b == 0));
        assert!(out[8704..].iter().all(|&b| b == 0xab));
    }
}
