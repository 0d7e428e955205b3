//! Targets: the pieces of a table that map bios onto underlying devices.
//!
//! A target is one table line. Its instance (`Box<dyn Target>`, shared by every reactor) holds the
//! table's arguments and whatever shared state the target chooses (metadata, exception tables,
//! leg health). Its data-path callbacks (`map`, `end_io`, `unparked`, `child_done`, `copy_done`,
//! `timer`, `wake`) run on a reactor thread, get that reactor's [`TargetCx`], and may keep
//! per-reactor state (made by [`Target::reactor_state`]) that no other thread touches.
//!
//! Contract for every data-path callback: it runs on a reactor thread, to the end, and must not
//! block, take a lock another thread may hold while waiting, allocate in steady state, or
//! recurse into the reactor. What it wants done (child I/O, copies, timers, unparks) it asks of
//! the [`TargetCx`], which the reactor carries out after the callback returns.

mod ctor;
pub(crate) mod cx;

pub use crate::service::Doorbell;
pub use ctor::{
    expect_args, parse_num, ArgError, CtorCx, CtorFn, DevInfo, DeviceLookup, TargetRegistry,
};
pub use cx::{Bounce, ChildIo, CopyIo, ReactorInit, TargetCx};
pub(crate) use cx::{ChildCtx, TargetIo, TargetSlot, NO_TASK};

use crate::bio::Bio;
use crate::limits::Limits;
use crate::status::Status;
use crate::{DevId, Sector};
use std::any::Any;
use std::fmt;

/// What `Target::map` (or `Target::unparked`) did with a bio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapResult {
    /// The target set `bio.dev` and `bio.sector`; the core passes it down.
    Remapped,
    /// Complete the bio now with this status (the core defers it to the completion queue).
    Done(Status),
    /// The target cannot map it now (no usable path) and left it unchanged: the core keeps it on
    /// the volume's requeue list and calls `map` again after `REQUEUE_DELAY` (or sooner, when a
    /// reactor turn finds the list due). Used by `queue_if_no_path`.
    Requeue,
    /// Park the bio on this reactor under `key` (a chunk being copied, a metadata commit, a
    /// delay). The core keeps it, as `map` got it: a frame the target pushed in this same call
    /// is dropped and the target-relative sector restored. It stays parked, counted in flight
    /// for suspend, until the target unparks its key ([`TargetCx::unpark`]); then
    /// [`Target::unparked`] decides what happens to it. A `noflush` suspend pushes parked bios
    /// back to their volume, to be mapped again through the next table.
    Park { key: u64 },
    /// As `Park`, but the bio stays with the target through a `noflush` suspend (the suspend
    /// waits for it): for a bio that child I/O still reads or writes the data of.
    Hold { key: u64 },
}

/// How long a bio a target asked to requeue waits before `map` is tried again.
pub const REQUEUE_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// What a target's `end_io` did with a completing bio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endio {
    /// Go on completing upward.
    Done,
    /// Map this bio again through the same target at once (failover after a path error). The
    /// target must have put `bio.sector` back to the target-relative sector `map` saw (from its
    /// frame); the core resets `bio.dev`, the status and the data window.
    Requeue,
    /// Park the bio under `key` (a FLUSH waiting for a metadata commit, a read waiting to be
    /// retried). As for `Requeue`, the target must have put `bio.sector` back to the
    /// target-relative sector `map` saw. On unpark, [`Target::unparked`] decides: `Done(s)`
    /// completes it upward with `s`, `Remapped` sends it down again.
    Park { key: u64 },
    /// As `Park`, kept through a `noflush` suspend (see [`MapResult::Hold`]).
    Hold { key: u64 },
}

/// A reference to an underlying device, resolved when the table was built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevRef {
    pub id: DevId,
    pub name: String,
}

impl fmt::Display for DevRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A device mapper target instance (one table line).
pub trait Target: Send + Sync + fmt::Debug + 'static {
    /// The target type, as written in tables (`linear`, `striped`, ...).
    fn kind(&self) -> &'static str;

    /// Maps a bio. On entry `bio.sector` is relative to the start of this target, and the bio
    /// neither crosses the end of the target nor a boundary reported by `max_io_len`.
    /// Reactor thread; see the module's contract. The bio belongs to the core: the target may
    /// change `dev`, `sector` and its own frame, and may point child I/O into `bio.data` only
    /// while it keeps the bio parked (the submitter's data stays valid until the bio completes).
    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult;

    /// For a target that maps every bio to one device at `sector + offset` and does nothing
    /// else (no frame, no state, no `end_io`, every op alike): `Some((device, offset))`. The
    /// core asks once when the table is built and then applies the remap itself, without a
    /// call or a `TargetCx` (`linear`). Control plane.
    fn linear_remap(&self) -> Option<(DevId, Sector)> {
        None
    }

    /// Sectors from `offset` (relative to the target start) to the next point a bio must be
    /// split at, e.g. the end of a stripe chunk. `Sector::MAX` when there is none.
    fn max_io_len(&self, _offset: Sector) -> Sector {
        Sector::MAX
    }

    /// The device each of this target's flush bios goes to (`bio.map_index` says which one is
    /// being mapped). Empty: flushes skip this target. The table sends one flush per distinct
    /// device, so a device under many targets is flushed once.
    fn flush_devices(&self) -> Vec<DevId> {
        Vec::new()
    }

    /// Runs when a bio on which this target pushed a frame completes (its frame popped, readable
    /// with `Bio::popped_ctx`). Reactor thread.
    fn end_io(&self, _bio: &mut Bio, _cx: &mut TargetCx<'_>) -> Endio {
        Endio::Done
    }

    /// Makes this target's state for one reactor, on that reactor's thread, when the table is
    /// installed there (before any bio reaches it). `init` names the reactor and carries the
    /// doorbell a service thread rings to have [`Target::wake`] run on it. May allocate (it
    /// is not the data path). The callbacks get it back with [`TargetCx::state`].
    fn reactor_state(&self, _init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        None
    }

    /// A bio this target parked was unparked (`key` as it was parked under). The bio is as it
    /// was when parked: target-relative `sector`, no frame of this target. The default maps it
    /// again. Reactor thread.
    fn unparked(&self, bio: &mut Bio, cx: &mut TargetCx<'_>, _key: u64) -> MapResult {
        self.map(bio, cx)
    }

    /// A `noflush` suspend took a bio this target had parked under `key` (not held) back to
    /// the volume: it will not be unparked here; a later `unpark` of the key finds nothing.
    /// Targets that count their parked bios adjust here. Reactor thread.
    fn pushed_back(&self, _cx: &mut TargetCx<'_>, _key: u64) {}

    /// A child bio this target sent with [`TargetCx::submit_child`] completed. The child is
    /// gone (freed); a buffer it pointed into is the target's again. Reactor thread.
    fn child_done(&self, _cx: &mut TargetCx<'_>, _tag: u64, _status: Status) {}

    /// A copy this target started with [`TargetCx::copy`] ended. Reactor thread.
    fn copy_done(&self, _cx: &mut TargetCx<'_>, _tag: u64, _status: Status) {}

    /// A timer set with [`TargetCx::timer_at`] is due. Timers of a table that is no longer live
    /// on the reactor are dropped, not run. Reactor thread.
    fn timer(&self, _cx: &mut TargetCx<'_>, _token: u64) {}

    /// This target's doorbell on this reactor rang (a service thread has results for it).
    /// Reactor thread; several rings may be folded into one call.
    fn wake(&self, _cx: &mut TargetCx<'_>) {}

    /// Bytes of frame context this target pushes per bio (0 for pure remappers).
    fn frame_bytes(&self) -> usize {
        0
    }

    /// This target's limits: its own hints stacked with the devices under it.
    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits;

    /// Where `[offset, offset + len)` (relative to the target) lies, for block status: on a
    /// device (possibly only a leading part of the range), or reading as zeros, or plain data.
    fn extent(&self, _offset: Sector, len: Sector) -> TargetExtent {
        TargetExtent::Data { len }
    }

    /// The devices this target uses.
    fn devices(&self) -> Vec<DevId>;

    /// The arguments as a table line prints them (canonical form).
    fn args(&self) -> String;

    /// `dmsetup status` text for this target.
    fn status(&self) -> String {
        String::new()
    }

    /// A `dmsetup message`; returns the reply text.
    fn message(&self, argv: &[&str]) -> Result<String, String> {
        Err(format!(
            "{} target does not accept messages (got '{}')",
            self.kind(),
            argv.join(" ")
        ))
    }

    /// Called before the volume is suspended (`noflush` keeps I/O queued inside the target).
    fn presuspend(&self, _noflush: bool) {}

    /// Called when the volume resumes (after a suspend, with this table live).
    fn resume(&self) {}

    /// True for a request-based target (multipath with `queue_mode rq`): the volume gets a
    /// request queue that merges and sorts bios, and the target maps whole requests. Every
    /// device under a request-based table must be a leaf.
    fn request_based(&self) -> bool {
        false
    }

    /// The table became live on a volume (create, resume with a new table). Targets with
    /// background work (a path checker) start it here; `env` names the volume and carries its
    /// event counter, which the target raises on state changes (`dmsetup wait` wakes).
    fn activate(&self, _env: &TargetEnv) {}

    /// The table stopped being live (replaced by a reload, or the volume removed): stop any
    /// background work started by `activate`. May be called without `activate`.
    fn deactivate(&self) {}
}

/// What a target gets when its table goes live.
#[derive(Clone, Debug)]
pub struct TargetEnv {
    /// The volume's name, for logs.
    pub volume: String,
    /// The volume's event counter.
    pub events: std::sync::Arc<crate::events::Events>,
}

/// Answer of [`Target::extent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetExtent {
    /// The first `len` sectors lie on `dev` from `sector`.
    Dev {
        dev: DevId,
        sector: Sector,
        len: Sector,
    },
    /// `len` sectors that read as zeros and hold nothing (the `zero` target).
    Zero { len: Sector },
    /// `len` sectors of data with nothing below to ask.
    Data { len: Sector },
}
