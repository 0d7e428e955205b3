//! [`TargetCx`]: everything a target may do from a data-path callback, and the per-reactor
//! bookkeeping behind it (parked bios, child I/O to start, timers, bounce buffers, copies).
//!
//! Every method here runs on the reactor thread that called the target, never blocks and, once
//! warm, never allocates: the queues are sized from the bio pool when the reactor starts and
//! bounce buffers are kept for reuse. What a method asks for (a child bio, a copy, an unpark)
//! is carried out by the reactor after the callback returns, so callbacks never nest.

use crate::bio::{Bio, BioFlags, BioId, FrameFallback, FrameKind, Op};
use crate::buf::DataBuf;
use crate::service::Doorbell;
use crate::{DevId, Sector, SECTOR_SIZE};
use bytemuck::Pod;
use std::any::Any;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

/// A bio a target sends to one of its devices (data, metadata, origin, COW, a leg).
#[derive(Clone, Copy, Debug)]
pub struct ChildIo {
    pub op: Op,
    pub flags: BioFlags,
    /// Any device the target holds (from its table line).
    pub dev: DevId,
    /// Sector on `dev` (absolute, not target-relative).
    pub sector: Sector,
    pub sectors: u32,
    /// Source sector of an `Op::Copy` on `dev`.
    pub copy_src: Sector,
    /// Reads and writes: a window of a parked bio's data (valid while that bio stays parked)
    /// or of a [`Bounce`] buffer the target holds until `child_done`.
    pub data: DataBuf,
    /// Handed back to [`super::Target::child_done`].
    pub tag: u64,
}

/// A copy a target starts between two of its devices (snapshot copy-on-write, resync, merge).
/// Within one device it travels down as one `Copy` bio (offloaded wherever the stack can);
/// between devices the reactor copies through a bounce buffer, chunk by chunk.
#[derive(Clone, Copy, Debug)]
pub struct CopyIo {
    pub src_dev: DevId,
    pub src: Sector,
    pub dst_dev: DevId,
    pub dst: Sector,
    pub sectors: u32,
    /// Handed back to [`super::Target::copy_done`].
    pub tag: u64,
}

/// A pooled buffer a target holds: for data it must not write into the submitter's buffer
/// (crypt writes, read-modify-write, corrupting writes). Give it back with
/// [`TargetCx::release`]; its id fits in a frame so `end_io` or `child_done` can find it.
#[derive(Debug)]
pub struct Bounce {
    id: u32,
    data: DataBuf,
}

impl Bounce {
    /// Index to keep in a frame; [`TargetCx::bounce_data`] finds the buffer again.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The buffer, exactly as long as asked.
    pub fn data(&self) -> DataBuf {
        self.data
    }
}

/// What a target gets when its per-reactor state is made.
#[derive(Clone, Debug)]
pub struct ReactorInit {
    /// The reactor's index (0 for an engine without reactor threads).
    pub reactor: usize,
    /// Rings this target's `wake` on this reactor.
    pub doorbell: Doorbell,
}

/// Context of the bottom frame of a child bio (and of a copy's child).
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub(crate) struct ChildCtx {
    pub(crate) tag: u64,
    /// A copy task's index, or `NO_TASK` for a plain child.
    pub(crate) task: u32,
    pub(crate) _pad: u32,
}

pub(crate) const NO_TASK: u32 = u32::MAX;

/// A bio parked by a target on this reactor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Parked {
    pub(crate) id: BioId,
    pub(crate) key: u64,
    /// Held (not pushed back by a `noflush` suspend).
    pub(crate) pinned: bool,
}

/// One target instance's part of a reactor: its state, its parked bios, its doorbell.
#[derive(Debug)]
pub(crate) struct TargetSlot {
    pub(crate) state: Option<Box<dyn Any + Send>>,
    pub(crate) parked: Vec<Parked>,
    pub(crate) bell: Doorbell,
}

/// A volume's targets on this reactor: one slot per table entry, and the table's generation.
#[derive(Debug, Default)]
pub(crate) struct VolTargets {
    pub(crate) gen: u32,
    pub(crate) slots: Vec<TargetSlot>,
}

impl VolTargets {
    /// Bios parked by this volume's targets.
    pub(crate) fn parked(&self) -> usize {
        self.slots.iter().map(|s| s.parked.len()).sum()
    }
}

/// A child or copy piece to start, queued by a callback.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spawn {
    pub(crate) vol: DevId,
    pub(crate) target: u16,
    /// The top-level bio the work is for, if any (its polled wait polls what the child
    /// reaches).
    pub(crate) root: Option<BioId>,
    pub(crate) io: ChildIo,
    pub(crate) task: u32,
}

/// An unparked bio to hand to its target's `unparked`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unpark {
    pub(crate) vol: DevId,
    pub(crate) target: u16,
    pub(crate) id: BioId,
    pub(crate) key: u64,
}

/// A timer: ordered by due time, then by the order they were set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Timer {
    pub(crate) due: Instant,
    pub(crate) seq: u64,
    pub(crate) vol: DevId,
    /// The table generation the timer belongs to; timers of an older table are dropped.
    pub(crate) gen: u32,
    pub(crate) target: u16,
    pub(crate) token: u64,
}

/// A copy between devices in progress (bounce buffer, chunk by chunk) or a native one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CopyTask {
    pub(crate) vol: DevId,
    pub(crate) target: u16,
    pub(crate) gen: u32,
    pub(crate) io: CopyIo,
    pub(crate) done: u32,
    pub(crate) chunk: u32,
    /// Bounce buffer id, or `u32::MAX` for a native (one-device) copy.
    pub(crate) buf: u32,
    /// 0: reading a chunk; 1: writing it.
    pub(crate) phase: u8,
    pub(crate) root: Option<BioId>,
}

/// Sectors per step of a copy between devices.
pub(crate) const COPY_STEP_SECTORS: u32 = 2048;

/// The reactor's pool of bounce buffers: power-of-two classes from 4 KiB, made on first use and
/// kept, so steady state allocates nothing; bounded in total bytes.
#[derive(Debug, Default)]
pub(crate) struct BouncePool {
    bufs: Vec<Box<[u8]>>,
    /// Free ids per class.
    free: Vec<Vec<u32>>,
    /// Length asked for each buffer out (for `bounce_data`).
    lens: Vec<usize>,
    /// Buffers made per class (the free list of a class never needs more room than this).
    made: Vec<usize>,
    bytes: usize,
}

/// Smallest bounce class: 4 KiB.
const BOUNCE_MIN_SHIFT: u32 = 12;
/// Largest single bounce buffer: 64 MiB (more than any bio the core lets through).
const BOUNCE_MAX_SHIFT: u32 = 26;
/// Bounce memory per reactor before `bounce` says no.
const BOUNCE_MAX_BYTES: usize = 1 << 30;

impl BouncePool {
    fn class(len: usize) -> Option<u32> {
        let shift = len
            .max(1 << BOUNCE_MIN_SHIFT)
            .checked_next_power_of_two()?
            .trailing_zeros();
        (shift <= BOUNCE_MAX_SHIFT).then_some(shift - BOUNCE_MIN_SHIFT)
    }

    pub(crate) fn get(&mut self, len: usize) -> Option<Bounce> {
        let class = Self::class(len)? as usize;
        if self.free.len() <= class {
            self.free.resize_with(class + 1, Vec::new);
            self.made.resize(class + 1, 0);
        }
        let id = match self.free[class].pop() {
            Some(id) => id,
            None => {
                let size = 1usize << (class as u32 + BOUNCE_MIN_SHIFT);
                if self.bytes + size > BOUNCE_MAX_BYTES {
                    return None;
                }
                self.bytes += size;
                self.bufs.push(vec![0u8; size].into_boxed_slice());
                self.lens.push(0);
                // Room to give every buffer of this class back without growing: `put` then
                // never allocates, whatever order the buffers come back in.
                self.made[class] += 1;
                let free = &mut self.free[class];
                free.reserve(self.made[class].saturating_sub(free.len()));
                (self.bufs.len() - 1) as u32
            }
        };
        self.lens[id as usize] = len;
        Some(Bounce {
            id,
            data: self.window(id),
        })
    }

    /// The buffer `id` as handed out. Panics on an id that was never handed out (a target bug).
    pub(crate) fn window(&mut self, id: u32) -> DataBuf {
        let len = self.lens[id as usize];
        let b = &mut self.bufs[id as usize][..len];
        // SAFETY: the buffer is a boxed slice owned by this pool for the reactor's lifetime; its
        // heap memory never moves (only the Box pointer lives in the Vec) and is not handed to
        // another holder until the target that holds `id` releases it, after the bios that
        // point into it have completed (the `ChildIo::data` contract).
        unsafe { DataBuf::from_slice(b) }
    }

    pub(crate) fn put(&mut self, id: u32) {
        let size = self.bufs[id as usize].len();
        let class = (size.trailing_zeros() - BOUNCE_MIN_SHIFT) as usize;
        debug_assert!(
            !self.free[class].contains(&id),
            "bounce buffer released twice"
        );
        self.free[class].push(id);
    }
}

/// The reactor's queues for target work, shared by every target on it.
#[derive(Debug)]
pub(crate) struct TargetIo {
    pub(crate) spawns: VecDeque<Spawn>,
    pub(crate) unparks: VecDeque<Unpark>,
    pub(crate) timers: BinaryHeap<Reverse<Timer>>,
    pub(crate) timer_seq: u64,
    pub(crate) bounce: BouncePool,
    pub(crate) tasks: Vec<CopyTask>,
    pub(crate) free_tasks: Vec<u32>,
    /// Copies asked for, started by the reactor after the callback.
    pub(crate) copies: VecDeque<(DevId, u16, u32, Option<BioId>, CopyIo)>,
}

impl TargetIo {
    pub(crate) fn new(cap: usize) -> TargetIo {
        TargetIo {
            spawns: VecDeque::with_capacity(cap),
            unparks: VecDeque::with_capacity(cap),
            timers: BinaryHeap::with_capacity(cap),
            timer_seq: 0,
            bounce: BouncePool::default(),
            tasks: Vec::with_capacity(64),
            free_tasks: Vec::with_capacity(64),
            copies: VecDeque::with_capacity(64),
        }
    }

    /// True if a callback left work for the reactor.
    #[inline]
    pub(crate) fn has_work(&self) -> bool {
        !self.spawns.is_empty() || !self.unparks.is_empty() || !self.copies.is_empty()
    }
}

/// What a target may do from a data-path callback. Made by the reactor for one call.
pub struct TargetCx<'a> {
    pub(crate) vol: DevId,
    pub(crate) target: u16,
    pub(crate) reactor: usize,
    /// The bio the call is about (map, end_io, unparked), if any.
    pub(crate) id: Option<BioId>,
    pub(crate) root: Option<BioId>,
    pub(crate) fallback: &'a mut FrameFallback,
    /// The volume's target slots on this reactor and its table generation; `target` indexes
    /// this target's slot (looked up only when a method needs it: a pure remap pays nothing).
    pub(crate) vt: &'a mut VolTargets,
    pub(crate) io: &'a mut TargetIo,
    /// Frames this call pushed (dropped again if the bio is parked).
    pub(crate) pushed: u8,
}

impl TargetCx<'_> {
    /// The bio this call is about. Panics in `child_done`, `copy_done`, `timer` and `wake`,
    /// which are about no bio.
    pub fn bio_id(&self) -> BioId {
        self.id.expect("this callback is about no bio")
    }

    /// The reactor this call runs on (index into per-reactor arrays of shared state).
    pub fn reactor(&self) -> usize {
        self.reactor
    }

    /// Pushes this target's frame; its `end_io` runs when the bio completes and reads the
    /// context with `Bio::popped_ctx`. In `map` only.
    pub fn push<T: Pod>(&mut self, bio: &mut Bio, ctx: &T) {
        bio.frames.push(
            FrameKind::Target {
                target: self.target,
            },
            self.vol,
            ctx,
            self.fallback,
        );
        self.pushed += 1;
    }

    /// This target's state on this reactor, as `reactor_state` made it. Panics if it made none
    /// or one of another type (a bug in the target).
    pub fn state<T: 'static>(&mut self) -> &mut T {
        self.vt.slots[self.target as usize]
            .state
            .as_mut()
            .and_then(|s| s.downcast_mut::<T>())
            .expect("target state missing or of another type")
    }

    /// Sends a child bio to one of the target's devices. It starts after this callback
    /// returns; its end comes back to `child_done` with `io.tag`. It counts as in flight on the
    /// target's volume, so a suspend waits for it.
    pub fn submit_child(&mut self, io: ChildIo) {
        self.io.spawns.push_back(Spawn {
            vol: self.vol,
            target: self.target,
            root: self.root,
            io,
            task: super::NO_TASK,
        });
    }

    /// Starts a copy; its end comes back to `copy_done` with `io.tag`.
    pub fn copy(&mut self, io: CopyIo) {
        self.io
            .copies
            .push_back((self.vol, self.target, self.vt.gen, self.root, io));
    }

    /// Unparks this target's bios parked under `key`, in the order they were parked; each goes
    /// to `unparked` after this callback. Returns how many.
    pub fn unpark(&mut self, key: u64) -> usize {
        self.unpark_where(|k| k == key)
    }

    /// Unparks every bio of this target whose key satisfies `f` (e.g. a due time passed).
    pub fn unpark_where(&mut self, mut f: impl FnMut(u64) -> bool) -> usize {
        let (vol, target) = (self.vol, self.target);
        let unparks = &mut self.io.unparks;
        let mut n = 0;
        self.vt.slots[self.target as usize].parked.retain(|p| {
            if f(p.key) {
                unparks.push_back(Unpark {
                    vol,
                    target,
                    id: p.id,
                    key: p.key,
                });
                n += 1;
                false
            } else {
                true
            }
        });
        n
    }

    /// Bios of this target parked on this reactor.
    pub fn parked(&self) -> usize {
        self.vt.slots[self.target as usize].parked.len()
    }

    /// The smallest key parked on this reactor (e.g. the next due time).
    pub fn min_parked_key(&self) -> Option<u64> {
        self.vt.slots[self.target as usize]
            .parked
            .iter()
            .map(|p| p.key)
            .min()
    }

    /// Runs `timer(token)` on this reactor at `due` (or soon after).
    pub fn timer_at(&mut self, due: Instant, token: u64) {
        self.io.timer_seq += 1;
        self.io.timers.push(Reverse(Timer {
            due,
            seq: self.io.timer_seq,
            vol: self.vol,
            gen: self.vt.gen,
            target: self.target,
            token,
        }));
    }

    /// A bounce buffer of `bytes` (None past the reactor's bounce budget: retry later).
    pub fn bounce(&mut self, bytes: usize) -> Option<Bounce> {
        self.io.bounce.get(bytes)
    }

    /// The bounce buffer with this id, as it was handed out.
    pub fn bounce_data(&mut self, id: u32) -> DataBuf {
        self.io.bounce.window(id)
    }

    /// Gives a bounce buffer back. Only after every bio pointing into it has completed.
    pub fn release(&mut self, id: u32) {
        self.io.bounce.put(id)
    }
}

/// Bytes of a bounce window of `sectors`.
pub(crate) fn sector_bytes(sectors: u32) -> usize {
    sectors as usize * SECTOR_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn giving_every_buffer_back_never_grows_a_free_list() {
        let mut p = BouncePool::default();
        let out: Vec<Bounce> = (0..9).map(|_| p.get(4096).unwrap()).collect();
        let cap = p.free[0].capacity();
        assert!(cap >= 9, "free list has room for {cap} of 9 buffers");
        for b in out {
            p.put(b.id());
        }
        assert_eq!(p.free[0].capacity(), cap, "a put reallocated the free list");
    }

    #[test]
    fn bounce_classes_are_reused() {
        let mut p = BouncePool::default();
        let a = p.get(4096).unwrap();
        let b = p.get(5000).unwrap();
        assert_eq!(a.data().len(), 4096);
        assert_eq!(b.data().len(), 5000);
        let (ia, ib) = (a.id(), b.id());
        p.put(ia);
        p.put(ib);
        let c = p.get(3000).unwrap();
        assert_eq!(c.id(), ia, "a 4 KiB class buffer comes back");
        let d = p.get(8192).unwrap();
        assert_eq!(d.id(), ib, "8 KiB class reused");
        assert!(p.get(1 << 27).is_none(), "larger than the largest class");
    }
}
