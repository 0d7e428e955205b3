//! Reactor threads: one per core, each owning a [`Reactor`] and the frontends (NBD connections,
//! bench jobs) that live on it. Control operations reach a thread as messages it runs between two
//! loop iterations, so the data path never takes a lock; a drain is acknowledged by the thread
//! itself once its own in-flight count for the volume is zero.
//!
//! Completion modes (DESIGN "Completion modes and polling"):
//! - `Poll`: never sleeps; reaps every queue in a loop, like SPDK.
//! - `Interrupt`: when a loop iteration finds nothing to do, sleeps in `poll(2)` on the leaves'
//!   ring fds, the frontends' sockets and the thread's wake eventfd.
//! - `Hybrid`: spins for a short budget of idle iterations, then sleeps as `Interrupt` does.

use crate::reactor::{Completion, Reactor, ReactorConfig, ReactorStats, Request};
use crate::status::Status;
use crate::DevId;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a reactor waits when it has nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Interrupt,
    Poll,
    Hybrid,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "interrupt" => Ok(Mode::Interrupt),
            "poll" => Ok(Mode::Poll),
            "hybrid" => Ok(Mode::Hybrid),
            _ => Err(format!("unknown mode '{s}' (interrupt, poll, hybrid)")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Interrupt => "interrupt",
            Mode::Poll => "poll",
            Mode::Hybrid => "hybrid",
        })
    }
}

/// Reactor threads' settings.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeConfig {
    pub reactors: usize,
    pub mode: Mode,
    /// Hybrid mode spins this long without work before it sleeps.
    pub hybrid_spin: Duration,
    /// Pin reactor i to CPU i (mod the CPU count).
    pub pin: bool,
    pub reactor: ReactorConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            reactors: 1,
            mode: Mode::Interrupt,
            hybrid_spin: Duration::from_micros(50),
            pin: false,
            reactor: ReactorConfig::default(),
        }
    }
}

/// Something that lives on a reactor thread and drives I/O: an NBD connection, a bench job.
/// Its tags (the low 48 bits of `user_data`) come back in `complete`.
pub trait Frontend: Send {
    /// Does whatever work is ready (read sockets, submit I/O). Returns the amount done (0 =
    /// nothing, so the reactor may sleep).
    fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize;

    /// A completion for one of this frontend's I/Os.
    fn complete(&mut self, cx: &mut FrontendCx<'_>, c: Completion);

    /// Fds to wait on before the reactor sleeps: (fd, also wait for writable).
    fn wait_fds(&self, _out: &mut Vec<(RawFd, bool)>) {}

    /// True when the frontend is done and can be dropped (after its I/O completed).
    fn finished(&self) -> bool {
        false
    }
}

const TAG_SHIFT: u32 = 48;
const TAG_MASK: u64 = (1 << TAG_SHIFT) - 1;

/// What a frontend may use: its reactor, with its tags applied.
pub struct FrontendCx<'a> {
    pub reactor: &'a mut Reactor,
    slot: u64,
    /// The reactor thread's index.
    pub thread: usize,
}

impl FrontendCx<'_> {
    /// Starts an I/O; `req.user_data` (48 bits) comes back in `Frontend::complete`.
    pub fn submit(&mut self, req: &Request) -> Result<(), Status> {
        debug_assert!(req.user_data <= TAG_MASK, "frontend tags are 48 bits");
        let mut r = *req;
        r.user_data = (self.slot << TAG_SHIFT) | (req.user_data & TAG_MASK);
        self.reactor.submit(&r)
    }
}

type Job = Box<dyn FnOnce(&mut Reactor) + Send>;

enum Msg {
    /// Run on the reactor, then acknowledge.
    Run(Job, SyncSender<()>),
    /// Acknowledge once nothing is in flight for the volume on this thread.
    Drain(DevId, SyncSender<()>),
    Attach(Box<dyn Frontend>),
    Stop,
}

/// What a reactor thread shares with the control side.
struct Shared {
    /// The reactor's waker: its eventfd, sleeping flag and doorbell flag.
    waker: Arc<crate::service::Waker>,
    /// Set after every message sent, so a turn reads the channel only when there is mail (an
    /// empty channel's `try_recv` costs more than this load, every turn).
    mail: AtomicBool,
    /// Loop iterations, sleeps and completions, for stats.
    loops: AtomicU64,
    sleeps: AtomicU64,
    frontends: AtomicU64,
}

struct Handle {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    join: Option<JoinHandle<ReactorStats>>,
}

impl Handle {
    fn send(&self, m: Msg) {
        send_to(&self.tx, &self.shared, m);
    }
}

/// Sends a message and wakes the thread if it sleeps. A thread that stopped after a panic just
/// drops the message; the control side then sees a missing acknowledgement.
fn send_to(tx: &Sender<Msg>, shared: &Shared, m: Msg) {
    let _ = tx.send(m);
    shared.mail.store(true, Ordering::Release);
    shared.waker.wake();
}

/// Attaches frontends to reactor threads; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Attacher {
    threads: Vec<(Sender<Msg>, Arc<Shared>)>,
    next: Arc<AtomicU64>,
}

impl Attacher {
    /// Places a frontend on a reactor (round robin when `on` is None); returns the reactor.
    pub fn attach(&self, fe: Box<dyn Frontend>, on: Option<usize>) -> usize {
        let i = on.unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed) as usize)
            % self.threads.len();
        let (tx, shared) = &self.threads[i];
        send_to(tx, shared, Msg::Attach(fe));
        i
    }
}

/// Counters of one reactor thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadStats {
    pub loops: u64,
    pub sleeps: u64,
    pub frontends: u64,
}

/// A drain under way (see [`ReactorThreads::drain_start`]): the reactors' acknowledgements still
/// to come. Owned by whoever waits; waiting blocks that thread only and allocates nothing.
pub struct DrainWait {
    rx: Receiver<()>,
    left: usize,
}

impl DrainWait {
    /// Blocks until every reactor acknowledged (true) or `deadline` passed (false; `None`
    /// waits without one). May be called again after a timeout. A reactor that died (panic)
    /// drops its acknowledgement: that counts as not drained.
    pub fn wait_until(&mut self, deadline: Option<Instant>) -> bool {
        while self.left > 0 {
            let got = match deadline {
                Some(d) => self
                    .rx
                    .recv_timeout(d.saturating_duration_since(Instant::now()))
                    .is_ok(),
                None => self.rx.recv().is_ok(),
            };
            if !got {
                return false;
            }
            self.left -= 1;
        }
        true
    }
}

/// The reactor threads of an engine.
pub struct ReactorThreads {
    threads: Vec<Handle>,
    cfg: RuntimeConfig,
    next: std::sync::atomic::AtomicUsize,
}

impl ReactorThreads {
    pub fn spawn(cfg: RuntimeConfig) -> std::io::Result<ReactorThreads> {
        let n = cfg.reactors.max(1);
        let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = channel();
            let shared = Arc::new(Shared {
                waker: crate::service::Waker::new()?,
                mail: AtomicBool::new(false),
                loops: AtomicU64::new(0),
                sleeps: AtomicU64::new(0),
                frontends: AtomicU64::new(0),
            });
            let sh = shared.clone();
            let join = std::thread::Builder::new()
                .name(format!("reactor-{i}"))
                .spawn(move || {
                    if cfg.pin {
                        pin_to_cpu(i % cpus);
                    }
                    ThreadLoop::new(i, cfg, rx, sh).run()
                })?;
            threads.push(Handle {
                tx,
                shared,
                join: Some(join),
            });
        }
        Ok(ReactorThreads {
            threads,
            cfg,
            next: 0.into(),
        })
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// Runs `f` on every reactor and waits until all have run it.
    pub fn run_all(&self, f: impl Fn(&mut Reactor) + Clone + Send + 'static) {
        let (tx, rx) = sync_channel(self.threads.len());
        for t in &self.threads {
            let f = f.clone();
            t.send(Msg::Run(Box::new(move |r: &mut Reactor| f(r)), tx.clone()));
        }
        drop(tx);
        for _ in 0..self.threads.len() {
            // A reactor that died (panic) drops its sender: stop waiting for it.
            if rx.recv().is_err() {
                break;
            }
        }
    }

    /// Runs `f` on reactor `i` and returns its result.
    pub fn run_on<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce(&mut Reactor) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = sync_channel(1);
        let (out_tx, out_rx) = sync_channel(1);
        self.threads[i % self.threads.len()].send(Msg::Run(
            Box::new(move |r: &mut Reactor| {
                let _ = out_tx.send(f(r));
            }),
            tx,
        ));
        let _ = rx.recv();
        out_rx.recv().ok()
    }

    /// Waits until no reactor has I/O in flight for `dev`; false on timeout.
    pub fn drain(&self, dev: DevId, timeout: Duration) -> bool {
        // A timeout too long for an `Instant` waits without one.
        self.drain_start(dev)
            .wait_until(Instant::now().checked_add(timeout))
    }

    /// Asks every reactor to acknowledge once it has no I/O in flight for `dev`, and returns
    /// the handle to wait for those acknowledgements on, from any thread and without the
    /// engine (so a control plane need not hold its engine lock while a volume drains).
    pub fn drain_start(&self, dev: DevId) -> DrainWait {
        let (tx, rx) = sync_channel(self.threads.len());
        for t in &self.threads {
            t.send(Msg::Drain(dev, tx.clone()));
        }
        DrainWait {
            rx,
            left: self.threads.len(),
        }
    }

    /// Places a frontend on a reactor (round robin when `on` is None); returns the reactor.
    pub fn attach(&self, fe: Box<dyn Frontend>, on: Option<usize>) -> usize {
        let i =
            on.unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed)) % self.threads.len();
        self.threads[i].send(Msg::Attach(fe));
        i
    }

    /// A handle that attaches frontends from any thread (an acceptor), without the engine.
    pub fn attacher(&self) -> Attacher {
        Attacher {
            threads: self
                .threads
                .iter()
                .map(|t| (t.tx.clone(), t.shared.clone()))
                .collect(),
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Frontends still attached, over all reactors.
    pub fn frontends(&self) -> u64 {
        self.threads
            .iter()
            .map(|t| t.shared.frontends.load(Ordering::Relaxed))
            .sum()
    }

    pub fn thread_stats(&self) -> Vec<ThreadStats> {
        self.threads
            .iter()
            .map(|t| ThreadStats {
                loops: t.shared.loops.load(Ordering::Relaxed),
                sleeps: t.shared.sleeps.load(Ordering::Relaxed),
                frontends: t.shared.frontends.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Stops every thread after its frontends finished; returns each reactor's counters.
    pub fn stop(&mut self) -> Vec<ReactorStats> {
        for t in &self.threads {
            t.send(Msg::Stop);
        }
        self.threads
            .iter_mut()
            .filter_map(|t| t.join.take()?.join().ok())
            .collect()
    }
}

impl Drop for ReactorThreads {
    fn drop(&mut self) {
        if self.threads.iter().any(|t| t.join.is_some()) {
            self.stop();
        }
    }
}

/// The longest a reactor sleeps without looking around.
pub(crate) const SLEEP_MAX: Duration = Duration::from_millis(100);

/// Sleeps in `poll(2)` until one of `fds` is readable (or writable, where asked) or the timeout
/// passes. `pfds` is scratch space kept by the caller, so a sleep allocates nothing once warm.
///
/// # Safety
/// Every fd must stay open for the duration of the call.
pub(crate) unsafe fn sleep_on(
    pfds: &mut Vec<PollFd<'static>>,
    fds: impl Iterator<Item = (RawFd, bool)>,
    timeout: &Timespec,
) {
    pfds.clear();
    for (fd, write) in fds {
        // SAFETY: the caller keeps the fd open while we poll it; `pfds` is cleared before return.
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        let f = if write {
            PollFlags::IN | PollFlags::OUT
        } else {
            PollFlags::IN
        };
        pfds.push(PollFd::from_borrowed_fd(b, f));
    }
    let _ = poll(pfds, Some(timeout));
    pfds.clear();
}

fn pin_to_cpu(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

struct ThreadLoop {
    index: usize,
    cfg: RuntimeConfig,
    reactor: Reactor,
    frontends: Vec<Option<Box<dyn Frontend>>>,
    drains: Vec<(DevId, SyncSender<()>)>,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    stopping: bool,
    /// Loop iterations; only this thread writes `shared.loops`, so a plain store publishes it
    /// (no locked add per turn).
    loops: u64,
    fds: Vec<RawFd>,
    fe_fds: Vec<(RawFd, bool)>,
    /// Reused every sleep, so sleeping allocates nothing in steady state.
    pfds: Vec<PollFd<'static>>,
}

impl ThreadLoop {
    fn new(index: usize, cfg: RuntimeConfig, rx: Receiver<Msg>, shared: Arc<Shared>) -> ThreadLoop {
        ThreadLoop {
            index,
            cfg,
            reactor: Reactor::with_waker(cfg.reactor, index, shared.waker.clone()),
            frontends: Vec::new(),
            drains: Vec::new(),
            rx,
            shared,
            stopping: false,
            loops: 0,
            fds: Vec::with_capacity(64),
            fe_fds: Vec::with_capacity(64),
            pfds: Vec::with_capacity(128),
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Run(f, ack) => {
                f(&mut self.reactor);
                let _ = ack.send(());
            }
            Msg::Drain(dev, ack) => self.drains.push((dev, ack)),
            Msg::Attach(fe) => {
                let slot = self
                    .frontends
                    .iter()
                    .position(Option::is_none)
                    .unwrap_or_else(|| {
                        self.frontends.push(None);
                        self.frontends.len() - 1
                    });
                self.frontends[slot] = Some(fe);
                self.shared.frontends.fetch_add(1, Ordering::Relaxed);
            }
            Msg::Stop => self.stopping = true,
        }
    }

    /// One pass over messages, frontends, the reactor and completions. Returns work done.
    fn turn(&mut self) -> usize {
        let mut work = 0;
        // Taken before the channel is read: a message sent after this sets it again.
        if self.shared.mail.load(Ordering::Relaxed)
            && self.shared.mail.swap(false, Ordering::Acquire)
        {
            while let Ok(m) = self.rx.try_recv() {
                self.handle(m);
                work += 1;
            }
        }
        for slot in 0..self.frontends.len() {
            if let Some(fe) = self.frontends[slot].as_mut() {
                let mut cx = FrontendCx {
                    reactor: &mut self.reactor,
                    slot: slot as u64,
                    thread: self.index,
                };
                work += fe.poll(&mut cx);
            }
        }
        work += self.reactor.poll();
        while let Some(c) = self.reactor.reap() {
            work += 1;
            let slot = (c.user_data >> TAG_SHIFT) as usize;
            if let Some(Some(fe)) = self.frontends.get_mut(slot) {
                let mut cx = FrontendCx {
                    reactor: &mut self.reactor,
                    slot: slot as u64,
                    thread: self.index,
                };
                fe.complete(
                    &mut cx,
                    Completion {
                        user_data: c.user_data & TAG_MASK,
                        status: c.status,
                    },
                );
            }
        }
        for slot in 0..self.frontends.len() {
            if self.frontends[slot].as_ref().is_some_and(|f| f.finished()) {
                self.frontends[slot] = None;
                self.shared.frontends.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if !self.drains.is_empty() {
            let r = &self.reactor;
            self.drains.retain(|(dev, ack)| {
                if r.inflight(*dev) == 0 {
                    let _ = ack.send(());
                    false
                } else {
                    true
                }
            });
        }
        work
    }

    fn run(mut self) -> ReactorStats {
        let mut idle_since: Option<Instant> = None;
        loop {
            let work = self.turn();
            self.loops += 1;
            self.shared.loops.store(self.loops, Ordering::Relaxed);
            if self.stopping
                && self.frontends.iter().all(Option::is_none)
                && self.reactor.outstanding() == 0
            {
                return self.reactor.stats;
            }
            if work > 0 {
                idle_since = None;
                continue;
            }
            match self.cfg.mode {
                Mode::Poll => std::hint::spin_loop(),
                Mode::Interrupt => self.sleep(),
                Mode::Hybrid => {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.cfg.hybrid_spin {
                        self.sleep();
                        idle_since = None;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
    }

    /// Sleeps in the kernel until a leaf completes, a socket is ready or a message arrives.
    fn sleep(&mut self) {
        self.fds.clear();
        if !self.reactor.prepare_wait(&mut self.fds) {
            return;
        }
        self.fe_fds.clear();
        for fe in self.frontends.iter().flatten() {
            fe.wait_fds(&mut self.fe_fds);
        }
        let waker = self.shared.waker.clone();
        waker.set_sleeping(true);
        // A message or doorbell sent before `sleeping` was visible did not write the eventfd:
        // look again.
        if waker.is_rung() {
            waker.set_sleeping(false);
            return;
        }
        match self.rx.try_recv() {
            Ok(m) => {
                waker.set_sleeping(false);
                self.handle(m);
                return;
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                waker.set_sleeping(false);
                self.stopping = true;
                return;
            }
            Err(_) => {}
        }
        // Bounded: stray states never hang a reactor for long; requeued bios wake it when due.
        let nap = self
            .reactor
            .next_timer()
            .map_or(SLEEP_MAX, |t| t.min(SLEEP_MAX));
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: nap.as_nanos() as i64,
        };
        let wake = waker.raw_fd();
        let fds = wake
            .map(|fd| (fd, false))
            .into_iter()
            .chain(self.fds.iter().map(|&fd| (fd, false)))
            .chain(self.fe_fds.iter().copied());
        // SAFETY: every fd belongs to this thread's leaves, frontends or wake eventfd, all alive
        // and open for the duration of the call.
        unsafe { sleep_on(&mut self.pfds, fds, &timeout) };
        waker.set_sleeping(false);
        self.shared.sleeps.fetch_add(1, Ordering::Relaxed);
        waker.drain();
    }
}
