//! The reactor's side of stateful targets: per-reactor target slots, parking, child bios,
//! copies between devices, timers and doorbells. Everything here runs on the reactor thread,
//! between the steps of `run_queues`, so target callbacks never nest.

use super::Reactor;
use crate::bio::{Bio, BioFlags, BioId, FrameKind, Op};
use crate::buf::DataBuf;
use crate::status::Status;
use crate::target::cx::{sector_bytes, CopyTask, Spawn, Timer, COPY_STEP_SECTORS};
use crate::target::{ChildCtx, ChildIo, CopyIo, Target, TargetCx, NO_TASK};
use crate::volume::{make_slots, Bell, Requeued, Slot, Tx, VolState, VolTargets};
use crate::{DevId, Sector};
use std::cmp::Reverse;
use std::sync::atomic::Ordering;

impl Reactor {
    /// Installs the target slots of a new table on `dev` (or clears them).
    pub(crate) fn install_slots(&mut self, dev: DevId, table: Option<&crate::table::Table>) {
        let slots = table.map_or_else(Vec::new, |t| make_slots(t, self.index, &self.waker));
        self.bells.retain(|b| b.vol != dev);
        for (i, s) in slots.iter().enumerate() {
            self.bells.push(Bell {
                flag: s.bell.flag.clone(),
                vol: dev,
                target: i as u16,
            });
        }
        let vt = crate::volume::vol_targets(&mut self.targets, dev);
        debug_assert_eq!(vt.parked(), 0, "table swap with parked bios");
        vt.gen = vt.gen.wrapping_add(1);
        vt.slots = slots;
    }

    /// True while target work waits for a timer, a doorbell, a parked bio or a child.
    pub fn has_target_work(&self) -> bool {
        self.tio.has_work() || !self.tio.timers.is_empty() || self.parked_total() > 0
    }

    /// Bios parked by targets on this reactor.
    pub fn parked_total(&self) -> usize {
        self.targets.iter().map(VolTargets::parked).sum()
    }

    /// The time until the next target timer, if any.
    pub(crate) fn next_target_timer(&self) -> Option<std::time::Instant> {
        self.tio.timers.peek().map(|Reverse(t)| t.due)
    }

    /// Runs the target work callbacks left: children and copies to start, bios to unpark, due
    /// timers and rung doorbells. Returns the steps taken.
    #[inline(never)]
    pub(crate) fn run_target_work(&mut self) -> usize {
        let mut n = 0;
        if self.waker.take_rung() {
            n += self.run_bells();
        }
        if !self.tio.timers.is_empty() {
            n += self.run_timers();
        }
        while let Some(s) = self.tio.spawns.pop_front() {
            self.spawn(s);
            n += 1;
        }
        while let Some((vol, target, gen, root, io)) = self.tio.copies.pop_front() {
            self.start_copy(vol, target, gen, root, io);
            n += 1;
        }
        while let Some(u) = self.tio.unparks.pop_front() {
            self.run_unpark(u.vol, u.target, u.id, u.key);
            n += 1;
        }
        n
    }

    /// Calls a target callback that is about no bio, if the table is still the one that asked.
    fn with_target(
        &mut self,
        vol: DevId,
        ti: u16,
        gen: Option<u32>,
        f: impl FnOnce(&dyn Target, &mut TargetCx<'_>),
    ) {
        // Borrowed apart (the table from `devs`, the slots and queues mutably): no `Arc` clone,
        // so a child's completion touches no shared reference count.
        let index = self.index;
        let Reactor {
            devs,
            targets,
            tio,
            fallback,
            ..
        } = self;
        let Some(Slot::Volume(VolState { table: Some(t), .. })) = devs.get(vol.0 as usize) else {
            return;
        };
        let Some(e) = t.entries().get(ti as usize) else {
            return;
        };
        let Some(vt) = targets.get_mut(vol.0 as usize) else {
            return;
        };
        if gen.is_some_and(|g| g != vt.gen) || vt.slots.len() <= ti as usize {
            return;
        }
        let mut tx = Tx {
            vol,
            reactor: index,
            vt,
            tio,
        };
        let mut cx = tx.cx(ti, None, None, fallback);
        f(&*e.target, &mut cx);
    }

    fn run_bells(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.bells.len() {
            let Some(b) = self.bells.get(i) else { break };
            if b.flag.swap(false, Ordering::AcqRel) {
                let (vol, ti) = (b.vol, b.target);
                self.with_target(vol, ti, None, |t, cx| t.wake(cx));
                n += 1;
            }
        }
        n
    }

    fn run_timers(&mut self) -> usize {
        let now = std::time::Instant::now();
        let mut n = 0;
        while let Some(Reverse(t)) = self.tio.timers.peek().copied() {
            if t.due > now {
                break;
            }
            self.tio.timers.pop();
            let Timer {
                vol,
                gen,
                target,
                token,
                ..
            } = t;
            self.with_target(vol, target, Some(gen), |t, cx| t.timer(cx, token));
            n += 1;
        }
        n
    }

    /// Starts a child bio: a pool bio with a `Child` bottom frame, counted in flight on the
    /// volume of the target that sent it.
    fn spawn(&mut self, s: Spawn) {
        let c = self
            .pool
            .alloc(false)
            .expect("clone allocation never fails");
        let io = s.io;
        let cb = self.pool.get_mut(c);
        cb.op = io.op;
        cb.flags = io.flags;
        cb.dev = io.dev;
        cb.sector = io.sector;
        cb.sectors = io.sectors;
        cb.copy_src = io.copy_src;
        cb.data = if io.op.has_data() {
            io.data
        } else {
            DataBuf::EMPTY
        };
        cb.status = Status::Ok;
        cb.map_index = 0;
        cb.user_data = 0;
        cb.parent = None;
        cb.root = s.root.unwrap_or(c);
        cb.touched = 0;
        cb.rq_next = None;
        let ctx = ChildCtx {
            tag: io.tag,
            task: s.task,
            _pad: 0,
        };
        cb.frames.push(
            FrameKind::Child { target: s.target },
            s.vol,
            &ctx,
            &mut self.fallback,
        );
        if let Some(Slot::Volume(v)) = self.devs.get_mut(s.vol.0 as usize) {
            v.inflight += 1;
        }
        self.stats.child_ios += 1;
        self.submit_q.push_back(c);
    }

    /// A child's bottom frame was reached: the child is done. Frees it, then runs the target's
    /// `child_done` (or the next step of the copy it belongs to).
    pub(crate) fn child_complete(&mut self, id: BioId, vol: DevId, target: u16) {
        let bio: &mut Bio = self.pool.get_mut(id);
        bio.frames.pop();
        let ctx: ChildCtx = bio.popped_ctx();
        let (status, root) = (bio.status, bio.root);
        self.pool.free(id, &mut self.fallback);
        if let Some(Slot::Volume(v)) = self.devs.get_mut(vol.0 as usize) {
            v.inflight -= 1;
        }
        let root = (root != id).then_some(root);
        if ctx.task != NO_TASK {
            self.copy_step_done(ctx.task, status, root);
            return;
        }
        self.with_target(vol, target, None, |t, cx| {
            cx.root = root;
            t.child_done(cx, ctx.tag, status)
        });
    }

    fn start_copy(&mut self, vol: DevId, target: u16, gen: u32, root: Option<BioId>, io: CopyIo) {
        if io.sectors == 0 {
            self.with_target(vol, target, Some(gen), |t, cx| {
                t.copy_done(cx, io.tag, Status::Ok)
            });
            return;
        }
        let native = io.src_dev == io.dst_dev;
        let buf = if native {
            u32::MAX
        } else {
            match self
                .tio
                .bounce
                .get(sector_bytes(io.sectors.min(COPY_STEP_SECTORS)))
            {
                Some(b) => b.id(),
                None => {
                    self.with_target(vol, target, Some(gen), |t, cx| {
                        t.copy_done(cx, io.tag, Status::Again)
                    });
                    return;
                }
            }
        };
        let task = CopyTask {
            vol,
            target,
            gen,
            io,
            done: 0,
            chunk: 0,
            buf,
            phase: 0,
            root,
        };
        let idx = match self.tio.free_tasks.pop() {
            Some(i) => {
                self.tio.tasks[i as usize] = task;
                i
            }
            None => {
                self.tio.tasks.push(task);
                (self.tio.tasks.len() - 1) as u32
            }
        };
        self.copy_issue(idx);
    }

    /// Issues the current step of copy task `idx`.
    fn copy_issue(&mut self, idx: u32) {
        let t = &mut self.tio.tasks[idx as usize];
        let io = t.io;
        let child = if t.buf == u32::MAX {
            ChildIo {
                op: Op::Copy,
                flags: BioFlags::NONE,
                dev: io.dst_dev,
                sector: io.dst,
                sectors: io.sectors,
                copy_src: io.src,
                data: DataBuf::EMPTY,
                tag: 0,
            }
        } else {
            if t.phase == 0 {
                t.chunk = (io.sectors - t.done).min(COPY_STEP_SECTORS);
            }
            let read = t.phase == 0;
            let (chunk, done, buf) = (t.chunk, t.done as Sector, t.buf);
            let data = self.tio.bounce.window(buf).slice(0, sector_bytes(chunk));
            ChildIo {
                op: if read { Op::Read } else { Op::Write },
                flags: BioFlags::NONE,
                dev: if read { io.src_dev } else { io.dst_dev },
                sector: if read { io.src } else { io.dst } + done,
                sectors: chunk,
                copy_src: 0,
                data,
                tag: 0,
            }
        };
        let t = self.tio.tasks[idx as usize];
        self.spawn(Spawn {
            vol: t.vol,
            target: t.target,
            root: t.root,
            io: child,
            task: idx,
        });
    }

    fn copy_step_done(&mut self, idx: u32, status: Status, root: Option<BioId>) {
        let t = &mut self.tio.tasks[idx as usize];
        let mut finished = !status.is_ok() || t.buf == u32::MAX;
        if !finished {
            if t.phase == 0 {
                t.phase = 1;
            } else {
                t.done += t.chunk;
                t.phase = 0;
                self.stats.copy_emulated_bytes += sector_bytes(t.chunk) as u64;
                finished = t.done >= t.io.sectors;
            }
        } else if status.is_ok() {
            self.stats.copy_offloaded_bytes += sector_bytes(t.io.sectors) as u64;
        }
        if !finished {
            self.copy_issue(idx);
            return;
        }
        let t = *t;
        if t.buf != u32::MAX {
            self.tio.bounce.put(t.buf);
        }
        self.tio.free_tasks.push(idx);
        self.with_target(t.vol, t.target, Some(t.gen), |tg, cx| {
            cx.root = root;
            tg.copy_done(cx, t.io.tag, status)
        });
    }

    /// Hands an unparked bio to its target's `unparked` and carries out the answer.
    fn run_unpark(&mut self, vol: DevId, ti: u16, id: BioId, key: u64) {
        crate::volume::remap_at(self.parts(), vol, ti, id, Some(key));
    }

    /// A noflush suspend: bios parked (not held) by the volume's targets go back up to the
    /// volume, to be mapped again through whatever table is live after the resume.
    pub(crate) fn push_back_parked(&mut self, dev: DevId) {
        let Some(vt) = self.targets.get_mut(dev.0 as usize) else {
            return;
        };
        // Control path (a suspend) or a rare sweep: the list may allocate.
        let mut out: Vec<(BioId, u16, u64)> = Vec::new();
        for (ti, s) in vt.slots.iter_mut().enumerate() {
            s.parked.retain(|p| {
                if p.pinned {
                    true
                } else {
                    out.push((p.id, ti as u16, p.key));
                    false
                }
            });
        }
        for (id, target, key) in out {
            self.push_back(Requeued {
                id,
                vol: dev,
                target,
                due: None,
            });
            self.with_target(dev, target, None, |t, cx| t.pushed_back(cx, key));
        }
    }
}
