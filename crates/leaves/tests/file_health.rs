//! A file leaf's health: it notices a backing file deleted (unlinked while open) or truncated
//! below the leaf's size, says `failed` with why, and `ok` again (keeping the last error) once
//! a truncated file is long enough again; I/O errors (a full filesystem) make it `degraded`.

use stackbd_core::{DevId, Engine, HealthState, Leaf, ReactorConfig, Status};
use stackbd_leaves::file::{FileLeaf, FileOptions};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const MIB: u64 = 1 << 20;

fn engine_over(leaf: &FileLeaf) -> (Engine, DevId) {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    let n = leaf.size();
    e.add_leaf("f0", Arc::new(leaf.clone())).unwrap();
    let v = e.create("v", Some(&format!("0 {n} linear f0 0"))).unwrap();
    (e, v)
}

fn leaf_on(path: &std::path::Path, bytes: u64) -> FileLeaf {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
    FileLeaf::open(path, FileOptions::default()).unwrap()
}

#[test]
fn a_deleted_backing_file_is_failed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let leaf = leaf_on(&path, 8 * MIB);
    let (mut e, v) = engine_over(&leaf);
    assert_eq!(e.write_at(v, 0, &[7u8; 4096]), Status::Ok);
    let h = leaf.health();
    assert_eq!(h.state, HealthState::Ok, "{h:?}");
    assert_eq!(h.last_error, None);

    let before = SystemTime::now() - Duration::from_millis(1);
    std::fs::remove_file(&path).unwrap();
    let h = leaf.health();
    eprintln!("{h:?}");
    assert_eq!(h.state, HealthState::Failed, "{h:?}");
    assert_eq!(h.error(), Some("backing file deleted"));
    assert!(h.since.unwrap() >= before);
    // The same problem keeps the time it was first seen.
    std::thread::sleep(Duration::from_millis(20));
    let again = leaf.health();
    assert_eq!(again, h);
    // The open file still takes I/O; the leaf stays failed (the data has nowhere to live).
    assert_eq!(e.write_at(v, 8, &[8u8; 4096]), Status::Ok);
    assert_eq!(leaf.health().state, HealthState::Failed);
}

#[test]
fn a_truncated_backing_file_is_failed_until_it_is_long_enough() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let leaf = leaf_on(&path, 8 * MIB);
    let (mut e, v) = engine_over(&leaf);
    assert_eq!(e.write_at(v, 0, &[7u8; 4096]), Status::Ok);

    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(MIB).unwrap();
    let h = leaf.health();
    eprintln!("{h:?}");
    assert_eq!(h.state, HealthState::Failed, "{h:?}");
    assert_eq!(
        h.error(),
        Some(
            format!(
                "backing file truncated to {MIB} bytes (leaf is {})",
                8 * MIB
            )
            .as_str()
        )
    );
    // One byte short is still truncated.
    f.set_len(8 * MIB - 1).unwrap();
    assert_eq!(leaf.health().state, HealthState::Failed);
    f.set_len(8 * MIB).unwrap();
    let h = leaf.health();
    assert_eq!(h.state, HealthState::Ok, "{h:?}");
    assert!(h.error().unwrap().contains("truncated"), "{h:?}");
}

/// Unmounts a tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        // A ring's file references go away asynchronously after the ring is closed.
        for _ in 0..50 {
            let quiet = Command::new("umount")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
            if quiet.is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A sparse file on a 1 MiB tmpfs: writes past what fits fail with ENOSPC, and the leaf says
/// `degraded` with the error. (Needs root for the mount, as the file leaf tests do.)
#[test]
fn io_errors_make_it_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "stackbd-health"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot mount a small tmpfs (run the tests as root)");
    let _m = Mount(dir.path().to_path_buf());
    let leaf = leaf_on(&dir.path().join("sparse"), 8 * MIB);
    let (mut e, v) = engine_over(&leaf);
    assert_eq!(e.write_at(v, 0, &[1u8; 4096]), Status::Ok);
    assert_eq!(leaf.health().state, HealthState::Ok);
    let big = vec![3u8; 4 << 20];
    assert_eq!(e.write_at(v, 0, &big), Status::NoSpace);
    let h = leaf.health();
    eprintln!("{h:?}");
    assert_eq!(h.state, HealthState::Degraded, "{h:?}");
    assert!(h.error().unwrap().contains("No space left"), "{h:?}");
    drop((e, leaf));
}
