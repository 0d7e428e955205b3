//! `delay <device> <offset> <delay> [<write_device> <write_offset> <write_delay>
//! [<flush_device> <flush_offset> <flush_delay>]]`: dm-delay. Maps each bio onto its class's
//! device and holds it there for the class's delay (milliseconds) first.
//!
//! Classes, as dm-delay sorts bios: empty flushes are the flush class; writes, discards,
//! write-zeroes and copies the write class; reads the read class. (dm-delay sends a write with
//! `PREFLUSH` to the flush class, but dm's core has split the flush off first, so it only ever
//! sees empty flushes there; our core does not split, so such a write, whose data must land on
//! the write device, is the write class.) With 3 arguments every class uses the first set; with 6, the
//! flush class uses the write set; with 9 each class has its own.
//!
//! The data path runs on reactor timers: a delayed bio is parked under its due time (ns since
//! the target's epoch, class in the low two bits) and one timer per reactor is armed for the
//! earliest due time; the timer unparks what is due and re-arms for the next. No thread, no
//! lock, no allocation per I/O.
//!
//! `status` is dm-delay's: `<reads> <writes> <flushes>` delayed (parked) now. Suspend, as in
//! dm: `presuspend` stops delaying and sends what is parked on at once (a `noflush` suspend
//! instead lets the core push parked bios back to the volume, to be delayed again after the
//! resume); `resume` delays again.

use stackbd_core::target::{parse_num, TargetExtent};
use stackbd_core::{
    ArgError, Bio, CtorCx, DevId, DevRef, Doorbell, Limits, MapResult, Op, ReactorInit, Sector,
    Target, TargetCx,
};
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Read, write and flush class indexes (also the low bits of a parked key).
const READ: usize = 0;
const WRITE: usize = 1;
const FLUSH: usize = 2;
const CLASS_BITS: u32 = 2;
const CLASS_MASK: u64 = (1 << CLASS_BITS) - 1;

/// Per-reactor status slots made at ctor; reactor `i` uses slot `i % STAT_SLOTS`.
pub const STAT_SLOTS: usize = 256;

/// The longest delay dm-delay accepts (`%u` milliseconds).
pub const MAX_DELAY_MS: u64 = u32::MAX as u64;

/// No timer armed.
const NONE: u64 = u64::MAX;

/// One class: where its bios go and how long they wait.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Class {
    dev: DevRef,
    offset: Sector,
    delay_ms: u64,
}

impl Class {
    fn parse(cx: &CtorCx<'_>, prefix: &str, args: &[&str]) -> Result<Class, ArgError> {
        let f = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}_{name}")
            }
        };
        let offset = parse_num::<Sector>(&f("offset"), args[1])?;
        let delay_ms = parse_num::<u64>(&f("delay"), args[2])
            .ok()
            .filter(|&d| d <= MAX_DELAY_MS)
            .ok_or_else(|| {
                ArgError::new(
                    f("delay"),
                    format!(
                        "'{}' is not a delay in milliseconds from 0 to {MAX_DELAY_MS}",
                        args[2]
                    ),
                )
            })?;
        let (dev, _) = cx.device(&f("device"), args[0], offset, cx.len)?;
        Ok(Class {
            dev,
            offset,
            delay_ms,
        })
    }

    fn delay_ns(&self) -> u64 {
        // At most u32::MAX ms, about 4.3e15 ns: no overflow.
        self.delay_ms * 1_000_000
    }
}

/// One reactor's counts of parked bios, alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct StatSlot {
    ops: [AtomicU64; 3],
}

/// The target's state on one reactor.
#[derive(Debug)]
struct PerReactor {
    /// Due time (ns since the epoch) of the earliest timer this reactor has armed and not yet
    /// run, or `NONE`.
    armed: u64,
    /// Bios of each class parked on this reactor, as counted into `slot`.
    parked: [u64; 3],
    slot: usize,
}

impl PerReactor {
    fn total(&self) -> u64 {
        self.parked.iter().sum()
    }
}

#[derive(Debug)]
pub struct Delay {
    /// Read, write and flush classes.
    classes: [Class; 3],
    /// 3, 6 or 9: how the table line prints back.
    argc: usize,
    epoch: Instant,
    /// False between `presuspend` and `resume`: bios are not delayed (dm's `may_delay`).
    may_delay: AtomicBool,
    stats: Box<[StatSlot]>,
    /// Each reactor's doorbell, so `presuspend` can have parked bios sent on at once.
    bells: Mutex<Vec<Doorbell>>,
}

impl Delay {
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        let argc = args.len();
        if !matches!(argc, 3 | 6 | 9) {
            return Err(ArgError::new(
                "arguments",
                format!(
                    "expected 3, 6 or 9 arguments (<device> <offset> <delay> \
                     [<write_device> <write_offset> <write_delay> \
                     [<flush_device> <flush_offset> <flush_delay>]]), got {argc}"
                ),
            ));
        }
        let read = Class::parse(cx, "", &args[0..3])?;
        let write = if argc >= 6 {
            Class::parse(cx, "write", &args[3..6])?
        } else {
            read.clone()
        };
        let flush = if argc == 9 {
            Class::parse(cx, "flush", &args[6..9])?
        } else {
            write.clone()
        };
        Ok(Box::new(Delay {
            classes: [read, write, flush],
            argc,
            epoch: Instant::now(),
            may_delay: AtomicBool::new(true),
            stats: (0..STAT_SLOTS).map(|_| StatSlot::default()).collect(),
            bells: Mutex::new(Vec::new()),
        }))
    }

    /// dm-delay's class of a bio.
    #[inline]
    fn class_of(bio: &Bio) -> usize {
        match bio.op {
            Op::Read => READ,
            Op::Flush => FLUSH,
            _ => WRITE,
        }
    }

    #[inline]
    fn remap(&self, bio: &mut Bio, class: usize) -> MapResult {
        let c = &self.classes[class];
        bio.dev = c.dev.id;
        // As dm: a bio without sectors (an empty flush) keeps its sector.
        if bio.sectors != 0 {
            bio.sector += c.offset;
            if bio.op == Op::Copy {
                bio.copy_src += c.offset;
            }
        }
        MapResult::Remapped
    }

    #[inline]
    fn now_ns(&self) -> u64 {
        // u64 nanoseconds last 584 years.
        self.epoch.elapsed().as_nanos() as u64
    }

    fn at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    /// Arms this reactor's timer for `due` unless one is armed for that time or earlier.
    #[inline]
    fn arm(&self, cx: &mut TargetCx<'_>, due: u64) {
        let st = cx.state::<PerReactor>();
        if due < st.armed {
            st.armed = due;
            cx.timer_at(self.at(due), due);
        }
    }

    /// Unparks the bios `f` picks (by due time), taking them off the status counts.
    fn release(&self, cx: &mut TargetCx<'_>, f: impl Fn(u64) -> bool) {
        let mut out = [0u64; 3];
        cx.unpark_where(|k| {
            let go = f(k >> CLASS_BITS);
            if go {
                out[(k & CLASS_MASK) as usize] += 1;
            }
            go
        });
        let st = cx.state::<PerReactor>();
        let slot = &self.stats[st.slot];
        for (i, n) in out.into_iter().enumerate() {
            if n > 0 {
                st.parked[i] -= n;
                slot.ops[i].fetch_sub(n, Ordering::Relaxed);
            }
        }
    }

    /// A `noflush` suspend pushes parked bios back to the volume without telling the target:
    /// when none is parked here any more, none is counted either.
    #[inline]
    fn reconcile(&self, cx: &mut TargetCx<'_>) {
        if cx.parked() != 0 {
            return;
        }
        let st = cx.state::<PerReactor>();
        if st.total() == 0 {
            return;
        }
        let slot = &self.stats[st.slot];
        for i in 0..3 {
            slot.ops[i].fetch_sub(st.parked[i], Ordering::Relaxed);
            st.parked[i] = 0;
        }
    }

    /// Parked bios of each class, summed over reactors.
    fn counts(&self) -> [u64; 3] {
        let mut c = [0u64; 3];
        for s in self.stats.iter() {
            for (i, v) in c.iter_mut().enumerate() {
                *v = v.wrapping_add(s.ops[i].load(Ordering::Relaxed));
            }
        }
        c
    }
}

impl Target for Delay {
    fn kind(&self) -> &'static str {
        "delay"
    }

    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        let class = Self::class_of(bio);
        let c = &self.classes[class];
        if c.delay_ms == 0 || !self.may_delay.load(Ordering::Relaxed) {
            return self.remap(bio, class);
        }
        self.reconcile(cx);
        let due = self.now_ns().saturating_add(c.delay_ns()).min(NONE >> 3);
        let st = cx.state::<PerReactor>();
        st.parked[class] += 1;
        self.stats[st.slot].ops[class].fetch_add(1, Ordering::Relaxed);
        self.arm(cx, due);
        MapResult::Park {
            key: (due << CLASS_BITS) | class as u64,
        }
    }

    fn unparked(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>, key: u64) -> MapResult {
        self.remap(bio, (key & CLASS_MASK) as usize)
    }

    fn timer(&self, cx: &mut TargetCx<'_>, _token: u64) {
        let now = self.now_ns();
        let st = cx.state::<PerReactor>();
        if st.armed <= now {
            // The earliest armed timer is this one (or ran already): none is armed now.
            st.armed = NONE;
        }
        self.reconcile(cx);
        self.release(cx, |due| due <= now);
        if let Some(k) = cx.min_parked_key() {
            self.arm(cx, k >> CLASS_BITS);
        }
    }

    fn wake(&self, cx: &mut TargetCx<'_>) {
        self.reconcile(cx);
        if !self.may_delay.load(Ordering::Acquire) {
            self.release(cx, |_| true);
        }
    }

    fn reactor_state(&self, init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        self.bells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(init.doorbell.clone());
        Some(Box::new(PerReactor {
            armed: NONE,
            parked: [0; 3],
            slot: init.reactor % STAT_SLOTS,
        }))
    }

    fn presuspend(&self, noflush: bool) {
        if !noflush {
            self.may_delay.store(false, Ordering::Release);
        }
        // Release what is parked (or, for noflush, recount after the core pushed it back).
        for b in self.bells.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            b.ring();
        }
    }

    fn resume(&self) {
        self.may_delay.store(true, Ordering::Release);
    }

    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.classes[FLUSH].dev.id]
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        let mut l = Limits::TOP;
        for c in &self.classes {
            let cl = child(c.dev.id);
            l.stack(&cl);
            l.check_alignment(&cl, c.offset);
        }
        l
    }

    fn extent(&self, offset: Sector, len: Sector) -> TargetExtent {
        // Copies are routed by extent, not `map`: name a device only when every class lands on
        // the same place and nothing is delayed, so a copy never skips a delay or lands on the
        // read device when writes go elsewhere.
        let [r, w, f] = &self.classes;
        if r.dev.id == w.dev.id
            && r.dev.id == f.dev.id
            && r.offset == w.offset
            && r.offset == f.offset
            && self.classes.iter().all(|c| c.delay_ms == 0)
        {
            return TargetExtent::Dev {
                dev: r.dev.id,
                sector: r.offset + offset,
                len,
            };
        }
        TargetExtent::Data { len }
    }

    fn devices(&self) -> Vec<DevId> {
        let mut v: Vec<DevId> = Vec::with_capacity(3);
        for c in &self.classes {
            if !v.contains(&c.dev.id) {
                v.push(c.dev.id);
            }
        }
        v
    }

    fn args(&self) -> String {
        let n = self.argc / 3;
        self.classes[..n]
            .iter()
            .map(|c| format!("{} {} {}", c.dev, c.offset, c.delay_ms))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn status(&self) -> String {
        let [r, w, f] = self.counts();
        format!("{r} {w} {f}")
    }
}
