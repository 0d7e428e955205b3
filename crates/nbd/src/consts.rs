//! Raw wire values from the NBD protocol (`doc/proto.md` in NetworkBlockDevice/nbd).
//!
//! Everything on the wire is big-endian. The typed wrappers in the rest of the crate are built
//! from these numbers; they are public so that logs, tests and other tools can name them.

// --- Magic numbers -------------------------------------------------------------------------

/// `NBDMAGIC` (also `INIT_PASSWD`): first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic in the greeting, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// `cliserv_magic`: the oldstyle greeting's second magic. Only used to recognise (and refuse)
/// an oldstyle server.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: compact (28-byte) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC`: 32-byte request, only after `NBD_OPT_EXTENDED_HEADERS`
/// (which this crate refuses).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_SIMPLE_REPLY_MAGIC` (formerly `NBD_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: structured reply chunk header.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC`: extended reply header (extended headers only; refused here).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// --- Handshake flags (server, 16 bits) and client flags (32 bits) -------------------------

/// `NBD_FLAG_FIXED_NEWSTYLE` (handshake flag, bit 0).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES` (handshake flag, bit 1).
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// `NBD_FLAG_C_FIXED_NEWSTYLE` (client flag, bit 0).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES` (client flag, bit 1).
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// --- Transmission flags (16 bits, per export) ---------------------------------------------

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const NBD_FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// --- Option types (32 bits) ---------------------------------------------------------------

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn; never implemented anywhere. Answered like any unsupported option.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// --- Option reply types (32 bits; errors have bit 31 set) --------------------------------

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31: set on every option error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

// --- NBD_REP_INFO information types (16 bits) ---------------------------------------------

pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// --- Commands (16 bits) -------------------------------------------------------------------

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Experimental `RESIZE` extension.
pub const NBD_CMD_RESIZE: u16 = 8;

// --- Command flags (16 bits) --------------------------------------------------------------

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// --- Structured replies -------------------------------------------------------------------

/// `NBD_REPLY_FLAG_DONE`: last chunk of a structured reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Bit 15: set on every error chunk type.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// 64-bit block status (extended headers only).
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

// --- base:allocation block status flags (32 bits) -----------------------------------------

/// `NBD_STATE_HOLE`: the extent is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO`: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// Name of the one metadata context the spec defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

// --- Error values (32 bits) ---------------------------------------------------------------

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// --- Sizes and limits ---------------------------------------------------------------------

/// IANA port for newstyle NBD.
pub const NBD_DEFAULT_PORT: u16 = 10809;
/// Every protocol string (export name, query, message) MUST be at most this long.
pub const MAX_STRING_LEN: usize = 4096;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Default bound on option data a server will buffer: room for the largest legal
/// `NBD_OPT_GO` (4-byte length, 4096-byte name, 2-byte count, a generous list of info
/// requests) and a `SET_META_CONTEXT` with [`MAX_META_QUERIES`] short queries.
pub const DEFAULT_MAX_OPTION_LEN: u32 = 16 * 1024;
/// Default bound on option reply data a client will buffer.
pub const DEFAULT_MAX_OPTION_REPLY_LEN: u32 = 16 * 1024;
/// Most meta-context queries accepted in one option; more gets `NBD_REP_ERR_TOO_BIG`.
pub const MAX_META_QUERIES: u32 = 64;
/// Lengths below this SHOULD NOT be treated as a denial of service (spec, "Block size
/// constraints"); it is also the interoperable maximum READ/WRITE size for clients.
pub const DOS_PAYLOAD_THRESHOLD: u32 = 1 << 25;
/// Unfragmented (`NBD_CMD_FLAG_DF`) reads up to this length MUST be supported.
pub const MIN_DF_READ: u32 = 1 << 16;
