//! Degraded start: a state file whose leaf cannot be opened (its backing file was deleted)
//! still starts; everything else serves; the failed leaf, the volumes over it and their
//! exports are kept (state file), shown with why (`leaf ls`, `ls`, `info`), and come up when
//! the leaf is retried. And `serve --config` beside a state file says which one wins.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;

fn config(img0: &Path, img1: &Path) -> String {
    format!(
        r#"[leaf.f0]
kind = "file"
path = {img0:?}

[leaf.f1]
kind = "file"
path = {img1:?}

[volume.top]
table = "0 8192 linear a 0"
[volume.a]
table = "0 8192 linear f0 0"
[volume.b]
table = "0 8192 linear f1 0"

[export.top]
volume = "top"
[export.b]
volume = "b"
"#
    )
}

fn sparse(p: &Path, bytes: u64) {
    std::fs::File::create(p).unwrap().set_len(bytes).unwrap();
}

fn cli(d: &Daemon, args: &[&str]) -> Out {
    let mut c = Command::new(BIN);
    c.args(args).arg("--control").arg(&d.control);
    run(&mut c, QUICK)
}

fn nbd_rw(uri: &str, write: Option<&[u8]>, len: usize, dir: &Path) -> Vec<u8> {
    let back = dir.join("back.bin");
    let mut script = format!("h.connect_uri({uri:?})\n");
    if let Some(data) = write {
        let src = dir.join("src.bin");
        std::fs::write(&src, data).unwrap();
        script += &format!(
            "h.pwrite(open({:?}, 'rb').read(), 0)\nh.flush()\n",
            src.to_str().unwrap()
        );
    }
    script += &format!(
        "open({:?}, 'wb').write(h.pread({len}, 0))\n",
        back.to_str().unwrap()
    );
    nbdsh_run(&script, QUICK);
    std::fs::read(back).unwrap()
}

#[test]
fn a_state_with_a_deleted_leaf_file_starts_serves_the_rest_and_recovers_on_retry() {
    let dir = tempdir();
    let (img0, img1) = (dir.path().join("zero.img"), dir.path().join("one.img"));
    sparse(&img0, 4 * MIB);
    sparse(&img1, 4 * MIB);
    let cfg = dir.path().join("init.toml");
    std::fs::write(&cfg, config(&img0, &img1)).unwrap();
    let state = dir.path().join("state");
    let first = Opts {
        config: Some(cfg.clone()),
        state_dir: Some(state.clone()),
        ..Opts::default()
    };
    let mut d = Daemon::start(first.clone());
    let data_b = random_bytes(64 * 1024, 1);
    let data_top = random_bytes(64 * 1024, 2);
    nbd_rw(&d.uri("b"), Some(&data_b), data_b.len(), dir.path());
    nbd_rw(&d.uri("top"), Some(&data_top), data_top.len(), dir.path());
    d.signal("TERM");
    assert!(d.wait_exit(SLOW).success());

    // The file under f0 is gone (moved away, to be put back later).
    let aside = dir.path().join("zero.aside");
    std::fs::rename(&img0, &aside).unwrap();
    let d = Daemon::start(first.clone());
    let log = d.log_text();
    assert!(
        log.contains("starting degraded") && log.contains("[leaf.f0]"),
        "no clear report of the failed leaf:\n{log}"
    );
    assert!(
        log.contains("is not read: the state file"),
        "--config beside a state file: which one wins is not said:\n{log}"
    );
    // The rest serves.
    let got = nbd_rw(&d.uri("b"), None, data_b.len(), dir.path());
    assert_same("volume b while f0 has failed", &got, &data_b);
    // The failure is shown, with why.
    let ls = cli(&d, &["leaf", "ls"]);
    assert!(ls.ok(), "{ls:?}");
    let f0 = ls
        .stdout
        .lines()
        .find(|l| l.starts_with("f0:"))
        .unwrap_or_else(|| panic!("no reason for f0 in leaf ls:\n{}", ls.stdout));
    assert!(
        f0.contains("failed") && f0.contains("zero.img"),
        "leaf ls does not say why f0 failed: {f0}"
    );
    let j = d.control(&json!({"v": 1, "cmd": "leaf_ls"}));
    let failed: Vec<_> = j["leaves"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["state"] == "failed")
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed, ["f0"], "{j}");
    let ls = cli(&d, &["ls"]);
    for v in ["a", "top"] {
        assert!(
            ls.stdout
                .lines()
                .any(|l| l.starts_with(&format!("{v}\t")) && l.contains("failed")),
            "ls does not show {v} as failed:\n{}",
            ls.stdout
        );
    }
    let info = cli(&d, &["info", "top"]);
    assert!(
        !info.ok() && info.stderr.contains("failed at start"),
        "{info:?}"
    );
    // Nothing is lost from the state file while degraded.
    let saved = std::fs::read_to_string(state.join("state.toml")).unwrap();
    for s in ["[leaf.f0]", "[volume.a]", "[volume.top]", "[export.top]"] {
        assert!(saved.contains(s), "{s} dropped from the state:\n{saved}");
    }
    // A retry while the file is still missing says so, and changes nothing.
    let r = cli(&d, &["leaf", "retry", "f0"]);
    assert!(r.ok(), "{r:?}");
    let j = d.control(&json!({"v": 1, "cmd": "leaf_retry", "name": "f0"}));
    assert_eq!(j["brought_up"], json!([]), "{j}");
    // The file is back: retry brings up the leaf, the volumes over it and the export.
    std::fs::rename(&aside, &img0).unwrap();
    let j = d.control(&json!({"v": 1, "cmd": "leaf_retry", "name": "f0"}));
    assert_eq!(j["ok"], true, "{j}");
    let up: Vec<&str> = j["brought_up"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    for n in ["f0", "a", "top"] {
        assert!(up.contains(&n), "{n} not brought up: {j}");
    }
    let got = nbd_rw(&d.uri("top"), None, data_top.len(), dir.path());
    assert_same("volume top after the retry", &got, &data_top);
    let j = d.control(&json!({"v": 1, "cmd": "leaf_ls"}));
    assert!(
        !j.to_string().contains("\"failed\""),
        "still failed after the retry: {j}"
    );
}
