//! `file`: a regular file or a block device, through io_uring.
//!
//! The leaf (shared by every reactor) holds the open file and what was learnt about it at open:
//! size, block sizes, direct-I/O alignment, and whether `IORING_SETUP_IOPOLL` works on it (a
//! probe: one polled O_DIRECT read, DESIGN "Completion modes and polling": "probe at open and
//! never assumed"). Each reactor gets a [`FileChannel`] with its own ring, the file registered
//! in it as fixed file 0, and preallocated per-slot state.
//!
//! The data path of a channel:
//! - `submit` only pushes SQEs (user_data: the bio id in the low 32 bits, the slot above it); a
//!   bio that finds no free slot, no room in the SQ or no bounce buffer waits in a preallocated
//!   backlog, in arrival order. Nothing blocks, nothing is dropped.
//! - `poll` makes at most one `io_uring_enter` for the whole batch (submit what is queued; with
//!   an IOPOLL ring it also reaps), then drains the CQ and refills the SQ from the backlog.
//! - Short reads and writes go on from where they stopped (progress lives in the slot); a read
//!   past the end of the file returns zeros for the rest.
//! - Under O_DIRECT a buffer that is not aligned for direct I/O goes through one of the
//!   channel's aligned bounce buffers (made on first need, kept for reuse), in chunks of
//!   `max_sectors`; [`FileStats::bounces`] counts it.
//! - Block-device discard and write-zeroes are `BLKDISCARD` / `BLKZEROOUT` ioctls, run
//!   synchronously in `submit` and completed through `cx.complete`. On an IOPOLL ring (which
//!   accepts only reads and writes) flush, discard and write-zeroes are synchronous too.
//!
//! In steady state an I/O allocates nothing: slots, backlog, resubmit queue and bounce buffers
//! are all sized when the channel is made (bounce buffers on first use).
//!
//! Health ([`Leaf::health`], see `health.rs`): the backing file is `fstat`ed when the control
//! plane asks (the daemon does every few seconds): deleted or truncated below the leaf's size is
//! `failed`; an I/O error in the last 30 s is `degraded`. Channels only record errors.

mod aligned;
mod health;
mod ring;

pub use ring::{kernel_copy, FileChannel};

use aligned::{read_first_block, AlignedBuf};

use io_uring::{opcode, squeue, types, IoUring};
use rustix::fs::SeekFrom;
use rustix::ioctl::{opcode as ioc, Getter, Opcode, Setter};
use stackbd_core::{Leaf, LeafChannel, LeafHealth, Limits, Sector, SECTOR_SIZE};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Ring depth (bios in flight per channel) when the options say 0.
pub const DEFAULT_QUEUE_DEPTH: u32 = 256;
/// Largest ring depth accepted (slot numbers must fit the 16 bits user_data gives them).
pub const MAX_QUEUE_DEPTH: u32 = 4096;
/// `max_sectors` advertised when the options and the device say nothing smaller.
pub const DEFAULT_MAX_SECTORS: u32 = 2048;

/// Largest single read or write SQE (a bio may be larger: it goes in several pieces).
const MAX_CHUNK_BYTES: u64 = 1 << 30;
/// Bounce buffers one channel may hold at most (each is `max_sectors` long).
const MAX_BOUNCE_BUFFERS: usize = 32;
/// How long the IOPOLL probe waits for its one read.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How to open a file leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// Open with `O_DIRECT` (no page cache).
    pub direct: bool,
    /// Ring depth of each channel: bios in flight per reactor before the backlog takes over.
    /// 0 means [`DEFAULT_QUEUE_DEPTH`]; at most [`MAX_QUEUE_DEPTH`].
    pub queue_depth: u32,
    /// Largest I/O to advertise, in sectors; 0 means [`DEFAULT_MAX_SECTORS`] (or less if the
    /// block device says so). Also the size of a bounce buffer.
    pub max_sectors: u32,
    /// Probe for `IORING_SETUP_IOPOLL` and use it when it works (direct I/O only).
    pub iopoll: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            direct: false,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_sectors: 0,
            iopoll: true,
        }
    }
}

/// Counters of a file leaf, summed over its channels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStats {
    /// Read or write pieces that went through an aligned bounce buffer (O_DIRECT only).
    pub bounces: u64,
    /// Bounce buffers allocated (each is kept by its channel for reuse).
    pub bounce_buffers: u64,
    /// Reads or writes that transferred less than asked and were resubmitted for the rest.
    pub short_resubmits: u64,
    /// Reads that hit the end of the file; the rest of the buffer was zeroed.
    pub eof_zero_fills: u64,
    /// Bios that had to wait in a channel's backlog (no slot, no SQ room or no bounce buffer).
    pub backlogged: u64,
    /// Operations done synchronously (block-device discard/zeroout, non-rw ops on IOPOLL rings).
    pub sync_ops: u64,
    /// Channels that could not set up their ring (their bios fail with `IoError`).
    pub channel_failures: u64,
    /// `io_uring_enter` calls that failed (the SQEs stay queued and go at the next poll).
    pub enter_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    bounces: AtomicU64,
    bounce_buffers: AtomicU64,
    short_resubmits: AtomicU64,
    eof_zero_fills: AtomicU64,
    backlogged: AtomicU64,
    sync_ops: AtomicU64,
    channel_failures: AtomicU64,
    enter_errors: AtomicU64,
}

/// Only slow paths count, so a relaxed shared counter costs nothing on the fast path.
#[inline]
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    file: File,
    blockdev: bool,
    size_bytes: u64,
    lbs: u32,
    pbs: u32,
    /// Alignment direct I/O needs of memory (1 when buffered).
    mem_align: usize,
    max_sectors: u32,
    max_discard_sectors: u32,
    direct: bool,
    depth: u32,
    iopoll_supported: bool,
    /// Channels use IOPOLL rings: supported and opened O_DIRECT.
    iopoll: bool,
    counters: Counters,
    /// The answer of a probe read that outlived its probe's timeout (a hung device): the next
    /// probe waits for it rather than starting another thread that would hang as well.
    pending_probe: Mutex<Option<mpsc::Receiver<io::Result<usize>>>>,
    /// The I/O errors channels saw, and what the control plane last reported.
    health: health::FileHealth,
}

/// A file or block-device leaf. Cheap to clone (the clones share the open file and counters).
#[derive(Debug, Clone)]
pub struct FileLeaf {
    sh: Arc<Shared>,
}

// Block-layer ioctls (linux/fs.h). rustix has BLKSSZGET/BLKPBSZGET as functions; these three
// are composed from their definitions.
/// `BLKGETSIZE64 = _IOR(0x12, 114, size_t)`: the device size in bytes, written as a u64.
const BLKGETSIZE64: Opcode = ioc::read::<usize>(0x12, 114);
/// `BLKDISCARD = _IO(0x12, 119)`, argument `u64[2] = {start, len}` in bytes.
const BLKDISCARD: Opcode = ioc::none(0x12, 119);
/// `BLKZEROOUT = _IO(0x12, 127)`, argument `u64[2] = {start, len}` in bytes.
const BLKZEROOUT: Opcode = ioc::none(0x12, 127);

fn blk_size_bytes(file: &File) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 writes one u64 through its pointer argument (block/ioctl.c,
    // `put_u64`); `Getter` passes a pointer to an owned `MaybeUninit<u64>` that lives for the
    // call, and reads it only after the ioctl succeeded.
    Ok(unsafe { rustix::ioctl::ioctl(file, Getter::<BLKGETSIZE64, u64>::new()) }?)
}

fn blk_range<const OP: Opcode>(file: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: BLKDISCARD and BLKZEROOUT read a `u64[2]` {start, len} through the pointer
    // argument (block/ioctl.c, `copy_from_user(range, argp, sizeof(range))`) and write nothing;
    // `Setter` passes a pointer to the array it owns for the duration of the call.
    Ok(unsafe { rustix::ioctl::ioctl(file, Setter::<OP, [u64; 2]>::new([off, len])) }?)
}

/// `(mem_align, offset_align)` direct I/O needs, from `statx(STATX_DIOALIGN)` (Linux 6.1+).
fn dio_align(file: &File) -> Option<(u32, u32)> {
    let st = rustix::fs::statx(
        file,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::DIOALIGN,
    )
    .ok()?;
    if st.stx_mask & rustix::fs::StatxFlags::DIOALIGN.bits() == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some((st.stx_dio_mem_align.max(1), st.stx_dio_offset_align))
}

/// `/sys/dev/block/M:m/queue/NAME` (or the parent's queue for a partition), as a number.
fn sysfs_queue_u64(rdev: u64, name: &str) -> Option<u64> {
    let (ma, mi) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    ["queue", "../queue"].iter().find_map(|q| {
        std::fs::read_to_string(format!("/sys/dev/block/{ma}:{mi}/{q}/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {why}", path.display()),
    )
}

impl FileLeaf {
    /// Opens a regular file or a block device, read-write.
    pub fn open(path: impl AsRef<Path>, opts: FileOptions) -> io::Result<FileLeaf> {
        let path = path.as_ref();
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)?;
        let md = file.metadata()?;
        let blockdev = md.file_type().is_block_device();
        if !blockdev && !md.file_type().is_file() {
            return Err(invalid(path, "not a regular file or a block device"));
        }
        let dio = if opts.direct { dio_align(&file) } else { None };
        let (size_bytes, lbs, pbs, dev_max_sectors, max_discard_sectors) = if blockdev {
            let size = blk_size_bytes(&file)?;
            let lbs = rustix::fs::ioctl_blksszget(&file)?;
            let pbs = rustix::fs::ioctl_blkpbszget(&file).unwrap_or(lbs);
            let max_kb = sysfs_queue_u64(md.rdev(), "max_sectors_kb").unwrap_or(0);
            let discard = sysfs_queue_u64(md.rdev(), "discard_max_bytes").unwrap_or(0);
            (
                size,
                lbs,
                pbs,
                (max_kb * 2).min(u32::MAX as u64) as u32,
                (discard / SECTOR_SIZE as u64).min(u32::MAX as u64) as u32,
            )
        } else {
            // A file takes 512-byte I/O, except where direct I/O needs more of the offsets.
            let lbs = dio.map_or(512, |(_, off)| off.max(512));
            let blksize = md.blksize() as u32;
            let pbs = if blksize.is_power_of_two() && (lbs..=65536).contains(&blksize) {
                blksize
            } else {
                lbs
            };
            (md.len(), lbs, pbs, 0, 0)
        };
        if !lbs.is_power_of_two() || !(512..=65536).contains(&lbs) {
            return Err(invalid(path, format!("unusable logical block size {lbs}")));
        }
        let pbs = pbs.max(lbs);
        // Only whole logical blocks are addressable.
        let size_bytes = size_bytes / lbs as u64 * lbs as u64;
        let lbs_sectors = lbs / SECTOR_SIZE as u32;
        let mut max_sectors = match opts.max_sectors {
            0 => DEFAULT_MAX_SECTORS,
            n => n,
        };
        if dev_max_sectors > 0 {
            max_sectors = max_sectors.min(dev_max_sectors);
        }
        let max_sectors = (max_sectors / lbs_sectors * lbs_sectors).max(lbs_sectors);
        let mem_align = if opts.direct {
            // Alignments are powers of two (the queue's DMA alignment + 1); be sure of it.
            dio.map_or(lbs, |(mem, _)| mem).max(1).next_power_of_two() as usize
        } else {
            1
        };
        let depth = match opts.queue_depth {
            0 => DEFAULT_QUEUE_DEPTH,
            n => n.min(MAX_QUEUE_DEPTH),
        };
        // A ring must be possible at all here, so that `channel` (which cannot fail) rarely does.
        drop(IoUring::new(depth)?);
        let iopoll_supported = opts.iopoll && probe_iopoll(path, blockdev, lbs, mem_align);
        Ok(FileLeaf {
            sh: Arc::new(Shared {
                path: path.to_path_buf(),
                file,
                blockdev,
                size_bytes,
                lbs,
                pbs,
                mem_align,
                max_sectors,
                max_discard_sectors,
                direct: opts.direct,
                depth,
                iopoll_supported,
                iopoll: iopoll_supported && opts.direct,
                counters: Counters::default(),
                pending_probe: Mutex::new(None),
                health: health::FileHealth::default(),
            }),
        })
    }

    /// Whether the IOPOLL probe at open succeeded (`false` if `FileOptions::iopoll` was off).
    pub fn iopoll_supported(&self) -> bool {
        self.sh.iopoll_supported
    }

    /// Whether channels use polled rings (probe succeeded and the leaf is O_DIRECT); this is
    /// what `limits().poll` says.
    pub fn uses_iopoll(&self) -> bool {
        self.sh.iopoll
    }

    pub fn path(&self) -> &Path {
        &self.sh.path
    }

    pub fn is_block_device(&self) -> bool {
        self.sh.blockdev
    }

    pub fn is_direct(&self) -> bool {
        self.sh.direct
    }

    /// Memory alignment direct I/O needs here (buffers less aligned are bounced); 1 if buffered.
    pub fn mem_align(&self) -> usize {
        self.sh.mem_align
    }

    /// Size in bytes (whole logical blocks).
    pub fn size_bytes(&self) -> u64 {
        self.sh.size_bytes
    }

    pub fn stats(&self) -> FileStats {
        let c = &self.sh.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FileStats {
            bounces: g(&c.bounces),
            bounce_buffers: g(&c.bounce_buffers),
            short_resubmits: g(&c.short_resubmits),
            eof_zero_fills: g(&c.eof_zero_fills),
            backlogged: g(&c.backlogged),
            sync_ops: g(&c.sync_ops),
            channel_failures: g(&c.channel_failures),
            enter_errors: g(&c.enter_errors),
        }
    }

    /// Allocation map of `[sector, sector + sectors)` (clamped to the device) as runs of
    /// (length in sectors, allocated), from `SEEK_DATA`/`SEEK_HOLE` on regular files. Block
    /// devices, and files whose filesystem cannot tell, report everything allocated. Run edges
    /// are rounded so that allocated runs never shrink (a partly allocated sector is allocated).
    pub fn extents(&self, sector: Sector, sectors: u64) -> Vec<(u64, bool)> {
        let size = self.sh.size_bytes / SECTOR_SIZE as u64;
        let start = sector.min(size);
        let end = sector.saturating_add(sectors).min(size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, alloc: bool| {
            if n == 0 {
                return;
            }
            match out.last_mut() {
                Some((len, a)) if *a == alloc => *len += n,
                _ => out.push((n, alloc)),
            }
        };
        if self.sh.blockdev {
            push(end - start, true);
            return out;
        }
        let ss = SECTOR_SIZE as u64;
        let fd = &self.sh.file;
        let mut s = start;
        while s < end {
            let pos = s * ss;
            let data = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
                Ok(d) => d,
                // No data at or after `pos`: the rest is a hole.
                Err(rustix::io::Errno::NXIO) => u64::MAX,
                Err(_) => {
                    push(end - s, true);
                    break;
                }
            };
            if data > pos {
                // Hole up to the sector that holds the first data byte.
                let e = (data / ss).clamp(s, end);
                push(e - s, false);
                if e == s {
                    // Data begins inside sector `s` (an unaligned boundary): count it allocated.
                    push(1, true);
                    s += 1;
                } else {
                    s = e;
                }
                continue;
            }
            let hole = rustix::fs::seek(fd, SeekFrom::Hole(pos)).unwrap_or(u64::MAX);
            let e = hole.div_ceil(ss).clamp(s + 1, end);
            push(e - s, true);
            s = e;
        }
        out
    }
}

/// Tries one polled O_DIRECT read: `true` only if it completed with data. For a regular file it
/// reads the first block that holds data (a hole or an unwritten extent is answered without any
/// device I/O, which would prove nothing); a file without data answers `false`.
fn probe_iopoll(path: &Path, blockdev: bool, lbs: u32, mem_align: usize) -> bool {
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
    else {
        return false;
    };
    let off = if blockdev {
        0
    } else {
        match rustix::fs::seek(&f, SeekFrom::Data(0)) {
            Ok(d) => d / lbs as u64 * lbs as u64,
            Err(_) => return false,
        }
    };
    let Ok(mut ring) = IoUring::<squeue::Entry>::builder().setup_iopoll().build(4) else {
        return false;
    };
    let Some(buf) = AlignedBuf::new(lbs as usize, mem_align.max(4096)) else {
        return false;
    };
    let e = opcode::Read::new(types::Fd(f.as_raw_fd()), buf.ptr(), lbs)
        .offset(off)
        .build()
        .user_data(1);
    // SAFETY: `buf` is valid for `lbs` bytes and is freed only after its CQE was reaped; if the
    // CQE never comes, `buf` is leaked below rather than freed. `f` may close: the kernel holds
    // its own reference to the file while the read is in flight.
    if unsafe { ring.submission().push(&e) }.is_err() {
        return false;
    }
    let start = Instant::now();
    let res = loop {
        if let Err(e) = ring.submit() {
            let transient = matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
            );
            if !transient {
                break None;
            }
        }
        if let Some(c) = ring.completion().next() {
            break Some(c.result());
        }
        if start.elapsed() > PROBE_TIMEOUT {
            break None;
        }
        std::thread::yield_now();
    };
    match res {
        Some(r) => r > 0,
        None => {
            // The read may still be in flight: never free memory the kernel may write.
            std::mem::forget(buf);
            false
        }
    }
}

impl Leaf for FileLeaf {
    fn sync(&self) -> io::Result<()> {
        self.sh.file.sync_data()
    }

    fn kind(&self) -> &'static str {
        "file"
    }

    fn size(&self) -> Sector {
        self.sh.size_bytes / SECTOR_SIZE as u64
    }

    fn limits(&self) -> Limits {
        let sh = &self.sh;
        Limits {
            logical_block_bytes: sh.lbs,
            physical_block_bytes: sh.pbs,
            io_min_bytes: sh.pbs,
            max_sectors: sh.max_sectors,
            max_discard_sectors: sh.max_discard_sectors,
            // Copies inside the file go to the kernel (copy_file_range, reflink where it can).
            max_copy_sectors: u32::MAX,
            copy_native: true,
            poll: sh.iopoll,
            nowait: true,
            ..Limits::TOP
        }
    }

    fn args(&self) -> String {
        let mut s = self.sh.path.display().to_string();
        if self.sh.direct {
            s.push_str(" direct");
        }
        s
    }

    fn channel(&self) -> Box<dyn LeafChannel> {
        Box::new(FileChannel::new(self.sh.clone()))
    }

    /// `fstat` of the backing file (a size ioctl on a block device): `failed` with "backing
    /// file deleted" when it has no links left, "backing file truncated to N bytes (leaf is
    /// M)" when it is shorter than the leaf; `degraded` after an I/O error in the last 30 s
    /// (`EAGAIN` and unsupported operations aside); else `ok`. The last error stays reported
    /// after a recovery. Control plane; the daemon calls it every few seconds.
    fn health(&self) -> LeafHealth {
        self.sh.health.get(&self.sh)
    }

    /// Reads the first logical block (`pread` on a duplicate of the leaf's descriptor, into an
    /// aligned buffer under O_DIRECT). A read on a hung device cannot be interrupted, so it runs
    /// on a helper thread and the probe gives up on it after `timeout`; the next probe then
    /// waits for that same read instead of starting another.
    fn probe(&self, timeout: Duration) -> Result<(), String> {
        let sh = &self.sh;
        let path = sh.path.display();
        let mut pending = sh
            .pending_probe
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let rx = match pending.take() {
            Some(rx) => rx,
            None => {
                let file = sh
                    .file
                    .try_clone()
                    .map_err(|e| format!("probe {path}: {e}"))?;
                let len = (sh.lbs as u64).min(sh.size_bytes) as usize;
                let align = sh.mem_align;
                let (tx, rx) = mpsc::channel();
                std::thread::Builder::new()
                    .name("stackbd-probe".into())
                    .spawn(move || {
                        let _ = tx.send(read_first_block(&file, len, align));
                    })
                    .map_err(|e| format!("probe {path}: cannot start a thread: {e}"))?;
                rx
            }
        };
        match rx.recv_timeout(timeout) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("read {path}: {e}")),
            Err(RecvTimeoutError::Timeout) => {
                *pending = Some(rx);
                Err(format!("read {path}: no answer within {timeout:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => Err(format!("read {path}: probe thread died")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ioctl_numbers_match_linux_fs_h() {
        assert_eq!(BLKGETSIZE64 as u64, 0x8008_1272);
        assert_eq!(BLKDISCARD as u64, 0x1277);
        assert_eq!(BLKZEROOUT as u64, 0x127f);
    }
}
