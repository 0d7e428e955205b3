//! Small, syscall-free runs of the bio, frame, pool and split paths, sized for Miri:
//! `cargo +nightly miri test -p stackbd-testkit --test split_small`.

use stackbd_core::{DataBuf, Engine, Op, ReactorConfig, Request, Status};
use std::sync::Arc;

fn engine(cfg: ReactorConfig) -> Engine {
    let mut e = Engine::new(stackbd_targets::registry(), cfg);
    for m in ["m0", "m1", "m2"] {
        e.add_leaf(
            m,
            Arc::new(stackbd_leaves::MemLeaf::new(64 * 1024).unwrap()),
        )
        .unwrap(); // 128 sectors
    }
    e
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect()
}

#[test]
fn splits_at_every_level_reassemble_reads_and_writes() {
    let cfg = ReactorConfig {
        pool_capacity: 16,
        per_io_bytes: 0,
        fallback_chunks: 2,
        fallback_chunk_bytes: 64,
    };
    let mut e = engine(cfg);
    e.create("lo", Some("0 64 linear m0 0\n64 64 linear m1 0"))
        .unwrap();
    e.create(
        "mid",
        Some("0 96 striped 3 8 lo 0 m2 0 m1 64\n96 16 zero\n112 16 linear m2 32"),
    )
    .unwrap();
    let top = e.create("top", Some("0 120 linear mid 8")).unwrap();
    let data = pattern(100 * 512, 3);
    assert_eq!(e.write_at(top, 7, &data), Status::Ok);
    let mut back = vec![0u8; 100 * 512];
    assert_eq!(e.read_at(top, 7, &mut back), Status::Ok);
    // top 7.. maps to mid 15..115: mid 96..112 is zero (drops writes, reads zeros).
    let zero_from = (96 - 15) * 512;
    let zero_to = (112 - 15) * 512;
    assert_eq!(&back[..zero_from], &data[..zero_from]);
    assert!(back[zero_from..zero_to].iter().all(|&b| b == 0));
    assert_eq!(&back[zero_to..], &data[zero_to..]);
    assert!(e.reactor().stats.splits > 10);
    assert_eq!(e.reactor().pool().in_use(), 0);
}

/// Seed 000: a bio allocated before a reload deepened the stack does not fit; its frames extend
/// into the fallback and the too-small counter goes up; the reload notified the pool, so bios
/// allocated afterwards fit again.
#[test]
fn a_reload_that_deepens_the_stack_overflows_old_bios_and_notifies_the_pool() {
    let mut e = engine(ReactorConfig {
        per_io_bytes: 0,
        fallback_chunks: 1,
        fallback_chunk_bytes: 32,
        ..ReactorConfig::default()
    });
    e.create("lo", Some("0 128 linear m0 0")).unwrap();
    let top = e.create("top", Some("0 128 linear lo 0")).unwrap();
    let small = e.reactor().pool().frame_bytes();
    let data = pattern(64 * 512, 5);
    assert_eq!(e.write_at(top, 0, &data), Status::Ok);
    // Hold a read at `top`; its bio is allocated now, with the small frame area.
    e.suspend("top", stackbd_core::SuspendOpts::default())
        .unwrap();
    let mut held = vec![0u8; 64 * 512];
    // SAFETY: `held` outlives the I/O, which is reaped below.
    let buf = unsafe { DataBuf::from_slice(&mut held) };
    e.submit(&Request::new(Op::Read, top, 0, 64, buf, 1))
        .unwrap();
    e.poll();
    // Deepen `lo` with two more levels that each split the read (one-stripe tables keep the data
    // where it was): lo cuts at 16-sector chunks, d2 cuts those again at 8.
    e.create("d1", Some("0 128 linear m0 0")).unwrap();
    e.create("d2", Some("0 128 striped 1 8 d1 0")).unwrap();
    e.reload("lo", "0 128 striped 1 16 d2 0").unwrap();
    assert!(
        e.reactor().pool().frame_bytes() > small,
        "the reload notified the pool"
    );
    assert!(e.reactor().pool().stats.notifications > 0);
    let overflows = e.reactor().fallback().overflows;
    e.resume("top").unwrap();
    e.poll();
    assert_eq!(e.reap().map(|c| c.status), Some(Status::Ok));
    assert_eq!(held, data);
    assert!(
        e.reactor().fallback().overflows > overflows,
        "the old bio's frames did not fit"
    );
    // New bios are sized for the deeper stack and fit.
    let overflows = e.reactor().fallback().overflows;
    let mut back = vec![0u8; 64 * 512];
    assert_eq!(e.read_at(top, 0, &mut back), Status::Ok);
    assert_eq!(back, data);
    assert_eq!(e.reactor().fallback().overflows, overflows);
}

#[test]
fn the_first_error_wins_and_other_pieces_still_complete() {
    let mut e = engine(ReactorConfig::default());
    let v = e
        .create("v", Some("0 16 linear m0 0\n16 8 error\n24 16 linear m1 0"))
        .unwrap();
    let data = pattern(40 * 512, 9);
    assert_eq!(e.write_at(v, 0, &data), Status::IoError);
    let mut back = vec![0u8; 16 * 512];
    assert_eq!(e.read_at(v, 24, &mut back), Status::Ok);
    assert_eq!(
        back,
        &data[24 * 512..],
        "the piece after the error was written"
    );
    assert_eq!(e.flush(v), Status::Ok, "flushes skip the error target");
    assert_eq!(e.reactor().pool().in_use(), 0);
}

#[test]
fn queued_io_with_discard_and_write_zeroes() {
    let mut e = engine(ReactorConfig {
        pool_capacity: 16,
        ..ReactorConfig::default()
    });
    let v = e
        .create("v", Some("0 192 striped 3 8 m0 0 m1 0 m2 0"))
        .unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..6).map(|i| pattern(24 * 512, i as u8)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: `bufs` outlives every I/O, all reaped below before it is read.
        let data = unsafe { DataBuf::from_slice(b) };
        e.submit(&Request::new(
            Op::Write,
            v,
            i as u64 * 24 + 4,
            24,
            data,
            i as u64,
        ))
        .unwrap();
    }
    let mut done = 0;
    while done < 6 {
        e.poll();
        while let Some(c) = e.reap() {
            assert_eq!(c.status, Status::Ok);
            done += 1;
        }
    }
    assert_eq!(e.discard(v, 10, 20), Status::Ok);
    assert_eq!(e.write_zeroes(v, 50, 7), Status::Ok);
    let mut back = vec![0u8; 24 * 512];
    assert_eq!(e.read_at(v, 4, &mut back), Status::Ok);
    assert_eq!(&back[..6 * 512], &bufs[0][..6 * 512]);
    assert!(back[6 * 512..].iter().all(|&b| b == 0), "discarded");
    assert_eq!(e.read_at(v, 28, &mut back), Status::Ok);
    assert!(
        back[..2 * 512].iter().all(|&b| b == 0),
        "28..30 are inside the discard of 10..30"
    );
    assert_eq!(&back[2 * 512..22 * 512], &bufs[1][2 * 512..22 * 512]);
    assert!(back[22 * 512..].iter().all(|&b| b == 0), "50..57 zeroed");
}

#[test]
fn copies_remap_emulate_and_memmove() {
    let mut e = engine(ReactorConfig::default());
    let v = e
        .create("v", Some("0 64 linear m0 0\n64 64 striped 2 8 m1 0 m2 0"))
        .unwrap();
    let data = pattern(40 * 512, 11);
    assert_eq!(e.write_at(v, 10, &data), Status::Ok);
    // Across targets and leaves (emulated), then overlapping (memmove, in ordered pieces).
    assert_eq!(e.copy(v, 10, 70, 40), Status::Ok);
    assert_eq!(e.copy(v, 10, 20, 40), Status::Ok);
    let mut back = vec![0u8; 40 * 512];
    assert_eq!(e.read_at(v, 70, &mut back), Status::Ok);
    assert_eq!(back, data);
    assert_eq!(e.read_at(v, 20, &mut back), Status::Ok);
    assert_eq!(back, data);
    let s = e.reactor().stats;
    assert!(
        s.copy_emulated_bytes > 0 && s.copy_offloaded_bytes > 0,
        "{s:?}"
    );
    assert_eq!(e.reactor().pool().in_use(), 0);
}

/// `rq-linear <device> <offset>`: linear, but request-based, so the volume has a request queue
/// (multipath is request-based too, but starts a checker thread; this keeps Miri to one thread).
#[derive(Debug)]
struct RqLinear {
    dev: stackbd_core::DevRef,
    offset: u64,
}

impl RqLinear {
    fn ctor(
        cx: &stackbd_core::CtorCx<'_>,
        args: &[&str],
    ) -> Result<Box<dyn stackbd_core::Target>, stackbd_core::ArgError> {
        let offset = stackbd_core::target::parse_num::<u64>("offset", args[1])?;
        let (dev, _) = cx.device("device", args[0], offset, cx.len)?;
        Ok(Box::new(RqLinear { dev, offset }))
    }
}

impl stackbd_core::Target for RqLinear {
    fn kind(&self) -> &'static str {
        "rq-linear"
    }
    fn map(
        &self,
        bio: &mut stackbd_core::Bio,
        _cx: &mut stackbd_core::TargetCx<'_>,
    ) -> stackbd_core::MapResult {
        bio.dev = self.dev.id;
        bio.sector += self.offset;
        stackbd_core::MapResult::Remapped
    }
    fn limits(
        &self,
        child: &dyn Fn(stackbd_core::DevId) -> stackbd_core::Limits,
    ) -> stackbd_core::Limits {
        let mut l = stackbd_core::Limits::TOP;
        l.stack(&child(self.dev.id));
        l
    }
    fn devices(&self) -> Vec<stackbd_core::DevId> {
        vec![self.dev.id]
    }
    fn args(&self) -> String {
        format!("{} {}", self.dev, self.offset)
    }
    fn request_based(&self) -> bool {
        true
    }
}

#[test]
fn request_queue_merges_into_bounce_buffers_and_back() {
    let mut reg = stackbd_targets::registry();
    reg.register("rq-linear", RqLinear::ctor);
    let mut e = Engine::new(
        reg,
        ReactorConfig {
            pool_capacity: 32,
            ..ReactorConfig::default()
        },
    );
    e.add_leaf(
        "m0",
        Arc::new(stackbd_leaves::MemLeaf::new(64 * 1024).unwrap()),
    )
    .unwrap();
    let v = e
        .create("v", Some("0 64 rq-linear m0 64\n64 64 rq-linear m0 0"))
        .unwrap();
    // Eight 8-sector writes, neighbours, across the target boundary at 64: two requests.
    let run = |e: &mut Engine, op: Op, bufs: &mut [Vec<u8>]| {
        for (i, b) in bufs.iter_mut().enumerate() {
            // SAFETY: `bufs` outlives the I/O, all reaped below before it is read.
            let data = unsafe { DataBuf::from_slice(b) };
            e.submit(&Request::new(op, v, 32 + i as u64 * 8, 8, data, i as u64))
                .unwrap();
        }
        let mut done = 0;
        while done < bufs.len() {
            e.poll();
            while let Some(c) = e.reap() {
                assert_eq!(c.status, Status::Ok);
                done += 1;
            }
        }
    };
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|i| pattern(8 * 512, i as u8)).collect();
    let before = e.reactor().stats;
    run(&mut e, Op::Write, &mut bufs);
    assert_eq!(e.reactor().stats.rq_requests - before.rq_requests, 2);
    let mut back: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 8 * 512]).collect();
    run(&mut e, Op::Read, &mut back);
    assert_eq!(
        back, bufs,
        "each bio read its own bytes out of the merged request"
    );
    assert_eq!(e.reactor().stats.rq_merges - before.rq_merges, 12);
    assert_eq!(e.reactor().pool().in_use(), 0);
}
