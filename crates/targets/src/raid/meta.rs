//! Metadata I/O on the data path: loading every leg's superblock and bitmap at start, and the
//! metadata batch that writes them back (bits being set, bits being cleared, failed legs).
//!
//! One batch runs at a time, on whichever reactor holds `Shared::meta_token`; it writes the
//! whole metadata area of each live leg (superblock at 0, bitmap at 4 KiB) with FUA, so the
//! last completed batch always holds the latest state and two batches never race on a sector.
//! A batch that clears bits first flushes every leg's data device, so a cleared bit never
//! covers data that is still in a volatile cache. All of it runs in reactor callbacks, through
//! child bios and pooled bounce buffers: no lock, no allocation once warm.

use super::bitmap::{self, BitmapSuper, BITMAP_OFFSET};
use super::state::{action, bit, leg, load};
use super::superblock::{Superblock, FEATURE_V190, LEVEL_RAID1, SB_BYTES};
use super::{key, Raid, Rx, T_LOAD, T_META, T_META_FLUSH};
use stackbd_core::{BioFlags, ChildIo, DataBuf, Op, Status, TargetCx};
use std::sync::atomic::Ordering::SeqCst;

/// A metadata batch in progress on this reactor (the token holder).
#[derive(Debug, Default)]
pub(crate) struct MetaCtx {
    pub active: bool,
    /// 0: flushing data devices; 1: writing the metadata.
    pub phase: u8,
    pub pending: u32,
    /// `fail_gen` this batch's superblocks cover.
    pub gen: u64,
    pub clearing: bool,
    /// Bounce id per leg (u32::MAX: none).
    pub bufs: Vec<u32>,
}

/// The start-up read of every leg's metadata, on the reactor that won the load.
#[derive(Debug, Default)]
pub(crate) struct LoadCtx {
    pub pending: u32,
    pub bufs: Vec<u32>,
    pub ok: u64,
    /// Failed reads retried so far (all legs together).
    pub retries: u32,
}

/// Retries of failed metadata reads at load, 100 ms apart.
const LOAD_RETRIES: u32 = 20;

impl Raid {
    /// The superblock leg `i` gets in the next batch.
    fn superblock_for(&self, i: usize, events: u64) -> Superblock {
        let s = &*self.shared;
        let mut sb = Superblock {
            compat_features: FEATURE_V190,
            num_devices: s.legs.len() as u32,
            array_position: i as u32,
            events,
            disk_recovery_offset: u64::MAX,
            array_resync_offset: u64::MAX,
            level: LEVEL_RAID1,
            stripe_sectors: self.args.chunk_size,
            array_sectors: s.len,
            sectors: s.len,
            ..Superblock::default()
        };
        for (j, l) in s.legs.iter().enumerate() {
            let st = l.state.load(SeqCst);
            if l.data.is_none() || st == leg::FAILED {
                sb.set_failed(j as u32, true);
            }
            if j == i && st != leg::IN_SYNC {
                sb.disk_recovery_offset = 0;
            }
        }
        if s.regions_needing() > 0 {
            sb.array_resync_offset = s.cursor.load(SeqCst) << s.region_shift;
        }
        sb
    }

    /// The bitmap superblock for the next batch.
    pub(crate) fn bitmap_super(&self, events: u64) -> BitmapSuper {
        BitmapSuper {
            version: bitmap::BITMAP_VERSION,
            events,
            events_cleared: self.shared.events_cleared.load(SeqCst).min(events),
            sync_size: self.shared.len,
            chunksize: (self.shared.region_sectors() * 512) as u32,
            daemon_sleep: (self.args.daemon_sleep() / 1000).max(1),
            write_behind: self.args.max_write_behind.unwrap_or(0),
            sectors_reserved: (self.bm_bytes / 512) as u32,
            ..BitmapSuper::default()
        }
    }

    /// Fills a metadata area (`area_bytes`) for leg `i`.
    fn fill_area(&self, buf: &DataBuf, i: usize, events: u64) {
        let mut sbb = [0u8; SB_BYTES];
        let _ = self.superblock_for(i, events).encode(&mut sbb);
        buf.fill_zero();
        buf.write_from(0, &sbb);
        let mut hdr = [0u8; bitmap::BITMAP_SB_BYTES];
        let _ = self.bitmap_super(events).encode(&mut hdr);
        let base = BITMAP_OFFSET as usize;
        buf.write_from(base, &hdr);
        // Bits, a byte at a time.
        let s = &*self.shared;
        let mut r = 0usize;
        let n = s.regions as usize;
        while r < n {
            let mut byte = 0u8;
            for b in 0..8 {
                if r + b < n && s.bit_on_disk(r + b) {
                    byte |= 1 << b;
                }
            }
            buf.write_from(base + bitmap::BITMAP_SB_BYTES + r / 8, &[byte]);
            r += 8;
        }
    }

    /// Starts a metadata batch here if there is work and nobody else runs one. Reactor thread.
    pub(crate) fn try_meta(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        if s.load.load(SeqCst) != load::READY {
            return;
        }
        if !s.meta_pending() {
            return;
        }
        if s.meta_token
            .compare_exchange(false, true, SeqCst, SeqCst)
            .is_ok()
        {
            self.start_meta(cx);
        }
    }

    /// Token held: flush data (when clearing) or write the metadata.
    fn start_meta(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        let clearing = s.clear_pending.swap(false, SeqCst);
        if clearing {
            // These are the regions this batch clears; the flush below covers their data.
            for b in s.bits.iter() {
                let _ = b.compare_exchange(bit::CLEARING, bit::CLEAR_FLUSHING, SeqCst, SeqCst);
            }
        }
        let mask = s.write_mask();
        {
            let rx = cx.state::<Rx>();
            rx.meta.active = true;
            rx.meta.clearing = clearing;
            rx.meta.pending = 0;
        }
        if clearing {
            let mut n = 0;
            for (i, l) in s.legs.iter().enumerate() {
                let (Some(d), true) = (&l.data, mask & (1 << i) != 0) else {
                    continue;
                };
                cx.submit_child(ChildIo {
                    op: Op::Flush,
                    flags: BioFlags::NONE,
                    dev: d.id,
                    sector: 0,
                    sectors: 0,
                    copy_src: 0,
                    data: DataBuf::EMPTY,
                    tag: key(T_META_FLUSH, i as u64),
                });
                n += 1;
            }
            let rx = cx.state::<Rx>();
            rx.meta.phase = 0;
            rx.meta.pending = n;
            if n > 0 {
                return;
            }
        }
        self.write_meta(cx);
    }

    /// Phase 1: bits WANT -> WRITING, then one FUA write of the whole area per live leg.
    fn write_meta(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        let gen = s.fail_gen.load(SeqCst);
        s.sb_dirty.store(false, SeqCst);
        for b in s.bits.iter() {
            if b.compare_exchange(bit::WANT, bit::WRITING, SeqCst, SeqCst)
                .is_ok()
            {
                s.want.fetch_sub(1, SeqCst);
            }
        }
        if cx.state::<Rx>().meta.clearing && !s.all_in_sync() {
            // A leg failed since the daemon chose these regions: a write that reached only
            // the other legs may have finished in one of them, so its bit must stay.
            for b in s.bits.iter() {
                let _ = b.compare_exchange(bit::CLEAR_FLUSHING, bit::DIRTY, SeqCst, SeqCst);
            }
            cx.state::<Rx>().meta.clearing = false;
        }
        let events = s.events.fetch_add(1, SeqCst) + 1;
        if cx.state::<Rx>().meta.clearing {
            s.events_cleared.store(events, SeqCst);
        }
        let mask = s.write_mask();
        let mut n = 0;
        for (i, l) in s.legs.iter().enumerate() {
            let Some(m) = &l.meta else { continue };
            if mask & (1 << i) == 0 {
                continue;
            }
            let Some(b) = cx.bounce(self.area_bytes) else {
                tracing::error!(leg = i, "raid1: no bounce buffer for a metadata write");
                s.fail_leg(i, "no buffer for its metadata");
                continue;
            };
            self.fill_area(&b.data(), i, events);
            cx.submit_child(ChildIo {
                op: Op::Write,
                flags: BioFlags::FUA | BioFlags::PREFLUSH,
                dev: m.id,
                sector: 0,
                sectors: (self.area_bytes / 512) as u32,
                copy_src: 0,
                data: b.data(),
                tag: key(T_META, i as u64),
            });
            cx.state::<Rx>().meta.bufs[i] = b.id();
            n += 1;
        }
        let rx = cx.state::<Rx>();
        rx.meta.phase = 1;
        rx.meta.gen = gen;
        rx.meta.pending = n;
        if n == 0 {
            self.finish_meta(cx);
        }
    }

    /// A metadata child ended. Reactor thread (the token holder's).
    pub(crate) fn meta_child_done(
        &self,
        cx: &mut TargetCx<'_>,
        leg: usize,
        flush: bool,
        st: Status,
    ) {
        let s = &*self.shared;
        // A device that refuses a flush (an NBD server without flush support answers EINVAL)
        // has no volatile cache to empty: that is no fault of the leg.
        if !st.is_ok() && super::leg_fault(st) {
            s.fail_leg(
                leg,
                if flush {
                    "data flush failed"
                } else {
                    "metadata write failed"
                },
            );
        }
        if !flush {
            let id = std::mem::replace(&mut cx.state::<Rx>().meta.bufs[leg], u32::MAX);
            if id != u32::MAX {
                cx.release(id);
            }
        }
        let rx = cx.state::<Rx>();
        rx.meta.pending = rx.meta.pending.saturating_sub(1);
        if rx.meta.pending > 0 {
            return;
        }
        if rx.meta.phase == 0 {
            self.write_meta(cx);
        } else {
            self.finish_meta(cx);
        }
    }

    /// The batch is durable: bits WRITING -> DIRTY, CLEARING -> CLEAN; waiters go.
    fn finish_meta(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        let (gen, clearing) = {
            let rx = cx.state::<Rx>();
            rx.meta.active = false;
            (rx.meta.gen, rx.meta.clearing)
        };
        for b in s.bits.iter() {
            let _ = b.compare_exchange(bit::WRITING, bit::DIRTY, SeqCst, SeqCst);
            if clearing {
                let _ = b.compare_exchange(bit::CLEAR_FLUSHING, bit::CLEAN, SeqCst, SeqCst);
            }
        }
        s.durable_gen.fetch_max(gen, SeqCst);
        s.meta_token.store(false, SeqCst);
        s.ring_all();
        self.unpark_ready(cx);
        if s.meta_pending() {
            self.try_meta(cx);
        }
    }

    /// Starts reading every leg's metadata (this reactor won the load). Reactor thread.
    pub(crate) fn start_load(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        s.home.store(cx.reactor(), SeqCst);
        let mut n = 0;
        for (i, l) in s.legs.iter().enumerate() {
            let (Some(_), Some(_)) = (&l.meta, &l.data) else {
                continue;
            };
            let Some(b) = cx.bounce(self.area_bytes) else {
                tracing::error!(leg = i, "raid1: no bounce buffer to load the metadata");
                continue;
            };
            cx.state::<Rx>().load.bufs[i] = b.id();
            self.load_read(cx, i);
            n += 1;
        }
        cx.state::<Rx>().load.pending = n;
        if n == 0 {
            self.finish_load(cx);
        }
    }

    /// Reads leg `i`'s metadata area into its load buffer.
    fn load_read(&self, cx: &mut TargetCx<'_>, i: usize) {
        let id = cx.state::<Rx>().load.bufs[i];
        let (Some(m), true) = (&self.shared.legs[i].meta, id != u32::MAX) else {
            return;
        };
        let data = cx.bounce_data(id);
        cx.submit_child(ChildIo {
            op: Op::Read,
            flags: BioFlags::NONE,
            dev: m.id,
            sector: 0,
            sectors: (self.area_bytes / 512) as u32,
            copy_src: 0,
            data,
            tag: key(T_LOAD, i as u64),
        });
    }

    /// A load retry is due (a leg's device was not answering yet, e.g. still connecting).
    pub(crate) fn load_retry(&self, cx: &mut TargetCx<'_>, i: usize) {
        self.load_read(cx, i);
    }

    /// One leg's metadata read ended; a failed read is retried for about two seconds (a remote
    /// leg may still be connecting) before the leg counts as failed.
    pub(crate) fn load_child_done(&self, cx: &mut TargetCx<'_>, i: usize, st: Status) {
        let rx = cx.state::<Rx>();
        if st.is_ok() {
            rx.load.ok |= 1 << i;
        } else if rx.load.retries < LOAD_RETRIES {
            rx.load.retries += 1;
            cx.timer_at(
                std::time::Instant::now() + std::time::Duration::from_millis(100),
                super::TIMER_LOAD_RETRY | i as u64,
            );
            return;
        }
        rx.load.pending = rx.load.pending.saturating_sub(1);
        if rx.load.pending == 0 {
            self.finish_load(cx);
        }
    }

    /// Decides every leg's state and the regions to resync from what was read.
    fn finish_load(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        let nlegs = s.legs.len();
        let regions = s.regions as usize;
        // Decoded (superblock, bitmap area copy) per leg whose metadata is ours and sane.
        let mut sbs: Vec<Option<Superblock>> = vec![None; nlegs];
        let mut dirty = vec![false; regions];
        let ok = cx.state::<Rx>().load.ok;
        let mut area = vec![0u8; self.area_bytes];
        for (i, slot) in sbs.iter_mut().enumerate() {
            let id = std::mem::replace(&mut cx.state::<Rx>().load.bufs[i], u32::MAX);
            if id == u32::MAX {
                continue;
            }
            if ok & (1 << i) != 0 {
                cx.bounce_data(id).read_into(0, &mut area);
                match self.parse_area(&area) {
                    Ok((sb, stale)) => {
                        *slot = Some(sb);
                        let bits = &area[BITMAP_OFFSET as usize..];
                        for (r, d) in dirty.iter_mut().enumerate() {
                            *d |= stale || bitmap::bit(bits, r as u64);
                        }
                    }
                    Err(e) => tracing::info!(leg = i, "raid1: no usable metadata ({e})"),
                }
            } else {
                s.fail_leg(i, "its metadata cannot be read");
            }
            cx.release(id);
        }
        let fresh = sbs.iter().all(Option::is_none);
        let max_events = sbs.iter().flatten().map(|sb| sb.events).max().unwrap_or(0);
        let freshest = sbs
            .iter()
            .flatten()
            .find(|sb| sb.events == max_events)
            .copied();
        s.events.store(max_events, SeqCst);
        s.events_cleared.store(max_events, SeqCst);
        let all: u64 = if nlegs == 64 {
            u64::MAX
        } else {
            (1 << nlegs) - 1
        };
        let mut full = self.args.rebuild;
        let mut partial = 0u64;
        for (i, l) in s.legs.iter().enumerate() {
            if l.data.is_none() || l.state.load(SeqCst) == leg::FAILED {
                l.state.store(leg::FAILED, SeqCst);
                continue;
            }
            if full & (1 << i) != 0 {
                continue;
            }
            match (&sbs[i], freshest) {
                (_, None) => {}
                (None, Some(_)) if l.meta.is_some() => full |= 1 << i,
                (None, Some(_)) => {}
                (Some(sb), Some(f)) => {
                    if f.is_failed(i as u32) || sb.events < max_events {
                        partial |= 1 << i;
                    }
                }
            }
        }
        // The copy source: the first leg with a data device that is neither rebuilt nor stale.
        let src = (0..nlegs).find(|&i| {
            s.legs[i].state.load(SeqCst) != leg::FAILED && (full | partial) & (1 << i) == 0
        });
        let Some(src) = src else {
            tracing::error!("raid1: no leg holds the data; every leg is failed or to rebuild");
            s.load.store(load::READY, SeqCst);
            s.ring_all();
            self.unpark_ready(cx);
            return;
        };
        let live = s.write_mask();
        let others = live & all & !(1 << src);
        let initial = if fresh {
            self.args.sync != Some(false)
        } else {
            self.args.sync == Some(true)
        };
        let mut any = 0u64;
        for (r, &d) in dirty.iter().enumerate() {
            let mut n = (full & live) & !(1 << src);
            if initial {
                n |= others;
            } else if d {
                n |= others; // a crash left it maybe different, and stale legs missed it
            }
            if n != 0 {
                s.need[r].store(n, SeqCst);
                s.bits[r].store(bit::DIRTY, SeqCst);
                any |= n;
            } else if d {
                s.bits[r].store(bit::DIRTY, SeqCst);
            }
        }
        let _ = partial;
        for i in 0..nlegs {
            if any & (1 << i) != 0 && (full | partial) & (1 << i) != 0 {
                s.legs[i].state.store(leg::RECOVER, SeqCst);
            }
        }
        s.full_rebuild.store(full, SeqCst);
        if any != 0 {
            let a = if (full | partial) & any != 0 {
                action::RECOVER
            } else {
                action::RESYNC
            };
            s.action.store(a, SeqCst);
            s.kick.store(true, SeqCst);
        }
        tracing::info!(
            fresh,
            events = max_events,
            to_copy = s.regions_needing(),
            health = %s.health(),
            "raid1: metadata loaded"
        );
        s.sb_dirty.store(true, SeqCst);
        s.load.store(load::READY, SeqCst);
        s.ring_all();
        self.unpark_ready(cx);
        self.try_meta(cx);
        self.drive(cx);
    }

    /// Checks one leg's metadata area: (superblock, bitmap stale).
    fn parse_area(&self, area: &[u8]) -> Result<(Superblock, bool), String> {
        let sb = Superblock::decode(area).map_err(|e| e.to_string())?;
        if sb.level != LEVEL_RAID1 {
            return Err(format!("level {} is not raid1", sb.level));
        }
        if sb.num_devices as usize != self.shared.legs.len() {
            return Err(format!(
                "{} devices in the superblock, {} in the table",
                sb.num_devices,
                self.shared.legs.len()
            ));
        }
        let bm = &area[BITMAP_OFFSET as usize..];
        let bs = BitmapSuper::decode(bm).map_err(|e| e.to_string())?;
        let chunks = bs.chunks().map_err(|e| e.to_string())?;
        if chunks != self.shared.regions
            || u64::from(bs.chunksize) != self.shared.region_sectors() * 512
        {
            // A different region size: the bits cannot be mapped, so everything is suspect.
            return Ok((sb, true));
        }
        Ok((sb, bs.state & bitmap::STATE_STALE != 0))
    }
}
