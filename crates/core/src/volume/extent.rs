//! Block status (NBD `base:allocation`): a range of a device walked down the tables to the
//! leaves, which say where their holes and zeros are.

use super::Slot;
use crate::{DevId, Sector};

/// Block status of `[sector, sector + sectors)` of `dev`, walked down this reactor's tables to
/// the leaves. Appends at most `max_extents` runs (merging neighbours with equal flags) and
/// returns the sectors covered, which may be less than asked: NBD allows a short answer.
pub(crate) fn block_status(
    devs: &[Slot],
    dev: DevId,
    sector: Sector,
    sectors: Sector,
    max_extents: usize,
    out: &mut Vec<crate::leaf::Extent>,
) -> Sector {
    let start = out.len();
    let mut covered = 0;
    while covered < sectors && out.len() - start < max_extents {
        let n = status_at(
            devs,
            dev,
            sector + covered,
            sectors - covered,
            0,
            out,
            start,
        );
        if n == 0 {
            break;
        }
        covered += n;
    }
    covered
}

/// One step of the walk: answers a leading part of the range; returns its length.
fn status_at(
    devs: &[Slot],
    dev: DevId,
    sector: Sector,
    sectors: Sector,
    depth: usize,
    out: &mut Vec<crate::leaf::Extent>,
    start: usize,
) -> Sector {
    use crate::leaf::Extent;
    use crate::target::TargetExtent;
    let push = |out: &mut Vec<Extent>, e: Extent| match out[start..].last_mut() {
        Some(last) if last.flags == e.flags => last.sectors += e.sectors,
        _ => out.push(e),
    };
    match devs.get(dev.0 as usize) {
        Some(Slot::Leaf(l)) => {
            let n = sectors.min(l.size.saturating_sub(sector));
            // The leaf appends in place; then its runs merge with their neighbours.
            let from = out.len();
            l.chan.extents(sector, n, out);
            let mut w = from;
            for r in from..out.len() {
                let e = out[r];
                if w > start && out[w - 1].flags == e.flags {
                    out[w - 1].sectors += e.sectors;
                } else {
                    out[w] = e;
                    w += 1;
                }
            }
            out.truncate(w);
            n
        }
        Some(Slot::Volume(v)) if depth < crate::bio::MAX_FRAMES => {
            let Some(t) = v.table.as_deref() else {
                return 0;
            };
            if sector >= t.size() {
                return 0;
            }
            let e = &t.entries()[t.find(sector)];
            let off = sector - e.start;
            let len = sectors.min(e.len - off);
            match e.target.extent(off, len) {
                TargetExtent::Dev { dev, sector, len } => {
                    status_at(devs, dev, sector, len, depth + 1, out, start)
                }
                TargetExtent::Zero { len } => {
                    push(
                        out,
                        Extent {
                            sectors: len,
                            flags: Extent::HOLE | Extent::ZERO,
                        },
                    );
                    len
                }
                TargetExtent::Data { len } => {
                    push(
                        out,
                        Extent {
                            sectors: len,
                            flags: 0,
                        },
                    );
                    len
                }
            }
        }
        _ => 0,
    }
}
