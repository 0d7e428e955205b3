//! A zero-filled, lazily committed memory region: the backing store of the `mem` leaf.
//!
//! Anonymous private mappings are sparse for free: untouched pages read as zeros and cost
//! nothing, and `MADV_DONTNEED` gives pages back (they read as zeros again). Under Miri, which
//! cannot run `mmap`, a zeroed heap allocation stands in and discard writes zeros.
//!
//! The region is shared by every reactor. Like a disk's media it gives no ordering between
//! concurrent overlapping I/O; the engine only promises ordering between I/Os where one completed
//! before the other was submitted, which the reactors' queues provide.
//!
//! Concurrent overlapping I/O must still be defined behaviour in Rust, where a plain copy racing
//! with another plain copy is a data race (undefined behaviour, whatever the hardware does). So
//! the region is an array of `AtomicU64` words, and every access to it is a relaxed atomic load
//! or store of a whole, aligned word: on x86-64 and aarch64 these compile to plain moves, but they
//! are defined when they race. The result of overlapping I/O is then what a disk gives: each
//! aligned 8-byte word holds one of the values written to it (torn between words, never within
//! one). A range that starts or ends inside a word reads the whole word and keeps its bytes, and
//! writes it with a compare-exchange loop that changes only its own bytes; one access size for
//! the whole region means no mixed-size atomics either. Submitter buffers (`DataBuf`) are
//! accessed with plain unaligned loads and stores: the submitter gives the bio sole use of them.
//!
//! On x86-64 (outside Miri) the word loop is replaced by `rep movsb`/`rep stosb` in `asm!`
//! blocks, defined for the reason given at [`rep_movsb`]: the word loop costs about a third of
//! the 4 KiB read IOPS of a hot region (bench/mem-linear.toml, BENCHMARKS.md), `rep movsb` none.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Copies `n` bytes from `src` to `dst` with `rep movsb`, as one `asm!` block.
///
/// Why this is defined when the region side races with another reactor: an `asm!` block is
/// opaque to the compiler and its effect is that of the machine instructions, which must be one
/// that some Rust code could have had. `rep movsb` loads and stores each byte once, and the
/// hardware gives racing byte accesses a defined value (some byte that was stored), so its effect
/// is that of a loop of relaxed `AtomicU8` loads and stores. On x86-64 every region access goes
/// through these two blocks (never the `AtomicU64` path below, which is Miri's and other
/// targets'), so region accesses never mix atomic sizes. Unlike the word path, overlapping I/O
/// may tear inside a word, which a disk allows too. With ERMS/FSRM (every x86-64 core of the
/// last decade) `rep movsb` is as fast as `memcpy` for the sizes a bio carries.
///
/// # Safety
/// `src` valid for `n` reads and `dst` for `n` writes; the ranges do not overlap; any memory
/// that another thread may access at the same time is only ever accessed through these blocks.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
unsafe fn rep_movsb(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: forwarded to the caller; the direction flag is clear on entry (the ABI), so the
    // copy runs forward over exactly `n` bytes.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        )
    }
}

/// Zeros `n` bytes at `dst` with `rep stosb`; as [`rep_movsb`] (a loop of relaxed byte stores).
///
/// # Safety
/// `dst` valid for `n` writes, under the same rule as [`rep_movsb`] for racing memory.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
unsafe fn rep_stosb_zero(dst: *mut u8, n: usize) {
    // SAFETY: forwarded to the caller; the direction flag is clear on entry (the ABI).
    unsafe {
        std::arch::asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            in("al") 0u8,
            options(nostack, preserves_flags)
        )
    }
}

/// The unit of access: one `AtomicU64`.
const WORD: usize = 8;

#[derive(Debug)]
pub(crate) struct Region {
    /// Aligned to a page (mmap, or the Miri heap layout), so to a word.
    ptr: NonNull<u8>,
    /// The bytes callers may address.
    len: usize,
}

// SAFETY: the region is memory owned by this value; every access to it goes through the methods
// below, which bound-check each range and use only atomic word accesses, so concurrent access from
// several reactors is defined (the device-media model in the module comment).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

/// `bytes` rounded up to whole words: the size of the mapping or allocation.
fn alloc_len(bytes: usize) -> usize {
    bytes.div_ceil(WORD) * WORD
}

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
                    alloc_len(len),
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
            let layout =
                std::alloc::Layout::from_size_align(alloc_len(len), crate::PAGE_BYTES).unwrap();
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

    /// Word `i` of the region. `i` must be below `alloc_len(self.len) / WORD`.
    #[inline(always)]
    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < alloc_len(self.len) / WORD);
        // SAFETY: the mapping is page-aligned and `alloc_len(len)` bytes long, so word `i` is an
        // aligned, in-bounds u64 that lives as long as `self`. The region's memory is only ever
        // accessed through such atomics (and by the kernel in `release`), never non-atomically.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().cast::<u64>().add(i)) }
    }

    /// Stores `bytes` at lanes `lane..lane + bytes.len()` of word `i`, keeping its other bytes.
    fn put_partial(&self, i: usize, lane: usize, bytes: &[u8]) {
        let w = self.word(i);
        let mut cur = w.load(Relaxed);
        loop {
            let mut b = cur.to_ne_bytes();
            b[lane..lane + bytes.len()].copy_from_slice(bytes);
            match w.compare_exchange_weak(cur, u64::from_ne_bytes(b), Relaxed, Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Copies `[off, off + n)` of the region to `dst`.
    ///
    /// # Safety
    /// `off + n <= self.len`, and `dst` is valid for `n` plain writes that nothing else accesses
    /// meanwhile (it is not in this region).
    unsafe fn get(&self, off: usize, dst: *mut u8, n: usize) {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            // SAFETY: `off + n` is inside the region and `dst` valid for `n` bytes (caller); see
            // `rep_movsb` for why the racing region side is defined.
            unsafe { rep_movsb(dst, self.ptr.as_ptr().add(off), n) };
            return;
        }
        #[allow(unreachable_code)]
        let (mut pos, mut at) = (0, off);
        if at % WORD != 0 && n > 0 {
            let lane = at % WORD;
            let k = (WORD - lane).min(n);
            let b = self.word(at / WORD).load(Relaxed).to_ne_bytes();
            // SAFETY: `k <= n` bytes of `dst` (caller); `b` is a local.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr().add(lane), dst, k) };
            (pos, at) = (k, at + k);
        }
        let first = at / WORD;
        let words = (n - pos) / WORD;
        for j in 0..words {
            let v = self.word(first + j).load(Relaxed);
            // SAFETY: `pos + WORD * (j + 1) <= n` bytes of `dst` (caller); unaligned is allowed.
            unsafe { dst.add(pos + WORD * j).cast::<u64>().write_unaligned(v) };
        }
        (pos, at) = (pos + WORD * words, at + WORD * words);
        if pos < n {
            let b = self.word(at / WORD).load(Relaxed).to_ne_bytes();
            // SAFETY: the last `n - pos < WORD` bytes of `dst` (caller); `b` is a local.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), dst.add(pos), n - pos) };
        }
    }

    /// Copies `n` bytes from `src` (zeros if `ZERO`, and then `src` is not read) into
    /// `[off, off + n)` of the region.
    ///
    /// # Safety
    /// `off + n <= self.len`, and unless `ZERO`, `src` is valid for `n` plain reads that nothing
    /// writes meanwhile (it is not in this region).
    unsafe fn put<const ZERO: bool>(&self, off: usize, src: *const u8, n: usize) {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            // SAFETY: `off + n` is inside the region and, unless ZERO, `src` valid for `n`
            // bytes (caller); see `rep_movsb` for why the racing region side is defined.
            unsafe {
                let dst = self.ptr.as_ptr().add(off);
                if ZERO {
                    rep_stosb_zero(dst, n);
                } else {
                    rep_movsb(dst, src, n);
                }
            }
            return;
        }
        #[allow(unreachable_code)]
        let mut buf = [0u8; WORD];
        // The next `k` source bytes as a slice (a local copy; zeros for ZERO).
        let mut src_bytes = |pos: usize, k: usize| -> [u8; WORD] {
            if !ZERO {
                // SAFETY: `pos + k <= n` bytes of `src` (caller); `buf` is a local.
                unsafe { std::ptr::copy_nonoverlapping(src.add(pos), buf.as_mut_ptr(), k) };
            }
            buf
        };
        let (mut pos, mut at) = (0, off);
        if at % WORD != 0 && n > 0 {
            let lane = at % WORD;
            let k = (WORD - lane).min(n);
            self.put_partial(at / WORD, lane, &src_bytes(0, k)[..k]);
            (pos, at) = (k, at + k);
        }
        let first = at / WORD;
        let words = (n - pos) / WORD;
        for j in 0..words {
            let v = if ZERO {
                0
            } else {
                // SAFETY: `pos + WORD * (j + 1) <= n` bytes of `src` (caller); unaligned is fine.
                unsafe { src.add(pos + WORD * j).cast::<u64>().read_unaligned() }
            };
            self.word(first + j).store(v, Relaxed);
        }
        (pos, at) = (pos + WORD * words, at + WORD * words);
        if pos < n {
            let k = n - pos;
            self.put_partial(at / WORD, 0, &src_bytes(pos, k)[..k]);
        }
    }

    /// Copies `[off, off + dst.len())` out.
    pub(crate) fn read(&self, off: usize, dst: &stackbd_core::DataBuf) {
        self.check(off, dst.len());
        // SAFETY: the range is inside the region (checked); `dst` is valid and ours alone by the
        // DataBuf contract, and is not part of this region.
        unsafe { self.get(off, dst.as_ptr(), dst.len()) }
    }

    /// Copies `src` in at `off`.
    pub(crate) fn write(&self, off: usize, src: &stackbd_core::DataBuf) {
        self.check(off, src.len());
        // SAFETY: as in `read`, in the other direction.
        unsafe { self.put::<false>(off, src.as_ptr(), src.len()) }
    }

    /// Moves `n` bytes from `src` to `dst` inside the region (ranges may overlap: a memmove).
    /// Goes through a bounce buffer on the stack, a chunk at a time, in the direction that reads
    /// each source chunk before any of it is overwritten.
    pub(crate) fn copy_within(&self, src: usize, dst: usize, n: usize) {
        self.check(src, n);
        self.check(dst, n);
        const CHUNK: usize = 4096;
        let mut bounce = [0u8; CHUNK];
        let backward = dst > src && dst < src + n;
        let chunks = n.div_ceil(CHUNK);
        for c in 0..chunks {
            let c = if backward { chunks - 1 - c } else { c };
            let at = c * CHUNK;
            let k = CHUNK.min(n - at);
            // SAFETY: both ranges are inside the region (checked); `bounce` is a local of at
            // least `k` bytes.
            unsafe {
                self.get(src + at, bounce.as_mut_ptr(), k);
                self.put::<false>(dst + at, bounce.as_ptr(), k);
            }
        }
    }

    /// Zeros `[off, off + n)` by writing.
    pub(crate) fn zero(&self, off: usize, n: usize) {
        self.check(off, n);
        // SAFETY: in range (checked); with ZERO the source is not read.
        unsafe { self.put::<true>(off, std::ptr::null(), n) }
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
            let _ = rustix::mm::munmap(self.ptr.as_ptr().cast(), alloc_len(self.len));
        }
        #[cfg(miri)]
        // SAFETY: allocated in `new` with this layout.
        unsafe {
            std::alloc::dealloc(
                self.ptr.as_ptr(),
                std::alloc::Layout::from_size_align(alloc_len(self.len), crate::PAGE_BYTES)
                    .unwrap(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stackbd_core::DataBuf;

    /// Two threads write, and read, overlapping ranges of one region at once, like two reactors
    /// serving overlapping I/O. The result of the overlap is unspecified (any mix of the two
    /// writes), but it must not be a data race: Miri checks that.
    #[test]
    fn concurrent_overlapping_access() {
        let r = Region::new(256).unwrap();
        std::thread::scope(|s| {
            for (fill, off) in [(0xaau8, 3usize), (0x55, 61)] {
                let r = &r;
                s.spawn(move || {
                    let mut src = vec![fill; 150];
                    let mut dst = vec![0u8; 150];
                    // SAFETY: both vectors outlive their buffers and are only used through them.
                    let (sb, db) =
                        unsafe { (DataBuf::from_slice(&mut src), DataBuf::from_slice(&mut dst)) };
                    r.write(off, &sb);
                    r.read(off - 1, &db);
                    r.copy_within(off, off + 5, 90);
                    r.zero(off + 7, 20);
                    // Each byte is one of the values some thread stored there.
                    assert!(dst.iter().all(|b| [0, 0xaa, 0x55].contains(b)));
                });
            }
        });
    }

    /// Reads, writes, zeroing and overlapping moves at every alignment match a plain byte array.
    #[test]
    fn matches_a_byte_array() {
        const LEN: usize = 203;
        let r = Region::new(LEN).unwrap();
        let mut model = vec![0u8; LEN];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        for round in 0..if cfg!(miri) { 60 } else { 2000 } {
            let off = next(LEN);
            let n = next(LEN - off + 1);
            match round % 4 {
                0 => {
                    let mut src: Vec<u8> = (0..n).map(|i| (i + round) as u8 | 1).collect();
                    // SAFETY: `src` outlives the buffer.
                    r.write(off, &unsafe { DataBuf::from_slice(&mut src) });
                    model[off..off + n].copy_from_slice(&src);
                }
                1 => {
                    r.zero(off, n);
                    model[off..off + n].fill(0);
                }
                2 => {
                    let to = next(LEN - n + 1);
                    r.copy_within(off, to, n);
                    model.copy_within(off..off + n, to);
                }
                _ => {}
            }
            let (a, b) = (next(LEN), next(LEN));
            let (a, b) = (a.min(b), a.max(b));
            let mut out = vec![0xeeu8; b - a];
            // SAFETY: `out` outlives the buffer.
            r.read(a, &unsafe { DataBuf::from_slice(&mut out) });
            assert_eq!(out, model[a..b], "round {round}");
        }
    }
}
