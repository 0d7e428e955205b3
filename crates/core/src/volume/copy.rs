//! Copies through a volume (seed 002): each piece is routed down as a copy where both ends
//! land on one device, to the kernel where both end on files of one filesystem, and is
//! emulated here (read into a bounce buffer, then write) otherwise.

use super::{finish_map, map_with, vol_targets, ReactorStats, Requeued, Slot, Tx, VolTargets};
use crate::bio::{BioFlags, BioId, BioPool, FrameFallback, FrameKind, Op, SplitCtx};
use crate::buf::DataBuf;
use crate::status::Status;
use crate::table::Table;
use crate::target::TargetIo;
use crate::{DevId, Sector, SECTOR_SIZE};
use std::collections::VecDeque;

/// Bounce buffers for emulated copies: a bounded set, made on first use and kept, so emulation
/// allocates nothing in steady state and never has more than `max` chunks in flight.
#[derive(Debug)]
pub(crate) struct CopyBufs {
    bufs: Vec<Box<[u8]>>,
    free: Vec<u32>,
    /// Pieces waiting for a buffer, in arrival order.
    waiting: VecDeque<BioId>,
    max: usize,
}

impl CopyBufs {
    /// At most `max` bounce buffers (made on first use), a waiting list of `cap`.
    pub(crate) fn new(max: usize, cap: usize) -> CopyBufs {
        CopyBufs {
            bufs: Vec::new(),
            free: Vec::new(),
            waiting: VecDeque::with_capacity(cap),
            max,
        }
    }
}

/// Sectors per emulated copy step (the bounce buffer size).
pub const COPY_CHUNK_SECTORS: u32 = 2048;

impl CopyBufs {
    pub(crate) fn acquire(&mut self) -> Option<u32> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        if self.bufs.len() < self.max {
            self.bufs
                .push(vec![0u8; COPY_CHUNK_SECTORS as usize * SECTOR_SIZE].into_boxed_slice());
            return Some(self.bufs.len() as u32 - 1);
        }
        None
    }

    /// The first `sectors` of buffer `i` as a bio data window.
    pub(crate) fn window(&mut self, i: u32, sectors: u32) -> DataBuf {
        let b = &mut self.bufs[i as usize][..sectors as usize * SECTOR_SIZE];
        // SAFETY: the buffer is a boxed slice owned by this reactor; it never moves (only the Box
        // pointer lives in the Vec) and is not freed or reused until the emulation step that
        // holds index `i` has completed both its read and its write.
        unsafe { DataBuf::from_slice(b) }
    }
}

/// Context of an emulated copy piece.
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct CopyEmuCtx {
    /// Source and destination, relative to their targets.
    src: u64,
    dst: u64,
    done: u32,
    total: u32,
    /// Sectors in the step in flight.
    chunk: u32,
    buf: u32,
    src_target: u16,
    dst_target: u16,
    /// 0: reading the chunk; 1: writing it.
    phase: u8,
    status: u8,
    _pad: [u8; 2],
}

const NO_BUF: u32 = u32::MAX;

pub(crate) fn is_copy_emu(pool: &BioPool, parent: BioId, off: u32) -> bool {
    pool.get(parent).frames.kind_at(off) == Some(FrameKind::CopyEmu)
}

/// What the copy paths touch: the reactor's parts, borrowed apart.
pub(crate) struct CopyCx<'a> {
    pub(crate) targets: &'a mut Vec<VolTargets>,
    pub(crate) tio: &'a mut TargetIo,
    pub(crate) index: usize,
    pub(crate) devs: &'a [Slot],
    pub(crate) pool: &'a mut BioPool,
    pub(crate) fallback: &'a mut FrameFallback,
    pub(crate) submit_q: &'a mut VecDeque<BioId>,
    pub(crate) complete_q: &'a mut VecDeque<BioId>,
    pub(crate) requeue: &'a mut VecDeque<Requeued>,
    pub(crate) stats: &'a mut ReactorStats,
    pub(crate) bufs: &'a mut CopyBufs,
}

impl CopyCx<'_> {
    /// Maps a copy that entered `vol`. Pieces are cut where the source or the destination
    /// crosses a boundary. Returns true if the original was remapped and goes on down.
    pub(crate) fn map_copy(&mut self, table: &Table, vol: DevId, id: BioId) -> bool {
        let entries = table.entries();
        let mut split_off: Option<u32> = None;
        loop {
            let bio = self.pool.get(id);
            let (dti, sti) = (table.find(bio.sector), table.find(bio.copy_src));
            let (de, se) = (&entries[dti], &entries[sti]);
            let (doff, soff) = (bio.sector - de.start, bio.copy_src - se.start);
            let avail = (de.len - doff)
                .min(de.target.max_io_len(doff))
                .min(se.len - soff)
                .min(se.target.max_io_len(soff));
            if bio.sectors as Sector <= avail {
                let n = bio.sectors;
                return self.route_piece(table, vol, id, (dti, doff), (sti, soff), n);
            }
            let n = avail as u32;
            let bio = self.pool.get_mut(id);
            let off = *split_off.get_or_insert_with(|| {
                let ctx = SplitCtx {
                    sector: bio.sector,
                    copy_src: bio.copy_src,
                    sectors: bio.sectors,
                    pending: 1,
                    ..SplitCtx::default()
                };
                bio.frames.push(FrameKind::Split, vol, &ctx, self.fallback)
            });
            let mut ctx: SplitCtx = bio.frames.ctx_at(off);
            ctx.pending += 1;
            bio.frames.set_ctx_at(off, &ctx);
            let (flags, user_data, root, sector, copy_src) =
                (bio.flags, bio.user_data, bio.root, bio.sector, bio.copy_src);
            bio.sector += n as Sector;
            bio.copy_src += n as Sector;
            bio.sectors -= n;
            let c = self
                .pool
                .alloc(false)
                .expect("clone allocation never fails");
            let cb = self.pool.get_mut(c);
            cb.op = Op::Copy;
            cb.flags = flags;
            cb.dev = vol;
            cb.sector = sector;
            cb.copy_src = copy_src;
            cb.sectors = n;
            cb.data = DataBuf::EMPTY;
            cb.user_data = user_data;
            cb.root = root;
            cb.parent = Some((id, off));
            self.stats.splits += 1;
            if self.route_piece(table, vol, c, (dti, doff), (sti, soff), n) {
                self.submit_q.push_back(c);
            }
        }
    }

    /// Sends one piece on its way: down as a copy when both ends land on one device, to the
    /// kernel when both end on files of one filesystem, else emulated here. True if the piece
    /// was remapped and goes on down.
    fn route_piece(
        &mut self,
        table: &Table,
        vol: DevId,
        id: BioId,
        dst: (usize, Sector),
        src: (usize, Sector),
        n: u32,
    ) -> bool {
        use crate::target::TargetExtent;
        let entries = table.entries();
        let len = n as Sector;
        let dx = entries[dst.0].target.extent(dst.1, len);
        let sx = entries[src.0].target.extent(src.1, len);
        if self.pool.get(id).flags.contains(BioFlags::NO_OFFLOAD) {
            self.emulate(vol, id, dst, src, n);
            return false;
        }
        if let (
            TargetExtent::Dev {
                dev: dd,
                sector: ds,
                len: dl,
            },
            TargetExtent::Dev {
                dev: sd,
                sector: ss,
                len: sl,
            },
        ) = (dx, sx)
        {
            if dl >= len && sl >= len {
                if dd == sd {
                    let bio = self.pool.get_mut(id);
                    bio.dev = dd;
                    bio.sector = ds;
                    bio.copy_src = ss;
                    return true;
                }
                if let Some(s) = self.kernel_copy((sd, ss), (dd, ds), len) {
                    self.stats.copy_kernel_bytes += len * SECTOR_SIZE as u64;
                    self.pool.get_mut(id).status = s;
                    self.complete_q.push_back(id);
                    return false;
                }
            }
        }
        self.emulate(vol, id, dst, src, n);
        false
    }

    /// Follows pure remaps down to a leaf; `None` if the range does not stay on one device the
    /// whole way, or passes a suspended volume.
    fn resolve(&self, mut dev: DevId, mut sector: Sector, len: Sector) -> Option<(DevId, Sector)> {
        for _ in 0..crate::bio::MAX_FRAMES {
            match self.devs.get(dev.0 as usize)? {
                Slot::Leaf(l) => return (sector + len <= l.size).then_some((dev, sector)),
                Slot::Volume(v) => {
                    let t = v.table.as_deref()?;
                    if v.suspended || sector + len > t.size() {
                        return None;
                    }
                    let e = &t.entries()[t.find(sector)];
                    let off = sector - e.start;
                    if e.len - off < len {
                        return None;
                    }
                    match e.target.extent(off, len) {
                        crate::target::TargetExtent::Dev {
                            dev: d,
                            sector: s,
                            len: l,
                        } if l >= len => {
                            dev = d;
                            sector = s;
                        }
                        _ => return None,
                    }
                }
                Slot::Empty => return None,
            }
        }
        None
    }

    /// Copies between two file leaves on one filesystem in the kernel, within this reactor turn
    /// (so no drain can interleave with it). `None` when the ends are not such files.
    fn kernel_copy(
        &self,
        src: (DevId, Sector),
        dst: (DevId, Sector),
        len: Sector,
    ) -> Option<Status> {
        let (sl, ss) = self.resolve(src.0, src.1, len)?;
        let (dl, ds) = self.resolve(dst.0, dst.1, len)?;
        let chan = |d: DevId| match self.devs.get(d.0 as usize) {
            Some(Slot::Leaf(l)) => Some(&*l.chan),
            _ => None,
        };
        chan(sl)?.kernel_copy_to(ss, chan(dl)?, ds, len)
    }

    /// Parks the piece on a `CopyEmu` frame and starts its first read (or waits for a buffer).
    fn emulate(
        &mut self,
        vol: DevId,
        id: BioId,
        dst: (usize, Sector),
        src: (usize, Sector),
        n: u32,
    ) {
        let buf = self.bufs.acquire().unwrap_or(NO_BUF);
        let ctx = CopyEmuCtx {
            src: src.1,
            dst: dst.1,
            total: n,
            buf,
            src_target: src.0 as u16,
            dst_target: dst.0 as u16,
            ..CopyEmuCtx::default()
        };
        self.pool
            .get_mut(id)
            .frames
            .push(FrameKind::CopyEmu, vol, &ctx, self.fallback);
        if buf == NO_BUF {
            self.bufs.waiting.push_back(id);
        } else {
            self.issue(id);
        }
    }

    /// Issues the current step of an emulated piece: a read of the next chunk of the source,
    /// or the write of it to the destination, each mapped by its target directly (no re-entry
    /// into the volume, whose in-flight count already holds the piece).
    fn issue(&mut self, piece: BioId) {
        let p = self.pool.get(piece);
        let h = p.frames.peek().expect("emulated piece without its frame");
        let mut ctx: CopyEmuCtx = p.frames.ctx_at(h.ctx_off);
        let (flags, user_data, root) = (p.flags, p.user_data, p.root);
        let vol = h.dev;
        if ctx.phase == 0 {
            ctx.chunk = (ctx.total - ctx.done).min(COPY_CHUNK_SECTORS);
        }
        let read = ctx.phase == 0;
        let data = self.bufs.window(ctx.buf, ctx.chunk);
        self.pool.get_mut(piece).frames.set_ctx_at(h.ctx_off, &ctx);
        let c = self
            .pool
            .alloc(false)
            .expect("clone allocation never fails");
        let cb = self.pool.get_mut(c);
        cb.op = if read { Op::Read } else { Op::Write };
        cb.flags = if read {
            BioFlags::NONE
        } else {
            BioFlags(flags.0 & BioFlags::FUA.0)
        };
        cb.dev = vol;
        cb.sector = if read { ctx.src } else { ctx.dst } + ctx.done as Sector;
        cb.sectors = ctx.chunk;
        cb.data = data;
        cb.user_data = user_data;
        cb.root = root;
        cb.parent = Some((piece, h.ctx_off));
        let ti = if read { ctx.src_target } else { ctx.dst_target };
        // The volume's table: unchanged while the piece is in flight (swaps wait for drains).
        let devs = self.devs;
        let t = match devs.get(vol.0 as usize) {
            Some(Slot::Volume(v)) => {
                &v.table.as_deref().expect("table").entries()[ti as usize].target
            }
            _ => unreachable!(),
        };
        let mut tx = Tx {
            vol,
            reactor: self.index,
            vt: vol_targets(self.targets, vol),
            tio: self.tio,
        };
        let r = map_with(&**t, ti, c, self.pool, self.fallback, &mut tx, None);
        if finish_map(
            r,
            c,
            vol,
            ti,
            self.pool,
            self.complete_q,
            self.requeue,
            self.stats,
        ) {
            self.submit_q.push_back(c);
        }
    }

    /// A step of an emulated piece finished with `status`. Returns true when the whole piece is
    /// done (its frame popped, status set): the caller completes it upward.
    pub(crate) fn emu_step_done(&mut self, piece: BioId, status: Status) -> bool {
        let p = self.pool.get_mut(piece);
        let h = p.frames.peek().expect("emulated piece without its frame");
        let mut ctx: CopyEmuCtx = p.frames.ctx_at(h.ctx_off);
        let mut finished = !status.is_ok();
        if finished {
            ctx.status = status as u8;
        } else if ctx.phase == 0 {
            ctx.phase = 1;
        } else {
            ctx.done += ctx.chunk;
            self.stats.copy_emulated_bytes += ctx.chunk as u64 * SECTOR_SIZE as u64;
            ctx.phase = 0;
            finished = ctx.done == ctx.total;
        }
        p.frames.set_ctx_at(h.ctx_off, &ctx);
        if !finished {
            self.issue(piece);
            return false;
        }
        p.frames.pop();
        let mut st = p.status;
        st.merge(Status::from_u8(ctx.status));
        p.status = st;
        // Hand the buffer to the next waiting piece, if any.
        if let Some(next) = self.bufs.waiting.pop_front() {
            let n = self.pool.get_mut(next);
            let nh = n.frames.peek().expect("waiting piece without its frame");
            let mut nctx: CopyEmuCtx = n.frames.ctx_at(nh.ctx_off);
            nctx.buf = ctx.buf;
            n.frames.set_ctx_at(nh.ctx_off, &nctx);
            self.issue(next);
        } else {
            self.bufs.free.push(ctx.buf);
        }
        true
    }
}
