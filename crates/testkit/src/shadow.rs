//! `shadow`: a test target built only on the public [`TargetCx`], to prove that a stateful
//! target can be written on it. It behaves as `linear` to whoever reads and writes it, but
//! takes the long way for every write and every other read:
//!
//! ```text
//! shadow <dev> <offset> <backup_dev> <backup_offset> <delay_ms>
//! ```
//!
//! - a write first **copies** the range it is about to overwrite from `dev` to `backup_dev`
//!   (a copy job through the core, parked meanwhile: `Park`, pushed back by a `noflush`
//!   suspend), then waits `delay_ms` on a reactor **timer** (still parked), then is sent to
//!   `dev` as a **child** bio pointing into the parked bio's data (`Hold`, kept through a
//!   `noflush` suspend), and completes with the child's status;
//! - every other read on a reactor is also sent as a child into the parked bio's data; the
//!   others are remapped as `linear` would;
//! - discards, write-zeroes and flushes are remapped.
//!
//! So `backup_dev` holds, for each written range, what `dev` held just before the last write
//! to it. Per-reactor state (made by `reactor_state`) counts reads and keeps the children's
//! statuses until their bios are unparked; nothing is shared between reactors but the
//! counters the tests read.

use stackbd_core::target::{expect_args, parse_num, TargetExtent};
use stackbd_core::{
    ArgError, Bio, ChildIo, CopyIo, CtorCx, DevId, DevRef, Limits, MapResult, Op, ReactorInit,
    Sector, Status, Target, TargetCx, TargetRegistry,
};
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Key bits: which phase a parked bio is in.
const COPYING: u64 = 1 << 62;
const CHILD: u64 = 1 << 61;
const SEQ_MASK: u64 = CHILD - 1;

/// What the target did, for tests (shared, updated with relaxed atomics off the hot path of
/// any real target: this is a test device).
#[derive(Debug, Default)]
pub struct ShadowCounters {
    pub copies: AtomicU64,
    pub timers: AtomicU64,
    pub children: AtomicU64,
    pub remapped_reads: AtomicU64,
}

#[derive(Debug)]
pub struct Shadow {
    dev: DevRef,
    offset: Sector,
    backup: DevRef,
    backup_offset: Sector,
    delay: Duration,
    counters: Arc<ShadowCounters>,
}

/// Per-reactor state.
struct State {
    seq: u64,
    reads: u64,
    /// Children's statuses, by key, until their bios are unparked.
    results: Vec<(u64, Status)>,
}

impl Shadow {
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        expect_args(
            args,
            5,
            "<dev> <offset> <backup_dev> <backup_offset> <delay_ms>",
        )?;
        let offset: Sector = parse_num("offset", args[1])?;
        let backup_offset: Sector = parse_num("backup_offset", args[3])?;
        let delay_ms: u64 = parse_num("delay_ms", args[4])?;
        if delay_ms > 60_000 {
            return Err(ArgError::new("delay_ms", "at most 60000"));
        }
        let (dev, _) = cx.device("dev", args[0], offset, cx.len)?;
        let (backup, _) = cx.device("backup_dev", args[2], backup_offset, cx.len)?;
        Ok(Box::new(Shadow {
            dev,
            offset,
            backup,
            backup_offset,
            delay: Duration::from_millis(delay_ms),
            counters: Arc::new(ShadowCounters::default()),
        }))
    }

    fn child(&self, cx: &mut TargetCx<'_>, bio: &Bio, key: u64) -> MapResult {
        cx.submit_child(ChildIo {
            op: bio.op,
            flags: bio.flags,
            dev: self.dev.id,
            sector: self.offset + bio.sector,
            sectors: bio.sectors,
            copy_src: 0,
            data: bio.data,
            tag: key | CHILD,
        });
        self.counters.children.fetch_add(1, Ordering::Relaxed);
        MapResult::Hold { key: key | CHILD }
    }
}

impl Target for Shadow {
    fn kind(&self) -> &'static str {
        "shadow"
    }

    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        match bio.op {
            Op::Write => {
                let st = cx.state::<State>();
                st.seq = (st.seq + 1) & SEQ_MASK;
                let seq = st.seq;
                cx.copy(CopyIo {
                    src_dev: self.dev.id,
                    src: self.offset + bio.sector,
                    dst_dev: self.backup.id,
                    dst: self.backup_offset + bio.sector,
                    sectors: bio.sectors,
                    tag: seq,
                });
                self.counters.copies.fetch_add(1, Ordering::Relaxed);
                // Remapped and a frame pushed before parking, as a target may: the core drops
                // both (a parked bio is as `map` got it).
                cx.push(bio, &seq);
                bio.dev = self.dev.id;
                bio.sector += self.offset;
                MapResult::Park { key: seq | COPYING }
            }
            Op::Read => {
                let st = cx.state::<State>();
                st.reads += 1;
                st.seq = (st.seq + 1) & SEQ_MASK;
                let (odd, seq) = (st.reads % 2 == 1, st.seq);
                if odd {
                    return self.child(cx, bio, seq);
                }
                self.counters.remapped_reads.fetch_add(1, Ordering::Relaxed);
                bio.dev = self.dev.id;
                bio.sector += self.offset;
                MapResult::Remapped
            }
            _ => {
                bio.dev = self.dev.id;
                if bio.op != Op::Flush {
                    bio.sector += self.offset;
                }
                MapResult::Remapped
            }
        }
    }

    fn unparked(&self, bio: &mut Bio, cx: &mut TargetCx<'_>, key: u64) -> MapResult {
        let st = cx.state::<State>();
        // A child's end, or a failed copy-on-write (the write must not go on over data it
        // could not save): complete with the status kept for the key.
        if let Some(i) = st.results.iter().position(|r| r.0 == key) {
            return MapResult::Done(st.results.swap_remove(i).1);
        }
        if key & CHILD != 0 {
            return MapResult::Done(Status::IoError);
        }
        // The copy is done and the delay passed: write through a child into this bio's data.
        self.child(cx, bio, key & SEQ_MASK)
    }

    fn copy_done(&self, cx: &mut TargetCx<'_>, tag: u64, status: Status) {
        if !status.is_ok() {
            cx.state::<State>().results.push((tag | COPYING, status));
            cx.unpark(tag | COPYING);
            return;
        }
        // Move the bio from "copying" to "waiting for its timer": unpark happens on the timer.
        cx.timer_at(Instant::now() + self.delay, tag);
    }

    fn timer(&self, cx: &mut TargetCx<'_>, token: u64) {
        self.counters.timers.fetch_add(1, Ordering::Relaxed);
        // Its key is still `token | COPYING`: unpark it and let `unparked` see a plain key.
        let n = cx.unpark(token | COPYING);
        debug_assert!(n <= 1);
    }

    fn child_done(&self, cx: &mut TargetCx<'_>, tag: u64, status: Status) {
        cx.state::<State>().results.push((tag, status));
        cx.unpark(tag);
    }

    fn reactor_state(&self, _init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        Some(Box::new(State {
            seq: 0,
            reads: 0,
            results: Vec::with_capacity(4096),
        }))
    }

    fn frame_bytes(&self) -> usize {
        8
    }

    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        child(self.dev.id)
    }

    fn extent(&self, offset: Sector, len: Sector) -> TargetExtent {
        TargetExtent::Dev {
            dev: self.dev.id,
            sector: self.offset + offset,
            len,
        }
    }

    fn devices(&self) -> Vec<DevId> {
        vec![self.dev.id, self.backup.id]
    }

    fn args(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.dev,
            self.offset,
            self.backup,
            self.backup_offset,
            self.delay.as_millis()
        )
    }

    fn status(&self) -> String {
        let c = &self.counters;
        format!(
            "copies {} timers {} children {} remapped_reads {}",
            c.copies.load(Ordering::Relaxed),
            c.timers.load(Ordering::Relaxed),
            c.children.load(Ordering::Relaxed),
            c.remapped_reads.load(Ordering::Relaxed)
        )
    }
}

/// Registers `shadow` in a registry (the built-in targets are not touched).
pub fn register(r: &mut TargetRegistry) {
    r.register("shadow", Shadow::ctor);
}

/// Every built-in target plus `shadow`.
pub fn registry() -> TargetRegistry {
    let mut r = stackbd_targets::registry();
    register(&mut r);
    r
}
