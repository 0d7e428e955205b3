//! A reactor's io_uring channel to a file leaf (see the module docs of `file`). Reactor
//! thread only.

use super::aligned::{errno_status, io_status, AlignedBuf};
use super::{
    blk_range, bump, FileLeaf, Shared, BLKDISCARD, BLKZEROOUT, MAX_BOUNCE_BUFFERS, MAX_CHUNK_BYTES,
};
use io_uring::{opcode, squeue, types, IoUring, SubmissionQueue};
use rustix::fs::FallocateFlags;
use stackbd_core::leaf::{Extent, WaitHint};
use stackbd_core::{
    BioFlags, BioId, DataBuf, LeafChannel, LeafCx, Op, Sector, Status, SECTOR_SIZE,
};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

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
    pub(super) fn new(sh: Arc<Shared>) -> FileChannel {
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
                return noted(sh, &e, false);
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
            return noted(sh, &e, op != Op::Flush);
        }
        if op != Op::Flush && flags.contains(BioFlags::FUA) {
            if let Err(e) = sync() {
                return noted(sh, &e, false);
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
                cx.complete(id, noted(&self.sh, &e.into(), false));
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
                let st = errno_status(-res, s.op == SlotOp::Other);
                if counts_against_health(st) {
                    sh.health.io_error(-res);
                }
                s.status.merge(st);
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

/// An I/O error that says something about the leaf's health (not `EAGAIN` under NOWAIT, not an
/// operation the file does not support).
fn counts_against_health(st: Status) -> bool {
    !matches!(st, Status::Ok | Status::Again | Status::NotSupported)
}

/// The status of a failed synchronous operation, recorded in the leaf's health.
fn noted(sh: &Shared, e: &io::Error, space_op: bool) -> Status {
    let st = io_status(e, space_op);
    if counts_against_health(st) {
        sh.health.io_error(e.raw_os_error().unwrap_or(libc::EIO));
    }
    st
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
    fn user_data_carries_bio_slot_and_sqe() {
        let ud = tag(4095, BioId(0xdead_beef), SQE_POST_FLUSH);
        assert_eq!(ud as u32, 0xdead_beef);
        assert_eq!((ud >> 32) & 0xffff, 4095);
        assert_eq!(ud >> 48, SQE_POST_FLUSH);
    }
}
