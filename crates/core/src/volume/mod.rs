//! The volume layer: what happens to a bio between entering a volume and reaching a leaf, and
//! back. Splitting at target boundaries and the flush plan (`split`), the request-queue path
//! (`rq_path`), copy routing and emulation (`copy`), block status (`extent`), pushback, and the
//! target slots that stateful targets keep per reactor (`targets`). The reactor owns the
//! queues and the pools and hands them here, borrowed apart, one step at a time ([`Parts`]);
//! nothing here imports the reactor.

mod complete;
mod copy;
mod extent;
mod rq_path;
mod split;
pub(crate) mod targets;

pub(crate) use complete::complete_frames;
pub(crate) use copy::CopyBufs;
pub use copy::COPY_CHUNK_SECTORS;
pub(crate) use extent::block_status;
pub(crate) use rq_path::dispatch;
pub(crate) use targets::{make_slots, map_with, Bell, Tx, VolTargets};

use copy::CopyCx;
use split::map_in_table;

use crate::bio::{BioId, BioPool, FrameFallback, FrameKind, Op};
use crate::leaf::{LeafChannel, LeafCx};
use crate::rq::{QueueOpts, RequestQueue};
use crate::status::Status;
use crate::table::Table;
use crate::target::{MapResult, TargetIo};
use crate::{DevId, Sector};
use std::collections::VecDeque;
use std::sync::Arc;

/// A finished top-level I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    pub status: Status,
}

/// Reactor counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReactorStats {
    pub submitted: u64,
    pub completed: u64,
    /// Top-level requests refused before a bio was allocated (bad request or no bio).
    pub refused: u64,
    /// Leading pieces cut off by splits (one clone each).
    pub splits: u64,
    /// Bios held by a suspended volume.
    pub held: u64,
    /// Bios a target requeued while their volume suspended with `noflush`: sent back up to
    /// the volume and held there for the next table (counted again in `held`).
    pub pushed_back: u64,
    /// Bios (or requests) a target put back to be mapped again: no usable path, or failover
    /// after a path error.
    pub requeued: u64,
    /// Bios and requests handed to leaves.
    pub leaf_ios: u64,
    /// Bios that entered a request queue (request-based volumes).
    pub rq_bios: u64,
    /// Requests dispatched from request queues to their target.
    pub rq_requests: u64,
    /// Bios merged into a request another bio started (back or front merges).
    pub rq_merges: u64,
    /// Copy bytes done natively by a leaf (the copy travelled down to it).
    pub copy_offloaded_bytes: u64,
    /// Copy bytes copied by the kernel between two file leaves (`copy_file_range`).
    pub copy_kernel_bytes: u64,
    /// Copy bytes emulated by a layer (read into a bounce buffer, then written).
    pub copy_emulated_bytes: u64,
    /// Child bios targets sent to their devices (their own I/O: copies, legs, metadata).
    pub child_ios: u64,
}

/// A reactor's view of one volume.
#[derive(Debug, Default)]
pub(crate) struct VolState {
    pub(crate) table: Option<Arc<Table>>,
    pub(crate) suspended: bool,
    /// Suspended with `noflush`: I/O a target requeues is pushed back to the volume's hold
    /// list instead of waiting inside the target, so the suspend drains.
    pub(crate) noflush: bool,
    pub(crate) inflight: u64,
    pub(crate) held: VecDeque<BioId>,
    /// Bios pushed back since the suspend: they go ahead of the I/O that arrived while
    /// suspended (they came first), in the order they were pushed back.
    pub(crate) pushed: usize,
    /// The request queue of a request-based table.
    pub(crate) rq: Option<RequestQueue>,
    pub(crate) rq_opts: QueueOpts,
}

pub(crate) struct LeafState {
    pub(crate) chan: Box<dyn LeafChannel>,
    pub(crate) size: Sector,
    pub(crate) lbs_sectors: u32,
    /// This leaf's bit in `Bio::touched` (0 for leaves that complete inline).
    pub(crate) poll_bit: u64,
}

pub(crate) enum Slot {
    Empty,
    Leaf(LeafState),
    Volume(VolState),
}

/// A bio waiting on a volume's requeue list to be mapped again by target `target`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Requeued {
    pub(crate) id: BioId,
    pub(crate) vol: DevId,
    pub(crate) target: u16,
    /// None: at the next round (failover); else not before this instant.
    pub(crate) due: Option<std::time::Instant>,
}

/// The reactor's parts the volume layer works with, borrowed apart for one step.
pub(crate) struct Parts<'a> {
    pub(crate) pool: &'a mut BioPool,
    pub(crate) fallback: &'a mut FrameFallback,
    pub(crate) devs: &'a mut Vec<Slot>,
    pub(crate) submit_q: &'a mut VecDeque<BioId>,
    pub(crate) complete_q: &'a mut VecDeque<BioId>,
    pub(crate) done: &'a mut VecDeque<Completion>,
    pub(crate) requeue: &'a mut VecDeque<Requeued>,
    pub(crate) unplug: &'a mut Vec<DevId>,
    pub(crate) stats: &'a mut ReactorStats,
    pub(crate) copy_bufs: &'a mut CopyBufs,
    pub(crate) targets: &'a mut Vec<VolTargets>,
    pub(crate) tio: &'a mut TargetIo,
    pub(crate) index: usize,
}

/// The target slots of volume `dev` (made empty if this reactor has none yet).
pub(crate) fn vol_targets(targets: &mut Vec<VolTargets>, dev: DevId) -> &mut VolTargets {
    let i = dev.0 as usize;
    if targets.len() <= i {
        targets.resize_with(i + 1, VolTargets::default);
    }
    &mut targets[i]
}

/// Applies a map result; true if the bio was remapped and goes on down.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_map(
    r: MapResult,
    id: BioId,
    vol: DevId,
    target: u16,
    pool: &mut BioPool,
    complete_q: &mut VecDeque<BioId>,
    requeue: &mut VecDeque<Requeued>,
    stats: &mut ReactorStats,
) -> bool {
    match r {
        MapResult::Remapped => true,
        // Recorded on the target's parked list by `map_with`.
        MapResult::Park { .. } | MapResult::Hold { .. } => false,
        MapResult::Done(s) => {
            pool.get_mut(id).status = s;
            complete_q.push_back(id);
            false
        }
        MapResult::Requeue => {
            stats.requeued += 1;
            requeue.push_back(Requeued {
                id,
                vol,
                target,
                due: Some(std::time::Instant::now() + crate::target::REQUEUE_DELAY),
            });
            false
        }
    }
}

/// Sends a requeued bio back up to its volume (a noflush suspend): its sector goes back
/// from the target's to the volume's (a target gives a bio back to requeue as `map` got
/// it), and it completes with `Pushback`, which its volume's entry frame turns into a held
/// bio.
pub(crate) fn push_back(
    devs: &[Slot],
    pool: &mut BioPool,
    complete_q: &mut VecDeque<BioId>,
    stats: &mut ReactorStats,
    r: Requeued,
) {
    stats.pushed_back += 1;
    let start = match devs.get(r.vol.0 as usize) {
        Some(Slot::Volume(VolState { table: Some(t), .. })) => t.entries()[r.target as usize].start,
        _ => 0,
    };
    let bio = pool.get_mut(r.id);
    match bio.op {
        Op::Flush => bio.sector = 0,
        Op::Copy => {
            bio.sector += start;
            bio.copy_src += start;
        }
        _ => bio.sector += start,
    }
    bio.status = Status::Ok;
    bio.pushback = true;
    complete_q.push_back(r.id);
}

/// Routes a bio down until a leaf takes it, a target keeps it, or it completes.
#[inline(always)]
pub(crate) fn route(p: Parts<'_>, id: BioId) {
    let Parts {
        pool,
        fallback,
        devs,
        submit_q,
        complete_q,
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
        let dev = pool.get(id).dev;
        match devs.get_mut(dev.0 as usize) {
            Some(Slot::Leaf(l)) => {
                let bio = pool.get(id);
                let src_end = if bio.op == Op::Copy {
                    bio.copy_src + bio.sectors as u64
                } else {
                    0
                };
                if bio.op != Op::Flush && (bio.end() > l.size || src_end > l.size) {
                    pool.get_mut(id).status = Status::OutOfRange;
                    complete_q.push_back(id);
                } else {
                    if bio.op == Op::Copy {
                        stats.copy_offloaded_bytes += bio.bytes() as u64;
                    }
                    stats.leaf_ios += 1;
                    if l.poll_bit != 0 {
                        let root = bio.root;
                        pool.get_mut(root).touched |= l.poll_bit;
                    }
                    l.chan.submit(&mut LeafCx { pool, complete_q }, id);
                }
                return;
            }
            Some(Slot::Volume(v)) => {
                if v.suspended {
                    v.held.push_back(id);
                    stats.held += 1;
                    return;
                }
                v.inflight += 1;
                let bio = pool.get_mut(id);
                bio.frames.push(FrameKind::Volume, dev, &(), fallback);
                let Some(table) = v.table.as_deref() else {
                    bio.status = Status::IoError;
                    complete_q.push_back(id);
                    return;
                };
                let src_end = if bio.op == Op::Copy {
                    bio.copy_src + bio.sectors as u64
                } else {
                    0
                };
                if bio.op != Op::Flush && (bio.end() > table.size() || src_end > table.size()) {
                    bio.status = Status::OutOfRange;
                    complete_q.push_back(id);
                    return;
                }
                if bio.op == Op::Copy {
                    // Copies may look further down the stack (kernel copies between files).
                    let Some(Slot::Volume(v)) = devs.get(dev.0 as usize) else {
                        unreachable!()
                    };
                    let table = v.table.as_deref().expect("checked above");
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
                    if !cx.map_copy(table, dev, id) {
                        return;
                    }
                    continue;
                }
                let Some(Slot::Volume(v)) = devs.get_mut(dev.0 as usize) else {
                    unreachable!()
                };
                let table = v.table.as_deref().expect("checked above");
                let rq = v.rq.as_mut().map(|q| (q, &mut *unplug));
                if !map_in_table(
                    table, dev, id, pool, fallback, submit_q, complete_q, requeue, stats, rq,
                    targets, tio, index,
                ) {
                    return;
                }
            }
            _ => {
                pool.get_mut(id).status = Status::Shutdown;
                complete_q.push_back(id);
                return;
            }
        }
    }
}

/// Maps `id` again through target `ti` of volume `vol`: a requeued bio (`unpark_key` None) or
/// an unparked one (its key). A volume with no table any more completes it with `Shutdown`.
pub(crate) fn remap_at(p: Parts<'_>, vol: DevId, ti: u16, id: BioId, unpark_key: Option<u64>) {
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
    let table = match devs.get(vol.0 as usize) {
        Some(Slot::Volume(v)) => v.table.as_deref(),
        _ => None,
    };
    let Some(table) = table else {
        pool.get_mut(id).status = Status::Shutdown;
        complete_q.push_back(id);
        return;
    };
    let mut tx = Tx {
        vol,
        reactor: index,
        vt: vol_targets(targets, vol),
        tio,
    };
    let t = &*table.entries()[ti as usize].target;
    let r = map_with(t, ti, id, pool, fallback, &mut tx, unpark_key);
    if finish_map(r, id, vol, ti, pool, complete_q, requeue, stats) {
        submit_q.push_back(id);
    }
}
