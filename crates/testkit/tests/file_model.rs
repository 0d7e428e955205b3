//! The model tests of the core, over file leaves (temporary files, buffered and O_DIRECT) and
//! over loop devices, through io_uring.

use stackbd_core::ReactorConfig;
use stackbd_testkit::model::{resolve, run, RawOp};
use stackbd_testkit::rng::Rng;
use stackbd_testkit::stackgen::{build, file_leaves, GenOpts};
use std::process::Command;
use std::sync::Arc;

fn raw_ops(seed: u64, n: usize) -> Vec<RawOp> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| RawOp {
            kind: rng.range(0, 99) as u8,
            offset: rng.next_u64() as u32,
            len: rng.range(1, 160) as u32,
            seed: rng.next_u64() as u8,
        })
        .collect()
}

fn sweep(direct: bool) {
    for depth in 1..=4 {
        for seed in 0..3u64 {
            let dir = tempfile::tempdir().unwrap();
            let mut leaves = file_leaves(dir.path(), direct);
            let s = seed * 100 + depth as u64;
            let mut stack = build(
                s,
                GenOpts {
                    depth,
                    ..GenOpts::default()
                },
                ReactorConfig::default(),
                &mut leaves,
            );
            let ops = resolve(&raw_ops(s, 120), stack.size);
            run(&mut stack, &ops).unwrap_or_else(|e| {
                panic!("{e}\ndirect={direct} seed {s} depth {depth}\n{stack:?}")
            });
            assert_eq!(stack.engine.reactor().pool().in_use(), 0);
        }
    }
}

#[test]
fn random_stacks_over_buffered_file_leaves_agree_with_the_reference() {
    sweep(false);
}

#[test]
fn random_stacks_over_direct_file_leaves_agree_with_the_reference() {
    sweep(true);
}

/// Detaches a loop device when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn random_stacks_over_loop_devices_agree_with_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut loops: Vec<Loop> = Vec::new();
    let mut n = 0;
    let mut leaf = |sectors: u64| {
        n += 1;
        let path = dir.path().join(format!("loop{n}.img"));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(sectors * 512)
            .unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&path)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        loops.push(Loop(dev.clone()));
        let opts = stackbd_leaves::file::FileOptions {
            direct: n % 2 == 0,
            queue_depth: 32,
            ..Default::default()
        };
        Arc::new(stackbd_leaves::FileLeaf::open(&dev, opts).expect("open loop device"))
            as Arc<dyn stackbd_core::Leaf>
    };
    for (seed, depth) in [(11u64, 2usize), (12, 3)] {
        let mut stack = build(
            seed,
            GenOpts {
                depth,
                max_size: 2048,
                ..GenOpts::default()
            },
            ReactorConfig::default(),
            &mut leaf,
        );
        let ops = resolve(&raw_ops(seed, 100), stack.size);
        run(&mut stack, &ops)
            .unwrap_or_else(|e| panic!("{e}\nloop devices, seed {seed}\n{stack:?}"));
    }
}
