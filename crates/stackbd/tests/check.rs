//! `stackbd check`: the real binary on temporary config files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_stackbd");

/// The example of the design brief (also `examples/demo.toml`).
const DEMO: &str = r#"
[leaf.m0]
kind = "mem"
size = "1GiB"
[leaf.m1]
kind = "mem"
size = "1GiB"
[volume.data]
table = "0 4194304 striped 2 128 m0 0 m1 0"
[volume.top]
table = "0 4194304 linear data 0"
"#;

/// Two 1 MiB (2048-sector) leaves on lines 1-6; `volume()` puts `[volume.v]` on line 7 and its
/// table text from line 9 on.
const LEAVES: &str = "[leaf.m0]
kind = \"mem\"
size = \"1MiB\"
[leaf.m1]
kind = \"mem\"
size = \"1MiB\"
";

struct Run {
    path: PathBuf,
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

    fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// Asserts success and returns stdout.
    fn ok(&self) -> String {
        assert_eq!(
            self.code(),
            0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        assert!(self.stderr().is_empty(), "stderr: {}", self.stderr());
        self.stdout()
    }

    /// Asserts exit status 1, every stderr line prefixed with the config path, and each needle
    /// somewhere in stderr; returns stderr.
    fn refused(&self, needles: &[&str]) -> String {
        let err = self.stderr();
        assert_eq!(
            self.code(),
            1,
            "expected refusal\nstdout:\n{}\nstderr:\n{err}",
            self.stdout()
        );
        assert!(!err.trim().is_empty(), "no message");
        let prefix = format!("{}:", self.path());
        for line in err.lines() {
            assert!(
                line.starts_with(&prefix),
                "line not prefixed with {prefix}: {line}"
            );
        }
        for n in needles {
            let n = n.replace("{path}", &self.path());
            assert!(err.contains(&n), "stderr lacks {n:?}:\n{err}");
        }
        err
    }
}

fn run_args(config: &str, args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    Run {
        path,
        out,
        _dir: dir,
    }
}

fn check(config: &str) -> Run {
    run_args(config, &[])
}

/// The two leaves and one volume `v` with this table, in a literal multi-line string: table
/// line N sits on file line 8 + N.
fn volume(table: &str) -> String {
    format!("{LEAVES}[volume.v]\ntable = '''\n{table}\n'''\n")
}

// ---------------------------------------------------------------------------------------------
// Valid configurations
// ---------------------------------------------------------------------------------------------

#[test]
fn valid_example_prints_both_tables_and_limits() {
    let out = check(DEMO).ok();
    assert!(out.contains("0 4194304 striped 2 128 m0 0 m1 0"), "{out}");
    assert!(out.contains("0 4194304 linear data 0"), "{out}");
    assert!(out.contains("per_io_bytes"), "{out}");
    assert!(out.contains("frame_depth"), "{out}");
    assert!(
        out.contains("volume data: 4194304 sectors (2 GiB)"),
        "{out}"
    );
    assert!(
        out.contains("leaf m0: mem, 2097152 sectors (1 GiB)"),
        "{out}"
    );
    for key in [
        "logical_block_bytes",
        "physical_block_bytes",
        "io_min_bytes",
        "io_opt_bytes",
        "max_sectors",
        "chunk_sectors",
        "max_discard_sectors",
        "max_write_zeroes_sectors",
        "max_copy_sectors",
        "copy_native",
        "poll",
        "nowait",
        "misaligned",
    ] {
        assert!(out.contains(key), "no {key} in\n{out}");
    }
    // Dependency order: `data` before `top`.
    assert!(out.find("volume data").unwrap() < out.find("volume top").unwrap());
}

#[test]
fn volumes_print_in_dependency_order_whatever_the_file_order() {
    let cfg = format!(
        "{LEAVES}[volume.top]\ntable = \"0 2048 linear mid 0\"\n\
         [volume.mid]\ntable = \"0 2048 linear m0 0\"\n"
    );
    let out = check(&cfg).ok();
    assert!(out.find("volume mid").unwrap() < out.find("volume top").unwrap());
}

#[test]
fn multi_line_table_in_toml_works() {
    let cfg = format!(
        "{LEAVES}[volume.v]\ntable = \"\"\"\n\
         # first half on m0, second on m1\n\
         0 2048 linear m0 0\n\
         2048 2048 linear m1 0\n\
         \"\"\"\n"
    );
    let out = check(&cfg).ok();
    assert!(
        out.contains("    0 2048 linear m0 0\n    2048 2048 linear m1 0\n"),
        "{out}"
    );
    assert!(out.contains("volume v: 4096 sectors (2 MiB)"), "{out}");
}

#[test]
fn non_power_of_two_chunk_is_accepted() {
    // 96 sectors over 2 stripes: 48 per stripe, two chunks of 24.
    let out = check(&volume("0 96 striped 2 24 m0 0 m1 0")).ok();
    assert!(out.contains("0 96 striped 2 24 m0 0 m1 0"), "{out}");
}

#[test]
fn exports_and_null_leaves_are_accepted() {
    let cfg = "[leaf.n]\nkind = \"null\"\nsize = 1073741824\n\
               [volume.v]\ntable = \"0 2097152 linear n 0\"\n\
               [export.v]\nvolume = \"v\"\nread_only = true\n";
    let out = check(cfg).ok();
    assert!(
        out.contains("leaf n: null, 2097152 sectors (1 GiB)"),
        "{out}"
    );
    assert!(out.contains("export v: volume v, read-only"), "{out}");
}

#[test]
fn repository_examples_check_ok() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for name in ["demo.toml", "layers.toml"] {
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        let out = check(&text).ok();
        assert!(out.contains("per_io_bytes"), "{name}: {out}");
    }
}

#[test]
fn json_output_is_one_object_with_the_same_facts() {
    let r = run_args(DEMO, &["--json"]);
    let out = r.ok();
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["leaves"][0]["name"], "m0");
    assert_eq!(v["leaves"][0]["kind"], "mem");
    assert_eq!(v["leaves"][0]["bytes"], 1u64 << 30);
    let vols = v["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2);
    assert_eq!(vols[0]["name"], "data");
    assert_eq!(vols[0]["table"], "0 4194304 striped 2 128 m0 0 m1 0");
    assert_eq!(vols[1]["name"], "top");
    assert_eq!(vols[1]["sectors"], 4194304);
    assert_eq!(vols[1]["uses"][0], "data");
    let l = &vols[1]["limits"];
    assert!(
        l["per_io_bytes"].as_u64().unwrap() > vols[0]["limits"]["per_io_bytes"].as_u64().unwrap()
    );
    assert!(l["frame_depth"].as_u64().unwrap() > 0);
    assert_eq!(l["logical_block_bytes"], 512);
    assert_eq!(l["misaligned"], false);
}

#[test]
fn json_output_lists_errors_too() {
    let r = run_args(&volume("0 1024 linear m0 0\n2048 8 zero"), &["--json"]);
    r.refused(&["table line 2"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    assert_eq!(v["ok"], false);
    let e = &v["errors"][0];
    assert_eq!(e["line"], 10);
    assert_eq!(e["section"], "[volume.v]");
    assert_eq!(e["table_line"], 2);
    assert_eq!(e["field"], "start");
    assert!(e["reason"].as_str().unwrap().contains("gap"));
}

// ---------------------------------------------------------------------------------------------
// Tables the engine refuses: the file line, the table line, the field and the reason
// ---------------------------------------------------------------------------------------------

#[test]
fn gap_between_lines_is_refused() {
    check(&volume("0 1024 linear m0 0\n2048 1024 linear m1 0")).refused(&[
        "{path}:10: [volume.v]: table line 2: start: gap: line starts at sector 2048, previous \
         line ends at 1024",
    ]);
}

#[test]
fn overlap_is_refused() {
    check(&volume("0 1024 linear m0 0\n512 1024 linear m1 0")).refused(&[
        "{path}:10: [volume.v]: table line 2: start: overlap: line starts at sector 512, \
         previous line ends at 1024",
    ]);
}

#[test]
fn zero_length_is_refused() {
    check(&volume("0 0 linear m0 0"))
        .refused(&["{path}:9: [volume.v]: table line 1: length: zero length"]);
}

#[test]
fn unknown_target_type_is_refused() {
    check(&volume("0 1024 linaer m0 0")).refused(&[
        "{path}:9: [volume.v]: table line 1: target: unknown target type 'linaer' (known: \
         crypt, delay, dust, error, flakey, linear, multipath, raid, snapshot, snapshot-merge, \
         snapshot-origin, striped, zero)",
    ]);
}

#[test]
fn linear_with_one_argument_is_refused() {
    check(&volume("0 1024 linear m0")).refused(&[
        "{path}:9: [volume.v]: table line 1: linear arguments: expected 2 arguments \
         (<device> <offset>), got 1",
    ]);
}

#[test]
fn striped_with_a_missing_device_pair_is_refused() {
    check(&volume("0 1024 striped 2 128 m0 0")).refused(&[
        "{path}:9: [volume.v]: table line 1: striped arguments: 2 stripes need 6 arguments",
        "got 4",
    ]);
}

#[test]
fn non_numeric_start_is_refused() {
    check(&volume("0 1024 linear m0 0\nx 1024 linear m1 0")).refused(&[
        "{path}:10: [volume.v]: table line 2: start: 'x' is not a non-negative integer",
    ]);
}

#[test]
fn non_numeric_length_is_refused() {
    check(&volume("0 1k linear m0 0")).refused(&[
        "{path}:9: [volume.v]: table line 1: length: '1k' is not a non-negative integer",
    ]);
}

#[test]
fn non_numeric_offset_is_refused() {
    check(&volume("0 1024 linear m0 zero")).refused(&[
        "{path}:9: [volume.v]: table line 1: linear offset: 'zero' is not a non-negative integer",
    ]);
}

#[test]
fn non_numeric_chunk_size_is_refused() {
    check(&volume("0 1024 striped 2 64k m0 0 m1 0")).refused(&[
        "{path}:9: [volume.v]: table line 1: striped chunk_size: '64k' is not a non-negative \
         integer",
    ]);
}

#[test]
fn unknown_device_is_refused() {
    check(&volume("0 1024 linear m9 0"))
        .refused(&["{path}:9: [volume.v]: table line 1: linear device: unknown device 'm9'"]);
}

#[test]
fn stripe_chunk_below_eight_sectors_is_refused() {
    check(&volume("0 1024 striped 2 4 m0 0 m1 0")).refused(&[
        "{path}:9: [volume.v]: table line 1: striped chunk_size: chunk size 4 is below 8 \
         sectors",
    ]);
}

#[test]
fn striped_length_that_is_not_whole_chunks_is_refused() {
    // 1000 sectors over 2 stripes: 500 per stripe, not a multiple of 128.
    check(&volume("0 1000 striped 2 128 m0 0 m1 0")).refused(&[
        "{path}:9: [volume.v]: table line 1: striped length: target length 1000 does not \
         divide into whole chunks of 128 sectors per stripe",
    ]);
}

#[test]
fn range_past_the_end_of_a_leaf_is_refused() {
    check(&volume("0 2048 linear m0 1024")).refused(&[
        "{path}:9: [volume.v]: table line 1: linear device: range 1024+2048 passes the end of \
         device 'm0' (2048 sectors)",
    ]);
}

// ---------------------------------------------------------------------------------------------
// Stacking
// ---------------------------------------------------------------------------------------------

#[test]
fn volume_that_names_itself_is_refused() {
    let cfg = format!("{LEAVES}[volume.a]\ntable = \"0 1024 linear a 0\"\n");
    let err =
        check(&cfg).refused(&["{path}:8: [volume.a]: volume 'a' would stack on itself: a -> a"]);
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn two_volumes_in_a_cycle_are_refused() {
    let cfg = format!(
        "{LEAVES}[volume.a]\ntable = \"0 1024 linear b 0\"\n\
         [volume.b]\ntable = \"0 1024 linear a 0\"\n"
    );
    let err = check(&cfg)
        .refused(&["{path}:8: [volume.a]: volume 'a' would stack on itself: a -> b -> a"]);
    assert_eq!(err.lines().count(), 1, "the cycle is reported once: {err}");
}

#[test]
fn volume_on_a_failed_volume_is_skipped_not_unknown() {
    let cfg = format!(
        "{LEAVES}[volume.low]\ntable = \"0 4096 linear m0 0\"\n\
         [volume.high]\ntable = \"0 1024 linear low 0\"\n\
         [volume.top]\ntable = \"0 1024 linear high 0\"\n"
    );
    let err = check(&cfg).refused(&[
        "{path}:8: [volume.low]: table line 1: linear device: range 0+4096 passes the end",
        "{path}:10: [volume.high]: skipped: it uses volume 'low', which failed",
        "{path}:12: [volume.top]: skipped: it uses volume 'high', which was skipped",
    ]);
    assert!(!err.contains("unknown device"), "{err}");
}

#[test]
fn volume_on_an_invalid_leaf_is_skipped() {
    let cfg =
        "[leaf.m0]\nkind = \"mem\"\nsize = \"lots\"\n[volume.v]\ntable = \"0 8 linear m0 0\"\n";
    let err = check(cfg).refused(&[
        "{path}:3: [leaf.m0]: size: invalid size 'lots'",
        "{path}:5: [volume.v]: skipped: it uses leaf 'm0', which is invalid",
    ]);
    assert!(!err.contains("unknown device"), "{err}");
}

#[test]
fn every_error_is_reported_one_per_line() {
    let cfg = "[leaf.m0]\nkind = \"mem\"\nsize = \"1GB\"\n\
               [leaf.m1]\nkind = \"floppy\"\n\
               [leaf.m2]\nkind = \"mem\"\nsize = \"1MiB\"\n\
               [volume.a]\ntable = \"0 8 linear m2 0 extra\"\n\
               [volume.b]\ntable = \"0 0 zero\"\n\
               [export.e]\nvolume = \"c\"\n";
    let err = check(cfg).refused(&[
        "{path}:3: [leaf.m0]: size: invalid size '1GB': 'GB' is ambiguous",
        "{path}:5: [leaf.m1]: unknown kind 'floppy'",
        "{path}:10: [volume.a]: table line 1: linear arguments",
        "{path}:12: [volume.b]: table line 1: length: zero length",
        "{path}:14: [export.e]: volume: no volume 'c' is declared (volumes: a, b)",
    ]);
    assert_eq!(err.lines().count(), 5, "{err}");
}

// ---------------------------------------------------------------------------------------------
// The file itself
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_size_string_is_refused() {
    let cfg = "[leaf.m0]\nkind = \"mem\"\nsize = \"1.5 GiB\"\n";
    check(cfg).refused(&[
        "{path}:3: [leaf.m0]: size: invalid size '1.5 GiB': expected bytes, or a whole number \
         with a unit: B, K/KiB, M/MiB, G/GiB, T/TiB",
    ]);
}

#[test]
fn size_that_is_not_whole_sectors_is_refused() {
    let cfg = "[leaf.m0]\nkind = \"null\"\nsize = 1000\n";
    check(cfg).refused(&["{path}:3: [leaf.m0]: size: invalid size 1000: 1000 bytes is not a whole number of 512-byte sectors"]);
}

#[test]
fn unknown_leaf_kind_is_refused() {
    let cfg = "[leaf.f]\nkind = \"tape\"\npath = \"/tmp/x\"\n";
    check(cfg).refused(&[
        "{path}:2: [leaf.f]: unknown kind 'tape' (known: mem, null, file, nbd, powercut)",
    ]);
}

#[test]
fn unknown_key_is_refused() {
    let cfg = format!("{LEAVES}[volume.v]\ntable = \"0 8 zero\"\ncolour = \"red\"\n");
    check(&cfg).refused(&[
        "{path}:9: [volume.v]: unknown key 'colour' (volumes take: table, scheduler, nr_requests)",
    ]);
}

#[test]
fn bad_request_queue_settings_are_refused() {
    let cfg = format!("{LEAVES}[volume.v]\ntable = \"0 8 zero\"\nscheduler = \"cfq\"\n");
    check(&cfg).refused(&[
        "{path}:9: [volume.v]: scheduler: unknown scheduler 'cfq' (known: none, deadline)",
    ]);
    let cfg = format!("{LEAVES}[volume.v]\ntable = \"0 8 zero\"\nnr_requests = 0\n");
    check(&cfg).refused(&["{path}:9: [volume.v]: nr_requests: 0 is out of range (1..=4096)"]);
    let cfg = format!("{LEAVES}[volume.v]\ntable = \"0 8 zero\"\nscheduler = 1\n");
    check(&cfg).refused(&[
        "{path}:9: [volume.v]: scheduler: expected \"none\" or \"deadline\", got integer",
    ]);
}

#[test]
fn unknown_leaf_key_is_refused() {
    let cfg = "[leaf.m0]\nkind = \"mem\"\nsize = \"1MiB\"\ndirect = true\n";
    check(cfg)
        .refused(&["{path}:4: [leaf.m0]: unknown key 'direct' (mem leaves take: kind, size)"]);
}

#[test]
fn unknown_section_is_refused() {
    check("[volumes.v]\ntable = \"0 8 zero\"\n").refused(&[
        "{path}:1:2: unknown field `volumes`, expected one of `leaf`, `volume`, `export`",
    ]);
}

#[test]
fn export_naming_a_missing_volume_is_refused() {
    let cfg = format!(
        "{LEAVES}[volume.v]\ntable = \"0 8 zero\"\n[export.e]\nvolume = \"w\"\nread_only = false\n"
    );
    check(&cfg).refused(&["{path}:10: [export.e]: volume: no volume 'w' is declared (volumes: v)"]);
}

#[test]
fn toml_syntax_error_names_the_line_and_column() {
    check("[leaf.m0]\nkind = \"mem\nsize = 5\n").refused(&["{path}:2:"]);
}

#[test]
fn missing_file_is_refused() {
    let out = Command::new(BIN)
        .args(["check", "/nonexistent/stackbd.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("/nonexistent/stackbd.toml: cannot read:"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(BIN).arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------------
// File leaves
// ---------------------------------------------------------------------------------------------

/// Runs `check` on `config` written beside a 1 MiB file `disk.img` in a fresh folder.
fn check_with_disk(config: &str, args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let path = dir.path().join("stack.toml");
    std::fs::write(&path, config.replace("{disk}", &disk.display().to_string())).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    Run {
        path,
        out,
        _dir: dir,
    }
}

#[test]
fn file_leaf_is_sized_by_its_file() {
    let cfg = "[leaf.f0]\nkind = \"file\"\npath = \"{disk}\"\ndirect = false\n\
               [volume.v]\ntable = \"0 2048 linear f0 0\"\n";
    let out = check_with_disk(cfg, &[]).ok();
    assert!(out.contains("leaf f0: file, 2048 sectors (1 MiB)"), "{out}");
    assert!(out.contains("0 2048 linear f0 0"), "{out}");
}

#[test]
fn file_leaf_path_is_relative_to_the_config_and_takes_queue_depth() {
    let cfg = "[leaf.f0]\nkind = \"file\"\npath = \"disk.img\"\nqueue_depth = 8\n\
               [volume.v]\ntable = \"0 2048 linear f0 0\"\n";
    let r = check_with_disk(cfg, &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.ok()).unwrap();
    assert_eq!(v["leaves"][0]["kind"], "file");
    assert_eq!(v["leaves"][0]["bytes"], 1 << 20);
}

#[test]
fn file_leaf_that_cannot_open_is_refused_with_its_path() {
    let cfg = "[leaf.f0]\nkind = \"file\"\npath = \"/nonexistent/disk.img\"\n\
               [volume.v]\ntable = \"0 8 linear f0 0\"\n";
    check_with_disk(cfg, &[]).refused(&[
        "{path}:2: [leaf.f0]: cannot create file leaf: /nonexistent/disk.img: No such file",
        "[volume.v]: skipped: it uses leaf 'f0', which failed",
    ]);
}

#[test]
fn file_leaf_keys_are_checked() {
    let cfg = "[leaf.f0]\nkind = \"file\"\ndirect = \"yes\"\nqueue_depth = 0\nsize = 4096\n";
    let err = check_with_disk(cfg, &[]).refused(&[
        "{path}:2: [leaf.f0]: missing 'path' (file leaves take: kind, path, direct, queue_depth)",
        "{path}:3: [leaf.f0]: direct: expected true or false, got string",
        "{path}:4: [leaf.f0]: queue_depth: 0 is out of range (1..=4096)",
        "{path}:5: [leaf.f0]: unknown key 'size' (file leaves take: kind, path, direct, queue_depth)",
    ]);
    assert_eq!(err.lines().count(), 4, "{err}");
    let cfg = "[leaf.f0]\nkind = \"file\"\npath = \"\"\nqueue_depth = \"deep\"\n";
    check_with_disk(cfg, &[]).refused(&[
        "{path}:3: [leaf.f0]: path: empty",
        "{path}:4: [leaf.f0]: queue_depth: expected a whole number, got string",
    ]);
}
