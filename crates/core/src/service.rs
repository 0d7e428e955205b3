//! Off-reactor work and the way back: a reactor's [`Waker`], per-target [`Doorbell`]s, and
//! [`Service`] threads for work that may block (metadata commits, resync scheduling, checkers).
//!
//! The rule (DESIGN "Stateful targets"): a service thread never touches reactor state. It talks
//! to reactors through bounded queues the target chooses (e.g. `std::sync::mpsc::sync_channel`,
//! whose `try_send`/`try_recv` never block) and rings a doorbell; the reactor then runs the
//! target's `wake` on its own thread. A reactor wakes a service thread with
//! [`ServiceHandle::notify`], which never blocks.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How anyone wakes one reactor: an eventfd its sleep waits on, a flag saying it sleeps, and a
/// flag saying a doorbell rang.
#[derive(Debug)]
pub struct Waker {
    /// None under Miri, which has no eventfd (nothing sleeps there: the inline engine spins).
    fd: Option<OwnedFd>,
    sleeping: AtomicBool,
    /// Some doorbell of this reactor rang since the reactor last looked.
    rung: AtomicBool,
}

impl Waker {
    /// A new waker (one eventfd). Control plane.
    pub fn new() -> std::io::Result<Arc<Waker>> {
        #[cfg(not(miri))]
        let fd = Some(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?);
        #[cfg(miri)]
        let fd = None;
        Ok(Arc::new(Waker {
            fd,
            sleeping: AtomicBool::new(false),
            rung: AtomicBool::new(false),
        }))
    }

    /// The fd a sleeping reactor polls for readability (None under Miri).
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Wakes the reactor if it sleeps. Any thread; never blocks (one eventfd write at most).
    pub fn wake(&self) {
        if let (true, Some(fd)) = (self.sleeping.load(Ordering::SeqCst), &self.fd) {
            let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
        }
    }

    /// The reactor's thread, before it sleeps: from here on, wakers write the eventfd.
    pub(crate) fn set_sleeping(&self, on: bool) {
        self.sleeping.store(on, Ordering::SeqCst);
    }

    /// The reactor's thread, after a sleep: empties the eventfd.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 8];
        if let Some(fd) = &self.fd {
            let _ = rustix::io::read(fd.as_fd(), &mut buf);
        }
    }

    /// True (once) if a doorbell rang since the last call. Reactor thread, every round: one
    /// relaxed load when nothing rang.
    #[inline]
    pub(crate) fn take_rung(&self) -> bool {
        self.rung.load(Ordering::Relaxed) && self.rung.swap(false, Ordering::Acquire)
    }

    /// A doorbell may have rung (relaxed; `take_rung` decides). Reactor thread, every round.
    #[inline]
    pub(crate) fn is_rung_relaxed(&self) -> bool {
        self.rung.load(Ordering::Relaxed)
    }

    /// True if a doorbell rang and the reactor has not looked yet (it must not sleep).
    pub(crate) fn is_rung(&self) -> bool {
        self.rung.load(Ordering::Acquire)
    }
}

/// Rings one target instance on one reactor: the reactor runs that target's `wake` on its
/// thread at its next round. Cheap to clone; any thread; never blocks.
#[derive(Clone, Debug)]
pub struct Doorbell {
    pub(crate) flag: Arc<AtomicBool>,
    pub(crate) waker: Arc<Waker>,
}

impl Doorbell {
    pub(crate) fn new(waker: Arc<Waker>) -> Doorbell {
        Doorbell {
            flag: Arc::new(AtomicBool::new(false)),
            waker,
        }
    }

    /// Asks for a `wake` call on the reactor. Several rings before the reactor looks fold
    /// into one call.
    pub fn ring(&self) {
        self.flag.store(true, Ordering::Release);
        self.waker.rung.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// What a service thread's body gets: its stop flag and a way to wait for work.
pub struct ServiceCx {
    stop: Arc<AtomicBool>,
}

impl ServiceCx {
    /// True once the service has been asked to stop; the body should return soon after.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Waits until notified, stopped, or `timeout` passes (spurious wake-ups are possible).
    /// Service thread only.
    pub fn wait(&self, timeout: Duration) {
        if !self.stopping() {
            std::thread::park_timeout(timeout);
        }
    }
}

/// Wakes a service thread. Cheap to clone; any thread, reactors included; never blocks.
#[derive(Clone, Debug)]
pub struct ServiceHandle {
    thread: std::thread::Thread,
}

impl ServiceHandle {
    /// Wakes the service thread if it waits in [`ServiceCx::wait`].
    pub fn notify(&self) {
        self.thread.unpark();
    }
}

/// A target instance's service thread: stopped and joined on [`Service::stop`] or drop.
#[derive(Debug)]
pub struct Service {
    stop: Arc<AtomicBool>,
    handle: ServiceHandle,
    join: Option<JoinHandle<()>>,
}

impl Service {
    /// Starts `body` on a thread named `name`. Control plane (a target's `activate`).
    pub fn spawn(
        name: &str,
        body: impl FnOnce(ServiceCx) + Send + 'static,
    ) -> std::io::Result<Service> {
        let stop = Arc::new(AtomicBool::new(false));
        let cx = ServiceCx { stop: stop.clone() };
        let join = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || body(cx))?;
        Ok(Service {
            stop,
            handle: ServiceHandle {
                thread: join.thread().clone(),
            },
            join: Some(join),
        })
    }

    pub fn handle(&self) -> ServiceHandle {
        self.handle.clone()
    }

    /// Asks the body to stop and joins it. Blocks until the body returns: control plane only.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.handle.notify();
        if let Some(j) = self.join.take() {
            if j.thread().id() != std::thread::current().id() {
                let _ = j.join();
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    #[test]
    fn doorbell_sets_the_rung_flag_once() {
        let w = Waker::new().unwrap();
        let d = Doorbell::new(w.clone());
        assert!(!w.take_rung());
        d.ring();
        d.ring();
        assert!(w.take_rung());
        assert!(!w.take_rung(), "two rings fold into one look");
        assert!(d.flag.load(Ordering::Acquire));
    }

    #[test]
    fn service_runs_until_stopped_and_is_notified() {
        let (tx, rx) = sync_channel(4);
        let mut s = Service::spawn("svc-test", move |cx| {
            let mut n = 0;
            while !cx.stopping() {
                cx.wait(Duration::from_secs(5));
                n += 1;
                let _ = tx.try_send(n);
            }
        })
        .unwrap();
        s.handle().notify();
        assert!(rx.recv_timeout(Duration::from_secs(2)).is_ok());
        s.stop();
    }
}
