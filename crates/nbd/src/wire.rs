//! Big-endian helpers shared by the encoders and decoders.

use crate::consts::MAX_STRING_LEN;
use crate::error::ProtocolError;

#[inline]
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

#[inline]
pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Cursor over variable-length data whose reads fail instead of panicking.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16_at(b, 0))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| u32_at(b, 0))
    }

    pub(crate) fn rest(self) -> &'a [u8] {
        self.buf
    }
}

/// Checks a protocol string from the peer: at most 4096 bytes, UTF-8, no NUL.
pub(crate) fn check_str<'a>(what: &'static str, b: &'a [u8]) -> Result<&'a str, ProtocolError> {
    if b.len() > MAX_STRING_LEN {
        return Err(ProtocolError::StringTooLong {
            what,
            length: len_u32(b.len()),
            max: MAX_STRING_LEN as u32,
        });
    }
    match std::str::from_utf8(b) {
        Ok(s) if !b.contains(&0) => Ok(s),
        _ => Err(ProtocolError::BadString { what }),
    }
}

/// Cuts a human-readable message to the spec's string limit, on a UTF-8 boundary when the
/// message is UTF-8, so that an over-long message never makes an encoder fail.
pub(crate) fn clip_message(msg: &[u8]) -> &[u8] {
    if msg.len() <= MAX_STRING_LEN {
        return msg;
    }
    let mut end = MAX_STRING_LEN;
    // Step back over continuation bytes (10xxxxxx) so we do not split a character.
    while end > 0 && msg[end] & 0xc0 == 0x80 {
        end -= 1;
    }
    &msg[..end]
}

/// Lengths of in-memory slices as wire `u32`, saturating (only used for error context).
pub(crate) fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
