//! The power-cut leaf through the daemon: declared in a config, written over NBD by qemu-io,
//! cut and saved with `stackbd leaf message`, and rebooted from the saved image by a new
//! `serve`; and its bad parameters refused, in the config and live, with clear errors.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A powercut leaf `p0` (declared by `leaf`, the lines after `[leaf.p0]`), a linear volume `v`
/// over its first 4 MiB exported as `v`, and a mem leaf `m` (which takes no messages).
fn config(leaf: &str) -> String {
    format!(
        "[leaf.p0]\nkind = \"powercut\"\n{leaf}\n[leaf.m]\nkind = \"mem\"\nsize = \"1MiB\"\n\
         [volume.v]\ntable = \"0 8192 linear p0 0\"\n[export.v]\nvolume = \"v\"\n"
    )
}

/// `stackbd ARGS... --control SOCK` (options first, so they are not taken as message words).
fn cli(d: &Daemon, args: &[&str]) -> Out {
    let mut c = Command::new(BIN);
    c.args(&args[..2]).arg("--control").arg(&d.control);
    c.args(&args[2..]);
    run(&mut c, QUICK)
}

fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = cli(d, args);
    if !out.ok() {
        out.fail("stackbd failed");
    }
    out.stdout
}

fn cli_err(d: &Daemon, args: &[&str], want: &str) {
    let out = cli(d, args);
    assert!(!out.ok(), "accepted: {out:?}");
    assert!(out.stderr.contains(want), "wanted {want:?}: {out:?}");
}

/// qemu-io `-c` commands against `uri`; all must succeed.
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

#[test]
fn cut_save_and_reboot_through_the_cli() {
    let tmp = tempdir();
    let dir = tmp.path();
    let (img, early) = (dir.join("cut.img"), dir.join("early.img"));
    let (img_s, early_s) = (img.to_str().unwrap(), early.to_str().unwrap());
    let (mut d, _cfg) = Daemon::with_config(&config("size = \"8MiB\"\nseed = 5"));
    let uri = d.uri("v");

    // A, flushed; then B over A's second half and past it, never flushed. qemu-io flushes
    // when it closes whatever its cache mode, so B goes with nbdcopy, which flushes only
    // with --flush: one 96 KiB write, its first 32 KiB the same as A's.
    qemu_io(&[], &uri, &["write -P 0xaa 0 64k", "flush"]);
    let b = dir.join("b.raw");
    let mut data = vec![0xaa; 32 << 10];
    data.resize(96 << 10, 0xbb);
    std::fs::write(&b, data).unwrap();
    run_ok(tool("nbdcopy").arg(&b).arg(&uri), QUICK);
    qemu_io(
        &["-r"],
        &uri,
        &["read -P 0xaa 0 32k", "read -P 0xbb 32k 64k"],
    );
    let stats = cli_ok(&d, &["leaf", "message", "p0", "stats"]);
    // (qemu-io's default cache mode writes A with FUA and flushes again when it closes.)
    assert!(stats.starts_with("power=on writes=2 "), "{stats}");

    // Saved before the cut: the durable image (A only), and the reply says so.
    let r = cli_ok(&d, &["leaf", "message", "p0", "save", early_s]);
    assert_eq!(
        r,
        format!(
            "saved the durable image (the power is still on: flushed and FUA writes only): \
             8388608 bytes to {early_s}\n"
        )
    );

    // The cut: B was the one unflushed write; with neither tear nor reorder it is lost.
    let r = cli_ok(&d, &["leaf", "message", "p0", "cut"]);
    assert_eq!(r, "cut: 1 unflushed writes, 0 persisted, 1 lost, 0 torn\n");
    cli_err(&d, &["leaf", "message", "p0", "cut"], "already off");
    // The machine is off: reads fail.
    let out = run(
        tool("qemu-io")
            .args(["-f", "raw", "-r", "-c", "read 0 4k"])
            .arg(&uri),
        QUICK,
    );
    assert!(
        !out.ok() || out.stdout.contains("failed"),
        "read after the cut: {out:?}"
    );
    let stats = cli_ok(&d, &["leaf", "message", "p0", "stats"]);
    assert!(stats.starts_with("power=off "), "{stats}");
    assert!(
        stats.contains(" cut_at_write=2 unflushed_at_cut=1 "),
        "{stats}"
    );

    let out = cli_ok(&d, &["leaf", "message", "--json", "p0", "save", img_s]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(
        j["reply"],
        format!("saved the image that survived the cut: 8388608 bytes to {img_s}")
    );

    // Wrong messages and wrong leaves: clear errors, the daemon unharmed.
    cli_err(
        &d,
        &["leaf", "message", "p0", "bogus"],
        "stackbd leaf message: leaf 'p0': unknown message 'bogus' (powercut leaves take: \
         cut, save PATH, stats)",
    );
    cli_err(
        &d,
        &["leaf", "message", "p0", "save", "rel.img"],
        "save: 'rel.img' is relative",
    );
    cli_err(
        &d,
        &["leaf", "message", "m", "cut"],
        "leaf 'm': mem leaf does not accept messages",
    );
    cli_err(
        &d,
        &["leaf", "message", "v", "cut"],
        "is a volume, not a leaf",
    );
    cli_err(&d, &["leaf", "message", "nope", "cut"], "nope");
    let r = d.control(&json!({"v": 1, "cmd": "leaf_message", "name": "p0", "argv": []}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("'argv'"), "{r}");

    // SIGTERM: the cut leaf cannot be flushed, and the daemon says so.
    d.signal("TERM");
    let s = d.wait_exit(Duration::from_secs(40));
    let log = d.log_text();
    assert_eq!(s.code(), Some(1), "exit {s}: {log}");
    assert!(
        log.contains("flushing leaf p0: powercut: the power is off"),
        "{log}"
    );
    drop(d);

    // The two images: A in both, B in neither.
    for p in [&img, &early] {
        let b = std::fs::read(p).unwrap();
        assert_eq!(b.len(), 8 << 20);
        assert!(b[..64 << 10].iter().all(|&x| x == 0xaa), "{}", p.display());
        assert!(b[64 << 10..].iter().all(|&x| x == 0), "{}", p.display());
    }

    // The reboot: a new daemon whose p0 boots from the saved image.
    let cfg = config(&format!("image = {img_s:?}"));
    let (d, _cfg) = Daemon::with_config(&cfg);
    qemu_io(
        &["-r"],
        &d.uri("v"),
        &["read -P 0xaa 0 64k", "read -P 0 64k 64k"],
    );
    let ls = cli_ok(&d, &["leaf", "ls", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let p0 = &j["leaves"][1];
    assert_eq!(p0["name"], "p0", "{j}");
    assert_eq!(
        p0["params"],
        json!({"seed": 0, "tear": false, "reorder": false, "image": img_s})
    );
    assert_eq!(p0["sectors"], 16384);
}

/// Runs `stackbd check` on `cfg` (written in `dir`); returns its stderr, which must be a
/// refusal.
fn check_refused(dir: &Path, cfg: &str) -> String {
    let path = dir.join("bad.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = run(Command::new(BIN).arg("check").arg(&path), QUICK);
    assert!(!out.ok(), "accepted:\n{cfg}\n{out:?}");
    out.stderr
}

#[test]
fn bad_powercut_parameters_are_clear_errors() {
    let tmp = tempdir();
    let dir = tmp.path();
    let img = dir.join("small.img");
    std::fs::write(&img, vec![0u8; 64 << 10]).unwrap();
    let missing = dir.join("nope.img");
    let (img_s, missing_s) = (img.to_str().unwrap(), missing.to_str().unwrap());

    // In a config.
    let e = check_refused(dir, &config("size = \"1MiB\"\ncolour = \"red\""));
    assert!(
        e.contains(
            "[leaf.p0]: unknown key 'colour' (powercut leaves take: kind, size, seed, tear, \
             reorder, cut_after, cut_random, image)"
        ),
        "{e}"
    );
    let e = check_refused(dir, &config("size = \"1MiB\"\ncut_random = \"9..5\""));
    assert!(
        e.contains(":4: [leaf.p0]: cut_random: '9..5': LO (9) is more than HI (5)"),
        "{e}"
    );
    let e = check_refused(dir, &config(&format!("image = {missing_s:?}")));
    assert!(
        e.contains(&format!(
            "[leaf.p0]: cannot create powercut leaf: image {missing_s}: No such file or directory"
        )),
        "{e}"
    );
    let e = check_refused(dir, &config(&format!("size = \"1MiB\"\nimage = {img_s:?}")));
    assert!(
        e.contains(&format!(
            "[leaf.p0]: cannot create powercut leaf: image {img_s}: the image is 64KiB (65536 \
             bytes) but size says 1MiB (1048576 bytes)"
        )),
        "{e}"
    );
    let e = check_refused(dir, &config("seed = 3"));
    assert!(
        e.contains("[leaf.p0]: size: missing: a powercut leaf needs a size, or an image"),
        "{e}"
    );

    // Live, through the CLI and the control socket.
    let (d, _cfg) = Daemon::with_config(&config("size = \"8MiB\""));
    cli_err(
        &d,
        &["leaf", "add", "q", "powercut", "1MiB", "cut_random=9..5"],
        "leaf 'q': cut_random: '9..5': LO (9) is more than HI (5)",
    );
    cli_err(
        &d,
        &[
            "leaf",
            "add",
            "q",
            "powercut",
            &format!("image={missing_s}"),
        ],
        &format!("image {missing_s}: No such file or directory"),
    );
    cli_err(
        &d,
        &[
            "leaf",
            "add",
            "q",
            "powercut",
            "1MiB",
            &format!("image={img_s}"),
        ],
        "the image is 64KiB (65536 bytes) but size says 1MiB (1048576 bytes)",
    );
    let r = d.control(
        &json!({"v": 1, "cmd": "leaf_add", "name": "q", "kind": "powercut",
        "size": "1MiB", "colour": "red"}),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("field 'colour' does not apply (powercut leaves take:"),
        "{r}"
    );
    // None of it added a leaf; a good one is added, and boots from the image.
    let out = cli_ok(
        &d,
        &["leaf", "add", "q", "powercut", &format!("image={img_s}")],
    );
    assert!(out.is_empty(), "{out}");
    let ls = cli_ok(&d, &["leaf", "ls"]);
    assert!(ls.contains("q     powercut  ok     128"), "{ls}");
}
