//! The control plane over one reactor: leaves and volumes by name, table lifecycle
//! (create, load, suspend, resume, reload, remove), info/table/status/message/deps/wait,
//! and synchronous I/O helpers for the library API and tests.

use crate::leaf::Leaf;
use crate::limits::Limits;
use crate::reactor::{Reactor, ReactorConfig};
use crate::runtime::{ReactorThreads, RuntimeConfig};
use crate::table::{Table, TableError};
use crate::target::{DevInfo, DeviceLookup, TargetRegistry};
use crate::{DevId, Sector};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod bounds;
mod io;
mod query;
mod release;
mod suspend;

pub use bounds::{MAX_DRAIN_TIMEOUT, MAX_SUSPEND_DEADLINE};
pub use suspend::{PendingSuspend, SuspendStart};

/// What a copy did, by path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub bytes: u64,
    /// Copied by a leaf itself (the copy travelled down to one leaf).
    pub offloaded_bytes: u64,
    /// Copied by the kernel between two file leaves.
    pub kernel_bytes: u64,
    /// Read and written again by a layer.
    pub emulated_bytes: u64,
}

/// How a synchronous library call waits for its I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Sleep in the kernel until a leaf the I/O went to completes (no CPU spent waiting).
    Interrupt,
    /// Spin, polling only the leaf queues the I/O reached (seed 003). Refused at open for a
    /// volume whose stacked limits say it cannot be polled.
    Polled,
}

/// An open volume for the library API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeHandle {
    pub name: String,
    pub dev: DevId,
    pub wait: Wait,
}

/// Control-path errors: what, where and why.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("device '{0}' does not exist")]
    NoDevice(String),
    #[error("device '{0}' already exists")]
    Exists(String),
    #[error(
        "'{0}' is not a valid device name (letters, digits, '_', '-', '.'; starts with a letter)"
    )]
    BadName(String),
    #[error("volume '{name}': table refused: {source}")]
    Table {
        name: String,
        #[source]
        source: TableError,
    },
    #[error("'{name}' is busy: {reason}")]
    Busy { name: String, reason: String },
    #[error("'{name}': {reason}")]
    Invalid { name: String, reason: String },
}

impl EngineError {
    fn invalid(name: &str, reason: impl Into<String>) -> EngineError {
        EngineError::Invalid {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}

/// How to suspend.
#[derive(Clone, Copy, Debug)]
pub struct SuspendOpts {
    /// Keep I/O queued inside targets (multipath) instead of flushing it out first.
    pub noflush: bool,
    /// Resume by itself after this long, with a warning; `None` waits for `resume` forever.
    pub deadline: Option<Duration>,
    /// Give up (and stay active) if in-flight I/O does not drain within this time.
    pub drain_timeout: Duration,
}

impl Default for SuspendOpts {
    fn default() -> Self {
        SuspendOpts {
            noflush: false,
            deadline: Some(Duration::from_secs(60)),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

pub use crate::events::Events;

/// `dmsetup info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub dev: DevId,
    pub suspended: bool,
    /// A suspend is draining the volume's in-flight I/O (new I/O is already held): for how long
    /// so far (monotonic). `None` when no suspend is under way.
    pub suspending: Option<Duration>,
    /// A suspended volume's deadline: how long until it resumes by itself. `None` when it is
    /// not suspended, or suspended with no deadline.
    pub suspend_deadline: Option<Duration>,
    pub live_table: bool,
    pub inactive_table: bool,
    pub open_count: u32,
    pub event_nr: u64,
    pub size: Sector,
    pub targets: usize,
}

#[derive(Debug)]
struct LeafEntry {
    name: String,
    leaf: Arc<dyn Leaf>,
}

#[derive(Debug)]
struct VolumeEntry {
    name: String,
    active: Option<Arc<Table>>,
    inactive: Option<Arc<Table>>,
    suspended: Option<Option<Instant>>,
    /// A suspend under way (started, its drain not finished): see [`suspend`].
    suspending: Option<suspend::Suspending>,
    events: Arc<Events>,
    open_count: u32,
    /// Request queue settings (used while the live table is request-based).
    queue: crate::rq::QueueOpts,
}

#[derive(Debug)]
enum DevEntry {
    Free,
    Leaf(LeafEntry),
    Volume(VolumeEntry),
}

impl DevEntry {
    fn name(&self) -> Option<&str> {
        match self {
            DevEntry::Free => None,
            DevEntry::Leaf(l) => Some(&l.name),
            DevEntry::Volume(v) => Some(&v.name),
        }
    }
}

/// Device lookup over the registry, for table construction.
struct Lookup<'a> {
    devs: &'a [DevEntry],
    names: &'a BTreeMap<String, DevId>,
    namespace: u64,
}

impl Lookup<'_> {
    fn info(&self, id: DevId) -> Option<DevInfo> {
        match self.devs.get(id.0 as usize)? {
            DevEntry::Free => None,
            DevEntry::Leaf(l) => Some(DevInfo {
                id,
                size: l.leaf.size(),
                limits: l.leaf.limits(),
                leaf: Some(l.leaf.clone()),
            }),
            DevEntry::Volume(v) => Some(match &v.active {
                Some(t) => DevInfo {
                    id,
                    size: t.size(),
                    limits: *t.limits(),
                    leaf: None,
                },
                None => DevInfo {
                    id,
                    size: 0,
                    limits: Limits::TOP,
                    leaf: None,
                },
            }),
        }
    }

    /// Devices a volume maps onto, through its live and its inactive table.
    fn children(&self, id: DevId) -> Vec<DevId> {
        match self.devs.get(id.0 as usize) {
            Some(DevEntry::Volume(v)) => {
                let mut out = Vec::new();
                for t in v.active.iter().chain(v.inactive.iter()) {
                    out.extend(t.devices());
                }
                out
            }
            _ => Vec::new(),
        }
    }
}

impl DeviceLookup for Lookup<'_> {
    fn lookup(&self, name: &str) -> Option<DevInfo> {
        self.info(*self.names.get(name)?)
    }

    fn lookup_id(&self, id: DevId) -> Option<DevInfo> {
        self.info(id)
    }

    fn namespace(&self) -> u64 {
        self.namespace
    }

    fn reaches(&self, from: DevId, to: DevId) -> bool {
        // Iterative DFS: the graph is small and acyclic by construction.
        let mut stack = vec![from];
        let mut seen = Vec::new();
        while let Some(d) = stack.pop() {
            if d == to {
                return true;
            }
            if !seen.contains(&d) {
                seen.push(d);
                stack.extend(self.children(d));
            }
        }
        false
    }
}

/// Checks a device name: it is used in tables, so it must be one token and not a number.
pub fn valid_name(name: &str) -> bool {
    let mut b = name.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        && name.len() <= 128
}

/// Where an engine's I/O runs: on the caller's thread (library use, tests) or on reactor threads
/// (the daemon, the bench).
enum Reactors {
    Inline(Box<Reactor>),
    Threads(ReactorThreads),
}

impl Reactors {
    /// Applies a control step to every reactor.
    fn each(&mut self, f: impl Fn(&mut Reactor) + Clone + Send + 'static) {
        match self {
            Reactors::Inline(r) => f(r),
            Reactors::Threads(t) => t.run_all(f),
        }
    }
}

/// Leaves, volumes and their reactors.
pub struct Engine {
    targets: TargetRegistry,
    devs: Vec<DevEntry>,
    names: BTreeMap<String, DevId>,
    reactors: Reactors,
    next_tag: u64,
    suspended_count: usize,
    /// Tells pending suspends apart (a released one must not be finished).
    next_suspend_token: u64,
    /// Scratch for interrupt waits (kept so a sleep allocates nothing).
    wait_fds: Vec<std::os::fd::RawFd>,
    pfds: Vec<rustix::event::PollFd<'static>>,
    /// Unique to this engine in the process: the namespace its `DevId`s belong to.
    namespace: u64,
}

/// Source of engine namespaces (never 0, which lookups outside any engine report).
static NEXT_NAMESPACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Tags of the synchronous helpers live in the upper half so they never collide with a
/// caller's own tags.
const SYNC_TAG_BASE: u64 = 1 << 63;

impl Engine {
    /// An engine whose reactor runs on the caller's thread (`poll`, `io`, `read_at`...).
    pub fn new(targets: TargetRegistry, cfg: ReactorConfig) -> Engine {
        Engine::with(targets, Reactors::Inline(Box::new(Reactor::new(cfg))))
    }

    /// An engine with reactor threads; I/O comes from frontends attached to them.
    pub fn with_threads(targets: TargetRegistry, cfg: RuntimeConfig) -> std::io::Result<Engine> {
        Ok(Engine::with(
            targets,
            Reactors::Threads(ReactorThreads::spawn(cfg)?),
        ))
    }

    fn with(targets: TargetRegistry, reactors: Reactors) -> Engine {
        Engine {
            targets,
            devs: Vec::new(),
            names: BTreeMap::new(),
            reactors,
            next_tag: SYNC_TAG_BASE,
            suspended_count: 0,
            next_suspend_token: 0,
            wait_fds: Vec::with_capacity(16),
            pfds: Vec::with_capacity(16),
            namespace: NEXT_NAMESPACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The reactor threads, if this engine has them.
    pub fn threads(&self) -> Option<&ReactorThreads> {
        match &self.reactors {
            Reactors::Threads(t) => Some(t),
            Reactors::Inline(_) => None,
        }
    }

    /// Stops the reactor threads (after their frontends finished); no-op inline.
    pub fn stop_threads(&mut self) {
        if let Reactors::Threads(t) = &mut self.reactors {
            t.stop();
        }
    }

    /// The inline reactor. Panics on an engine with reactor threads, whose reactors belong to
    /// their threads.
    pub fn reactor(&self) -> &Reactor {
        match &self.reactors {
            Reactors::Inline(r) => r,
            Reactors::Threads(_) => {
                panic!("this engine runs reactor threads; attach a frontend instead")
            }
        }
    }

    pub fn reactor_mut(&mut self) -> &mut Reactor {
        match &mut self.reactors {
            Reactors::Inline(r) => r,
            Reactors::Threads(_) => {
                panic!("this engine runs reactor threads; attach a frontend instead")
            }
        }
    }

    pub fn targets(&self) -> &TargetRegistry {
        &self.targets
    }

    fn lookup(&self) -> Lookup<'_> {
        Lookup {
            devs: &self.devs,
            names: &self.names,
            namespace: self.namespace,
        }
    }

    fn alloc_dev(&mut self, name: &str) -> Result<DevId, EngineError> {
        if !valid_name(name) {
            return Err(EngineError::BadName(name.to_string()));
        }
        if self.names.contains_key(name) {
            return Err(EngineError::Exists(name.to_string()));
        }
        let id = match self.devs.iter().position(|d| matches!(d, DevEntry::Free)) {
            Some(i) => DevId(i as u32),
            None => {
                self.devs.push(DevEntry::Free);
                DevId(self.devs.len() as u32 - 1)
            }
        };
        self.names.insert(name.to_string(), id);
        Ok(id)
    }

    pub fn dev_id(&self, name: &str) -> Result<DevId, EngineError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::NoDevice(name.to_string()))
    }

    pub fn dev_name(&self, id: DevId) -> Option<&str> {
        self.devs.get(id.0 as usize)?.name()
    }

    fn volume(&self, name: &str) -> Result<(DevId, &VolumeEntry), EngineError> {
        let id = self.dev_id(name)?;
        match &self.devs[id.0 as usize] {
            DevEntry::Volume(v) => Ok((id, v)),
            _ => Err(EngineError::invalid(name, "is a leaf, not a volume")),
        }
    }

    fn volume_mut(&mut self, id: DevId) -> &mut VolumeEntry {
        match &mut self.devs[id.0 as usize] {
            DevEntry::Volume(v) => v,
            _ => unreachable!("checked by volume()"),
        }
    }

    /// Adds a leaf device.
    pub fn add_leaf(&mut self, name: &str, leaf: Arc<dyn Leaf>) -> Result<DevId, EngineError> {
        let id = self.alloc_dev(name)?;
        let lbs = leaf.limits().logical_block_sectors();
        let (l, size) = (leaf.clone(), leaf.size());
        self.reactors
            .each(move |r| r.install_leaf(id, l.channel(), size, lbs));
        self.devs[id.0 as usize] = DevEntry::Leaf(LeafEntry {
            name: name.to_string(),
            leaf,
        });
        Ok(id)
    }

    /// Removes a leaf no table uses.
    pub fn remove_leaf(&mut self, name: &str) -> Result<(), EngineError> {
        let id = self.dev_id(name)?;
        if !matches!(self.devs[id.0 as usize], DevEntry::Leaf(_)) {
            return Err(EngineError::invalid(
                name,
                "is a volume, not a leaf (use remove)",
            ));
        }
        if let Some(user) = self.users(id).first() {
            return Err(EngineError::Busy {
                name: name.into(),
                reason: format!("used by volume '{user}'"),
            });
        }
        self.reactors.each(move |r| r.remove(id));
        self.devs[id.0 as usize] = DevEntry::Free;
        self.names.remove(name);
        Ok(())
    }

    /// Volumes whose live or inactive table maps onto `id`.
    fn users(&self, id: DevId) -> Vec<String> {
        let lk = self.lookup();
        self.devs
            .iter()
            .enumerate()
            .filter(|(i, d)| {
                matches!(d, DevEntry::Volume(_)) && lk.children(DevId(*i as u32)).contains(&id)
            })
            .filter_map(|(_, d)| d.name().map(str::to_string))
            .collect()
    }

    /// Creates a volume, empty or with a live table.
    pub fn create(&mut self, name: &str, table: Option<&str>) -> Result<DevId, EngineError> {
        // Build the table before the name exists, so a bad table leaves nothing behind.
        let built = match table {
            // Not created yet: no id can reach it, but its own name must not appear.
            Some(text) => Some(self.build_table(name, Some(DevId(u32::MAX)), text)?),
            None => None,
        };
        let id = self.alloc_dev(name)?;
        self.reactors.each(move |r| r.install_volume(id));
        self.devs[id.0 as usize] = DevEntry::Volume(VolumeEntry {
            name: name.to_string(),
            active: None,
            inactive: None,
            suspended: None,
            suspending: None,
            events: Arc::new(Events::default()),
            open_count: 0,
            queue: crate::rq::QueueOpts::default(),
        });
        if let Some(t) = built {
            let t = Arc::new(t);
            let t2 = t.clone();
            self.reactors
                .each(move |r| r.set_table(id, Some(t2.clone())));
            self.volume_mut(id).active = Some(t);
            self.notify_pools();
            self.activate(id);
        }
        Ok(id)
    }

    /// Sets a volume's request queue (scheduler and `nr_requests`); it applies whenever the
    /// volume's live table is request-based, and takes effect at once.
    pub fn set_queue(&mut self, name: &str, opts: crate::rq::QueueOpts) -> Result<(), EngineError> {
        let (id, _) = self.volume(name)?;
        if opts.nr_requests == 0 || opts.nr_requests > 4096 {
            return Err(EngineError::invalid(
                name,
                format!(
                    "nr_requests {} is out of range (1..=4096)",
                    opts.nr_requests
                ),
            ));
        }
        self.volume_mut(id).queue = opts;
        self.reactors.each(move |r| r.set_queue_opts(id, opts));
        Ok(())
    }

    /// A volume's request queue settings.
    pub fn queue(&self, name: &str) -> Result<crate::rq::QueueOpts, EngineError> {
        Ok(self.volume(name)?.1.queue)
    }

    /// Tells the live table's targets they are live (background work such as path checkers).
    fn activate(&mut self, id: DevId) {
        let v = self.volume_mut(id);
        let env = crate::target::TargetEnv {
            volume: v.name.clone(),
            events: v.events.clone(),
        };
        if let Some(t) = &v.active {
            t.entries().iter().for_each(|e| e.target.activate(&env));
        }
    }

    fn build_table(
        &self,
        name: &str,
        this: Option<DevId>,
        text: &str,
    ) -> Result<Table, EngineError> {
        let lk = self.lookup();
        Table::build(text, &self.targets, &lk, this.map(|id| (id, name))).map_err(|source| {
            EngineError::Table {
                name: name.to_string(),
                source,
            }
        })
    }

    /// Checks a table against the current devices without loading it anywhere.
    pub fn check_table(&self, text: &str) -> Result<Table, TableError> {
        Table::build(text, &self.targets, &self.lookup(), None)
    }

    /// Loads a table into the inactive slot; the live table is untouched.
    pub fn load(&mut self, name: &str, text: &str) -> Result<(), EngineError> {
        let (id, _) = self.volume(name)?;
        let t = self.build_table(name, Some(id), text)?;
        self.volume_mut(id).inactive = Some(Arc::new(t));
        Ok(())
    }

    /// Drops the inactive table.
    pub fn clear(&mut self, name: &str) -> Result<(), EngineError> {
        let (id, _) = self.volume(name)?;
        self.volume_mut(id).inactive = None;
        Ok(())
    }

    /// Resumes: swaps in the inactive table if there is one (suspending first if needed), then
    /// lets held I/O go.
    /// Refused (busy) while a suspend of the volume drains.
    pub fn resume(&mut self, name: &str) -> Result<(), EngineError> {
        let (id, v) = self.volume(name)?;
        Engine::not_suspending(name, v)?;
        if v.inactive.is_some() {
            if v.suspended.is_none() {
                self.suspend(name, SuspendOpts::default())?;
            }
            let v = self.volume_mut(id);
            let t = v.inactive.take();
            let old = std::mem::replace(&mut v.active, t.clone());
            v.events.raise();
            self.reactors.each(move |r| r.set_table(id, t.clone()));
            self.notify_pools();
            if let Some(old) = old {
                old.entries().iter().for_each(|e| e.target.deactivate());
            }
            self.activate(id);
        }
        let v = self.volume_mut(id);
        if let Some(t) = &v.active {
            t.entries().iter().for_each(|e| e.target.resume());
        }
        if v.suspended.take().is_some() {
            self.suspended_count -= 1;
        }
        self.reactors.each(move |r| r.resume(id));
        Ok(())
    }

    /// load + suspend + resume; refused (busy, nothing loaded) while a suspend drains.
    pub fn reload(&mut self, name: &str, text: &str) -> Result<(), EngineError> {
        Engine::not_suspending(name, self.volume(name)?.1)?;
        self.load(name, text)?;
        self.suspend(name, SuspendOpts::default())?;
        self.resume(name)
    }

    /// Removes a volume; refused while another table uses it, while open unless `force`, or
    /// while a suspend of it drains.
    pub fn remove(&mut self, name: &str, force: bool) -> Result<(), EngineError> {
        self.remove_check(name, force)?;
        let (id, v) = self.volume(name)?;
        if v.suspended.is_none() {
            self.suspend(
                name,
                SuspendOpts {
                    deadline: None,
                    ..SuspendOpts::default()
                },
            )?;
        }
        if self.volume_mut(id).suspended.is_some() {
            self.suspended_count -= 1;
        }
        self.reactors.each(move |r| r.remove(id));
        if let Some(t) = &self.volume_mut(id).active {
            t.entries().iter().for_each(|e| e.target.deactivate());
        }
        self.devs[id.0 as usize] = DevEntry::Free;
        self.names.remove(name);
        self.notify_pools();
        Ok(())
    }

    /// What [`Engine::remove`] checks before it changes anything: the volume exists, no other
    /// table uses it, it is not open (unless `force`), no suspend of it drains.
    pub fn remove_check(&self, name: &str, force: bool) -> Result<(), EngineError> {
        let (id, v) = self.volume(name)?;
        Engine::not_suspending(name, v)?;
        if let Some(user) = self.users(id).first() {
            return Err(EngineError::Busy {
                name: name.into(),
                reason: format!("used by volume '{user}'"),
            });
        }
        if v.open_count > 0 && !force {
            return Err(EngineError::Busy {
                name: name.into(),
                reason: format!("open {} times", v.open_count),
            });
        }
        Ok(())
    }

    /// Counts an opener (exports, library handles); `remove` refuses open volumes.
    pub fn open(&mut self, name: &str) -> Result<DevId, EngineError> {
        let id = self.dev_id(name)?;
        if let DevEntry::Volume(v) = &mut self.devs[id.0 as usize] {
            v.open_count += 1;
        }
        Ok(id)
    }

    pub fn close(&mut self, id: DevId) {
        if let Some(DevEntry::Volume(v)) = self.devs.get_mut(id.0 as usize) {
            v.open_count = v.open_count.saturating_sub(1);
        }
    }

    /// Seed 000: after a table change, tell the pools the deepest stacked frame need.
    fn notify_pools(&mut self) {
        let need = self
            .devs
            .iter()
            .enumerate()
            .filter(|(_, d)| matches!(d, DevEntry::Volume(_)))
            .map(|(i, _)| self.stacked_need(DevId(i as u32), 0))
            .max()
            .unwrap_or(0);
        self.reactors.each(move |r| r.notify_frame_bytes(need));
    }

    /// Frame bytes an I/O entering `id` needs with the live tables as they are now (a lower
    /// reload may have grown what the upper table computed when it was built).
    fn stacked_need(&self, id: DevId, depth: usize) -> usize {
        let Some(DevEntry::Volume(v)) = self.devs.get(id.0 as usize) else {
            return 0;
        };
        let Some(t) = &v.active else { return 0 };
        if depth > crate::bio::MAX_FRAMES {
            return 0;
        }
        let own = crate::table::SPLIT_FRAME_BYTES.div_ceil(8) * 8;
        own + t
            .entries()
            .iter()
            .map(|e| {
                e.target.frame_bytes().div_ceil(8) * 8
                    + e.target
                        .devices()
                        .iter()
                        .map(|&d| self.stacked_need(d, depth + 1))
                        .max()
                        .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }
}
