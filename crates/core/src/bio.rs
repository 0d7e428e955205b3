//! The bio: one I/O as it travels down the stack, with its stack of per-layer frames.
//!
//! Seed 001 (bio stacking): `push(size, endio)` before passing a bio down, `pop` in the completion,
//! so a layer's context travels inside the bio and one allocation carries the I/O through the
//! whole stack. Here a frame is a header (who sees the completion) plus a typed context stored
//! as plain words in the bio's frame area. Contexts are `bytemuck::Pod`, so storing and loading
//! them needs no `unsafe`.

use crate::buf::DataBuf;
use crate::status::Status;
use crate::{DevId, Sector, SECTOR_SIZE};
use bytemuck::Pod;

/// At most this many frames on one bio: bounds the depth of any stack (a table that would need
/// more is refused at load) and so bounds completion work per bio.
pub const MAX_FRAMES: usize = 32;

/// Frame contexts are stored in 8-byte words.
pub const FRAME_WORD: usize = 8;

/// Index of a bio in its reactor's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BioId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Copy `sectors` from `copy_src` to `sector` within one device.
    Copy,
}

impl Op {
    /// Ops that carry a data buffer.
    #[inline]
    pub fn has_data(self) -> bool {
        matches!(self, Op::Read | Op::Write)
    }

    /// Ops that modify the device.
    #[inline]
    pub fn is_write(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes | Op::Copy)
    }
}

/// Bio flags (a tiny bit set; the data path copies it around freely).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BioFlags(pub u16);

impl BioFlags {
    pub const NONE: BioFlags = BioFlags(0);
    /// Forced unit access: the write is durable when it completes.
    pub const FUA: BioFlags = BioFlags(1 << 0);
    /// Flush the device cache before this write.
    pub const PREFLUSH: BioFlags = BioFlags(1 << 1);
    /// Return `Again` instead of waiting for a pool or queue.
    pub const NOWAIT: BioFlags = BioFlags(1 << 2);
    /// The submitter will poll for the completion.
    pub const POLLED: BioFlags = BioFlags(1 << 3);
    /// Do not merge this bio into a request.
    pub const NOMERGE: BioFlags = BioFlags(1 << 4);
    /// Write-zeroes must allocate (NBD `NO_HOLE`): do not punch a hole.
    pub const NO_HOLE: BioFlags = BioFlags(1 << 5);
    /// A copy must be emulated (read + write) by the first layer it meets: for measuring what
    /// offload buys, and for leaves whose offload misbehaves.
    pub const NO_OFFLOAD: BioFlags = BioFlags(1 << 6);

    #[inline]
    pub fn contains(self, other: BioFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for BioFlags {
    type Output = BioFlags;
    fn bitor(self, rhs: BioFlags) -> BioFlags {
        BioFlags(self.0 | rhs.0)
    }
}

/// Context of a split frame: the parent's geometry at the split, and the pieces still out.
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub(crate) struct SplitCtx {
    pub(crate) sector: u64,
    pub(crate) copy_src: u64,
    /// Bytes the parent's data window was advanced by the split.
    pub(crate) data_advanced: u64,
    pub(crate) sectors: u32,
    /// Pieces not yet completed: the clones plus the remainder itself.
    pub(crate) pending: u32,
    pub(crate) status: u8,
    /// A piece was pushed back (noflush suspend): the whole bio goes back up to its volume.
    pub(crate) pushback: u8,
    pub(crate) _pad: [u8; 6],
}

impl SplitCtx {
    pub(crate) fn merge(&mut self, s: Status, pushback: bool) {
        let mut st = Status::from_u8(self.status);
        st.merge(s);
        self.status = st as u8;
        self.pushback |= pushback as u8;
    }
}

/// Who sees a frame's completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// Entry into a volume: in-flight accounting for suspend, no context.
    Volume,
    /// A split at this volume: the context is a [`SplitCtx`].
    Split,
    /// A target's own frame; its `end_io` sees the context.
    Target { target: u16 },
    /// An emulated copy piece (read into a bounce buffer, then write), parked until done.
    CopyEmu,
    /// The bottom frame of a request (request-based volumes): its members complete with it.
    Request,
    /// The bottom frame of a child bio a target sent (`TargetCx::submit_child`, copies): its
    /// completion goes back to that target. The context is a `ChildCtx`.
    Child { target: u16 },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameHdr {
    pub(crate) kind: FrameKind,
    /// The volume whose table holds the target (or the volume entered).
    pub(crate) dev: DevId,
    /// Offset of the context in words, in the logical frame area.
    pub(crate) ctx_off: u32,
    pub(crate) ctx_words: u32,
}

const EMPTY_HDR: FrameHdr = FrameHdr {
    kind: FrameKind::Volume,
    dev: DevId(u32::MAX),
    ctx_off: 0,
    ctx_words: 0,
};

/// Extension chunks for frames that did not fit (seed 000: "the frame area is extended from a
/// fallback pool and a too-small counter goes up").
#[derive(Debug, Default)]
pub struct FrameFallback {
    free: Vec<Box<[u64]>>,
    chunk_words: usize,
    /// Frames that did not fit in their bio's frame area.
    pub overflows: u64,
    /// Heap allocations made because the fallback pool was empty.
    pub allocations: u64,
}

impl FrameFallback {
    pub fn new(chunks: usize, chunk_bytes: usize) -> FrameFallback {
        let chunk_words = chunk_bytes.div_ceil(FRAME_WORD).max(1);
        FrameFallback {
            free: (0..chunks)
                .map(|_| vec![0u64; chunk_words].into_boxed_slice())
                .collect(),
            chunk_words,
            overflows: 0,
            allocations: 0,
        }
    }

    fn take(&mut self, words: usize) -> Box<[u64]> {
        if words <= self.chunk_words {
            if let Some(c) = self.free.pop() {
                return c;
            }
        }
        self.allocations += 1;
        vec![0u64; words.max(self.chunk_words)].into_boxed_slice()
    }

    fn give(&mut self, chunk: Box<[u64]>) {
        if chunk.len() == self.chunk_words {
            self.free.push(chunk);
        }
    }
}

/// The frame stack of one bio.
#[derive(Debug)]
pub struct FrameStack {
    /// Inline area, sized from the stacked `per_io_bytes` when the bio was allocated.
    area: Box<[u64]>,
    /// Extension, taken from the fallback when a push did not fit.
    overflow: Option<Box<[u64]>>,
    /// Words in use, counted over `area` then `overflow`.
    used: u32,
    hdrs: [FrameHdr; MAX_FRAMES],
    depth: u8,
    /// The context of the frame popped last, readable by its `end_io`.
    popped: (u32, u32),
}

impl FrameStack {
    pub(crate) fn new(words: usize) -> FrameStack {
        FrameStack {
            area: vec![0u64; words].into_boxed_slice(),
            overflow: None,
            used: 0,
            hdrs: [EMPTY_HDR; MAX_FRAMES],
            depth: 0,
            popped: (0, 0),
        }
    }

    /// Inline capacity in bytes.
    pub fn capacity_bytes(&self) -> usize {
        self.area.len() * FRAME_WORD
    }

    pub fn depth(&self) -> usize {
        self.depth as usize
    }

    fn words(&self, off: u32, n: u32) -> &[u64] {
        let (off, n) = (off as usize, n as usize);
        if off + n <= self.area.len() {
            &self.area[off..off + n]
        } else {
            let o = off - self.area.len();
            &self
                .overflow
                .as_ref()
                .expect("frame context in a missing overflow")[o..o + n]
        }
    }

    fn words_mut(&mut self, off: u32, n: u32) -> &mut [u64] {
        let (off, n) = (off as usize, n as usize);
        if off + n <= self.area.len() {
            &mut self.area[off..off + n]
        } else {
            let o = off - self.area.len();
            &mut self
                .overflow
                .as_mut()
                .expect("frame context in a missing overflow")[o..o + n]
        }
    }

    /// Pushes a frame and stores `ctx` in it. Returns the context's offset (stable until popped).
    pub(crate) fn push<T: Pod>(
        &mut self,
        kind: FrameKind,
        dev: DevId,
        ctx: &T,
        fallback: &mut FrameFallback,
    ) -> u32 {
        assert!(
            (self.depth as usize) < MAX_FRAMES,
            "frame stack deeper than MAX_FRAMES"
        );
        let bytes = std::mem::size_of::<T>();
        let n = bytes.div_ceil(FRAME_WORD) as u32;
        let mut off = self.used;
        if n > 0 && (off + n) as usize > self.area.len() {
            // Too small: contexts never straddle, so skip the inline tail and extend.
            let inline = self.area.len() as u32;
            off = off.max(inline);
            let need = (off - inline + n) as usize;
            match &mut self.overflow {
                Some(chunk) if chunk.len() >= need => {}
                slot => {
                    let mut chunk = fallback.take(need);
                    if let Some(old) = slot.take() {
                        chunk[..old.len()].copy_from_slice(&old);
                        fallback.give(old);
                    }
                    *slot = Some(chunk);
                }
            }
            fallback.overflows += 1;
        }
        if n > 0 {
            let words = self.words_mut(off, n);
            bytemuck::cast_slice_mut::<u64, u8>(words)[..bytes]
                .copy_from_slice(bytemuck::bytes_of(ctx));
        }
        self.used = off + n;
        self.hdrs[self.depth as usize] = FrameHdr {
            kind,
            dev,
            ctx_off: off,
            ctx_words: n,
        };
        self.depth += 1;
        off
    }

    /// The kind of the frame whose context is at `off` (searched from the top).
    pub(crate) fn kind_at(&self, off: u32) -> Option<FrameKind> {
        self.hdrs[..self.depth as usize]
            .iter()
            .rev()
            .find(|h| h.ctx_off == off && h.ctx_words > 0)
            .map(|h| h.kind)
    }

    pub(crate) fn peek(&self) -> Option<FrameHdr> {
        self.depth.checked_sub(1).map(|d| self.hdrs[d as usize])
    }

    pub(crate) fn pop(&mut self) -> Option<FrameHdr> {
        let d = self.depth.checked_sub(1)?;
        self.depth = d;
        let h = self.hdrs[d as usize];
        self.used = h.ctx_off;
        self.popped = (h.ctx_off, h.ctx_words);
        Some(h)
    }

    /// Reads the context stored at `off`.
    pub(crate) fn ctx_at<T: Pod>(&self, off: u32) -> T {
        let n = std::mem::size_of::<T>().div_ceil(FRAME_WORD) as u32;
        let words = self.words(off, n);
        bytemuck::pod_read_unaligned(
            &bytemuck::cast_slice::<u64, u8>(words)[..std::mem::size_of::<T>()],
        )
    }

    /// Overwrites the context stored at `off`.
    pub(crate) fn set_ctx_at<T: Pod>(&mut self, off: u32, ctx: &T) {
        let n = std::mem::size_of::<T>().div_ceil(FRAME_WORD) as u32;
        let words = self.words_mut(off, n);
        bytemuck::cast_slice_mut::<u64, u8>(words)[..std::mem::size_of::<T>()]
            .copy_from_slice(bytemuck::bytes_of(ctx));
    }

    fn reset(&mut self, fallback: &mut FrameFallback) {
        self.used = 0;
        self.depth = 0;
        self.popped = (0, 0);
        if let Some(chunk) = self.overflow.take() {
            fallback.give(chunk);
        }
    }
}

/// One I/O.
#[derive(Debug)]
pub struct Bio {
    pub op: Op,
    pub flags: BioFlags,
    /// The device this bio is addressed to now (changes as layers remap it).
    pub dev: DevId,
    /// First sector on `dev`.
    pub sector: Sector,
    /// Length in sectors (0 for a flush).
    pub sectors: u32,
    /// Source sector on `dev` of a `Copy`.
    pub copy_src: Sector,
    /// The data window of this bio (read/write only).
    pub data: DataBuf,
    pub status: Status,
    /// Which of a target's flush bios this is (see `Target::flush_devices`).
    pub map_index: u32,
    /// The submitter's tag, returned with the completion.
    pub user_data: u64,
    /// A clone's parent and the offset of the parent's split frame.
    pub(crate) parent: Option<(BioId, u32)>,
    /// The top-level bio this one belongs to (itself if top-level).
    pub(crate) root: BioId,
    /// On a top-level bio: the asynchronous leaf queues its pieces reached (one bit each), so a
    /// polled wait polls only those.
    pub(crate) touched: u64,
    /// Next member of the request this bio is merged into (request-based volumes).
    pub(crate) rq_next: Option<BioId>,
    /// Sent back up to its volume by a `noflush` suspend (internal; never seen by a caller):
    /// the volume's entry frame holds it for the next table.
    pub(crate) pushback: bool,
    pub frames: FrameStack,
}

impl Bio {
    fn new(frame_words: usize) -> Bio {
        Bio {
            op: Op::Read,
            flags: BioFlags::NONE,
            dev: DevId(0),
            sector: 0,
            sectors: 0,
            copy_src: 0,
            data: DataBuf::EMPTY,
            status: Status::Ok,
            map_index: 0,
            user_data: 0,
            parent: None,
            root: BioId(0),
            touched: 0,
            rq_next: None,
            pushback: false,
            frames: FrameStack::new(frame_words),
        }
    }

    /// Length in bytes.
    #[inline]
    pub fn bytes(&self) -> usize {
        self.sectors as usize * SECTOR_SIZE
    }

    /// The end sector (exclusive) on `dev`.
    #[inline]
    pub fn end(&self) -> Sector {
        self.sector + self.sectors as Sector
    }

    /// Context of the frame popped last: what a target's `end_io` reads.
    pub fn popped_ctx<T: Pod>(&self) -> T {
        let (off, words) = self.frames.popped;
        debug_assert!(words as usize * FRAME_WORD >= std::mem::size_of::<T>());
        self.frames.ctx_at(off)
    }

    /// True if this bio is a clone made by a split.
    pub fn is_clone(&self) -> bool {
        self.parent.is_some()
    }
}

/// Counters of a bio pool (seed 000's statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bios handed out.
    pub allocs: u64,
    /// Top-level allocations refused because the pool was at its limit.
    pub exhausted: u64,
    /// Bios added beyond the initial capacity (a heap allocation each).
    pub grown: u64,
    /// Bios whose frame area was re-sized after a limits notification.
    pub resized: u64,
    /// Notifications received (table reloads that changed the stacked need).
    pub notifications: u64,
}

/// A per-reactor pool of bios whose frame areas are sized for the deepest stack they serve.
#[derive(Debug)]
pub struct BioPool {
    bios: Vec<Bio>,
    free: Vec<u32>,
    /// Frame area (words) new bios must have: the stacked `per_io_bytes`.
    frame_words: usize,
    /// Top-level bios may not take the pool below this many free entries: the reserve is for
    /// clones, so a split never waits for a bio held by its own parent.
    reserve: usize,
    pub stats: PoolStats,
}

impl BioPool {
    /// A pool of `capacity` bios with `per_io_bytes` of frame space each.
    pub fn new(capacity: usize, per_io_bytes: usize) -> BioPool {
        let frame_words = per_io_bytes.div_ceil(FRAME_WORD);
        let capacity = capacity.max(2);
        BioPool {
            bios: (0..capacity).map(|_| Bio::new(frame_words)).collect(),
            free: (0..capacity as u32).rev().collect(),
            frame_words,
            reserve: (capacity / 8).max(1),
            stats: PoolStats::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.bios.len()
    }

    pub fn in_use(&self) -> usize {
        self.bios.len() - self.free.len()
    }

    pub fn frame_bytes(&self) -> usize {
        self.frame_words * FRAME_WORD
    }

    /// A reload changed the stacked frame need: new bios get areas of this size (seed 000:
    /// "a reconfiguration notifies the allocators").
    pub fn notify_frame_bytes(&mut self, per_io_bytes: usize) {
        let words = per_io_bytes.div_ceil(FRAME_WORD);
        if words != self.frame_words {
            self.frame_words = words;
            self.stats.notifications += 1;
        }
    }

    /// Allocates a bio; top-level allocations leave the clone reserve alone and return `None`
    /// when only the reserve is left; clones grow the pool rather than fail.
    pub fn alloc(&mut self, top_level: bool) -> Option<BioId> {
        if top_level && self.free.len() <= self.reserve {
            self.stats.exhausted += 1;
            return None;
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.stats.grown += 1;
                self.bios.push(Bio::new(self.frame_words));
                (self.bios.len() - 1) as u32
            }
        };
        let frame_words = self.frame_words;
        let bio = &mut self.bios[idx as usize];
        if bio.frames.area.len() < frame_words {
            bio.frames.area = vec![0u64; frame_words].into_boxed_slice();
            self.stats.resized += 1;
        }
        self.stats.allocs += 1;
        Some(BioId(idx))
    }

    /// Returns a bio to the pool.
    pub fn free(&mut self, id: BioId, fallback: &mut FrameFallback) {
        let bio = &mut self.bios[id.0 as usize];
        debug_assert!(!self.free.contains(&id.0), "double free of {id:?}");
        bio.frames.reset(fallback);
        bio.parent = None;
        bio.status = Status::Ok;
        bio.pushback = false;
        bio.data = DataBuf::EMPTY;
        bio.map_index = 0;
        bio.flags = BioFlags::NONE;
        self.free.push(id.0);
    }

    #[inline]
    pub fn get(&self, id: BioId) -> &Bio {
        &self.bios[id.0 as usize]
    }

    #[inline]
    pub fn get_mut(&mut self, id: BioId) -> &mut Bio {
        &mut self.bios[id.0 as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    #[repr(C)]
    struct Ctx {
        a: u64,
        b: u32,
        c: u32,
    }

    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    #[repr(C)]
    struct Small {
        x: u16,
    }

    #[test]
    fn push_pop_is_lifo_and_each_frame_sees_its_context() {
        let mut fb = FrameFallback::new(1, 64);
        let mut fs = FrameStack::new(8);
        let o1 = fs.push(
            FrameKind::Target { target: 1 },
            DevId(1),
            &Ctx { a: 1, b: 2, c: 3 },
            &mut fb,
        );
        let o2 = fs.push(FrameKind::Volume, DevId(2), &(), &mut fb);
        let o3 = fs.push(
            FrameKind::Target { target: 2 },
            DevId(3),
            &Small { x: 9 },
            &mut fb,
        );
        assert_eq!((o1, o2, o3), (0, 2, 2));
        assert_eq!(fs.depth(), 3);
        let h = fs.pop().unwrap();
        assert_eq!(h.kind, FrameKind::Target { target: 2 });
        assert_eq!(fs.ctx_at::<Small>(h.ctx_off), Small { x: 9 });
        assert_eq!(fs.pop().unwrap().kind, FrameKind::Volume);
        let h = fs.pop().unwrap();
        assert_eq!(fs.ctx_at::<Ctx>(h.ctx_off), Ctx { a: 1, b: 2, c: 3 });
        assert!(fs.pop().is_none());
        assert_eq!(fb.overflows, 0);
    }

    #[test]
    fn a_frame_that_does_not_fit_extends_into_the_fallback_and_is_counted() {
        let mut fb = FrameFallback::new(2, 64);
        let mut fs = FrameStack::new(3);
        fs.push(
            FrameKind::Split,
            DevId(0),
            &Ctx { a: 5, b: 6, c: 7 },
            &mut fb,
        ); // 2 words
        let off = fs.push(
            FrameKind::Split,
            DevId(0),
            &Ctx { a: 8, b: 9, c: 10 },
            &mut fb,
        ); // spills
        assert_eq!(
            off, 3,
            "contexts never straddle the inline area and the extension"
        );
        assert_eq!(fb.overflows, 1);
        assert_eq!(
            fb.allocations, 0,
            "taken from the fallback pool, not the heap"
        );
        let mut c = fs.ctx_at::<Ctx>(off);
        c.a = 80;
        fs.set_ctx_at(off, &c);
        assert_eq!(fs.ctx_at::<Ctx>(off).a, 80);
        assert_eq!(fs.ctx_at::<Ctx>(0).a, 5);
        fs.pop();
        fs.pop();
        fs.reset(&mut fb);
        assert_eq!(
            fb.free.len(),
            2,
            "the extension went back to the fallback pool"
        );
    }

    #[test]
    fn overflow_grows_when_several_frames_spill() {
        let mut fb = FrameFallback::new(1, 16);
        let mut fs = FrameStack::new(0);
        let offs: Vec<u32> = (0..5)
            .map(|i| {
                fs.push(
                    FrameKind::Split,
                    DevId(0),
                    &Ctx { a: i, b: 0, c: 0 },
                    &mut fb,
                )
            })
            .collect();
        for (i, off) in offs.iter().enumerate() {
            assert_eq!(fs.ctx_at::<Ctx>(*off).a, i as u64);
        }
        assert_eq!(fb.overflows, 5);
    }

    #[test]
    fn pool_keeps_a_reserve_for_clones_and_grows_only_for_them() {
        let mut fb = FrameFallback::new(0, 64);
        let mut pool = BioPool::new(16, 32);
        let mut top = Vec::new();
        while let Some(id) = pool.alloc(true) {
            top.push(id);
        }
        assert_eq!(top.len(), 14, "two entries (capacity / 8) kept for clones");
        assert_eq!(pool.stats.exhausted, 1);
        let c1 = pool.alloc(false).unwrap();
        let c2 = pool.alloc(false).unwrap();
        assert_eq!(pool.stats.grown, 0);
        let c3 = pool.alloc(false).unwrap();
        assert_eq!(
            pool.stats.grown, 1,
            "a clone past the reserve grows the pool"
        );
        for id in [c1, c2, c3].into_iter().chain(top) {
            pool.free(id, &mut fb);
        }
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn notification_resizes_new_bios_once() {
        let mut fb = FrameFallback::new(0, 64);
        let mut pool = BioPool::new(4, 16);
        pool.notify_frame_bytes(64);
        assert_eq!(pool.stats.notifications, 1);
        let id = pool.alloc(true).unwrap();
        assert_eq!(pool.get(id).frames.capacity_bytes(), 64);
        assert_eq!(pool.stats.resized, 1);
        pool.free(id, &mut fb);
        let id2 = pool.alloc(true).unwrap();
        assert_eq!(id, id2);
        assert_eq!(pool.stats.resized, 1, "already large enough");
    }
}
