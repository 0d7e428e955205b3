//! The control socket and the dmsetup-style CLI, end to end: the real daemon binary
//! (`stackbd serve`) on a temporary control socket and state dir, driven by the real CLI binary.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stackbd");

/// Two 4 MiB (8192-sector) leaves the daemon starts with.
const INIT: &str = r#"
[leaf.m0]
kind = "mem"
size = "4MiB"
[leaf.m1]
kind = "mem"
size = "4MiB"
"#;

/// A daemon on a temporary dir; killed on drop, so a failing test never leaves it running.
struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    sock: PathBuf,
    starts: usize,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("init.toml"), INIT).unwrap();
        let mut d = Daemon {
            sock: dir.path().join("c.sock"),
            child: None,
            dir,
            starts: 0,
        };
        d.spawn();
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path(&format!("daemon-{}.log", self.starts)))
            .unwrap_or_default()
    }

    /// Starts the daemon (again, on the same state dir) and waits for its control socket.
    fn spawn(&mut self) {
        assert!(self.child.is_none());
        self.starts += 1;
        let log = std::fs::File::create(self.path(&format!("daemon-{}.log", self.starts))).unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "none", "--reactors", "2"])
            .arg("--control")
            .arg(&self.sock)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--config")
            .arg(self.path("init.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        self.child = Some(child);
        let start = Instant::now();
        while UnixStream::connect(&self.sock).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({st}) before answering:\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no control socket after 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the daemon to exit (after shutdown or a signal).
    fn exit_status(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon did not exit within 60 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).env("STACKBD_CONTROL", &self.sock);
        c
    }

    fn run(&self, args: &[&str]) -> Out {
        Out::new(args, self.cmd(args).output().unwrap())
    }

    /// Runs a verb that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.run(args).ok()
    }

    /// Runs a verb that must fail; its stderr (checked to be `stackbd VERB: ...`).
    fn fail(&self, args: &[&str]) -> String {
        self.run(args).fail()
    }

    /// `--json` output of a verb that must succeed.
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let v: Value = serde_json::from_str(&self.ok(&a)).expect("one JSON object");
        assert_eq!(v["v"], 1);
        assert_eq!(v["ok"], true);
        v
    }

    fn state(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("state.toml")).unwrap()
    }

    /// The state file is a valid config: `stackbd check` accepts it.
    fn check_state(&self) -> String {
        let p = self.state_dir().join("state.toml");
        let out = Command::new(BIN).arg("check").arg(&p).output().unwrap();
        assert!(
            out.status.success(),
            "stackbd check {} failed:\n{}\nstate:\n{}",
            p.display(),
            String::from_utf8_lossy(&out.stderr),
            self.state()
        );
        self.state()
    }

    fn socket(&self) -> Raw {
        Raw::connect(&self.sock)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Out {
    args: String,
    out: Output,
}

impl Out {
    fn new(args: &[&str], out: Output) -> Out {
        Out {
            args: args.join(" "),
            out,
        }
    }

    fn code(&self) -> i32 {
        self.out.status.code().expect("exited")
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    fn ok(&self) -> String {
        assert_eq!(
            self.code(),
            0,
            "`stackbd {}` failed\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.stdout(),
            self.stderr()
        );
        self.stdout()
    }

    fn fail(&self) -> String {
        assert_eq!(
            self.code(),
            1,
            "`stackbd {}` should fail with status 1\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.stdout(),
            self.stderr()
        );
        let err = self.stderr();
        let verb: Vec<&str> = self
            .args
            .split(' ')
            .take_while(|a| !a.starts_with('-'))
            .collect();
        let verb = if matches!(verb[0], "leaf" | "export") {
            verb[..2].join(" ")
        } else {
            verb[0].to_string()
        };
        assert!(
            err.starts_with(&format!("stackbd {verb}: ")),
            "stderr of `stackbd {}` should start with 'stackbd {verb}: ': {err}",
            self.args
        );
        err
    }
}

/// A raw connection to the control socket.
struct Raw {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Raw {
    fn connect(p: &Path) -> Raw {
        let s = UnixStream::connect(p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Raw {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    fn send(&mut self, line: &[u8]) -> Value {
        self.w.write_all(line).unwrap();
        self.w.write_all(b"\n").unwrap();
        let mut reply = String::new();
        assert!(self.r.read_line(&mut reply).unwrap() > 0, "no reply");
        assert!(
            reply.starts_with("{\"v\":1,\"ok\":"),
            "reply starts with v and ok: {reply}"
        );
        serde_json::from_str(&reply).unwrap()
    }

    /// Sends a bad line: expects `ok:false` with an error containing `want`.
    fn refused(&mut self, line: &[u8], want: &str) {
        let r = self.send(line);
        assert_eq!(r["ok"], false, "{} -> {r}", String::from_utf8_lossy(line));
        let e = r["error"].as_str().unwrap();
        assert!(
            e.contains(want),
            "error for {} should contain '{want}': {e}",
            String::from_utf8_lossy(line)
        );
    }
}

fn info_field(info: &str, field: &str) -> String {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no '{field}:' in\n{info}"))
        .trim()
        .to_string()
}

/// Polls `f` until it holds (for states the daemon reaches by itself).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn table_lifecycle_create_load_resume_reload_suspend_clear_remove() {
    let d = Daemon::start();

    // An empty volume: no tables.
    assert_eq!(d.ok(&["create", "v"]), "");
    let info = d.ok(&["info", "v"]);
    assert_eq!(info_field(&info, "Name"), "v");
    assert_eq!(info_field(&info, "State"), "ACTIVE");
    assert_eq!(info_field(&info, "Tables present"), "None");
    assert_eq!(info_field(&info, "Open count"), "0");
    assert_eq!(info_field(&info, "Event number"), "0");
    assert_eq!(info_field(&info, "Number of targets"), "0");
    assert_eq!(d.ok(&["table", "v"]), "");

    // load: inactive only; the live table is untouched until resume.
    d.ok(&["load", "v", "--table", "0 2048 linear m0 0"]);
    let info = d.ok(&["info", "v"]);
    assert_eq!(info_field(&info, "Tables present"), "INACTIVE");
    assert_eq!(d.ok(&["table", "v"]), "");
    assert_eq!(d.ok(&["table", "v", "--inactive"]), "0 2048 linear m0 0\n");
    d.ok(&["resume", "v"]);
    let info = d.ok(&["info", "v"]);
    assert_eq!(info_field(&info, "Tables present"), "LIVE");
    assert_eq!(info_field(&info, "Event number"), "1");
    assert_eq!(info_field(&info, "Number of targets"), "1");
    assert_eq!(info_field(&info, "Size"), "2048 sectors (1 MiB)");

    // Both slots.
    d.ok(&["load", "v", "--table", "0 1024 linear m0 0; 1024 1024 zero"]);
    let info = d.ok(&["info", "v"]);
    assert_eq!(info_field(&info, "Tables present"), "LIVE & INACTIVE");
    d.ok(&["clear", "v"]);
    let info = d.ok(&["info", "v"]);
    assert_eq!(info_field(&info, "Tables present"), "LIVE");
    assert_eq!(d.ok(&["table", "v", "--inactive"]), "");

    // reload: a new live table in one step.
    d.ok(&[
        "reload",
        "v",
        "--table",
        "0 1024 linear m0 0\n1024 2048 striped 2 8 m0 1024 m1 0",
    ]);
    assert_eq!(
        d.ok(&["table", "v"]),
        "0 1024 linear m0 0\n1024 2048 striped 2 8 m0 1024 m1 0\n"
    );
    let status = d.ok(&["status", "v"]);
    let lines: Vec<&str> = status.lines().collect();
    assert_eq!(lines.len(), 2, "{status}");
    assert!(lines[0].starts_with("0 1024 linear"), "{status}");
    assert!(lines[1].starts_with("1024 2048 striped"), "{status}");
    let info = d.ok(&["info", "v"]);
    assert_eq!(info_field(&info, "Event number"), "2");
    assert_eq!(info_field(&info, "Number of targets"), "2");
    let deps = d.ok(&["deps", "v"]);
    assert!(deps.starts_with("2 dependencies\t: "), "{deps}");
    assert!(deps.contains("(m0)") && deps.contains("(m1)"), "{deps}");

    // Suspend and resume, with and without a deadline.
    d.ok(&["suspend", "v"]);
    assert_eq!(info_field(&d.ok(&["info", "v"]), "State"), "SUSPENDED");
    d.ok(&["resume", "v"]);
    assert_eq!(info_field(&d.ok(&["info", "v"]), "State"), "ACTIVE");
    let r = d.json(&["suspend", "v", "--noflush", "--no-deadline"]);
    assert_eq!(r["deadline_s"], Value::Null);
    assert_eq!(r["info"]["state"], "SUSPENDED");
    // Suspending again is a no-op, and says so.
    let r = d.json(&["suspend", "v"]);
    assert_eq!(r["already_suspended"], true);
    d.ok(&["resume", "v"]);
    let r = d.json(&["suspend", "v", "--deadline", "0.3"]);
    assert_eq!(r["deadline_s"], 0.3);
    eventually("the suspend deadline resumes the volume", || {
        info_field(&d.ok(&["info", "v"]), "State") == "ACTIVE"
    });

    // ls and ls --tree.
    d.ok(&["create", "top", "--table", "0 3072 linear v 0"]);
    assert_eq!(
        d.ok(&["ls"]),
        "m0\t(mem leaf)\nm1\t(mem leaf)\ntop\t(volume)\nv\t(volume)\n"
    );
    assert_eq!(
        d.ok(&["ls", "--tree"]),
        "top (volume)\n  v (volume)\n    m0 (mem)\n    m1 (mem)\n"
    );

    d.ok(&["remove", "top"]);
    d.ok(&["remove", "v"]);
    assert_eq!(d.ok(&["ls"]), "m0\t(mem leaf)\nm1\t(mem leaf)\n");
    assert!(d.fail(&["info", "v"]).contains("device 'v' does not exist"));
}

#[test]
fn tables_from_files_and_stdin() {
    let d = Daemon::start();
    let f = d.path("t.table");
    std::fs::write(&f, "# two lines\n0 100 linear m0 0\n100 100 zero\n").unwrap();
    d.ok(&["create", "a", "--table-file", f.to_str().unwrap()]);
    assert_eq!(d.ok(&["table", "a"]), "0 100 linear m0 0\n100 100 zero\n");

    let mut c = d.cmd(&["reload", "a", "--table-file", "-"]);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"0 300 linear m1 0\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Out::new(&["reload"], out).ok();
    assert_eq!(d.ok(&["table", "a"]), "0 300 linear m1 0\n");

    let missing = d.path("missing.table");
    let err = d.fail(&["load", "a", "--table-file", missing.to_str().unwrap()]);
    assert!(
        err.contains("cannot read table file") && err.contains("missing.table"),
        "{err}"
    );
    let err = d.fail(&["load", "a"]);
    assert!(err.contains("a table is required"), "{err}");
    // An empty table creates a volume without one, as dmsetup does.
    d.ok(&["create", "empty", "--table", "  # nothing\n"]);
    assert_eq!(
        info_field(&d.ok(&["info", "empty"]), "Tables present"),
        "None"
    );
}

#[test]
fn wait_wakes_on_a_reload_and_times_out_otherwise() {
    let d = Daemon::start();
    d.ok(&["create", "w", "--table", "0 64 zero"]);
    assert_eq!(info_field(&d.ok(&["info", "w"]), "Event number"), "0");

    // Nothing happens: times out, status 1.
    let t = Instant::now();
    let err = d.fail(&["wait", "w", "--timeout", "0.3"]);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("still 0"), "{err}");
    let out = d.run(&["wait", "w", "0", "--timeout", "0.2", "--json"]);
    assert_eq!(out.code(), 1);
    let r: Value = serde_json::from_str(&out.stdout()).unwrap();
    assert_eq!(r["timed_out"], true);
    assert_eq!(r["event_nr"], 0);

    // A wait in another thread; the daemon keeps answering meanwhile (the wait does not hold
    // the engine), and a reload wakes it.
    let waiter = {
        let mut c = d.cmd(&["wait", "w", "0", "--timeout", "30"]);
        std::thread::spawn(move || {
            let t = Instant::now();
            let out = c.output().unwrap();
            (out, t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    d.ok(&["info", "w"]);
    d.ok(&["ls"]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the daemon stalled during a wait"
    );
    assert!(!waiter.is_finished(), "wait returned before any event");
    d.ok(&["reload", "w", "--table", "0 128 zero"]);
    let (out, took) = waiter.join().unwrap();
    let stdout = Out::new(&["wait"], out).ok();
    assert_eq!(stdout, "Event number: 1\n");
    assert!(took < Duration::from_secs(20), "{took:?}");

    // Already past: returns at once.
    assert_eq!(d.ok(&["wait", "w"]), "Event number: 1\n");
    // Removed while waiting: an error, not a hang.
    let waiter = {
        let mut c = d.cmd(&["wait", "w", "1"]);
        std::thread::spawn(move || c.output().unwrap())
    };
    std::thread::sleep(Duration::from_millis(300));
    d.ok(&["remove", "w"]);
    let err = Out::new(&["wait"], waiter.join().unwrap()).fail();
    assert!(err.contains("removed while waiting"), "{err}");
}

#[test]
fn remove_is_refused_while_used_or_exported_unless_forced() {
    let d = Daemon::start();
    d.ok(&["create", "low", "--table", "0 2048 linear m0 0"]);
    d.ok(&["create", "high", "--table", "0 2048 linear low 0"]);
    let err = d.fail(&["remove", "low"]);
    assert!(
        err.contains("'low' is busy: used by volume 'high'"),
        "{err}"
    );
    let err = d.fail(&["remove", "low", "--force"]);
    assert!(err.contains("used by volume 'high'"), "{err}");

    d.ok(&["export", "add", "high", "--name", "hx"]);
    assert_eq!(info_field(&d.ok(&["info", "high"]), "Open count"), "1");
    let err = d.fail(&["remove", "high"]);
    assert!(err.contains("'high' is busy: exported as 'hx'"), "{err}");
    assert!(d.ok(&["ls"]).contains("high\t(volume)"));

    let r = d.json(&["remove", "high", "--force"]);
    assert_eq!(r["removed"], "high");
    assert_eq!(r["exports_removed"], serde_json::json!(["hx"]));
    assert_eq!(d.ok(&["export", "ls"]), "No exports\n");
    d.ok(&["remove", "low"]);
    assert_eq!(d.ok(&["ls"]), "m0\t(mem leaf)\nm1\t(mem leaf)\n");
    d.check_state();
}

#[test]
fn leaves_mem_null_and_file() {
    let d = Daemon::start();
    d.ok(&["leaf", "add", "mx", "mem", "1GiB"]);
    d.ok(&["leaf", "add", "nx", "null", "64MiB"]);
    let img = d.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    // A relative path is made absolute by the CLI (the daemon runs elsewhere).
    let out = d
        .cmd(&["leaf", "add", "fx", "file", "disk.img"])
        .current_dir(d.dir.path())
        .output()
        .unwrap();
    Out::new(&["leaf", "add"], out).ok();

    let ls = d.ok(&["leaf", "ls"]);
    let rows: Vec<Vec<&str>> = ls.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows[0],
        ["NAME", "KIND", "STATE", "SECTORS", "SIZE", "USED", "BY", "PARAMS"]
    );
    let row = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("{name} in\n{ls}"))
            .clone()
    };
    assert_eq!(row("mx")[1..5], ["mem", "ok", "2097152", "1"]);
    assert_eq!(row("nx")[1..5], ["null", "ok", "131072", "64"]);
    let fx = row("fx");
    assert_eq!(fx[1..5], ["file", "ok", "4096", "2"]);
    assert_eq!(fx[6], "-");
    assert_eq!(
        fx[7..],
        [
            format!("path=\"{}\"", img.display()).as_str(),
            "direct=false",
            "queue_depth=256"
        ]
    );
    assert_eq!(row("mx")[7..], ["size=\"1GiB\""]);

    // A volume on the file leaf: the leaf cannot go while it is used.
    d.ok(&["create", "onfile", "--table", "0 4096 linear fx 0"]);
    assert_eq!(row_of(&d.ok(&["leaf", "ls"]), "fx")[6], "onfile");
    let err = d.fail(&["leaf", "rm", "fx"]);
    assert!(
        err.contains("'fx' is busy: used by volume 'onfile'"),
        "{err}"
    );
    let err = d.fail(&["leaf", "rm", "onfile"]);
    assert!(err.contains("is a volume, not a leaf"), "{err}");
    d.ok(&["remove", "onfile"]);
    d.ok(&["leaf", "rm", "fx"]);
    d.ok(&["leaf", "rm", "nx"]);
    let ls = d.ok(&["leaf", "ls"]);
    assert!(
        !ls.contains("fx") && !ls.contains("nx") && ls.contains("mx"),
        "{ls}"
    );

    let j = d.json(&["leaf", "ls"]);
    let names: Vec<&str> = j["leaves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["m0", "m1", "mx"]);

    // Refusals name the leaf and the reason.
    let err = d.fail(&["leaf", "add", "mx", "mem", "1MiB"]);
    assert!(err.contains("device 'mx' already exists"), "{err}");
    let err = d.fail(&["leaf", "add", "bad", "mem", "1GB"]);
    assert!(
        err.contains("leaf 'bad': size") && err.contains("ambiguous"),
        "{err}"
    );
    let err = d.fail(&["leaf", "add", "bad", "mem", "1000"]);
    assert!(
        err.contains("not a whole number of 512-byte sectors"),
        "{err}"
    );
    let err = d.fail(&["leaf", "add", "bad", "disk", "1MiB"]);
    assert!(err.contains("unknown kind 'disk'"), "{err}");
    let err = d.fail(&["leaf", "add", "bad", "mem", "1MiB", "--direct"]);
    assert!(err.contains("--direct applies to file leaves"), "{err}");
    let nofile = d.path("nofile.img");
    let err = d.fail(&["leaf", "add", "bad", "file", nofile.to_str().unwrap()]);
    assert!(
        err.contains("leaf 'bad'") && err.contains("nofile.img"),
        "{err}"
    );
    let err = d.fail(&["leaf", "add", "9bad", "mem", "1MiB"]);
    assert!(err.contains("not a valid device name"), "{err}");
    let err = d.fail(&["leaf", "rm", "nosuch"]);
    assert!(err.contains("device 'nosuch' does not exist"), "{err}");
    assert!(!d.ok(&["leaf", "ls"]).contains("bad"));
}

fn row_of(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|r| r[0] == name)
        .unwrap_or_else(|| panic!("{name} in\n{table}"))
}

#[test]
fn exports_add_rm_ls() {
    let d = Daemon::start();
    assert_eq!(d.ok(&["export", "ls"]), "No exports\n");
    d.ok(&["create", "vol", "--table", "0 2048 linear m0 0"]);
    d.ok(&["export", "add", "vol"]);
    d.ok(&["export", "add", "vol", "--name", "vol-ro", "--read-only"]);
    assert_eq!(
        d.ok(&["export", "ls"]),
        "NAME    VOLUME  SIZE   MODE\nvol     vol     1 MiB  rw\nvol-ro  vol     1 MiB  ro\n"
    );
    let info = d.ok(&["info", "vol"]);
    assert_eq!(info_field(&info, "Open count"), "2");
    assert_eq!(info_field(&info, "Exports"), "vol, vol-ro");

    // A reload resizes the exports.
    d.ok(&["reload", "vol", "--table", "0 4096 linear m0 0"]);
    let j = d.json(&["export", "ls"]);
    let x = &j["exports"][0];
    assert_eq!(x["name"], "vol");
    assert_eq!(x["bytes"], 4096 * 512);
    assert_eq!(j["exports"][1]["read_only"], true);

    let err = d.fail(&["export", "add", "vol"]);
    assert!(err.contains("export 'vol' already exists"), "{err}");
    let err = d.fail(&["export", "add", "nosuch"]);
    assert!(err.contains("device 'nosuch' does not exist"), "{err}");
    let err = d.fail(&["export", "add", "m0"]);
    assert!(err.contains("'m0': is a leaf, not a volume"), "{err}");
    let err = d.fail(&["export", "add", "vol", "--name", "has space"]);
    assert!(err.contains("not a valid export name"), "{err}");

    d.ok(&["export", "rm", "vol-ro"]);
    assert_eq!(info_field(&d.ok(&["info", "vol"]), "Open count"), "1");
    let err = d.fail(&["export", "rm", "vol-ro"]);
    assert!(err.contains("export 'vol-ro' does not exist"), "{err}");
    d.ok(&["export", "rm", "vol"]);
    assert_eq!(info_field(&d.ok(&["info", "vol"]), "Open count"), "0");
    // No longer exported: remove needs no force.
    d.ok(&["remove", "vol"]);
}

#[test]
fn json_replies() {
    let d = Daemon::start();
    let r = d.json(&["create", "j", "--table", "0 512 linear m1 0"]);
    assert_eq!(r["info"]["name"], "j");
    let r = d.json(&["info", "j"]);
    let i = &r["info"];
    assert_eq!(i["state"], "ACTIVE");
    assert_eq!(i["suspended"], false);
    assert_eq!(i["live_table"], true);
    assert_eq!(i["inactive_table"], false);
    assert_eq!(i["open_count"], 0);
    assert_eq!(i["event_nr"], 0);
    assert_eq!(i["sectors"], 512);
    assert_eq!(i["bytes"], 512 * 512);
    assert_eq!(i["targets"], 1);
    let r = d.json(&["table", "j"]);
    assert_eq!(r["table"], "0 512 linear m1 0\n");
    assert_eq!(r["inactive"], false);
    let r = d.json(&["ls", "--tree"]);
    assert_eq!(r["tree"], "j (volume)\n  m1 (mem)\nm0 (mem)\n");
    let devs = r["devices"].as_array().unwrap();
    let names: Vec<&str> = devs.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["j", "m0", "m1"]);
    assert_eq!(devs[0]["kind"], "volume");
    assert_eq!(devs[0]["volume"], true);
    assert_eq!(devs[0]["sectors"], 512);
    assert_eq!(devs[1]["kind"], "mem");
    assert_eq!(devs[1]["volume"], false);
    assert_eq!(devs[1]["sectors"], 8192);
    let r = d.json(&["deps", "j"]);
    assert_eq!(r["deps"], serde_json::json!(["m1"]));
    let r = d.json(&["status", "j"]);
    assert!(r["status"].as_str().unwrap().starts_with("0 512 linear"));

    // Errors with --json: the reply on stdout, the message on stderr, status 1.
    let out = d.run(&["info", "nope", "--json"]);
    assert_eq!(out.code(), 1);
    let r: Value = serde_json::from_str(&out.stdout()).unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"], "device 'nope' does not exist");
    assert_eq!(out.stderr(), "stackbd info: device 'nope' does not exist\n");
}

#[test]
fn bad_input_is_refused_with_what_where_and_why() {
    let d = Daemon::start();
    d.ok(&["create", "b", "--table", "0 2048 linear m0 0"]);

    let err = d.fail(&["info", "ghost"]);
    assert_eq!(err, "stackbd info: device 'ghost' does not exist\n");
    for verb in ["status", "table", "deps", "resume", "clear"] {
        let err = d.fail(&[verb, "ghost"]);
        assert!(err.contains("device 'ghost' does not exist"), "{err}");
    }
    let err = d.fail(&["create", "b"]);
    assert!(err.contains("device 'b' already exists"), "{err}");

    // A bad table: refused whole, with the line, the field and the reason; nothing changes.
    let err = d.fail(&[
        "create",
        "bad",
        "--table",
        "0 1024 linear m0 0\n1024 1024 linear m0 notanumber",
    ]);
    assert!(err.contains("volume 'bad': table refused: line 2"), "{err}");
    assert!(err.contains("offset"), "{err}");
    assert!(d.fail(&["info", "bad"]).contains("does not exist"));
    let err = d.fail(&["reload", "b", "--table", "0 1024 linear m0 0\n2000 10 zero"]);
    assert!(err.contains("line 2: start: gap"), "{err}");
    let err = d.fail(&["load", "b", "--table", "0 99999999 linear m0 0"]);
    assert!(err.contains("volume 'b': table refused: line 1"), "{err}");
    let err = d.fail(&["load", "b", "--table", "0 10 frobnicate"]);
    assert!(err.contains("unknown target type 'frobnicate'"), "{err}");
    let err = d.fail(&["load", "b", "--table", "0 10 linear ghost 0"]);
    assert!(err.contains("unknown device 'ghost'"), "{err}");
    assert_eq!(d.ok(&["table", "b"]), "0 2048 linear m0 0\n");
    assert_eq!(info_field(&d.ok(&["info", "b"]), "Tables present"), "LIVE");

    // message: no target takes messages; the sector must be a number inside the volume.
    let err = d.fail(&["message", "b", "0", "set", "thing"]);
    assert!(
        err.contains("'b': linear target does not accept messages (got 'set thing')"),
        "{err}"
    );
    let err = d.fail(&["message", "b", "abc", "hello"]);
    assert!(err.contains("invalid sector 'abc'"), "{err}");
    let err = d.fail(&["message", "b", "4096", "hello"]);
    assert!(err.contains("past the end"), "{err}");

    // Numbers the CLI parses.
    let err = d.fail(&["wait", "b", "x1"]);
    assert!(err.contains("invalid event number 'x1'"), "{err}");
    let err = d.fail(&["suspend", "b", "--deadline", "-1"]);
    assert!(err.contains("invalid --deadline '-1'"), "{err}");
    let err = d.fail(&["wait", "b", "--timeout", "soon"]);
    assert!(err.contains("invalid --timeout 'soon'"), "{err}");
    let err = d.fail(&["stats", "ghost"]);
    assert!(err.contains("no volume or export named 'ghost'"), "{err}");
    let err = d.fail(&["info", "m0"]);
    assert!(err.contains("'m0': is a leaf, not a volume"), "{err}");
}

#[test]
fn an_unreachable_daemon_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let out = Command::new(BIN)
        .args(["info", "x", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    let o = Out::new(&["info"], out);
    let err = o.fail();
    assert!(
        err.contains(&format!("cannot reach the daemon at {}", sock.display())),
        "{err}"
    );
    assert!(err.contains("is `stackbd serve` running?"), "{err}");
    // Through $STACKBD_CONTROL, and with --json (an error object on stdout).
    let out = Command::new(BIN)
        .args(["ls", "--json"])
        .env("STACKBD_CONTROL", &sock)
        .output()
        .unwrap();
    let o = Out::new(&["ls"], out);
    assert!(o.fail().contains(&sock.display().to_string()));
    let r: Value = serde_json::from_str(&o.stdout()).unwrap();
    assert_eq!(r["ok"], false);
}

#[test]
fn control_socket_is_private_and_survives_bad_requests() {
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    let mut s = d.socket();
    s.refused(b"{this is not json", "malformed request (not JSON)");
    assert_eq!(s.send(br#"{"v":1,"cmd":"ping"}"#)["ok"], true);
    s.refused(b"\xff\xfe{}", "not UTF-8");
    s.refused(b"[1,2,3]", "expected a JSON object");
    s.refused(br#"{"cmd":"ping"}"#, "missing field 'v'");
    s.refused(
        br#"{"v":2,"cmd":"ping"}"#,
        "protocol version 2 not supported",
    );
    s.refused(br#"{"v":1}"#, "missing field 'cmd'");
    s.refused(
        br#"{"v":1,"cmd":"frobnicate"}"#,
        "unknown command 'frobnicate'",
    );
    s.refused(br#"{"v":1,"cmd":"info"}"#, "info: missing field 'name'");
    s.refused(
        br#"{"v":1,"cmd":"info","name":7}"#,
        "info: field 'name' must be a string",
    );
    s.refused(
        br#"{"v":1,"cmd":"suspend","name":"x","noflsuh":true}"#,
        "suspend: unknown field 'noflsuh'",
    );
    s.refused(
        br#"{"v":1,"cmd":"message","name":"x","sector":"0","argv":["a"]}"#,
        "field 'sector' must be a whole number",
    );
    s.refused(
        br#"{"v":1,"cmd":"message","name":"x","sector":0,"argv":[]}"#,
        "field 'argv' must be a non-empty array",
    );
    s.refused(
        br#"{"v":1,"cmd":"suspend","name":"x","deadline_s":-3}"#,
        "deadline_s' must be a number of seconds > 0",
    );
    s.refused(
        br#"{"v":1,"cmd":"leaf_add","name":"z","kind":"mem","size":4096,"path":"/x"}"#,
        "field 'path' does not apply",
    );
    s.refused(
        br#"{"v":1,"cmd":"leaf_add","name":"z","kind":"file","path":"rel.img"}"#,
        "is relative",
    );
    s.refused(
        br#"{"v":1,"cmd":"leaf_add","name":"z","kind":"tape","size":4096}"#,
        "unknown kind 'tape' (known: mem, null, file, nbd, powercut)",
    );
    s.refused(
        br#"{"v":1,"cmd":"leaf_add","name":"z","kind":"nbd","params":{"uri":"nbd://h/e","timeout":"99999999999999999999s"}}"#,
        "leaf 'z': timeout: invalid duration",
    );
    // Blank lines are skipped; the same connection still answers.
    s.w.write_all(b"\n  \n").unwrap();
    let r = s.send(br#"{"v":1,"cmd":"ping"}"#);
    assert_eq!(r["ok"], true);
    assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(r["pid"], d.pid());
    // Every command works over the raw socket too.
    let r = s.send(br#"{"v":1,"cmd":"leaf_add","name":"z","kind":"null","params":{"size":4096}}"#);
    assert_eq!(r["leaf"]["sectors"], 8);
    assert_eq!(r["leaf"]["params"], serde_json::json!({"size": "4KiB"}));
    let r = s.send(br#"{"v":1,"cmd":"create","name":"q","table":"0 8 linear z 0"}"#);
    assert_eq!(r["info"]["sectors"], 8);
    let r = s.send(br#"{"v":1,"cmd":"remove","name":"q","force":null}"#);
    assert_eq!(r["removed"], "q");
}

#[test]
fn state_file_follows_every_change_and_restores_on_restart() {
    let mut d = Daemon::start();
    let st = d.check_state();
    assert!(st.contains("[leaf.m0]") && st.contains("[leaf.m1]"), "{st}");

    d.ok(&["leaf", "add", "n9", "null", "1MiB"]);
    let st = d.check_state();
    assert!(
        st.contains("[leaf.n9]\nkind = \"null\"\nsize = \"1MiB\"\n"),
        "{st}"
    );

    let img = d.path("f.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    d.ok(&["leaf", "add", "f9", "file", img.to_str().unwrap()]);
    let st = d.check_state();
    assert!(st.contains("[leaf.f9]\nkind = \"file\""), "{st}");
    assert!(
        st.contains(&format!("path = \"{}\"", img.display())),
        "{st}"
    );

    d.ok(&["create", "s", "--table", "0 2048 linear m0 0"]);
    let st = d.check_state();
    assert!(st.contains("[volume.s]"), "{st}");
    assert!(st.contains("0 2048 linear m0 0"), "{st}");

    d.ok(&["create", "t", "--table", "0 1024 linear s 0"]);
    d.ok(&["reload", "s", "--table", "0 2048 striped 2 8 m0 0 f9 0"]);
    let st = d.check_state();
    assert!(st.contains("0 2048 striped 2 8 m0 0 f9 0"), "{st}");
    assert!(!st.contains("0 2048 linear m0 0"), "{st}");

    d.ok(&["export", "add", "t", "--name", "tx", "--read-only"]);
    let st = d.check_state();
    assert!(
        st.contains("[export.tx]\nvolume = \"t\"\nread_only = true"),
        "{st}"
    );

    // A restart brings back the same leaves, volumes and exports.
    d.ok(&["shutdown"]);
    assert!(d.exit_status().success(), "{}", d.log());
    d.spawn();
    assert_eq!(d.ok(&["table", "s"]), "0 2048 striped 2 8 m0 0 f9 0\n");
    assert_eq!(d.ok(&["table", "t"]), "0 1024 linear s 0\n");
    assert_eq!(
        row_of(&d.ok(&["export", "ls"]), "tx"),
        ["tx", "t", "512", "KiB", "ro"]
    );
    assert!(d.ok(&["leaf", "ls"]).contains("n9"));

    d.ok(&["export", "rm", "tx"]);
    let st = d.check_state();
    assert!(!st.contains("[export.tx]"), "{st}");
    d.ok(&["remove", "t"]);
    d.ok(&["remove", "s"]);
    d.ok(&["leaf", "rm", "f9"]);
    let st = d.check_state();
    assert!(
        !st.contains("[volume.") && !st.contains("[leaf.f9]") && st.contains("[leaf.n9]"),
        "{st}"
    );
}

#[test]
fn stats_reports_reactors_exports_and_volumes() {
    let d = Daemon::start();
    d.ok(&["create", "sv", "--table", "0 2048 linear m0 0"]);
    d.ok(&["create", "other", "--table", "0 64 zero"]);
    d.ok(&["export", "add", "sv", "--name", "sx"]);

    let r = d.json(&["stats"]);
    let reactors = r["reactors"].as_array().unwrap();
    assert_eq!(reactors.len(), 2);
    for (i, x) in reactors.iter().enumerate() {
        assert_eq!(x["id"], i);
        for k in [
            "submitted",
            "completed",
            "splits",
            "held",
            "pool_allocs",
            "pool_exhausted",
            "pool_grown",
            "pool_notifications",
            "frame_overflows",
            "loops",
            "sleeps",
            "frontends",
        ] {
            assert!(x[k].is_u64(), "reactor {i}: {k} in {x}");
        }
        // Table changes notified the pools.
        assert!(x["pool_notifications"].as_u64().unwrap() > 0, "{x}");
    }
    assert!(r["totals"]["loops"].is_u64());
    assert_eq!(r["exports"][0]["name"], "sx");
    assert_eq!(r["exports"][0]["bytes"], 2048 * 512);
    let vols: Vec<&str> = r["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vols, ["other", "sv"]);

    // One volume (or export) only.
    let r = d.json(&["stats", "sv"]);
    assert_eq!(r["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(r["volumes"][0]["name"], "sv");
    assert_eq!(r["volumes"][0]["open_count"], 1);
    let r = d.json(&["stats", "sx"]);
    assert_eq!(r["exports"][0]["volume"], "sv");
    assert_eq!(r["volumes"].as_array().unwrap().len(), 0);

    let text = d.ok(&["stats"]);
    assert!(text.starts_with("Uptime: "), "{text}");
    assert!(
        text.contains("REACTOR  SUBMITTED  COMPLETED  SPLITS"),
        "{text}"
    );
    assert!(text.contains("\ntotal "), "{text}");
    assert!(
        text.contains("EXPORT  VOLUME  SIZE   MODE\nsx      sv      1 MiB  rw\n"),
        "{text}"
    );
    assert!(text.contains("VOLUME  STATE"), "{text}");
}

#[test]
fn shutdown_exits_zero_and_removes_the_socket() {
    let mut d = Daemon::start();
    d.ok(&["create", "keep", "--table", "0 64 zero"]);
    assert_eq!(d.ok(&["shutdown"]), "");
    let st = d.exit_status();
    assert!(st.success(), "exit {st}:\n{}", d.log());
    assert!(!d.sock.exists(), "control socket left behind");
    assert!(d.log().contains("stackbd: stopped"), "{}", d.log());
    assert!(d.check_state().contains("[volume.keep]"));
    // Nobody answers any more.
    let err = d.fail(&["ls"]);
    assert!(err.contains("cannot reach the daemon"), "{err}");
}

#[test]
fn sigterm_stops_the_daemon_cleanly() {
    let mut d = Daemon::start();
    d.ok(&["leaf", "add", "late", "mem", "1MiB"]);
    // A client in the middle of a wait does not keep the daemon from stopping.
    d.ok(&["create", "w", "--table", "0 64 zero"]);
    let waiter = {
        let mut c = d.cmd(&["wait", "w"]);
        std::thread::spawn(move || c.output().unwrap())
    };
    std::thread::sleep(Duration::from_millis(200));
    let kill = Command::new("kill")
        .args(["-TERM", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let st = d.exit_status();
    assert!(st.success(), "exit {st}:\n{}", d.log());
    let out = waiter.join().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(d.check_state().contains("[leaf.late]"));
}

/// dmsetup habits: `create NAME < table`, `table`/`status`/`info` without a NAME over every
/// volume, `remove_all` (tops first), `targets`, `version`.
#[test]
fn dmsetup_habits_scripts_depend_on() {
    let d = Daemon::start();
    // The table from standard input.
    let mut c = d.cmd(&["create", "vin"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"0 2048 linear m0 0\n2048 2048 linear m1 0\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        d.ok(&["table", "vin"]),
        "0 2048 linear m0 0\n2048 2048 linear m1 0\n"
    );
    // --notable: empty, whatever standard input holds.
    d.ok(&["create", "top", "--notable"]);
    d.ok(&["load", "top", "--table", "0 4096 linear vin 0"]);
    d.ok(&["resume", "top"]);
    // Every volume, each line prefixed with its name.
    let t = d.ok(&["table"]);
    assert!(t.contains("top: 0 4096 linear vin 0\n"), "{t}");
    assert!(
        t.contains("vin: 0 2048 linear m0 0\nvin: 2048 2048 linear m1 0\n"),
        "{t}"
    );
    let st = d.ok(&["status"]);
    assert!(st.contains("vin: 0 2048 linear"), "{st}");
    let info = d.ok(&["info"]);
    assert_eq!(info.matches("Name:").count(), 2, "{info}");
    assert!(info.contains("Name:              top") && info.contains("Name:              vin"));
    let j = d.json(&["table"]);
    assert_eq!(j["volumes"].as_array().map(Vec::len), Some(2), "{j}");
    // targets and version.
    let targets = d.ok(&["targets"]);
    for k in ["linear", "striped", "crypt", "multipath"] {
        assert!(
            targets.lines().any(|l| l.starts_with(k)),
            "{k} missing: {targets}"
        );
    }
    let v = d.ok(&["version"]);
    assert!(
        v.contains("Library version:") && v.contains("daemon pid"),
        "{v}"
    );
    // remove_all: `top` first (it uses `vin`), then `vin`.
    let r = d.ok(&["remove_all"]);
    assert!(r.contains("removed 2 volumes"), "{r}");
    assert_eq!(d.ok(&["table"]), "No devices found\n");
}
