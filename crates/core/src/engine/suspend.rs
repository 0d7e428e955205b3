//! Suspend in three steps, so a control plane that keeps its engine behind a lock never holds
//! that lock while a volume drains:
//!
//! 1. [`Engine::suspend_start`] (engine borrowed mutably, briefly): marks the volume
//!    *suspending*, presuspends its targets and tells the reactors to hold new I/O; returns a
//!    [`PendingSuspend`].
//! 2. [`PendingSuspend::wait`] (no engine needed): blocks the calling thread until the
//!    reactors have no I/O in flight for the volume, or the drain timeout passes. With an
//!    inline engine (no reactor threads) nothing drains unless the engine is polled, so this
//!    returns at once and the drain happens in step 3.
//! 3. [`Engine::suspend_finish`] (engine borrowed mutably again): marks the volume suspended,
//!    or, when the drain timed out, undoes step 1 (reactors resumed, presuspend undone) and
//!    returns the error.
//!
//! While a volume is suspending: a second `suspend`, `resume`, `reload` and `remove` of it are
//! refused with "busy: suspending" (the daemon makes a second `suspend` wait for the first
//! instead); `load`, `clear`, `message`, `queue` and queries go on (they touch neither the live
//! table nor the suspend state); [`Engine::release`] (shutdown) cancels the suspend, and its
//! `suspend_finish` then reports that. Every [`PendingSuspend`] must be finished: one dropped
//! unfinished leaves its volume suspending (new I/O held) until it is released.

use super::{bounds, DevEntry, Engine, EngineError, Reactors, SuspendOpts, VolumeEntry};
use crate::runtime::DrainWait;
use crate::DevId;
use std::time::{Duration, Instant};

/// A suspend under way, as the volume records it.
#[derive(Debug)]
pub(super) struct Suspending {
    token: u64,
    since: Instant,
}

/// How the drain of a pending suspend is waited for.
enum Drain {
    /// Inline engine: only polling the engine drains; done in `suspend_finish`.
    Inline,
    /// Reactor threads: their acknowledgements, waited for without the engine.
    Threads(DrainWait),
    /// Waited for already: drained or not.
    Done(bool),
}

/// A suspend started by [`Engine::suspend_start`]: owned by the caller, waited on by any
/// thread without the engine ([`PendingSuspend::wait`]), and handed back to
/// [`Engine::suspend_finish`]. Not `Clone`; it must be finished exactly once.
pub struct PendingSuspend {
    name: String,
    id: DevId,
    token: u64,
    opts: SuspendOpts,
    /// The deadline instant as it was checked at the start (it fit then).
    fits: Option<Instant>,
    started: Instant,
    drain: Drain,
}

/// What [`Engine::suspend_start`] did.
pub enum SuspendStart {
    /// The volume was suspended already: nothing to wait for or finish.
    Already,
    /// The drain is under way.
    Pending(PendingSuspend),
}

impl PendingSuspend {
    /// The volume being suspended.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When the drain gives up.
    fn drain_deadline(&self) -> Option<Instant> {
        self.started.checked_add(self.opts.drain_timeout)
    }

    /// Waits (blocking this thread, not the engine) until the volume's in-flight I/O drained
    /// or the drain timeout passed. With an inline engine it returns at once: the drain then
    /// happens in [`Engine::suspend_finish`]. Allocates nothing.
    pub fn wait(&mut self) {
        let deadline = self.drain_deadline();
        if let Drain::Threads(w) = &mut self.drain {
            let ok = w.wait_until(deadline);
            self.drain = Drain::Done(ok);
        }
    }
}

impl Engine {
    /// Suspends: new I/O is held (not failed), in-flight I/O drains. A deadline or drain
    /// timeout out of range (see [`SuspendOpts::check`]) is refused before anything changes.
    /// Blocks the caller (and holds `&mut self`) for the drain; a control plane that must
    /// stay responsive uses the three steps ([`Engine::suspend_start`]) instead.
    pub fn suspend(&mut self, name: &str, opts: SuspendOpts) -> Result<(), EngineError> {
        match self.suspend_start(name, opts)? {
            SuspendStart::Already => Ok(()),
            SuspendStart::Pending(p) => self.suspend_finish(p),
        }
    }

    /// Step 1: checks the request, marks the volume suspending, presuspends its targets and
    /// holds its new I/O. Refused (busy) while another suspend of the volume drains. Quick: no
    /// wait for I/O.
    pub fn suspend_start(
        &mut self,
        name: &str,
        opts: SuspendOpts,
    ) -> Result<SuspendStart, EngineError> {
        let (id, v) = self.volume(name)?;
        opts.check(name)?;
        Engine::not_suspending(name, v)?;
        // Fits now; so it fits when the drain is done (or the earlier instant stands).
        let fits = match opts.deadline {
            Some(d) => Some(bounds::instant_after(
                name,
                "suspend deadline",
                Instant::now(),
                d,
            )?),
            None => None,
        };
        if v.suspended.is_some() {
            return Ok(SuspendStart::Already);
        }
        if let Some(t) = &v.active {
            for e in t.entries() {
                e.target.presuspend(opts.noflush);
            }
        }
        let noflush = opts.noflush;
        self.reactors.each(move |r| r.suspend(id, noflush));
        let drain = match &self.reactors {
            Reactors::Inline(_) => Drain::Inline,
            Reactors::Threads(t) => Drain::Threads(t.drain_start(id)),
        };
        let token = self.next_suspend_token;
        self.next_suspend_token = token.wrapping_add(1);
        let started = Instant::now();
        self.volume_mut(id).suspending = Some(Suspending {
            token,
            since: started,
        });
        tracing::info!(volume = %name, noflush, "suspending: new I/O held, in-flight I/O draining");
        Ok(SuspendStart::Pending(PendingSuspend {
            name: name.to_string(),
            id,
            token,
            opts,
            fits,
            started,
            drain,
        }))
    }

    /// Step 3: marks the volume suspended once drained; when the drain timed out, lets the
    /// volume go on as before (held I/O released, presuspend undone) and says so. An inline
    /// engine drains here (polling its reactor); a threaded one whose drain was not waited for
    /// waits here. Refused when the suspend was cancelled meanwhile ([`Engine::release`]).
    pub fn suspend_finish(&mut self, mut p: PendingSuspend) -> Result<(), EngineError> {
        let deadline = p.drain_deadline();
        let drained = match std::mem::replace(&mut p.drain, Drain::Done(false)) {
            Drain::Done(ok) => ok,
            Drain::Threads(mut w) => w.wait_until(deadline),
            Drain::Inline => match &mut self.reactors {
                Reactors::Inline(r) => {
                    while r.inflight(p.id) > 0 && deadline.is_none_or(|d| Instant::now() <= d) {
                        if r.poll() == 0 {
                            std::thread::yield_now();
                        }
                    }
                    r.inflight(p.id) == 0
                }
                Reactors::Threads(t) => t.drain(p.id, p.opts.drain_timeout),
            },
        };
        let name = p.name.as_str();
        let id = p.id;
        let ours = matches!(
            self.devs.get(id.0 as usize),
            Some(DevEntry::Volume(v)) if v.suspending.as_ref().is_some_and(|s| s.token == p.token)
        );
        if !ours {
            return Err(EngineError::invalid(
                name,
                "suspend cancelled while it drained (the volume was released); volume left active",
            ));
        }
        self.volume_mut(id).suspending = None;
        if !drained {
            self.undo_suspend(id);
            tracing::warn!(volume = %name, timeout = ?p.opts.drain_timeout, "suspend gave up: I/O still in flight");
            return Err(EngineError::invalid(
                name,
                format!(
                    "suspend gave up: I/O still in flight after {:?}; volume left active",
                    p.opts.drain_timeout
                ),
            ));
        }
        let until = p
            .opts
            .deadline
            .and_then(|d| Instant::now().checked_add(d))
            .or(p.fits);
        self.volume_mut(id).suspended = Some(until);
        self.suspended_count += 1;
        tracing::info!(volume = %name, deadline = ?p.opts.deadline, "suspended");
        Ok(())
    }

    /// Lets a volume whose suspend did not complete go on as before: held I/O released, its
    /// targets' presuspend undone.
    pub(super) fn undo_suspend(&mut self, id: DevId) {
        self.reactors.each(move |r| r.resume(id));
        if let Some(t) = &self.volume_mut(id).active {
            t.entries().iter().for_each(|e| e.target.resume());
        }
    }

    /// Cancels a pending suspend of `id` (shutdown): the volume goes on as before; the
    /// suspend's `suspend_finish` then reports the cancellation. False if none was pending.
    pub(super) fn cancel_suspend(&mut self, id: DevId) -> bool {
        if self.volume_mut(id).suspending.take().is_none() {
            return false;
        }
        self.undo_suspend(id);
        true
    }

    /// Busy while a suspend of the volume drains.
    pub(super) fn not_suspending(name: &str, v: &VolumeEntry) -> Result<(), EngineError> {
        match &v.suspending {
            None => Ok(()),
            Some(s) => Err(EngineError::Busy {
                name: name.into(),
                reason: format!(
                    "suspending (a suspend has been draining its I/O for {:.1} s)",
                    s.since.elapsed().as_secs_f64()
                ),
            }),
        }
    }

    /// For `info`: how long a suspend has been draining (monotonic; callers that want a wall
    /// clock instant subtract it from their own `SystemTime::now()`).
    pub(super) fn suspending_info(v: &VolumeEntry) -> Option<Duration> {
        v.suspending.as_ref().map(|s| s.since.elapsed())
    }

    /// For `info`: how long until a suspended volume resumes by itself.
    pub(super) fn deadline_left(v: &VolumeEntry) -> Option<Duration> {
        match v.suspended {
            Some(Some(t)) => Some(t.saturating_duration_since(Instant::now())),
            _ => None,
        }
    }

    /// True while a suspend of the volume drains.
    pub fn is_suspending(&self, name: &str) -> bool {
        self.volume(name).is_ok_and(|(_, v)| v.suspending.is_some())
    }
}
