//! The file leaf's data path allocates nothing per I/O in steady state (DESIGN: "an I/O costs
//! zero heap allocations"), buffered and O_DIRECT with bounces alike. A counting allocator
//! counts this thread's allocations only, so other tests running beside it do not disturb it.

use stackbd_core::{DataBuf, Engine, Leaf, Op, ReactorConfig, Request, Status};
use stackbd_leaves::file::{FileLeaf, FileOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

struct Counting;

thread_local! {
    static COUNT: Cell<Option<u64>> = const { Cell::new(None) };
}

// SAFETY: forwards to the system allocator; the bookkeeping is a thread-local counter that
// itself never allocates (a const-initialised `Cell`).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get().map(|n| n + 1)));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get().map(|n| n + 1)));
        // SAFETY: forwarded.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Allocations made on this thread while `f` runs.
fn count(f: impl FnOnce()) -> u64 {
    COUNT.with(|c| c.set(Some(0)));
    f();
    COUNT.with(|c| c.replace(None)).unwrap()
}

fn steady_state(direct: bool, skew: usize) {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(8 << 20).unwrap();
    let leaf = FileLeaf::open(
        file.path(),
        FileOptions {
            direct,
            queue_depth: 4,
            ..FileOptions::default()
        },
    )
    .unwrap();
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    e.add_leaf("f0", Arc::new(leaf.clone())).unwrap();
    let v = e
        .create("v", Some(&format!("0 {} linear f0 0", leaf.size())))
        .unwrap();
    let mut wbuf = vec![0xa5u8; 64 * 1024 + 8192];
    let mut rbuf = vec![0u8; 64 * 1024 + 8192];
    let base = (4096 - wbuf.as_ptr() as usize % 4096) % 4096 + skew;
    let rbase = (4096 - rbuf.as_ptr() as usize % 4096) % 4096 + skew;
    let mut round = |e: &mut Engine, i: u64| {
        let sector = (i * 136) % 16000;
        let w = &mut wbuf[base..base + 64 * 1024];
        w[0] = i as u8;
        assert_eq!(e.write_at(v, sector, w), Status::Ok);
        let r = &mut rbuf[rbase..rbase + 64 * 1024];
        assert_eq!(e.read_at(v, sector, r), Status::Ok);
        assert_eq!(r[0], i as u8);
        // A batch deeper than the ring, so the backlog is used too.
        let mut reqs = [None; 8];
        for (k, slot) in reqs.iter_mut().enumerate() {
            let piece = &mut rbuf[rbase + k * 8192..rbase + (k + 1) * 8192];
            // SAFETY: `rbuf` outlives the batch, which is polled to completion below.
            let d = unsafe { DataBuf::from_slice(piece) };
            *slot = Some(Request::new(
                Op::Read,
                v,
                sector + k as u64 * 16,
                16,
                d,
                k as u64,
            ));
        }
        for r in reqs.iter().flatten() {
            e.submit(r).unwrap();
        }
        let mut left = reqs.len();
        while left > 0 {
            e.poll();
            while let Some(c) = e.reap() {
                assert_eq!(c.status, Status::Ok);
                left -= 1;
            }
        }
        assert_eq!(e.flush(v), Status::Ok);
    };
    for i in 0..50 {
        round(&mut e, i);
    }
    let n = count(|| {
        for i in 50..300 {
            round(&mut e, i);
        }
    });
    assert_eq!(
        n, 0,
        "direct={direct} skew={skew}: {n} allocations in steady state"
    );
    if direct && skew != 0 {
        assert!(leaf.stats().bounces > 0);
    }
    assert!(leaf.stats().backlogged > 0);
}

#[test]
fn no_heap_allocation_per_io_in_steady_state() {
    let n = count(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(10))));
    assert_eq!(n, 1, "the counter counts");
    steady_state(false, 0);
    steady_state(true, 0);
    steady_state(true, 1);
}
