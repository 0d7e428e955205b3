//! Suspending a volume without holding the engine lock while it drains: the lock is taken to
//! start the suspend, released for the wait, and taken again to finish it (see
//! `stackbd_core::engine::suspend`). Every verb that suspends (`suspend`, and `resume`,
//! `reload`, `remove` when they must suspend first) goes through [`suspend_unlocked`], so no
//! control verb waits on another volume's drain.
//!
//! A `suspend` of a volume whose suspend is already draining waits for that one (polling every
//! few ms, without the lock) and then reports the volume as already suspended, or starts its own
//! if the first gave up. `resume`, `reload` and `remove` of a suspending volume are refused by
//! the engine with "busy: suspending".

use super::{engine, es, Daemon};
use stackbd_core::engine::SuspendStart;
use stackbd_core::{Engine, EngineError, SuspendOpts};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

/// How a [`suspend_unlocked`] went.
pub(super) struct Suspended<'a> {
    /// The engine, locked again, with the volume suspended.
    pub(super) engine: MutexGuard<'a, Engine>,
    /// The volume was suspended before this call (nothing was drained).
    pub(super) already: bool,
}

/// Suspends `name`, holding the engine lock only to start and to finish; the drain waits on
/// the calling (control client) thread without it. Waits for a suspend of the same volume that
/// is already draining (at most its drain timeout and a second more). Blocks up to the drain
/// timeout; allocates a little (the pending suspend).
pub(super) fn suspend_unlocked<'a>(
    d: &'a Daemon,
    name: &str,
    opts: SuspendOpts,
) -> Result<Suspended<'a>, String> {
    let give_up = Instant::now()
        .checked_add(opts.drain_timeout + Duration::from_secs(1))
        .ok_or_else(|| format!("'{name}': suspend drain timeout out of range"))?;
    loop {
        let mut e = engine(d);
        match e.suspend_start(name, opts) {
            Ok(SuspendStart::Already) => {
                return Ok(Suspended {
                    engine: e,
                    already: true,
                })
            }
            Ok(SuspendStart::Pending(mut p)) => {
                drop(e);
                p.wait();
                let mut e = engine(d);
                e.suspend_finish(p).map_err(es)?;
                return Ok(Suspended {
                    engine: e,
                    already: false,
                });
            }
            Err(EngineError::Busy { .. }) if e.is_suspending(name) && Instant::now() < give_up => {
                // Another client's suspend of this volume drains: wait for it, unlocked.
                drop(e);
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(err) => return Err(es(err)),
        }
    }
}
