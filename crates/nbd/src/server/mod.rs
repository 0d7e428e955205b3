//! The server side of one NBD connection as a sans-I/O state machine.
//!
//! [`ServerConn`] owns no socket and runs no I/O. The daemon moves bytes between the socket
//! and the connection, and runs on its reactors the [`Io`]s the connection asks for:
//!
//! ```text
//! conn = ServerConn::new(cfg); conn.greeting();
//! loop {
//!     readable && conn.wants_input():  n = conn.input(&rbuf, &exports); keep rbuf[n..]
//!     while let Some(io) = conn.next_io(): run io (data in conn.buffer(io.slot))
//!     io done:      conn.complete(slot, result) / conn.complete_block_status(slot, &extents)
//!     writable && conn.output_len() > 0:
//!                   k = conn.output_iovecs(&mut iov); n = writev(&iov[..k]); conn.consume_output(n)
//!     conn.wants_close(): close the socket
//! }
//! ```
//!
//! After a `complete*` or `consume_output`, check `next_io` and `wants_input` again: a
//! request held back by back-pressure may have started.
//!
//! # Handshake
//!
//! Fixed newstyle (plain newstyle clients may only send `EXPORT_NAME`). Options are
//! answered straight into the output: `INFO`/`GO` (`NBD_INFO_EXPORT`, `BLOCK_SIZE` always,
//! `NAME` and `DESCRIPTION` when asked), `LIST`, `ABORT`, `EXPORT_NAME` (with or without the
//! 124 zero bytes), `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` with
//! `base:allocation`; `STARTTLS` as [`TlsPolicy`] says (`ERR_POLICY` when off; the daemon runs the
//! TLS handshake itself, see [`ServerConn::tls_wanted`]), `EXTENDED_HEADERS` and unknown options
//! `ERR_UNSUP`, malformed data `ERR_INVALID` (or `ERR_TOO_BIG`, its data skipped unread).
//! Garbage instead of a magic, bad client flags, an unknown export in `EXPORT_NAME` end the
//! connection.
//!
//! # Transmission
//!
//! Each request header is checked with [`classify_request`](crate::classify_request):
//! rejected requests are answered at once (a rejected write's data is read and dropped
//! first, unless it is too large to be worth reading, and then the connection closes after
//! the reply). Accepted ones take a *slot* and become an [`Io`]. Replies go out in
//! completion order: simple replies, or with structured replies one `OFFSET_DATA` chunk per
//! read and `ERROR` chunks for errors. `DISC` stops the input; what was accepted before it
//! is still answered, then the state becomes [`State::Closed`].
//!
//! # Buffers and zero copy
//!
//! A slot owns a data buffer, allocated the first time the slot serves a read or write,
//! kept for later requests, and replaced by a bigger one only when a request needs more
//! (sizes are rounded up to a power of two, so few sizes occur). All buffers together are
//! capped ([`ServerConfig::max_buffer_bytes`]); idle buffers are given up first, then a
//! request waits. In steady state no request allocates.
//!
//! Write data is copied from the input once, into the slot buffer the daemon then writes
//! from. A read fills the slot buffer; on completion its reply header is appended to the
//! output's control bytes and the buffer itself is queued as the next output segment.
//! [`ServerConn::output_iovecs`] lends the segments as `IoSlice`s, so the data goes to the
//! socket from the buffer it was read into, and the slot is reused only after
//! [`ServerConn::consume_output`] has passed its last byte. A slot buffer's address is
//! stable from completion until then; the control bytes may move on any `&mut` call.
//!
//! # Bounds
//!
//! Input is never buffered beyond one header (28 bytes) and one option
//! ([`ServerConfig::max_option_len`]). Requests in flight are bounded by
//! [`ServerConfig::max_in_flight`]; when they are all busy, when buffer memory is short, or
//! when more than [`ServerConfig::max_pending_output`] control bytes wait to be sent,
//! `input` stops consuming. Control output is therefore at most `max_pending_output`, plus
//! one reply per request in flight (at most [`ServerConfig::max_reply_len`] each), plus the
//! replies to one option.

mod conn;
mod exports;
mod output;
mod slots;

pub use conn::{Io, IoKind, ServerConfig, ServerConn, State, TlsPolicy, BASE_ALLOCATION_ID};
pub use exports::{ExportInfo, ExportSummary, Exports};
