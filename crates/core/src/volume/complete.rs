//! The completion step: pops a finished bio's frames one by one and does what each frame's
//! kind asks (volume entry, split, target `end_io`, request, child), until a layer keeps the
//! bio, a split waits for its other pieces, or the top-level I/O is done.

use super::copy::{is_copy_emu, CopyCx};
use super::split::restore;
use super::{vol_targets, Completion, Parts, Requeued, Slot, Tx, VolState};
use crate::bio::{BioId, FrameHdr, FrameKind, Op, SplitCtx};
use crate::rq::RqCtx;
use crate::status::Status;
use crate::target::cx::Parked;
use crate::target::Endio;
use crate::DevId;

/// What one step of the walk left to do.
enum Step {
    /// Look at the same bio's next frame.
    Next,
    /// Someone keeps the bio (held, parked, waiting for pieces) or it is done.
    Stop,
    /// Go on with this bio: a parent whose last piece this was.
    Up(BioId),
    /// A child bio reached its bottom frame: its target's `child_done` runs next.
    Child(DevId, u16),
}

/// Pops `id`'s frames, dispatching on each frame's kind. Returns a child bio whose bottom
/// frame was reached: the caller hands it to `child_complete`, which needs the whole reactor.
#[inline(always)]
pub(crate) fn complete_frames(mut p: Parts<'_>, mut id: BioId) -> Option<(BioId, DevId, u16)> {
    loop {
        let step = match p.pool.get(id).frames.peek() {
            Some(h) => match h.kind {
                FrameKind::Volume => volume_entry(&mut p, id, h),
                FrameKind::Split => split_remainder(&mut p, id, h),
                FrameKind::Target { target } => target_end_io(&mut p, id, h, target),
                FrameKind::Child { target } => Step::Child(h.dev, target),
                FrameKind::CopyEmu => {
                    unreachable!("a parked copy piece completes through its steps, not its queue")
                }
                FrameKind::Request => request_done(&mut p, id, h),
            },
            None => no_frame_left(&mut p, id),
        };
        match step {
            Step::Next => {}
            Step::Stop => return None,
            Step::Up(parent) => id = parent,
            Step::Child(vol, target) => return Some((id, vol, target)),
        }
    }
}

/// Leaving a volume: it counts one bio less in flight. A pushed-back bio stops here, held for
/// the next table (or mapped again at once if the volume resumed meanwhile).
#[inline(always)]
fn volume_entry(p: &mut Parts<'_>, id: BioId, h: FrameHdr) -> Step {
    let bio = p.pool.get_mut(id);
    bio.frames.pop();
    let Some(Slot::Volume(v)) = p.devs.get_mut(h.dev.0 as usize) else {
        return Step::Next;
    };
    v.inflight -= 1;
    if !std::mem::take(&mut bio.pushback) {
        return Step::Next;
    }
    // Back as it entered (`push_back` and split restores made its sector the volume's again).
    bio.status = Status::Ok;
    bio.dev = h.dev;
    if v.suspended {
        let at = v.pushed.min(v.held.len());
        v.held.insert(at, id);
        v.pushed += 1;
        p.stats.held += 1;
    } else {
        p.submit_q.push_back(id);
    }
    Step::Stop
}

/// The remainder of a split bio finished: it waits for its clones, or the last one back
/// restores it as it was at the split.
#[inline(always)]
fn split_remainder(p: &mut Parts<'_>, id: BioId, h: FrameHdr) -> Step {
    let bio = p.pool.get_mut(id);
    let mut ctx: SplitCtx = bio.frames.ctx_at(h.ctx_off);
    ctx.merge(bio.status, bio.pushback);
    ctx.pending -= 1;
    if ctx.pending > 0 {
        // Park: the last clone to finish resumes the parent.
        bio.frames.set_ctx_at(h.ctx_off, &ctx);
        return Step::Stop;
    }
    bio.frames.pop();
    restore(p.pool, id, &ctx, h.dev);
    Step::Next
}

/// A target's frame: its `end_io` decides (go on, park, fail over).
fn target_end_io(p: &mut Parts<'_>, id: BioId, h: FrameHdr, target: u16) -> Step {
    let Some(Slot::Volume(v)) = p.devs.get(h.dev.0 as usize) else {
        unreachable!("target frame of a volume that is gone")
    };
    let table = v.table.as_deref().expect("target frame without a table");
    let t = &table.entries()[target as usize].target;
    let bio = p.pool.get_mut(id);
    bio.frames.pop();
    let root = bio.root;
    let mut tx = Tx {
        vol: h.dev,
        reactor: p.index,
        vt: vol_targets(p.targets, h.dev),
        tio: p.tio,
    };
    let mut cx = tx.cx(target, Some(id), Some(root), p.fallback);
    let r = t.end_io(bio, &mut cx);
    match r {
        Endio::Done => Step::Next,
        Endio::Park { key } | Endio::Hold { key } => {
            // Parked as `map` saw it: the target put the sector back.
            bio.dev = h.dev;
            tx.vt.slots[target as usize].parked.push(Parked {
                id,
                key,
                pinned: matches!(r, Endio::Hold { .. }),
            });
            Step::Stop
        }
        Endio::Requeue => {
            // Failover: map again through the same target at once.
            bio.dev = h.dev;
            bio.status = Status::Ok;
            p.stats.requeued += 1;
            p.requeue.push_back(Requeued {
                id,
                vol: h.dev,
                target,
                due: None,
            });
            Step::Stop
        }
    }
}

/// A request is done: its members complete with its status, reads copied out of the bounce
/// buffer they shared; pushed back, they go up to the volume from their own sectors.
fn request_done(p: &mut Parts<'_>, id: BioId, h: FrameHdr) -> Step {
    let bio = p.pool.get_mut(id);
    let ctx: RqCtx = bio.frames.ctx_at(h.ctx_off);
    bio.frames.pop();
    let (status, op, pushback) = (bio.status, bio.op, bio.pushback);
    let mut m = bio.rq_next.take();
    p.pool.free(id, p.fallback);
    let Some(Slot::Volume(VolState {
        rq: Some(q), table, ..
    })) = p.devs.get_mut(h.dev.0 as usize)
    else {
        unreachable!("request of a volume without a request queue")
    };
    let window = (ctx.buf != crate::rq::NO_BUF).then(|| q.buf_window(ctx.buf, ctx.sectors));
    let start = match (pushback, table.as_deref()) {
        (true, Some(t)) => t.entries()[ctx.target as usize].start,
        _ => 0,
    };
    let mut off = 0;
    while let Some(mid) = m {
        let mb = p.pool.get_mut(mid);
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
        p.complete_q.push_back(mid);
    }
    if ctx.buf != crate::rq::NO_BUF {
        q.put_buf(ctx.buf);
    }
    q.inflight -= 1;
    if !q.plugged && !q.is_empty() {
        q.plugged = true;
        p.unplug.push(h.dev);
    }
    Step::Stop
}

/// No frame left: a clone (a split piece, a copy emulation step) reports to its parent, or a
/// top-level I/O is done.
#[inline(always)]
fn no_frame_left(p: &mut Parts<'_>, id: BioId) -> Step {
    let parent = p.pool.get(id).parent;
    match parent.map(|(par, off)| (par, off, is_copy_emu(p.pool, par, off))) {
        Some((parent, _, true)) => copy_step_done(p, id, parent),
        Some((parent, off, false)) => clone_done(p, id, parent, off),
        None => top_level_done(p, id),
    }
}

/// One step (read or write) of an emulated copy piece finished.
fn copy_step_done(p: &mut Parts<'_>, id: BioId, parent: BioId) -> Step {
    let child = p.pool.get(id);
    // A step pushed back ends the piece; the piece goes back up whole.
    let status = if child.pushback {
        p.pool.get_mut(parent).pushback = true;
        Status::IoError
    } else {
        child.status
    };
    p.pool.free(id, p.fallback);
    let mut cx = CopyCx {
        devs: p.devs,
        pool: p.pool,
        fallback: p.fallback,
        submit_q: p.submit_q,
        complete_q: p.complete_q,
        requeue: p.requeue,
        stats: p.stats,
        bufs: p.copy_bufs,
        targets: p.targets,
        tio: p.tio,
        index: p.index,
    };
    if cx.emu_step_done(parent, status) {
        // The piece is done: complete it upward.
        Step::Up(parent)
    } else {
        Step::Stop
    }
}

/// A split clone finished: its parent waits for the others, or (the last) finishes.
#[inline(always)]
fn clone_done(p: &mut Parts<'_>, id: BioId, parent: BioId, off: u32) -> Step {
    let (status, pushback) = (p.pool.get(id).status, p.pool.get(id).pushback);
    p.pool.free(id, p.fallback);
    let par = p.pool.get_mut(parent);
    let mut ctx: SplitCtx = par.frames.ctx_at(off);
    ctx.merge(status, pushback);
    ctx.pending -= 1;
    if ctx.pending > 0 {
        par.frames.set_ctx_at(off, &ctx);
        return Step::Stop;
    }
    // The parent is parked on that split frame: finish it.
    let h = par
        .frames
        .pop()
        .expect("parked parent without its split frame");
    debug_assert!(h.kind == FrameKind::Split && h.ctx_off == off);
    restore(p.pool, parent, &ctx, h.dev);
    Step::Up(parent)
}

/// A top-level I/O is done: its completion goes to the submitter's queue.
#[inline(always)]
fn top_level_done(p: &mut Parts<'_>, id: BioId) -> Step {
    let bio = p.pool.get(id);
    debug_assert!(
        !bio.pushback,
        "a pushback always stops at its volume's entry frame"
    );
    let status = if bio.pushback {
        Status::IoError
    } else {
        bio.status
    };
    p.done.push_back(Completion {
        user_data: bio.user_data,
        status,
    });
    p.pool.free(id, p.fallback);
    p.stats.completed += 1;
    Step::Stop
}
