//! Copy offload through stacks: each kind of copy takes the path DESIGN describes, and the
//! counters prove which (offloaded by a leaf, copied by the kernel between files, emulated).

use stackbd_core::copy::CopyOpts;
use stackbd_core::{CopyReport, DevId, Engine, ReactorConfig, Status};
use std::sync::Arc;

fn mem_engine() -> Engine {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    for m in ["m0", "m1"] {
        e.add_leaf(m, Arc::new(stackbd_leaves::MemLeaf::new(4 << 20).unwrap()))
            .unwrap(); // 8192 sectors
    }
    e
}

fn fill(e: &mut Engine, v: DevId, sector: u64, sectors: u64, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..sectors as usize * 512)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed ^ (i >> 9) as u8)
        .collect();
    assert_eq!(e.write_at(v, sector, &data), Status::Ok);
    data
}

fn read(e: &mut Engine, v: DevId, sector: u64, sectors: u64) -> Vec<u8> {
    let mut b = vec![0u8; sectors as usize * 512];
    assert_eq!(e.read_at(v, sector, &mut b), Status::Ok);
    b
}

fn copy(e: &mut Engine, v: DevId, src: u64, dst: u64, len: u64) -> CopyReport {
    let r = e
        .copy_with(v, src, dst, len, CopyOpts::default(), |_, _| true)
        .expect("copy");
    assert_eq!(r.bytes, len * 512);
    assert_eq!(
        r.offloaded_bytes + r.kernel_bytes + r.emulated_bytes,
        r.bytes,
        "every byte took one path: {r:?}"
    );
    r
}

#[test]
fn inside_one_leaf_the_copy_travels_down_and_the_leaf_does_it() {
    let mut e = mem_engine();
    e.create("lo", Some("0 8192 linear m0 0")).unwrap();
    let v = e.create("v", Some("0 4096 linear lo 2048")).unwrap();
    let data = fill(&mut e, v, 0, 300, 1);
    let r = copy(&mut e, v, 0, 1000, 300);
    assert_eq!(
        (r.offloaded_bytes, r.emulated_bytes),
        (300 * 512, 0),
        "{r:?}"
    );
    assert!(read(&mut e, v, 1000, 300) == data);
}

#[test]
fn across_linear_segments_on_one_leaf_the_copy_is_remapped_not_emulated() {
    let mut e = mem_engine();
    let v = e
        .create("v", Some("0 512 linear m0 0\n512 512 linear m0 4096"))
        .unwrap();
    let data = fill(&mut e, v, 100, 200, 2);
    let r = copy(&mut e, v, 100, 600, 200);
    assert_eq!(r.offloaded_bytes, 200 * 512, "{r:?}");
    assert!(read(&mut e, v, 600, 200) == data);
}

#[test]
fn across_two_leaves_the_layer_emulates() {
    let mut e = mem_engine();
    let v = e
        .create("v", Some("0 1024 linear m0 0\n1024 1024 linear m1 0"))
        .unwrap();
    let data = fill(&mut e, v, 0, 1024, 3);
    let r = copy(&mut e, v, 0, 1024, 1024);
    assert_eq!(
        (r.offloaded_bytes, r.emulated_bytes),
        (0, 1024 * 512),
        "{r:?}"
    );
    assert!(read(&mut e, v, 1024, 1024) == data);
}

#[test]
fn across_stripe_chunks_pieces_on_one_stripe_offload_and_the_others_emulate() {
    let mut e = mem_engine();
    let v = e.create("v", Some("0 4096 striped 2 8 m0 0 m1 0")).unwrap();
    let data = fill(&mut e, v, 0, 64, 4);
    // dst = src + 16: chunk k of the source and chunk k+2 of the destination are on one
    // stripe; with dst = src + 8 they never are.
    let r = copy(&mut e, v, 0, 2048, 64);
    assert!(
        r.offloaded_bytes > 0 && r.emulated_bytes == 0,
        "same stripe parity: {r:?}"
    );
    let r = copy(&mut e, v, 0, 3080, 64);
    assert!(
        r.offloaded_bytes == 0 && r.emulated_bytes == 64 * 512,
        "other stripe: {r:?}"
    );
    assert!(read(&mut e, v, 2048, 64) == data);
    assert!(read(&mut e, v, 3080, 64) == data);
    assert!(
        e.reactor().stats.splits > 0,
        "the copies were split at chunk boundaries"
    );
}

fn file_engine(dir: &std::path::Path) -> Engine {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    for f in ["f0", "f1"] {
        let p = dir.join(format!("{f}.img"));
        std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
        e.add_leaf(
            f,
            Arc::new(stackbd_leaves::FileLeaf::open(&p, Default::default()).unwrap()),
        )
        .unwrap();
    }
    e
}

#[test]
fn inside_one_file_the_leaf_copies_with_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = file_engine(dir.path());
    let v = e.create("v", Some("0 16384 linear f0 0")).unwrap();
    let data = fill(&mut e, v, 0, 2048, 5);
    let r = copy(&mut e, v, 0, 8192, 2048);
    assert_eq!(r.offloaded_bytes, 2048 * 512, "{r:?}");
    assert!(read(&mut e, v, 8192, 2048) == data);
}

#[test]
fn across_two_files_of_one_filesystem_the_kernel_copies_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = file_engine(dir.path());
    // Two volumes deep on each side, so the layer that sees two children must look down.
    e.create("a", Some("0 16384 linear f0 0")).unwrap();
    e.create("b", Some("0 16384 linear f1 0")).unwrap();
    let v = e
        .create("v", Some("0 8192 linear a 0\n8192 8192 linear b 0"))
        .unwrap();
    let data = fill(&mut e, v, 100, 3000, 6);
    let r = copy(&mut e, v, 100, 9000, 3000);
    assert_eq!((r.kernel_bytes, r.emulated_bytes), (3000 * 512, 0), "{r:?}");
    assert!(read(&mut e, v, 9000, 3000) == data);
}

#[test]
fn a_copy_past_the_end_is_refused_and_changes_nothing() {
    let mut e = mem_engine();
    let v = e.create("v", Some("0 1024 linear m0 0")).unwrap();
    let data = fill(&mut e, v, 0, 1024, 7);
    assert_eq!(
        e.copy(v, 1000, 0, 100),
        Status::OutOfRange,
        "source passes the end"
    );
    assert_eq!(
        e.copy(v, 0, 1000, 100),
        Status::OutOfRange,
        "destination passes the end"
    );
    assert_eq!(
        e.copy(v, u64::MAX - 10, 0, 100),
        Status::OutOfRange,
        "overflow"
    );
    assert!(read(&mut e, v, 0, 1024) == data);
    assert_eq!(
        e.reactor().stats.submitted,
        2,
        "only the fill and the read were submitted"
    );
}

#[test]
fn overlapping_copies_behave_as_memmove_both_ways() {
    let mut e = mem_engine();
    let v = e
        .create("v", Some("0 1024 linear m0 0\n1024 1024 linear m1 0"))
        .unwrap();
    let data = fill(&mut e, v, 900, 300, 8);
    // Up by 40 sectors, across the two leaves (emulated in pieces no longer than 40).
    copy(&mut e, v, 900, 940, 300);
    assert!(read(&mut e, v, 940, 300) == data);
    // And back down by 40.
    copy(&mut e, v, 940, 900, 300);
    assert!(read(&mut e, v, 900, 300) == data);
}

#[test]
fn zero_and_error_targets_answer_copies_as_they_answer_reads_and_writes() {
    let mut e = mem_engine();
    let v = e
        .create("v", Some("0 512 linear m0 0\n512 64 zero\n576 64 error"))
        .unwrap();
    fill(&mut e, v, 0, 512, 9);
    copy(&mut e, v, 512, 0, 64);
    assert!(
        read(&mut e, v, 0, 64).iter().all(|&b| b == 0),
        "copying from zero writes zeros"
    );
    assert_eq!(
        e.copy(v, 576, 100, 8),
        Status::IoError,
        "reading the error target fails"
    );
    assert_eq!(
        e.copy(v, 100, 580, 8),
        Status::IoError,
        "writing the error target fails"
    );
    let r = copy(&mut e, v, 100, 520, 8);
    assert_eq!(
        r.emulated_bytes,
        8 * 512,
        "onto the zero target: read, then dropped"
    );
}

#[test]
fn the_copy_engine_reports_progress_bounds_pieces_and_cancels() {
    let mut e = mem_engine();
    let v = e
        .create("v", Some("0 4096 linear m0 0\n4096 4096 linear m1 0"))
        .unwrap();
    fill(&mut e, v, 0, 4096, 10);
    let opts = CopyOpts {
        piece_sectors: 256,
        max_inflight: 2,
        emulate: false,
    };
    let mut seen = Vec::new();
    e.copy_with(v, 0, 4096, 4096, opts, |d, t| {
        seen.push((d, t));
        true
    })
    .unwrap();
    assert_eq!(seen.len(), 16, "one report per piece");
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "progress grows");
    assert_eq!(seen.last(), Some(&(4096, 4096)));
    // Cancel after the third piece: it stops early with Shutdown.
    let mut n = 0;
    let r = e.copy_with(v, 0, 4096, 4096, opts, |_, _| {
        n += 1;
        n < 3
    });
    assert_eq!(r, Err(Status::Shutdown));
    assert!(n < 16, "no new pieces after the cancel (saw {n})");
    assert_eq!(e.reactor().pool().in_use(), 0);
}

#[test]
fn forced_emulation_copies_the_same_bytes_the_slow_way() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = file_engine(dir.path());
    let v = e.create("v", Some("0 16384 linear f0 0")).unwrap();
    let data = fill(&mut e, v, 0, 3000, 12);
    let opts = CopyOpts {
        emulate: true,
        ..CopyOpts::default()
    };
    let r = e.copy_with(v, 0, 8000, 3000, opts, |_, _| true).unwrap();
    assert_eq!(
        (r.offloaded_bytes, r.kernel_bytes, r.emulated_bytes),
        (0, 0, 3000 * 512),
        "{r:?}"
    );
    assert!(read(&mut e, v, 8000, 3000) == data);
}
