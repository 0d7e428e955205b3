//! The raid target (raid1) through the engine: mirrored writes, leg failure and recovery with
//! an incremental (bitmap) resync, check, the on-disk superblock and bitmap (read by a
//! test-side reader and by `mdadm -X`), refused tables and messages.

#[path = "raid_util.rs"]
mod util;

use stackbd_core::Status;
use std::time::Duration;
use util::*;

const SECTORS: u64 = 8192; // 4 MiB
const REGION: &str = "128"; // 64 KiB regions: 64 of them

#[test]
fn mirrors_writes_and_reads_back() {
    let mut r = Rig::new(2, SECTORS, &["nosync", "region_size", REGION]);
    for k in 0..40u64 {
        let data = pattern(k, 8 * SECTOR);
        assert_eq!(r.write((k * 97) % (SECTORS - 8), &data), Status::Ok);
    }
    for k in 0..40u64 {
        let (s, b) = r.read((k * 97) % (SECTORS - 8), 8);
        assert_eq!(s, Status::Ok);
        // Later writes may overlap earlier ones; the last one wins.
        if k == 39 {
            assert_eq!(b, pattern(k, 8 * SECTOR));
        }
    }
    r.assert_legs_identical();
    assert_eq!(
        r.status(),
        format!("0 {SECTORS} raid raid1 2 AA {SECTORS}/{SECTORS} idle 0 0 -")
    );
    assert_eq!(
        r.e.table("r", false).unwrap(),
        format!("0 {SECTORS} raid raid1 4 0 nosync region_size 128 2 meta0 d0 meta1 d1\n")
    );
}

#[test]
fn fresh_set_resyncs_in_full_then_check_is_clean() {
    let mut r = Rig::new(2, SECTORS, &["region_size", REGION]);
    // Leg 0 has data the new mirror must get.
    let d0 = r.data_leaf[0];
    assert_eq!(
        r.e.write_at(d0, 0, &pattern(7, SECTORS as usize * SECTOR)),
        Status::Ok
    );
    let _ = r.read(0, 1); // first I/O loads the set
    r.settle();
    assert_eq!(r.stat("copied_regions"), 64);
    r.assert_legs_identical();
    r.message("check").unwrap();
    r.until("check done", Duration::from_secs(20), |s| {
        s.contains(" idle ")
    });
    assert!(r.status().ends_with("idle 0 0 -"), "{}", r.status());
}

#[test]
fn failed_leg_is_d_writes_go_on_and_recovery_copies_only_dirty_regions() {
    let mut r = Rig::new(
        2,
        SECTORS,
        &["nosync", "region_size", REGION, "daemon_sleep", "20"],
    );
    assert_eq!(r.write(0, &pattern(1, 4096)), Status::Ok);
    // Let the daemon clear region 0's bit (every leg in sync, region idle for two ticks).
    r.until("bits cleared", Duration::from_secs(5), |_| true);
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..50 {
        r.e.poll();
        std::thread::sleep(Duration::from_millis(2));
    }
    let events = r.e.events("r").unwrap().nr();
    r.break_leg(1);
    // Writes to 5 distinct regions while leg 1 is away: no client error.
    let regions = [3u64, 9, 10, 33, 63];
    for (k, reg) in regions.iter().enumerate() {
        assert_eq!(
            r.write(reg * 128 + 8, &pattern(100 + k as u64, 8192)),
            Status::Ok
        );
    }
    assert_eq!(r.health(), "AD");
    assert!(
        r.e.events("r").unwrap().nr() > events,
        "an event fires when a leg fails"
    );
    // Reads keep working from leg 0.
    let (s, b) = r.read(3 * 128 + 8, 16);
    assert_eq!((s, b), (Status::Ok, pattern(100, 8192)));
    // The failure is on disk: leg 0's superblock names device 1 failed (kernel layout).
    let sb = kernel_sb(&r.meta(0));
    assert_eq!(&sb.magic, b"DmRd");
    assert_eq!(sb.failed_devices, 0b10, "{sb:?}");
    assert_eq!((sb.num_devices, sb.array_position, sb.level), (2, 0, 1));
    // Bring it back.
    r.mend_leg(1);
    let before = r.stat("copied_regions");
    r.message("recover").unwrap();
    r.settle();
    assert_eq!(
        r.stat("copied_regions") - before,
        regions.len() as u64,
        "{}",
        r.message("stats").unwrap()
    );
    r.assert_legs_identical();
    let sb = kernel_sb(&r.meta(1));
    assert_eq!(sb.failed_devices, 0, "{sb:?}");
    assert_eq!(sb.disk_recovery_offset, u64::MAX);
    r.message("check").unwrap();
    r.until("check done", Duration::from_secs(20), |s| {
        s.contains(" idle ")
    });
    assert!(r.status().ends_with("idle 0 0 -"), "{}", r.status());
}

#[test]
fn mdadm_reads_the_bitmap_stackbd_wrote() {
    let mut r = Rig::new(2, SECTORS, &["nosync", "region_size", REGION]);
    for reg in [0u64, 5, 6, 40] {
        assert_eq!(r.write(reg * 128, &pattern(reg, 4096)), Status::Ok);
    }
    let meta = r.meta(1);
    let dir = std::env::temp_dir().join(format!("stackbd-raid-bm-{}", std::process::id()));
    std::fs::write(&dir, &meta[4096..]).unwrap();
    let out = std::process::Command::new("mdadm")
        .arg("-X")
        .arg(&dir)
        .output()
        .expect("mdadm is required (apt-get install mdadm)");
    let _ = std::fs::remove_file(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mdadm -X failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Bitmap : 64 bits (chunks), 4 dirty"),
        "{text}"
    );
    assert!(text.contains("Chunksize : 64 KB"), "{text}");
    let sb = kernel_sb(&meta);
    assert!(sb.events > 0);
    assert!(text.contains(&format!("Events : {}", sb.events)), "{text}");
}

#[test]
fn bad_tables_and_messages_are_refused() {
    let mut r = Rig::new(2, SECTORS, &["nosync"]);
    for bad in [
        format!("0 {SECTORS} raid raid5_ls 1 64 2 meta0 d0 meta1 d1"),
        format!("0 {SECTORS} raid raid1 1 0 2 meta0 d0 meta1 nope"),
        format!("0 {} raid raid1 1 0 2 meta0 d0 meta1 d1", SECTORS * 2),
        format!("0 {SECTORS} raid raid1 3 0 region_size 7 2 meta0 d0 meta1 d1"),
    ] {
        assert!(r.e.load("r", &bad).is_err(), "accepted: {bad}");
    }
    assert!(r.message("bogus").is_err());
    assert!(r.message("check now").is_err());
    assert_eq!(r.write(0, &[1u8; 512]), Status::Ok);
}

#[test]
fn restart_resyncs_only_the_regions_whose_bits_are_set() {
    let params = ["nosync", "region_size", REGION, "daemon_sleep", "3600000"];
    let mut r = Rig::new(2, SECTORS, &params);
    for reg in [2u64, 17, 50] {
        assert_eq!(r.write(reg * 128 + 1, &pattern(reg, 2048)), Status::Ok);
    }
    // Make the legs differ inside one dirty region, as a crash between the two leg writes
    // would, and inside one clean region (which nothing may touch).
    let d1 = r.data_leaf[1];
    assert_eq!(r.e.write_at(d1, 17 * 128 + 1, &[0xEE; 512]), Status::Ok);
    let mut r = r.restart(&params);
    let _ = r.read(0, 1);
    r.settle();
    assert_eq!(
        r.stat("copied_regions"),
        3,
        "{}",
        r.message("stats").unwrap()
    );
    r.assert_legs_identical();
    let (s, b) = r.read(17 * 128 + 1, 4);
    assert_eq!((s, b), (Status::Ok, pattern(17, 2048)));
}

#[test]
fn reload_with_rebuild_copies_the_whole_leg() {
    let mut r = Rig::new(2, SECTORS, &["nosync", "region_size", REGION]);
    assert_eq!(r.write(0, &pattern(5, 4096)), Status::Ok);
    let d1 = r.data_leaf[1];
    assert_eq!(r.e.write_at(d1, 4000, &[0xEE; 4096]), Status::Ok);
    let t = table(2, SECTORS, &["region_size", REGION, "rebuild", "1"]);
    r.e.reload("r", &t).unwrap();
    let _ = r.read(0, 1);
    r.settle();
    assert_eq!(r.stat("copied_regions"), 64);
    r.assert_legs_identical();
}

#[test]
fn a_read_error_is_retried_on_the_other_leg() {
    let mut r = Rig::new(2, SECTORS, &["nosync", "region_size", REGION]);
    assert_eq!(r.write(100, &pattern(9, 4096)), Status::Ok);
    // Leg 0 is picked first (equal load, lowest index); its device now fails every I/O.
    r.break_leg(0);
    let events = r.e.events("r").unwrap().nr();
    let (s, b) = r.read(100, 8);
    assert_eq!((s, b), (Status::Ok, pattern(9, 4096)));
    assert_eq!(r.health(), "DA");
    assert!(r.e.events("r").unwrap().nr() > events);
}

#[test]
fn reads_avoid_write_mostly_legs() {
    let mut r = Rig::new(
        2,
        SECTORS,
        &["nosync", "write_mostly", "0", "region_size", REGION],
    );
    assert_eq!(r.write(0, &pattern(4, 8192)), Status::Ok);
    // Were leg 0 read, the read would fail there and mark it D.
    r.break_leg(0);
    for _ in 0..20 {
        let (s, b) = r.read(0, 16);
        assert_eq!((s, b), (Status::Ok, pattern(4, 8192)));
    }
    assert_eq!(r.health(), "AA", "a write_mostly leg was read");
}

#[test]
fn resync_honours_max_recovery_rate_and_shows_progress() {
    // 16 regions of 64 KiB = 1 MiB to copy at 1024 kB/s: about a second.
    let sectors = 2048;
    let mut r = Rig::new(
        2,
        sectors,
        &["region_size", REGION, "max_recovery_rate", "1024"],
    );
    let t = std::time::Instant::now();
    let _ = r.read(0, 1);
    let mut partial = None;
    r.until("resync", Duration::from_secs(20), |s| {
        let ratio = s.split_whitespace().nth(6).unwrap_or("");
        if partial.is_none() && ratio != "0/2048" && ratio != "2048/2048" {
            partial = Some(ratio.to_string());
        }
        s.contains(" AA 2048/2048 idle ")
    });
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "1 MiB resynced in {took:?} at 1024 kB/s"
    );
    assert!(partial.is_some(), "status never showed partial progress");
    assert_eq!(r.stat("copied_regions"), 16);
}

#[test]
fn reads_spread_over_the_legs() {
    let mut r = Rig::new(2, SECTORS, &["nosync", "region_size", REGION]);
    assert_eq!(r.write(0, &pattern(6, 4096)), Status::Ok);
    // Break leg 1's device: if reads at queue depth 1 go round the legs, one of the next reads
    // lands there, fails over to leg 0, and leaves leg 1 marked D.
    r.break_leg(1);
    for _ in 0..4 {
        let (s, b) = r.read(0, 8);
        assert_eq!((s, b), (Status::Ok, pattern(6, 4096)));
    }
    assert_eq!(r.health(), "AD", "reads never went to leg 1");
}
