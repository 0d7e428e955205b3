//! The file leaf driven through the real engine: files (buffered and O_DIRECT), striped tables
//! over two files, flush/FUA, discard and write-zeroes, the backlog, the IOPOLL probe, and a loop
//! device for the block-device paths.

use stackbd_core::{
    BioFlags, DataBuf, DevId, Engine, Leaf, Op, ReactorConfig, Request, Status, SECTOR_SIZE,
};
use stackbd_leaves::file::{FileLeaf, FileOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const SS: usize = SECTOR_SIZE;

fn temp_file(bytes: u64) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix("stackbd-file-")
        .tempfile()
        .unwrap();
    f.as_file().set_len(bytes).unwrap();
    f
}

fn opts(direct: bool) -> FileOptions {
    FileOptions {
        direct,
        ..FileOptions::default()
    }
}

fn engine() -> Engine {
    Engine::new(stackbd_targets::registry(), ReactorConfig::default())
}

/// An engine with `leaf` as `f0` under a linear volume `v` over all of it.
fn linear(leaf: &FileLeaf) -> (Engine, DevId) {
    let mut e = engine();
    let n = leaf.size();
    e.add_leaf("f0", Arc::new(leaf.clone())).unwrap();
    let v = e.create("v", Some(&format!("0 {n} linear f0 0"))).unwrap();
    (e, v)
}

/// Bytes that differ with `seed` and with position.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A buffer placed `skew` bytes past a 4096-byte boundary.
struct Buf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, skew: usize) -> Buf {
        let v = vec![0u8; len + 8192];
        let off = (4096 - v.as_ptr() as usize % 4096) % 4096 + skew;
        Buf { v, off, len }
    }

    fn with(data: &[u8], skew: usize) -> Buf {
        let mut b = Buf::new(data.len(), skew);
        b.as_mut().copy_from_slice(data);
        b
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }

    fn as_ref(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }
}

/// Writes `data` at `sector` from a buffer with `skew`, and checks it.
fn write(e: &mut Engine, v: DevId, sector: u64, data: &[u8], skew: usize) {
    let b = Buf::with(data, skew);
    assert_eq!(
        e.write_at(v, sector, b.as_ref()),
        Status::Ok,
        "write @{sector}"
    );
}

/// Reads `len` bytes at `sector` into a buffer with `skew`.
fn read(e: &mut Engine, v: DevId, sector: u64, len: usize, skew: usize) -> Vec<u8> {
    let mut b = Buf::new(len, skew);
    // Poison, so a read that does not fill the buffer shows.
    b.as_mut().fill(0x5a);
    assert_eq!(
        e.read_at(v, sector, b.as_mut()),
        Status::Ok,
        "read @{sector}"
    );
    b.as_ref().to_vec()
}

/// Writes a pattern at many offsets and sizes (small, odd, past `max_sectors`, at the end),
/// reads each back, then checks the whole device through the engine and the file itself.
fn pattern_roundtrip(direct: bool, skew: usize) -> FileLeaf {
    let size = 16 << 20;
    let f = temp_file(size);
    let leaf = FileLeaf::open(f.path(), opts(direct)).unwrap();
    let (mut e, v) = linear(&leaf);
    let mut model = vec![0u8; size as usize];
    let ios: &[(u64, usize)] = &[
        (0, 1),
        (1, 7),
        (7, 9),
        (8, 8),
        (100, 255),
        (1000, 2048),
        (3000, 4100),
        (9001, 3),
        (20000, 777),
        (32768 - 8, 8),
        (32768 - 1, 1),
    ];
    for (k, &(sector, sectors)) in ios.iter().enumerate() {
        let data = pattern(k as u64 + 1, sectors * SS);
        write(&mut e, v, sector, &data, skew);
        model[sector as usize * SS..][..data.len()].copy_from_slice(&data);
        assert_eq!(read(&mut e, v, sector, data.len(), skew), data);
    }
    for chunk in 0..16 {
        let got = read(&mut e, v, chunk * 2048, 1 << 20, skew);
        assert!(
            got == model[chunk as usize * (1 << 20)..][..1 << 20],
            "MiB {chunk}"
        );
    }
    assert_eq!(e.flush(v), Status::Ok);
    assert!(std::fs::read(f.path()).unwrap() == model, "file contents");
    leaf
}

#[test]
fn buffered_file_pattern_roundtrip() {
    let leaf = pattern_roundtrip(false, 0);
    assert_eq!(leaf.stats().bounces, 0, "buffered I/O never bounces");
    let leaf = pattern_roundtrip(false, 3);
    assert_eq!(leaf.stats().bounces, 0);
}

#[test]
fn direct_file_with_aligned_buffers_needs_no_bounce() {
    let leaf = pattern_roundtrip(true, 0);
    // 512-byte blocks are what O_DIRECT needs of a file on this machine: 512-aligned I/O at
    // odd sectors worked above without a bounce.
    assert_eq!(leaf.limits().logical_block_bytes, 512);
    println!("O_DIRECT on a file here: mem align {}", leaf.mem_align());
    assert!(leaf.mem_align() <= 4096, "mem align {}", leaf.mem_align());
    assert_eq!(leaf.stats().bounces, 0);
    assert_eq!(leaf.stats().bounce_buffers, 0);
}

#[test]
fn direct_file_with_unaligned_buffers_bounces() {
    for skew in [1, 8, 100] {
        let leaf = pattern_roundtrip(true, skew);
        let st = leaf.stats();
        assert!(st.bounces > 0, "skew {skew}: {st:?}");
        assert!(st.bounce_buffers >= 1 && st.bounce_buffers <= 32, "{st:?}");
    }
}

#[test]
fn striped_over_two_file_leaves() {
    const CHUNK: u64 = 16;
    const PER: u64 = 8192; // sectors per file
    let (fa, fb) = (temp_file(PER * 512), temp_file(PER * 512));
    // One O_DIRECT leaf (misaligned pieces bounce) and one buffered.
    let a = FileLeaf::open(fa.path(), opts(true)).unwrap();
    let b = FileLeaf::open(fb.path(), opts(false)).unwrap();
    let mut e = engine();
    e.add_leaf("f0", Arc::new(a.clone())).unwrap();
    e.add_leaf("f1", Arc::new(b.clone())).unwrap();
    let v = e
        .create(
            "v",
            Some(&format!("0 {} striped 2 {CHUNK} f0 0 f1 0", PER * 2)),
        )
        .unwrap();
    let mut model = vec![0u8; (PER * 2) as usize * SS];
    let ios: &[(u64, usize)] = &[
        (0, 1),
        (10, 40),
        (15, 2),
        (31, 34),
        (100, 300),
        (1000, 1),
        (4095, 2049),
        (PER * 2 - 20, 20),
    ];
    for (k, &(sector, sectors)) in ios.iter().enumerate() {
        let data = pattern(100 + k as u64, sectors * SS);
        write(&mut e, v, sector, &data, 5);
        model[sector as usize * SS..][..data.len()].copy_from_slice(&data);
        assert_eq!(read(&mut e, v, sector, data.len(), 0), data);
        assert_eq!(read(&mut e, v, sector, data.len(), 7), data);
    }
    assert!(e.reactor().stats.splits > 0, "I/O was split across chunks");
    assert_eq!(e.flush(v), Status::Ok);
    // Each file holds its stripes.
    let files = [
        std::fs::read(fa.path()).unwrap(),
        std::fs::read(fb.path()).unwrap(),
    ];
    for s in 0..PER * 2 {
        let c = s / CHUNK;
        let (stripe, fs) = ((c % 2) as usize, (c / 2) * CHUNK + s % CHUNK);
        assert!(
            files[stripe][fs as usize * SS..][..SS] == model[s as usize * SS..][..SS],
            "volume sector {s} on stripe {stripe} sector {fs}"
        );
    }
    assert!(a.stats().bounces > 0);
    assert_eq!(b.stats().bounces, 0);
}

fn req(op: Op, v: DevId, sector: u64, sectors: u32, data: DataBuf, flags: BioFlags) -> Request {
    Request {
        flags,
        ..Request::new(op, v, sector, sectors, data, 0)
    }
}

#[test]
fn flush_fua_and_preflush() {
    for direct in [false, true] {
        let f = temp_file(4 << 20);
        let leaf = FileLeaf::open(f.path(), opts(direct)).unwrap();
        let (mut e, v) = linear(&leaf);
        assert_eq!(e.flush(v), Status::Ok);
        let flag_sets = [
            BioFlags::FUA,
            BioFlags::PREFLUSH,
            BioFlags::PREFLUSH | BioFlags::FUA,
        ];
        for (k, flags) in flag_sets.into_iter().enumerate() {
            let sector = k as u64 * 64;
            let mut b = Buf::with(&pattern(k as u64 + 7, 16 * SS), 0);
            // SAFETY: `b` outlives the synchronous `io` call, which returns after completion.
            let data = unsafe { DataBuf::from_slice(b.as_mut()) };
            let s = e.io(req(Op::Write, v, sector, 16, data, flags));
            assert_eq!(s, Status::Ok, "{flags:?} direct={direct}");
            assert_eq!(read(&mut e, v, sector, 16 * SS, 0), b.as_ref());
        }
        // Discard and write-zeroes with PREFLUSH and FUA: three linked SQEs.
        for op in [Op::Discard, Op::WriteZeroes] {
            let flags = BioFlags::PREFLUSH | BioFlags::FUA;
            let s = e.io(req(op, v, 0, 8, DataBuf::EMPTY, flags));
            assert_eq!(s, Status::Ok, "{op:?}");
            assert_eq!(read(&mut e, v, 0, 8 * SS, 0), vec![0u8; 8 * SS]);
        }
        assert_eq!(e.flush(v), Status::Ok);
        assert_eq!(
            leaf.stats().sync_ops,
            0,
            "a file on a plain ring is all async"
        );
    }
}

/// Offset of the first hole at or after `off` (SEEK_HOLE), on a fresh descriptor.
fn seek_hole(path: &Path, off: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(off)).unwrap()
}

fn seek_data(path: &Path, off: u64) -> Option<u64> {
    let f = std::fs::File::open(path).unwrap();
    rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(off)).ok()
}

#[test]
fn discard_reads_back_zeros_and_punches_a_hole() {
    for direct in [false, true] {
        let f = temp_file(4 << 20);
        let leaf = FileLeaf::open(f.path(), opts(direct)).unwrap();
        let (mut e, v) = linear(&leaf);
        let data = pattern(3, 1 << 20);
        write(&mut e, v, 0, &data, 0);
        assert_eq!(e.flush(v), Status::Ok);
        assert_eq!(leaf.extents(0, 2048), vec![(2048, true)]);
        assert_eq!(seek_hole(f.path(), 0), 1 << 20);
        assert_eq!(e.discard(v, 512, 512), Status::Ok);
        let got = read(&mut e, v, 0, 1 << 20, 0);
        assert!(got[..256 << 10] == data[..256 << 10]);
        assert!(got[256 << 10..512 << 10].iter().all(|&b| b == 0));
        assert!(got[512 << 10..] == data[512 << 10..]);
        assert_eq!(seek_hole(f.path(), 0), 256 << 10, "SEEK_HOLE sees the hole");
        assert_eq!(seek_data(f.path(), 256 << 10), Some(512 << 10));
        assert_eq!(
            leaf.extents(0, 8192),
            vec![(512, true), (512, false), (1024, true), (6144, false)]
        );
        assert_eq!(leaf.extents(600, 100), vec![(100, false)]);
        assert_eq!(leaf.extents(8000, 1000), vec![(192, false)], "clamped");
    }
}

#[test]
fn write_zeroes_punches_unless_no_hole() {
    for direct in [false, true] {
        let f = temp_file(4 << 20);
        let leaf = FileLeaf::open(f.path(), opts(direct)).unwrap();
        let (mut e, v) = linear(&leaf);
        let data = pattern(9, 2 << 20);
        write(&mut e, v, 0, &data, 0);
        assert_eq!(e.flush(v), Status::Ok);
        let blocks = |p: &Path| std::fs::metadata(p).unwrap().blocks();
        let full = blocks(f.path());

        // Without NO_HOLE: zeros, and the space is given back.
        assert_eq!(e.write_zeroes(v, 0, 1024), Status::Ok);
        assert_eq!(read(&mut e, v, 0, 512 << 10, 0), vec![0u8; 512 << 10]);
        assert_eq!(seek_data(f.path(), 0), Some(512 << 10));
        assert_eq!(leaf.extents(0, 2048)[0], (1024, false));
        let punched = blocks(f.path());
        assert!(punched < full, "{punched} < {full}");

        // With NO_HOLE: zeros, and the blocks stay allocated.
        let s = e.io(req(
            Op::WriteZeroes,
            v,
            2048,
            1024,
            DataBuf::EMPTY,
            BioFlags::NO_HOLE,
        ));
        assert_eq!(s, Status::Ok);
        assert_eq!(read(&mut e, v, 2048, 512 << 10, 0), vec![0u8; 512 << 10]);
        assert_eq!(blocks(f.path()), punched, "NO_HOLE keeps the blocks");
        let got = read(&mut e, v, 0, 2 << 20, 0);
        assert!(got[512 << 10..1 << 20] == data[512 << 10..1 << 20]);
        assert!(got[(1 << 20) + (512 << 10)..] == data[(1 << 20) + (512 << 10)..]);
    }
}

/// Submits `n` I/Os at once and polls them all to completion.
fn run_all(e: &mut Engine, reqs: &[Request]) {
    for r in reqs {
        assert_eq!(e.submit(r), Ok(()), "submit {}", r.user_data);
    }
    let mut seen = vec![false; reqs.len()];
    let mut left = reqs.len();
    let start = std::time::Instant::now();
    while left > 0 {
        e.poll();
        while let Some(c) = e.reap() {
            assert_eq!(c.status, Status::Ok, "I/O {}", c.user_data);
            assert!(!std::mem::replace(&mut seen[c.user_data as usize], true));
            left -= 1;
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "{left} I/Os never completed"
        );
    }
}

#[test]
fn many_ios_at_once_wait_in_the_backlog() {
    const N: usize = 2000;
    const SECTORS: u32 = 8;
    for direct in [false, true] {
        let f = temp_file(N as u64 * SECTORS as u64 * 512);
        let leaf = FileLeaf::open(
            f.path(),
            FileOptions {
                direct,
                queue_depth: 8,
                ..FileOptions::default()
            },
        )
        .unwrap();
        let mut e = Engine::new(
            stackbd_targets::registry(),
            ReactorConfig {
                pool_capacity: 4096,
                ..ReactorConfig::default()
            },
        );
        e.add_leaf("f0", Arc::new(leaf.clone())).unwrap();
        let v = e
            .create("v", Some(&format!("0 {} linear f0 0", leaf.size())))
            .unwrap();
        // Misaligned by one byte, so direct I/O also queues for its 8 bounce buffers.
        let mut src: Vec<Buf> = (0..N)
            .map(|i| Buf::with(&pattern(i as u64, SECTORS as usize * SS), 1))
            .collect();
        let writes: Vec<Request> = src
            .iter_mut()
            .enumerate()
            .map(|(i, b)| {
                // SAFETY: `src` outlives `run_all`, which returns after every I/O completed.
                let d = unsafe { DataBuf::from_slice(b.as_mut()) };
                Request::new(
                    Op::Write,
                    v,
                    i as u64 * SECTORS as u64,
                    SECTORS,
                    d,
                    i as u64,
                )
            })
            .collect();
        run_all(&mut e, &writes);
        let after_writes = leaf.stats();
        assert!(after_writes.backlogged > 0, "{after_writes:?}");
        let mut dst: Vec<Buf> = (0..N).map(|_| Buf::new(SECTORS as usize * SS, 1)).collect();
        let reads: Vec<Request> = dst
            .iter_mut()
            .enumerate()
            .map(|(i, b)| {
                // SAFETY: as above.
                let d = unsafe { DataBuf::from_slice(b.as_mut()) };
                Request::new(Op::Read, v, i as u64 * SECTORS as u64, SECTORS, d, i as u64)
            })
            .collect();
        run_all(&mut e, &reads);
        for i in 0..N {
            assert!(dst[i].as_ref() == src[i].as_ref(), "I/O {i}");
        }
        let st = leaf.stats();
        if direct {
            assert!(st.bounce_buffers <= 8, "{st:?}");
            assert!(st.bounces >= 2 * N as u64);
        }
        assert_eq!(st.enter_errors, 0);
        assert_eq!(e.reactor().outstanding(), 0);
    }
}

#[test]
fn dropping_a_channel_with_io_in_flight_finishes_it_first() {
    const N: usize = 64;
    let f = temp_file(N as u64 * 4096);
    let leaf = FileLeaf::open(
        f.path(),
        FileOptions {
            direct: true,
            queue_depth: 16,
            ..FileOptions::default()
        },
    )
    .unwrap();
    let mut src: Vec<Buf> = (0..N)
        .map(|i| Buf::with(&pattern(i as u64 + 900, 4096), 3))
        .collect();
    let mut e = engine();
    e.add_leaf("f0", Arc::new(leaf.clone())).unwrap();
    let v = e
        .create("v", Some(&format!("0 {} linear f0 0", leaf.size())))
        .unwrap();
    for (i, b) in src.iter_mut().enumerate() {
        // SAFETY: `src` outlives the engine, whose channel waits for every SQE when dropped.
        let d = unsafe { DataBuf::from_slice(b.as_mut()) };
        e.submit(&Request::new(Op::Write, v, i as u64 * 8, 8, d, i as u64))
            .unwrap();
    }
    // Start them (the reactor hands them to the leaf, which pushes SQEs), reap nothing, drop.
    e.poll();
    drop(e);
    let file = std::fs::read(f.path()).unwrap();
    let written = (0..N)
        .filter(|&i| file[i * 4096..][..4096] == *src[i].as_ref())
        .count();
    let untouched = (0..N)
        .filter(|&i| file[i * 4096..][..4096].iter().all(|&b| b == 0))
        .count();
    // Pushed pieces were finished (and their bounce buffers outlived them); bios still in the
    // backlog were never started. Nothing is torn.
    assert_eq!(
        written + untouched,
        N,
        "{written} written, {untouched} untouched"
    );
    assert!(written >= 16, "{written}");
}

#[test]
fn iopoll_probe_falls_back_on_a_temp_file() {
    // Data at offset 0, so the probe's read reaches the device (a hole would not).
    let f = temp_file(1 << 20);
    std::fs::write(f.path(), pattern(1, 1 << 20)).unwrap();
    let leaf = FileLeaf::open(f.path(), opts(true)).unwrap();
    println!(
        "IOPOLL probe on {}: supported={}",
        f.path().display(),
        leaf.iopoll_supported()
    );
    assert!(
        !leaf.iopoll_supported(),
        "no poll queues under a file on this machine"
    );
    assert!(!leaf.uses_iopoll());
    assert!(!leaf.limits().poll);
    let (mut e, v) = linear(&leaf);
    assert_eq!(read(&mut e, v, 0, 4096, 0), pattern(1, 1 << 20)[..4096]);
    write(&mut e, v, 8, &pattern(2, 8192), 0);
    assert_eq!(read(&mut e, v, 8, 8192, 0), pattern(2, 8192));
    assert_eq!(e.discard(v, 64, 64), Status::Ok);
    assert_eq!(e.flush(v), Status::Ok);
    // Turned off: no probe, no polling.
    let off = FileLeaf::open(
        f.path(),
        FileOptions {
            iopoll: false,
            ..opts(true)
        },
    )
    .unwrap();
    assert!(!off.iopoll_supported() && !off.limits().poll);
    // A file with no data at all: a polled read of a hole never reaches the device (the kernel
    // answers it with zeros, successfully, even where polling is impossible), so the probe has
    // nothing to prove and says no.
    let sparse = temp_file(1 << 20);
    assert!(!FileLeaf::open(sparse.path(), opts(true))
        .unwrap()
        .iopoll_supported());
}

#[test]
fn kind_args_and_limits() {
    let f = temp_file(1 << 20);
    let leaf = FileLeaf::open(f.path(), opts(false)).unwrap();
    assert_eq!(leaf.kind(), "file");
    assert_eq!(leaf.args(), f.path().display().to_string());
    assert_eq!(leaf.size(), 2048);
    assert!(!leaf.is_block_device());
    let l = leaf.limits();
    assert_eq!(l.logical_block_bytes, 512);
    assert!(l.physical_block_bytes >= 512);
    assert_eq!(l.max_sectors, 2048);
    // Copies inside the file are native (copy_file_range).
    assert_eq!(l.max_copy_sectors, u32::MAX);
    assert!(l.copy_native && l.nowait);
    let d = FileLeaf::open(f.path(), opts(true)).unwrap();
    assert_eq!(d.args(), format!("{} direct", f.path().display()));
    // A file that is not a whole number of sectors: the tail is not addressable.
    f.as_file().set_len((1 << 20) + 100).unwrap();
    assert_eq!(FileLeaf::open(f.path(), opts(false)).unwrap().size(), 2048);
    assert!(FileLeaf::open("/dev/null", opts(false)).is_err());
    assert!(FileLeaf::open("/nonexistent/stackbd", opts(false)).is_err());
}

#[test]
fn read_past_eof_returns_zeros() {
    for direct in [false, true] {
        let f = temp_file(1 << 20);
        let data = pattern(5, 1 << 20);
        std::fs::write(f.path(), &data).unwrap();
        let leaf = FileLeaf::open(f.path(), opts(direct)).unwrap();
        assert_eq!(leaf.size(), 2048);
        let (mut e, v) = linear(&leaf);
        // Someone shrinks the file under the leaf.
        let eof = (512 << 10) + 1000;
        f.as_file().set_len(eof as u64).unwrap();
        let got = read(&mut e, v, 0, 1 << 20, 0);
        assert!(got[..eof] == data[..eof], "direct={direct}");
        assert!(got[eof..].iter().all(|&b| b == 0), "direct={direct}");
        let got = read(&mut e, v, 1536, 256 << 10, 3);
        assert!(got.iter().all(|&b| b == 0));
        assert!(leaf.stats().eof_zero_fills >= 2, "{:?}", leaf.stats());
    }
}

/// Detaches a loop device when dropped (also when a test fails).
struct LoopDev(String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn losetup(file: &Path) -> Result<LoopDev, String> {
    if !Path::new("/dev/loop-control").exists() {
        return Err("/dev/loop-control is missing".into());
    }
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(file)
        .output()
        .map_err(|e| format!("cannot run losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(LoopDev(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

#[test]
fn loop_device_block_paths() {
    let backing = temp_file(8 << 20);
    let dev = match losetup(backing.path()) {
        Ok(d) => d,
        Err(why) => {
            println!("skipping the loop device test: {why}");
            return;
        }
    };
    println!("loop device {}", dev.0);
    let path = PathBuf::from(&dev.0);
    for direct in [false, true] {
        let leaf = FileLeaf::open(&path, opts(direct)).unwrap();
        assert!(leaf.is_block_device());
        assert_eq!(leaf.size(), 16384);
        assert_eq!(leaf.limits().logical_block_bytes, 512);
        assert!(leaf.limits().max_sectors > 0 && leaf.limits().max_sectors <= 2048);
        println!(
            "{} direct={direct}: IOPOLL probe supported={}",
            dev.0,
            leaf.iopoll_supported()
        );
        assert!(!leaf.limits().poll, "loop devices have no poll queues");
        assert_eq!(leaf.extents(0, 16384), vec![(16384, true)]);
        let (mut e, v) = linear(&leaf);
        let mut model = vec![0u8; 8 << 20];
        for (k, &(sector, sectors, skew)) in [
            (0u64, 8usize, 0usize),
            (3, 5, 1),
            (100, 2048, 0),
            (5000, 3000, 9),
            (16384 - 8, 8, 0),
        ]
        .iter()
        .enumerate()
        {
            let data = pattern(k as u64 + 40 + direct as u64, sectors * SS);
            write(&mut e, v, sector, &data, skew);
            model[sector as usize * SS..][..data.len()].copy_from_slice(&data);
            assert_eq!(read(&mut e, v, sector, data.len(), skew), data);
        }
        // BLKDISCARD: the loop driver punches the backing file, which then reads zeros.
        assert_eq!(e.discard(v, 128, 256), Status::Ok);
        model[128 * SS..384 * SS].fill(0);
        // BLKZEROOUT, with and without NO_HOLE.
        assert_eq!(e.write_zeroes(v, 1024, 64), Status::Ok);
        model[1024 * SS..1088 * SS].fill(0);
        let s = e.io(req(
            Op::WriteZeroes,
            v,
            6000,
            128,
            DataBuf::EMPTY,
            BioFlags::NO_HOLE,
        ));
        assert_eq!(s, Status::Ok);
        model[6000 * SS..6128 * SS].fill(0);
        assert_eq!(e.flush(v), Status::Ok);
        for mib in 0..8 {
            let got = read(&mut e, v, mib * 2048, 1 << 20, 0);
            assert!(
                got == model[mib as usize * (1 << 20)..][..1 << 20],
                "MiB {mib} direct={direct}"
            );
        }
        let st = leaf.stats();
        assert_eq!(
            st.sync_ops, 3,
            "discard and two zeroouts ran as ioctls: {st:?}"
        );
        if direct {
            assert!(st.bounces > 0);
        }
        drop(e);
        // What went through the loop device is in its backing file.
        assert!(std::fs::read(backing.path()).unwrap() == model);
        // The discarded range is a hole in the backing file.
        assert_eq!(seek_hole(backing.path(), 64 << 10), 64 << 10);
    }
    drop(dev);
}

/// Detaches a tmpfs mount when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        // A ring's file references go away asynchronously after the ring is closed, so the
        // mount may be busy for a moment.
        for _ in 0..50 {
            let quiet = Command::new("umount")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
            if quiet.is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_filesystem_reports_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "stackbd-test"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("skipping: cannot mount a small tmpfs here");
        return;
    }
    let _m = Mount(dir.path().to_path_buf());
    let path = dir.path().join("sparse");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let leaf = FileLeaf::open(&path, opts(false)).unwrap();
    let (mut e, v) = linear(&leaf);
    let data = pattern(1, 4 << 20);
    let b = Buf::with(&data, 0);
    assert_eq!(e.write_at(v, 0, b.as_ref()), Status::NoSpace);
    // The leaf keeps working for what fits.
    assert_eq!(e.discard(v, 0, 8192), Status::Ok);
    write(&mut e, v, 0, &data[..64 << 10], 0);
    assert_eq!(read(&mut e, v, 0, 64 << 10, 0), data[..64 << 10]);
}
