//! Typed forms of the protocol's numbers: flag sets, option/reply/command/chunk types and
//! error values. Each enum keeps values it does not know (`Unknown`/`Other`) so that a peer
//! sending something new is answered, not crashed on.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign, Not};

use crate::consts::*;

/// A set of protocol flag bits. Unknown bits are kept as sent.
macro_rules! flag_set {
    (
        $(#[$meta:meta])*
        $name:ident: $repr:ty {
            $( $(#[$fmeta:meta])* $flag:ident = $value:expr; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name($repr);

        impl $name {
            $( $(#[$fmeta])* pub const $flag: Self = Self($value); )*
            /// Every bit this crate knows a meaning for.
            pub const KNOWN: Self = Self(0 $(| $value)*);
            const NAMES: &'static [(&'static str, $repr)] = &[$((stringify!($flag), $value)),*];

            /// No bits set.
            pub const fn empty() -> Self {
                Self(0)
            }
            /// Wraps raw bits, unknown ones included.
            pub const fn from_bits(bits: $repr) -> Self {
                Self(bits)
            }
            /// The raw bits.
            pub const fn bits(self) -> $repr {
                self.0
            }
            /// Whether every bit of `other` is set.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }
            /// Whether any bit of `other` is set.
            pub const fn intersects(self, other: Self) -> bool {
                self.0 & other.0 != 0
            }
            /// Bits set in either.
            pub const fn union(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }
            /// Bits of `self` not in `other`.
            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }
            /// Whether no bit is set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }
            /// Bits this crate has no name for.
            pub const fn unknown_bits(self) -> $repr {
                self.0 & !Self::KNOWN.0
            }
        }

        impl BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                self.union(rhs)
            }
        }

        impl BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) {
                self.0 |= rhs.0;
            }
        }

        impl BitAnd for $name {
            type Output = Self;
            fn bitand(self, rhs: Self) -> Self {
                Self(self.0 & rhs.0)
            }
        }

        impl Not for $name {
            type Output = Self;
            fn not(self) -> Self {
                Self(!self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                let mut first = true;
                for (name, bit) in Self::NAMES {
                    if self.0 & bit != 0 {
                        if !first {
                            f.write_str(" | ")?;
                        }
                        f.write_str(name)?;
                        first = false;
                    }
                }
                if self.unknown_bits() != 0 {
                    if !first {
                        f.write_str(" | ")?;
                    }
                    write!(f, "{:#x}", self.unknown_bits())?;
                }
                f.write_str(")")
            }
        }
    };
}

flag_set! {
    /// Handshake flags the server sends in its greeting.
    HandshakeFlags: u16 {
        /// `NBD_FLAG_FIXED_NEWSTYLE`.
        FIXED_NEWSTYLE = NBD_FLAG_FIXED_NEWSTYLE;
        /// `NBD_FLAG_NO_ZEROES`.
        NO_ZEROES = NBD_FLAG_NO_ZEROES;
    }
}

flag_set! {
    /// Flags the client answers the greeting with.
    ClientFlags: u32 {
        /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
        FIXED_NEWSTYLE = NBD_FLAG_C_FIXED_NEWSTYLE;
        /// `NBD_FLAG_C_NO_ZEROES`.
        NO_ZEROES = NBD_FLAG_C_NO_ZEROES;
    }
}

flag_set! {
    /// Per-export transmission flags, sent with the export size.
    TransmissionFlags: u16 {
        /// `NBD_FLAG_HAS_FLAGS`: MUST always be set.
        HAS_FLAGS = NBD_FLAG_HAS_FLAGS;
        /// `NBD_FLAG_READ_ONLY`: writes, trims and write-zeroes get `EPERM`.
        READ_ONLY = NBD_FLAG_READ_ONLY;
        /// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is understood.
        SEND_FLUSH = NBD_FLAG_SEND_FLUSH;
        /// `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is understood.
        SEND_FUA = NBD_FLAG_SEND_FUA;
        /// `NBD_FLAG_ROTATIONAL`: hint that the medium seeks.
        ROTATIONAL = NBD_FLAG_ROTATIONAL;
        /// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is understood.
        SEND_TRIM = NBD_FLAG_SEND_TRIM;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and `NO_HOLE` are understood.
        SEND_WRITE_ZEROES = NBD_FLAG_SEND_WRITE_ZEROES;
        /// `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` on reads; only with structured replies.
        SEND_DF = NBD_FLAG_SEND_DF;
        /// `NBD_FLAG_CAN_MULTI_CONN`: flush/FUA are visible across connections.
        CAN_MULTI_CONN = NBD_FLAG_CAN_MULTI_CONN;
        /// `NBD_FLAG_SEND_RESIZE`: experimental `NBD_CMD_RESIZE`.
        SEND_RESIZE = NBD_FLAG_SEND_RESIZE;
        /// `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` is understood.
        SEND_CACHE = NBD_FLAG_SEND_CACHE;
        /// `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO`; needs `SEND_WRITE_ZEROES`.
        SEND_FAST_ZERO = NBD_FLAG_SEND_FAST_ZERO;
        /// `NBD_FLAG_BLOCK_STAT_PAYLOAD`: extended headers only.
        BLOCK_STAT_PAYLOAD = NBD_FLAG_BLOCK_STAT_PAYLOAD;
    }
}

impl TransmissionFlags {
    /// Makes an advertised set consistent with the spec: `HAS_FLAGS` always set; `SEND_DF`
    /// only with structured replies; `SEND_FAST_ZERO` only with `SEND_WRITE_ZEROES`;
    /// `BLOCK_STAT_PAYLOAD` never, since extended headers are refused.
    pub const fn sanitize(self, structured_replies: bool) -> Self {
        let mut bits = self.0 | NBD_FLAG_HAS_FLAGS;
        if !structured_replies {
            bits &= !NBD_FLAG_SEND_DF;
        }
        if bits & NBD_FLAG_SEND_WRITE_ZEROES == 0 {
            bits &= !NBD_FLAG_SEND_FAST_ZERO;
        }
        Self(bits & !NBD_FLAG_BLOCK_STAT_PAYLOAD)
    }
}

flag_set! {
    /// Command flags of a transmission request.
    CmdFlags: u16 {
        /// `NBD_CMD_FLAG_FUA`: persist before replying.
        FUA = NBD_CMD_FLAG_FUA;
        /// `NBD_CMD_FLAG_NO_HOLE`: write-zeroes must allocate.
        NO_HOLE = NBD_CMD_FLAG_NO_HOLE;
        /// `NBD_CMD_FLAG_DF`: read reply in at most one content chunk.
        DF = NBD_CMD_FLAG_DF;
        /// `NBD_CMD_FLAG_REQ_ONE`: block status with one extent per context.
        REQ_ONE = NBD_CMD_FLAG_REQ_ONE;
        /// `NBD_CMD_FLAG_FAST_ZERO`: fail write-zeroes with `ENOTSUP` unless it is fast.
        FAST_ZERO = NBD_CMD_FLAG_FAST_ZERO;
        /// `NBD_CMD_FLAG_PAYLOAD_LEN`: extended headers only.
        PAYLOAD_LEN = NBD_CMD_FLAG_PAYLOAD_LEN;
    }
}

flag_set! {
    /// Flags of a structured reply chunk.
    ReplyFlags: u16 {
        /// `NBD_REPLY_FLAG_DONE`: final chunk of this reply.
        DONE = NBD_REPLY_FLAG_DONE;
    }
}

/// A closed set of known values plus one variant that keeps anything else as sent.
///
/// Build values with `from_wire` so that a known number never ends up in the catch-all
/// variant (which would break `from_wire(x.to_wire()) == x`).
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident: $repr:ty {
            $( $(#[$vmeta:meta])* $variant:ident = $value:path, )*
        }
        $(#[$ometa:meta])* $other:ident
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            $(#[$ometa])*
            $other($repr),
        }

        impl $name {
            /// Decodes a wire value; values not known here land in the catch-all variant.
            pub const fn from_wire(v: $repr) -> Self {
                match v {
                    $( $value => Self::$variant, )*
                    other => Self::$other(other),
                }
            }
            /// The wire value.
            pub const fn to_wire(self) -> $repr {
                match self {
                    $( Self::$variant => $value, )*
                    Self::$other(v) => v,
                }
            }
        }
    };
}

wire_enum! {
    /// Option types a client sends during option haggling.
    Opt: u32 {
        /// `NBD_OPT_EXPORT_NAME`: pick an export and enter transmission (cannot fail softly).
        ExportName = NBD_OPT_EXPORT_NAME,
        /// `NBD_OPT_ABORT`: the client is leaving.
        Abort = NBD_OPT_ABORT,
        /// `NBD_OPT_LIST`: list exports.
        List = NBD_OPT_LIST,
        /// `NBD_OPT_PEEK_EXPORT`: withdrawn.
        PeekExport = NBD_OPT_PEEK_EXPORT,
        /// `NBD_OPT_STARTTLS`.
        StartTls = NBD_OPT_STARTTLS,
        /// `NBD_OPT_INFO`: describe an export.
        Info = NBD_OPT_INFO,
        /// `NBD_OPT_GO`: describe an export and enter transmission.
        Go = NBD_OPT_GO,
        /// `NBD_OPT_STRUCTURED_REPLY`.
        StructuredReply = NBD_OPT_STRUCTURED_REPLY,
        /// `NBD_OPT_LIST_META_CONTEXT`.
        ListMetaContext = NBD_OPT_LIST_META_CONTEXT,
        /// `NBD_OPT_SET_META_CONTEXT`.
        SetMetaContext = NBD_OPT_SET_META_CONTEXT,
        /// `NBD_OPT_EXTENDED_HEADERS`.
        ExtendedHeaders = NBD_OPT_EXTENDED_HEADERS,
    }
    /// An option number this crate does not know; answer `NBD_REP_ERR_UNSUP`.
    Unknown
}

wire_enum! {
    /// Option error reply types (bit 31 set).
    RepError: u32 {
        /// `NBD_REP_ERR_UNSUP`: option unknown to this server.
        Unsup = NBD_REP_ERR_UNSUP,
        /// `NBD_REP_ERR_POLICY`: known and valid, but forbidden by policy.
        Policy = NBD_REP_ERR_POLICY,
        /// `NBD_REP_ERR_INVALID`: known but syntactically or semantically invalid.
        Invalid = NBD_REP_ERR_INVALID,
        /// `NBD_REP_ERR_PLATFORM`: not supported on this platform/build.
        Platform = NBD_REP_ERR_PLATFORM,
        /// `NBD_REP_ERR_TLS_REQD`: TLS must be initiated first.
        TlsReqd = NBD_REP_ERR_TLS_REQD,
        /// `NBD_REP_ERR_UNKNOWN`: the requested export is not available.
        UnknownExport = NBD_REP_ERR_UNKNOWN,
        /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
        Shutdown = NBD_REP_ERR_SHUTDOWN,
        /// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the client must request `NBD_INFO_BLOCK_SIZE`.
        BlockSizeReqd = NBD_REP_ERR_BLOCK_SIZE_REQD,
        /// `NBD_REP_ERR_TOO_BIG`: request or reply too large.
        TooBig = NBD_REP_ERR_TOO_BIG,
        /// `NBD_REP_ERR_EXT_HEADER_REQD`: extended headers required.
        ExtHeaderReqd = NBD_REP_ERR_EXT_HEADER_REQD,
    }
    /// Any other value with bit 31 set: an error this crate does not know.
    Other
}

wire_enum! {
    /// `NBD_REP_INFO` information types.
    InfoType: u16 {
        /// `NBD_INFO_EXPORT`: size and transmission flags.
        Export = NBD_INFO_EXPORT,
        /// `NBD_INFO_NAME`: canonical export name.
        Name = NBD_INFO_NAME,
        /// `NBD_INFO_DESCRIPTION`: human-readable description.
        Description = NBD_INFO_DESCRIPTION,
        /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
        BlockSize = NBD_INFO_BLOCK_SIZE,
    }
    /// An information type this crate does not know; servers ignore such requests.
    Unknown
}

wire_enum! {
    /// Transmission command types.
    Command: u16 {
        /// `NBD_CMD_READ`.
        Read = NBD_CMD_READ,
        /// `NBD_CMD_WRITE`: followed by `length` bytes of data.
        Write = NBD_CMD_WRITE,
        /// `NBD_CMD_DISC`: soft disconnect; no reply.
        Disc = NBD_CMD_DISC,
        /// `NBD_CMD_FLUSH`.
        Flush = NBD_CMD_FLUSH,
        /// `NBD_CMD_TRIM`.
        Trim = NBD_CMD_TRIM,
        /// `NBD_CMD_CACHE`.
        Cache = NBD_CMD_CACHE,
        /// `NBD_CMD_WRITE_ZEROES`.
        WriteZeroes = NBD_CMD_WRITE_ZEROES,
        /// `NBD_CMD_BLOCK_STATUS`.
        BlockStatus = NBD_CMD_BLOCK_STATUS,
        /// `NBD_CMD_RESIZE` (experimental extension).
        Resize = NBD_CMD_RESIZE,
    }
    /// A command number this crate does not know; answer `EINVAL`.
    Unknown
}

wire_enum! {
    /// Structured reply chunk types.
    ChunkType: u16 {
        /// `NBD_REPLY_TYPE_NONE`: empty final chunk.
        None = NBD_REPLY_TYPE_NONE,
        /// `NBD_REPLY_TYPE_OFFSET_DATA`: offset + data.
        OffsetData = NBD_REPLY_TYPE_OFFSET_DATA,
        /// `NBD_REPLY_TYPE_OFFSET_HOLE`: offset + length of zeroes.
        OffsetHole = NBD_REPLY_TYPE_OFFSET_HOLE,
        /// `NBD_REPLY_TYPE_BLOCK_STATUS`: context id + 32-bit extents.
        BlockStatus = NBD_REPLY_TYPE_BLOCK_STATUS,
        /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: extended headers only.
        BlockStatusExt = NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
        /// `NBD_REPLY_TYPE_ERROR`.
        Error = NBD_REPLY_TYPE_ERROR,
        /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
        ErrorOffset = NBD_REPLY_TYPE_ERROR_OFFSET,
    }
    /// A chunk type this crate does not know.
    Unknown
}

impl ChunkType {
    /// Error chunk types have bit 15 set, known or not.
    pub const fn is_error(self) -> bool {
        self.to_wire() & NBD_REPLY_TYPE_FLAG_ERROR != 0
    }
}

/// The `reply type` field of an option reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplyType {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`.
    Server,
    /// `NBD_REP_INFO`.
    Info,
    /// `NBD_REP_META_CONTEXT`.
    MetaContext,
    /// Any value with bit 31 set.
    Error(RepError),
    /// A non-error reply type this crate does not know.
    Unknown(u32),
}

impl ReplyType {
    /// Decodes a wire value.
    pub const fn from_wire(v: u32) -> Self {
        if v & NBD_REP_FLAG_ERROR != 0 {
            return Self::Error(RepError::from_wire(v));
        }
        match v {
            NBD_REP_ACK => Self::Ack,
            NBD_REP_SERVER => Self::Server,
            NBD_REP_INFO => Self::Info,
            NBD_REP_META_CONTEXT => Self::MetaContext,
            other => Self::Unknown(other),
        }
    }

    /// The wire value.
    pub const fn to_wire(self) -> u32 {
        match self {
            Self::Ack => NBD_REP_ACK,
            Self::Server => NBD_REP_SERVER,
            Self::Info => NBD_REP_INFO,
            Self::MetaContext => NBD_REP_META_CONTEXT,
            Self::Error(e) => e.to_wire(),
            Self::Unknown(v) => v,
        }
    }
}

/// An NBD error value, as carried in simple replies and error chunks. Success (0) is not an
/// `Errno`: reply fields use `Option<Errno>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Errno {
    /// `NBD_EPERM` (1): write/trim/write-zeroes on a read-only export.
    Eperm,
    /// `NBD_EIO` (5).
    Eio,
    /// `NBD_ENOMEM` (12): servers SHOULD NOT use it.
    Enomem,
    /// `NBD_EINVAL` (22): bad flags, unknown command, misaligned, oversized, read past end.
    Einval,
    /// `NBD_ENOSPC` (28): write past end, out of space.
    Enospc,
    /// `NBD_EOVERFLOW` (75): only for a `DF` read too large to send unfragmented.
    Eoverflow,
    /// `NBD_ENOTSUP` (95): only for a `FAST_ZERO` write-zeroes that would not be fast.
    Enotsup,
    /// `NBD_ESHUTDOWN` (108): the server is shutting down.
    Eshutdown,
    /// A nonzero value the spec does not define. Clients treat it as `EINVAL`.
    Other(u32),
}

impl Errno {
    /// Decodes an error field: `None` for 0 (success).
    pub const fn from_wire(v: u32) -> Option<Self> {
        Some(match v {
            0 => return None,
            NBD_EPERM => Self::Eperm,
            NBD_EIO => Self::Eio,
            NBD_ENOMEM => Self::Enomem,
            NBD_EINVAL => Self::Einval,
            NBD_ENOSPC => Self::Enospc,
            NBD_EOVERFLOW => Self::Eoverflow,
            NBD_ENOTSUP => Self::Enotsup,
            NBD_ESHUTDOWN => Self::Eshutdown,
            other => Self::Other(other),
        })
    }

    /// The wire value (never 0 for values built with [`Errno::from_wire`]).
    pub const fn to_wire(self) -> u32 {
        match self {
            Self::Eperm => NBD_EPERM,
            Self::Eio => NBD_EIO,
            Self::Enomem => NBD_ENOMEM,
            Self::Einval => NBD_EINVAL,
            Self::Enospc => NBD_ENOSPC,
            Self::Eoverflow => NBD_EOVERFLOW,
            Self::Enotsup => NBD_ENOTSUP,
            Self::Eshutdown => NBD_ESHUTDOWN,
            Self::Other(v) => v,
        }
    }

    /// How a client should read an error: values the spec does not define count as `EINVAL`
    /// ("The client SHOULD treat an unexpected error value as if it had been `NBD_EINVAL`").
    pub const fn for_client(self) -> Self {
        match self {
            Self::Other(_) => Self::Einval,
            known => known,
        }
    }

    /// Maps a Linux errno from a local failure to the NBD value to send. `EDQUOT` and `EFBIG`
    /// become `ENOSPC` and `EROFS` becomes `EPERM` as the spec asks; anything without an NBD
    /// counterpart is reported as `EIO`, since from the client's side it is a failed I/O.
    pub const fn from_linux_errno(errno: i32) -> Self {
        match errno {
            1 | 30 => Self::Eperm,         // EPERM, EROFS
            12 => Self::Enomem,            // ENOMEM
            22 => Self::Einval,            // EINVAL
            27 | 28 | 122 => Self::Enospc, // EFBIG, ENOSPC, EDQUOT
            75 => Self::Eoverflow,         // EOVERFLOW
            95 => Self::Enotsup,           // EOPNOTSUPP == ENOTSUP on Linux
            108 => Self::Eshutdown,        // ESHUTDOWN
            _ => Self::Eio,
        }
    }

    /// The symbolic name (`"EINVAL"`), or `"unknown"` for [`Errno::Other`].
    pub const fn name(self) -> &'static str {
        match self {
            Self::Eperm => "EPERM",
            Self::Eio => "EIO",
            Self::Enomem => "ENOMEM",
            Self::Einval => "EINVAL",
            Self::Enospc => "ENOSPC",
            Self::Eoverflow => "EOVERFLOW",
            Self::Enotsup => "ENOTSUP",
            Self::Eshutdown => "ESHUTDOWN",
            Self::Other(_) => "unknown",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(v) => write!(f, "unknown NBD error {v}"),
            known => f.write_str(known.name()),
        }
    }
}

/// Encodes an optional error as the wire's error field (0 = success).
pub const fn errno_to_wire(e: Option<Errno>) -> u32 {
    match e {
        Some(e) => e.to_wire(),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_match_spec() {
        assert_eq!(Opt::ExportName.to_wire(), 1);
        assert_eq!(Opt::Abort.to_wire(), 2);
        assert_eq!(Opt::List.to_wire(), 3);
        assert_eq!(Opt::PeekExport.to_wire(), 4);
        assert_eq!(Opt::StartTls.to_wire(), 5);
        assert_eq!(Opt::Info.to_wire(), 6);
        assert_eq!(Opt::Go.to_wire(), 7);
        assert_eq!(Opt::StructuredReply.to_wire(), 8);
        assert_eq!(Opt::ListMetaContext.to_wire(), 9);
        assert_eq!(Opt::SetMetaContext.to_wire(), 10);
        assert_eq!(Opt::ExtendedHeaders.to_wire(), 11);
        assert_eq!(Opt::from_wire(12), Opt::Unknown(12));

        assert_eq!(RepError::Unsup.to_wire(), 0x8000_0001);
        assert_eq!(RepError::Policy.to_wire(), 0x8000_0002);
        assert_eq!(RepError::Invalid.to_wire(), 0x8000_0003);
        assert_eq!(RepError::Platform.to_wire(), 0x8000_0004);
        assert_eq!(RepError::TlsReqd.to_wire(), 0x8000_0005);
        assert_eq!(RepError::UnknownExport.to_wire(), 0x8000_0006);
        assert_eq!(RepError::Shutdown.to_wire(), 0x8000_0007);
        assert_eq!(RepError::BlockSizeReqd.to_wire(), 0x8000_0008);
        assert_eq!(RepError::TooBig.to_wire(), 0x8000_0009);
        assert_eq!(RepError::ExtHeaderReqd.to_wire(), 0x8000_000a);

        assert_eq!(ReplyType::from_wire(1), ReplyType::Ack);
        assert_eq!(ReplyType::from_wire(2), ReplyType::Server);
        assert_eq!(ReplyType::from_wire(3), ReplyType::Info);
        assert_eq!(ReplyType::from_wire(4), ReplyType::MetaContext);
        assert_eq!(ReplyType::from_wire(5), ReplyType::Unknown(5));
        assert_eq!(
            ReplyType::from_wire(0x8000_0042),
            ReplyType::Error(RepError::Other(0x8000_0042))
        );

        assert_eq!(Command::Read.to_wire(), 0);
        assert_eq!(Command::Write.to_wire(), 1);
        assert_eq!(Command::Disc.to_wire(), 2);
        assert_eq!(Command::Flush.to_wire(), 3);
        assert_eq!(Command::Trim.to_wire(), 4);
        assert_eq!(Command::Cache.to_wire(), 5);
        assert_eq!(Command::WriteZeroes.to_wire(), 6);
        assert_eq!(Command::BlockStatus.to_wire(), 7);
        assert_eq!(Command::Resize.to_wire(), 8);

        assert_eq!(ChunkType::None.to_wire(), 0);
        assert_eq!(ChunkType::OffsetData.to_wire(), 1);
        assert_eq!(ChunkType::OffsetHole.to_wire(), 2);
        assert_eq!(ChunkType::BlockStatus.to_wire(), 5);
        assert_eq!(ChunkType::BlockStatusExt.to_wire(), 6);
        assert_eq!(ChunkType::Error.to_wire(), 0x8001);
        assert_eq!(ChunkType::ErrorOffset.to_wire(), 0x8002);
        assert!(ChunkType::from_wire(0x8123).is_error());
        assert!(!ChunkType::OffsetData.is_error());

        assert_eq!(InfoType::Export.to_wire(), 0);
        assert_eq!(InfoType::Name.to_wire(), 1);
        assert_eq!(InfoType::Description.to_wire(), 2);
        assert_eq!(InfoType::BlockSize.to_wire(), 3);
    }

    #[test]
    fn flag_bits_match_spec() {
        assert_eq!(HandshakeFlags::FIXED_NEWSTYLE.bits(), 1);
        assert_eq!(HandshakeFlags::NO_ZEROES.bits(), 2);
        assert_eq!(ClientFlags::FIXED_NEWSTYLE.bits(), 1);
        assert_eq!(ClientFlags::NO_ZEROES.bits(), 2);
        let t = [
            (TransmissionFlags::HAS_FLAGS, 0),
            (TransmissionFlags::READ_ONLY, 1),
            (TransmissionFlags::SEND_FLUSH, 2),
            (TransmissionFlags::SEND_FUA, 3),
            (TransmissionFlags::ROTATIONAL, 4),
            (TransmissionFlags::SEND_TRIM, 5),
            (TransmissionFlags::SEND_WRITE_ZEROES, 6),
            (TransmissionFlags::SEND_DF, 7),
            (TransmissionFlags::CAN_MULTI_CONN, 8),
            (TransmissionFlags::SEND_RESIZE, 9),
            (TransmissionFlags::SEND_CACHE, 10),
            (TransmissionFlags::SEND_FAST_ZERO, 11),
            (TransmissionFlags::BLOCK_STAT_PAYLOAD, 12),
        ];
        for (flag, bit) in t {
            assert_eq!(flag.bits(), 1 << bit, "{flag:?}");
        }
        let c = [
            (CmdFlags::FUA, 0),
            (CmdFlags::NO_HOLE, 1),
            (CmdFlags::DF, 2),
            (CmdFlags::REQ_ONE, 3),
            (CmdFlags::FAST_ZERO, 4),
            (CmdFlags::PAYLOAD_LEN, 5),
        ];
        for (flag, bit) in c {
            assert_eq!(flag.bits(), 1 << bit, "{flag:?}");
        }
        assert_eq!(ReplyFlags::DONE.bits(), 1);
        assert_eq!(NBD_STATE_HOLE, 1);
        assert_eq!(NBD_STATE_ZERO, 2);
    }

    #[test]
    fn errno_values_match_spec() {
        let all = [
            (Errno::Eperm, 1),
            (Errno::Eio, 5),
            (Errno::Enomem, 12),
            (Errno::Einval, 22),
            (Errno::Enospc, 28),
            (Errno::Eoverflow, 75),
            (Errno::Enotsup, 95),
            (Errno::Eshutdown, 108),
        ];
        for (e, v) in all {
            assert_eq!(e.to_wire(), v);
            assert_eq!(Errno::from_wire(v), Some(e));
        }
        assert_eq!(Errno::from_wire(0), None);
        assert_eq!(Errno::from_wire(7), Some(Errno::Other(7)));
        assert_eq!(Errno::Other(7).for_client(), Errno::Einval);
        assert_eq!(Errno::from_linux_errno(122), Errno::Enospc);
        assert_eq!(Errno::from_linux_errno(30), Errno::Eperm);
        assert_eq!(Errno::from_linux_errno(2), Errno::Eio);
    }

    #[test]
    fn flags_debug_and_sanitize() {
        let f = TransmissionFlags::READ_ONLY | TransmissionFlags::from_bits(1 << 15);
        assert_eq!(format!("{f:?}"), "TransmissionFlags(READ_ONLY | 0x8000)");
        assert_eq!(f.unknown_bits(), 1 << 15);
        let s = (TransmissionFlags::SEND_DF | TransmissionFlags::SEND_FAST_ZERO).sanitize(false);
        assert_eq!(s, TransmissionFlags::HAS_FLAGS);
        let s = (TransmissionFlags::SEND_DF
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_FAST_ZERO
            | TransmissionFlags::BLOCK_STAT_PAYLOAD)
            .sanitize(true);
        assert_eq!(
            s,
            TransmissionFlags::HAS_FLAGS
                | TransmissionFlags::SEND_DF
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_FAST_ZERO
        );
    }
}
