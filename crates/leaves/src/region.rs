//! A zero-filled, lazily committed memory region: the backing store of the `mem` leaf.
//!
//! Anonymous private mappings are sparse for free: untouched pages read as zeros and cost
//! nothing, and `MADV_DONTNEED` gives pages back (they read as zeros again). Under Miri, which
//! cannot run `mmap`, a zeroed heap allocation stands in and discard writes zeros.
//!
//! The region is shared by every reactor. Like a disk's media it gives no ordering between
//! concurrent overlapping I/O; the engine only promises ordering between I/Os where one completed
//! before the other was submitted, which the reactors' queues provide.

use std::ptr::NonNull;

#[derive(Debug)]
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; accesses go through the methods below,
// which bound-check every range. Concurrent access from several reactors is the device-media
// model described in the module comment.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    pub(crate) fn new(len: usize) -> std::io::Result<Region> {
        let len = len.max(1);
        #[cfg(not(miri))]
        {
            use rustix::mm::{mmap_anonymous, MapFlags, ProtFlags};
            // SAFETY: a fresh anonymous mapping at an address the kernel chooses; nothing else
            // refers to that memory.
            let p = unsafe {
                mmap_anonymous(
                    std::ptr::null_mut(),
                    len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::PRIVATE | MapFlags::NORESERVE,
                )
            }?;
            Ok(Region {
                ptr: NonNull::new(p.cast()).expect("mmap returned null"),
                len,
            })
        }
        #[cfg(miri)]
        {
            let layout = std::alloc::Layout::from_size_align(len, crate::PAGE_BYTES).unwrap();
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            Ok(Region {
                ptr: NonNull::new(p).expect("allocation failed"),
                len,
            })
        }
    }

    fn check(&self, off: usize, n: usize) {
        assert!(
            off.checked_add(n).is_some_and(|e| e <= self.len),
            "region access out of range"
        );
    }

    /// Copies `[off, off + dst.len())` out.
    pub(crate) fn read(&self, off: usize, dst: &stackbd_core::DataBuf) {
        self.check(off, dst.len());
        // SAFETY: the range is inside the mapping (checked); `dst` is valid by the DataBuf
        // contract and is not part of this region.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_ptr(), dst.len())
        }
    }

    /// Copies `src` in at `off`.
    pub(crate) fn write(&self, off: usize, src: &stackbd_core::DataBuf) {
        self.check(off, src.len());
        // SAFETY: as in `read`, in the other direction.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len())
        }
    }

    /// Moves `n` bytes from `src` to `dst` inside the region (ranges may overlap: a memmove).
    pub(crate) fn copy_within(&self, src: usize, dst: usize, n: usize) {
        self.check(src, n);
        self.check(dst, n);
        // SAFETY: both ranges are inside the mapping (checked); `copy` allows overlap.
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(src), self.ptr.as_ptr().add(dst), n) }
    }

    /// Zeros `[off, off + n)` by writing.
    pub(crate) fn zero(&self, off: usize, n: usize) {
        self.check(off, n);
        // SAFETY: in range (checked).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off), 0, n) }
    }

    /// Gives whole pages back; they read as zeros afterwards. `off` and `n` are page multiples.
    pub(crate) fn release(&self, off: usize, n: usize) {
        self.check(off, n);
        #[cfg(not(miri))]
        {
            // SAFETY: a page-aligned range inside our private anonymous mapping; DONTNEED on it
            // only drops its contents (later reads see zero pages).
            let r = unsafe {
                rustix::mm::madvise(
                    self.ptr.as_ptr().add(off).cast(),
                    n,
                    rustix::mm::Advice::LinuxDontNeed,
                )
            };
            if r.is_err() {
                self.zero(off, n);
            }
        }
        #[cfg(miri)]
        self.zero(off, n);
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        #[cfg(not(miri))]
        // SAFETY: the mapping was made in `new` with this length and is not used after drop.
        unsafe {
            let _ = rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len);
        }
        #[cfg(miri)]
        // SAFETY: allocated in `new` with this layout.
        unsafe {
            std::alloc::dealloc(
                self.ptr.as_ptr(),
                std::alloc::Layout::from_size_align(self.len, crate::PAGE_BYTES).unwrap(),
            )
        }
    }
}
