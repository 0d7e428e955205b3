//! The path checker: the target's service thread (`stackbd_core::Service`, named
//! `mpath-check-<volume>`), started by `activate` and stopped by `deactivate` or drop.
//!
//! Every `checker_interval_ms` it probes each leaf path (`Leaf::probe`, timeout the interval, at
//! most 5 s), fails the paths that do not answer and reinstates those that do (paths failed by
//! message included), then runs the `no_path_retry` clock. Its verdicts change only the shared
//! path health (atomics the reactors read with relaxed loads) and raise the volume's event, so
//! it needs no queue to the reactors and no doorbell: bios waiting for a path are requeued by
//! the core and see the reinstated path when they are mapped again.
//!
//! Probes may block for their whole timeout, so they do not run on the service thread itself:
//! each round starts one short-lived thread per leaf path (the `Service` API has no pool of
//! its own) and the service thread applies each verdict as it arrives. A round thus takes one
//! probe timeout however many paths hang, and a path refused at once fails at once. While it
//! waits for verdicts the service thread looks at its stop flag every [`STOP_POLL`], so
//! stopping never waits for a hung probe: a probe that answers after the stop is dropped.

use super::{lock, Shared, NO_PATH_RETRY};
use stackbd_core::{Service, ServiceCx};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a probe may take, whatever the interval.
pub const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the checker looks at its stop flag while it waits for probes.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Starts the checker of `volume` on a service thread.
pub(super) fn start(shared: Arc<Shared>, volume: &str) -> std::io::Result<Service> {
    Service::spawn(&format!("mpath-check-{volume}"), move |cx| {
        let timeout = shared.interval.min(MAX_PROBE_TIMEOUT);
        while sleep(&cx, shared.interval) {
            shared.check_paths(&cx, timeout);
        }
    })
}

/// Sleeps for `d` or until told to stop; false if stopping.
fn sleep(cx: &ServiceCx, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if cx.stopping() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        // Woken early by a stop (or spuriously): look again.
        cx.wait(deadline - now);
    }
}

impl Shared {
    /// A probe's verdict on path `i`: reinstate it if it answers, fail it if not.
    fn apply_probe(&self, i: usize, r: Result<(), String>) {
        let p = &self.paths[i];
        let _g = lock(&self.ctl);
        match r {
            Ok(()) => {
                if !p.active.load(Relaxed) {
                    self.reinstate_path(i, "path checker: the device answers");
                }
            }
            Err(e) => {
                if p.active.load(Relaxed) {
                    self.fail_path(i, format_args!("path checker: {e}"));
                }
            }
        }
    }

    /// One round of the path checker (see the module docs).
    fn check_paths(&self, cx: &ServiceCx, timeout: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, p) in self.paths.iter().enumerate() {
            let Some(leaf) = p.leaf.clone() else {
                continue;
            };
            let tx = tx.clone();
            let probe = leaf.clone();
            let spawned = std::thread::Builder::new()
                .name("mp-probe".into())
                .spawn(move || {
                    let _ = tx.send((i, probe.probe(timeout)));
                });
            if spawned.is_err() {
                // No thread to be had: probe from this one.
                self.apply_probe(i, leaf.probe(timeout));
            }
        }
        drop(tx);
        // Ends when every probe has answered (a probe that panicked just drops its sender).
        loop {
            if cx.stopping() {
                return;
            }
            match rx.recv_timeout(STOP_POLL) {
                Ok((i, r)) => self.apply_probe(i, r),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let _g = lock(&self.ctl);
        self.refresh_current();
        if self.no_path.load(Relaxed) == NO_PATH_RETRY
            && self.retry_expired()
            && !self.expiry_reported.swap(true, Relaxed)
        {
            tracing::warn!(
                volume = self.volume(),
                "multipath: no path for {} checker intervals (no_path_retry): failing I/O until a path is back",
                self.retry_count
            );
            self.raise();
        }
    }
}
