//! Leaf health through the daemon: `stackbd leaf ls` (text and `leaf_ls` JSON), `stats` and
//! the daemon's log say when an nbd leaf's server is stopped (SIGSTOP longer than the leaf's
//! timeout: `failed`/`reconnecting` with the timeout) and `ok` again once it resumes, with the
//! data written before intact; and when a file leaf's backing file is deleted (unlinked while
//! open) or truncated. nbdkit is required.

mod common;

use common::*;
use serde_json::{json, Value};
use stackbd_core::{DevId, Engine, ReactorConfig, Status};
use stackbd_leaves::nbd_client::{NbdLeaf, NbdOptions};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cli(d: &Daemon, args: &[&str]) -> Out {
    run_ok(
        Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(&d.control),
        QUICK,
    )
}

/// The `leaf_ls` entry of leaf `name`.
fn leaf(d: &Daemon, name: &str) -> Value {
    let r = d.control(&json!({"v": 1, "cmd": "leaf_ls"}));
    assert_eq!(r["ok"], true, "leaf_ls: {r}");
    r["leaves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no leaf {name}: {r}"))
        .clone()
}

/// The `stats` entry of leaf `name`.
fn stats_leaf(d: &Daemon, name: &str) -> Value {
    let r = d.control(&json!({"v": 1, "cmd": "stats"}));
    assert_eq!(r["ok"], true, "stats: {r}");
    r["leaves"]
        .as_array()
        .unwrap_or_else(|| panic!("stats has no leaves: {r}"))
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no leaf {name} in stats: {r}"))
        .clone()
}

/// Sends `sig` to a process this test started, by PID.
fn signal(pid: u32, sig: &str) {
    assert_ne!(pid, 0);
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{sig} {pid}")),
        QUICK,
    );
    if sig == "STOP" {
        wait_stopped(pid);
    }
}

/// Waits until every thread of `pid` is stopped (a SIGSTOP takes effect asynchronously: a
/// request sent right after `kill` may still be served).
fn wait_stopped(pid: u32) {
    let start = std::time::Instant::now();
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(Result::ok).all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                        s.rsplit_once(')')
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                            .is_some_and(|st| st == "T" || st == "t")
                    })
                })
            })
            .unwrap_or(false);
        if all {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "process {pid} did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits until the daemon's log contains `what`.
fn wait_log(d: &Daemon, what: &str, within: Duration) {
    let t = Instant::now();
    while !d.log_text().contains(what) {
        assert!(
            t.elapsed() < within,
            "the daemon did not log '{what}' within {within:?}:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29) ^ seed)
        .collect()
}

/// An NBD client of the daemon's export `v` (stackbd's own nbd leaf in an inline engine, with
/// a timeout longer than any stall here: the daemon answers with errors, never silence).
fn client(d: &Daemon) -> (Engine, DevId) {
    let l = NbdLeaf::connect(
        &d.uri("v"),
        NbdOptions {
            timeout: Duration::from_secs(120),
            ..NbdOptions::default()
        },
    )
    .expect("connect to the daemon's export");
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    e.add_leaf("d", Arc::new(l)).unwrap();
    let v = e.create("v", Some("0 131072 linear d 0")).unwrap();
    (e, v)
}

/// An nbd leaf (2 s timeout) on nbdkit, exported as `v`; nbdkit stopped for `stall`, then
/// resumed.
fn nbd_leaf_through_a_stall(stall: Duration) {
    let dir = tempdir();
    let srv = NbdServer::nbdkit("k", dir.path(), &["memory", "64M"]);
    let config = format!(
        r#"[leaf.n]
kind = "nbd"
uri = {uri:?}
timeout = "2s"
[volume.v]
table = "0 131072 linear n 0"
[export.v]
volume = "v"
read_only = false
"#,
        uri = srv.uri()
    );
    let cfg = dir.path().join("stackbd.toml");
    std::fs::write(&cfg, config).unwrap();
    // One reactor: an idle reactor's connection would stay up through the stall (nothing in
    // flight times out on it) and make the leaf `degraded` rather than down.
    let d = Daemon::start(Opts {
        config: Some(cfg),
        reactors: Some(1),
        ..Opts::default()
    });
    let (mut e, v) = client(&d);
    let data = pattern(1 << 20, 0x4b);
    assert_eq!(e.write_at(v, 0, &data), Status::Ok);
    assert_eq!(e.flush(v), Status::Ok);
    let l = leaf(&d, "n");
    assert_eq!(l["state"], "ok", "{l}");
    assert!(l.get("error").is_none(), "{l}");

    signal(srv.pid(), "STOP");
    let t0 = Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while t0.elapsed() < stall {
        let t = Instant::now();
        let st = e.read_at(v, 8, &mut buf);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a read took {:?} while the server was stopped",
            t.elapsed()
        );
        seen.push(st);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!seen.contains(&Status::Ok), "{seen:?}");
    let l = leaf(&d, "n");
    eprintln!("stopped {stall:?}: {l}");
    assert!(
        l["state"] == "failed" || l["state"] == "reconnecting",
        "{l}"
    );
    // A stopped unix-socket server first times out; once its accept queue is full, connects
    // are refused.
    let err = l["error"].as_str().unwrap_or("");
    assert!(err.contains("timed out") || err.contains("refused"), "{l}");
    assert!(l["since"].as_f64().unwrap() > 0.0, "{l}");
    let s = stats_leaf(&d, "n");
    assert_eq!(s["state"], l["state"], "{s}");
    let out = cli(&d, &["leaf", "ls"]);
    eprintln!("{}", out.stdout);
    let row = out
        .stdout
        .lines()
        .find(|r| r.starts_with("n "))
        .unwrap_or_else(|| out.fail("no row for n"));
    assert!(row.contains(l["state"].as_str().unwrap()), "{row}");
    assert!(
        out.stdout
            .lines()
            .any(|x| x.starts_with("n: ") && x.contains("timed out")),
        "no note for n:\n{}",
        out.stdout
    );
    wait_log(&d, "leaf 'n' is ", Duration::from_secs(5));

    signal(srv.pid(), "CONT");
    let t1 = Instant::now();
    while e.read_at(v, 0, &mut buf) != Status::Ok {
        assert!(
            t1.elapsed() < Duration::from_secs(8),
            "no recovery after SIGCONT: {}",
            leaf(&d, "n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("recovered {:?} after SIGCONT", t1.elapsed());
    let mut back = vec![0u8; data.len()];
    assert_eq!(e.read_at(v, 0, &mut back), Status::Ok);
    assert!(back == data, "data written before the stall changed");
    let l = leaf(&d, "n");
    assert_eq!(l["state"], "ok", "{l}");
    assert!(l.get("error").is_none(), "{l}");
    assert!(
        l["last_error"].as_str().unwrap_or("").contains("timed out"),
        "{l}"
    );
    let out = cli(&d, &["leaf", "ls"]);
    assert!(
        !out.stdout.contains("n: "),
        "a note for an ok leaf:\n{}",
        out.stdout
    );
    wait_log(&d, "leaf 'n' is ok again", Duration::from_secs(5));
}

#[test]
fn nbd_leaf_shows_a_stopped_server_and_recovers() {
    nbd_leaf_through_a_stall(Duration::from_secs(8));
}

/// The issue's bar, through the daemon: a 60 s SIGSTOP of the server (about 65 s).
#[test]
fn nbd_leaf_recovers_after_a_60s_sigstop() {
    nbd_leaf_through_a_stall(Duration::from_secs(60));
}

#[test]
fn file_leaf_shows_a_deleted_or_truncated_backing_file() {
    let dir = tempdir();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    for p in [&a, &b] {
        std::fs::File::create(p).unwrap().set_len(8 * MIB).unwrap();
    }
    let config = format!(
        r#"[leaf.fa]
kind = "file"
path = {a:?}
[leaf.fb]
kind = "file"
path = {b:?}
[volume.v]
table = "0 16384 linear fa 0"
[export.v]
volume = "v"
read_only = false
"#
    );
    let cfg = dir.path().join("stackbd.toml");
    std::fs::write(&cfg, config).unwrap();
    let d = Daemon::start(Opts {
        config: Some(cfg),
        ..Opts::default()
    });
    for n in ["fa", "fb"] {
        assert_eq!(leaf(&d, n)["state"], "ok");
    }

    std::fs::remove_file(&a).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let la = leaf(&d, "fa");
    assert_eq!(la["state"], "failed", "{la}");
    assert_eq!(la["error"], "backing file deleted", "{la}");
    let lb = leaf(&d, "fb");
    assert_eq!(lb["state"], "failed", "{lb}");
    assert_eq!(
        lb["error"],
        format!(
            "backing file truncated to {MIB} bytes (leaf is {})",
            8 * MIB
        ),
        "{lb}"
    );
    assert_eq!(stats_leaf(&d, "fa")["state"], "failed");
    let out = cli(&d, &["leaf", "ls"]);
    eprintln!("{}", out.stdout);
    assert!(out.stdout.lines().next().unwrap().contains("STATE"));
    assert!(
        out.stdout.contains("fa: failed: backing file deleted"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("fb: failed: backing file truncated to"),
        "{}",
        out.stdout
    );
    let stats = cli(&d, &["stats"]);
    assert!(
        stats.stdout.contains("backing file deleted"),
        "{}",
        stats.stdout
    );
    // The daemon's own slow timer notices too, and logs it.
    wait_log(
        &d,
        "leaf 'fa' is failed (was ok): backing file deleted",
        Duration::from_secs(5),
    );
    wait_log(
        &d,
        "leaf 'fb' is failed (was ok): backing file truncated",
        Duration::from_secs(5),
    );
}
