//! `serve` always stops: SIGTERM with a suspended volume holding a write lets the write go on
//! and exits 0 with the data acknowledged before it (and the write, if acknowledged) intact
//! after a restart; I/O that never ends is abandoned after `--shutdown-timeout` (exit 1, named
//! in the log); a second signal forces the exit at once (exit 2, saying what was abandoned).

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it holds; fails the test after 30 s.
fn until(what: &str, d: &Daemon, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; daemon log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_io(opts: &[&str], uri: &str, cmds: &[&str]) {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]).args(opts);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    let out = run(&mut c, QUICK);
    if !out.ok() || out.stdout.contains("failed") {
        out.fail("qemu-io command failed");
    }
}

/// qemu-io in the background, writing `cmds` to `uri`.
fn qemu_io_bg(dir: &Path, uri: &str, cmds: &[&str]) -> Bg {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    Bg::start(&mut c, &dir.join("qemu-io.log"))
}

#[test]
fn sigterm_resumes_a_suspended_volume_holding_a_write() {
    let tmp = tempdir();
    let img = tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let cfg = tmp.path().join("stackbd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[leaf.f0]\nkind = \"file\"\npath = {img:?}\n\
             [volume.v]\ntable = \"0 32768 linear f0 0\"\n\
             [export.v]\nvolume = \"v\"\nread_only = false\n"
        ),
    )
    .unwrap();
    let state = tmp.path().join("state");
    let mut d = Daemon::start(Opts {
        config: Some(cfg),
        state_dir: Some(state.clone()),
        ..Opts::default()
    });
    // Acknowledged before the suspend.
    qemu_io(&[], &d.uri("v"), &["write -P 0xa1 0 1M", "flush"]);

    let r = d.control(&json!({"v": 1, "cmd": "suspend", "name": "v", "deadline_s": null}));
    assert_eq!(r["ok"], true, "suspend: {r}");
    let held = total(&stats_totals(&d), "held");
    let mut writer = qemu_io_bg(tmp.path(), &d.uri("v"), &["write -P 0xb2 1M 1M"]);
    until("the write to be held", &d, || {
        total(&stats_totals(&d), "held") > held
    });
    assert!(writer.try_exit().is_none(), "the write was not held");

    d.signal("TERM");
    let s = d.wait_exit(Duration::from_secs(15));
    let log = d.log_text();
    assert!(s.success(), "exit {s}; log:\n{log}");
    assert!(
        log.contains("resuming suspended volume 'v'") && log.contains("stackbd: stopped"),
        "log:\n{log}"
    );
    writer.wait(Duration::from_secs(30));
    // Acknowledged (qemu-io says it wrote) or failed cleanly: either way nothing half-done.
    let acked = writer.output().contains("wrote 1048576/1048576 bytes");
    eprintln!(
        "held write acknowledged: {acked}; qemu-io said:\n{}",
        writer.output()
    );
    drop(d);

    let d = Daemon::start(Opts {
        state_dir: Some(state),
        ..Opts::default()
    });
    let r = d.control(&json!({"v": 1, "cmd": "info", "name": "v"}));
    assert_eq!(r["info"]["suspended"], false, "after restart: {r}");
    qemu_io(&["-r"], &d.uri("v"), &["read -P 0xa1 0 1M"]);
    if acked {
        qemu_io(&["-r"], &d.uri("v"), &["read -P 0xb2 1M 1M"]);
    }
}

/// A mem leaf under a volume that delays every write by an hour, exported as `slow`.
const SLOW: &str = "[leaf.m0]\nkind = \"mem\"\nsize = \"4MiB\"\n\
    [volume.slow]\ntable = \"0 8192 delay m0 0 3600000\"\n\
    [export.slow]\nvolume = \"slow\"\nread_only = false\n";

/// Starts a daemon on [`SLOW`] and a write that will not end, in flight in the delay target.
fn daemon_with_a_write_that_never_ends(timeout_s: u64) -> (Daemon, Bg, tempfile::TempDir) {
    let tmp = tempdir();
    let cfg = tmp.path().join("stackbd.toml");
    std::fs::write(&cfg, SLOW).unwrap();
    let d = Daemon::start(Opts {
        config: Some(cfg),
        args: vec!["--shutdown-timeout".into(), timeout_s.to_string()],
        ..Opts::default()
    });
    let writer = qemu_io_bg(tmp.path(), &d.uri("slow"), &["write -P 7 0 4k"]);
    until("the write to wait in the delay target", &d, || {
        let r = d.control(&json!({"v": 1, "cmd": "status", "name": "slow"}));
        let s = r["status"].as_str().unwrap_or("").to_string();
        let w: Vec<&str> = s.split_whitespace().collect();
        w.len() >= 3 && w[w.len() - 2] != "0"
    });
    (d, writer, tmp)
}

#[test]
fn io_that_never_ends_is_abandoned_after_the_shutdown_timeout() {
    let (mut d, _writer, _tmp) = daemon_with_a_write_that_never_ends(1);
    d.signal("TERM");
    let s = d.wait_exit(Duration::from_secs(20));
    let log = d.log_text();
    assert_eq!(s.code(), Some(1), "exit {s}; log:\n{log}");
    assert!(
        log.contains("1 connection(s) still have I/O in flight after 1 s")
            && log.contains("stopped, abandoning 1 connection(s) with I/O in flight"),
        "log:\n{log}"
    );
}

#[test]
fn a_second_sigterm_forces_the_exit_and_says_what_was_abandoned() {
    let (mut d, _writer, _tmp) = daemon_with_a_write_that_never_ends(3600);
    d.signal("TERM");
    until("the shutdown to begin", &d, || {
        d.log_text().contains("stopping: draining")
    });
    d.signal("TERM");
    let s = d.wait_exit(Duration::from_secs(15));
    let log = d.log_text();
    assert_eq!(s.code(), Some(2), "exit {s}; log:\n{log}");
    assert!(
        log.contains(
            "forced exit (a second signal) while draining connections; abandoned: 1 NBD \
             connection(s) still open"
        ),
        "log:\n{log}"
    );
}
