//! Library API waits: NOWAIT never blocks, polled waits are refused up front where a leaf cannot
//! poll and poll only the queues their bio reached, interrupt waits sleep on the leaves.

use stackbd_core::{BioFlags, DataBuf, Engine, Op, ReactorConfig, Request, Status, Wait};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn mem_engine(pool: usize) -> Engine {
    let mut e = Engine::new(
        stackbd_targets::registry(),
        ReactorConfig {
            pool_capacity: pool,
            ..ReactorConfig::default()
        },
    );
    e.add_leaf(
        "m0",
        Arc::new(stackbd_leaves::MemLeaf::new(1 << 20).unwrap()),
    )
    .unwrap();
    e.create("v", Some("0 2048 linear m0 0")).unwrap();
    e
}

#[test]
fn nowait_gets_again_at_once_from_an_exhausted_pool() {
    let mut e = mem_engine(16);
    let v = e.dev_id("v").unwrap();
    let mut bufs = vec![vec![0u8; 512]; 32];
    let mut queued = 0;
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: `bufs` outlives every I/O; all are reaped below.
        let data = unsafe { DataBuf::from_slice(b) };
        match e.submit(&Request::new(Op::Read, v, i as u64, 1, data, i as u64)) {
            Ok(()) => queued += 1,
            Err(s) => {
                assert_eq!(s, Status::Again, "a full pool says Again");
                break;
            }
        }
    }
    assert!(
        queued > 0 && queued < 32,
        "the pool ran out ({queued} queued)"
    );
    let h = e.open_volume("v", Wait::Interrupt).unwrap();
    let mut one = [0u8; 512];
    // SAFETY: `one` outlives the call.
    let data = unsafe { DataBuf::from_slice(&mut one) };
    let mut req = Request::new(Op::Read, h.dev, 0, 1, data, 0);
    req.flags = BioFlags::NOWAIT;
    let start = Instant::now();
    assert_eq!(
        e.io_wait(&h, req),
        Status::Again,
        "NOWAIT returns Again instead of waiting"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(
        e.reactor().outstanding(),
        queued,
        "nothing was run to make room"
    );
    // Without NOWAIT the same request waits for room, then succeeds.
    req.flags = BioFlags::NONE;
    assert_eq!(e.io_wait(&h, req), Status::Ok);
    let mut reaped = 0;
    while reaped < queued {
        reaped += e.drive(|c| assert_eq!(c.status, Status::Ok)) as u64;
    }
}

fn file_engine(dir: &std::path::Path) -> Engine {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    for f in ["f0", "f1"] {
        let p = dir.join(format!("{f}.img"));
        std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
        let leaf = stackbd_leaves::FileLeaf::open(&p, Default::default()).unwrap();
        e.add_leaf(f, Arc::new(leaf)).unwrap();
    }
    e.add_leaf(
        "m0",
        Arc::new(stackbd_leaves::MemLeaf::new(8 << 20).unwrap()),
    )
    .unwrap();
    e.create("files", Some("0 32768 striped 2 64 f0 0 f1 0"))
        .unwrap();
    e.create("ram", Some("0 16384 linear m0 0")).unwrap();
    e
}

#[test]
fn a_polled_wait_is_refused_up_front_where_a_leaf_cannot_poll() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = file_engine(dir.path());
    // IOPOLL is not supported on this machine's files (the probe says so): refuse, naming it.
    let err = e
        .open_volume("files", Wait::Polled)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot be polled") && err.contains("'f0'"),
        "{err}"
    );
    assert_eq!(
        e.info("files").unwrap().open_count,
        0,
        "a refused open leaves nothing open"
    );
    // RAM completes inline, so it can always be polled.
    let h = e.open_volume("ram", Wait::Polled).unwrap();
    assert_eq!(e.write(&h, 8, &[7u8; 4096]), Status::Ok);
    let mut back = [0u8; 4096];
    assert_eq!(e.read(&h, 8, &mut back), Status::Ok);
    assert_eq!(back, [7u8; 4096]);
}

#[test]
fn a_bio_records_only_the_leaf_queues_it_reached() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = file_engine(dir.path());
    let v = e.dev_id("files").unwrap();
    let mut buf = vec![0u8; 128 * 512];
    let r = e.reactor_mut();
    // Inside the first chunk: stripe 0 only.
    // SAFETY: `buf` outlives each I/O, which is reaped before the next.
    let data = unsafe { DataBuf::from_slice(&mut buf[..8 * 512]) };
    let id = r
        .submit_id(&Request::new(Op::Read, v, 0, 8, data, 1))
        .unwrap();
    r.poll_touched(id);
    let one = r.touched(id);
    assert_eq!(one.count_ones(), 1, "one queue touched");
    while r.reap().is_none() {
        r.poll_touched(id);
    }
    // Across a chunk boundary: split, both stripes.
    // SAFETY: as above.
    let data = unsafe { DataBuf::from_slice(&mut buf[..128 * 512]) };
    let id = r
        .submit_id(&Request::new(Op::Read, v, 32, 128, data, 2))
        .unwrap();
    r.poll_touched(id);
    assert_eq!(
        r.touched(id).count_ones(),
        2,
        "the split reached both queues"
    );
    while r.reap().is_none() {
        r.poll_touched(id);
    }
}

#[test]
fn interrupt_waits_complete_io_on_file_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = file_engine(dir.path());
    let h = e.open_volume("files", Wait::Interrupt).unwrap();
    for i in 0..200u64 {
        let data = vec![(i % 251) as u8; 16 * 512];
        assert_eq!(e.write(&h, i * 40, &data), Status::Ok);
        let mut back = vec![0u8; 16 * 512];
        assert_eq!(e.read(&h, i * 40, &mut back), Status::Ok);
        assert_eq!(back, data);
    }
    e.close_volume(h);
    assert_eq!(e.info("files").unwrap().open_count, 0);
}
