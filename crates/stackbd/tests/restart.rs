//! `stackbd serve` stops cleanly on SIGTERM and SIGINT (exit 0, data flushed, state written)
//! and comes back from its state dir alone: the same leaves, volumes and exports, the data
//! intact.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// A file leaf (64 MiB) cut in two linear halves `zb0` and `zb1`, striped together (64 KiB
/// chunks) as `st`, a linear `data` on top; `data` exported read-write and `zb0` read-only as
/// `half`. The names sort top-first, so a restore must order volumes by dependency, not by
/// name. `img` is written as given (relative paths are relative to the config file).
fn file_config(img: &Path) -> String {
    format!(
        r#"[leaf.f0]
kind = "file"
path = {img:?}
direct = false

[volume.data]
table = "0 131072 linear st 0"
[volume.st]
table = "0 131072 striped 2 128 zb0 0 zb1 0"
[volume.zb0]
table = "0 65536 linear f0 0"
[volume.zb1]
table = "0 65536 linear f0 65536"

[export.data]
volume = "data"
read_only = false
[export.half]
volume = "zb0"
read_only = true
"#
    )
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

/// Patterns written through `data`: (pattern, offset, length), crossing stripe chunks.
const PATTERNS: &[(&str, &str, &str)] = &[
    ("0xab", "60k", "200k"),
    ("0xcd", "10M", "1M"),
    ("0x17", "32700k", "136k"),
    ("0xef", "63M", "1M"),
];

fn write_patterns(uri: &str) {
    let mut cmds: Vec<String> = PATTERNS
        .iter()
        .map(|(p, o, l)| format!("write -P {p} {o} {l}"))
        .collect();
    cmds.push("write -z 20M 1M".into());
    cmds.push("flush".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&[], uri, &cmds);
}

fn check_patterns(uri: &str) {
    let mut cmds: Vec<String> = PATTERNS
        .iter()
        .map(|(p, o, l)| format!("read -P {p} {o} {l}"))
        .collect();
    cmds.push("read -P 0 0 60k".into());
    cmds.push("read -P 0 20M 1M".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&["-r"], uri, &cmds);
}

fn names(d: &Daemon, cmd: &str, key: &str) -> Vec<String> {
    let r = d.control(&json!({"v": 1, "cmd": cmd}));
    assert_eq!(r["ok"], true, "{cmd}: {r}");
    let mut v: Vec<String> = r[key]
        .as_array()
        .unwrap_or_else(|| panic!("{cmd}: {r}"))
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn nbdinfo_list(d: &Daemon) -> serde_json::Value {
    let out = run_ok(
        tool("nbdinfo").args(["--list", "--json"]).arg(d.uri("")),
        QUICK,
    );
    serde_json::from_str(&out.stdout).expect("nbdinfo --json")
}

fn check_exports(d: &Daemon) {
    let j = nbdinfo_list(d);
    let mut seen: Vec<(String, u64, bool)> = j["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
                e["is_read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("data".to_string(), 64 * MIB, false),
            ("half".to_string(), 32 * MIB, true),
        ]
    );
}

/// SIGTERM (or SIGINT), then: exit status 0, the log says it stopped, the state file exists.
fn stop(d: &mut Daemon, sig: &str) {
    d.signal(sig);
    let s = d.wait_exit(Duration::from_secs(40));
    let log = d.log_text();
    assert!(s.success(), "SIG{sig}: exit {s}; log:\n{log}");
    assert!(log.contains("stackbd: stopped"), "SIG{sig}: log:\n{log}");
    assert!(
        !d.control.exists(),
        "the control socket was left behind after SIG{sig}"
    );
}

/// The state file names every piece of the stack.
fn check_state_file(state: &Path) {
    let text = std::fs::read_to_string(state.join("state.toml")).expect("state.toml");
    for want in [
        "[leaf.f0]",
        "kind = \"file\"",
        "[volume.data]",
        "[volume.st]",
        "[volume.zb0]",
        "[volume.zb1]",
        "[export.data]",
        "[export.half]",
        "striped 2 128 zb0 0 zb1 0",
    ] {
        assert!(text.contains(want), "state.toml lacks {want:?}:\n{text}");
    }
}

/// After a restart: the same devices, exports, tables and data.
fn check_restored(d: &Daemon) {
    let log = d.log_text();
    assert!(
        log.contains("from state"),
        "not restored from state:\n{log}"
    );
    check_exports(d);
    assert_eq!(
        names(d, "ls", "devices"),
        ["data", "f0", "st", "zb0", "zb1"]
    );
    assert_eq!(names(d, "export_ls", "exports"), ["data", "half"]);
    let t = d.control(&json!({"v": 1, "cmd": "table", "name": "st"}));
    assert_eq!(
        t["table"].as_str().map(str::trim),
        Some("0 131072 striped 2 128 zb0 0 zb1 0"),
        "{t}"
    );
    check_patterns(&d.uri("data"));
}

fn make_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    img
}

#[test]
fn sigterm_then_restart_from_state_dir() {
    let tmp = tempdir();
    let img = make_image(tmp.path());
    let cfg = tmp.path().join("stackbd.toml");
    std::fs::write(&cfg, file_config(&img)).unwrap();
    let state = tmp.path().join("state");

    // 1. From the config, with a state dir.
    let mut d = Daemon::start(Opts {
        config: Some(cfg.clone()),
        state_dir: Some(state.clone()),
        ..Opts::default()
    });
    assert!(
        state.join("state.toml").exists(),
        "no state written at start"
    );
    check_exports(&d);
    write_patterns(&d.uri("data"));
    check_patterns(&d.uri("data"));
    // A client still connected (idle, in the handshake) does not keep the daemon from
    // stopping.
    let mut conn = std::net::TcpStream::connect(d.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut greeting = [0u8; 18];
    conn.read_exact(&mut greeting).unwrap();
    conn.write_all(&3u32.to_be_bytes()).unwrap();
    stop(&mut d, "TERM");
    // The idle client was disconnected.
    let mut b = [0u8; 64];
    assert!(
        matches!(conn.read(&mut b), Ok(0) | Err(_)),
        "idle connection still open"
    );
    drop(d);
    check_state_file(&state);

    // Data reached the file: `data` byte 60 KiB is chunk 0 of the stripe, in `zb0`, at file
    // offset 60 KiB; byte 10 MiB is chunk 160 (even) -> zb0 at 5 MiB; chunk 161 -> zb1 at
    // 5 MiB, file offset 32 + 5 MiB.
    let file = std::fs::read(&img).unwrap();
    let all = |r: std::ops::Range<usize>, v: u8| file[r].iter().all(|&x| x == v);
    assert!(all(60 << 10..64 << 10, 0xab));
    assert!(all(5 << 20..(5 << 20) + (64 << 10), 0xcd));
    assert!(all(37 << 20..(37 << 20) + (64 << 10), 0xcd));

    // 2. From the state dir alone.
    let mut d = Daemon::start(Opts {
        state_dir: Some(state.clone()),
        ..Opts::default()
    });
    check_restored(&d);
    // The read-only export is read-only still, and shows `zb0`'s half of the stripe.
    qemu_io(
        &["-r"],
        &d.uri("half"),
        &["read -P 0xab 60k 4k", "read -P 0xcd 5M 64k"],
    );
    let out = run(
        tool("qemu-io")
            .args(["-f", "raw", "-c", "write -P 1 0 4k"])
            .arg(d.uri("half")),
        QUICK,
    );
    assert!(!out.ok(), "wrote to a restored read-only export: {out:?}");

    // 3. Another change, SIGINT this time, and back once more.
    qemu_io(&[], &d.uri("data"), &["write -P 0x99 40M 300k", "flush"]);
    stop(&mut d, "INT");
    drop(d);
    let mut d = Daemon::start(Opts {
        state_dir: Some(state.clone()),
        ..Opts::default()
    });
    check_restored(&d);
    qemu_io(&["-r"], &d.uri("data"), &["read -P 0x99 40M 300k"]);

    // 4. The control socket's `shutdown` stops it as cleanly as a signal.
    let r = d.control(&json!({"v": 1, "cmd": "shutdown"}));
    assert_eq!(r["ok"], true, "{r}");
    let s = d.wait_exit(Duration::from_secs(40));
    assert!(s.success(), "shutdown: exit {s}; log:\n{}", d.log_text());
    drop(d);

    // 5. A state found in the state dir wins over --config.
    let other = tmp.path().join("other.toml");
    std::fs::write(&other, striped_config("other", 16)).unwrap();
    let mut d = Daemon::start(Opts {
        config: Some(other),
        state_dir: Some(state.clone()),
        ..Opts::default()
    });
    check_restored(&d);
    stop(&mut d, "TERM");
}

#[test]
fn restart_after_relative_config_path() {
    // `--config stackbd.toml` and a relative leaf path, from the config's own folder: the
    // state must still name the file so that a restart (which reads the state from the state
    // dir, elsewhere) finds it.
    let tmp = tempdir();
    make_image(tmp.path());
    std::fs::write(
        tmp.path().join("stackbd.toml"),
        file_config(Path::new("disk.img")),
    )
    .unwrap();
    let mut d = Daemon::start(Opts {
        config: Some("stackbd.toml".into()),
        state_dir: Some("state".into()),
        cwd: Some(tmp.path().to_path_buf()),
        ..Opts::default()
    });
    write_patterns(&d.uri("data"));
    stop(&mut d, "TERM");
    drop(d);
    check_state_file(&tmp.path().join("state"));
    let mut d = Daemon::start(Opts {
        state_dir: Some("state".into()),
        cwd: Some(tmp.path().to_path_buf()),
        ..Opts::default()
    });
    check_restored(&d);
    stop(&mut d, "TERM");
    drop(d);
    // And from another working directory, with the state dir given absolute.
    let d = Daemon::start(Opts {
        state_dir: Some(tmp.path().join("state")),
        ..Opts::default()
    });
    check_restored(&d);
}

#[test]
fn sigint_stops_cleanly() {
    let mut d = Daemon::demo();
    qemu_io(&[], &d.uri("demo"), &["write -P 0x12 60k 200k", "flush"]);
    let sock = d.socket.clone().unwrap();
    stop(&mut d, "INT");
    assert!(!sock.exists(), "the NBD unix socket was left behind");
}

#[test]
fn sigterm_under_load_stops_cleanly() {
    // A fio job writing when the signal comes: the daemon drains and exits 0 (fio itself
    // sees its connection end, which is fine).
    let dir = tempdir();
    let mut d = Daemon::demo();
    let mut fio = tool("fio");
    fio.arg("--name=load")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", d.uri("demo")))
        .args([
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=32",
            "--size=256M",
            "--time_based",
            "--runtime=30",
        ]);
    let mut bg = Bg::start(&mut fio, &dir.path().join("fio.log"));
    // Let it get going.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(bg.try_exit().is_none(), "fio ended early:\n{}", bg.output());
    stop(&mut d, "TERM");
    let _ = bg.wait(QUICK);
}

#[test]
fn sigterm_with_a_client_that_stops_reading() {
    // A client with 64 MiB of reads in flight that never reads a reply: the daemon still
    // stops, in bounded time, instead of waiting for the client forever.
    let mut d = Daemon::demo();
    let mut s = std::net::TcpStream::connect(d.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let name = b"demo";
    let mut go = Vec::new();
    go.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&go).unwrap();
    // Option replies until NBD_REP_ACK.
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        assert!(typ < 0x8000_0000, "GO failed");
        if typ == 1 {
            break;
        }
    }
    for i in 0..64u64 {
        let mut r = Vec::new();
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&i.to_be_bytes());
        r.extend_from_slice(&(i * MIB).to_be_bytes());
        r.extend_from_slice(&(MIB as u32).to_be_bytes());
        s.write_all(&r).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    d.signal("TERM");
    let start = std::time::Instant::now();
    let st = d.wait_exit(Duration::from_secs(40));
    let took = start.elapsed();
    assert!(st.success(), "exit {st}; log:\n{}", d.log_text());
    assert!(
        took < Duration::from_secs(20),
        "took {took:?} to stop with a stuck client"
    );
    drop(s);
}

/// `stackbd leaf ls --json` against `d`: each leaf's name -> its `params`.
fn leaf_params(d: &Daemon) -> std::collections::BTreeMap<String, serde_json::Value> {
    let out = run_ok(
        std::process::Command::new(BIN)
            .args(["leaf", "ls", "--json", "--control"])
            .arg(&d.control),
        QUICK,
    );
    let j: serde_json::Value = serde_json::from_str(&out.stdout).expect("leaf ls --json");
    j["leaves"]
        .as_array()
        .unwrap_or_else(|| panic!("{j}"))
        .iter()
        .map(|l| (l["name"].as_str().unwrap().to_string(), l["params"].clone()))
        .collect()
}

#[test]
fn every_leaf_kind_and_parameter_survives_a_restart() {
    // Every kind with every parameter away from its default, from the config and added live
    // through the CLI; a file path ending in " direct" that is not O_DIRECT, and one that is.
    let tmp = tempdir();
    let dir = tmp.path();
    let tricky = dir.join("disk direct");
    let odirect = dir.join("odirect.img");
    let live = dir.join("live direct");
    for p in [&tricky, &odirect, &live] {
        std::fs::File::create(p).unwrap().set_len(4 * MIB).unwrap();
    }
    // A saved power-cut image that both powercut leaves boot from.
    let pcimg = dir.join("pc image");
    std::fs::write(&pcimg, vec![0x44u8; MIB as usize]).unwrap();
    let server = NbdServer::nbdkit("r", dir, &["memory", "16M"]);
    let cfg = format!(
        r#"[leaf.m]
kind = "mem"
size = "3MiB"
[leaf.n]
kind = "null"
size = 1536
[leaf.fd]
kind = "file"
path = {tricky:?}
direct = false
queue_depth = 8
[leaf.fo]
kind = "file"
path = {odirect:?}
direct = true
queue_depth = 16
[leaf.r]
kind = "nbd"
uri = {uri:?}
connections = 2
timeout = "1500ms"
[leaf.pc]
kind = "powercut"
size = "1MiB"
seed = 7
tear = true
reorder = true
cut_after = 1000
cut_random = "500..900"
image = {pcimg:?}
[volume.vfd]
table = "0 8192 linear fd 0"
[volume.vfo]
table = "0 8192 linear fo 0"
[volume.vr]
table = "0 8192 linear r 0"
[export.vfd]
volume = "vfd"
[export.vfo]
volume = "vfo"
[export.vr]
volume = "vr"
[volume.vpc]
table = "0 2048 linear pc 0"
[export.vpc]
volume = "vpc"
"#,
        uri = server.uri()
    );
    let cfg_path = dir.join("stackbd.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let state = dir.join("state");
    let mut d = Daemon::start(Opts {
        config: Some(cfg_path),
        state_dir: Some(state.clone()),
        ..Opts::default()
    });
    let cli = |d: &Daemon, args: &[&str]| {
        run_ok(
            std::process::Command::new(BIN)
                .args(args)
                .arg("--control")
                .arg(&d.control),
            QUICK,
        )
    };
    cli(
        &d,
        &[
            "leaf",
            "add",
            "fl",
            "file",
            live.to_str().unwrap(),
            "--queue-depth",
            "32",
        ],
    );
    cli(
        &d,
        &[
            "leaf",
            "add",
            "rl",
            "nbd",
            &server.uri(),
            "--connections",
            "3",
            "--timeout",
            "750ms",
        ],
    );
    cli(&d, &["leaf", "add", "nl", "null", "size=5GiB"]);
    cli(
        &d,
        &[
            "leaf",
            "add",
            "pl",
            "powercut",
            "1MiB",
            "seed=3",
            "tear=false",
            "reorder=true",
            "cut_after=12",
            "cut_random=5..9",
            &format!("image={}", pcimg.to_str().unwrap()),
        ],
    );
    let want = serde_json::json!({
        "m": {"size": "3MiB"},
        "n": {"size": 1536},
        "fd": {"path": tricky, "direct": false, "queue_depth": 8},
        "fo": {"path": odirect, "direct": true, "queue_depth": 16},
        "r": {"uri": server.uri(), "connections": 2, "timeout": "1500ms"},
        "fl": {"path": live, "direct": false, "queue_depth": 32},
        "rl": {"uri": server.uri(), "connections": 3, "timeout": "750ms"},
        "nl": {"size": "5GiB"},
        "pc": {"size": "1MiB", "seed": 7, "tear": true, "reorder": true, "cut_after": 1000,
               "cut_random": "500..900", "image": pcimg},
        "pl": {"size": "1MiB", "seed": 3, "tear": false, "reorder": true, "cut_after": 12,
               "cut_random": "5..9", "image": pcimg},
    });
    let before = leaf_params(&d);
    assert_eq!(serde_json::to_value(&before).unwrap(), want);
    for (export, pattern) in [("vfd", "0x11"), ("vfo", "0x22"), ("vr", "0x33")] {
        qemu_io(
            &[],
            &d.uri(export),
            &[&format!("write -P {pattern} 1M 1M"), "flush"],
        );
    }
    stop(&mut d, "TERM");
    drop(d);
    let text = std::fs::read_to_string(state.join("state.toml")).unwrap();
    for line in [
        "queue_depth = 8\n",
        "direct = true\nqueue_depth = 16\n",
        "connections = 2\ntimeout = \"1500ms\"\n",
        "connections = 3\ntimeout = \"750ms\"\n",
        "size = 1536\n",
        "seed = 7\ntear = true\nreorder = true\ncut_after = 1000\ncut_random = \"500..900\"\n",
        "seed = 3\ntear = false\nreorder = true\ncut_after = 12\ncut_random = \"5..9\"\n",
    ] {
        assert!(text.contains(line), "state.toml lacks {line:?}:\n{text}");
    }

    // Twice from the state alone: the same parameters each time, the data intact.
    for _ in 0..2 {
        let mut d = Daemon::start(Opts {
            state_dir: Some(state.clone()),
            ..Opts::default()
        });
        assert_eq!(leaf_params(&d), before, "state.toml:\n{text}");
        for (export, pattern) in [("vfd", "0x11"), ("vfo", "0x22"), ("vr", "0x33")] {
            qemu_io(
                &["-r"],
                &d.uri(export),
                &[&format!("read -P {pattern} 1M 1M")],
            );
        }
        // The powercut leaf booted from its image again.
        qemu_io(&["-r"], &d.uri("vpc"), &["read -P 0x44 0 1M"]);
        stop(&mut d, "TERM");
    }
}

#[test]
fn unknown_leaf_kind_in_the_state_file_is_refused() {
    let tmp = tempdir();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("state.toml"),
        "[leaf.t]\nkind = \"tape\"\nsize = 4096\n",
    )
    .unwrap();
    let out = run(
        std::process::Command::new(BIN)
            .args(["serve", "--listen", "none", "--state-dir"])
            .arg(&state)
            .arg("--control")
            .arg(tmp.path().join("c.sock")),
        QUICK,
    );
    assert!(!out.ok(), "served a state with an unknown kind");
    assert!(
        out.stderr.contains(
            "state.toml:2: [leaf.t]: unknown kind 'tape' (known: mem, null, file, nbd, powercut)"
        ),
        "{out:?}"
    );
}
