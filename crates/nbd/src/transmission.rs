//! Transmission phase: requests, simple replies and structured reply chunks.
//!
//! ```text
//! C: 0x25609513 (u32) flags (u16) type (u16) cookie (u64) offset (u64) length (u32) [data]
//! S: 0x67446698 (u32) error (u32) cookie (u64) [data for a successful READ]
//! S: 0x668e33ef (u32) flags (u16) type (u16) cookie (u64) length (u32) payload
//! ```
//!
//! The spec's older text calls the cookie "handle"; it is an opaque value echoed back.

use crate::consts::*;
use crate::error::ProtocolError;
use crate::handshake::{bad_magic, check_magic};
use crate::values::{errno_to_wire, ChunkType, CmdFlags, Command, Errno, ReplyFlags};
use crate::wire::{clip_message, put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::Decoded;

/// A transmission request header (compact form). A `WRITE` is followed by `length` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: CmdFlags,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Bytes on the wire.
    pub const SIZE: usize = 28;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u32(&mut b, 0, REQUEST_MAGIC);
        put_u16(&mut b, 4, self.flags.bits());
        put_u16(&mut b, 6, self.command.to_wire());
        put_u64(&mut b, 8, self.cookie);
        put_u64(&mut b, 16, self.offset);
        put_u32(&mut b, 24, self.length);
        b
    }

    /// Appends the header to `out` (the caller appends any write data).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Server side. Only the magic can fail here: a bad magic means the stream is out of
    /// sync and the connection must end. Everything else (unknown command, bad flags, bad
    /// range) is for [`classify_request`](crate::classify_request), which answers with an
    /// error reply instead.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let Some(b) = buf.get(..Self::SIZE) else {
            return Ok(None);
        };
        let magic = u32_at(b, 0);
        if magic != REQUEST_MAGIC {
            // Includes the extended-header magic, which is only valid once negotiated.
            return Err(bad_magic("request", REQUEST_MAGIC.into(), magic.into()));
        }
        let req = Self {
            flags: CmdFlags::from_bits(u16_at(b, 4)),
            command: Command::from_wire(u16_at(b, 6)),
            cookie: u64_at(b, 8),
            offset: u64_at(b, 16),
            length: u32_at(b, 24),
        };
        Ok(Some((req, Self::SIZE)))
    }

    /// Bytes of data that follow this header on the wire: `length` for a `WRITE`, else 0.
    /// The server must consume them even when it rejects the request, or the stream loses
    /// sync; check the length (see [`Rejection::disconnect`](crate::Rejection)) first.
    pub const fn payload_len(&self) -> u32 {
        match self.command {
            Command::Write => self.length,
            _ => 0,
        }
    }
}

/// A simple reply. A successful `READ` reply is followed by the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// `None` on success.
    pub error: Option<Errno>,
    pub cookie: u64,
}

impl SimpleReply {
    /// Bytes on the wire.
    pub const SIZE: usize = 16;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u32(&mut b, 0, SIMPLE_REPLY_MAGIC);
        put_u32(&mut b, 4, errno_to_wire(self.error));
        put_u64(&mut b, 8, self.cookie);
        b
    }

    /// Appends the reply header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Client side.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let Some(b) = buf.get(..Self::SIZE) else {
            return Ok(None);
        };
        check_magic(
            "simple reply",
            SIMPLE_REPLY_MAGIC.into(),
            u32_at(b, 0).into(),
        )?;
        let reply = Self {
            error: Errno::from_wire(u32_at(b, 4)),
            cookie: u64_at(b, 8),
        };
        Ok(Some((reply, Self::SIZE)))
    }
}

/// Header of a structured reply chunk; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructuredReplyHeader {
    pub flags: ReplyFlags,
    pub chunk_type: ChunkType,
    pub cookie: u64,
    pub length: u32,
}

impl StructuredReplyHeader {
    /// Bytes on the wire.
    pub const SIZE: usize = 20;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u32(&mut b, 0, STRUCTURED_REPLY_MAGIC);
        put_u16(&mut b, 4, self.flags.bits());
        put_u16(&mut b, 6, self.chunk_type.to_wire());
        put_u64(&mut b, 8, self.cookie);
        put_u32(&mut b, 16, self.length);
        b
    }

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Client side. The payload length is not bounded here: the client knows what it asked
    /// for and checks `length` against that before reading.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let Some(b) = buf.get(..Self::SIZE) else {
            return Ok(None);
        };
        check_magic(
            "structured reply",
            STRUCTURED_REPLY_MAGIC.into(),
            u32_at(b, 0).into(),
        )?;
        let header = Self {
            flags: ReplyFlags::from_bits(u16_at(b, 4)),
            chunk_type: ChunkType::from_wire(u16_at(b, 6)),
            cookie: u64_at(b, 8),
            length: u32_at(b, 16),
        };
        Ok(Some((header, Self::SIZE)))
    }

    /// Whether this is the last chunk of its reply.
    pub const fn is_done(&self) -> bool {
        self.flags.contains(ReplyFlags::DONE)
    }
}

/// Either kind of reply header, told apart by magic (client side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Structured(StructuredReplyHeader),
}

impl ReplyHeader {
    /// Decodes whichever header comes next.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let Some(m) = buf.get(..4) else {
            return Ok(None);
        };
        match u32_at(m, 0) {
            SIMPLE_REPLY_MAGIC => Ok(SimpleReply::decode(buf)?.map(|(r, n)| (Self::Simple(r), n))),
            STRUCTURED_REPLY_MAGIC => {
                Ok(StructuredReplyHeader::decode(buf)?.map(|(r, n)| (Self::Structured(r), n)))
            }
            found => Err(bad_magic("reply", SIMPLE_REPLY_MAGIC.into(), found.into())),
        }
    }

    /// The cookie of the request answered.
    pub const fn cookie(&self) -> u64 {
        match self {
            Self::Simple(r) => r.cookie,
            Self::Structured(h) => h.cookie,
        }
    }
}

/// One block status descriptor: `length` bytes with context-defined `flags`
/// (for `base:allocation`: [`NBD_STATE_HOLE`], [`NBD_STATE_ZERO`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Extent {
    /// MUST be nonzero.
    pub length: u32,
    pub flags: u32,
}

/// Block status descriptors as they sit on the wire (8 bytes each, validated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extents<'a> {
    raw: &'a [u8],
}

impl<'a> Extents<'a> {
    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.raw.len() / 8
    }

    /// Whether there are none (never true for a parsed chunk).
    pub fn is_empty(&self) -> bool {
        self.raw.len() < 8
    }

    /// The descriptors in order.
    pub fn iter(&self) -> impl Iterator<Item = Extent> + 'a {
        self.raw.chunks_exact(8).map(|c| Extent {
            length: u32_at(c, 0),
            flags: u32_at(c, 4),
        })
    }
}

/// A structured reply chunk's payload, either direction. Messages are bytes as on the wire
/// (clipped to 4096 bytes when encoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyChunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`: no payload; only valid with `DONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: `data` read at `offset` (at least one byte).
    OffsetData { offset: u64, data: &'a [u8] },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `length` (nonzero) bytes of zeroes at `offset`.
    OffsetHole { offset: u64, length: u32 },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` for one metadata context. Encode from a slice with
    /// [`encode_block_status`].
    BlockStatus {
        context_id: u32,
        extents: Extents<'a>,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error { error: Errno, message: &'a [u8] },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`: error at `offset` within the request.
    ErrorOffset {
        error: Errno,
        message: &'a [u8],
        offset: u64,
    },
    /// An error chunk type (bit 15 set) this crate does not know: the client treats the
    /// request as failed and carries on.
    UnknownError {
        chunk_type: u16,
        error: Errno,
        message: &'a [u8],
    },
}

impl<'a> ReplyChunk<'a> {
    /// `NBD_REPLY_TYPE_ERROR` with a message (`""` for none).
    pub const fn error(error: Errno, message: &'a str) -> Self {
        Self::Error {
            error,
            message: message.as_bytes(),
        }
    }

    /// `NBD_REPLY_TYPE_ERROR_OFFSET` with a message (`""` for none).
    pub const fn error_offset(error: Errno, message: &'a str, offset: u64) -> Self {
        Self::ErrorOffset {
            error,
            message: message.as_bytes(),
            offset,
        }
    }

    /// The chunk type field.
    pub const fn chunk_type(&self) -> ChunkType {
        match self {
            Self::None => ChunkType::None,
            Self::OffsetData { .. } => ChunkType::OffsetData,
            Self::OffsetHole { .. } => ChunkType::OffsetHole,
            Self::BlockStatus { .. } => ChunkType::BlockStatus,
            Self::Error { .. } => ChunkType::Error,
            Self::ErrorOffset { .. } => ChunkType::ErrorOffset,
            Self::UnknownError { chunk_type, .. } => ChunkType::from_wire(*chunk_type),
        }
    }

    /// Payload length (the header's length field).
    pub fn payload_len(&self) -> u64 {
        (match self {
            Self::None => 0,
            Self::OffsetData { data, .. } => 8 + data.len(),
            Self::OffsetHole { .. } => 12,
            Self::BlockStatus { extents, .. } => 4 + extents.raw.len(),
            Self::Error { message, .. } | Self::UnknownError { message, .. } => {
                6 + clip_message(message).len()
            }
            Self::ErrorOffset { message, .. } => 14 + clip_message(message).len(),
        }) as u64
    }

    /// Appends header and payload. `flags` should carry `DONE` on the last chunk (always on
    /// `None`). Fails only if the payload does not fit the 32-bit length field.
    pub fn encode(
        &self,
        flags: ReplyFlags,
        cookie: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), ProtocolError> {
        let length =
            u32::try_from(self.payload_len()).map_err(|_| ProtocolError::PayloadTooLarge {
                what: "structured reply chunk",
                length: self.payload_len(),
            })?;
        StructuredReplyHeader {
            flags,
            chunk_type: self.chunk_type(),
            cookie,
            length,
        }
        .encode(out);
        match *self {
            Self::None => {}
            Self::OffsetData { offset, data } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(data);
            }
            Self::OffsetHole { offset, length } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
            }
            Self::BlockStatus {
                context_id,
                extents,
            } => {
                out.extend_from_slice(&context_id.to_be_bytes());
                out.extend_from_slice(extents.raw);
            }
            Self::Error { error, message } | Self::UnknownError { error, message, .. } => {
                encode_error_fields(out, error, message);
            }
            Self::ErrorOffset {
                error,
                message,
                offset,
            } => {
                encode_error_fields(out, error, message);
                out.extend_from_slice(&offset.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Client side: interprets a chunk's payload (exactly `header.length` bytes). Unknown
    /// non-error chunk types and `BLOCK_STATUS_EXT` (extended headers are never negotiated)
    /// give [`ProtocolError::UnexpectedChunk`]: the client MUST disconnect.
    pub fn parse(header: &StructuredReplyHeader, payload: &'a [u8]) -> Result<Self, ProtocolError> {
        if payload.len() as u64 != u64::from(header.length) {
            return Err(bad_chunk("chunk", "payload length differs from the header"));
        }
        let len = payload.len();
        match header.chunk_type {
            ChunkType::None => {
                if len != 0 {
                    return Err(bad_chunk("NBD_REPLY_TYPE_NONE", "has a payload"));
                }
                if !header.is_done() {
                    return Err(bad_chunk("NBD_REPLY_TYPE_NONE", "DONE flag not set"));
                }
                Ok(Self::None)
            }
            ChunkType::OffsetData => {
                if len < 9 {
                    return Err(bad_chunk("NBD_REPLY_TYPE_OFFSET_DATA", "length below 9"));
                }
                Ok(Self::OffsetData {
                    offset: u64_at(payload, 0),
                    data: &payload[8..],
                })
            }
            ChunkType::OffsetHole => {
                if len != 12 {
                    return Err(bad_chunk("NBD_REPLY_TYPE_OFFSET_HOLE", "length is not 12"));
                }
                let length = u32_at(payload, 8);
                if length == 0 {
                    return Err(bad_chunk("NBD_REPLY_TYPE_OFFSET_HOLE", "hole size is 0"));
                }
                Ok(Self::OffsetHole {
                    offset: u64_at(payload, 0),
                    length,
                })
            }
            ChunkType::BlockStatus => {
                if len < 12 || !(len - 4).is_multiple_of(8) {
                    return Err(bad_chunk(
                        "NBD_REPLY_TYPE_BLOCK_STATUS",
                        "length is not 4 + a positive multiple of 8",
                    ));
                }
                let extents = Extents { raw: &payload[4..] };
                if extents.iter().any(|e| e.length == 0) {
                    return Err(bad_chunk(
                        "NBD_REPLY_TYPE_BLOCK_STATUS",
                        "extent of length 0",
                    ));
                }
                Ok(Self::BlockStatus {
                    context_id: u32_at(payload, 0),
                    extents,
                })
            }
            ChunkType::Error => {
                let (error, message, rest) = parse_error_fields("NBD_REPLY_TYPE_ERROR", payload)?;
                if !rest.is_empty() {
                    return Err(bad_chunk("NBD_REPLY_TYPE_ERROR", "data after the message"));
                }
                Ok(Self::Error { error, message })
            }
            ChunkType::ErrorOffset => {
                let (error, message, rest) =
                    parse_error_fields("NBD_REPLY_TYPE_ERROR_OFFSET", payload)?;
                if rest.len() != 8 {
                    return Err(bad_chunk(
                        "NBD_REPLY_TYPE_ERROR_OFFSET",
                        "length is not 14 + message length",
                    ));
                }
                Ok(Self::ErrorOffset {
                    error,
                    message,
                    offset: u64_at(rest, 0),
                })
            }
            other if other.is_error() => {
                // Unknown error types share the leading fields; anything after is ignored.
                let (error, message, _) = parse_error_fields("error chunk", payload)?;
                Ok(Self::UnknownError {
                    chunk_type: other.to_wire(),
                    error,
                    message,
                })
            }
            other => Err(ProtocolError::UnexpectedChunk {
                chunk_type: other.to_wire(),
            }),
        }
    }
}

fn encode_error_fields(out: &mut Vec<u8>, error: Errno, message: &[u8]) {
    let message = clip_message(message);
    out.extend_from_slice(&error.to_wire().to_be_bytes());
    // clip_message keeps it within 4096, so it fits the 16-bit field.
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
}

/// error (u32, nonzero), message length (u16), message; returns the bytes after them.
fn parse_error_fields<'a>(
    what: &'static str,
    payload: &'a [u8],
) -> Result<(Errno, &'a [u8], &'a [u8]), ProtocolError> {
    if payload.len() < 6 {
        return Err(bad_chunk(what, "shorter than 6 bytes"));
    }
    let error =
        Errno::from_wire(u32_at(payload, 0)).ok_or_else(|| bad_chunk(what, "error is 0"))?;
    let msg_len = usize::from(u16_at(payload, 4));
    let rest = &payload[6..];
    if msg_len > rest.len() {
        return Err(bad_chunk(what, "message runs past the chunk"));
    }
    let (message, rest) = rest.split_at(msg_len);
    Ok((error, message, rest))
}

fn bad_chunk(what: &'static str, reason: &'static str) -> ProtocolError {
    ProtocolError::MalformedReply { what, reason }
}

/// Appends an `OFFSET_DATA` chunk header and the 8-byte offset, but not the data: the caller
/// sends `data_len` bytes next (e.g. straight from its I/O buffer, without a copy).
pub fn encode_offset_data_header(
    out: &mut Vec<u8>,
    flags: ReplyFlags,
    cookie: u64,
    offset: u64,
    data_len: u32,
) -> Result<(), ProtocolError> {
    let length = data_len
        .checked_add(8)
        .ok_or(ProtocolError::PayloadTooLarge {
            what: "NBD_REPLY_TYPE_OFFSET_DATA",
            length: u64::from(data_len) + 8,
        })?;
    StructuredReplyHeader {
        flags,
        chunk_type: ChunkType::OffsetData,
        cookie,
        length,
    }
    .encode(out);
    out.extend_from_slice(&offset.to_be_bytes());
    Ok(())
}

/// Appends a `BLOCK_STATUS` chunk for one metadata context. The spec wants at least one
/// extent, each of nonzero length, and with `REQ_ONE` exactly one.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    flags: ReplyFlags,
    cookie: u64,
    context_id: u32,
    extents: &[Extent],
) -> Result<(), ProtocolError> {
    let payload = 4 + 8 * extents.len() as u64;
    let length = u32::try_from(payload).map_err(|_| ProtocolError::PayloadTooLarge {
        what: "NBD_REPLY_TYPE_BLOCK_STATUS",
        length: payload,
    })?;
    StructuredReplyHeader {
        flags,
        chunk_type: ChunkType::BlockStatus,
        cookie,
        length,
    }
    .encode(out);
    out.reserve(payload as usize);
    out.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.length.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let r = Request {
            flags: CmdFlags::FUA,
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            length: 0x200,
        };
        let b = r.to_bytes();
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, // magic
                0x00, 0x01, // FUA
                0x00, 0x01, // NBD_CMD_WRITE
                1, 2, 3, 4, 5, 6, 7, 8, // cookie
                0, 0, 0, 0, 0, 0, 0x10, 0, // offset
                0, 0, 2, 0, // length
            ]
        );
        assert_eq!(Request::decode(&b), Ok(Some((r, 28))));
        assert_eq!(r.payload_len(), 0x200);
        for n in 0..28 {
            assert_eq!(Request::decode(&b[..n]), Ok(None));
        }
    }

    #[test]
    fn request_keeps_unknown_command_and_flags() {
        let mut b = Request {
            flags: CmdFlags::empty(),
            command: Command::Read,
            cookie: 1,
            offset: 0,
            length: 512,
        }
        .to_bytes();
        b[4..8].copy_from_slice(&[0x80, 0x40, 0x00, 0x42]);
        let (r, _) = Request::decode(&b).unwrap().unwrap();
        assert_eq!(r.command, Command::Unknown(0x42));
        assert_eq!(r.flags.bits(), 0x8040);
        assert_eq!(r.payload_len(), 0);
    }

    #[test]
    fn request_rejects_bad_and_extended_magic() {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert_eq!(
            Request::decode(&b),
            Err(ProtocolError::BadMagic {
                what: "request",
                expected: 0x2560_9513,
                found: 0x21e4_1c71
            })
        );
    }

    #[test]
    fn simple_reply_layout() {
        let r = SimpleReply {
            error: Some(Errno::Enospc),
            cookie: 0xaabb,
        };
        let b = r.to_bytes();
        assert_eq!(
            b,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb]
        );
        assert_eq!(SimpleReply::decode(&b), Ok(Some((r, 16))));
        assert_eq!(
            ReplyHeader::decode(&b),
            Ok(Some((ReplyHeader::Simple(r), 16)))
        );
        let ok = SimpleReply {
            error: None,
            cookie: 7,
        };
        assert_eq!(&ok.to_bytes()[4..8], &[0, 0, 0, 0]);
        assert_eq!(SimpleReply::decode(&b[..15]), Ok(None));
    }

    fn chunk_bytes(chunk: ReplyChunk<'_>, flags: ReplyFlags, cookie: u64) -> Vec<u8> {
        let mut out = Vec::new();
        chunk.encode(flags, cookie, &mut out).unwrap();
        out
    }

    fn chunk_header(flags: u16, ty: u16, cookie: u64, len: u32) -> Vec<u8> {
        let mut v = vec![0x66, 0x8e, 0x33, 0xef];
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    fn roundtrip(bytes: &[u8]) -> ReplyChunk<'_> {
        let (h, n) = StructuredReplyHeader::decode(bytes).unwrap().unwrap();
        assert!(matches!(
            ReplyHeader::decode(bytes),
            Ok(Some((ReplyHeader::Structured(_), 20)))
        ));
        ReplyChunk::parse(&h, &bytes[n..]).unwrap()
    }

    #[test]
    fn chunk_layouts() {
        let b = chunk_bytes(ReplyChunk::None, ReplyFlags::DONE, 9);
        assert_eq!(b, chunk_header(1, 0, 9, 0));
        assert_eq!(roundtrip(&b), ReplyChunk::None);

        let data = [0xde, 0xad];
        let c = ReplyChunk::OffsetData {
            offset: 0x200,
            data: &data,
        };
        let b = chunk_bytes(c, ReplyFlags::empty(), 1);
        let mut want = chunk_header(0, 1, 1, 10);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0, 0xde, 0xad]);
        assert_eq!(b, want);
        assert_eq!(roundtrip(&b), c);
        let mut split = Vec::new();
        encode_offset_data_header(&mut split, ReplyFlags::empty(), 1, 0x200, 2).unwrap();
        split.extend_from_slice(&data);
        assert_eq!(split, want);

        let c = ReplyChunk::OffsetHole {
            offset: 0x400,
            length: 0x1000,
        };
        let b = chunk_bytes(c, ReplyFlags::DONE, 2);
        let mut want = chunk_header(1, 2, 2, 12);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0x10, 0]);
        assert_eq!(b, want);
        assert_eq!(roundtrip(&b), c);

        let c = ReplyChunk::error(Errno::Eio, "bad");
        let b = chunk_bytes(c, ReplyFlags::DONE, 3);
        let mut want = chunk_header(1, 0x8001, 3, 9);
        want.extend_from_slice(&[0, 0, 0, 5, 0, 3, b'b', b'a', b'd']);
        assert_eq!(b, want);
        assert_eq!(roundtrip(&b), c);

        let c = ReplyChunk::error_offset(Errno::Einval, "", 0x10);
        let b = chunk_bytes(c, ReplyFlags::empty(), 4);
        let mut want = chunk_header(0, 0x8002, 4, 14);
        want.extend_from_slice(&[0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert_eq!(b, want);
        assert_eq!(roundtrip(&b), c);
    }

    #[test]
    fn block_status_layout() {
        let extents = [
            Extent {
                length: 0x1000,
                flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
            },
            Extent {
                length: 0x200,
                flags: 0,
            },
        ];
        let mut b = Vec::new();
        encode_block_status(&mut b, ReplyFlags::DONE, 5, 1, &extents).unwrap();
        let mut want = chunk_header(1, 5, 5, 20);
        want.extend_from_slice(&[0, 0, 0, 1]); // context id
        want.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 3]);
        want.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(b, want);
        let ReplyChunk::BlockStatus {
            context_id,
            extents: got,
        } = roundtrip(&b)
        else {
            panic!()
        };
        assert_eq!(context_id, 1);
        assert_eq!(got.len(), 2);
        assert_eq!(got.iter().collect::<Vec<_>>(), extents);
        // Re-encoding the parsed chunk gives the same bytes.
        assert_eq!(
            chunk_bytes(
                ReplyChunk::BlockStatus {
                    context_id,
                    extents: got
                },
                ReplyFlags::DONE,
                5
            ),
            want
        );
    }

    #[test]
    fn chunk_parse_rejects_malformed() {
        let h = |ty: ChunkType, flags, length| StructuredReplyHeader {
            flags,
            chunk_type: ty,
            cookie: 0,
            length,
        };
        let done = ReplyFlags::DONE;
        let none = ReplyFlags::empty();
        assert!(ReplyChunk::parse(&h(ChunkType::None, none, 0), &[]).is_err());
        assert!(ReplyChunk::parse(&h(ChunkType::None, done, 1), &[0]).is_err());
        assert!(ReplyChunk::parse(&h(ChunkType::OffsetData, done, 8), &[0; 8]).is_err());
        assert!(ReplyChunk::parse(&h(ChunkType::OffsetHole, done, 12), &[0; 12]).is_err());
        assert!(ReplyChunk::parse(&h(ChunkType::OffsetHole, done, 11), &[1; 11]).is_err());
        assert!(ReplyChunk::parse(&h(ChunkType::BlockStatus, done, 4), &[0; 4]).is_err());
        assert!(ReplyChunk::parse(&h(ChunkType::BlockStatus, done, 13), &[1; 13]).is_err());
        // Zero-length extent.
        assert!(ReplyChunk::parse(&h(ChunkType::BlockStatus, done, 12), &[0; 12]).is_err());
        // Error 0, message past the end, trailing data.
        assert!(ReplyChunk::parse(&h(ChunkType::Error, done, 6), &[0; 6]).is_err());
        assert!(ReplyChunk::parse(&h(ChunkType::Error, done, 6), &[0, 0, 0, 5, 0, 1]).is_err());
        assert!(ReplyChunk::parse(&h(ChunkType::Error, done, 7), &[0, 0, 0, 5, 0, 0, 1]).is_err());
        assert!(
            ReplyChunk::parse(&h(ChunkType::ErrorOffset, done, 6), &[0, 0, 0, 5, 0, 0]).is_err()
        );
        // Mismatched lengths.
        assert!(ReplyChunk::parse(&h(ChunkType::OffsetHole, done, 12), &[1; 11]).is_err());
        // Extended block status was never negotiated; unknown non-error types are fatal.
        assert_eq!(
            ReplyChunk::parse(&h(ChunkType::BlockStatusExt, done, 0), &[]),
            Err(ProtocolError::UnexpectedChunk { chunk_type: 6 })
        );
        assert_eq!(
            ReplyChunk::parse(&h(ChunkType::from_wire(3), done, 0), &[]),
            Err(ProtocolError::UnexpectedChunk { chunk_type: 3 })
        );
        // Unknown error types are reported as errors, extra fields ignored.
        let p = [0, 0, 0, 1, 0, 1, b'x', 9, 9];
        assert_eq!(
            ReplyChunk::parse(&h(ChunkType::from_wire(0x8077), done, 9), &p),
            Ok(ReplyChunk::UnknownError {
                chunk_type: 0x8077,
                error: Errno::Eperm,
                message: b"x"
            })
        );
    }

    #[test]
    fn chunk_encoding_limits() {
        let mut out = Vec::new();
        assert!(encode_offset_data_header(&mut out, ReplyFlags::DONE, 0, 0, u32::MAX - 8).is_ok());
        assert!(matches!(
            encode_offset_data_header(&mut out, ReplyFlags::DONE, 0, 0, u32::MAX - 7),
            Err(ProtocolError::PayloadTooLarge { .. })
        ));
        let long = "x".repeat(5000);
        out.clear();
        ReplyChunk::error(Errno::Eio, &long)
            .encode(ReplyFlags::DONE, 0, &mut out)
            .unwrap();
        assert_eq!(out.len(), 20 + 6 + 4096);
        assert_eq!(&out[24..26], &4096u16.to_be_bytes());
    }
}
