//! Background work on the home reactor (the one that loaded the set): the resync/recovery
//! driver (region by region, through the copy engine, writes to the region held off while it is
//! copied), `check`/`repair` (read every in-sync leg, compare, count and fix), the bitmap
//! daemon that clears idle bits every `daemon_sleep`, and the control-plane messages that start
//! them. Reactor callbacks never block; buffers come from the reactor's bounce pool.

use super::state::{action, bit, leg, load};
use super::{key, Raid, Rx, TIMER_DAEMON, TIMER_DRIVE, T_CHECK, T_COPY};
use stackbd_core::{BioFlags, ChildIo, CopyIo, Op, Status, TargetCx};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

/// The driver's place, on the home reactor.
#[derive(Debug)]
pub(crate) struct DriverCtx {
    /// A region is being copied or checked.
    pub active: bool,
    pub region: usize,
    pub pending: u32,
    /// Legs being written in this region.
    pub targets: u64,
    /// Legs read for a check (bit per leg), and their bounce ids.
    pub read_mask: u64,
    pub bufs: Vec<u32>,
    pub read_failed: bool,
    pub timer_set: bool,
    /// Regions copied in this pass (a pass that copied nothing does not restart).
    pub copied_this_pass: u64,
    /// The recovery rate limit: no region starts before this.
    pub not_before: Option<Instant>,
}

impl DriverCtx {
    pub fn new(legs: usize) -> DriverCtx {
        DriverCtx {
            active: false,
            region: 0,
            pending: 0,
            targets: 0,
            read_mask: 0,
            bufs: vec![u32::MAX; legs],
            read_failed: false,
            timer_set: false,
            copied_this_pass: 0,
            not_before: None,
        }
    }
}

impl Raid {
    fn region_range(&self, r: usize) -> (u64, u32) {
        let s = &*self.shared;
        let start = (r as u64) << s.region_shift;
        let len = s.region_sectors().min(s.len - start);
        (start, len as u32)
    }

    fn drive_later(&self, cx: &mut TargetCx<'_>, after: Duration) {
        let rx = cx.state::<Rx>();
        if !rx.drv.timer_set {
            rx.drv.timer_set = true;
            cx.timer_at(Instant::now() + after, TIMER_DRIVE);
        }
    }

    /// Takes the next step of the background action. Home reactor only; a no-op elsewhere.
    pub(crate) fn drive(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        if s.home.load(SeqCst) != cx.reactor() || s.load.load(SeqCst) != load::READY {
            return;
        }
        if cx.state::<Rx>().drv.active {
            return;
        }
        if let Some(t) = cx.state::<Rx>().drv.not_before {
            let now = Instant::now();
            if now < t {
                self.drive_later(cx, t - now);
                return;
            }
            cx.state::<Rx>().drv.not_before = None;
        }
        let a = s.action.load(SeqCst);
        if a == action::FROZEN {
            return;
        }
        let checking = matches!(a, action::CHECK | action::REPAIR);
        let live = s.write_mask();
        let mut r = s.cursor.load(SeqCst) as usize;
        while r < s.regions as usize {
            let wanted = if checking {
                true
            } else {
                s.need[r].load(SeqCst) & live != 0
            };
            if !wanted {
                r += 1;
                continue;
            }
            s.busy[r].store(true, SeqCst);
            if s.inflight[r].load(SeqCst) != 0 {
                // Application I/O first: come back shortly.
                s.busy[r].store(false, SeqCst);
                s.ring_all();
                self.unpark_ready(cx);
                s.cursor.store(r as u64, SeqCst);
                self.drive_later(cx, Duration::from_millis(1));
                return;
            }
            s.cursor.store(r as u64, SeqCst);
            let started = if checking {
                self.start_check(cx, r)
            } else {
                self.start_copy(cx, r)
            };
            if started {
                return;
            }
            s.busy[r].store(false, SeqCst);
            s.ring_all();
            self.unpark_ready(cx);
            r += 1;
        }
        self.finish_pass(cx, checking);
    }

    /// Copies region `r` from an up-to-date leg to the legs that need it. False if it cannot.
    fn start_copy(&self, cx: &mut TargetCx<'_>, r: usize) -> bool {
        let s = &*self.shared;
        let targets = s.need[r].load(SeqCst) & s.write_mask();
        let Some(src) = s.source_for(r, targets) else {
            return false;
        };
        self.copy_to(cx, r, src, targets)
    }

    fn copy_to(&self, cx: &mut TargetCx<'_>, r: usize, src: usize, targets: u64) -> bool {
        let s = &*self.shared;
        let (start, len) = self.region_range(r);
        let Some(sd) = s.legs[src].data.as_ref().map(|d| d.id) else {
            return false;
        };
        let mut n = 0;
        for (i, l) in s.legs.iter().enumerate() {
            let Some(d) = &l.data else { continue };
            if targets & (1 << i) == 0 || i == src {
                continue;
            }
            cx.copy(CopyIo {
                src_dev: sd,
                src: start,
                dst_dev: d.id,
                dst: start,
                sectors: len,
                tag: key(T_COPY, i as u64),
            });
            n += 1;
        }
        let drv = &mut cx.state::<Rx>().drv;
        drv.active = n > 0;
        drv.region = r;
        drv.pending = n;
        drv.targets = targets;
        n > 0
    }

    /// One leg's copy of the current region ended.
    pub(crate) fn copy_piece_done(&self, cx: &mut TargetCx<'_>, i: usize, st: Status) {
        let s = &*self.shared;
        let r = cx.state::<Rx>().drv.region;
        if st.is_ok() {
            s.need[r].fetch_and(!(1 << i), SeqCst);
        } else {
            s.fail_leg(i, "resync copy failed");
            self.try_meta(cx);
        }
        let drv = &mut cx.state::<Rx>().drv;
        drv.pending = drv.pending.saturating_sub(1);
        if drv.pending > 0 {
            return;
        }
        drv.copied_this_pass += 1;
        s.copied_regions.fetch_add(1, SeqCst);
        self.region_done(cx, r);
    }

    /// The region is finished: writes may go, the driver moves on (rate limited).
    fn region_done(&self, cx: &mut TargetCx<'_>, r: usize) {
        let s = &*self.shared;
        s.busy[r].store(false, SeqCst);
        s.cursor.store(r as u64 + 1, SeqCst);
        cx.state::<Rx>().drv.active = false;
        s.ring_all();
        self.unpark_ready(cx);
        match self.args.max_recovery_rate {
            Some(kbs) => {
                let bytes = self.region_range(r).1 as u64 * 512;
                let us = bytes.saturating_mul(1_000_000) / (u64::from(kbs) * 1024);
                let after = Duration::from_micros(us);
                cx.state::<Rx>().drv.not_before = Some(Instant::now() + after);
                self.drive_later(cx, after);
            }
            None => self.drive(cx),
        }
    }

    /// Reads region `r` from every in-sync leg to compare them. False if fewer than two.
    fn start_check(&self, cx: &mut TargetCx<'_>, r: usize) -> bool {
        let s = &*self.shared;
        let (start, len) = self.region_range(r);
        let need = s.need[r].load(SeqCst);
        let mut mask = 0u64;
        for (i, l) in s.legs.iter().enumerate() {
            if l.data.is_some() && l.state.load(SeqCst) == leg::IN_SYNC && need & (1 << i) == 0 {
                mask |= 1 << i;
            }
        }
        if mask.count_ones() < 2 {
            return false;
        }
        let mut n = 0;
        for (i, l) in s.legs.iter().enumerate() {
            let Some(d) = &l.data else { continue };
            if mask & (1 << i) == 0 {
                continue;
            }
            let Some(b) = cx.bounce(len as usize * 512) else {
                mask &= !(1 << i);
                continue;
            };
            cx.submit_child(ChildIo {
                op: Op::Read,
                flags: BioFlags::NONE,
                dev: d.id,
                sector: start,
                sectors: len,
                copy_src: 0,
                data: b.data(),
                tag: key(T_CHECK, i as u64),
            });
            cx.state::<Rx>().drv.bufs[i] = b.id();
            n += 1;
        }
        let drv = &mut cx.state::<Rx>().drv;
        drv.active = n > 0;
        drv.region = r;
        drv.pending = n;
        drv.read_mask = mask;
        drv.read_failed = false;
        n > 0
    }

    /// A check read ended; when all did, compare (and repair).
    pub(crate) fn check_read_done(&self, cx: &mut TargetCx<'_>, i: usize, st: Status) {
        let s = &*self.shared;
        let drv = &mut cx.state::<Rx>().drv;
        if !st.is_ok() {
            drv.read_failed = true;
            drv.read_mask &= !(1 << i);
        }
        drv.pending = drv.pending.saturating_sub(1);
        if drv.pending > 0 {
            return;
        }
        let (r, mask) = (drv.region, drv.read_mask);
        let (_, len) = self.region_range(r);
        let first = mask.trailing_zeros() as usize;
        let mut bad_legs = 0u64;
        let mut bad_sectors = 0u64;
        if first < 64 {
            let ia = cx.state::<Rx>().drv.bufs[first];
            let a = cx.bounce_data(ia);
            for j in (first + 1)..s.legs.len() {
                if mask & (1 << j) == 0 {
                    continue;
                }
                let ib = cx.state::<Rx>().drv.bufs[j];
                let b = cx.bounce_data(ib);
                // SAFETY: both bounce buffers belong to this driver and no bio points into them
                // any more (every read of this region completed); nothing else writes them.
                let (x, y) = unsafe { (a.as_bytes(), b.as_bytes()) };
                let n = x
                    .chunks(512)
                    .zip(y.chunks(512))
                    .filter(|(p, q)| p != q)
                    .count() as u64;
                if n > 0 {
                    bad_sectors = bad_sectors.max(n);
                    bad_legs |= 1 << j;
                }
            }
        }
        for j in 0..s.legs.len() {
            let id = std::mem::replace(&mut cx.state::<Rx>().drv.bufs[j], u32::MAX);
            if id != u32::MAX {
                cx.release(id);
            }
        }
        let _ = len;
        if bad_legs != 0 {
            s.mismatches.fetch_add(bad_sectors, SeqCst);
            if s.action.load(SeqCst) == action::REPAIR && self.copy_to(cx, r, first, bad_legs) {
                return;
            }
        }
        self.region_done(cx, r);
    }

    /// The cursor reached the end: legs with nothing left come back in sync.
    fn finish_pass(&self, cx: &mut TargetCx<'_>, checking: bool) {
        let s = &*self.shared;
        s.cursor.store(0, SeqCst);
        let copied = std::mem::take(&mut cx.state::<Rx>().drv.copied_this_pass);
        let live = s.write_mask();
        let left = s.need.iter().any(|n| n.load(SeqCst) & live != 0);
        if left && copied > 0 && !checking {
            // A `recover` or a failure during the pass added work behind the cursor.
            self.drive_later(cx, Duration::from_millis(1));
            return;
        }
        let mut changed = false;
        for (i, l) in s.legs.iter().enumerate() {
            if l.state.load(SeqCst) == leg::RECOVER
                && !s.need.iter().any(|n| n.load(SeqCst) & (1 << i) != 0)
                && l.state
                    .compare_exchange(leg::RECOVER, leg::IN_SYNC, SeqCst, SeqCst)
                    .is_ok()
            {
                tracing::info!(leg = i, "raid1: leg back in sync");
                changed = true;
            }
        }
        let a = s.action.load(SeqCst);
        if a != action::FROZEN && a != action::IDLE {
            if checking {
                tracing::info!(
                    mismatches = s.mismatches.load(SeqCst),
                    "raid1: {} done",
                    action::name(a)
                );
            }
            s.action.store(action::IDLE, SeqCst);
            changed = true;
        }
        if changed {
            s.sb_dirty.store(true, SeqCst);
            s.raise_event();
            self.try_meta(cx);
        }
    }

    /// Arms the bitmap daemon on the home reactor.
    pub(crate) fn arm_daemon(&self, cx: &mut TargetCx<'_>) {
        if self.shared.home.load(SeqCst) != cx.reactor() {
            return;
        }
        let rx = cx.state::<Rx>();
        if !rx.daemon_armed {
            rx.daemon_armed = true;
            let ms = u64::from(self.args.daemon_sleep());
            cx.timer_at(Instant::now() + Duration::from_millis(ms), TIMER_DAEMON);
        }
    }

    /// Clears bits of regions idle for two ticks, when every leg is in sync.
    pub(crate) fn daemon_tick(&self, cx: &mut TargetCx<'_>) {
        let s = &*self.shared;
        if !s.all_in_sync() || cx.state::<Rx>().drv.active || s.meta_token.load(SeqCst) {
            return;
        }
        let mut n = 0;
        for r in 0..s.regions as usize {
            if s.bits[r].load(SeqCst) != bit::DIRTY
                || s.need[r].load(SeqCst) != 0
                || s.inflight[r].load(SeqCst) != 0
            {
                continue;
            }
            if s.age[r].fetch_add(1, SeqCst) < 1 {
                continue;
            }
            if s.bits[r]
                .compare_exchange(bit::DIRTY, bit::CLEARING, SeqCst, SeqCst)
                .is_ok()
            {
                if s.inflight[r].load(SeqCst) != 0 {
                    let _ = s.bits[r].compare_exchange(bit::CLEARING, bit::DIRTY, SeqCst, SeqCst);
                } else {
                    n += 1;
                }
            }
        }
        if n > 0 {
            s.clear_pending.store(true, SeqCst);
            self.try_meta(cx);
        }
    }

    /// `dmsetup message`: `idle frozen resync recover check repair`, and `stats`. Control plane.
    pub(crate) fn handle_message(&self, argv: &[&str]) -> Result<String, String> {
        let s = &*self.shared;
        let [word] = argv else {
            return Err(format!("raid: one word expected, got '{}'", argv.join(" ")));
        };
        let all: u64 = (0..s.legs.len()).fold(0, |m, i| m | 1 << i);
        match word.to_ascii_lowercase().as_str() {
            "idle" => s.action.store(action::IDLE, SeqCst),
            "frozen" => s.action.store(action::FROZEN, SeqCst),
            "resync" => {
                let Some(src) = (0..s.legs.len())
                    .find(|&i| s.legs[i].data.is_some() && s.leg_state(i) == leg::IN_SYNC)
                else {
                    return Err("raid: no leg in sync to resync from".into());
                };
                for r in 0..s.regions as usize {
                    s.bits[r].store(bit::DIRTY, SeqCst);
                    s.need[r].fetch_or(all & !(1 << src), SeqCst);
                }
                s.sb_dirty.store(true, SeqCst);
                s.cursor.store(0, SeqCst);
                s.action.store(action::RESYNC, SeqCst);
            }
            "recover" => {
                let mut back = Vec::new();
                for (i, l) in s.legs.iter().enumerate() {
                    if l.data.is_some()
                        && l
                            .state
                            .compare_exchange(leg::FAILED, leg::JOINING, SeqCst, SeqCst)
                            .is_ok()
                    {
                        back.push(i);
                    }
                }
                // Writes now reach the joining legs; every region written while they were
                // away has its bit set (bits are not cleared while a leg is out).
                let full = s.full_rebuild.load(SeqCst);
                for &i in &back {
                    for r in 0..s.regions as usize {
                        if full & (1 << i) != 0 || s.bits[r].load(SeqCst) != bit::CLEAN {
                            s.need[r].fetch_or(1 << i, SeqCst);
                        }
                    }
                    s.legs[i].state.store(leg::RECOVER, SeqCst);
                    tracing::info!(leg = i, "raid1: leg recovering");
                }
                if !back.is_empty() || s.regions_needing() > 0 {
                    s.sb_dirty.store(true, SeqCst);
                    s.action.store(action::RECOVER, SeqCst);
                    s.raise_event();
                }
            }
            "check" | "repair" => {
                if !s.all_in_sync() {
                    return Err("raid: a leg is not in sync; recover first".into());
                }
                s.mismatches.store(0, SeqCst);
                s.cursor.store(0, SeqCst);
                let a = if word.eq_ignore_ascii_case("check") {
                    action::CHECK
                } else {
                    action::REPAIR
                };
                s.action.store(a, SeqCst);
            }
            "stats" => {
                return Ok(format!(
                    "copied_regions {} regions_to_copy {} dirty_regions {} mismatches {} events {} region_sectors {}",
                    s.copied_regions.load(SeqCst),
                    s.regions_needing(),
                    s.bits.iter().filter(|b| b.load(SeqCst) != bit::CLEAN).count(),
                    s.mismatches.load(SeqCst),
                    s.events.load(SeqCst),
                    s.region_sectors()
                ))
            }
            _ => return Err(format!("raid: unknown message '{word}'")),
        }
        s.kick.store(true, SeqCst);
        s.ring_all();
        Ok(String::new())
    }
}
