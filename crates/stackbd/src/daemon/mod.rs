//! `stackbd serve`: the daemon. Reactor threads serve NBD connections; an acceptor thread per
//! listener hands new connections to the reactors; the control socket (JSON lines) drives the
//! engine; the state (leaves, volumes, tables, exports) is written atomically to the state dir
//! on every change, in the config file's own format, and read back on restart.

pub mod control;
pub mod listen;
pub mod log;
pub mod nbd;
pub mod pending;
pub mod shutdown;
pub mod state;
pub mod tls;
pub mod trust;

use crate::config;
use listen::{accept_loop, Listener};
use nbd::{ExportEntry, ExportTable};
use stackbd_core::copy::{CopyFrontend, CopyJob, CopyOpts, CopyProgress};
use stackbd_core::runtime::{Attacher, Mode, RuntimeConfig};
use stackbd_core::{Engine, ReactorConfig, SECTOR_SIZE};
use stackbd_leaves::registry::LeafParams;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The demo stack served when no config is given: two mem leaves, a striped volume, a linear
/// volume on top, exported as `demo`.
pub const DEMO_CONFIG: &str = r#"# stackbd's built-in demo stack
[leaf.m0]
kind = "mem"
size = "512MiB"
[leaf.m1]
kind = "mem"
size = "512MiB"
[volume.data]
table = "0 2097152 striped 2 128 m0 0 m1 0"
[volume.demo]
table = "0 2097152 linear data 0"
[export.demo]
volume = "demo"
read_only = false
"#;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Config file (leaves, volumes, exports); without one, the demo stack is served.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the state is kept; on start, a state found there wins over --config.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// TCP address for NBD ("none" to serve no TCP).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: String,
    /// Unix socket path for NBD.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Control socket path (default $STACKBD_CONTROL or /run/stackbd/control.sock).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Completion mode of the reactors.
    #[arg(long, default_value = "interrupt")]
    pub mode: Mode,
    /// Reactor threads (default: one per core).
    #[arg(long)]
    pub reactors: Option<usize>,
    /// On SIGTERM/SIGINT, how long connections may take to finish their I/O (seconds) before
    /// they are abandoned and the exit status is 1; a second signal forces the exit at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_timeout: u64,
    #[command(flatten)]
    pub net: listen::NetArgs,
    #[command(flatten)]
    pub log: log::LogArgs,
}

/// Where the CLI and the daemon meet by default: `$STACKBD_CONTROL`, else
/// `/run/stackbd/control.sock` for root, else under `$XDG_RUNTIME_DIR` (or `/tmp/stackbd-UID`),
/// so the daemon starts for any user.
pub fn default_control_path() -> PathBuf {
    if let Some(p) = std::env::var_os("STACKBD_CONTROL") {
        return PathBuf::from(p);
    }
    let uid = rustix::process::getuid();
    if uid.is_root() {
        return PathBuf::from("/run/stackbd/control.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("stackbd/control.sock"),
        None => PathBuf::from(format!("/tmp/stackbd-{}/control.sock", uid.as_raw())),
    }
}

/// Everything the control plane shares.
pub struct Daemon {
    pub engine: Mutex<Engine>,
    pub exports: Arc<ExportTable>,
    pub state_dir: Option<PathBuf>,
    /// Set on SIGTERM/SIGINT or a `shutdown` request.
    pub stop: Arc<AtomicBool>,
    /// Tells connections to finish and close.
    pub closing: Arc<AtomicBool>,
    pub attacher: Attacher,
    pub started: Instant,
    /// Copy jobs running on the reactors, by id, with when they started.
    pub copies: Mutex<std::collections::BTreeMap<u64, (Arc<CopyProgress>, Instant)>>,
    /// The parameters each leaf of the engine was built from, by name: the state file writes
    /// them back as they are. Changed together with the engine's leaves, with the engine lock
    /// held (lock order: `engine`, then this); never held across a blocking call.
    pub leaf_params: Mutex<LeafTable>,
    /// The LUKS volumes opened from a header, by volume name, as the state file writes them
    /// back. Lock order: `engine`, `leaf_params`, then this.
    pub luks: Mutex<LuksTable>,
    /// What could not be brought up at start, with why; kept, shown and retried (see
    /// [`pending`]).
    pub pending: Mutex<crate::config::Failed>,
}

/// Leaf name -> the parameters it was built from.
pub type LeafTable = std::collections::BTreeMap<String, LeafParams>;

/// Volume name -> the LUKS section it was opened from.
pub type LuksTable = std::collections::BTreeMap<String, crate::crypttab::LuksDecl>;

impl Daemon {
    /// Writes the state file (atomically); logs and carries on if it cannot. Called with the
    /// engine lock held (`engine` is its guard); takes the leaf table's lock for the write.
    pub fn save(&self, engine: &Engine) {
        if let Some(dir) = &self.state_dir {
            let leaves = self
                .leaf_params
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let luks = self
                .luks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let pending = self.pending();
            if let Err(e) = state::save(dir, engine, &leaves, &luks, &self.exports, &pending) {
                eprintln!("stackbd: cannot write state to {}: {e}", dir.display());
            }
        }
    }

    /// Adds an export of `volume` (opening it, so it cannot be removed under clients).
    pub fn add_export(
        &self,
        engine: &mut Engine,
        name: &str,
        volume: &str,
        read_only: bool,
    ) -> Result<(), String> {
        if self.exports.get(name).is_some() {
            return Err(format!("export '{name}' already exists"));
        }
        let info = engine.info(volume).map_err(|e| e.to_string())?;
        engine.open(volume).map_err(|e| e.to_string())?;
        self.exports.set(ExportEntry {
            name: name.to_string(),
            volume: volume.to_string(),
            dev: info.dev,
            size_bytes: info.size * SECTOR_SIZE as u64,
            read_only,
            description: format!("stackbd volume {volume}"),
            id: self.exports.new_id(),
            revoked: Arc::new(AtomicBool::new(false)),
        });
        Ok(())
    }

    /// Starts a copy job on a reactor; returns its id.
    pub fn start_copy(
        &self,
        dev: stackbd_core::DevId,
        src: u64,
        dst: u64,
        len: u64,
        opts: CopyOpts,
    ) -> u64 {
        let progress = Arc::new(CopyProgress::default());
        let job = CopyJob::new(dev, src, dst, len, opts, 0);
        let mut jobs = self
            .copies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = jobs.keys().next_back().map_or(1, |k| k + 1);
        jobs.insert(id, (progress.clone(), Instant::now()));
        self.attacher
            .attach(Box::new(CopyFrontend::new(job, progress)), None);
        id
    }

    pub fn copy_job(&self, id: u64) -> Option<(Arc<CopyProgress>, Instant)> {
        self.copies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Re-reads export sizes after a table change.
    pub fn refresh_exports(&self, engine: &Engine) {
        for e in self.exports.all() {
            if let Ok(info) = engine.info(&e.volume) {
                self.exports
                    .resize(&e.volume, info.size * SECTOR_SIZE as u64);
            }
        }
    }
}

fn load_config(args: &ServeArgs) -> Result<(config::Config, String), String> {
    if let Some(dir) = &args.state_dir {
        let p = state::path(dir);
        if p.exists() {
            if let Some(cfg) = &args.config {
                eprintln!(
                    "stackbd: --config {} is not read: the state file {} wins (it holds what \
                     the daemon ran last); to start from the config again, move the state \
                     file away",
                    cfg.display(),
                    p.display()
                );
            }
            let c = config::load(&p).map_err(|e| e.to_string())?;
            return Ok((c, format!("state {}", p.display())));
        }
    }
    match &args.config {
        Some(p) => {
            // Relative leaf paths are resolved against the config file's folder; with an
            // absolute config path they come out absolute, so the state file (read back from
            // the state dir, not from here) names the same files.
            let abs = std::path::absolute(p).map_err(|e| format!("config {}: {e}", p.display()))?;
            Ok((
                config::load(&abs).map_err(|e| e.to_string())?,
                format!("config {}", p.display()),
            ))
        }
        None => Ok((
            config::parse(DEMO_CONFIG, None).map_err(|e| e.to_string())?,
            "the built-in demo".into(),
        )),
    }
}

pub fn run(args: &ServeArgs) -> ExitCode {
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stackbd serve: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ServeArgs) -> Result<(), String> {
    log::init(&args.log);
    let (cfg, origin) = load_config(args)?;
    let reactors = args
        .reactors
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rt = RuntimeConfig {
        reactors,
        mode: args.mode,
        reactor: ReactorConfig {
            pool_capacity: 4096,
            ..ReactorConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let engine = Engine::with_threads(stackbd_targets::registry(), rt)
        .map_err(|e| format!("cannot start reactors: {e}"))?;
    // A leaf that cannot be opened (or what stands on it) does not stop the rest: it is kept,
    // shown with why, and retried.
    let (built, errors) = config::build_degraded(&cfg, engine);
    for e in &errors {
        eprintln!("stackbd: {e}");
    }
    let mut failed = built.failed;
    let mut engine = built.engine;
    let attacher = engine.threads().expect("threaded engine").attacher();
    if let Some(dir) = &args.state_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create state dir {}: {e}", dir.display()))?;
    }
    let daemon = Arc::new(Daemon {
        engine: Mutex::new(Engine::new(
            stackbd_targets::registry(),
            ReactorConfig::default(),
        )),
        exports: Arc::new(ExportTable::default()),
        state_dir: args.state_dir.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        closing: Arc::new(AtomicBool::new(false)),
        attacher,
        started: Instant::now(),
        copies: Mutex::new(std::collections::BTreeMap::new()),
        leaf_params: Mutex::new(
            cfg.leaves
                .iter()
                .map(|l| (l.name.clone(), l.params.clone()))
                .collect(),
        ),
        luks: Mutex::new(
            cfg.luks
                .iter()
                .filter(|l| !failed.luks.iter().any(|(f, _)| f.name == l.name))
                .map(|l| (l.name.clone(), l.clone()))
                .collect(),
        ),
        pending: Mutex::new(crate::config::Failed::default()),
    });
    for x in &cfg.exports {
        if let Err(e) = daemon.add_export(&mut engine, &x.name, &x.volume, x.read_only) {
            eprintln!("stackbd: export '{}': {e}", x.name);
            failed.exports.push((x.clone(), e));
        }
    }
    if !failed.is_empty() {
        eprintln!(
            "stackbd: starting degraded: {} leaves, {} LUKS volumes, {} volumes and {} exports \
             could not be brought up; they are kept, shown by `stackbd leaf ls` and `stackbd \
             ls`, and retried every {} s (or now: `stackbd leaf retry`)",
            failed.leaves.len(),
            failed.luks.len(),
            failed.volumes.len(),
            failed.exports.len(),
            pending::RETRY_EVERY.as_secs()
        );
    }
    *daemon.pending() = failed;
    daemon.save(&engine);
    *lock_engine(&daemon) = engine;

    let signals = shutdown::install_signals(&daemon.stop)?;

    let mut acceptors = Vec::new();
    let mut where_ = Vec::new();
    let nbd_conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if args.listen != "none" {
        let l = listen::bind_tcp(&args.listen, &args.net)?;
        // Usable URIs: the scheme says whether TLS is needed (`nbds`), the path names an export.
        let scheme = if args.net.tls.mode() == tls::TlsMode::Off {
            "nbd"
        } else {
            "nbds"
        };
        let first = first_export(&daemon);
        where_.push(format!(
            "{scheme}://{}/{first}",
            l.local_addr().map_err(|e| e.to_string())?
        ));
        let (d, net, n) = (daemon.clone(), args.net.clone(), nbd_conns.clone());
        acceptors.push(
            std::thread::Builder::new()
                .name("nbd-tcp".into())
                .spawn(move || accept_loop(&d, Listener::Tcp(l), &net, &n))
                .map_err(|e| e.to_string())?,
        );
    }
    if let Some(p) = &args.socket {
        let l = listen::bind_unix(p, &args.net)?;
        let scheme = if args.net.tls.mode() == tls::TlsMode::Off {
            "nbd+unix"
        } else {
            "nbds+unix"
        };
        where_.push(format!(
            "{scheme}:///{}?socket={}",
            first_export(&daemon),
            p.display()
        ));
        let (d, net, n) = (daemon.clone(), args.net.clone(), nbd_conns.clone());
        acceptors.push(
            std::thread::Builder::new()
                .name("nbd-unix".into())
                .spawn(move || accept_loop(&d, Listener::Unix(l), &net, &n))
                .map_err(|e| e.to_string())?,
        );
    }
    let control_path = args.control.clone().unwrap_or_else(default_control_path);
    let control = control::spawn(daemon.clone(), &control_path, args.net.control_limits())?;

    let names: Vec<String> = daemon.exports.all().into_iter().map(|e| e.name).collect();
    eprintln!(
        "stackbd: serving {} from {origin} on {} ({} reactors, {} mode); control socket {}",
        if names.is_empty() {
            "no exports".to_string()
        } else {
            format!("export(s) {}", names.join(", "))
        },
        if where_.is_empty() {
            "no NBD listener".to_string()
        } else {
            where_.join(" and ")
        },
        reactors,
        args.mode,
        control_path.display()
    );

    spawn_health_poll(daemon.clone());
    let mut retried = Instant::now();
    let mut retrier: Option<std::thread::JoinHandle<()>> = None;
    while !daemon.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        // Suspend deadlines are the control plane's to enforce.
        lock_engine(&daemon).poll();
        // What failed is retried on its own thread (opening a leaf may block).
        if retried.elapsed() >= pending::RETRY_EVERY
            && retrier.as_ref().is_none_or(|j| j.is_finished())
            && !daemon.pending().is_empty()
        {
            retried = Instant::now();
            let d = daemon.clone();
            retrier = std::thread::Builder::new()
                .name("retry".into())
                .spawn(move || {
                    d.retry_pending(None);
                })
                .ok();
        }
    }

    // Clean stop: no new connections, held I/O goes on, in-flight I/O drains (within a
    // bound), data is flushed, state is written.
    eprintln!("stackbd: stopping: draining connections");
    let drain_bound = Duration::from_secs(args.shutdown_timeout);
    let watchdog = shutdown::Watchdog::start(&daemon, signals, drain_bound + shutdown::REST_BOUND);
    for a in acceptors {
        let _ = a.join();
    }
    let mut engine = lock_engine(&daemon);
    // Nothing could resume a suspended volume once the control socket is gone: its held I/O
    // would keep its connections (and this shutdown) waiting forever.
    shutdown::release_suspended(&mut engine);
    daemon.closing.store(true, Ordering::Relaxed);
    let abandoned = shutdown::drain(&watchdog, &engine, drain_bound);
    if abandoned > 0 {
        eprintln!(
            "stackbd: stopping: {abandoned} connection(s) still have I/O in flight after {} s; \
             abandoning them (that I/O is lost, never acknowledged)",
            drain_bound.as_secs()
        );
    }
    watchdog.enter(shutdown::Phase::Flushing);
    let mut sync_errors = 0;
    for (name, is_volume) in engine.ls() {
        if !is_volume {
            if let Ok(l) = engine.leaf(&name) {
                if let Err(e) = l.sync() {
                    eprintln!("stackbd: flushing leaf {name}: {e}");
                    sync_errors += 1;
                }
            }
        }
    }
    watchdog.enter(shutdown::Phase::Saving);
    daemon.save(&engine);
    let _ = std::fs::remove_file(&control_path);
    if let Some(p) = &args.socket {
        let _ = std::fs::remove_file(p);
    }
    if abandoned > 0 {
        // The reactors cannot stop while a connection waits on its I/O: leave them.
        eprintln!(
            "stackbd: stopped, abandoning {abandoned} connection(s) with I/O in flight{}",
            if sync_errors > 0 {
                format!("; {sync_errors} leaves could not be flushed")
            } else {
                String::new()
            }
        );
        std::process::exit(1);
    }
    watchdog.enter(shutdown::Phase::StoppingReactors);
    engine.stop_threads();
    drop(engine);
    drop(control);
    eprintln!("stackbd: stopped");
    if sync_errors > 0 {
        return Err(format!("{sync_errors} leaves could not be flushed"));
    }
    Ok(())
}

/// The first export's name, for the URIs the start-up line prints (empty without exports).
fn first_export(d: &Daemon) -> String {
    d.exports
        .all()
        .into_iter()
        .map(|e| e.name)
        .min()
        .unwrap_or_default()
}

/// The engine, also after a panic elsewhere poisoned its lock: every engine call that can
/// fail on input returns an error before it changes anything (checked arithmetic, bounded
/// durations), so a poisoned lock still guards a consistent engine.
/// How often every leaf is asked for its health (the slow timer of the file leaf's checks).
const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// A thread that asks every leaf for its health every [`HEALTH_EVERY`] and logs each change of
/// state with the leaf's name and error. Its own thread: a check that blocks (an `fstat` on a
/// hung filesystem) holds up neither the main loop's suspend deadlines nor the engine lock.
/// Ends when the daemon stops.
fn spawn_health_poll(d: Arc<Daemon>) {
    let spawned = std::thread::Builder::new()
        .name("leaf-health".into())
        .spawn(move || {
            let mut seen = std::collections::HashMap::new();
            while !d.stop.load(Ordering::Relaxed) {
                std::thread::sleep(HEALTH_EVERY);
                poll_leaf_health(&d, &mut seen);
            }
        });
    if let Err(e) = spawned {
        eprintln!("stackbd: cannot start the leaf health thread: {e}");
    }
}

/// Asks every leaf for its health (outside the engine lock) and logs changes from `seen`, the
/// states seen last time by leaf name (a leaf seen for the first time counts as ok before).
fn poll_leaf_health(
    d: &Daemon,
    seen: &mut std::collections::HashMap<String, stackbd_core::HealthState>,
) {
    use stackbd_core::HealthState;
    let leaves: Vec<(String, Arc<dyn stackbd_core::Leaf>)> = {
        let e = lock_engine(d);
        e.ls()
            .into_iter()
            .filter(|(_, is_volume)| !is_volume)
            .filter_map(|(n, _)| Some((e.leaf(&n).ok()?, n)))
            .map(|(l, n)| (n, l))
            .collect()
    };
    seen.retain(|n, _| leaves.iter().any(|(m, _)| m == n));
    for (name, leaf) in leaves {
        let h = leaf.health();
        let was = seen
            .insert(name.clone(), h.state)
            .unwrap_or(HealthState::Ok);
        if was == h.state {
            continue;
        }
        let err = h.error().unwrap_or("-");
        if h.state == HealthState::Ok {
            tracing::info!(leaf = %name, %was, "leaf ok again");
            eprintln!("stackbd: leaf '{name}' is ok again (was {was}; last error: {err})");
        } else {
            tracing::warn!(leaf = %name, state = %h.state, %was, error = err, "leaf health");
            eprintln!("stackbd: leaf '{name}' is {} (was {was}): {err}", h.state);
        }
    }
}

fn lock_engine(d: &Daemon) -> std::sync::MutexGuard<'_, Engine> {
    d.engine
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Used by tests and the CLI: is a path a live control socket?
pub fn control_alive(p: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(p).is_ok()
}
