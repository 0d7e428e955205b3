//! The dust target through the engine: bad blocks fail reads only while enabled, writes remap
//! them (after their write-fail count), and every message answers with dm-dust's text.

use stackbd_core::{DevId, Engine, ReactorConfig, Status};
use std::sync::Arc;

const LEAF_SECTORS: u64 = 2048;
const SECTOR: usize = 512;

fn pattern(i: usize) -> u8 {
    ((i * 7 + i / 512) % 200) as u8 + 20
}

fn expected(sector: u64, sectors: usize) -> Vec<u8> {
    let at = sector as usize * SECTOR;
    (at..at + sectors * SECTOR).map(pattern).collect()
}

fn engine() -> (Engine, DevId) {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    let leaf = e
        .add_leaf(
            "m0",
            Arc::new(stackbd_leaves::MemLeaf::new(LEAF_SECTORS * SECTOR as u64).unwrap()),
        )
        .unwrap();
    let init: Vec<u8> = (0..LEAF_SECTORS as usize * SECTOR).map(pattern).collect();
    assert_eq!(e.write_at(leaf, 0, &init), Status::Ok);
    (e, leaf)
}

/// Volume `v`: `0 1024 dust m0 <offset> 4096`.
fn rig(offset: u64) -> (Engine, DevId, DevId) {
    let (mut e, leaf) = engine();
    let v = e
        .create("v", Some(&format!("0 1024 dust m0 {offset} 4096")))
        .unwrap();
    (e, leaf, v)
}

fn msg(e: &mut Engine, m: &str) -> Result<String, String> {
    let argv: Vec<&str> = m.split_whitespace().collect();
    e.message("v", 0, &argv).map_err(|err| err.to_string())
}

/// The error text a refused message gets through the engine.
fn refused(reason: &str) -> Result<String, String> {
    Err(format!("'v': {reason}"))
}

fn ok() -> Result<String, String> {
    Ok(String::new())
}

fn read(e: &mut Engine, dev: DevId, sector: u64, sectors: usize) -> (Status, Vec<u8>) {
    let mut b = vec![0u8; sectors * SECTOR];
    let s = e.read_at(dev, sector, &mut b);
    (s, b)
}

fn leaf_bytes(e: &mut Engine, leaf: DevId, sector: u64, sectors: usize) -> Vec<u8> {
    let (s, b) = read(e, leaf, sector, sectors);
    assert_eq!(s, Status::Ok);
    b
}

#[test]
fn table_and_status_follow_enable_and_quiet() {
    let (mut e, _, _) = rig(0);
    assert_eq!(e.table("v", false).unwrap(), "0 1024 dust m0 0 4096\n");
    assert_eq!(e.status("v").unwrap(), "0 1024 dust m0 bypass verbose\n");
    assert_eq!(msg(&mut e, "enable"), ok());
    assert_eq!(
        e.status("v").unwrap(),
        "0 1024 dust m0 fail_read_on_bad_block verbose\n"
    );
    assert_eq!(msg(&mut e, "quiet"), ok());
    assert_eq!(
        e.status("v").unwrap(),
        "0 1024 dust m0 fail_read_on_bad_block quiet\n"
    );
    assert_eq!(msg(&mut e, "QUIET"), ok());
    assert_eq!(msg(&mut e, "disable"), ok());
    assert_eq!(e.status("v").unwrap(), "0 1024 dust m0 bypass verbose\n");
}

#[test]
fn bad_block_reads_fail_only_while_enabled() {
    let (mut e, _, v) = rig(0);
    assert_eq!(msg(&mut e, "addbadblock 3"), ok());
    // Disabled: bypass.
    assert_eq!(read(&mut e, v, 24, 8), (Status::Ok, expected(24, 8)));
    assert_eq!(msg(&mut e, "enable"), ok());
    for (sector, sectors) in [(24, 8), (24, 1), (31, 1), (16, 24), (0, 256)] {
        assert_eq!(
            read(&mut e, v, sector, sectors).0,
            Status::IoError,
            "{sector}+{sectors}"
        );
    }
    for (sector, sectors) in [(0u64, 24usize), (32, 8), (23, 1), (32, 256)] {
        assert_eq!(
            read(&mut e, v, sector, sectors),
            (Status::Ok, expected(sector, sectors)),
            "{sector}+{sectors}"
        );
    }
    // Reads leave the list alone.
    assert_eq!(
        msg(&mut e, "queryblock 3"),
        Ok("dust_query_block: block 3 found in badblocklist".into())
    );
    assert_eq!(msg(&mut e, "disable"), ok());
    assert_eq!(read(&mut e, v, 24, 8), (Status::Ok, expected(24, 8)));
}

#[test]
fn a_write_while_disabled_keeps_the_bad_block() {
    let (mut e, leaf, v) = rig(0);
    assert_eq!(msg(&mut e, "addbadblock 3"), ok());
    assert_eq!(e.write_at(v, 24, &[4u8; 512]), Status::Ok);
    assert_eq!(leaf_bytes(&mut e, leaf, 24, 1), vec![4u8; 512]);
    assert_eq!(
        msg(&mut e, "countbadblocks"),
        Ok("countbadblocks: 1 badblock(s) found".into())
    );
}

#[test]
fn a_write_removes_bad_blocks_and_goes_through() {
    let (mut e, leaf, v) = rig(0);
    for m in ["addbadblock 3", "addbadblock 5", "addbadblock 6", "enable"] {
        assert_eq!(msg(&mut e, m), ok());
    }
    assert_eq!(e.write_at(v, 25, &[1u8; 512]), Status::Ok);
    assert_eq!(leaf_bytes(&mut e, leaf, 24, 3), {
        let mut w = expected(24, 3);
        w[512..1024].fill(1);
        w
    });
    assert_eq!(
        msg(&mut e, "queryblock 3"),
        Ok("dust_query_block: block 3 not found in badblocklist".into())
    );
    // The rest of the block reads again; the data is what the device holds.
    assert_eq!(read(&mut e, v, 24, 1), (Status::Ok, expected(24, 1)));
    // One write over blocks 4..=7 remaps both bad ones in it.
    assert_eq!(e.write_at(v, 32, &[2u8; 32 * SECTOR]), Status::Ok);
    assert_eq!(leaf_bytes(&mut e, leaf, 32, 32), vec![2u8; 32 * SECTOR]);
    assert_eq!(
        msg(&mut e, "listbadblocks"),
        Ok("No blocks in badblocklist".into())
    );
    assert_eq!(
        read(&mut e, v, 40, 16),
        (Status::Ok, vec![2u8; 16 * SECTOR])
    );
    // Discards and write-zeroes are writes too.
    assert_eq!(msg(&mut e, "addbadblock 9"), ok());
    assert_eq!(e.write_zeroes(v, 72, 8), Status::Ok);
    assert_eq!(
        msg(&mut e, "countbadblocks"),
        Ok("countbadblocks: 0 badblock(s) found".into())
    );
    assert_eq!(leaf_bytes(&mut e, leaf, 72, 8), vec![0u8; 8 * SECTOR]);
    assert_eq!(e.flush(v), Status::Ok);
}

#[test]
fn write_fail_count_fails_that_many_writes_first() {
    let (mut e, leaf, v) = rig(0);
    assert_eq!(msg(&mut e, "addbadblock 5 2"), ok());
    assert_eq!(msg(&mut e, "enable"), ok());
    for _ in 0..2 {
        assert_eq!(e.write_at(v, 40, &[7u8; 512]), Status::IoError);
        assert_eq!(leaf_bytes(&mut e, leaf, 40, 1), expected(40, 1));
        assert_eq!(read(&mut e, v, 40, 1).0, Status::IoError);
    }
    assert_eq!(e.write_at(v, 40, &[7u8; 512]), Status::Ok);
    assert_eq!(read(&mut e, v, 40, 1), (Status::Ok, vec![7u8; 512]));
    assert_eq!(
        msg(&mut e, "countbadblocks"),
        Ok("countbadblocks: 0 badblock(s) found".into())
    );
    // Across blocks the bio is split per block, as dm does: the others are written, the
    // failing block is not, and the caller sees the error.
    assert_eq!(msg(&mut e, "addbadblock 5 1"), ok());
    assert_eq!(e.write_at(v, 32, &[8u8; 24 * SECTOR]), Status::IoError);
    let got = leaf_bytes(&mut e, leaf, 32, 24);
    assert_eq!(&got[..8 * SECTOR], &vec![8u8; 8 * SECTOR][..]);
    let mut block5 = vec![7u8; 512];
    block5.extend(expected(41, 7));
    assert_eq!(&got[8 * SECTOR..16 * SECTOR], &block5[..]);
    assert_eq!(&got[16 * SECTOR..], &vec![8u8; 8 * SECTOR][..]);
}

#[test]
fn blocks_are_numbered_on_the_device() {
    // Offset 16 sectors: volume sector 8 is device sector 24, block 3.
    let (mut e, _, v) = rig(16);
    assert_eq!(msg(&mut e, "addbadblock 3"), ok());
    assert_eq!(msg(&mut e, "enable"), ok());
    assert_eq!(read(&mut e, v, 8, 8).0, Status::IoError);
    assert_eq!(read(&mut e, v, 0, 8), (Status::Ok, expected(16, 8)));
    assert_eq!(read(&mut e, v, 16, 8), (Status::Ok, expected(32, 8)));
}

#[test]
fn messages_reply_as_dm_dust() {
    let (mut e, _, _) = rig(0);
    let cases: &[(&str, Result<String, String>)] = &[
        ("addbadblock 60", ok()),
        (
            "addbadblock 60",
            refused("dust_add_block: block 60 already in badblocklist"),
        ),
        (
            "queryblock 60",
            Ok("dust_query_block: block 60 found in badblocklist".into()),
        ),
        (
            "queryblock 61",
            Ok("dust_query_block: block 61 not found in badblocklist".into()),
        ),
        (
            "countbadblocks",
            Ok("countbadblocks: 1 badblock(s) found".into()),
        ),
        ("AddBadBlock 7 3", ok()),
        ("listbadblocks", Ok("7\n60\n".into())),
        (
            "removebadblock 61",
            refused("dust_remove_block: block 61 not found in badblocklist"),
        ),
        ("removebadblock 60", ok()),
        (
            "clearbadblocks",
            Ok("dust_clear_badblocks: badblocks cleared".into()),
        ),
        (
            "countbadblocks",
            Ok("countbadblocks: 0 badblock(s) found".into()),
        ),
        ("listbadblocks", Ok("No blocks in badblocklist".into())),
        (
            "clearbadblocks",
            Ok("dust_clear_badblocks: no badblocks found".into()),
        ),
        // 2048 sectors / 8 per block: dm accepts up to and including 256.
        ("addbadblock 256", ok()),
        (
            "addbadblock 257",
            refused("selected block value out of range"),
        ),
        (
            "queryblock 18446744073709551615",
            refused("selected block value out of range"),
        ),
        (
            "addbadblock 9 256",
            refused("selected write fail count out of range"),
        ),
        (
            "addbadblock 300 1",
            refused("selected block value out of range"),
        ),
        (
            "addbadblock",
            refused("addbadblock requires an additional argument"),
        ),
        (
            "removebadblock",
            refused("removebadblock requires an additional argument"),
        ),
        (
            "queryblock",
            refused("queryblock requires an additional argument"),
        ),
        ("frob", refused("unrecognized message 'frob' received")),
        (
            "enable 3",
            refused("unrecognized message 'enable' received"),
        ),
        (
            "queryblock 1 2",
            refused("unrecognized message 'queryblock' received"),
        ),
        (
            "addbadblock 1 2 3",
            refused("invalid number of arguments '4'"),
        ),
        (
            "addbadblock x",
            refused("'x' is not a non-negative integer"),
        ),
        (
            "addbadblock 1 -1",
            refused("'-1' is not a non-negative integer"),
        ),
        (
            "addbadblock 99999999999999999999",
            refused("'99999999999999999999' is out of range"),
        ),
        (
            "countbadblocks",
            Ok("countbadblocks: 1 badblock(s) found".into()),
        ),
    ];
    for (m, want) in cases {
        assert_eq!(&msg(&mut e, m), want, "{m}");
    }
}

#[test]
fn bad_tables_get_dms_errors() {
    let (mut e, _) = engine();
    for (args, why) in [
        ("m0 0", "Invalid argument count"),
        ("m0 0 4096 1", "Invalid argument count"),
        ("m0 0 0", "Invalid block size parameter"),
        ("m0 0 x", "Invalid block size parameter"),
        ("m0 0 256", "Block size must be at least 512"),
        ("m0 0 1536", "Block size must be a power of 2"),
        // Larger than the 1024-sector target.
        ("m0 0 1048576", "Block size is too large"),
        ("m0 0 4294967296", "Invalid block size parameter"),
        ("m0 x 4096", "Invalid device offset sector"),
        ("m0 1025 4096", "passes the end"),
        ("nope 0 4096", "unknown device 'nope'"),
    ] {
        let err = e
            .create("w", Some(&format!("0 1024 dust {args}")))
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{args}: {err}");
    }
    // The largest block that fits the target.
    e.create("w", Some("0 1024 dust m0 0 524288")).unwrap();
    assert_eq!(e.table("w", false).unwrap(), "0 1024 dust m0 0 524288\n");
}

#[test]
fn copies_through_dust_see_bad_blocks() {
    let (mut e, leaf, v) = rig(0);
    assert_eq!(msg(&mut e, "addbadblock 2"), ok());
    assert_eq!(msg(&mut e, "enable"), ok());
    // Source on a bad block: the copy's read fails.
    assert_eq!(e.copy(v, 16, 64, 8), Status::IoError);
    assert_eq!(leaf_bytes(&mut e, leaf, 64, 8), expected(64, 8));
    // Destination on a bad block: the copy's write remaps it.
    assert_eq!(e.copy(v, 0, 16, 8), Status::Ok);
    assert_eq!(leaf_bytes(&mut e, leaf, 16, 8), expected(0, 8));
    assert_eq!(
        msg(&mut e, "countbadblocks"),
        Ok("countbadblocks: 0 badblock(s) found".into())
    );
}
