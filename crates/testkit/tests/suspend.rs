//! Suspend/resume under load: I/O keeps coming through repeated load/suspend/resume cycles that
//! change the table; nothing is lost or failed, and no I/O sees a mix of two tables.

use stackbd_core::{DataBuf, DevId, Engine, Op, ReactorConfig, Request, Status, SuspendOpts};
use stackbd_testkit::rng::Rng;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LEAF_SECTORS: u64 = 8192;
const VOL_SECTORS: u64 = 2 * 4096;

/// Two tables with the same geometry over different leaf pairs: `a*` leaves hold bytes tagged
/// 0xA0.., `b*` leaves 0xB0.., so a read shows which table served each sector.
fn table(side: char) -> String {
    format!("0 {VOL_SECTORS} striped 2 8 {side}0 0 {side}1 0")
}

fn setup() -> (Engine, DevId) {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    for (name, tag) in [("a0", 0xa0u8), ("a1", 0xa1), ("b0", 0xb0), ("b1", 0xb1)] {
        let id = e
            .add_leaf(
                name,
                Arc::new(stackbd_leaves::MemLeaf::new(LEAF_SECTORS * 512).unwrap()),
            )
            .unwrap();
        let fill = vec![tag; LEAF_SECTORS as usize * 512];
        assert_eq!(e.write_at(id, 0, &fill), Status::Ok);
    }
    let v = e.create("v", Some(&table('a'))).unwrap();
    (e, v)
}

struct Io {
    op: Op,
    sector: u64,
    buf: Vec<u8>,
}

#[test]
fn io_flows_through_repeated_table_swaps_without_loss_or_mixing() {
    let (mut e, v) = setup();
    let mut rng = Rng::new(99);
    let mut ios: HashMap<u64, Io> = HashMap::new();
    let mut next = 0u64;
    let mut side = 'a';
    let mut completed = 0u64;
    // Reads go to the lower half (never written); writes to disjoint slots in the upper half.
    let mut next_write_slot = 0u64;

    let submit_batch = |e: &mut Engine,
                        ios: &mut HashMap<u64, Io>,
                        next: &mut u64,
                        rng: &mut Rng,
                        slot: &mut u64,
                        n: usize| {
        for _ in 0..n {
            let tag = *next;
            *next += 1;
            let (op, sector, sectors) = if rng.chance(50) {
                let sectors = rng.range(9, 40) as u32; // always crosses a chunk
                (Op::Read, rng.range(0, VOL_SECTORS / 2 - 40), sectors)
            } else {
                let sector = VOL_SECTORS / 2 + *slot * 16;
                *slot = (*slot + 1) % (VOL_SECTORS / 2 / 16);
                (Op::Write, sector, 16)
            };
            let mut buf = vec![(tag & 0xff) as u8; sectors as usize * 512];
            // SAFETY: the buffer lives in `ios` until its completion is reaped; the Vec's heap
            // memory does not move when the map rehashes.
            let data = unsafe { DataBuf::from_slice(&mut buf) };
            e.submit(&Request::new(op, v, sector, sectors, data, tag))
                .unwrap();
            ios.insert(tag, Io { op, sector, buf });
        }
    };

    let check_done = |e: &mut Engine, ios: &mut HashMap<u64, Io>, completed: &mut u64| {
        while let Some(c) = e.reap() {
            assert_eq!(c.status, Status::Ok, "I/O {} failed", c.user_data);
            let io = ios
                .remove(&c.user_data)
                .expect("completion for an unknown I/O");
            if io.op == Op::Read {
                let first = io.buf[0] & 0xf0;
                assert!(
                    first == 0xa0 || first == 0xb0,
                    "read sees data of neither table: {:#x}",
                    io.buf[0]
                );
                assert!(
                    io.buf
                        .chunks(512)
                        .all(|s| s[0] & 0xf0 == first && s.iter().all(|&b| b == s[0])),
                    "read at {} saw a mix of two tables",
                    io.sector
                );
            }
            *completed += 1;
        }
    };

    for cycle in 0..60 {
        submit_batch(
            &mut e,
            &mut ios,
            &mut next,
            &mut rng,
            &mut next_write_slot,
            48,
        );
        // Let part of it run, so the suspend finds I/O both queued and in flight.
        e.reactor_mut().poll();
        submit_batch(
            &mut e,
            &mut ios,
            &mut next,
            &mut rng,
            &mut next_write_slot,
            16,
        );
        side = if side == 'a' { 'b' } else { 'a' };
        e.load("v", &table(side)).unwrap();
        e.suspend("v", SuspendOpts::default()).unwrap();
        assert_eq!(
            e.reactor().inflight(v),
            0,
            "suspend returned before draining"
        );
        // I/O arriving while suspended is held, not failed.
        submit_batch(
            &mut e,
            &mut ios,
            &mut next,
            &mut rng,
            &mut next_write_slot,
            16,
        );
        for _ in 0..10 {
            e.poll();
        }
        // Held: the 16 queued before the suspend (they had not entered the volume yet) and the
        // 16 submitted while suspended.
        assert_eq!(
            e.reactor().held(v),
            32,
            "cycle {cycle}: new I/O must be held while suspended"
        );
        check_done(&mut e, &mut ios, &mut completed);
        e.resume("v").unwrap();
        assert_eq!(e.table("v", false).unwrap().trim(), table(side));
        while e.reactor().outstanding() > 0 {
            e.poll();
            check_done(&mut e, &mut ios, &mut completed);
        }
        check_done(&mut e, &mut ios, &mut completed);
    }
    assert!(ios.is_empty(), "{} I/Os never completed", ios.len());
    assert_eq!(completed, next);
    assert_eq!(
        e.info("v").unwrap().event_nr,
        60,
        "one event per table swap"
    );
    assert_eq!(e.reactor().pool().in_use(), 0);
}

#[test]
fn acknowledged_writes_land_whole_under_exactly_one_table() {
    let (mut e, v) = setup();
    let mut side = 'a';
    let mut written: Vec<(u64, u8, char)> = Vec::new();
    for i in 0..200u64 {
        let sector = i * 24; // 24 sectors: crosses chunk boundaries of 8
        let tag = (i % 200) as u8 + 1;
        assert_eq!(e.write_at(v, sector, &vec![tag; 24 * 512]), Status::Ok);
        written.push((sector, tag, side));
        if i % 7 == 0 {
            side = if side == 'a' { 'b' } else { 'a' };
            e.reload("v", &table(side)).unwrap();
        }
    }
    // Read each write back through the table it was written under.
    for (sector, tag, s) in written {
        if e.table("v", false).unwrap().trim() != table(s) {
            e.reload("v", &table(s)).unwrap();
        }
        let mut buf = vec![0u8; 24 * 512];
        assert_eq!(e.read_at(v, sector, &mut buf), Status::Ok);
        assert!(
            buf.iter().all(|&b| b == tag),
            "write at {sector} under table {s} did not land whole"
        );
    }
}

#[test]
fn a_suspend_with_a_deadline_resumes_by_itself() {
    let (mut e, v) = setup();
    e.suspend(
        "v",
        SuspendOpts {
            deadline: Some(Duration::from_millis(50)),
            ..SuspendOpts::default()
        },
    )
    .unwrap();
    assert!(e.info("v").unwrap().suspended);
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` outlives the I/O, which is reaped below.
    let data = unsafe { DataBuf::from_slice(&mut buf) };
    e.submit(&Request::new(Op::Read, v, 0, 8, data, 1)).unwrap();
    let c = loop {
        e.poll();
        if let Some(c) = e.reap() {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the deadline never fired"
        );
    };
    assert_eq!(
        c.status,
        Status::Ok,
        "held I/O completes after the automatic resume, not failed"
    );
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert!(!e.info("v").unwrap().suspended);
}

#[test]
fn a_suspend_without_a_deadline_holds_until_resume() {
    let (mut e, v) = setup();
    e.suspend(
        "v",
        SuspendOpts {
            deadline: None,
            ..SuspendOpts::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: as above.
    let data = unsafe { DataBuf::from_slice(&mut buf) };
    e.submit(&Request::new(Op::Read, v, 0, 8, data, 1)).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(100) {
        e.poll();
        assert!(e.reap().is_none(), "held I/O completed while suspended");
    }
    e.resume("v").unwrap();
    e.poll();
    assert_eq!(e.reap().map(|c| c.status), Some(Status::Ok));
}
