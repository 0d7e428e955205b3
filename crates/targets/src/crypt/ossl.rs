//! OpenSSL EVP cipher contexts for the sector cipher: the only `unsafe` of the crypt target.
//!
//! Why raw `openssl-sys` and not the `openssl` crate's `CipherCtx`: re-initialising the IV for
//! every sector through the safe wrapper costs an extra IV-length query (a parameter lookup by
//! name in OpenSSL 3) and output-size checks per call; at 512-byte sectors that was ~25% of the
//! throughput (BENCHMARKS.md "crypt"). The FFI surface here is four calls.
//!
//! A keyed EVP context is mutable state, so a [`CtxPool`] keeps a small array of them and a
//! caller takes one slot for the length of one `encrypt`/`decrypt` call by a compare-and-swap on
//! the slot's `busy` flag (never waiting: a busy slot is skipped). Each thread starts its search
//! at its own slot, so in steady state every reactor uses "its" context, already keyed and warm.
//! Contexts are created on a slot's first use (that allocates inside OpenSSL, once); when every
//! slot is busy (more concurrent callers than [`SLOTS`]) a temporary context is made and freed.

use std::cell::{Cell, UnsafeCell};
use std::os::raw::c_int;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use openssl_sys as ffi;
use zeroize::Zeroizing;

/// Slots per pool: more than the reactors of any machine this runs on; past it, callers get a
/// temporary context (correct, slower).
pub(crate) const SLOTS: usize = 64;

/// Which EVP cipher a pool uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EvpKind {
    Aes128Xts,
    Aes256Xts,
    Aes128Cbc,
    Aes192Cbc,
    Aes256Cbc,
}

impl EvpKind {
    fn cipher(self) -> *const ffi::EVP_CIPHER {
        // SAFETY: these return pointers to OpenSSL's static cipher tables; no arguments.
        unsafe {
            match self {
                EvpKind::Aes128Xts => ffi::EVP_aes_128_xts(),
                EvpKind::Aes256Xts => ffi::EVP_aes_256_xts(),
                EvpKind::Aes128Cbc => ffi::EVP_aes_128_cbc(),
                EvpKind::Aes192Cbc => ffi::EVP_aes_192_cbc(),
                EvpKind::Aes256Cbc => ffi::EVP_aes_256_cbc(),
            }
        }
    }
}

/// One keyed EVP context for one direction. Owned by exactly one slot (or one call).
pub(crate) struct EvpCtx(NonNull<ffi::EVP_CIPHER_CTX>);

// SAFETY: an EVP_CIPHER_CTX has no thread affinity; it is only used by whoever holds the slot
// (or the call) that owns it, one thread at a time.
unsafe impl Send for EvpCtx {}

impl EvpCtx {
    /// A context keyed with `key` for `kind`, encrypting when `enc`. Allocates (inside OpenSSL).
    fn new(kind: EvpKind, key: &[u8], enc: bool) -> Result<EvpCtx, String> {
        ffi::init();
        // SAFETY: plain constructor; null is checked.
        let raw = unsafe { ffi::EVP_CIPHER_CTX_new() };
        let ctx = EvpCtx(NonNull::new(raw).ok_or("OpenSSL could not allocate a cipher context")?);
        // SAFETY: `ctx` is a live context; the cipher is a static table; `key` is exactly the
        // cipher's key length (checked by the caller, CipherSpec::check_key_len) and outlives
        // the call; a null IV is allowed at keying time.
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx.0.as_ptr(),
                kind.cipher(),
                ptr::null_mut(),
                key.as_ptr(),
                ptr::null(),
                c_int::from(enc),
            )
        };
        if ok != 1 {
            clear_errors();
            return Err(format!("OpenSSL refused the key for {kind:?}"));
        }
        // SAFETY: live context. Sector data is always whole blocks: no padding.
        unsafe { ffi::EVP_CIPHER_CTX_set_padding(ctx.0.as_ptr(), 0) };
        Ok(ctx)
    }

    /// Sets the 16-byte IV and transforms `data` in place (one data unit). Does not allocate.
    pub(crate) fn crypt(&mut self, iv: &[u8; 16], data: &mut [u8]) -> bool {
        let p = data.as_mut_ptr();
        // SAFETY: in place: `p` is valid for reads and writes of `data.len()` bytes.
        unsafe { self.crypt_raw(iv, p, p, data.len()) }
    }

    /// Sets the IV and transforms `src` into `dst` (same length; one data unit): one pass over
    /// the data instead of a copy and an in-place pass. Does not allocate.
    pub(crate) fn crypt_into(&mut self, iv: &[u8; 16], src: &[u8], dst: &mut [u8]) -> bool {
        if src.len() != dst.len() {
            return false;
        }
        // SAFETY: `src` is valid for reads and `dst` for writes of `len` bytes; a `&[u8]` and a
        // `&mut [u8]` cannot overlap.
        unsafe { self.crypt_raw(iv, src.as_ptr(), dst.as_mut_ptr(), src.len()) }
    }

    /// # Safety
    /// `src` valid for reads and `out` for writes of `len` bytes; equal or not overlapping.
    unsafe fn crypt_raw(
        &mut self,
        iv: &[u8; 16],
        src: *const u8,
        out: *mut u8,
        len: usize,
    ) -> bool {
        let Ok(len) = c_int::try_from(len) else {
            return false;
        };
        let mut out_len: c_int = 0;
        // SAFETY: live, keyed context owned by this call (`&mut self`); IV is 16 bytes, the IV
        // length of every kind here; in-place operation (out == in) is allowed by EVP for these
        // modes; the buffers are valid for `len` bytes (this function's contract).
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                self.0.as_ptr(),
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                iv.as_ptr(),
                -1,
            ) == 1
                && ffi::EVP_CipherUpdate(self.0.as_ptr(), out, &mut out_len, src, len) == 1
        };
        if !ok || out_len != len {
            clear_errors();
            return false;
        }
        true
    }
}

impl Drop for EvpCtx {
    fn drop(&mut self) {
        // SAFETY: the context is owned and freed once; OpenSSL cleanses the key schedule held
        // by the provider context on free.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.0.as_ptr()) };
    }
}

fn clear_errors() {
    // SAFETY: empties this thread's OpenSSL error queue; no arguments.
    unsafe { ffi::ERR_clear_error() };
}

#[derive(Default)]
struct Slot {
    busy: AtomicBool,
    /// (encrypt, decrypt) contexts; touched only by the holder of `busy`.
    ctx: UnsafeCell<(Option<EvpCtx>, Option<EvpCtx>)>,
}

/// Keyed EVP contexts shared by every thread that uses one sector cipher. `Send + Sync`; the
/// key is kept (zeroized on drop) to key contexts on first use of a slot.
pub(crate) struct CtxPool {
    kind: EvpKind,
    key: Zeroizing<Vec<u8>>,
    slots: Box<[Slot]>,
}

// SAFETY: a slot's contexts are only reached through `with`, by the one caller that won the
// slot's `busy` flag (Acquire) until it releases it (Release); everything else is read-only.
unsafe impl Sync for CtxPool {}

static NEXT_HINT: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static HINT: Cell<Option<usize>> = const { Cell::new(None) };
}

fn thread_hint() -> usize {
    HINT.with(|h| match h.get() {
        Some(v) => v,
        None => {
            let v = NEXT_HINT.fetch_add(1, Ordering::Relaxed) % SLOTS;
            h.set(Some(v));
            v
        }
    })
}

impl CtxPool {
    /// A pool for `kind` keyed with `key`; checks that OpenSSL takes the key (both directions)
    /// and keeps those first contexts in slot 0. Allocates; control path.
    pub(crate) fn new(kind: EvpKind, key: &[u8]) -> Result<CtxPool, String> {
        let enc = EvpCtx::new(kind, key, true)?;
        let dec = EvpCtx::new(kind, key, false)?;
        let mut slots: Box<[Slot]> = (0..SLOTS).map(|_| Slot::default()).collect();
        *slots[0].ctx.get_mut() = (Some(enc), Some(dec));
        Ok(CtxPool {
            kind,
            key: Zeroizing::new(key.to_vec()),
            slots,
        })
    }

    /// Runs `f` with a keyed context for direction `enc`. Never waits; allocates only on a
    /// slot's first use or when every slot is busy. `f` returns false on a library failure.
    pub(crate) fn with(&self, enc: bool, f: impl FnOnce(&mut EvpCtx) -> bool) -> bool {
        let start = thread_hint();
        for i in 0..SLOTS {
            let slot = &self.slots[(start + i) % SLOTS];
            if slot
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: this caller won the slot's busy flag and is the only one touching its
            // contexts until the Release store below.
            let pair = unsafe { &mut *slot.ctx.get() };
            let ctx = if enc { &mut pair.0 } else { &mut pair.1 };
            if ctx.is_none() {
                *ctx = EvpCtx::new(self.kind, &self.key, enc).ok();
            }
            let ok = match ctx.as_mut() {
                Some(c) => f(c),
                None => false,
            };
            slot.busy.store(false, Ordering::Release);
            return ok;
        }
        match EvpCtx::new(self.kind, &self.key, enc) {
            Ok(mut c) => f(&mut c),
            Err(_) => false,
        }
    }
}
