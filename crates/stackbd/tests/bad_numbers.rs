//! No panic from numbers: a suspend deadline no clock can hold (`--deadline 1e19`, or
//! `deadline_s` on the control socket) is refused with a clear error and the daemon works on
//! (the volume active, its I/O served, later deadlines firing); a volume of 2^63 bytes or
//! more is refused by `stackbd check`, `create` and `load`.

mod common;

use common::*;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

fn cli(d: &Daemon, args: &[&str]) -> Out {
    run(
        Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(&d.control),
        QUICK,
    )
}

fn info(d: &Daemon, name: &str) -> serde_json::Value {
    let r = d.control(&json!({"v": 1, "cmd": "info", "name": name}));
    assert_eq!(r["ok"], true, "info: {r}");
    r["info"].clone()
}

/// The demo volume is active and reads and writes.
fn works(d: &Daemon) {
    assert_eq!(info(d, "demo")["suspended"], false);
    let out = run_ok(
        tool("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x3c 0 64k",
                "-c",
                "read -P 0x3c 0 64k",
            ])
            .arg(d.uri("demo")),
        QUICK,
    );
    assert!(!out.stdout.contains("failed"), "{out:?}");
}

#[test]
fn a_huge_suspend_deadline_is_refused_and_the_daemon_works_on() {
    let mut d = Daemon::demo();
    for deadline in ["1e19", "1.8e19", "1e300", "2592001"] {
        let out = cli(&d, &["suspend", "demo", "--deadline", deadline]);
        assert!(!out.ok(), "--deadline {deadline} accepted: {out:?}");
        assert!(
            out.stderr.contains("deadline") && !out.stderr.contains("panick"),
            "--deadline {deadline}: {out:?}"
        );
        d.assert_alive();
        works(&d);
    }
    for deadline_s in [json!(1e19), json!(1.7e308), json!(u64::MAX)] {
        let r =
            d.control(&json!({"v": 1, "cmd": "suspend", "name": "demo", "deadline_s": deadline_s}));
        assert_eq!(r["ok"], false, "deadline_s {deadline_s}: {r}");
        assert!(
            r["error"].as_str().unwrap_or("").contains("deadline"),
            "deadline_s {deadline_s}: {r}"
        );
        d.assert_alive();
    }
    // Everything answers, the lock is not poisoned, and deadlines still fire.
    assert_eq!(cli(&d, &["ls"]).status.code(), Some(0));
    works(&d);
    let out = cli(&d, &["suspend", "demo", "--deadline", "0.3"]);
    assert!(out.ok(), "{out:?}");
    assert_eq!(info(&d, "demo")["suspended"], true);
    let start = Instant::now();
    while info(&d, "demo")["suspended"] == true {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the deadline never fired"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    works(&d);
    d.signal("TERM");
    assert!(d.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn a_volume_of_2_63_bytes_or_more_is_refused() {
    for len in [
        "9223372036854775808",
        "18446744073709551615",
        "18014398509481984",
    ] {
        let dir = tempdir();
        let cfg = dir.path().join("big.toml");
        std::fs::write(&cfg, format!("[volume.big]\ntable = \"0 {len} zero\"\n")).unwrap();
        let out = run(Command::new(BIN).arg("check").arg(&cfg), QUICK);
        assert_eq!(out.status.code(), Some(1), "{len}: {out:?}");
        assert!(
            out.stderr.contains("exceeds 2^63 bytes") && !out.stderr.contains("panick"),
            "{len}: {out:?}"
        );
    }
    // The largest volume is accepted, and its size prints right.
    let dir = tempdir();
    let cfg = dir.path().join("max.toml");
    std::fs::write(&cfg, "[volume.max]\ntable = \"0 18014398509481983 zero\"\n").unwrap();
    let out = run_ok(Command::new(BIN).arg("check").arg(&cfg), QUICK);
    assert!(out.stdout.contains("18014398509481983 sectors"), "{out:?}");

    let mut d = Daemon::demo();
    for len in ["9223372036854775808", "18446744073709551615"] {
        let out = cli(&d, &["create", "big", "--table", &format!("0 {len} zero")]);
        assert!(
            !out.ok() && out.stderr.contains("exceeds 2^63 bytes"),
            "{len}: {out:?}"
        );
        let out = cli(&d, &["load", "demo", "--table", &format!("0 {len} zero")]);
        assert!(
            !out.ok() && out.stderr.contains("exceeds 2^63 bytes"),
            "{len}: {out:?}"
        );
        d.assert_alive();
    }
    assert_eq!(info(&d, "demo")["inactive_table"], false);
    works(&d);
}
