//! No panic from input: a suspend deadline or drain timeout that no `Instant` can hold, and a
//! table larger than 2^63 bytes, are refused with a clear error, and the engine (the volume,
//! its I/O, later suspends and their deadlines) works as before.

use stackbd_core::{Engine, EngineError, ReactorConfig, Status, SuspendOpts, MAX_SUSPEND_DEADLINE};
use std::sync::Arc;
use std::time::Duration;

fn engine() -> Engine {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    e.add_leaf(
        "m0",
        Arc::new(stackbd_leaves::MemLeaf::new(1 << 20).unwrap()),
    )
    .unwrap();
    e.create("v", Some("0 2048 linear m0 0")).unwrap();
    e
}

/// The volume is active and serves I/O.
fn works(e: &mut Engine) {
    let info = e.info("v").unwrap();
    assert!(!info.suspended, "{info:?}");
    let dev = info.dev;
    assert_eq!(e.write_at(dev, 8, &[0x5a; 4096]), Status::Ok);
    let mut back = [0u8; 4096];
    assert_eq!(e.read_at(dev, 8, &mut back), Status::Ok);
    assert!(back.iter().all(|&b| b == 0x5a));
}

fn refused(e: &mut Engine, opts: SuspendOpts, want: &str) {
    let err = e.suspend("v", opts).unwrap_err();
    assert!(
        matches!(err, EngineError::Invalid { .. }) && err.to_string().contains(want),
        "{opts:?}: {err}"
    );
    works(e);
}

#[test]
fn a_suspend_deadline_out_of_range_is_refused_and_changes_nothing() {
    let mut e = engine();
    // 1e19 s fits in a Duration but in no Instant: the addition used to panic.
    let huge = Duration::try_from_secs_f64(1e19).unwrap();
    for d in [
        huge,
        Duration::MAX,
        MAX_SUSPEND_DEADLINE + Duration::from_nanos(1),
        Duration::ZERO,
    ] {
        refused(
            &mut e,
            SuspendOpts {
                deadline: Some(d),
                ..SuspendOpts::default()
            },
            "suspend deadline",
        );
    }
    refused(
        &mut e,
        SuspendOpts {
            drain_timeout: Duration::MAX,
            ..SuspendOpts::default()
        },
        "drain timeout",
    );
    // The longest deadline is accepted; the volume suspends and resumes as ever.
    e.suspend(
        "v",
        SuspendOpts {
            deadline: Some(MAX_SUSPEND_DEADLINE),
            ..SuspendOpts::default()
        },
    )
    .unwrap();
    assert!(e.info("v").unwrap().suspended);
    e.poll();
    assert!(e.info("v").unwrap().suspended, "a 30-day deadline expired");
    e.resume("v").unwrap();
    works(&mut e);
    // Deadlines still fire after the refusals.
    e.suspend(
        "v",
        SuspendOpts {
            deadline: Some(Duration::from_millis(1)),
            ..SuspendOpts::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(5));
    e.poll();
    works(&mut e);
}

#[test]
fn a_volume_of_2_63_bytes_or_more_is_refused() {
    let mut e = engine();
    for len in [1u64 << 54, 1 << 63, u64::MAX] {
        for text in [format!("0 {len} zero"), format!("0 8 zero\n8 {len} zero")] {
            let err = e.create("big", Some(&text)).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, EngineError::Table { .. }) && msg.contains("exceeds 2^63 bytes"),
                "{text}: {msg}"
            );
            assert!(e.info("big").is_err(), "{text}: a refused volume exists");
            let err = e.load("v", &text).unwrap_err();
            assert!(err.to_string().contains("exceeds 2^63 bytes"), "{err}");
            assert!(!e.info("v").unwrap().inactive_table);
        }
    }
    // The largest volume there is: 2^63 - 512 bytes, and its last sector reads.
    let max = stackbd_core::table::MAX_VOLUME_SECTORS;
    e.create("big", Some(&format!("0 {max} zero"))).unwrap();
    let info = e.info("big").unwrap();
    assert_eq!(info.size, (1 << 54) - 1);
    let mut b = [1u8; 512];
    assert_eq!(e.read_at(info.dev, max - 1, &mut b), Status::Ok);
    assert_eq!(b, [0; 512]);
    works(&mut e);
}
