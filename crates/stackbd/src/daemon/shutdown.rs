//! How `serve` stops, and that it always does: SIGTERM/SIGINT (or a `shutdown` request) lets
//! suspended volumes' held I/O go on, drains the connections within a bound, flushes the
//! leaves, writes the state and exits 0. A connection that still has I/O in flight after the
//! bound is abandoned (named in the log) and the exit status is 1; a second signal, or a
//! shutdown that outlives its overall bound, forces the exit at once (status 2) and says what
//! was left undone.

use super::Daemon;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Exit status of a forced exit (second signal or the overall bound).
pub const FORCED_EXIT: i32 = 2;

/// What the rest of a shutdown may take beyond the drain bound (flushing leaves, writing the
/// state, stopping the reactors) before it is forced.
pub const REST_BOUND: Duration = Duration::from_secs(60);

/// Signals counted since start; each also sets the daemon's stop flag.
pub fn install_signals(stop: &Arc<AtomicBool>) -> Result<Arc<AtomicUsize>, String> {
    let count = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let (c, s) = (count.clone(), stop.clone());
        // SAFETY: the handler only touches atomics, which is async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                c.fetch_add(1, Ordering::SeqCst);
                s.store(true, Ordering::SeqCst);
            })
        }
        .map_err(|e| format!("signal handler: {e}"))?;
    }
    Ok(count)
}

/// Where a shutdown is, for the forced-exit message.
#[derive(Clone, Debug)]
pub enum Phase {
    /// Waiting for connections to finish their I/O.
    Draining,
    Flushing,
    Saving,
    StoppingReactors,
}

impl Phase {
    fn abandoned(&self, open: u64) -> String {
        match self {
            Phase::Draining => format!(
                "{open} NBD connection(s) still open (their I/O in flight is lost, not \
                 acknowledged); leaves not flushed; state not written"
            ),
            Phase::Flushing => "leaves not all flushed; state not written".into(),
            Phase::Saving => "the state file may not be written".into(),
            Phase::StoppingReactors => {
                "the reactor threads (leaves were flushed and the state written)".into()
            }
        }
    }
}

/// Watches a shutdown from its own thread: a second signal or the overall bound ends the
/// process whatever the main thread is blocked on.
pub struct Watchdog {
    phase: Arc<Mutex<Phase>>,
    /// Frontends (NBD connections, copy jobs) still attached, as the drain last saw them.
    open: Arc<AtomicU64>,
}

impl Watchdog {
    /// Starts watching. `signals` is the count so far (0 when a `shutdown` request began it).
    pub fn start(d: &Daemon, signals: Arc<AtomicUsize>, bound: Duration) -> Watchdog {
        let phase = Arc::new(Mutex::new(Phase::Draining));
        let open = Arc::new(AtomicU64::new(
            d.engine
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .threads()
                .map_or(0, |t| t.frontends()),
        ));
        let first = signals.load(Ordering::SeqCst);
        // One signal began it; one more forces. Begun by a request: the first signal forces.
        let force_at = if first == 0 { 1 } else { 2 };
        let (p, o) = (phase.clone(), open.clone());
        let began = Instant::now();
        let spawned = std::thread::Builder::new()
            .name("shutdown-watchdog".into())
            .spawn(move || loop {
                let why = if signals.load(Ordering::SeqCst) >= force_at {
                    "a second signal".to_string()
                } else if began.elapsed() > bound {
                    format!("the shutdown took longer than {} s", bound.as_secs())
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let phase = p.lock().unwrap_or_else(PoisonError::into_inner).clone();
                let open = o.load(Ordering::Relaxed);
                eprintln!(
                    "stackbd: forced exit ({why}) while {}; abandoned: {}",
                    match phase {
                        Phase::Draining => "draining connections",
                        Phase::Flushing => "flushing leaves",
                        Phase::Saving => "writing the state",
                        Phase::StoppingReactors => "stopping the reactors",
                    },
                    phase.abandoned(open)
                );
                std::process::exit(FORCED_EXIT);
            });
        if let Err(e) = spawned {
            eprintln!("stackbd: cannot start the shutdown watchdog: {e}");
        }
        Watchdog { phase, open }
    }

    pub fn enter(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
    }
}

/// Lets every suspended volume's held I/O go on (through its live table), so the drain can
/// end: nothing else could resume it once the daemon stops. Logs each.
pub fn release_suspended(engine: &mut stackbd_core::Engine) {
    for name in engine.suspended_volumes() {
        match engine.release(&name) {
            Ok(_) => eprintln!(
                "stackbd: stopping: resuming suspended volume '{name}' (its held I/O goes on \
                 through the live table; an inactive table is kept)"
            ),
            Err(e) => eprintln!("stackbd: stopping: cannot resume '{name}': {e}"),
        }
    }
}

/// Waits (with the engine lock held by the caller) until no frontend is left or `bound`
/// passes; returns how many are left. Publishes the count for the watchdog.
pub fn drain(w: &Watchdog, engine: &stackbd_core::Engine, bound: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let n = engine.threads().map_or(0, |t| t.frontends());
        w.open.store(n, Ordering::Relaxed);
        if n == 0 || start.elapsed() >= bound {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
