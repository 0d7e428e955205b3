//! Small pieces of the file leaf's I/O: aligned buffers, the first-block read of a probe, and
//! errnos as bio statuses.

use stackbd_core::Status;
use std::alloc::Layout;
use std::fs::File;
use std::io;
use std::ptr::NonNull;

/// `pread` of `len` bytes at offset 0 into a buffer aligned to `align`.
pub(super) fn read_first_block(file: &File, len: usize, align: usize) -> io::Result<usize> {
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
pub(super) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by this value; moving it between threads moves the
// ownership with it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(super) fn new(len: usize, align: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).ok()?;
        // SAFETY: the layout has a non-zero size. Zeroed, so every byte is initialised.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        Some(AlignedBuf {
            ptr: NonNull::new(p)?,
            layout,
        })
    }

    pub(super) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The first `n` bytes (n <= len). Callers only look while no SQE on the buffer is in
    /// flight (before a piece is pushed, after its CQE is reaped), so the kernel is not writing.
    pub(super) fn bytes(&self, n: usize) -> &[u8] {
        assert!(n <= self.layout.size());
        // SAFETY: in bounds of an initialised allocation we own; no `&mut` to it is alive, and
        // (see above) the kernel is not writing to it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), n) }
    }

    pub(super) fn bytes_mut(&mut self, n: usize) -> &mut [u8] {
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
pub(super) fn errno_status(errno: i32, space_op: bool) -> Status {
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

pub(super) fn io_status(e: &io::Error, space_op: bool) -> Status {
    errno_status(e.raw_os_error().unwrap_or(libc::EIO), space_op)
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
    fn aligned_buffers_are_aligned_and_zeroed() {
        let mut b = AlignedBuf::new(8192, 4096).unwrap();
        assert_eq!(b.ptr() as usize % 4096, 0);
        assert!(b.bytes(8192).iter().all(|&x| x == 0));
        b.bytes_mut(4)[0] = 7;
        assert_eq!(b.bytes(1), &[7]);
    }
}
