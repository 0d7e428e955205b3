//! In-place encryption and decryption of bio data and bounce buffers: the only place the crypt
//! target turns a [`DataBuf`] into a byte slice.

use stackbd_core::DataBuf;

use super::cipher::{CryptFailure, SectorCipher};

/// Which way to run the cipher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    Encrypt,
    Decrypt,
}

/// Runs `cipher` over `buf` in place, one crypt sector after another from IV sector `iv`.
///
/// Callers: `map` on a write's bounce buffer, just filled and not yet handed to any child (only
/// this target holds it); `end_io` on a read that completed successfully (the bio is in this
/// target's `end_io`; the layers below are done with its data and nothing above sees it before
/// it completes upward). Reactor thread; no allocation.
pub(crate) fn crypt_in_place(
    cipher: &SectorCipher,
    dir: Dir,
    iv: u64,
    step: u64,
    buf: DataBuf,
) -> Result<(), CryptFailure> {
    let mut view = buf;
    // SAFETY: per the callers above, the window is valid (a completed read's buffer, or a
    // pooled bounce buffer this target holds) and no other view reads or writes it while this
    // slice lives: no child I/O is in flight on it and the submitter waits for completion.
    let bytes = unsafe { view.as_bytes_mut() };
    match dir {
        Dir::Encrypt => cipher.try_encrypt(iv, step, bytes),
        Dir::Decrypt => cipher.try_decrypt(iv, step, bytes),
    }
}

/// Encrypts `src` (a write's data, valid and unchanged while the write is in `map`) into `dst`
/// (a bounce buffer this target holds, not yet handed to any child). Reactor thread; no
/// allocation.
pub(crate) fn encrypt_into(
    cipher: &SectorCipher,
    iv: u64,
    step: u64,
    src: DataBuf,
    dst: DataBuf,
) -> Result<(), CryptFailure> {
    let mut out = dst;
    // SAFETY: `src` is the submitter's data of a write being mapped: valid until the write
    // completes, which it cannot before this call returns, and only read here. `dst` is a
    // pooled bounce buffer held by this target alone (no child I/O on it yet). They are
    // different allocations, so the two slices do not overlap.
    let (s, d) = unsafe { (src.as_bytes(), out.as_bytes_mut()) };
    cipher.try_encrypt_into(iv, step, s, d)
}
