//! `stackbd bench`: the real binary on temporary configs, with short runs.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_stackbd");

/// 64 MiB leaf: two linear halves, striped over them in 8-sector chunks, and a top linear that
/// maps the striped volume at sector 4, so every 4 KiB I/O crosses a chunk and splits in two.
/// `linear -> striped -> linear -> leaf`.
fn split_stack(leaf: &str) -> String {
    format!(
        "{leaf}
[volume.lo0]
table = \"0 65536 linear l0 0\"
[volume.lo1]
table = \"0 65536 linear l0 65536\"
[volume.st]
table = \"0 131072 striped 2 8 lo0 0 lo1 0\"
[volume.top]
table = \"0 131064 linear st 4\"
"
    )
}

fn mem_leaf() -> String {
    "[leaf.l0]\nkind = \"mem\"\nsize = \"64MiB\"\n".to_string()
}

fn null_leaf() -> String {
    "[leaf.l0]\nkind = \"null\"\nsize = \"64MiB\"\n".to_string()
}

/// A file leaf over a 64 MiB file in `dir`.
fn file_leaf(dir: &Path, direct: bool) -> String {
    let path = dir.join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(64 << 20).unwrap();
    format!(
        "[leaf.l0]\nkind = \"file\"\npath = \"{}\"\ndirect = {direct}\n",
        path.display()
    )
}

struct Run {
    out: Output,
    _dir: tempfile::TempDir,
}

impl Run {
    fn code(&self) -> i32 {
        self.out.status.code().expect("exited")
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    /// Asserts success and parses stdout as one JSON object.
    fn json(&self) -> Value {
        assert_eq!(
            self.code(),
            0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        let out = self.stdout();
        assert_eq!(out.lines().count(), 1, "one JSON line: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }
}

/// Runs `stackbd bench --config <config> [--volume top] ARGS`; `make` writes the config text, given the
/// temporary folder (file leaves put their file there).
fn bench(make: impl FnOnce(&Path) -> String, args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let config = make(dir.path());
    let path: PathBuf = dir.path().join("stack.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("bench").arg("--config").arg(&path);
    if !args.contains(&"--volume") {
        cmd.args(["--volume", "top"]);
    }
    let out = cmd.args(args).output().unwrap();
    Run { out, _dir: dir }
}

fn f64_of(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("no number '{k}' in {v}"))
}

fn u64_of(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no integer '{k}' in {v}"))
}

/// What every clean run over the split stack must show.
fn assert_clean_split_run(v: &Value, ios: u64) {
    for k in [
        "iops",
        "mib_s",
        "lat_us_p50",
        "lat_us_p99",
        "lat_us_p999",
        "allocs_per_io",
        "frame_overflows",
        "splits",
        "errors",
        "ios",
        "seconds",
        "threads",
        "qd",
        "bs",
        "rw",
        "mode",
    ] {
        assert!(v.get(k).is_some(), "no '{k}' in {v}");
    }
    assert_eq!(u64_of(v, "ios"), ios, "{v}");
    assert_eq!(
        f64_of(v, "allocs_per_io"),
        0.0,
        "allocations in steady state: {v}"
    );
    assert_eq!(u64_of(v, "frame_overflows"), 0, "{v}");
    assert!(u64_of(v, "splits") > 0, "the stack splits every I/O: {v}");
    assert_eq!(u64_of(v, "errors"), 0, "{v}");
    assert!(f64_of(v, "iops") > 0.0, "{v}");
    assert!(f64_of(v, "mib_s") > 0.0, "{v}");
    assert!(f64_of(v, "seconds") > 0.0, "{v}");
    let (p50, p99, p999) = (
        f64_of(v, "lat_us_p50"),
        f64_of(v, "lat_us_p99"),
        f64_of(v, "lat_us_p999"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{v}");
}

const SHORT: &[&str] = &["--json", "--ios", "4000", "--qd", "16"];

#[test]
fn split_stack_over_mem_allocates_nothing_per_io() {
    let r = bench(
        |_| split_stack(&mem_leaf()),
        &[SHORT, &["--mode", "poll"]].concat(),
    );
    let v = r.json();
    assert_clean_split_run(&v, 4000);
    // Every 4 KiB I/O is cut once, at the striped volume; splits count at submission and the
    // window closes on completions, so they may differ by up to the queue depth.
    let splits = u64_of(&v, "splits");
    assert!((4000 - 16..=4000 + 16).contains(&splits), "{v}");
    assert_eq!(v["rw"], "randread");
    assert_eq!(u64_of(&v, "bs"), 4096);
    assert_eq!(u64_of(&v, "qd"), 16);
    assert_eq!(u64_of(&v, "threads"), 1);
    assert_eq!(v["mode"], "poll");
}

#[test]
fn split_stack_over_null_allocates_nothing_per_io_reads_and_writes() {
    let r = bench(
        |_| split_stack(&null_leaf()),
        &[SHORT, &["--rw", "randrw", "--rwmix", "70"]].concat(),
    );
    let v = r.json();
    assert_clean_split_run(&v, 4000);
    let (reads, writes) = (u64_of(&v, "reads"), u64_of(&v, "writes"));
    assert_eq!(reads + writes, 4000, "{v}");
    assert!(reads > writes && writes > 0, "70% reads: {v}");
}

#[test]
fn split_stack_over_a_file_allocates_nothing_per_io() {
    let r = bench(
        |d| split_stack(&file_leaf(d, false)),
        &[SHORT, &["--rw", "randwrite"]].concat(),
    );
    let v = r.json();
    assert_clean_split_run(&v, 4000);
    assert_eq!(u64_of(&v, "writes"), 4000, "{v}");
}

#[test]
fn split_stack_over_a_direct_file_allocates_nothing_per_io() {
    let r = bench(|d| split_stack(&file_leaf(d, true)), SHORT);
    if r.code() != 0 && r.stderr().contains("cannot create file leaf") {
        // The temporary folder's filesystem refuses O_DIRECT (tmpfs): nothing to measure.
        eprintln!("skipped: {}", r.stderr());
        return;
    }
    assert_clean_split_run(&r.json(), 4000);
}

#[test]
fn every_completion_mode_runs_over_a_file() {
    for mode in ["interrupt", "poll", "hybrid"] {
        let r = bench(
            |d| split_stack(&file_leaf(d, false)),
            &["--json", "--ios", "2000", "--qd", "4", "--mode", mode],
        );
        let v = r.json();
        assert_clean_split_run(&v, 2000);
        assert_eq!(v["mode"], mode, "{v}");
    }
}

#[test]
fn qd1_in_interrupt_mode_sleeps_and_wakes_for_every_io() {
    let r = bench(
        |d| split_stack(&file_leaf(d, false)),
        &["--json", "--ios", "500", "--qd", "1", "--mode", "interrupt"],
    );
    assert_clean_split_run(&r.json(), 500);
}

#[test]
fn timed_run_on_two_threads_with_sequential_patterns() {
    for rw in ["read", "write"] {
        let r = bench(
            |_| split_stack(&mem_leaf()),
            &[
                "--json",
                "--time",
                "300ms",
                "--threads",
                "2",
                "--qd",
                "8",
                "--rw",
                rw,
                "--bs",
                "8k",
            ],
        );
        let v = r.json();
        assert_eq!(u64_of(&v, "threads"), 2, "{v}");
        assert_eq!(
            v["per_thread_iops"].as_array().map(Vec::len),
            Some(2),
            "{v}"
        );
        assert_eq!(u64_of(&v, "bs"), 8192, "{v}");
        assert_eq!(v["rw"], rw);
        let secs = f64_of(&v, "seconds");
        assert!((0.25..2.0).contains(&secs), "measured about 300 ms: {v}");
        assert!(u64_of(&v, "ios") > 0, "{v}");
        assert_eq!(f64_of(&v, "allocs_per_io"), 0.0, "{v}");
        assert_eq!(u64_of(&v, "errors"), 0, "{v}");
        assert!(u64_of(&v, "splits") > 0, "{v}");
    }
}

#[test]
fn text_output_names_every_figure() {
    let r = bench(|_| split_stack(&null_leaf()), &["--ios", "2000"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let out = r.stdout();
    for needle in [
        "volume top, randread bs=4096 qd=32 threads=1 mode=interrupt",
        "iops",
        "MiB/s",
        "p50",
        "p99.9",
        "allocs/io  0 ",
        "0 overflows",
        " splits (",
        "errors     0",
    ] {
        assert!(out.contains(needle), "no {needle:?} in\n{out}");
    }
}

#[test]
fn a_missing_volume_is_a_clear_error() {
    let r = bench(
        |_| split_stack(&null_leaf()),
        &["--volume", "nope", "--ios", "10"],
    );
    assert_eq!(r.code(), 1);
    let err = r.stderr();
    assert!(
        err.contains("volume 'nope' does not exist") && err.contains("volumes: lo0, lo1, st, top"),
        "{err}"
    );
    assert!(r.stdout().is_empty(), "{}", r.stdout());
}

#[test]
fn a_leaf_is_not_a_volume() {
    let r = bench(
        |_| split_stack(&null_leaf()),
        &["--volume", "l0", "--ios", "10"],
    );
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("'l0' is a leaf, not a volume"),
        "{}",
        r.stderr()
    );
}

#[test]
fn failed_io_makes_the_run_fail() {
    let r = bench(
        |_| "[volume.bad]\ntable = \"0 8192 error\"\n".to_string(),
        &["--volume", "bad", "--json", "--ios", "1000"],
    );
    assert_eq!(
        r.code(),
        1,
        "stdout: {}\nstderr: {}",
        r.stdout(),
        r.stderr()
    );
    let v: Value = serde_json::from_str(&r.stdout()).expect("the figures are still printed");
    assert!(u64_of(&v, "errors") >= 1000, "{v}");
    assert!(
        r.stderr().contains("I/O errors (first: IoError)"),
        "{}",
        r.stderr()
    );
}

#[test]
fn bad_arguments_are_refused() {
    // A block size the volume cannot take.
    let cfg = |_: &Path| {
        "[leaf.l0]\nkind = \"null\"\nsize = \"1MiB\"\n[volume.v]\ntable = \"0 2048 linear l0 0\"\n"
            .to_string()
    };
    let r = bench(cfg, &["--volume", "v", "--bs", "2M", "--ios", "10"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("larger than volume 'v'"),
        "{}",
        r.stderr()
    );
    let r = bench(cfg, &["--volume", "v", "--bs", "1000", "--ios", "10"]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("512-byte sectors"), "{}", r.stderr());
    let r = bench(cfg, &["--volume", "v", "--ios", "10", "--time", "1s"]);
    assert_ne!(r.code(), 0);
    // A config that does not build.
    let r = bench(
        |_| "[volume.v]\ntable = \"0 8 linear nowhere 0\"\n".to_string(),
        &["--volume", "v", "--ios", "10"],
    );
    assert_eq!(r.code(), 1);
    assert!(r.stderr().contains("nowhere"), "{}", r.stderr());
}
