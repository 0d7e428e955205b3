//! Arbitrary table text against a small engine: loading never panics, a refused table changes
//! nothing, and an accepted table prints back canonically (print -> parse -> print is identity).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackbd_core::{Engine, ReactorConfig};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut e = Engine::new(
        stackbd_targets::registry(),
        ReactorConfig {
            pool_capacity: 16,
            ..Default::default()
        },
    );
    for m in ["m0", "m1"] {
        e.add_leaf(m, Arc::new(stackbd_leaves::NullLeaf::new(1 << 20)))
            .unwrap();
    }
    e.create("v", Some("0 8 zero")).unwrap();
    let before = e.table("v", false).unwrap();
    match e.load("v", text) {
        Ok(()) => {
            let printed = e.table("v", true).unwrap();
            e.load("v", &printed)
                .expect("a printed table must load again");
            assert_eq!(
                e.table("v", true).unwrap(),
                printed,
                "canonical print is a fixed point"
            );
        }
        Err(_) => {
            assert_eq!(e.table("v", false).unwrap(), before);
            assert!(!e.info("v").unwrap().inactive_table);
        }
    }
});
