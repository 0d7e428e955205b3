//! A full COW device: `P` invalidates the snapshot (its I/O fails, the header says invalid, a
//! restart finds it invalid); `PO` reports `Overflow` when the snapshot's own write finds no
//! room and keeps serving what it holds. The origin and the other snapshot keep working.

mod snapshot_common;

use snapshot_common::*;
use stackbd_core::Status;

const SECTORS: u64 = 2048;
/// Header, one area and four data chunks of 16 sectors.
const SMALL_COW: u64 = 16 * 6;

#[test]
fn a_full_cow_invalidates_a_persistent_snapshot() {
    let mut r = Rig::with_cows(SECTORS, &[SMALL_COW, 4096]);
    let before = r.read(r.base, 0, SECTORS);
    let s0 = r.snapshot("s0", "cow0", "P", 16);
    let s1 = r.snapshot("s1", "cow1", "P", 16);
    let o = r.o;
    for c in 0..4u64 {
        assert_eq!(r.e.write_at(o, c * 16, &[1u8; SS]), Status::Ok);
    }
    assert_eq!(
        r.e.status("s0").unwrap(),
        format!("0 {SECTORS} snapshot 96/96 32\n")
    );
    assert_eq!(r.read(s0, 0, 64), before[..64 * SS].to_vec());
    // The fifth chunk does not fit: s0 is invalid, the write itself goes on.
    assert_eq!(r.e.write_at(o, 4 * 16, &[2u8; SS]), Status::Ok);
    assert_eq!(
        r.e.status("s0").unwrap(),
        format!("0 {SECTORS} snapshot Invalid\n")
    );
    let mut b = vec![0u8; SS];
    assert_eq!(r.e.read_at(s0, 0, &mut b), Status::IoError);
    assert_eq!(r.e.write_at(s0, 0, &b), Status::IoError);
    // The origin and the other snapshot are fine.
    assert_eq!(r.e.write_at(o, 100 * 16, &[3u8; SS]), Status::Ok);
    let now = r.read(o, 0, SECTORS);
    assert_eq!(&now[64 * SS..65 * SS], &[2u8; SS][..]);
    assert_eq!(&now[1600 * SS..1601 * SS], &[3u8; SS][..]);
    assert_eq!(r.read(s1, 0, SECTORS), before);
    assert!(r.e.status("s1").unwrap().contains('/'));
    // On disk: the header says invalid, and a restart agrees.
    assert!(!dm_read(&r.leaf_bytes("cow0")).unwrap().valid);
    let mut r2 = r.reboot();
    let s0 = r2.snapshot("s0", "cow0", "P", 16);
    assert_eq!(r2.e.read_at(s0, 0, &mut b), Status::IoError);
    assert_eq!(
        r2.e.status("s0").unwrap(),
        format!("0 {SECTORS} snapshot Invalid\n")
    );
    let o = r2.o;
    assert_eq!(r2.e.write_at(o, 0, &[4u8; SS]), Status::Ok);
}

#[test]
fn a_full_cow_overflows_a_po_snapshot() {
    let mut r = Rig::with_cows(SECTORS, &[SMALL_COW, 4096]);
    let before = r.read(r.base, 0, SECTORS);
    let s0 = r.snapshot("s0", "cow0", "PO", 16);
    let s1 = r.snapshot("s1", "cow1", "P", 16);
    let mut want = before.clone();
    for c in 0..4u64 {
        assert_eq!(r.e.write_at(s0, c * 16 + 1, &[9u8; SS]), Status::Ok);
        want[(c as usize * 16 + 1) * SS..(c as usize * 16 + 2) * SS].fill(9);
    }
    // The fifth chunk of the snapshot's own writes: refused, and the snapshot says Overflow.
    assert_eq!(r.e.write_at(s0, 4 * 16, &[9u8; SS]), Status::IoError);
    assert_eq!(
        r.e.status("s0").unwrap(),
        format!("0 {SECTORS} snapshot Overflow\n")
    );
    // What it holds still reads, and rewrites of its chunks still work.
    assert_eq!(r.read(s0, 0, SECTORS), want);
    assert_eq!(r.e.write_at(s0, 2, &[8u8; SS]), Status::Ok);
    want[2 * SS..3 * SS].fill(8);
    assert_eq!(r.read(s0, 0, SECTORS), want);
    // Origin writes to chunks s0 already holds need no room; the origin and s1 keep working.
    let o = r.o;
    assert_eq!(r.e.write_at(o, 0, &[5u8; SS]), Status::Ok);
    assert_eq!(r.read(s0, 0, SECTORS), want);
    assert_eq!(r.read(s1, 0, SECTORS), before);
    assert_eq!(r.read(o, 0, 1), vec![5u8; SS]);
}
