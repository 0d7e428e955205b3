//! Splitting at target boundaries (seed 001: the leading pieces go as clones, the remainder
//! goes on as the original bio) and the flush plan (one empty flush per distinct device).

use super::{finish_map, map_with, vol_targets, ReactorStats, Requeued, Tx, VolTargets};
use crate::bio::{BioId, BioPool, FrameFallback, FrameKind, Op, SplitCtx};
use crate::buf::DataBuf;
use crate::rq::RequestQueue;
use crate::status::Status;
use crate::table::Table;
use crate::target::TargetIo;
use crate::{DevId, Sector, SECTOR_SIZE};
use std::collections::VecDeque;

/// Puts a split parent back as it was at the split, with the merged status.
pub(crate) fn restore(pool: &mut BioPool, id: BioId, ctx: &SplitCtx, vol: DevId) {
    let bio = pool.get_mut(id);
    bio.dev = vol;
    bio.sector = ctx.sector;
    bio.sectors = ctx.sectors;
    bio.copy_src = ctx.copy_src;
    if ctx.data_advanced > 0 {
        bio.data = bio.data.unadvance(ctx.data_advanced as usize);
    }
    bio.status = Status::from_u8(ctx.status);
    bio.pushback = ctx.pushback != 0;
}

/// Maps a bio that entered volume `vol` with `table`. Leading pieces that cross a target
/// boundary (or a target's own boundary) are cut off as clones and mapped at once; the remainder
/// goes on as the original bio (seed 001). Returns true if the original was remapped and should
/// keep descending.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn map_in_table(
    table: &Table,
    vol: DevId,
    id: BioId,
    pool: &mut BioPool,
    fallback: &mut FrameFallback,
    submit_q: &mut VecDeque<BioId>,
    complete_q: &mut VecDeque<BioId>,
    requeue: &mut VecDeque<Requeued>,
    stats: &mut ReactorStats,
    mut rq: Option<(&mut RequestQueue, &mut Vec<DevId>)>,
    targets: &mut Vec<VolTargets>,
    tio: &mut TargetIo,
    index: usize,
) -> bool {
    // The common case first: a bio within one target goes to it as it is, with nothing to
    // set up (a split or a flush builds a `Splitter`).
    let bio = pool.get_mut(id);
    if bio.op != Op::Flush {
        let ti = table.find(bio.sector);
        let e = &table.entries()[ti];
        let off = bio.sector - e.start;
        if bio.sectors as Sector <= (e.len - off).min(e.target.max_io_len(off)) {
            if let Some((q, unplug)) = rq.as_mut() {
                bio.sector = off;
                enqueue(q, unplug, vol, pool, id, ti as u16, stats);
                return false;
            }
            if let Some((dev, offset)) = e.fast {
                // A pure remap (linear): no call, no context.
                bio.dev = dev;
                bio.sector = off + offset;
                return true;
            }
            bio.sector = off;
            let mut tx = Tx {
                vol,
                reactor: index,
                vt: vol_targets(targets, vol),
                tio,
            };
            let r = map_with(&*e.target, ti as u16, id, pool, fallback, &mut tx, None);
            return finish_map(r, id, vol, ti as u16, pool, complete_q, requeue, stats);
        }
    }
    let mut tx = Tx {
        vol,
        reactor: index,
        vt: vol_targets(targets, vol),
        tio,
    };
    let mut s = Splitter {
        table,
        vol,
        id,
        pool,
        fallback,
        submit_q,
        complete_q,
        requeue,
        stats,
        rq,
        tx: &mut tx,
        split_off: None,
    };
    if s.pool.get(id).op == Op::Flush {
        s.flush()
    } else {
        s.split()
    }
}

/// One bio being mapped through one table: the parts it touches and its split frame, if any.
struct Splitter<'a, 'b> {
    table: &'a Table,
    vol: DevId,
    id: BioId,
    pool: &'a mut BioPool,
    fallback: &'a mut FrameFallback,
    submit_q: &'a mut VecDeque<BioId>,
    complete_q: &'a mut VecDeque<BioId>,
    requeue: &'a mut VecDeque<Requeued>,
    stats: &'a mut ReactorStats,
    rq: Option<(&'a mut RequestQueue, &'a mut Vec<DevId>)>,
    tx: &'a mut Tx<'b>,
    /// The split frame pushed on the original bio (once per volume level).
    split_off: Option<u32>,
}

impl Splitter<'_, '_> {
    /// Counts one more piece on the original's split frame (pushed the first time).
    fn add_piece(&mut self) -> u32 {
        let bio = self.pool.get_mut(self.id);
        let (vol, fallback) = (self.vol, &mut *self.fallback);
        let off = *self.split_off.get_or_insert_with(|| {
            let ctx = SplitCtx {
                sector: bio.sector,
                copy_src: bio.copy_src,
                sectors: bio.sectors,
                pending: 1,
                ..SplitCtx::default()
            };
            bio.frames.push(FrameKind::Split, vol, &ctx, fallback)
        });
        let mut ctx: SplitCtx = bio.frames.ctx_at(off);
        ctx.pending += 1;
        bio.frames.set_ctx_at(off, &ctx);
        off
    }

    /// Hands bio `b` (target-relative) to target `ti`: onto the request queue of a
    /// request-based volume, else through `map`. True if it was remapped and goes on down.
    #[inline(always)]
    fn send(&mut self, b: BioId, ti: u16) -> bool {
        if let Some((q, unplug)) = self.rq.as_mut() {
            enqueue(q, unplug, self.vol, self.pool, b, ti, self.stats);
            return false;
        }
        let t = &*self.table.entries()[ti as usize].target;
        let r = map_with(t, ti, b, self.pool, self.fallback, self.tx, None);
        finish_map(
            r,
            b,
            self.vol,
            ti,
            self.pool,
            self.complete_q,
            self.requeue,
            self.stats,
        )
    }

    /// Sends a clone down (queued for the next submit step) if `send` remapped it.
    fn send_clone(&mut self, c: BioId, ti: u16) {
        if self.send(c, ti) {
            self.submit_q.push_back(c);
        }
    }

    /// An empty flush goes once to every distinct device under the table: clones for all but
    /// the last, the original for the last.
    fn flush(&mut self) -> bool {
        let plan = self.table.flush_plan();
        let Some((&(last_ti, last_k), rest)) = plan.split_last() else {
            self.complete_q.push_back(self.id);
            return false;
        };
        for &(ti, k) in rest {
            let off = self.add_piece();
            let c = self.clone_of(off, 0, 0, DataBuf::EMPTY);
            let cb = self.pool.get_mut(c);
            cb.op = Op::Flush;
            cb.map_index = k;
            self.send_clone(c, ti);
        }
        let b = self.pool.get_mut(self.id);
        b.sector = 0;
        b.map_index = last_k;
        self.send(self.id, last_ti)
    }

    /// A clone of the original (same op, flags, owner), pointing at `data`, for `sectors` at
    /// `sector` (target-relative), child of the split frame at `off`.
    fn clone_of(&mut self, off: u32, sector: Sector, sectors: u32, data: DataBuf) -> BioId {
        let c = self
            .pool
            .alloc(false)
            .expect("clone allocation never fails");
        let bio = self.pool.get(self.id);
        let (op, flags, user_data, copy_src, root) =
            (bio.op, bio.flags, bio.user_data, bio.copy_src, bio.root);
        let cb = self.pool.get_mut(c);
        cb.op = op;
        cb.flags = flags;
        cb.dev = self.vol;
        cb.sector = sector;
        cb.sectors = sectors;
        cb.copy_src = copy_src;
        cb.data = data;
        cb.user_data = user_data;
        cb.root = root;
        cb.parent = Some((self.id, off));
        c
    }

    /// Cuts leading pieces off at every boundary until the rest fits one target, which the
    /// original then goes to.
    #[inline(always)]
    fn split(&mut self) -> bool {
        let entries = self.table.entries();
        loop {
            let bio = self.pool.get_mut(self.id);
            let ti = self.table.find(bio.sector);
            let e = &entries[ti];
            let off = bio.sector - e.start;
            let avail = (e.len - off).min(e.target.max_io_len(off));
            if bio.sectors as Sector <= avail {
                bio.sector = off;
                return self.send(self.id, ti as u16);
            }
            let c = self.cut(avail as u32, off);
            self.stats.splits += 1;
            self.send_clone(c, ti as u16);
        }
    }

    /// Cuts the leading `n` sectors off the original as a clone pointing into its data (at
    /// target-relative `off`); the original advances past them.
    fn cut(&mut self, n: u32, off: Sector) -> BioId {
        let frame_off = self.add_piece();
        let bio = self.pool.get(self.id);
        let has_data = bio.op.has_data();
        let lead = if has_data {
            bio.data.slice(0, n as usize * SECTOR_SIZE)
        } else {
            DataBuf::EMPTY
        };
        let c = self.clone_of(frame_off, off, n, lead);
        let bio = self.pool.get_mut(self.id);
        bio.sector += n as Sector;
        bio.sectors -= n;
        bio.copy_src += n as Sector;
        if has_data {
            let adv = n as usize * SECTOR_SIZE;
            bio.data = bio.data.slice(adv, bio.data.len() - adv);
            let mut ctx: SplitCtx = bio.frames.ctx_at(frame_off);
            ctx.data_advanced += adv as u64;
            bio.frames.set_ctx_at(frame_off, &ctx);
        }
        c
    }
}

/// Puts a bio (target-relative, split at target boundaries) on a request queue, and the
/// volume on the unplug list.
pub(crate) fn enqueue(
    q: &mut RequestQueue,
    unplug: &mut Vec<DevId>,
    vol: DevId,
    pool: &mut BioPool,
    id: BioId,
    target: u16,
    stats: &mut ReactorStats,
) {
    stats.rq_bios += 1;
    if q.add(pool, id, target) {
        stats.rq_merges += 1;
    }
    if !q.plugged {
        q.plugged = true;
        unplug.push(vol);
    }
}
