//! Decoding errors.

use crate::values::RepError;

/// Something on the wire breaks the protocol.
///
/// Every variant is `Copy` and allocation-free so that a hostile peer cannot make error
/// handling allocate. Use [`ProtocolError::option_reply`] on the server to tell errors that
/// can be answered with an option error reply (the session goes on) from those that end it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A magic number is wrong: the stream is not NBD or is out of sync. Fatal.
    #[error("bad {what} magic: expected {expected:#x}, found {found:#x}")]
    BadMagic {
        what: &'static str,
        expected: u64,
        found: u64,
    },
    /// The server greeted with oldstyle negotiation, which is not supported. Fatal.
    #[error("server uses oldstyle negotiation, which is not supported")]
    Oldstyle,
    /// The client set flags the server does not know or did not advertise; the server MUST
    /// drop the connection.
    #[error("client flags {flags:#x} include bits the server did not advertise ({advertised:#x})")]
    BadClientFlags { flags: u32, advertised: u16 },
    /// Option data longer than the bound the server is willing to buffer. The header has been
    /// fully decoded (16 bytes), so the server may reply `NBD_REP_ERR_TOO_BIG` and then either
    /// disconnect or discard `length` bytes without buffering them.
    #[error("option {option} carries {length} bytes of data, more than the limit of {max}")]
    OptionTooLong { option: u32, length: u32, max: u32 },
    /// Option data does not have the layout its option requires.
    #[error("option {option} data is malformed: {reason}")]
    MalformedOption { option: u32, reason: &'static str },
    /// A string (export name, query) is over the spec's 4096-byte limit.
    #[error("{what} of {length} bytes is longer than the {max}-byte limit")]
    StringTooLong {
        what: &'static str,
        length: u32,
        max: u32,
    },
    /// A string is not UTF-8 or contains NUL.
    #[error("{what} is not valid UTF-8 or contains NUL")]
    BadString { what: &'static str },
    /// More meta-context queries than the server accepts.
    #[error("{count} meta context queries, more than the limit of {max}")]
    TooManyQueries { count: u32, max: u32 },
    /// Option reply data longer than the bound the client is willing to buffer. Fatal.
    #[error("reply {reply_type:#x} to option {option} carries {length} bytes, more than the limit of {max}")]
    ReplyTooLong {
        option: u32,
        reply_type: u32,
        length: u32,
        max: u32,
    },
    /// A server message does not have the layout its type requires. Fatal for a client.
    #[error("malformed {what}: {reason}")]
    MalformedReply {
        what: &'static str,
        reason: &'static str,
    },
    /// A structured reply chunk of a type that is neither known nor an error type: the client
    /// MUST disconnect.
    #[error("unexpected structured reply chunk type {chunk_type:#x}")]
    UnexpectedChunk { chunk_type: u16 },
    /// A payload too long for the 32-bit length field of the message carrying it.
    #[error("{what} payload of {length} bytes does not fit a 32-bit length")]
    PayloadTooLarge { what: &'static str, length: u64 },
    /// Block size constraints that break the spec's rules.
    #[error("bad block size constraints (min {min}, preferred {preferred}, max {max}): {reason}")]
    BadBlockSize {
        min: u32,
        preferred: u32,
        max: u32,
        reason: &'static str,
    },
}

impl ProtocolError {
    /// The option error reply a server should send for this error, or `None` when the
    /// connection cannot go on (bad magic, bad client flags) and the server must disconnect.
    ///
    /// Malformed data gets `NBD_REP_ERR_INVALID` ("syntactically invalid"); data or query
    /// counts over our bounds get `NBD_REP_ERR_TOO_BIG` ("request too large to process").
    pub const fn option_reply(&self) -> Option<RepError> {
        match self {
            Self::MalformedOption { .. } | Self::StringTooLong { .. } | Self::BadString { .. } => {
                Some(RepError::Invalid)
            }
            Self::OptionTooLong { .. } | Self::TooManyQueries { .. } => Some(RepError::TooBig),
            _ => None,
        }
    }
}
