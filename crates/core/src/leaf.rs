//! Leaves: devices that do real I/O. A leaf is shared by all reactors; each reactor talks to it
//! through its own channel (its own ring, queue or state), so the data path shares nothing.

use crate::bio::{Bio, BioId, BioPool};
use crate::limits::Limits;
use crate::status::Status;
use crate::Sector;
use std::collections::VecDeque;
use std::fmt;

/// A leaf device.
pub trait Leaf: Send + Sync + fmt::Debug {
    /// `mem`, `null`, `file`, `nbd`...
    fn kind(&self) -> &'static str;
    /// Size in sectors.
    fn size(&self) -> Sector;
    fn limits(&self) -> Limits;
    /// How the leaf was declared (`1GiB`, a path...), for listings and the state file.
    fn args(&self) -> String;
    /// A per-reactor channel to this leaf.
    fn channel(&self) -> Box<dyn LeafChannel>;

    /// Makes written data durable, outside the data path (daemon shutdown).
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// Checks that the device answers, outside the data path, as a path checker does (for a
    /// remote leaf: connect, handshake, read one block). Blocks for at most about `timeout`;
    /// never called on a reactor. A leaf whose channels back off after losing their transport
    /// should take a successful probe as the cue to reconnect at once.
    fn probe(&self, _timeout: std::time::Duration) -> Result<(), String> {
        Ok(())
    }

    /// A message to the leaf itself (`stackbd leaf message NAME ARGS...`, the leaf analogue of
    /// a target message): `argv` is the words after the leaf's name; the reply is one line of
    /// text for the operator, or an error saying what is wrong. Control plane only, from any
    /// thread (the control socket's), never a reactor, and never under the engine lock; it may
    /// block briefly (a leaf may take its own lock, or write a file). The default refuses.
    fn message(&self, _argv: &[&str]) -> Result<String, String> {
        Err(format!("{} leaf does not accept messages", self.kind()))
    }

    /// How the leaf is doing: its [`HealthState`], the last error it saw and when.
    ///
    /// Contract: the control plane calls it from any thread (the control socket's, the
    /// daemon's main loop every few seconds), never a reactor and never under the engine lock;
    /// it may block briefly (a system call such as `fstat`, a lock the data path never takes)
    /// and allocates the answer. The data path feeds it only on state transitions (a
    /// connection lost or back, an I/O error), never per I/O, and without any lock a reactor
    /// could wait on: atomics, or a lock only the control plane and helper threads take. A leaf
    /// may do its slow checks here (this call is the daemon's slow timer). The default: ok.
    fn health(&self) -> LeafHealth {
        LeafHealth::ok()
    }
}

/// A leaf's state as the control plane reports it (`leaf ls`, `stats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Serving I/O.
    Ok,
    /// Serving, with part of its means lost (some of a remote leaf's connections down).
    Degraded,
    /// Its transport is down and it is trying to get it back (I/O fails meanwhile).
    Reconnecting,
    /// Not serving: its backing is gone or every attempt to reach it fails.
    Failed,
}

impl HealthState {
    /// `ok`, `degraded`, `reconnecting`, `failed`: the words of `leaf ls` and the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Ok => "ok",
            HealthState::Degraded => "degraded",
            HealthState::Reconnecting => "reconnecting",
            HealthState::Failed => "failed",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`Leaf::health`] answers: a snapshot owned by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafHealth {
    pub state: HealthState,
    /// When the leaf entered `state`, if known.
    pub since: Option<std::time::SystemTime>,
    /// The last error the leaf saw (it may be older than `state`: a leaf that recovered keeps
    /// it), and when.
    pub last_error: Option<(String, std::time::SystemTime)>,
}

impl LeafHealth {
    /// Ok, with nothing more known.
    pub fn ok() -> LeafHealth {
        LeafHealth {
            state: HealthState::Ok,
            since: None,
            last_error: None,
        }
    }

    /// `state` since `since`, with `error` the last error (seen at `since`).
    pub fn with_error(
        state: HealthState,
        error: impl Into<String>,
        since: std::time::SystemTime,
    ) -> LeafHealth {
        LeafHealth {
            state,
            since: Some(since),
            last_error: Some((error.into(), since)),
        }
    }

    /// The last error's text, if any.
    pub fn error(&self) -> Option<&str> {
        self.last_error.as_ref().map(|(e, _)| e.as_str())
    }
}

/// One reactor's queue to a leaf.
pub trait LeafChannel: Send {
    /// Starts a bio. The bio is addressed to this leaf, in range, and its op is supported by
    /// the op checks of the core. Completion must go through `cx.complete`, never inline upward:
    /// the reactor runs it later, so the call stack stays flat.
    ///
    /// Ownership of the data (the one place the promise is made): from `submit` until the leaf
    /// completes the bio, the bytes of `bio.data` are this leaf's alone. The submitter does not
    /// touch them (the `DataBuf::from_raw` contract), the core never has two bios in flight over
    /// one range of one buffer (split pieces and request members are disjoint), and a target
    /// that points child I/O into a parked bio's data holds that bio until the children are
    /// done. So a leaf may make `&[u8]` (writes) or `&mut [u8]` (reads) of the window with
    /// `DataBuf::as_bytes`/`as_bytes_mut` for the time it holds the bio, and may hand the
    /// pointer to the kernel (io_uring) until the completion is reaped.
    fn submit(&mut self, cx: &mut LeafCx<'_>, id: BioId);

    /// Reaps finished I/O (for asynchronous leaves). Returns how many completed.
    fn poll(&mut self, _cx: &mut LeafCx<'_>) -> usize {
        0
    }

    /// True if the reactor must call `poll` (the leaf completes asynchronously).
    fn needs_poll(&self) -> bool {
        false
    }

    /// Block status of `[sector, sector + sectors)`: appends runs to `out` (adjacent runs with
    /// the same flags may be merged by the caller). The default says "all data".
    fn extents(&self, _sector: Sector, sectors: Sector, out: &mut Vec<Extent>) {
        out.push(Extent { sectors, flags: 0 });
    }

    /// A file descriptor the kernel can copy to or from (`copy_file_range`), with the id of the
    /// filesystem it lives on; `None` for leaves that are not files.
    fn copy_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        None
    }

    /// Copies `sectors` from `src` on this leaf to `dst_sector` on `dst` in the kernel, when
    /// both are files of one filesystem (`copy_file_range`, which reflinks where it can).
    /// `None`: not possible between these two (the caller emulates the copy). Reactor thread;
    /// it runs the whole copy before it returns (the copy engine's pieces bound how long).
    fn kernel_copy_to(
        &self,
        _src: Sector,
        _dst: &dyn LeafChannel,
        _dst_sector: Sector,
        _sectors: Sector,
    ) -> Option<Status> {
        None
    }

    /// Called before the reactor sleeps: hand anything still queued to the kernel and say how
    /// the reactor can learn about the next completion.
    fn prepare_wait(&mut self) -> WaitHint {
        WaitHint::Idle
    }
}

/// One run of a block-status answer (NBD `base:allocation` semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub sectors: Sector,
    /// [`Extent::HOLE`] | [`Extent::ZERO`], or 0 for allocated data.
    pub flags: u32,
}

impl Extent {
    /// Not allocated.
    pub const HOLE: u32 = 1;
    /// Reads as zeros.
    pub const ZERO: u32 = 2;
}

/// How a sleeping reactor hears from a leaf channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitHint {
    /// Nothing in flight: no need to wait for this channel.
    Idle,
    /// This fd becomes readable when a completion is ready (an io_uring ring fd).
    Fd(std::os::fd::RawFd),
    /// Completions only arrive by polling (IOPOLL rings): the reactor must not sleep.
    Spin,
}

/// What a leaf channel can touch: the bios and the completion queue.
pub struct LeafCx<'a> {
    pub(crate) pool: &'a mut BioPool,
    pub(crate) complete_q: &'a mut VecDeque<BioId>,
}

impl LeafCx<'_> {
    #[inline]
    pub fn bio(&mut self, id: BioId) -> &mut Bio {
        self.pool.get_mut(id)
    }

    /// Completes a bio with `status`; the reactor runs the completion from its queue.
    #[inline]
    pub fn complete(&mut self, id: BioId, status: Status) {
        self.pool.get_mut(id).status = status;
        self.complete_q.push_back(id);
    }
}
