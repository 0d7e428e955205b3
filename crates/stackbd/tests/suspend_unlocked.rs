//! A suspend never holds the control plane: with one volume's I/O stuck on a hung nbd leaf
//! (its nbdkit SIGSTOPped by this test, by PID), `stackbd suspend` of that volume drains in the
//! background while `ls`, `info` of another volume and `create` answer at once; `info` shows
//! the draining volume as SUSPENDING (and since when); `resume`/`remove` of it are refused as
//! busy; a second suspend waits for the first. Once the server goes on, the suspend completes
//! and `info` shows the suspend deadline.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
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

fn signal(pid: u32, sig: &str) {
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{sig} {pid}")),
        QUICK,
    );
}

/// The CLI on the daemon's control socket.
fn cli(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).env("STACKBD_CONTROL", &d.control);
    c
}

/// Runs the CLI; its output and how long it took.
fn timed_cli(d: &Daemon, args: &[&str]) -> (Out, Duration) {
    let t = Instant::now();
    let out = run_ok(&mut cli(d, args), QUICK);
    (out, t.elapsed())
}

/// One control request; the reply and how long the daemon took to answer.
fn timed(d: &Daemon, req: Value) -> (Value, Duration) {
    let t = Instant::now();
    let r = d.control(&req);
    (r, t.elapsed())
}

fn totals(d: &Daemon) -> (u64, u64) {
    let r = d.control(&json!({"v": 1, "cmd": "stats"}));
    let t = &r["totals"];
    (
        t["submitted"].as_u64().unwrap_or(0),
        t["completed"].as_u64().unwrap_or(0),
    )
}

#[test]
fn other_verbs_answer_at_once_while_a_volume_drains_on_a_hung_leaf() {
    let tmp = tempdir();
    let mut server = NbdServer::nbdkit("hang", tmp.path(), &["memory", "16M"]);
    let cfg = tmp.path().join("stackbd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[leaf.n0]\nkind = \"nbd\"\nuri = {:?}\ntimeout = \"300s\"\n\
             [leaf.m0]\nkind = \"mem\"\nsize = \"16MiB\"\n\
             [volume.hung]\ntable = \"0 32768 linear n0 0\"\n\
             [volume.other]\ntable = \"0 32768 linear m0 0\"\n\
             [export.hung]\nvolume = \"hung\"\nread_only = false\n",
            server.uri()
        ),
    )
    .unwrap();
    let mut d = Daemon::start(Opts {
        config: Some(cfg),
        ..Opts::default()
    });

    // The server hangs; a write to it stays in flight.
    signal(server.pid(), "STOP");
    let (sub0, done0) = totals(&d);
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", "-c", "write -P 0x5a 0 4k"])
        .arg(d.uri("hung"));
    let mut writer = Bg::start(&mut c, &tmp.path().join("qemu-io.log"));
    until("the write to be in flight on the hung leaf", &d, || {
        let (s, c) = totals(&d);
        s > sub0 && c == done0
    });

    let mut suspend = Bg::start(
        &mut cli(&d, &["suspend", "hung", "--deadline", "600"]),
        &tmp.path().join("suspend.log"),
    );
    until("the volume to be suspending", &d, || {
        d.control(&json!({"v": 1, "cmd": "info", "name": "hung"}))["info"]["state"] == "SUSPENDING"
    });

    // Meanwhile the rest of the control plane answers at once.
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let (r, t) = timed(&d, json!({"v": 1, "cmd": "ls"}));
        assert_eq!(r["ok"], true, "ls: {r}");
        worst = worst.max(t);
        let (r, t) = timed(&d, json!({"v": 1, "cmd": "info", "name": "other"}));
        assert_eq!(r["info"]["state"], "ACTIVE", "info other: {r}");
        worst = worst.max(t);
        let (r, t) = timed(&d, json!({"v": 1, "cmd": "info", "name": "hung"}));
        assert_eq!(r["info"]["state"], "SUSPENDING", "info hung: {r}");
        assert!(r["info"]["suspending_for_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(
            r["info"]["suspending_since"].as_f64().unwrap() > 1.6e9,
            "{r}"
        );
        worst = worst.max(t);
        let (r, t) = timed(
            &d,
            json!({"v": 1, "cmd": "create", "name": format!("new{i}"), "table": "0 8 linear m0 0"}),
        );
        assert_eq!(r["ok"], true, "create: {r}");
        worst = worst.max(t);
    }
    eprintln!("slowest control answer while 'hung' drained: {worst:?}");
    assert!(
        worst < Duration::from_millis(100),
        "a control verb took {worst:?} while another volume drained"
    );
    // The CLI too (its own start-up included, so a looser bound).
    for _ in 0..3 {
        let (out, t) = timed_cli(&d, &["ls"]);
        assert!(out.stdout.contains("other"), "ls: {}", out.stdout);
        assert!(t < Duration::from_secs(2), "stackbd ls took {t:?}");
        let (out, t) = timed_cli(&d, &["info", "other"]);
        assert!(out.stdout.contains("ACTIVE"), "info: {}", out.stdout);
        assert!(t < Duration::from_secs(2), "stackbd info took {t:?}");
    }
    let (out, _) = timed_cli(&d, &["info", "hung"]);
    assert!(
        out.stdout.contains("SUSPENDING") && out.stdout.contains("Suspending for:"),
        "info hung: {}",
        out.stdout
    );
    // Verbs on the draining volume itself: refused, clearly.
    for cmd in ["resume", "remove", "reload"] {
        let mut req = json!({"v": 1, "cmd": cmd, "name": "hung"});
        if cmd == "reload" {
            req["table"] = json!("0 32768 linear n0 0");
        }
        if cmd == "remove" {
            req["force"] = json!(true);
        }
        let r = d.control(&req);
        assert_eq!(r["ok"], false, "{cmd}: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains("busy") && e.contains("suspending"), "{cmd}: {e}");
    }
    let r = d.control(&json!({"v": 1, "cmd": "export_ls"}));
    assert!(
        r.to_string().contains("\"hung\""),
        "a refused remove kept the export: {r}"
    );
    // A second suspend waits for the first.
    let sock = d.control.clone();
    let second = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        writeln!(s, r#"{{"v":1,"cmd":"suspend","name":"hung"}}"#).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap()
    });
    assert!(
        suspend.try_exit().is_none(),
        "suspend ended while the leaf hung"
    );
    d.assert_alive();

    // The server goes on: the write completes, the drain ends, the volume is suspended.
    signal(server.pid(), "CONT");
    let st = suspend.wait(Duration::from_secs(30));
    assert!(st.success(), "suspend: {st}: {}", suspend.output());
    let r = second.join().unwrap();
    assert_eq!(r["ok"], true, "second suspend: {r}");
    assert_eq!(r["already_suspended"], true, "second suspend: {r}");
    let r = d.control(&json!({"v": 1, "cmd": "info", "name": "hung"}));
    assert_eq!(r["info"]["state"], "SUSPENDED", "{r}");
    let left = r["info"]["suspend_deadline_s"].as_f64().unwrap();
    assert!(left > 500.0 && left <= 600.0, "deadline left: {r}");
    let (out, _) = timed_cli(&d, &["info", "hung"]);
    assert!(
        out.stdout
            .contains("Suspend deadline:  resumes by itself in"),
        "info hung: {}",
        out.stdout
    );
    let r = d.control(&json!({"v": 1, "cmd": "resume", "name": "hung"}));
    assert_eq!(r["info"]["state"], "ACTIVE", "{r}");
    assert!(r["info"].get("suspend_deadline_s").is_none(), "{r}");
    let st = writer.wait(Duration::from_secs(30));
    assert!(
        st.success() && writer.output().contains("wrote 4096/4096"),
        "write: {}",
        writer.output()
    );
    server.kill();
}

#[test]
fn info_shows_no_deadline_for_a_suspend_without_one() {
    let (d, _cfg) = Daemon::with_config(
        "[leaf.m0]\nkind = \"mem\"\nsize = \"4MiB\"\n[volume.v]\ntable = \"0 8192 linear m0 0\"\n",
    );
    let r = d.control(&json!({"v": 1, "cmd": "suspend", "name": "v", "deadline_s": null}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["info"]["suspend_deadline_s"], Value::Null, "{r}");
    assert!(r["info"].get("suspend_deadline_s").is_some(), "{r}");
    let out = run_ok(&mut cli(&d, &["info", "v"]), QUICK);
    assert!(
        out.stdout
            .contains("Suspend deadline:  none (until resume)"),
        "{}",
        out.stdout
    );
}
