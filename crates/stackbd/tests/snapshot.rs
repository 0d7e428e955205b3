//! `stackbd snapshot create|rm|merge` end to end: the real daemon and real NBD clients. A
//! snapshot reads as its origin did when it was taken (plus its own writes), `rm` gives the
//! origin its table back, and a merge leaves the origin equal to the snapshot's view (the
//! reload of exceptions from the COW after a restart is tested in the targets crate).

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;

fn config(cow: &Path) -> String {
    format!(
        r#"[leaf.m0]
kind = "mem"
size = "16MiB"

[leaf.c0]
kind = "file"
path = {cow:?}

[volume.data]
table = "0 32768 linear m0 0"

[export.data]
volume = "data"
"#
    )
}

fn cli(d: &Daemon, args: &[&str]) -> Out {
    let mut c = Command::new(BIN);
    c.args(args).arg("--control").arg(&d.control);
    run_ok(&mut c, QUICK)
}

fn write(uri: &str, off: u64, data: &[u8], dir: &Path) {
    let src = dir.join("w.bin");
    std::fs::write(&src, data).unwrap();
    nbdsh_run(
        &format!(
            "h.connect_uri({uri:?})\nh.pwrite(open({:?}, 'rb').read(), {off})\nh.flush()\n",
            src.to_str().unwrap()
        ),
        QUICK,
    );
}

fn read(uri: &str, off: u64, len: usize, dir: &Path) -> Vec<u8> {
    let dst = dir.join("r.bin");
    nbdsh_run(
        &format!(
            "h.connect_uri({uri:?})\nopen({:?}, 'wb').write(h.pread({len}, {off}))\n",
            dst.to_str().unwrap()
        ),
        QUICK,
    );
    std::fs::read(dst).unwrap()
}

#[test]
fn snapshot_create_rm_and_merge_through_the_daemon() {
    let dir = tempdir();
    let cow = dir.path().join("cow.img");
    std::fs::File::create(&cow)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let cfg = dir.path().join("init.toml");
    std::fs::write(&cfg, config(&cow)).unwrap();
    let d = Daemon::start(Opts {
        config: Some(cfg),
        ..Opts::default()
    });
    let (a, b, c) = (
        random_bytes(96 * 1024, 1),
        random_bytes(96 * 1024, 2),
        random_bytes(32 * 1024, 3),
    );
    let off = 40 * 1024; // not chunk-aligned: partial chunks on both ends
    write(&d.uri("data"), off, &a, dir.path());
    cli(&d, &["snapshot", "create", "data", "snap1", "--cow", "c0"]);
    cli(&d, &["export", "add", "snap1"]);
    let t = cli(&d, &["table", "data"]).stdout;
    assert!(t.contains("snapshot-origin data-real"), "{t}");
    // The origin moves on; the snapshot keeps what it had.
    write(&d.uri("data"), off, &b, dir.path());
    assert_same(
        "origin",
        &read(&d.uri("data"), off, b.len(), dir.path()),
        &b,
    );
    assert_same(
        "snapshot after origin writes",
        &read(&d.uri("snap1"), off, a.len(), dir.path()),
        &a,
    );
    // The snapshot takes writes of its own; the origin does not see them.
    write(&d.uri("snap1"), off + 8192, &c, dir.path());
    let mut want = a.clone();
    want[8192..8192 + c.len()].copy_from_slice(&c);
    assert_same(
        "snapshot after its own write",
        &read(&d.uri("snap1"), off, want.len(), dir.path()),
        &want,
    );
    assert_same(
        "origin after a snapshot write",
        &read(&d.uri("data"), off, b.len(), dir.path()),
        &b,
    );
    let st = cli(&d, &["status", "snap1"]).stdout;
    assert!(st.contains("snapshot") && st.contains('/'), "{st}");

    // rm: the origin gets its own table back.
    cli(&d, &["export", "rm", "snap1"]);
    cli(&d, &["snapshot", "rm", "snap1"]);
    let t = cli(&d, &["table", "data"]).stdout;
    assert!(t.contains("linear m0 0"), "origin table after rm: {t}");
    let ls = cli(&d, &["ls"]).stdout;
    assert!(!ls.contains("data-real") && !ls.contains("snap1"), "{ls}");
    assert_same(
        "origin after rm",
        &read(&d.uri("data"), off, b.len(), dir.path()),
        &b,
    );

    // merge: the origin becomes what the snapshot shows.
    std::fs::File::create(&cow)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    cli(&d, &["snapshot", "create", "data", "snap2", "--cow", "c0"]);
    cli(&d, &["export", "add", "snap2"]);
    write(&d.uri("snap2"), off, &c, dir.path());
    let mut view = b.clone();
    view[..c.len()].copy_from_slice(&c);
    write(&d.uri("data"), off + b.len() as u64, &a[..8192], dir.path());
    cli(&d, &["export", "rm", "snap2"]);
    cli(&d, &["snapshot", "merge", "snap2", "--timeout", "60"]);
    assert_same(
        "origin after the merge",
        &read(&d.uri("data"), off, view.len(), dir.path()),
        &view,
    );
    // Written to the origin after the snapshot was taken: the merge puts back what the snapshot
    // saw there (zeros).
    assert_same(
        "origin write after the snapshot, merged away",
        &read(&d.uri("data"), off + b.len() as u64, 8192, dir.path()),
        &[0u8; 8192],
    );
    let t = cli(&d, &["table", "data"]).stdout;
    assert!(t.contains("linear m0 0"), "origin table after merge: {t}");
    let r = d.control(&json!({"v": 1, "cmd": "ls"}));
    assert!(!r.to_string().contains("snap2"), "{r}");
}
