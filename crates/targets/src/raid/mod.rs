#![warn(missing_docs)]
//! `raid`: dm-raid's target, raid1 level: mirrored legs, each with dm-raid's superblock and an
//! MD write-intent bitmap on its metadata device, so a leg set moves between stackbd and Linux.
//!
//! Ownership and threads:
//! - [`Raid`] (one per table line) owns the parsed table and an `Arc<Shared>`: leg health and
//!   per-region state as atomics, read and changed by every reactor without a lock.
//! - Each reactor owns an [`Rx`] (made by `reactor_state`): write slots for mirrored writes,
//!   per-leg read counts (the read balancer), and, on the reactor that holds them, the
//!   metadata batch, the load and the resync driver.
//! - The control plane (`status`, `message`, ctor) reads the atomics and asks reactors for work
//!   through doorbells; it never does I/O.
//!
//! Data path: a bio never crosses a region (`max_io_len`). A write waits (parked) until its
//! region's bit is durable on every live leg's metadata, then goes to every live leg as child
//! bios pointing into its own data (held meanwhile), and completes when all answered: `Ok` if
//! one leg took it. A leg that fails is marked `D`, an event fires, and a write that saw it
//! fail completes only after a superblock naming the failure is durable. Reads go to one leg
//! (least loaded on this reactor, `write_mostly` legs last) and are retried on another after an
//! error. Resync/recovery/check run in the background on the home reactor through the copy
//! engine (`resync.rs`); bits are cleared by a daemon tick every `daemon_sleep`.
//!
//! The set's metadata is read by the first bio (or the first doorbell after `activate`); bios
//! wait parked meanwhile. At load: a blank metadata device is a new leg (rebuilt in full), a
//! leg the freshest superblock names failed or whose events lag comes back through the bitmap
//! (only dirty regions), and every region whose bit is set is resynced (a crash may have left
//! the legs different there). `sync` resyncs everything, `nosync` skips a new set's initial
//! sync, `rebuild <idx>` rebuilds that leg in full.
//!
//! Differences from dm-raid: `min_recovery_rate` is accepted and ignored (application I/O
//! always has priority: a region with writes in flight is skipped and retried);
//! `max_write_behind` is written to the bitmap superblock but writes are never acknowledged
//! before a `write_mostly` leg has them; the progress shown is regions left to copy, not a
//! sector cursor; messages also take `stats` (counters for tests and tools).

pub mod bitmap;
mod meta;
mod resync;
pub mod state;
pub mod superblock;
pub mod table;

use stackbd_core::target::{ReactorInit, TargetEnv};
use stackbd_core::{
    ArgError, Bio, ChildIo, CtorCx, DevId, Endio, Limits, MapResult, Op, Sector, Status, Target,
    TargetCx,
};
use state::{action, bit, leg, load, Leg, Shared};
use std::any::Any;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use table::RaidArgs;

/// Write slots per reactor (mirrored writes and flushes in flight on one reactor).
const SLOTS: usize = 4096;

// Key and tag kinds (top byte).
pub(crate) const K_WRITE: u64 = 1;
pub(crate) const K_BIT: u64 = 2;
pub(crate) const K_BUSY: u64 = 3;
pub(crate) const K_LOAD: u64 = 4;
pub(crate) const K_SB: u64 = 5;
pub(crate) const T_WRITE: u64 = 16;
pub(crate) const T_META: u64 = 17;
pub(crate) const T_META_FLUSH: u64 = 18;
pub(crate) const T_LOAD: u64 = 19;
pub(crate) const T_COPY: u64 = 20;
pub(crate) const T_CHECK: u64 = 21;
pub(crate) const TIMER_DAEMON: u64 = 1;
pub(crate) const TIMER_DRIVE: u64 = 2;
/// `TIMER_LOAD_RETRY | leg`: read that leg's metadata again.
pub(crate) const TIMER_LOAD_RETRY: u64 = 1 << 32;

pub(crate) fn key(kind: u64, v: u64) -> u64 {
    kind << 56 | (v & ((1 << 56) - 1))
}

fn kind(k: u64) -> u64 {
    k >> 56
}

fn val(k: u64) -> u64 {
    k & ((1 << 56) - 1)
}

/// One mirrored write (or flush) in flight on a reactor.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WSlot {
    remaining: u16,
    ok: u16,
    region: u64,
    status: Status,
    /// `fail_gen` that must be durable before the write completes (a leg failed under it).
    wait_gen: u64,
}

/// Per-reactor state. Owned by one reactor; see the module doc.
#[derive(Debug)]
pub(crate) struct Rx {
    slots: Vec<WSlot>,
    free: Vec<u16>,
    /// Reads in flight per leg on this reactor.
    reads: Vec<u32>,
    /// The leg after the last one read (round-robin among equally loaded legs).
    rr: usize,
    pub(crate) meta: meta::MetaCtx,
    pub(crate) load: meta::LoadCtx,
    pub(crate) drv: resync::DriverCtx,
    daemon_armed: bool,
}

/// Frame pushed on reads.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct ReadFrame {
    sector: u64,
    leg: u32,
    _pad: u32,
}

/// A raid1 target instance.
#[derive(Debug)]
pub struct Raid {
    args: RaidArgs,
    shared: Arc<Shared>,
    /// Bytes of a leg's metadata area (superblock + gap + bitmap).
    area_bytes: usize,
    bm_bytes: usize,
}

impl Raid {
    /// Builds the target from its table line. Control plane.
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        let a = RaidArgs::parse(args)?;
        let rs = a.region_sectors(cx.len);
        let probe = bitmap::BitmapSuper {
            sync_size: cx.len,
            chunksize: u32::try_from(rs * 512)
                .map_err(|_| ArgError::new("region_size", "too large"))?,
            ..Default::default()
        };
        let bm_bytes = probe
            .total_bytes()
            .map_err(|e| ArgError::new("region_size", format!("{e}")))?;
        let area_bytes = bitmap::BITMAP_OFFSET as usize + bm_bytes;
        let mut legs = Vec::with_capacity(a.legs.len());
        for (i, (m, d)) in a.legs.iter().enumerate() {
            let data = match d {
                Some(d) => Some(cx.device(&format!("data_dev {i}"), d, 0, cx.len)?.0),
                None => None,
            };
            let meta = match m {
                Some(m) => Some(
                    cx.device(&format!("meta_dev {i}"), m, 0, (area_bytes / 512) as u64)?
                        .0,
                ),
                None => None,
            };
            let state = if data.is_some() {
                leg::IN_SYNC
            } else {
                leg::FAILED
            };
            legs.push(Leg {
                meta,
                data,
                write_mostly: a.write_mostly & (1 << i) != 0,
                state: AtomicU8::new(state),
            });
        }
        let shared = Shared::new(legs, cx.len, rs.trailing_zeros());
        Ok(Box::new(Raid {
            args: a,
            shared: Arc::new(shared),
            area_bytes,
            bm_bytes,
        }))
    }

    /// The shared state (tests and tools read counters from it).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn region(&self, sector: Sector) -> usize {
        (sector >> self.shared.region_shift) as usize
    }

    /// Unparks what can go now on this reactor. Reactor thread.
    pub(crate) fn unpark_ready(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        let ready = s.load.load(SeqCst) == load::READY;
        let durable = s.durable_gen.load(SeqCst);
        cx.unpark_where(|k| match kind(k) {
            K_LOAD => ready,
            K_BIT => !matches!(
                s.bits.get(val(k) as usize).map(|b| b.load(SeqCst)),
                Some(bit::WANT | bit::WRITING)
            ),
            K_BUSY => !s.busy.get(val(k) as usize).is_some_and(|b| b.load(SeqCst)),
            K_SB => (val(k) >> 16) <= durable,
            _ => false,
        });
    }

    /// Picks a leg to read region `r` from: in sync (or recovering and already copied there),
    /// fewest reads in flight on this reactor, `write_mostly` legs only when nothing else.
    /// Ties go round-robin from `rr`, so reads spread even at queue depth 1.
    fn pick_read_leg(&self, r: usize, reads: &[u32], rr: usize) -> Option<usize> {
        let s = &*self.shared;
        let need = s.need[r].load(SeqCst);
        let n = s.legs.len();
        let mut best: Option<(bool, u32, usize, usize)> = None;
        for (i, l) in s.legs.iter().enumerate() {
            if l.data.is_none() {
                continue;
            }
            let st = l.state.load(SeqCst);
            let ok = matches!(st, leg::IN_SYNC | leg::RECOVER) && need & (1 << i) == 0;
            if !ok {
                continue;
            }
            let cand = (l.write_mostly, reads[i], (i + n - rr % n) % n, i);
            if best.is_none_or(|b| (cand.0, cand.1, cand.2) < (b.0, b.1, b.2)) {
                best = Some(cand);
            }
        }
        best.map(|b| b.3)
    }

    fn map_read(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        let r = self.region(bio.sector);
        let rx = cx.state::<Rx>();
        let Some(i) = self.pick_read_leg(r, &rx.reads, rx.rr) else {
            return MapResult::Done(Status::IoError);
        };
        rx.rr = i + 1;
        rx.reads[i] += 1;
        let f = ReadFrame {
            sector: bio.sector,
            leg: i as u32,
            _pad: 0,
        };
        cx.push(bio, &f);
        bio.dev = self.shared.legs[i].data.as_ref().map_or(bio.dev, |d| d.id);
        MapResult::Remapped
    }

    /// A write, discard or write-zeroes: bit first, then every live leg.
    fn map_write(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        let s = &*self.shared;
        let r = self.region(bio.sector);
        s.inflight[r].fetch_add(1, SeqCst);
        if s.busy[r].load(SeqCst) {
            s.inflight[r].fetch_sub(1, SeqCst);
            return MapResult::Park {
                key: key(K_BUSY, r as u64),
            };
        }
        if s.bits[r].load(SeqCst) != bit::DIRTY {
            s.inflight[r].fetch_sub(1, SeqCst);
            s.want_bit(r);
            self.try_meta(cx);
            if s.bits[r].load(SeqCst) == bit::DIRTY {
                // The batch finished inline (no metadata devices): go again.
                return self.map_write(bio, cx);
            }
            return MapResult::Park {
                key: key(K_BIT, r as u64),
            };
        }
        // Reset the daemon's idle count only when it counted (no store per write).
        if s.age[r].load(Relaxed) != 0 {
            s.age[r].store(0, Relaxed);
        }
        self.fan_out(bio, cx, r as u64)
    }

    /// Sends `bio` to every live leg as child bios; holds it until they answer.
    fn fan_out(&self, bio: &mut Bio, cx: &mut TargetCx<'_>, region: u64) -> MapResult {
        let s = &*self.shared;
        let undo = |s: &Shared| {
            if region != u64::MAX {
                s.inflight[region as usize].fetch_sub(1, SeqCst);
            }
        };
        let mask = s.write_mask();
        if mask == 0 {
            undo(s);
            return MapResult::Done(Status::IoError);
        }
        let rx = cx.state::<Rx>();
        let Some(slot) = rx.free.pop() else {
            undo(s);
            return MapResult::Requeue;
        };
        rx.slots[slot as usize] = WSlot {
            remaining: mask.count_ones() as u16,
            ok: 0,
            region,
            status: Status::IoError,
            wait_gen: 0,
        };
        for (i, l) in s.legs.iter().enumerate() {
            let Some(d) = &l.data else { continue };
            if mask & (1 << i) == 0 {
                continue;
            }
            cx.submit_child(ChildIo {
                op: bio.op,
                flags: bio.flags,
                dev: d.id,
                sector: bio.sector,
                sectors: bio.sectors,
                copy_src: 0,
                data: bio.data,
                tag: key(T_WRITE, (slot as u64) << 8 | i as u64),
            });
        }
        MapResult::Hold {
            key: key(K_WRITE, slot as u64),
        }
    }

    fn write_child_done(&self, cx: &mut TargetCx<'_>, slot: usize, i: usize, st: Status) {
        let s = &*self.shared;
        let mut failed = false;
        if !st.is_ok() && leg_fault(st) {
            failed = s.fail_leg(i, "write error") || s.leg_state(i) == leg::FAILED;
        }
        let rx = cx.state::<Rx>();
        let w = &mut rx.slots[slot];
        w.remaining = w.remaining.saturating_sub(1);
        if st.is_ok() {
            w.ok += 1;
            w.status = Status::Ok;
        } else if w.ok == 0 {
            w.status = st;
        }
        if failed {
            w.wait_gen = s.fail_gen.load(SeqCst);
        }
        if w.remaining > 0 {
            return;
        }
        let (region, wait) = (w.region, w.wait_gen);
        if region != u64::MAX {
            s.inflight[region as usize].fetch_sub(1, SeqCst);
        }
        if wait > s.durable_gen.load(SeqCst) {
            self.try_meta(cx);
        }
        cx.unpark(key(K_WRITE, slot as u64));
    }

    fn free_slot(&self, cx: &mut TargetCx<'_>, slot: usize) -> Status {
        let rx = cx.state::<Rx>();
        let st = rx.slots[slot].status;
        rx.free.push(slot as u16);
        st
    }
}

/// An error that says the leg is bad (not the request).
pub(crate) fn leg_fault(st: Status) -> bool {
    !matches!(
        st,
        Status::Ok | Status::Invalid | Status::OutOfRange | Status::NotSupported | Status::Again
    )
}

impl Target for Raid {
    fn kind(&self) -> &'static str {
        "raid"
    }

    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        let s = &*self.shared;
        if s.load.load(SeqCst) != load::READY {
            if s.load
                .compare_exchange(load::UNLOADED, load::LOADING, SeqCst, SeqCst)
                .is_ok()
            {
                self.start_load(cx);
            }
            if s.load.load(SeqCst) != load::READY {
                return MapResult::Park {
                    key: key(K_LOAD, 0),
                };
            }
        }
        self.arm_daemon(cx);
        match bio.op {
            Op::Read => self.map_read(bio, cx),
            Op::Write | Op::Discard | Op::WriteZeroes => self.map_write(bio, cx),
            Op::Flush => self.fan_out(bio, cx, u64::MAX),
            Op::Copy => MapResult::Done(Status::NotSupported),
        }
    }

    fn unparked(&self, bio: &mut Bio, cx: &mut TargetCx<'_>, k: u64) -> MapResult {
        match kind(k) {
            K_WRITE => {
                let slot = val(k) as usize;
                let wait = cx.state::<Rx>().slots[slot].wait_gen;
                if wait > self.shared.durable_gen.load(SeqCst) {
                    self.try_meta(cx);
                    return MapResult::Hold {
                        key: key(K_SB, wait << 16 | slot as u64),
                    };
                }
                MapResult::Done(self.free_slot(cx, slot))
            }
            K_SB => MapResult::Done(self.free_slot(cx, (val(k) & 0xffff) as usize)),
            _ => self.map(bio, cx),
        }
    }

    fn end_io(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> Endio {
        let f: ReadFrame = bio.popped_ctx();
        let i = f.leg as usize;
        let rx = cx.state::<Rx>();
        rx.reads[i] = rx.reads[i].saturating_sub(1);
        if bio.status.is_ok() || !leg_fault(bio.status) {
            return Endio::Done;
        }
        // Retry on another leg unless this one is the last in sync (then the error stands).
        if !self.shared.fail_leg(i, "read error") && self.shared.leg_state(i) != leg::FAILED {
            return Endio::Done;
        }
        self.try_meta(cx);
        bio.sector = f.sector;
        Endio::Requeue
    }

    fn child_done(&self, cx: &mut TargetCx<'_>, tag: u64, st: Status) {
        let v = val(tag);
        match kind(tag) {
            T_WRITE => self.write_child_done(cx, (v >> 8) as usize, (v & 0xff) as usize, st),
            T_META => self.meta_child_done(cx, v as usize, false, st),
            T_META_FLUSH => self.meta_child_done(cx, v as usize, true, st),
            T_LOAD => self.load_child_done(cx, v as usize, st),
            T_CHECK => self.check_read_done(cx, v as usize, st),
            _ => {}
        }
    }

    fn copy_done(&self, cx: &mut TargetCx<'_>, tag: u64, st: Status) {
        if kind(tag) == T_COPY {
            self.copy_piece_done(cx, val(tag) as usize, st);
        }
    }

    fn timer(&self, cx: &mut TargetCx<'_>, token: u64) {
        match token {
            TIMER_DAEMON => {
                cx.state::<Rx>().daemon_armed = false;
                self.daemon_tick(cx);
                self.arm_daemon(cx);
            }
            TIMER_DRIVE => {
                cx.state::<Rx>().drv.timer_set = false;
                self.drive(cx);
            }
            t if t & TIMER_LOAD_RETRY != 0 => self.load_retry(cx, (t & 0xff) as usize),
            _ => {}
        }
    }

    fn wake(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        if s.load.load(SeqCst) == load::UNLOADED
            && s.load
                .compare_exchange(load::UNLOADED, load::LOADING, SeqCst, SeqCst)
                .is_ok()
        {
            self.start_load(cx);
        }
        self.unpark_ready(cx);
        if s.home.load(SeqCst) == cx.reactor() && s.load.load(SeqCst) == load::READY {
            self.arm_daemon(cx);
            self.try_meta(cx);
            self.drive(cx);
        }
    }

    fn frame_bytes(&self) -> usize {
        std::mem::size_of::<ReadFrame>()
    }

    fn reactor_state(&self, init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        self.shared.add_bell(init.doorbell.clone());
        let n = self.shared.legs.len();
        Some(Box::new(Rx {
            slots: vec![WSlot::default(); SLOTS],
            free: (0..SLOTS as u16).rev().collect(),
            reads: vec![0; n],
            rr: 0,
            meta: meta::MetaCtx {
                bufs: vec![u32::MAX; n],
                ..Default::default()
            },
            load: meta::LoadCtx {
                bufs: vec![u32::MAX; n],
                ..Default::default()
            },
            drv: resync::DriverCtx::new(n),
            daemon_armed: false,
        }))
    }

    fn max_io_len(&self, offset: Sector) -> Sector {
        let rs = self.shared.region_sectors();
        rs - (offset & (rs - 1))
    }

    fn flush_devices(&self) -> Vec<DevId> {
        // One flush bio; `map` fans it out to every live leg.
        self.shared
            .legs
            .iter()
            .find_map(|l| l.data.as_ref().map(|d| d.id))
            .into_iter()
            .collect()
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        let mut l = Limits::TOP;
        for d in self.devices() {
            let c = child(d);
            l.stack(&c);
            l.check_alignment(&c, 0);
        }
        l.max_copy_sectors = 0;
        l.copy_native = false;
        l
    }

    fn devices(&self) -> Vec<DevId> {
        let mut v = Vec::new();
        for l in &self.shared.legs {
            for d in [&l.meta, &l.data].into_iter().flatten() {
                v.push(d.id);
            }
        }
        v
    }

    fn args(&self) -> String {
        self.args.table_args()
    }

    fn status(&self) -> String {
        let s = &*self.shared;
        let rs = s.region_sectors();
        let left = s.regions_needing().saturating_mul(rs).min(s.len);
        let a = s.action.load(SeqCst);
        format!(
            "raid1 {} {} {}/{} {} {} 0 -",
            s.legs.len(),
            s.health(),
            s.len - left,
            s.len,
            action::name(a),
            s.mismatches.load(SeqCst)
        )
    }

    fn message(&self, argv: &[&str]) -> Result<String, String> {
        self.handle_message(argv)
    }

    fn activate(&self, env: &TargetEnv) {
        self.shared.env.store(Some(Arc::new(env.clone())));
        self.shared.ring_all();
    }
}
