//! Splitting at target boundaries (seed 001: the leading pieces go as clones, the remainder
//! goes on as the original bio) and the flush plan (one empty flush per distinct device).

use super::{finish_map, map_with, ReactorStats, Requeued, Tx};
use crate::bio::{BioId, BioPool, FrameFallback, FrameKind, Op, SplitCtx};
use crate::buf::DataBuf;
use crate::rq::RequestQueue;
use crate::status::Status;
use crate::table::Table;
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
    tx: &mut Tx<'_>,
) -> bool {
    let entries = table.entries();
    let mut split_off: Option<u32> = None;

    // Pushes the split frame once per volume level, then counts one more piece.
    let mut add_piece = |pool: &mut BioPool, fallback: &mut FrameFallback| -> u32 {
        let bio = pool.get_mut(id);
        let off = *split_off.get_or_insert_with(|| {
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
    };

    if pool.get(id).op == Op::Flush {
        // An empty flush goes once to every distinct device under the table.
        let plan = table.flush_plan();
        let Some((&last, rest)) = plan.split_last() else {
            complete_q.push_back(id);
            return false;
        };
        for &(ti, k) in rest {
            let off = add_piece(pool, fallback);
            let c = pool.alloc(false).expect("clone allocation never fails");
            let (flags, user_data, root) = {
                let b = pool.get(id);
                (b.flags, b.user_data, b.root)
            };
            let cb = pool.get_mut(c);
            cb.op = Op::Flush;
            cb.flags = flags;
            cb.dev = vol;
            cb.sector = 0;
            cb.sectors = 0;
            cb.data = DataBuf::EMPTY;
            cb.user_data = user_data;
            cb.root = root;
            cb.map_index = k;
            cb.parent = Some((id, off));
            if let Some((q, unplug)) = rq.as_mut() {
                enqueue(q, unplug, vol, pool, c, ti, stats);
                continue;
            }
            let r = map_with(
                &*entries[ti as usize].target,
                ti,
                c,
                pool,
                fallback,
                tx,
                None,
            );
            if finish_map(r, c, vol, ti, pool, complete_q, requeue, stats) {
                submit_q.push_back(c);
            }
        }
        let (ti, k) = last;
        let b = pool.get_mut(id);
        b.sector = 0;
        b.map_index = k;
        if let Some((q, unplug)) = rq {
            enqueue(q, unplug, vol, pool, id, ti, stats);
            return false;
        }
        let r = map_with(
            &*entries[ti as usize].target,
            ti,
            id,
            pool,
            fallback,
            tx,
            None,
        );
        return finish_map(r, id, vol, ti, pool, complete_q, requeue, stats);
    }

    loop {
        let bio = pool.get_mut(id);
        let ti = table.find(bio.sector);
        let e = &entries[ti];
        let off = bio.sector - e.start;
        let avail = (e.len - off).min(e.target.max_io_len(off));
        if bio.sectors as Sector <= avail {
            bio.sector = off;
            if let Some((q, unplug)) = rq {
                enqueue(q, unplug, vol, pool, id, ti as u16, stats);
                return false;
            }
            let r = map_with(&*e.target, ti as u16, id, pool, fallback, tx, None);
            return finish_map(r, id, vol, ti as u16, pool, complete_q, requeue, stats);
        }
        // Cut the leading `n` sectors off as a clone pointing into the parent's data.
        let n = avail as u32;
        let frame_off = add_piece(pool, fallback);
        let c = pool.alloc(false).expect("clone allocation never fails");
        let bio = pool.get(id);
        let (op, flags, user_data, copy_src, root) =
            (bio.op, bio.flags, bio.user_data, bio.copy_src, bio.root);
        let lead = if op.has_data() {
            bio.data.slice(0, n as usize * SECTOR_SIZE)
        } else {
            DataBuf::EMPTY
        };
        {
            let cb = pool.get_mut(c);
            cb.op = op;
            cb.flags = flags;
            cb.dev = vol;
            cb.sector = off;
            cb.sectors = n;
            cb.copy_src = copy_src;
            cb.data = lead;
            cb.user_data = user_data;
            cb.root = root;
            cb.parent = Some((id, frame_off));
        }
        {
            let bio = pool.get_mut(id);
            bio.sector += n as Sector;
            bio.sectors -= n;
            bio.copy_src += n as Sector;
            if op.has_data() {
                let adv = n as usize * SECTOR_SIZE;
                bio.data = bio.data.slice(adv, bio.data.len() - adv);
                let mut ctx: SplitCtx = bio.frames.ctx_at(frame_off);
                ctx.data_advanced += adv as u64;
                bio.frames.set_ctx_at(frame_off, &ctx);
            }
        }
        stats.splits += 1;
        if let Some((q, unplug)) = rq.as_mut() {
            enqueue(q, unplug, vol, pool, c, ti as u16, stats);
            continue;
        }
        let r = map_with(&*e.target, ti as u16, c, pool, fallback, tx, None);
        if finish_map(r, c, vol, ti as u16, pool, complete_q, requeue, stats) {
            submit_q.push_back(c);
        }
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
