//! Volume lifecycle: refused tables change nothing; create/load/suspend/resume/reload/remove,
//! info/table/status/message/deps/wait, stacking by name.

use stackbd_core::{Engine, EngineError, ReactorConfig, Status, SuspendOpts};
use std::sync::Arc;
use std::time::Duration;

fn engine() -> Engine {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    for m in ["m0", "m1"] {
        e.add_leaf(m, Arc::new(stackbd_leaves::MemLeaf::new(1 << 20).unwrap()))
            .unwrap(); // 2048 sectors
    }
    e
}

/// Each bad table, the line and field the error must name, and a word of the reason.
const BAD: &[(&str, usize, &str, &str)] = &[
    (
        "0 100 linear m0 0\n200 100 linear m0 100",
        2,
        "start",
        "gap",
    ),
    (
        "0 100 linear m0 0\n50 100 linear m0 100",
        2,
        "start",
        "overlap",
    ),
    (
        "0 100 linear m0 0\n100 0 linear m0 100",
        2,
        "length",
        "zero length",
    ),
    (
        "0 100 mirror m0 0",
        1,
        "target",
        "unknown target type 'mirror'",
    ),
    (
        "0 100 linear m0",
        1,
        "linear arguments",
        "expected 2 arguments",
    ),
    (
        "0 100 linear m0 0 extra",
        1,
        "linear arguments",
        "expected 2 arguments",
    ),
    (
        "0 96 striped 2 16 m0 0",
        1,
        "striped arguments",
        "need 6 arguments",
    ),
    (
        "zero 100 linear m0 0",
        1,
        "start",
        "not a non-negative integer",
    ),
    (
        "0 1e2 linear m0 0",
        1,
        "length",
        "not a non-negative integer",
    ),
    (
        "0 100 linear m0 0x10",
        1,
        "linear offset",
        "not a non-negative integer",
    ),
    (
        "0 96 striped two 16 m0 0 m1 0",
        1,
        "striped #stripes",
        "not a non-negative integer",
    ),
    (
        "0 96 striped 2 sixteen m0 0 m1 0",
        1,
        "striped chunk_size",
        "not a non-negative integer",
    ),
    (
        "0 100 linear nosuch 0",
        1,
        "linear device",
        "unknown device 'nosuch'",
    ),
    (
        "0 96 striped 2 4 m0 0 m1 0",
        1,
        "striped chunk_size",
        "below 8 sectors",
    ),
    (
        "0 100 striped 2 16 m0 0 m1 0",
        1,
        "striped length",
        "whole chunks",
    ),
    (
        "0 97 striped 2 16 m0 0 m1 0",
        1,
        "striped length",
        "does not divide into 2 stripes",
    ),
    ("0 100 linear m0 2000", 1, "linear device", "passes the end"),
    (
        "0 64 linear m0 0\n64 2049 linear m1 0",
        2,
        "linear device",
        "passes the end",
    ),
    ("0 100 linear v 0", 1, "linear device", "stack on itself"),
];

#[test]
fn bad_tables_are_refused_whole_and_change_nothing() {
    let mut e = engine();
    let v = e
        .create(
            "v",
            Some("0 100 linear m0 0\n100 96 striped 2 24 m0 100 m1 0"),
        )
        .unwrap();
    let good = e.table("v", false).unwrap();
    let data = vec![0x5au8; 196 * 512];
    assert_eq!(e.write_at(v, 0, &data), Status::Ok);
    for (text, line, field, reason) in BAD {
        let err = e.load("v", text).expect_err(text);
        let EngineError::Table { name, source } = &err else {
            panic!("{text}: not a table error: {err}")
        };
        assert_eq!(name, "v");
        assert_eq!(source.line, *line, "{text}: {err}");
        assert_eq!(source.field, *field, "{text}: {err}");
        assert!(source.reason.contains(reason), "{text}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("line {line}")) && msg.contains(field),
            "message names line and field: {msg}"
        );
        assert_eq!(
            e.table("v", false).unwrap(),
            good,
            "{text}: live table changed"
        );
        let info = e.info("v").unwrap();
        assert!(
            !info.inactive_table,
            "{text}: a refused table must not become the inactive one"
        );
        assert!(!info.suspended);
        // The same text is refused by create, which then creates nothing (with `w` for `v`, so
        // the self-reference stays one).
        let text_w = text.replace("linear v", "linear w");
        let err = e.create("w", Some(&text_w)).expect_err(&text_w).to_string();
        assert!(err.contains(reason), "{text_w}: {err}");
        assert!(
            e.dev_id("w").is_err(),
            "{text}: create left a volume behind"
        );
    }
    let mut back = vec![0u8; 196 * 512];
    assert_eq!(e.read_at(v, 0, &mut back), Status::Ok);
    assert_eq!(back, data, "data under the live table is intact");
}

#[test]
fn a_cycle_through_another_volume_is_refused() {
    let mut e = engine();
    e.create("low", Some("0 100 linear m0 0")).unwrap();
    e.create("up", Some("0 100 linear low 0")).unwrap();
    let err = e.load("low", "0 100 linear up 0").unwrap_err().to_string();
    assert!(
        err.contains("line 1") && err.contains("stack on itself"),
        "{err}"
    );
    // Through an inactive table too: up's pending table names low, low may not name up.
    e.create("x", Some("0 50 linear m1 0")).unwrap();
    e.load("x", "0 50 linear up 0").unwrap();
    let err = e.load("up", "0 50 linear x 0").unwrap_err().to_string();
    assert!(err.contains("stack on itself"), "{err}");
}

#[test]
fn volumes_stack_by_name_and_report_deps_tree_and_status() {
    let mut e = engine();
    e.create("data", Some("0 2048 striped 2 64 m0 0 m1 0"))
        .unwrap();
    let top = e.create("top", Some("0 1024 linear data 512")).unwrap();
    assert_eq!(e.deps("top").unwrap(), vec!["data"]);
    assert_eq!(e.deps("data").unwrap(), vec!["m0", "m1"]);
    assert_eq!(e.status("data").unwrap(), "0 2048 striped 2 m0 m1 1 AA\n");
    assert_eq!(e.table("top", false).unwrap(), "0 1024 linear data 512\n");
    let tree = e.tree();
    assert!(
        tree.contains("top (volume)\n  data (volume)\n    m0 (mem)\n    m1 (mem)\n"),
        "{tree}"
    );
    let info = e.info("top").unwrap();
    assert_eq!(
        (info.size, info.targets, info.live_table, info.suspended),
        (1024, 1, true, false)
    );
    let buf = vec![7u8; 4096];
    assert_eq!(e.write_at(top, 8, &buf), Status::Ok);
    let mut out = vec![0u8; 4096];
    assert_eq!(
        e.read_at(e.dev_id("data").unwrap(), 520, &mut out),
        Status::Ok
    );
    assert_eq!(out, buf, "top sector 8 is data sector 520");
    let err = e.message("top", 0, &["hello"]).unwrap_err().to_string();
    assert!(err.contains("does not accept messages"), "{err}");
    assert!(e.message("top", 5000, &["x"]).is_err());
}

#[test]
fn striped_status_marks_a_stripe_dead_after_errors() {
    let mut e = engine();
    e.create("bad", Some("0 1024 error")).unwrap();
    e.create("good", Some("0 1024 linear m0 0")).unwrap();
    let v = e
        .create("s", Some("0 2048 striped 2 8 good 0 bad 0"))
        .unwrap();
    let mut buf = vec![0u8; 8 * 512];
    assert_eq!(e.read_at(v, 0, &mut buf), Status::Ok, "stripe 0 is healthy");
    assert_eq!(e.status("s").unwrap(), "0 2048 striped 2 good bad 1 AA\n");
    assert_eq!(
        e.read_at(v, 8, &mut buf),
        Status::IoError,
        "stripe 1 is an error target"
    );
    assert_eq!(e.status("s").unwrap(), "0 2048 striped 2 good bad 1 AD\n");
}

#[test]
fn remove_is_refused_while_used_or_open() {
    let mut e = engine();
    e.create("low", Some("0 100 linear m0 0")).unwrap();
    e.create("up", Some("0 100 linear low 0")).unwrap();
    let err = e.remove("low", false).unwrap_err().to_string();
    assert!(err.contains("used by volume 'up'"), "{err}");
    assert!(
        e.remove("low", true).is_err(),
        "force does not pull a volume from under another"
    );
    assert!(e
        .remove_leaf("m0")
        .unwrap_err()
        .to_string()
        .contains("used by volume 'low'"));
    let id = e.open("up").unwrap();
    assert!(e
        .remove("up", false)
        .unwrap_err()
        .to_string()
        .contains("open 1 times"));
    e.close(id);
    e.remove("up", false).unwrap();
    e.remove("low", false).unwrap();
    e.remove_leaf("m0").unwrap();
    assert!(e.dev_id("up").is_err());
    assert_eq!(e.ls(), vec![("m1".to_string(), false)]);
}

#[test]
fn load_then_resume_swaps_and_raises_an_event() {
    let mut e = engine();
    let v = e.create("v", Some("0 100 linear m0 0")).unwrap();
    assert_eq!(e.info("v").unwrap().event_nr, 0);
    e.load("v", "0 200 linear m1 0").unwrap();
    let info = e.info("v").unwrap();
    assert!(info.inactive_table && info.live_table);
    assert_eq!(info.size, 100, "load alone does not change the live table");
    assert_eq!(e.table("v", true).unwrap(), "0 200 linear m1 0\n");
    e.suspend("v", SuspendOpts::default()).unwrap();
    assert!(e.info("v").unwrap().suspended);
    e.resume("v").unwrap();
    let info = e.info("v").unwrap();
    assert_eq!(
        (
            info.size,
            info.event_nr,
            info.suspended,
            info.inactive_table
        ),
        (200, 1, false, false)
    );
    assert_eq!(
        e.wait("v", 0, Duration::from_millis(10)).unwrap(),
        1,
        "event 0 has passed"
    );
    assert_eq!(
        e.wait("v", 1, Duration::from_millis(20)).unwrap(),
        1,
        "times out at the same event"
    );
    let mut buf = vec![0u8; 512];
    assert_eq!(
        e.read_at(v, 150, &mut buf),
        Status::Ok,
        "the new, larger table serves I/O"
    );
    // I/O past the end is refused up front and changes nothing.
    assert_eq!(e.read_at(v, 200, &mut buf), Status::OutOfRange);
    assert_eq!(e.write_at(v, 199, &[1u8; 1024]), Status::OutOfRange);
}

#[test]
fn bad_io_is_refused_before_anything_is_allocated() {
    let mut e = engine();
    let v = e.create("v", Some("0 100 linear m0 0")).unwrap();
    let mut buf = vec![0u8; 700];
    assert_eq!(
        e.read_at(v, 0, &mut buf),
        Status::Invalid,
        "not whole sectors"
    );
    assert_eq!(e.discard(v, 0, 0), Status::Invalid, "zero length");
    assert_eq!(
        e.read_at(stackbd_core::DevId(999), 0, &mut buf[..512]),
        Status::Invalid,
        "no such device"
    );
    assert_eq!(e.reactor().pool().stats.allocs, 0);
    assert_eq!(e.reactor().stats.refused, 3);
}

#[test]
fn an_empty_volume_fails_io_until_it_gets_a_table() {
    let mut e = engine();
    let v = e.create("v", None).unwrap();
    let mut buf = vec![0u8; 512];
    assert_eq!(e.read_at(v, 0, &mut buf), Status::OutOfRange, "size 0");
    assert_eq!(e.table("v", false).unwrap(), "");
    e.load("v", "0 8 zero").unwrap();
    e.resume("v").unwrap();
    buf.fill(9);
    assert_eq!(e.read_at(v, 0, &mut buf), Status::Ok);
    assert!(buf.iter().all(|&b| b == 0), "zero target reads zeros");
    assert_eq!(e.write_at(v, 0, &buf), Status::Ok, "and drops writes");
    assert_eq!(e.flush(v), Status::Ok);
}

mod canonical {
    use proptest::prelude::*;
    use stackbd_core::table::parse_lines;

    /// A random valid table over m0/m1 (2048 sectors each), written with noise: extra blanks,
    /// tabs, comments, blank lines, leading zeros, `;` separators.
    fn noisy_table() -> impl Strategy<Value = String> {
        proptest::collection::vec((0u8..4, 1u64..6, any::<u8>()), 1..8).prop_map(|segs| {
            let mut t = String::new();
            let mut start = 0u64;
            let mut off = [0u64; 2];
            for (i, (kind, n, noise)) in segs.into_iter().enumerate() {
                let len = n * 16;
                let ws = if noise & 1 == 0 { " " } else { " \t " };
                let z = if noise & 2 == 0 { "" } else { "00" };
                let m = i % 2;
                let line = match kind {
                    0 => format!("{z}{start}{ws}{len} linear m{m}{ws}{z}{}", off[m]),
                    1 => format!("{start} {len}{ws}striped 2 8 m0 {} m1 {}", off[0], off[1]),
                    2 => format!("{start} {len} zero"),
                    _ => format!("{start}\t{len} error{ws}"),
                };
                match kind {
                    0 => off[m] += len,
                    1 => {
                        off[0] += len / 2;
                        off[1] += len / 2;
                    }
                    _ => {}
                }
                start += len;
                t.push_str(&line);
                t.push_str(match noise % 4 {
                    0 => "\n",
                    1 => "  # comment\n",
                    2 => ";",
                    _ => "\n\n",
                });
            }
            t
        })
    }

    proptest! {
        #[test]
        fn parse_print_parse_is_identity(text in noisy_table()) {
            let mut e = super::engine();
            e.create("v", Some(&text)).unwrap();
            let printed = e.table("v", false).unwrap();
            let strip = |t: &str| parse_lines(t).unwrap().into_iter().map(|mut l| { l.lineno = 0; l }).collect::<Vec<_>>();
            let mut a = strip(&text);
            for l in &mut a {
                // Canonical numbers: "0016" and "16" are the same argument.
                for arg in &mut l.args {
                    if let Ok(n) = arg.parse::<u64>() { *arg = n.to_string(); }
                }
            }
            prop_assert_eq!(strip(&printed), a);
            e.create("w", Some(&printed)).unwrap();
            prop_assert_eq!(e.table("w", false).unwrap(), printed);
        }
    }
}

#[test]
fn block_status_walks_the_stack_to_the_leaves() {
    use stackbd_core::leaf::Extent;
    let mut e = engine();
    e.create(
        "s",
        Some("0 64 striped 2 16 m0 0 m1 0\n64 32 zero\n96 32 linear m0 512"),
    )
    .unwrap();
    let v = e.dev_id("s").unwrap();
    // Write sectors 0..16 (first chunk: m0 0..16) and 96..104 (m0 512..520).
    assert_eq!(e.write_at(v, 0, &[1u8; 16 * 512]), Status::Ok);
    assert_eq!(e.write_at(v, 96, &[1u8; 8 * 512]), Status::Ok);
    let mut out = Vec::new();
    let covered = e.reactor().block_status(v, 0, 128, 64, &mut out);
    assert_eq!(covered, 128);
    const HZ: u32 = Extent::HOLE | Extent::ZERO;
    let want = vec![
        Extent {
            sectors: 16,
            flags: 0,
        },
        Extent {
            sectors: 80,
            flags: HZ,
        }, // 16..64 unwritten stripes, 64..96 zero target
        Extent {
            sectors: 8,
            flags: 0,
        },
        Extent {
            sectors: 24,
            flags: HZ,
        },
    ];
    assert_eq!(out, want);
    // Discard punches the hole again (whole 4 KiB pages).
    assert_eq!(e.discard(v, 0, 16), Status::Ok);
    out.clear();
    e.reactor().block_status(v, 0, 16, 64, &mut out);
    assert_eq!(
        out,
        vec![Extent {
            sectors: 16,
            flags: HZ
        }]
    );
    // A bounded answer is short, never wrong.
    out.clear();
    let covered = e.reactor().block_status(v, 0, 128, 1, &mut out);
    assert!(covered < 128 && out.len() == 1);
}
