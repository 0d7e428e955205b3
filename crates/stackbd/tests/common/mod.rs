//! Shared by the integration tests that drive `stackbd serve` with real NBD clients: a
//! [`Daemon`] guard (starts the binary on a free loopback port with its own control socket,
//! waits until the NBD port accepts, kills and reaps it on drop), a runner for external tools
//! with a timeout and captured output, and a guard for background tools.
//!
//! Every external tool is required: a missing one fails the test with a message naming the
//! package (`scripts/test.sh` installs them), it is never skipped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_stackbd");

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Size of the built-in demo export.
pub const DEMO_SIZE: u64 = GIB;

/// Time allowed for a quick tool run (one qemu-io, nbdinfo, nbdsh probe).
pub const QUICK: Duration = Duration::from_secs(60);
/// Time allowed for a long tool run (fio, a 64 MiB copy, mkfs).
pub const SLOW: Duration = Duration::from_secs(120);

/// The Debian package that provides each tool, for the failure message.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" | "nbdfuse" => "libnbd-bin",
        "nbdkit" => "nbdkit",
        "fio" => "fio",
        "fusermount3" => "fuse3",
        "mkfs.ext4" | "e2fsck" | "debugfs" => "e2fsprogs",
        "losetup" | "mount" | "umount" => "util-linux",
        "python3" => "python3-libnbd",
        "cryptsetup" => "cryptsetup-bin",
        _ => "?",
    }
}

/// Where a tool lives: `$PATH`, then the sbin directories (losetup, mkfs are there and not
/// always on a test runner's PATH).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The tool's path; fails the test (not skips it) when it is missing.
pub fn require_tool(tool: &str) -> PathBuf {
    find_tool(tool).unwrap_or_else(|| {
        panic!(
            "required tool '{tool}' not found (Debian package {}); scripts/test.sh installs it",
            package_of(tool)
        )
    })
}

/// A `Command` for a required tool.
pub fn tool(name: &str) -> Command {
    Command::new(require_tool(name))
}

/// `nbdsh` runs `python3 -m nbd` from PATH; the system Python is the one with the `nbd`
/// module, so /usr/bin goes first (a pyenv or venv python3 on PATH lacks it).
pub fn nbdsh() -> Command {
    let nbdsh = require_tool("nbdsh");
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "/usr/bin/python3 cannot import the 'nbd' module (Debian package python3-libnbd); \
         scripts/test.sh installs it"
    );
    let path = std::env::var("PATH").unwrap_or_default();
    let mut c = Command::new(nbdsh);
    c.env("PATH", format!("/usr/bin:/bin:{path}"));
    c
}

/// Runs a Python snippet in nbdsh (`nbd` imported, `h` an unconnected handle).
pub fn nbdsh_run(script: &str, timeout: Duration) -> Out {
    let mut c = nbdsh();
    c.arg("-c").arg(script);
    run_ok(&mut c, timeout)
}

/// What a finished tool printed.
#[derive(Debug)]
pub struct Out {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// Panics with everything the tool said.
    pub fn fail(&self, why: &str) -> ! {
        panic!(
            "{why}\ncommand: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.status, self.stdout, self.stderr
        )
    }
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        let a = a.to_string_lossy();
        if a.len() > 200 {
            s.push_str(&format!(" '{}...'", &a[..200]));
        } else {
            s.push_str(&format!(" '{a}'"));
        }
    }
    s
}

fn spawn(c: &mut Command) -> Child {
    let what = describe(c);
    c.spawn().unwrap_or_else(|e| {
        let prog = c.get_program().to_string_lossy().into_owned();
        panic!(
            "cannot run {what}: {e} (Debian package {}; scripts/test.sh installs it)",
            package_of(
                Path::new(&prog)
                    .file_name()
                    .map_or("", |n| n.to_str().unwrap_or(""))
            )
        )
    })
}

/// Runs a command to completion with captured output; kills it and fails the test if it
/// takes longer than `timeout`.
pub fn run(c: &mut Command, timeout: Duration) -> Out {
    let what = describe(c);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(c);
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let status = child.wait().expect("reap child");
            let out = Out {
                what,
                status,
                stdout: to.join().unwrap_or_default(),
                stderr: te.join().unwrap_or_default(),
            };
            out.fail(&format!("timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        what,
        status,
        stdout: to.join().unwrap_or_default(),
        stderr: te.join().unwrap_or_default(),
    }
}

/// [`run`], and fail the test unless the command exits 0.
pub fn run_ok(c: &mut Command, timeout: Duration) -> Out {
    let out = run(c, timeout);
    if !out.ok() {
        out.fail("command failed");
    }
    out
}

/// A tool running in the background; killed and reaped on drop unless it was waited for.
pub struct Bg {
    pub what: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Bg {
    /// Starts `c` with stdout and stderr going to `log`.
    pub fn start(c: &mut Command, log: &Path) -> Bg {
        let f = std::fs::File::create(log).expect("create log");
        c.stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f);
        let what = describe(c);
        Bg {
            child: Some(spawn(c)),
            what,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Exited already? (reaps it if so)
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let s = self.child.as_mut()?.try_wait().expect("try_wait");
        if s.is_some() {
            self.child = None;
        }
        s
    }

    /// Waits for it to exit; fails the test after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().expect("already reaped");
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                self.child = None;
                return s;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} did not exit within {timeout:?}; output:\n{}",
                    self.what,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port nobody listens on right now (the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// How to start a daemon.
#[derive(Clone, Debug, Default)]
pub struct Opts {
    /// `--config`; `None` serves the built-in demo (or the state found in `state_dir`).
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// Also listen on a unix socket (in the daemon's temp dir).
    pub unix: bool,
    /// `--reactors` (default 2).
    pub reactors: Option<usize>,
    /// `--mode`.
    pub mode: Option<String>,
    /// Working directory (for relative `--config` / `--state-dir` paths).
    pub cwd: Option<PathBuf>,
    /// More arguments for `serve`.
    pub args: Vec<String>,
}

/// A running `stackbd serve`, killed (SIGKILL) and reaped on drop unless it already exited.
pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    pub port: u16,
    /// Holds the control socket, the unix socket and the log.
    pub dir: tempfile::TempDir,
    pub control: PathBuf,
    pub socket: Option<PathBuf>,
    pub log: PathBuf,
}

impl Daemon {
    /// The demo stack (1 GiB export `demo`), TCP and a unix socket.
    pub fn demo() -> Daemon {
        Daemon::start(Opts {
            unix: true,
            ..Opts::default()
        })
    }

    /// Writes `config` into a temp file and serves it (TCP only).
    pub fn with_config(config: &str) -> (Daemon, tempfile::TempDir) {
        let cdir = tempdir();
        let path = cdir.path().join("stackbd.toml");
        std::fs::write(&path, config).expect("write config");
        let d = Daemon::start(Opts {
            config: Some(path),
            ..Opts::default()
        });
        (d, cdir)
    }

    /// Starts the daemon and waits until its NBD port accepts connections. A port taken
    /// between picking and binding is retried with another.
    pub fn start(opts: Opts) -> Daemon {
        let mut last = String::new();
        for _ in 0..5 {
            match Daemon::try_start(&opts) {
                Ok(d) => return d,
                Err(log) if log.contains("cannot listen") => last = log,
                Err(log) => panic!("stackbd serve did not start; its output:\n{log}"),
            }
        }
        panic!("stackbd serve could not bind a port; last output:\n{last}")
    }

    fn try_start(opts: &Opts) -> Result<Daemon, String> {
        let dir = tempdir();
        let port = free_port();
        let control = dir.path().join("control.sock");
        let log = dir.path().join("daemon.log");
        let socket = opts.unix.then(|| dir.path().join("nbd.sock"));
        let mut c = Command::new(BIN);
        c.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--control")
            .arg(&control)
            .arg("--reactors")
            .arg(opts.reactors.unwrap_or(2).to_string());
        if let Some(p) = &opts.config {
            c.arg("--config").arg(p);
        }
        if let Some(p) = &opts.state_dir {
            c.arg("--state-dir").arg(p);
        }
        if let Some(p) = &socket {
            c.arg("--socket").arg(p);
        }
        if let Some(m) = &opts.mode {
            c.arg("--mode").arg(m);
        }
        c.args(&opts.args);
        if let Some(d) = &opts.cwd {
            c.current_dir(d);
        }
        let f = std::fs::File::create(&log).expect("create daemon log");
        c.stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f)
            .env("RUST_BACKTRACE", "1");
        let child = c.spawn().expect("spawn stackbd serve");
        let mut d = Daemon {
            pid: child.id(),
            child: Some(child),
            port,
            dir,
            control,
            socket,
            log,
        };
        let start = Instant::now();
        loop {
            if let Some(s) = d.child.as_mut().unwrap().try_wait().expect("try_wait") {
                d.child = None;
                return Err(format!("(exited with {s})\n{}", d.log_text()));
            }
            // The banner comes once every listener and the control socket are up.
            let banner = d.log_text().contains("stackbd: serving");
            let tcp = banner && TcpStream::connect(("127.0.0.1", port)).is_ok();
            let unix = d
                .socket
                .as_ref()
                .is_none_or(|p| UnixStream::connect(p).is_ok());
            if tcp && unix {
                return Ok(d);
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "(NBD port {port} did not accept within 30 s)\n{}",
                    d.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> (&'static str, u16) {
        ("127.0.0.1", self.port)
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        let s = self
            .socket
            .as_ref()
            .expect("daemon started without a unix socket");
        format!("nbd+unix:///{export}?socket={}", s.display())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test if the daemon has exited.
    pub fn assert_alive(&mut self) {
        let child = self.child.as_mut().expect("daemon already reaped");
        if let Some(s) = child.try_wait().expect("try_wait") {
            self.child = None;
            panic!("stackbd serve died ({s}); its output:\n{}", self.log_text());
        }
    }

    /// Sends a signal (`TERM`, `INT`, ...) with the shell's `kill` builtin (`kill -TERM pid`;
    /// the builtin, so procps need not be installed).
    pub fn signal(&self, sig: &str) {
        assert!(self.child.is_some(), "daemon already reaped");
        run_ok(
            Command::new("sh")
                .arg("-c")
                .arg(format!("kill -{sig} {}", self.pid)),
            QUICK,
        );
    }

    /// Waits for the daemon to exit and reaps it; fails the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().expect("daemon already reaped");
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                self.child = None;
                return s;
            }
            if start.elapsed() > timeout {
                panic!(
                    "stackbd serve did not exit within {timeout:?}; its output:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One request on the control socket; the reply as JSON.
    pub fn control(&self, req: &serde_json::Value) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.control).expect("connect control socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        writeln!(s, "{req}").expect("write control request");
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .expect("read control reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad control reply {line:?}: {e}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- stackbd serve log ---\n{}", self.log_text());
            }
        }
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("stackbd-it-")
        .tempdir()
        .expect("create temp dir")
}

/// A config with one export `name` of `size_mib` MiB: two mem leaves, striped (64 KiB
/// chunks), a linear volume on top, like the demo.
pub fn striped_config(name: &str, size_mib: u64) -> String {
    let sectors = size_mib * MIB / 512;
    format!(
        r#"[leaf.m0]
kind = "mem"
size = "{half}MiB"
[leaf.m1]
kind = "mem"
size = "{half}MiB"
[volume.stripe]
table = "0 {sectors} striped 2 128 m0 0 m1 0"
[volume.{name}]
table = "0 {sectors} linear stripe 0"
[export.{name}]
volume = "{name}"
read_only = false
"#,
        half = size_mib / 2
    )
}

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for hundreds of MiB.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Compares two byte slices; the failure names the first differing offset.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// NBD servers the tests start, kill and restart (multipath paths)
// ---------------------------------------------------------------------------------------------

/// An `nbdkit` server on a unix socket, started by the test and ended by its PID only: `kill`
/// sends SIGKILL (a crash, as a path sees it), drop does the same. `start` again serves on the
/// same socket with the same arguments.
pub struct NbdServer {
    pub name: String,
    pub sock: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    starts: usize,
    bg: Option<Bg>,
}

impl NbdServer {
    /// `nbdkit -f --exit-with-parent -U DIR/NAME.sock ARGS...` (ARGS: filters, the plugin and
    /// its parameters), started and listening.
    pub fn nbdkit(name: &str, dir: &Path, args: &[&str]) -> NbdServer {
        let mut s = NbdServer {
            name: name.to_string(),
            sock: dir.join(format!("{name}.sock")),
            dir: dir.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            starts: 0,
            bg: None,
        };
        s.start();
        s
    }

    /// Starts it (again) and waits until its socket accepts connections.
    pub fn start(&mut self) {
        assert!(self.bg.is_none(), "{} is already running", self.name);
        // A killed nbdkit leaves its socket file behind.
        let _ = std::fs::remove_file(&self.sock);
        self.starts += 1;
        let log = self.dir.join(format!("{}.{}.log", self.name, self.starts));
        let mut c = tool("nbdkit");
        c.args(["-f", "--exit-with-parent", "-U"])
            .arg(&self.sock)
            .args(&self.args);
        let mut bg = Bg::start(&mut c, &log);
        let start = Instant::now();
        loop {
            if UnixStream::connect(&self.sock).is_ok() {
                break;
            }
            if let Some(st) = bg.try_exit() {
                panic!(
                    "{} exited ({st}) before listening:\n{}",
                    bg.what,
                    bg.output()
                );
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!(
                    "{} did not listen on {} within 10 s:\n{}",
                    bg.what,
                    self.sock.display(),
                    bg.output()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.bg = Some(bg);
    }

    /// SIGKILL by PID, and reap it.
    pub fn kill(&mut self) {
        let bg = self.bg.take().expect("server not running");
        drop(bg);
    }

    pub fn running(&self) -> bool {
        self.bg.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.bg.as_ref().map_or(0, Bg::pid)
    }

    /// `nbd+unix:///?socket=SOCK` (nbdkit serves any export name).
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// What every run of it printed.
    pub fn output(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.join(format!("{}.{i}.log", self.name)))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The daemon's summed reactor counters (`stats` on the control socket, `totals`).
pub fn stats_totals(d: &Daemon) -> serde_json::Value {
    let r = d.control(&serde_json::json!({"v": 1, "cmd": "stats"}));
    assert_eq!(r["ok"], true, "stats: {r}");
    r["totals"].clone()
}

/// One counter of [`stats_totals`]; fails the test if the daemon does not report it.
pub fn total(t: &serde_json::Value, key: &str) -> u64 {
    t[key]
        .as_u64()
        .unwrap_or_else(|| panic!("stats totals have no counter '{key}': {t}"))
}
