//! The request-queue path (seed 004): a request-based volume's queue lets requests out, each
//! becomes one bio that its target maps whole; a finished request completes its member bios.

use super::{finish_map, map_with, vol_targets, Parts, Slot, Tx, VolState};
use crate::bio::{FrameKind, Op};
use crate::buf::DataBuf;
use crate::rq::RqCtx;
use crate::status::Status;
use crate::DevId;

/// Dispatches what volume `vol`'s request queue lets out now: each request becomes a bio
/// of its own, which the target maps (choosing a path) like any bio. Returns how many.
pub(crate) fn dispatch(p: Parts<'_>, vol: DevId) -> usize {
    let Parts {
        pool,
        fallback,
        devs,
        submit_q,
        complete_q,
        requeue,
        stats,
        targets,
        tio,
        index,
        ..
    } = p;
    let mut tx = Tx {
        vol,
        reactor: index,
        vt: vol_targets(targets, vol),
        tio,
    };
    let Some(Slot::Volume(VolState {
        table: Some(table),
        rq: Some(q),
        ..
    })) = devs.get_mut(vol.0 as usize)
    else {
        return 0;
    };
    q.plugged = false;
    let mut n = 0;
    while let Some(p) = q.next() {
        n += 1;
        q.inflight += 1;
        stats.rq_requests += 1;
        let (data, buf) = if p.nsegs == 1 {
            (pool.get(p.head).data, crate::rq::NO_BUF)
        } else if p.op.has_data() {
            let (i, w) = q.take_buf(p.sectors);
            if p.op == Op::Write {
                let mut off = 0;
                let mut m = Some(p.head);
                while let Some(id) = m {
                    let b = pool.get(id);
                    b.data.copy_to(0, &w, off, b.data.len());
                    off += b.data.len();
                    m = b.rq_next;
                }
            }
            (w, i)
        } else {
            (DataBuf::EMPTY, crate::rq::NO_BUF)
        };
        let head = pool.get(p.head);
        let (user_data, root, map_index) = (head.user_data, head.root, head.map_index);
        let r = pool.alloc(false).expect("clone allocation never fails");
        let rb = pool.get_mut(r);
        rb.op = p.op;
        rb.flags = p.flags;
        rb.dev = vol;
        rb.sector = p.sector;
        rb.sectors = p.sectors;
        rb.copy_src = 0;
        rb.data = data;
        rb.status = Status::Ok;
        rb.map_index = map_index;
        rb.user_data = user_data;
        rb.parent = None;
        rb.root = root;
        rb.touched = 0;
        rb.rq_next = Some(p.head);
        let ctx = RqCtx {
            sector: p.sector,
            sectors: p.sectors,
            buf,
            target: p.target,
            nsegs: p.nsegs,
            _pad: [0; 4],
        };
        rb.frames.push(FrameKind::Request, vol, &ctx, fallback);
        let t = &*table.entries()[p.target as usize].target;
        let res = map_with(t, p.target, r, pool, fallback, &mut tx, None);
        if finish_map(res, r, vol, p.target, pool, complete_q, requeue, stats) {
            submit_q.push_back(r);
        }
    }
    n
}
