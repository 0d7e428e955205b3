//! The per-reactor target slots of a volume and the one way a target's `map` (or `unparked`)
//! is called: [`map_with`], which records a parked bio as `map` got it.

use crate::bio::{BioId, BioPool, FrameFallback};
use crate::service::Doorbell;
use crate::target::cx::Parked;
pub(crate) use crate::target::cx::VolTargets;
use crate::target::{MapResult, ReactorInit, Target, TargetCx, TargetIo, TargetSlot};
use crate::DevId;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What a map call needs besides the bio: the volume's target slots and the reactor's queues.
pub(crate) struct Tx<'a> {
    pub(crate) vol: DevId,
    pub(crate) reactor: usize,
    pub(crate) vt: &'a mut VolTargets,
    pub(crate) tio: &'a mut TargetIo,
}

impl Tx<'_> {
    #[inline(always)]
    pub(crate) fn cx<'b>(
        &'b mut self,
        ti: u16,
        id: Option<BioId>,
        root: Option<BioId>,
        fallback: &'b mut FrameFallback,
    ) -> TargetCx<'b> {
        TargetCx {
            vol: self.vol,
            target: ti,
            reactor: self.reactor,
            id,
            root,
            fallback,
            vt: &mut *self.vt,
            io: self.tio,
            pushed: 0,
        }
    }
}

/// Calls `map` (or `unparked`, with `key`) and records a parked bio: frames the call pushed are
/// dropped and the sector it saw put back, so a parked bio is always as `map` got it.
#[inline(always)]
pub(crate) fn map_with(
    t: &dyn Target,
    ti: u16,
    id: BioId,
    pool: &mut BioPool,
    fallback: &mut FrameFallback,
    tx: &mut Tx<'_>,
    unpark_key: Option<u64>,
) -> MapResult {
    let bio = pool.get_mut(id);
    let sector = bio.sector;
    let root = bio.root;
    let mut cx = tx.cx(ti, Some(id), Some(root), fallback);
    let r = match unpark_key {
        None => t.map(bio, &mut cx),
        Some(k) => t.unparked(bio, &mut cx, k),
    };
    let pushed = cx.pushed;
    if let MapResult::Park { key } | MapResult::Hold { key } = r {
        for _ in 0..pushed {
            bio.frames.pop();
        }
        bio.sector = sector;
        tx.vt.slots[ti as usize].parked.push(Parked {
            id,
            key,
            pinned: matches!(r, MapResult::Hold { .. }),
        });
    }
    r
}

/// Makes the slots of a table going live on this reactor (its targets' per-reactor state).
pub(crate) fn make_slots(
    table: &crate::table::Table,
    reactor: usize,
    waker: &Arc<crate::service::Waker>,
) -> Vec<TargetSlot> {
    table
        .entries()
        .iter()
        .map(|e| {
            let bell = Doorbell::new(waker.clone());
            let init = ReactorInit {
                reactor,
                doorbell: bell.clone(),
            };
            TargetSlot {
                state: e.target.reactor_state(&init),
                parked: Vec::with_capacity(64),
                bell,
            }
        })
        .collect()
}

/// A doorbell the reactor looks at when its waker says one rang.
#[derive(Debug)]
pub(crate) struct Bell {
    pub(crate) flag: Arc<AtomicBool>,
    pub(crate) vol: DevId,
    pub(crate) target: u16,
}
