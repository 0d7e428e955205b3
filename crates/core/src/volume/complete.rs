//! The completion step: pops a finished bio's frames one by one and does what each frame's
//! kind asks (volume entry, split, target `end_io`, request, child), until a layer keeps the
//! bio, a split waits for its other pieces, or the top-level I/O is done.

use super::copy::{is_copy_emu, CopyCx};
use super::split::restore;
use super::{vol_targets, Completion, Parts, Requeued, Slot, Tx, VolState};
use crate::bio::{BioId, FrameKind, Op, SplitCtx};
use crate::rq::RqCtx;
use crate::status::Status;
use crate::target::Endio;
use crate::DevId;

/// `run_complete`'s frame walk. Returns a child bio whose bottom frame was reached: the
/// caller hands it to `child_complete`, which needs the whole reactor.
pub(crate) fn complete_frames(p: Parts<'_>, mut id: BioId) -> Option<(BioId, DevId, u16)> {
    let Parts {
        pool,
        fallback,
        devs,
        submit_q,
        complete_q,
        done,
        requeue,
        unplug,
        stats,
        copy_bufs,
        targets,
        tio,
        index,
        ..
    } = p;
    loop {
        let bio = pool.get_mut(id);
        match bio.frames.peek() {
            Some(h) => match h.kind {
                FrameKind::Volume => {
                    bio.frames.pop();
                    let Some(Slot::Volume(v)) = devs.get_mut(h.dev.0 as usize) else {
                        continue;
                    };
                    v.inflight -= 1;
                    if std::mem::take(&mut bio.pushback) {
                        // Back as it entered (`push_back` and split restores made its
                        // sector the volume's again): held for the next table, or
                        // (resumed meanwhile) mapped again at once.
                        bio.status = Status::Ok;
                        bio.dev = h.dev;
                        if v.suspended {
                            let at = v.pushed.min(v.held.len());
                            v.held.insert(at, id);
                            v.pushed += 1;
                            stats.held += 1;
                        } else {
                            submit_q.push_back(id);
                        }
                        return None;
                    }
                }
                FrameKind::Split => {
                    let mut ctx: SplitCtx = bio.frames.ctx_at(h.ctx_off);
                    ctx.merge(bio.status, bio.pushback);
                    ctx.pending -= 1;
                    if ctx.pending > 0 {
                        // Park: the last clone to finish resumes the parent.
                        bio.frames.set_ctx_at(h.ctx_off, &ctx);
                        return None;
                    }
                    bio.frames.pop();
                    restore(pool, id, &ctx, h.dev);
                }
                FrameKind::Target { target } => {
                    bio.frames.pop();
                    let Some(Slot::Volume(v)) = devs.get(h.dev.0 as usize) else {
                        unreachable!("target frame of a volume that is gone")
                    };
                    let table = v.table.as_deref().expect("target frame without a table");
                    let t = &table.entries()[target as usize].target;
                    let root = bio.root;
                    let mut tx = Tx {
                        vol: h.dev,
                        reactor: index,
                        vt: vol_targets(targets, h.dev),
                        tio,
                    };
                    let mut cx = tx.cx(target, Some(id), Some(root), fallback);
                    let r = t.end_io(bio, &mut cx);
                    match r {
                        Endio::Done => {}
                        Endio::Park { key } | Endio::Hold { key } => {
                            // Parked as `map` saw it: the target put the sector back.
                            bio.dev = h.dev;
                            tx.vt.slots[target as usize]
                                .parked
                                .push(crate::target::cx::Parked {
                                    id,
                                    key,
                                    pinned: matches!(r, Endio::Hold { .. }),
                                });
                            return None;
                        }
                        Endio::Requeue => {
                            // Failover: map again through the same target at once.
                            bio.dev = h.dev;
                            bio.status = Status::Ok;
                            stats.requeued += 1;
                            requeue.push_back(Requeued {
                                id,
                                vol: h.dev,
                                target,
                                due: None,
                            });
                            return None;
                        }
                    }
                }
                FrameKind::Child { target } => return Some((id, h.dev, target)),
                FrameKind::CopyEmu => {
                    unreachable!("a parked copy piece completes through its steps, not its queue")
                }
                FrameKind::Request => {
                    // The request is done: its members complete with its status, reads
                    // copied out of the bounce buffer they shared.
                    let ctx: RqCtx = bio.frames.ctx_at(h.ctx_off);
                    bio.frames.pop();
                    let (status, op, pushback) = (bio.status, bio.op, bio.pushback);
                    let mut m = bio.rq_next.take();
                    pool.free(id, fallback);
                    let Some(Slot::Volume(VolState {
                        rq: Some(q), table, ..
                    })) = devs.get_mut(h.dev.0 as usize)
                    else {
                        unreachable!("request of a volume without a request queue")
                    };
                    let window =
                        (ctx.buf != crate::rq::NO_BUF).then(|| q.buf_window(ctx.buf, ctx.sectors));
                    // Members were queued target-relative; pushed back, they go up to the
                    // volume, which maps them again from its own sectors.
                    let start = match (pushback, table.as_deref()) {
                        (true, Some(t)) => t.entries()[ctx.target as usize].start,
                        _ => 0,
                    };
                    let mut off = 0;
                    while let Some(mid) = m {
                        let mb = pool.get_mut(mid);
                        if let (Some(w), Op::Read, true) = (&window, op, status.is_ok()) {
                            w.copy_to(off, &mb.data, 0, mb.data.len());
                        }
                        off += mb.data.len();
                        mb.status = status;
                        mb.pushback = pushback;
                        if start > 0 && mb.op != Op::Flush {
                            mb.sector += start;
                        }
                        m = mb.rq_next.take();
                        complete_q.push_back(mid);
                    }
                    if ctx.buf != crate::rq::NO_BUF {
                        q.put_buf(ctx.buf);
                    }
                    q.inflight -= 1;
                    if !q.plugged && !q.is_empty() {
                        q.plugged = true;
                        unplug.push(h.dev);
                    }
                    return None;
                }
            },
            None => match bio
                .parent
                .map(|(p, off)| (p, off, is_copy_emu(pool, p, off)))
            {
                Some((parent, _, true)) => {
                    let child = pool.get(id);
                    // A step pushed back ends the piece; the piece goes back up whole.
                    let status = if child.pushback {
                        pool.get_mut(parent).pushback = true;
                        Status::IoError
                    } else {
                        child.status
                    };
                    pool.free(id, fallback);
                    let mut cx = CopyCx {
                        devs,
                        pool,
                        fallback,
                        submit_q,
                        complete_q,
                        requeue,
                        stats,
                        bufs: copy_bufs,
                        targets,
                        tio,
                        index,
                    };
                    if !cx.emu_step_done(parent, status) {
                        return None;
                    }
                    // The piece is done: complete it upward.
                    id = parent;
                }
                Some((parent, off, false)) => {
                    let (status, pushback) = (pool.get(id).status, pool.get(id).pushback);
                    pool.free(id, fallback);
                    let p = pool.get_mut(parent);
                    let mut ctx: SplitCtx = p.frames.ctx_at(off);
                    ctx.merge(status, pushback);
                    ctx.pending -= 1;
                    if ctx.pending > 0 {
                        p.frames.set_ctx_at(off, &ctx);
                        return None;
                    }
                    // The parent is parked on that split frame: finish it.
                    let h = p
                        .frames
                        .pop()
                        .expect("parked parent without its split frame");
                    debug_assert!(h.kind == FrameKind::Split && h.ctx_off == off);
                    restore(pool, parent, &ctx, h.dev);
                    id = parent;
                }
                None => {
                    let bio = pool.get(id);
                    debug_assert!(
                        !bio.pushback,
                        "a pushback always stops at its volume's entry frame"
                    );
                    let status = if bio.pushback {
                        Status::IoError
                    } else {
                        bio.status
                    };
                    done.push_back(Completion {
                        user_data: bio.user_data,
                        status,
                    });
                    pool.free(id, fallback);
                    stats.completed += 1;
                    return None;
                }
            },
        }
    }
}
