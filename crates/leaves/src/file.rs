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

use io_uring::{opcode, squeue, types, IoUring, SubmissionQueue};
use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::ioctl::{opcode as ioc, Getter, Opcode, Setter};
use stackbd_core::leaf::{Extent, WaitHint};
use stackbd_core::{
    BioFlags, BioId, DataBuf, Leaf, LeafChannel, LeafCx, Limits, Op, Sector, Status, SECTOR_SIZE,
};
use std::alloc::Layout;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
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

/// `pread` of `len` bytes at offset 0 into a buffer aligned to `align`.
fn read_first_block(file: &File, len: usize, align: usize) -> io::Result<usize> {
    if len == 0 {
        return Ok(0);
    }
    let mut buf = AlignedBuf::new(len, align)
        .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "no aligned buffer"))?;
    loop {
        match rustix::io::pread(file, buf.bytes_mut(len), 0) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A heap buffer with a chosen alignment, for O_DIRECT bounces and the probe.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by this value; moving it between threads moves the
// ownership with it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).ok()?;
        // SAFETY: the layout has a non-zero size. Zeroed, so every byte is initialised.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        Some(AlignedBuf {
            ptr: NonNull::new(p)?,
            layout,
        })
    }

    fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The first `n` bytes (n <= len). Callers only look while no SQE on the buffer is in
    /// flight (before a piece is pushed, after its CQE is reaped), so the kernel is not writing.
    fn bytes(&self, n: usize) -> &[u8] {
        assert!(n <= self.layout.size());
        // SAFETY: in bounds of an initialised allocation we own; no `&mut` to it is alive, and
        // (see above) the kernel is not writing to it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), n) }
    }

    fn bytes_mut(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= self.layout.size());
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), n) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Maps an errno from a file operation to a bio status.
pub(crate) fn errno_status(errno: i32, space_op: bool) -> Status {
    match errno {
        libc::EIO | libc::ENODATA => Status::IoError,
        libc::ENOSPC | libc::EDQUOT => Status::NoSpace,
        libc::EOPNOTSUPP => Status::NotSupported,
        // fallocate / discard / zeroout say EINVAL for a mode the filesystem or device lacks.
        libc::EINVAL if space_op => Status::NotSupported,
        libc::EAGAIN => Status::Again,
        // What the block layer reports for a transport or a device that went away (its
        // BLK_STS_TRANSPORT, OFFLINE, NEXUS, TIMEOUT): path errors, which multipath retries on
        // another path. A medium error stays a target error.
        libc::ETIMEDOUT => Status::Timeout,
        libc::ENOLINK
        | libc::ENODEV
        | libc::ENXIO
        | libc::EBADE
        | libc::ESHUTDOWN
        | libc::ECONNRESET
        | libc::ENOTCONN
        | libc::EHOSTDOWN => Status::PathError,
        _ => Status::IoError,
    }
}

fn io_status(e: &io::Error, space_op: bool) -> Status {
    errno_status(e.raw_os_error().unwrap_or(libc::EIO), space_op)
}

/// What a slot is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotOp {
    Read,
    Write,
    /// fsync / fallocate: one SQE, no data.
    Other,
}

/// Per-slot progress of one bio in the ring.
#[derive(Clone, Copy, Debug)]
struct Slot {
    bio: BioId,
    op: SlotOp,
    /// Byte offset in the file of the bio's start.
    off: u64,
    total: u64,
    done: u64,
    /// Bytes of the read/write SQE in flight.
    chunk: u32,
    buf: DataBuf,
    /// Index of the bounce buffer, or `NO_BOUNCE`.
    bounce: u32,
    rw_flags: i32,
    /// CQEs this slot still waits for (including a resubmission not yet pushed).
    cqes: u8,
    /// A linked SQE was cancelled because the one before it failed.
    canceled: bool,
    status: Status,
}

const NO_BOUNCE: u32 = u32::MAX;

const IDLE_SLOT: Slot = Slot {
    bio: BioId(u32::MAX),
    op: SlotOp::Other,
    off: 0,
    total: 0,
    done: 0,
    chunk: 0,
    buf: DataBuf::EMPTY,
    bounce: NO_BOUNCE,
    rw_flags: 0,
    cqes: 0,
    canceled: false,
    status: Status::Ok,
};

// user_data: bio id (bits 0..32), slot (32..48), which SQE of the slot (48..56).
const SQE_MAIN: u64 = 0;
const SQE_PRE_FLUSH: u64 = 1;
const SQE_POST_FLUSH: u64 = 2;

#[inline]
fn tag(slot: u32, bio: BioId, which: u64) -> u64 {
    bio.0 as u64 | (slot as u64) << 32 | which << 48
}

/// The fixed-file index of the leaf's file in every channel's ring.
const FILE: types::Fixed = types::Fixed(0);

/// Everything of a channel but its ring (so both can be borrowed at once).
struct State {
    sh: Arc<Shared>,
    iopoll: bool,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Bios not started yet, in arrival order.
    backlog: VecDeque<BioId>,
    /// Slots whose next read/write piece found the SQ full.
    resubmit: VecDeque<u32>,
    bounce_bufs: Vec<AlignedBuf>,
    bounce_free: Vec<u32>,
    bounce_bytes: usize,
    /// SQEs pushed whose CQE has not been reaped yet.
    owed: usize,
    /// Bios completed through `cx.complete` (poll returns the difference).
    completed: usize,
}

/// One reactor's ring to a file leaf.
pub struct FileChannel {
    /// `None` if the ring could not be set up: every bio then fails with `IoError`.
    ring: Option<IoUring>,
    st: State,
}

impl FileChannel {
    fn new(sh: Arc<Shared>) -> FileChannel {
        let depth = sh.depth as usize;
        let (ring, iopoll) = match Self::make_ring(&sh) {
            Ok(r) => r,
            Err(_) => {
                bump(&sh.counters.channel_failures);
                (None, false)
            }
        };
        let bounce_cap = if sh.direct {
            depth.min(MAX_BOUNCE_BUFFERS)
        } else {
            0
        };
        let bounce_bytes = sh.max_sectors as usize * SECTOR_SIZE;
        FileChannel {
            ring,
            st: State {
                iopoll,
                slots: vec![IDLE_SLOT; depth],
                free: (0..depth as u32).rev().collect(),
                backlog: VecDeque::with_capacity(depth.max(1024) * 4),
                resubmit: VecDeque::with_capacity(depth),
                bounce_bufs: Vec::with_capacity(bounce_cap),
                bounce_free: Vec::with_capacity(bounce_cap),
                bounce_bytes,
                owed: 0,
                completed: 0,
                sh,
            },
        }
    }

    /// A ring with the file registered; polled if the leaf uses IOPOLL (falling back to a plain
    /// ring if a polled one cannot be made).
    fn make_ring(sh: &Shared) -> io::Result<(Option<IoUring>, bool)> {
        // Each slot has at most three CQEs out (pre-flush, op, post-flush): size the CQ so it
        // never overflows.
        let cq = (sh.depth * 4).next_power_of_two().min(65536);
        let build = |iopoll: bool| {
            let mut b = IoUring::builder();
            b.setup_cqsize(cq);
            if iopoll {
                b.setup_iopoll();
            }
            b.build(sh.depth)
        };
        let (ring, iopoll) = match sh.iopoll {
            true => match build(true) {
                Ok(r) => (r, true),
                Err(_) => (build(false)?, false),
            },
            false => (build(false)?, false),
        };
        ring.submitter().register_files(&[sh.file.as_raw_fd()])?;
        Ok((Some(ring), iopoll))
    }
}

impl State {
    /// Synchronous flush / discard / write-zeroes, with the bio's PREFLUSH and FUA.
    fn sync_op(&self, op: Op, flags: BioFlags, off: u64, len: u64) -> Status {
        let sh = &*self.sh;
        bump(&sh.counters.sync_ops);
        let f = &sh.file;
        let sync = || rustix::fs::fdatasync(f).map_err(io::Error::from);
        if op != Op::Flush && flags.contains(BioFlags::PREFLUSH) {
            if let Err(e) = sync() {
                return io_status(&e, false);
            }
        }
        let space = |mode| rustix::fs::fallocate(f, mode, off, len).map_err(io::Error::from);
        let r = match op {
            Op::Flush => sync(),
            Op::Discard if sh.blockdev => blk_range::<BLKDISCARD>(f, off, len),
            Op::WriteZeroes if sh.blockdev => blk_range::<BLKZEROOUT>(f, off, len),
            Op::Discard | Op::WriteZeroes => space(fallocate_mode(op, flags)),
            Op::Read | Op::Write | Op::Copy => unreachable!("not a synchronous op"),
        };
        if let Err(e) = r {
            return io_status(&e, op != Op::Flush);
        }
        if op != Op::Flush && flags.contains(BioFlags::FUA) {
            if let Err(e) = sync() {
                return io_status(&e, false);
            }
        }
        Status::Ok
    }

    /// Starts a bio: pushes its SQEs, or runs it synchronously and completes it. Returns false
    /// (and changes nothing) if it must wait: no free slot, no SQ room or no bounce buffer.
    fn start(&mut self, sq: &mut SubmissionQueue<'_>, cx: &mut LeafCx<'_>, id: BioId) -> bool {
        let bio = cx.bio(id);
        let (op, flags, data) = (bio.op, bio.flags, bio.data);
        let off = bio.sector * SECTOR_SIZE as u64;
        let total = bio.bytes() as u64;
        let sh = &*self.sh;
        let sync = match op {
            Op::Copy => {
                // Native copy inside the file: the kernel copies (reflinks where the filesystem
                // can). Synchronous: io_uring has no copy opcode.
                let src = bio.copy_src * SECTOR_SIZE as u64;
                let s = kernel_copy(&sh.file, src, &sh.file, off, total);
                self.completed += 1;
                cx.complete(id, s);
                return true;
            }
            Op::Discard | Op::WriteZeroes => sh.blockdev || self.iopoll,
            Op::Flush => self.iopoll,
            Op::Read | Op::Write => false,
        };
        if sync {
            let s = self.sync_op(op, flags, off, total);
            self.completed += 1;
            cx.complete(id, s);
            return true;
        }
        let preflush = op.is_write() && op != Op::Flush && flags.contains(BioFlags::PREFLUSH);
        // An IOPOLL ring takes no fsync: there the preflush is synchronous (below).
        let pre = preflush && !self.iopoll;
        let post = matches!(op, Op::Discard | Op::WriteZeroes) && flags.contains(BioFlags::FUA);
        let n = 1 + pre as usize + post as usize;
        if self.free.is_empty() || sq.capacity() - sq.len() < n {
            return false;
        }
        let bounce = if op.has_data()
            && sh.direct
            && (misaligned(data.as_ptr() as u64, sh.mem_align as u64)
                || misaligned(total, sh.lbs as u64))
        {
            match self.take_bounce() {
                Some(b) => b,
                None => return false,
            }
        } else {
            NO_BOUNCE
        };
        if preflush && self.iopoll {
            bump(&self.sh.counters.sync_ops);
            if let Err(e) = rustix::fs::fdatasync(&self.sh.file) {
                if bounce != NO_BOUNCE {
                    self.bounce_free.push(bounce);
                }
                self.completed += 1;
                cx.complete(id, io_status(&e.into(), false));
                return true;
            }
        }
        let i = self.free.pop().expect("checked above");
        // NOWAIT needs nothing here: submitting never blocks, and a bio that cannot start waits
        // in the backlog, not in a syscall. (RWF_NOWAIT would mean something else: fail a read
        // that misses the page cache, which io_uring serves without blocking anyway.)
        let mut rw_flags = 0;
        if op == Op::Write && flags.contains(BioFlags::FUA) {
            rw_flags |= libc::RWF_DSYNC;
        }
        self.slots[i as usize] = Slot {
            bio: id,
            op: match op {
                Op::Read => SlotOp::Read,
                Op::Write => SlotOp::Write,
                _ => SlotOp::Other,
            },
            off,
            total,
            done: 0,
            chunk: 0,
            buf: data,
            bounce,
            rw_flags,
            cqes: n as u8,
            canceled: false,
            status: Status::Ok,
        };
        let main = match op {
            Op::Read | Op::Write => self.rw_sqe(i),
            Op::Flush => opcode::Fsync::new(FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard | Op::WriteZeroes => opcode::Fallocate::new(FILE, total)
                .offset(off)
                .mode(fallocate_mode(op, flags).bits() as i32)
                .build(),
            Op::Copy => unreachable!("handled above"),
        }
        .user_data(tag(i, id, SQE_MAIN));
        let flush = |which| {
            opcode::Fsync::new(FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(tag(i, id, which))
        };
        let link = squeue::Flags::IO_LINK;
        let r = match (pre, post) {
            (false, false) => {
                // SAFETY: a read/write SQE points at the bio's data buffer, which the submitter
                // keeps valid and untouched until the bio completes, and the bio completes only
                // after this slot's last CQE was reaped (`finish`); or at a bounce buffer the
                // slot holds until then, which is freed only when the channel drops, after its
                // `Drop` waited for every outstanding CQE (or leaked the buffers). Fixed file 0
                // stays open: `Shared` owns it and every channel holds an `Arc<Shared>`.
                // Fsync/fallocate SQEs point at no memory.
                unsafe { sq.push(&main) }
            }
            (true, false) => {
                let e = [flush(SQE_PRE_FLUSH).flags(link), main];
                // SAFETY: as above; the fsync points at no memory.
                unsafe { sq.push_multiple(&e) }
            }
            (false, true) => {
                let e = [main.flags(link), flush(SQE_POST_FLUSH)];
                // SAFETY: as above.
                unsafe { sq.push_multiple(&e) }
            }
            (true, true) => {
                let e = [
                    flush(SQE_PRE_FLUSH).flags(link),
                    main.flags(link),
                    flush(SQE_POST_FLUSH),
                ];
                // SAFETY: as above.
                unsafe { sq.push_multiple(&e) }
            }
        };
        r.expect("SQ room checked above");
        self.owed += n;
        true
    }

    fn take_bounce(&mut self) -> Option<u32> {
        if let Some(b) = self.bounce_free.pop() {
            return Some(b);
        }
        if self.bounce_bufs.len() >= self.bounce_bufs.capacity() {
            return None;
        }
        let align = self.sh.mem_align.max(self.sh.lbs as usize).max(4096);
        let b = AlignedBuf::new(self.bounce_bytes, align)?;
        self.bounce_bufs.push(b);
        bump(&self.sh.counters.bounce_buffers);
        Some(self.bounce_bufs.len() as u32 - 1)
    }

    /// The read/write SQE for slot `i`'s next piece (a write through a bounce buffer copies the
    /// piece in first).
    fn rw_sqe(&mut self, i: u32) -> squeue::Entry {
        let s = &mut self.slots[i as usize];
        let rest = s.total - s.done;
        let (ptr, len) = if s.bounce != NO_BOUNCE {
            let len = rest.min(self.bounce_bytes as u64) as usize;
            let b = &mut self.bounce_bufs[s.bounce as usize];
            if s.op == SlotOp::Write {
                s.buf.read_into(s.done as usize, b.bytes_mut(len));
            }
            bump(&self.sh.counters.bounces);
            (b.ptr(), len as u32)
        } else {
            let len = rest.min(MAX_CHUNK_BYTES) as usize;
            (s.buf.slice(s.done as usize, len).as_ptr(), len as u32)
        };
        s.chunk = len;
        let at = s.off + s.done;
        let e = if s.op == SlotOp::Write {
            opcode::Write::new(FILE, ptr, len)
                .offset(at)
                .rw_flags(s.rw_flags)
                .build()
        } else {
            opcode::Read::new(FILE, ptr, len)
                .offset(at)
                .rw_flags(s.rw_flags)
                .build()
        };
        e.user_data(tag(i, s.bio, SQE_MAIN))
    }

    /// Pushes slot `i`'s next piece; false if the SQ is full.
    fn push_rw(&mut self, sq: &mut SubmissionQueue<'_>, i: u32) -> bool {
        if sq.is_full() {
            return false;
        }
        let e = self.rw_sqe(i);
        // SAFETY: as in `start`: the bio's buffer (or the slot's bounce buffer) stays valid and
        // untouched until this slot's last CQE is reaped, which comes before the bio completes.
        unsafe { sq.push(&e) }.expect("not full");
        self.owed += 1;
        true
    }

    /// Starts what waits: pieces to resubmit first, then backlogged bios, in order.
    fn refill(&mut self, sq: &mut SubmissionQueue<'_>, cx: &mut LeafCx<'_>) {
        while let Some(&i) = self.resubmit.front() {
            if !self.push_rw(sq, i) {
                return;
            }
            self.resubmit.pop_front();
        }
        while let Some(&id) = self.backlog.front() {
            if !self.start(sq, cx, id) {
                return;
            }
            self.backlog.pop_front();
        }
    }

    /// Handles one CQE.
    fn on_cqe(&mut self, sq: &mut SubmissionQueue<'_>, cx: &mut LeafCx<'_>, ud: u64, res: i32) {
        let i = ((ud >> 32) & 0xffff) as u32;
        let which = ud >> 48;
        self.owed -= 1;
        let sh = &*self.sh;
        let s = &mut self.slots[i as usize];
        debug_assert_eq!(s.bio.0, ud as u32, "CQE for a slot that moved on");
        s.cqes -= 1;
        if res < 0 {
            if -res == libc::ECANCELED {
                s.canceled = true;
            } else {
                s.status.merge(errno_status(-res, s.op == SlotOp::Other));
            }
        } else if which == SQE_MAIN && s.op != SlotOp::Other {
            let n = res as u64;
            if s.op == SlotOp::Read && s.bounce != NO_BOUNCE && n > 0 {
                let b = &self.bounce_bufs[s.bounce as usize];
                s.buf.write_from(s.done as usize, b.bytes(n as usize));
            }
            s.done += n;
            if s.done < s.total {
                let eof =
                    s.op == SlotOp::Read && (n == 0 || (sh.direct && misaligned(n, sh.lbs as u64)));
                if eof {
                    // Past the end of the file: the rest reads as zeros.
                    s.buf
                        .slice(s.done as usize, (s.total - s.done) as usize)
                        .fill_zero();
                    s.done = s.total;
                    bump(&sh.counters.eof_zero_fills);
                } else if n == 0 {
                    // A write that makes no progress would loop forever.
                    s.status.merge(Status::IoError);
                } else {
                    if n < s.chunk as u64 {
                        bump(&sh.counters.short_resubmits);
                    }
                    s.cqes += 1;
                    if !self.push_rw(sq, i) {
                        self.resubmit.push_back(i);
                    }
                    return;
                }
            }
        }
        if self.slots[i as usize].cqes == 0 {
            self.finish(cx, i);
        }
    }

    /// Completes slot `i`'s bio and frees the slot and its bounce buffer.
    fn finish(&mut self, cx: &mut LeafCx<'_>, i: u32) {
        let s = &mut self.slots[i as usize];
        if s.canceled {
            s.status.merge(Status::IoError);
        }
        let (id, status, bounce) = (s.bio, s.status, s.bounce);
        *s = IDLE_SLOT;
        if bounce != NO_BOUNCE {
            self.bounce_free.push(bounce);
        }
        self.free.push(i);
        self.completed += 1;
        cx.complete(id, status);
    }
}

/// `x` is not a multiple of `align` (a power of two).
#[inline]
fn misaligned(x: u64, align: u64) -> bool {
    debug_assert!(align.is_power_of_two());
    x & (align - 1) != 0
}

fn fallocate_mode(op: Op, flags: BioFlags) -> FallocateFlags {
    if op == Op::WriteZeroes && flags.contains(BioFlags::NO_HOLE) {
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
    } else {
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
    }
}

/// Copies `len` bytes between two files (or within one) with `copy_file_range`.
pub fn kernel_copy(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> Status {
    let (mut so, mut d_o, mut left) = (src_off, dst_off, len);
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut so), dst, Some(&mut d_o), chunk) {
            Ok(0) => {
                // Past the end of the source: the rest reads as zeros.
                return zero_fill(dst, d_o, left);
            }
            Ok(n) => left -= n as u64,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return errno_status(e.raw_os_error(), false),
        }
    }
    Status::Ok
}

fn zero_fill(dst: &File, off: u64, len: u64) -> Status {
    let zeros = [0u8; 4096];
    let (mut o, mut left) = (off, len);
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        match rustix::io::pwrite(dst, &zeros[..n], o) {
            Ok(w) => {
                o += w as u64;
                left -= w as u64;
            }
            Err(e) => return errno_status(e.raw_os_error(), false),
        }
    }
    Status::Ok
}

impl LeafChannel for FileChannel {
    fn copy_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        use std::os::fd::AsRawFd;
        let st = rustix::fs::fstat(&self.st.sh.file).ok()?;
        Some((self.st.sh.file.as_raw_fd(), st.st_dev))
    }

    fn kernel_copy_to(
        &self,
        src: Sector,
        dst: &dyn LeafChannel,
        dst_sector: Sector,
        sectors: Sector,
    ) -> Option<Status> {
        let (sfd, sfs) = self.copy_fd()?;
        let (dfd, dfs) = dst.copy_fd()?;
        if sfs != dfs {
            return None;
        }
        // SAFETY: both fds belong to leaf channels the caller holds (this one and `dst`), open
        // for the whole call.
        let (sf, df) = unsafe {
            (
                std::os::fd::BorrowedFd::borrow_raw(sfd),
                std::os::fd::BorrowedFd::borrow_raw(dfd),
            )
        };
        let bytes = sectors.checked_mul(SECTOR_SIZE as u64)?;
        let (mut so, mut d_o) = (
            src.checked_mul(SECTOR_SIZE as u64)?,
            dst_sector.checked_mul(SECTOR_SIZE as u64)?,
        );
        let mut left = usize::try_from(bytes).ok()?;
        let all = left;
        while left > 0 {
            match rustix::fs::copy_file_range(sf, Some(&mut so), df, Some(&mut d_o), left) {
                Ok(0) => return Some(Status::IoError),
                Ok(n) => left -= n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::NOSPC) => return Some(Status::NoSpace),
                // Cross-device or unsupported after all: let the layer emulate instead.
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::INVAL,
                ) if left == all => return None,
                Err(_) => return Some(Status::IoError),
            }
        }
        Some(Status::Ok)
    }

    fn submit(&mut self, cx: &mut LeafCx<'_>, id: BioId) {
        let Some(ring) = self.ring.as_mut() else {
            cx.complete(id, Status::IoError);
            return;
        };
        let st = &mut self.st;
        if st.backlog.is_empty() && st.start(&mut ring.submission(), cx, id) {
            return;
        }
        // Preallocated; past its capacity it grows (still correct, no longer allocation-free).
        st.backlog.push_back(id);
        bump(&st.sh.counters.backlogged);
    }

    fn poll(&mut self, cx: &mut LeafCx<'_>) -> usize {
        let Some(ring) = self.ring.as_mut() else {
            return 0;
        };
        let st = &mut self.st;
        let before = st.completed;
        let (submitter, mut sq, mut cq) = ring.split();
        st.refill(&mut sq, cx);
        sq.sync();
        // One enter for the whole batch, and none when there is nothing to submit and the kernel
        // posts completions by itself (a plain ring that has not overflowed).
        let enter =
            !sq.is_empty() || (st.iopoll && st.owed > 0) || sq.cq_overflow() || sq.taskrun();
        if enter {
            if let Err(e) = submitter.submit() {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) {
                    bump(&st.sh.counters.enter_errors);
                }
            }
            // See what the kernel consumed, so the refill below has the room it freed.
            sq.sync();
        }
        cq.sync();
        for cqe in &mut cq {
            st.on_cqe(&mut sq, cx, cqe.user_data(), cqe.result());
        }
        cq.sync();
        st.refill(&mut sq, cx);
        sq.sync();
        st.completed - before
    }

    fn needs_poll(&self) -> bool {
        true
    }

    fn extents(&self, sector: Sector, sectors: Sector, out: &mut Vec<Extent>) {
        let leaf = FileLeaf {
            sh: self.st.sh.clone(),
        };
        for (n, alloc) in leaf.extents(sector, sectors) {
            let flags = if alloc {
                0
            } else {
                Extent::HOLE | Extent::ZERO
            };
            out.push(Extent { sectors: n, flags });
        }
    }

    fn prepare_wait(&mut self) -> WaitHint {
        let Some(ring) = self.ring.as_mut() else {
            return WaitHint::Idle;
        };
        // SQEs pushed after the last enter (resubmits, backlog refills) must reach the kernel
        // before the reactor sleeps, or their completions would never come.
        if !ring.submission().is_empty() {
            let _ = ring.submit();
        }
        if self.st.owed == 0 && self.st.backlog.is_empty() {
            WaitHint::Idle
        } else if self.st.iopoll {
            WaitHint::Spin
        } else {
            WaitHint::Fd(std::os::fd::AsRawFd::as_raw_fd(ring))
        }
    }
}

impl Drop for FileChannel {
    fn drop(&mut self) {
        // The kernel may still write into bounce buffers (or read bio buffers) for SQEs in
        // flight: wait for their CQEs before the buffers go.
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let mut errors = 0;
        while self.st.owed > 0 && errors < 100 {
            if let Err(e) = ring.submit_and_wait(1) {
                if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                    errors += 1;
                }
            }
            for _ in ring.completion() {
                self.st.owed -= 1;
            }
        }
        if self.st.owed > 0 {
            // Could not drain: leak the bounce buffers rather than free memory in use.
            std::mem::forget(std::mem::take(&mut self.st.bounce_bufs));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_map_to_statuses() {
        assert_eq!(errno_status(libc::EIO, false), Status::IoError);
        assert_eq!(errno_status(libc::ENODATA, false), Status::IoError);
        assert_eq!(errno_status(libc::ENOSPC, false), Status::NoSpace);
        assert_eq!(errno_status(libc::EDQUOT, true), Status::NoSpace);
        assert_eq!(errno_status(libc::EOPNOTSUPP, true), Status::NotSupported);
        assert_eq!(errno_status(libc::EINVAL, true), Status::NotSupported);
        assert_eq!(errno_status(libc::EINVAL, false), Status::IoError);
        assert_eq!(errno_status(libc::EAGAIN, false), Status::Again);
        assert_eq!(errno_status(libc::EBADF, false), Status::IoError);
        assert_eq!(errno_status(libc::ENOLINK, false), Status::PathError);
        assert_eq!(errno_status(libc::ENODEV, false), Status::PathError);
        assert_eq!(errno_status(libc::ETIMEDOUT, false), Status::Timeout);
    }

    #[test]
    fn user_data_carries_bio_slot_and_sqe() {
        let ud = tag(4095, BioId(0xdead_beef), SQE_POST_FLUSH);
        assert_eq!(ud as u32, 0xdead_beef);
        assert_eq!((ud >> 32) & 0xffff, 4095);
        assert_eq!(ud >> 48, SQE_POST_FLUSH);
    }

    #[test]
    fn block_ioctl_numbers_match_linux_fs_h() {
        assert_eq!(BLKGETSIZE64 as u64, 0x8008_1272);
        assert_eq!(BLKDISCARD as u64, 0x1277);
        assert_eq!(BLKZEROOUT as u64, 0x127f);
    }

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        let mut b = AlignedBuf::new(8192, 4096).unwrap();
        assert_eq!(b.ptr() as usize % 4096, 0);
        assert!(b.bytes(8192).iter().all(|&x| x == 0));
        b.bytes_mut(4)[0] = 7;
        assert_eq!(b.bytes(1), &[7]);
    }
}
