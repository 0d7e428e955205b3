//! Model tests: random stacks 1 to 4 deep of linear/striped/zero/error over mem leaves, random
//! op sequences crossing every kind of boundary, byte for byte against a flat reference.

use proptest::prelude::*;
use stackbd_core::ReactorConfig;
use stackbd_testkit::model::{ops_strategy, resolve, run};
use stackbd_testkit::stackgen::{build, mem_leaves, GenOpts};

fn check(
    seed: u64,
    depth: usize,
    raw: &[stackbd_testkit::model::RawOp],
) -> Result<(), TestCaseError> {
    let mut stack = build(
        seed,
        GenOpts {
            depth,
            ..GenOpts::default()
        },
        ReactorConfig::default(),
        &mut mem_leaves(),
    );
    let ops = resolve(raw, stack.size);
    run(&mut stack, &ops)
        .map_err(|e| TestCaseError::fail(format!("{e}\nseed {seed} depth {depth}\n{stack:?}")))?;
    let r = stack.engine.reactor();
    prop_assert_eq!(r.pool().in_use(), 0, "every bio went back to the pool");
    prop_assert_eq!(r.outstanding(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_stacks_agree_with_the_reference(seed in any::<u64>(), depth in 1usize..=4, raw in ops_strategy(120)) {
        check(seed, depth, &raw)?;
    }
}

/// A fixed sweep so every depth is covered on every run, whatever proptest draws.
#[test]
fn every_depth_over_many_seeds() {
    use stackbd_testkit::rng::Rng;
    let mut rng = Rng::new(7);
    for depth in 1..=4 {
        for seed in 0..12u64 {
            let raw: Vec<_> = (0..150)
                .map(|_| stackbd_testkit::model::RawOp {
                    kind: rng.range(0, 99) as u8,
                    offset: rng.next_u64() as u32,
                    len: rng.range(1, 200) as u32,
                    seed: rng.next_u64() as u8,
                })
                .collect();
            check(seed * 1000 + depth as u64, depth, &raw).unwrap();
        }
    }
}

/// The same sequences through a pool far too small for them: clones grow the pool, top-level
/// bios wait, and the answers stay the same.
#[test]
fn tiny_pools_and_tiny_frame_areas_still_agree() {
    let cfg = ReactorConfig {
        pool_capacity: 16,
        per_io_bytes: 0,
        fallback_chunks: 1,
        fallback_chunk_bytes: 16,
    };
    for seed in 0..8u64 {
        let mut stack = build(
            seed,
            GenOpts {
                depth: 4,
                ..GenOpts::default()
            },
            cfg,
            &mut mem_leaves(),
        );
        let raw: Vec<_> = (0..100u32)
            .map(|i| stackbd_testkit::model::RawOp {
                kind: (i * 37 % 100) as u8,
                offset: i.wrapping_mul(2_654_435_761),
                len: 1 + i * 13 % 300,
                seed: i as u8,
            })
            .collect();
        let ops = resolve(&raw, stack.size);
        run(&mut stack, &ops).unwrap_or_else(|e| panic!("{e}\n{stack:?}"));
    }
}
