//! Sans-I/O codec for the NBD protocol (`doc/proto.md` in NetworkBlockDevice/nbd), used by
//! stackbd's NBD server and by the NBD client leaf.
//!
//! No sockets, threads or engine types: decoders read from a byte slice the caller filled,
//! encoders append to a caller's `Vec<u8>` (or return a fixed `[u8; N]`), and nothing else
//! allocates. Fixed-size headers decode with the [`Decoded`] shape: `Ok(None)` means "not
//! enough bytes yet", `Ok(Some((value, consumed)))` a complete header. Lengths of variable
//! data are checked against a bound before the caller is asked to read the data.
//!
//! Server flow, in brief:
//!
//! 1. send [`ServerGreeting::STACKBD`]; decode [`ClientFlags`] and
//!    [`negotiate`](ClientFlags::negotiate) them (an error means disconnect);
//! 2. loop: [`OptionHeader::decode`] with a bound (e.g. [`DEFAULT_MAX_OPTION_LEN`]), read
//!    `length` bytes, [`OptionRequest::parse`]; answer with [`OptionReply::encode`]. A parse
//!    error maps to a reply via [`ProtocolError::option_reply`]; unknown options come back
//!    as [`OptionRequest::Unsupported`] (reply `NBD_REP_ERR_UNSUP`);
//! 3. after `GO` + `ACK` (or `EXPORT_NAME` + [`ExportNameReply`]): [`Request::decode`],
//!    [`classify_request`], read [`Request::payload_len`] bytes, reply with
//!    [`SimpleReply`] or [`ReplyChunk`]s.
//!
//! TLS: the server codec answers `STARTTLS` (see [`server::TlsPolicy`]) and hands the socket
//! to the caller for the TLS handshake; the codec never sees ciphertext.
//!
//! Not supported, on purpose: oldstyle negotiation (refused), extended headers (`NBD_OPT_EXTENDED_HEADERS` is parsed so the
//! server can refuse it; 64-bit requests and `BLOCK_STATUS_EXT` chunks are not decoded).

#![forbid(unsafe_code)]

pub mod consts;
mod error;
mod handshake;
mod options;
pub mod server;
mod transmission;
mod validate;
mod values;
mod wire;

pub use consts::{
    BASE_ALLOCATION, DEFAULT_MAX_OPTION_LEN, DEFAULT_MAX_OPTION_REPLY_LEN, MAX_META_QUERIES,
    MAX_STRING_LEN, NBD_STATE_HOLE, NBD_STATE_ZERO,
};
pub use error::ProtocolError;
pub use handshake::{ExportNameReply, Negotiated, OptionHeader, OptionReplyHeader, ServerGreeting};
pub use options::{
    encode_export_name, encode_export_request, encode_meta_context_request, encode_option,
    split_context_name, ExportRequest, Info, MetaContextRequest, OptionReply, OptionRequest,
};
pub use transmission::{
    encode_block_status, encode_offset_data_header, Extent, Extents, ReplyChunk, ReplyHeader,
    Request, SimpleReply, StructuredReplyHeader,
};
pub use validate::{classify_request, BlockSize, Rejection, TransmissionParams};
pub use values::{
    errno_to_wire, ChunkType, ClientFlags, CmdFlags, Command, Errno, HandshakeFlags, InfoType, Opt,
    RepError, ReplyFlags, ReplyType, TransmissionFlags,
};

/// Result of decoding a fixed-size message: `Ok(None)` when `buf` holds too few bytes (read
/// more and call again), `Ok(Some((value, consumed)))` when complete.
pub type Decoded<T> = Result<Option<(T, usize)>, ProtocolError>;
