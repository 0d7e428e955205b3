//! The three suspend steps of the library API (`suspend_start`, `PendingSuspend::wait`,
//! `suspend_finish`) on an inline engine and on reactor threads: what a suspending volume
//! refuses and allows, `info` while it drains, a release (shutdown) cancelling the pending
//! suspend, and the blocking `suspend` still working on top of them.

use stackbd_core::engine::SuspendStart;
use stackbd_core::runtime::RuntimeConfig;
use stackbd_core::{Engine, EngineError, ReactorConfig, Status, SuspendOpts, Wait};
use std::sync::Arc;
use std::time::Duration;

fn engines() -> Vec<(&'static str, Engine)> {
    let mut out = vec![(
        "inline",
        Engine::new(stackbd_targets::registry(), ReactorConfig::default()),
    )];
    let t = Engine::with_threads(stackbd_targets::registry(), RuntimeConfig::default())
        .expect("reactor threads");
    out.push(("threads", t));
    for (_, e) in &mut out {
        e.add_leaf(
            "m0",
            Arc::new(stackbd_leaves::MemLeaf::new(1 << 20).unwrap()),
        )
        .unwrap();
        e.create("v", Some("0 2048 linear m0 0")).unwrap();
    }
    out
}

fn pending(e: &mut Engine, opts: SuspendOpts) -> stackbd_core::engine::PendingSuspend {
    match e.suspend_start("v", opts).expect("suspend_start") {
        SuspendStart::Pending(p) => p,
        SuspendStart::Already => panic!("the volume was not suspended"),
    }
}

fn busy(r: Result<(), EngineError>, what: &str) {
    match r {
        Err(EngineError::Busy { reason, .. }) => {
            assert!(reason.contains("suspending"), "{what}: {reason}")
        }
        other => panic!("{what} on a suspending volume: {other:?}"),
    }
}

#[test]
fn a_suspending_volume_refuses_lifecycle_verbs_and_finishes_suspended() {
    for (kind, mut e) in engines() {
        let mut p = pending(&mut e, SuspendOpts::default());
        assert_eq!(p.name(), "v");
        let i = e.info("v").unwrap();
        assert!(
            !i.suspended && i.suspending.is_some(),
            "{kind}: info while draining: {i:?}"
        );
        busy(
            e.suspend_start("v", SuspendOpts::default()).map(drop),
            "suspend",
        );
        busy(e.resume("v"), "resume");
        busy(e.remove("v", true), "remove");
        busy(e.reload("v", "0 8 zero"), "reload");
        assert!(
            !e.info("v").unwrap().inactive_table,
            "{kind}: a refused reload loaded its table"
        );
        // The inactive slot is not the suspend's: load and clear go on.
        e.load("v", "0 8 zero").unwrap();
        e.clear("v").unwrap();
        p.wait();
        e.suspend_finish(p).unwrap();
        let i = e.info("v").unwrap();
        assert!(i.suspended && i.suspending.is_none(), "{kind}: {i:?}");
        let left = i.suspend_deadline.expect("the default deadline");
        assert!(
            left <= Duration::from_secs(60) && left > Duration::from_secs(50),
            "{kind}: {left:?}"
        );
        e.resume("v").unwrap();
        let i = e.info("v").unwrap();
        assert!(
            !i.suspended && i.suspend_deadline.is_none(),
            "{kind}: {i:?}"
        );
        // The blocking suspend, built on the steps.
        e.suspend(
            "v",
            SuspendOpts {
                deadline: None,
                ..SuspendOpts::default()
            },
        )
        .unwrap();
        let i = e.info("v").unwrap();
        assert!(i.suspended && i.suspend_deadline.is_none(), "{kind}: {i:?}");
        assert!(matches!(
            e.suspend_start("v", SuspendOpts::default()),
            Ok(SuspendStart::Already)
        ));
        e.resume("v").unwrap();
        e.stop_threads();
    }
}

#[test]
fn a_release_cancels_a_pending_suspend() {
    for (kind, mut e) in engines() {
        let mut p = pending(&mut e, SuspendOpts::default());
        assert_eq!(e.suspended_volumes(), vec!["v".to_string()], "{kind}");
        assert!(e.release("v").unwrap(), "{kind}: nothing released");
        p.wait();
        let err = e
            .suspend_finish(p)
            .expect_err("finished a cancelled suspend");
        assert!(err.to_string().contains("cancelled"), "{kind}: {err}");
        let i = e.info("v").unwrap();
        assert!(!i.suspended && i.suspending.is_none(), "{kind}: {i:?}");
        assert!(e.suspended_volumes().is_empty(), "{kind}");
        // The volume serves I/O again (inline: through the library API).
        if kind == "inline" {
            let h = e.open_volume("v", Wait::Interrupt).unwrap();
            assert_eq!(e.write(&h, 0, &[7u8; 4096]), Status::Ok);
            let mut got = [0u8; 4096];
            assert_eq!(e.read(&h, 0, &mut got), Status::Ok);
            assert_eq!(got, [7u8; 4096]);
            e.close_volume(h);
        }
        // And suspends again.
        e.suspend("v", SuspendOpts::default()).unwrap();
        assert!(e.info("v").unwrap().suspended, "{kind}");
        e.stop_threads();
    }
}
