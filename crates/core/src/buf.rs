//! The submitter's data buffer as a bio sees it.
//!
//! A bio does not own its data: the submitter does, and keeps it alive and untouched until the
//! bio completes (DESIGN: "data buffers belong to the submitter"). That contract is made once, in
//! the `unsafe` constructor [`DataBuf::from_raw`]; every access after it is safe. Clones made by
//! a split point into disjoint ranges of their parent's buffer.

use std::ptr::NonNull;

/// A view of `len` bytes of submitter memory.
#[derive(Clone, Copy, Debug)]
pub struct DataBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a DataBuf is a borrowed view whose lifetime is guaranteed by the contract of
// `from_raw`; moving the view to another thread (a reactor) does not change that contract, and the
// submitter may not touch the memory until completion, so there is one user at a time.
unsafe impl Send for DataBuf {}

impl DataBuf {
    /// A buffer of length zero (flush, discard, write-zeroes).
    pub const EMPTY: DataBuf = DataBuf {
        ptr: NonNull::dangling(),
        len: 0,
    };

    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes from now until the bio that carries
    /// this buffer (and every clone of it) has completed, and nothing else may access that memory
    /// in the meantime.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> DataBuf {
        DataBuf {
            ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
            len,
        }
    }

    /// A buffer over a mutable slice.
    ///
    /// # Safety
    /// As for [`DataBuf::from_raw`]: the caller must keep `slice` alive and untouched until the
    /// bio completes, although the borrow checker no longer sees it.
    pub unsafe fn from_slice(slice: &mut [u8]) -> DataBuf {
        // SAFETY: forwarded to the caller.
        unsafe { DataBuf::from_raw(slice.as_mut_ptr(), slice.len()) }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sub-range `[off, off + len)`. Panics if it is out of bounds (a core bug).
    #[inline]
    pub fn slice(&self, off: usize, len: usize) -> DataBuf {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "DataBuf::slice out of range"
        );
        if len == 0 {
            return DataBuf::EMPTY;
        }
        // SAFETY: off + len <= self.len, so the result stays inside the region of `from_raw`.
        DataBuf {
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(off)) },
            len,
        }
    }

    /// The window `n` bytes before this one, up to the same end: undoes `slice(n, len - n)`.
    /// Only the split code calls it, with the exact amount it advanced this same window by, so
    /// the result is the window the bio had before the split, inside the `from_raw` region.
    pub(crate) fn unadvance(&self, n: usize) -> DataBuf {
        if n == 0 {
            return *self;
        }
        // SAFETY: `self` was obtained as `orig.slice(n, orig.len - n)`, so `ptr - n` is `orig.ptr`,
        // inside the same allocation, and `len + n` is `orig.len`.
        DataBuf {
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().sub(n)) },
            len: self.len + n,
        }
    }

    /// Raw pointer, for leaves that hand the memory to the kernel (io_uring).
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The window as bytes, to hand to a syscall (a socket `writev`).
    ///
    /// # Safety
    /// A `DataBuf` is a copyable view, so the type cannot stop two views of one range from
    /// making a `&[u8]` and a `&mut [u8]` at once. The caller must hold the window the way
    /// [`crate::LeafChannel::submit`] gives it: the bio is submitted to it and not yet
    /// completed, and while the slice lives nothing writes the range through another view.
    /// (The copying methods below are safe: they never make a Rust reference to the memory.)
    pub unsafe fn as_bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the region is valid for `len` bytes until the bio completes (the `from_raw`
        // contract) and, by this function's contract, not written while the slice lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The window as mutable bytes, to receive into (a socket `read`).
    ///
    /// # Safety
    /// As for [`DataBuf::as_bytes`], and more: while the slice lives nothing else reads or
    /// writes the range through any view.
    pub unsafe fn as_bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: valid region (the `from_raw` contract); exclusive while the slice lives (this
        // function's contract).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Copies `dst.len()` bytes from offset `off` out of the buffer.
    #[inline]
    pub fn read_into(&self, off: usize, dst: &mut [u8]) {
        assert!(off
            .checked_add(dst.len())
            .is_some_and(|end| end <= self.len));
        if dst.is_empty() {
            return;
        }
        // SAFETY: in bounds (checked above) of a region valid by the `from_raw` contract; `dst`
        // is a distinct Rust borrow, so the two cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Copies `src` into the buffer at offset `off`.
    #[inline]
    pub fn write_from(&self, off: usize, src: &[u8]) {
        assert!(off
            .checked_add(src.len())
            .is_some_and(|end| end <= self.len));
        if src.is_empty() {
            return;
        }
        // SAFETY: as in `read_into`.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len())
        }
    }

    /// Fills the whole buffer with zeros.
    #[inline]
    pub fn fill_zero(&self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the whole region is valid for writes by the `from_raw` contract.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), 0, self.len) }
    }

    /// Copies from this buffer into another one (emulated copy, RAM moves).
    pub fn copy_to(&self, src_off: usize, dst: &DataBuf, dst_off: usize, len: usize) {
        assert!(src_off.checked_add(len).is_some_and(|e| e <= self.len));
        assert!(dst_off.checked_add(len).is_some_and(|e| e <= dst.len));
        if len == 0 {
            return;
        }
        // SAFETY: both ranges are in bounds of regions valid by contract; `copy` allows overlap.
        unsafe {
            std::ptr::copy(
                self.ptr.as_ptr().add(src_off),
                dst.ptr.as_ptr().add(dst_off),
                len,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_read_and_write_in_place() {
        let mut mem = vec![0u8; 64];
        // SAFETY: `mem` outlives every use below and is not touched through another path.
        let buf = unsafe { DataBuf::from_slice(&mut mem) };
        let tail = buf.slice(32, 32);
        tail.write_from(0, &[7u8; 32]);
        let mut out = [0u8; 4];
        buf.read_into(30, &mut out);
        assert_eq!(out, [0, 0, 7, 7]);
        buf.slice(0, 16).fill_zero();
        buf.copy_to(32, &buf, 8, 16);
        let adv = buf.slice(16, 48);
        let back = adv.unadvance(16);
        assert_eq!((back.as_ptr(), back.len()), (buf.as_ptr(), buf.len()));
        assert_eq!(&mem[8..24], &[7u8; 16]);
        assert!(mem[..8].iter().all(|&b| b == 0));
    }

    #[test]
    #[should_panic]
    fn out_of_range_slice_panics() {
        let mut mem = vec![0u8; 8];
        // SAFETY: `mem` outlives the buffer.
        let buf = unsafe { DataBuf::from_slice(&mut mem) };
        let _ = buf.slice(4, 8);
    }

    #[test]
    fn byte_views_see_the_window() {
        let mut mem: Vec<u8> = (0..32).collect();
        // SAFETY: `mem` outlives the views below.
        let buf = unsafe { DataBuf::from_slice(&mut mem) };
        // SAFETY: no other view of `mem` is used while these slices live.
        unsafe {
            assert_eq!(buf.slice(4, 4).as_bytes(), &[4, 5, 6, 7]);
            buf.slice(8, 2)
                .as_bytes_mut()
                .copy_from_slice(&[0xaa, 0xbb]);
            assert!(DataBuf::EMPTY.as_bytes().is_empty());
        }
        assert_eq!(&mem[7..11], &[7, 0xaa, 0xbb, 10]);
    }

    #[test]
    fn empty_buffer_is_inert() {
        let b = DataBuf::EMPTY;
        b.fill_zero();
        b.read_into(0, &mut []);
        assert!(b.is_empty());
        assert!(b.slice(0, 0).is_empty());
    }
}
