//! [`ServerConn`]: one NBD connection, server side, as a sans-I/O state machine.

use std::collections::VecDeque;
use std::io::IoSlice;

use super::exports::{ExportInfo, Exports};
use super::output::{OutQueue, Piece};
use super::slots::{SlotState, Slots};
use crate::consts::{
    BASE_ALLOCATION, DEFAULT_MAX_OPTION_LEN, DOS_PAYLOAD_THRESHOLD, MAX_STRING_LEN, NBD_STATE_HOLE,
    NBD_STATE_ZERO,
};
use crate::{
    classify_request, encode_block_status, encode_offset_data_header, split_context_name,
    BlockSize, ClientFlags, CmdFlags, Command, Errno, ExportNameReply, ExportRequest, Extent, Info,
    InfoType, MetaContextRequest, Negotiated, Opt, OptionHeader, OptionReply, OptionRequest,
    ProtocolError, RepError, ReplyChunk, ReplyFlags, Request, ServerGreeting, SimpleReply,
    TransmissionParams,
};

/// The metadata context id of `base:allocation` (the only context served).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Limits of one connection. The defaults suit a daemon serving many connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Requests accepted but not yet answered (queued, running, or with read data still in
    /// the output). At the limit, [`ServerConn::input`] stops consuming. Clamped to
    /// `1..=4096`.
    pub max_in_flight: u32,
    /// Largest option data buffered during the handshake; longer options get
    /// `NBD_REP_ERR_TOO_BIG` and their data is skipped unread. Clamped to `1..=1 MiB`.
    pub max_option_len: u32,
    /// Largest READ/WRITE/CACHE length: the advertised maximum block size is capped to
    /// it. Clamped to `1..=2^25`, the largest payload the spec asks servers to accept.
    pub max_request_bytes: u32,
    /// Most memory held in data buffers by the connection (never less than one largest
    /// request). When a request needs more, it waits for buffers in use to come back.
    pub max_buffer_bytes: usize,
    /// While more control bytes than this wait in the output (the client is not reading
    /// its replies), no new option or request is taken.
    pub max_pending_output: usize,
    /// Most extents in one block status reply (the spec lets a server send fewer extents
    /// than cover the request). Clamped to at least 1.
    pub max_extents: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 128,
            max_option_len: DEFAULT_MAX_OPTION_LEN,
            max_request_bytes: DOS_PAYLOAD_THRESHOLD,
            max_buffer_bytes: 128 << 20,
            max_pending_output: 256 << 10,
            max_extents: 1024,
        }
    }
}

impl ServerConfig {
    fn clamped(mut self) -> Self {
        self.max_in_flight = self.max_in_flight.clamp(1, 4096);
        self.max_option_len = self.max_option_len.clamp(1, 1 << 20);
        self.max_request_bytes = self.max_request_bytes.clamp(1, DOS_PAYLOAD_THRESHOLD);
        self.max_extents = self.max_extents.max(1);
        self
    }

    /// Largest control output a single reply can add: a full block status reply, or an
    /// error chunk with the longest message (whichever is bigger).
    pub fn max_reply_len(&self) -> usize {
        let c = self.clamped();
        (20 + 4 + 8 * c.max_extents).max(20 + 6 + MAX_STRING_LEN)
    }
}

/// What a connection does about TLS (`NBD_OPT_STARTTLS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS: `STARTTLS` gets `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS if the client asks for it ("selective"): every option works either way.
    On,
    /// TLS only: before `STARTTLS`, `EXPORT_NAME` ends the session and every other option
    /// but `ABORT` gets `NBD_REP_ERR_TLS_REQD`.
    Require,
}

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Greeting and option haggling.
    Handshake,
    /// Serving requests for the export chosen with `GO` or `EXPORT_NAME`.
    Transmission,
    /// Ending: no more input is taken; the I/O still queued or running must be completed
    /// and the output sent, then the state becomes `Closed`.
    Closing,
    /// Nothing left to do: close the socket.
    Closed,
}

/// What an [`Io`] asks the daemon to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// Fill [`ServerConn::buffer`] with `length` bytes from `offset`.
    Read,
    /// Write [`ServerConn::buffer`] (`length` bytes, as received) at `offset`.
    Write,
    /// Persist every write completed so far.
    Flush,
    /// Discard (a hint).
    Trim,
    /// Zero `length` bytes. `no_hole`: the range must stay allocated. `fast_zero`: fail at
    /// once with `Errno::Enotsup` unless this is faster than writing zeroes.
    WriteZeroes { no_hole: bool, fast_zero: bool },
    /// Prefetch (a hint).
    Cache,
    /// Report allocation with [`ServerConn::complete_block_status`]. `req_one`: only the
    /// first extent will be sent.
    BlockStatus { req_one: bool },
}

/// One request the daemon must run, then answer with [`ServerConn::complete`] (or
/// [`ServerConn::complete_block_status`]) quoting `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Io {
    /// Identifies the request and its buffer until it is completed.
    pub slot: u32,
    pub kind: IoKind,
    /// Byte offset in the export (checked: the range is inside the export).
    pub offset: u64,
    /// Bytes (0 for `Flush`).
    pub length: u32,
    /// Persist before completing (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
    /// [`ExportInfo::handle`] of the export in use.
    pub export: u64,
}

/// What the handshake has settled so far.
#[derive(Debug, Default)]
struct Haggle {
    flags: Negotiated,
    structured: bool,
    /// `base:allocation` selected by the last `SET_META_CONTEXT`, for this export.
    meta: Option<(String, u64)>,
}

/// Fixed for the whole transmission phase.
#[derive(Clone, Copy, Debug)]
struct Session {
    params: TransmissionParams,
    export: u64,
    structured: bool,
    can_cache: bool,
}

/// What the next input bytes are.
#[derive(Clone, Copy, Debug)]
enum Rx {
    /// The client's 4-byte flags.
    ClientFlags,
    /// A 16-byte option header.
    OptHeader,
    /// `header.length` bytes of option data, gathered in `opt_buf`.
    OptData(OptionHeader),
    /// Data of an over-long option, read and thrown away.
    OptSkip(u32),
    /// A 28-byte request header.
    ReqHeader,
    /// A request header that waits for a free slot, buffer memory or output room.
    Pending(Request),
    /// Write data going into `slot`'s buffer; `got` bytes so far.
    Payload { slot: u32, got: u32 },
    /// Write data of a rejected request, read and thrown away; then the error reply.
    Skip {
        left: u32,
        cookie: u64,
        errno: Errno,
        reason: &'static str,
    },
    /// `STARTTLS` was acknowledged: no more plain-text input is read; the daemon sends the
    /// output, runs the TLS handshake, then calls [`ServerConn::tls_started`].
    TlsWait,
    /// Nothing more is read.
    Done,
}

/// The server side of one NBD connection: bytes in, I/O requests out, completions in,
/// bytes out. See the [module documentation](super) for the daemon's loop.
#[derive(Debug)]
pub struct ServerConn {
    cfg: ServerConfig,
    state: State,
    rx: Rx,
    greeted: bool,
    /// Fixed-size headers, gathered across `input` calls.
    stash: [u8; Request::SIZE],
    stash_len: usize,
    opt_buf: Vec<u8>,
    haggle: Haggle,
    session: Option<Session>,
    slots: Slots,
    ready: VecDeque<u32>,
    out: OutQueue,
    /// Scratch for block status replies.
    extents: Vec<Extent>,
    tls: TlsPolicy,
    tls_active: bool,
}

impl ServerConn {
    pub fn new(cfg: ServerConfig) -> Self {
        let cfg = cfg.clamped();
        Self {
            cfg,
            state: State::Handshake,
            rx: Rx::ClientFlags,
            greeted: false,
            stash: [0; Request::SIZE],
            stash_len: 0,
            opt_buf: Vec::new(),
            haggle: Haggle::default(),
            session: None,
            slots: Slots::default(),
            ready: VecDeque::new(),
            out: OutQueue::with_capacity(4096, 4),
            extents: Vec::new(),
            tls: TlsPolicy::Off,
            tls_active: false,
        }
    }

    /// Sets what the connection does about TLS (before any input; [`TlsPolicy::Off`] if
    /// never called).
    pub fn set_tls(&mut self, policy: TlsPolicy) {
        self.tls = policy;
    }

    /// `STARTTLS` was acknowledged and the connection waits for the TLS handshake: send the
    /// output (the `ACK`) in plain text, then run the handshake on the same socket and call
    /// [`tls_started`](Self::tls_started). A plain-text byte still unconsumed at this point was
    /// sent before the `ACK`, which no client may do.
    pub fn tls_wanted(&self) -> bool {
        matches!(self.rx, Rx::TlsWait)
    }

    /// The TLS handshake finished: option haggling resumes, over TLS.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        if matches!(self.rx, Rx::TlsWait) {
            self.rx = Rx::OptHeader;
        }
    }

    /// Whether TLS is in force on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Queues the server greeting (fixed newstyle, `NO_ZEROES` offered). Only the first
    /// call does anything.
    pub fn greeting(&mut self) {
        if !self.greeted {
            self.greeted = true;
            self.out.ctrl_with(|v| ServerGreeting::STACKBD.encode(v));
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The daemon should close the socket (everything owed has been sent).
    pub fn wants_close(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether [`input`](Self::input) would take more bytes now. `false` while the
    /// connection waits for slots, buffer memory or output room (back-pressure: stop
    /// reading the socket until a completion or a send changes that), and once it ends.
    pub fn wants_input(&self) -> bool {
        match self.rx {
            Rx::Done | Rx::Pending(_) | Rx::TlsWait => false,
            Rx::OptHeader => !(self.stash_len == 0 && self.output_full()),
            _ => true,
        }
    }

    /// Requests accepted and not yet fully answered.
    pub fn in_flight(&self) -> usize {
        self.slots.in_use()
    }

    /// Bytes held in this connection's data buffers.
    pub fn buffer_bytes(&self) -> usize {
        self.slots.buffer_bytes()
    }

    /// What was agreed for the export in use, once in transmission.
    pub fn transmission(&self) -> Option<&TransmissionParams> {
        self.session.as_ref().map(|s| &s.params)
    }

    /// [`ExportInfo::handle`] of the export in use, once in transmission.
    pub fn export_handle(&self) -> Option<u64> {
        self.session.map(|s| s.export)
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.haggle.structured
    }

    /// Stops taking input; I/O already accepted is still answered, then the connection
    /// closes. For a server shutting down.
    pub fn shutdown(&mut self) {
        self.close();
    }

    // --- Input ---------------------------------------------------------------------------

    /// Consumes as much of `bytes` as it can and returns how many it took. Bytes not taken
    /// must be offered again (with more appended) once [`wants_input`](Self::wants_input)
    /// is true again. Fixed-size headers split across calls are gathered internally, write
    /// data goes straight into its slot's buffer, and nothing else is buffered: what is not
    /// consumed stays with the caller.
    pub fn input(&mut self, bytes: &[u8], exports: &dyn Exports) -> usize {
        let mut pos = 0;
        while let Some(n) = self.step(&bytes[pos..], exports) {
            pos += n;
        }
        pos
    }

    /// One move of the input state machine: `Some(n)` after consuming `n` bytes (possibly
    /// 0 when the state changed), `None` when nothing more can happen with this input.
    fn step(&mut self, input: &[u8], exports: &dyn Exports) -> Option<usize> {
        match self.rx {
            Rx::Done | Rx::Pending(_) | Rx::TlsWait => None,
            Rx::ClientFlags => {
                let n = self.gather(ClientFlags::SIZE, input)?;
                if self.stash_len == ClientFlags::SIZE {
                    self.stash_len = 0;
                    self.on_client_flags();
                }
                Some(n)
            }
            Rx::OptHeader => {
                if self.stash_len == 0 && self.output_full() {
                    return None;
                }
                let n = self.gather(OptionHeader::SIZE, input)?;
                if self.stash_len == OptionHeader::SIZE {
                    self.stash_len = 0;
                    self.on_option_header(exports);
                }
                Some(n)
            }
            Rx::OptData(header) => {
                let want = header.length as usize - self.opt_buf.len();
                let n = want.min(input.len());
                if n == 0 {
                    return None;
                }
                self.opt_buf.extend_from_slice(&input[..n]);
                if self.opt_buf.len() == header.length as usize {
                    self.rx = Rx::OptHeader;
                    self.on_option(header, exports);
                }
                Some(n)
            }
            Rx::OptSkip(left) => {
                let n = (left as usize).min(input.len());
                if n == 0 {
                    return None;
                }
                let left = left - n as u32;
                self.rx = if left == 0 {
                    Rx::OptHeader
                } else {
                    Rx::OptSkip(left)
                };
                Some(n)
            }
            Rx::ReqHeader => {
                let n = self.gather(Request::SIZE, input)?;
                if self.stash_len == Request::SIZE {
                    self.stash_len = 0;
                    match Request::decode(&self.stash) {
                        Ok(Some((req, _))) => {
                            self.rx = Rx::Pending(req);
                            self.try_start();
                        }
                        // Bad magic: the stream is out of sync; nothing can be answered.
                        _ => self.close(),
                    }
                }
                Some(n)
            }
            Rx::Payload { slot, got } => {
                let Some(s) = self.slots.in_state(slot, SlotState::Receiving) else {
                    self.close(); // cannot happen: the slot was taken for this write
                    return Some(0);
                };
                let want = s.length - got;
                let n = (want as usize).min(input.len());
                if n == 0 {
                    return None;
                }
                let start = got as usize;
                let Some(dst) = s.data_mut().get_mut(start..start + n) else {
                    self.close(); // cannot happen: the buffer holds `length` bytes
                    return Some(0);
                };
                dst.copy_from_slice(&input[..n]);
                let got = got + n as u32;
                if got == s.length {
                    s.state = SlotState::Ready;
                    self.ready.push_back(slot);
                    self.rx = Rx::ReqHeader;
                } else {
                    self.rx = Rx::Payload { slot, got };
                }
                Some(n)
            }
            Rx::Skip {
                left,
                cookie,
                errno,
                reason,
            } => {
                let n = (left as usize).min(input.len());
                if n == 0 {
                    return None;
                }
                let left = left - n as u32;
                if left == 0 {
                    self.rx = Rx::ReqHeader;
                    self.reply_error(cookie, errno, reason);
                } else {
                    self.rx = Rx::Skip {
                        left,
                        cookie,
                        errno,
                        reason,
                    };
                }
                Some(n)
            }
        }
    }

    /// Copies bytes into the header stash until it holds `want`. `None` if there was
    /// nothing to take.
    fn gather(&mut self, want: usize, input: &[u8]) -> Option<usize> {
        let n = want.saturating_sub(self.stash_len).min(input.len());
        if n == 0 {
            return None;
        }
        self.stash[self.stash_len..self.stash_len + n].copy_from_slice(&input[..n]);
        self.stash_len += n;
        Some(n)
    }

    fn output_full(&self) -> bool {
        self.out.ctrl_pending() > self.cfg.max_pending_output
    }

    // --- Handshake ------------------------------------------------------------------------

    fn on_client_flags(&mut self) {
        let flags = ClientFlags::from_bits(u32::from_be_bytes([
            self.stash[0],
            self.stash[1],
            self.stash[2],
            self.stash[3],
        ]));
        match flags.negotiate(ServerGreeting::STACKBD.flags) {
            Ok(n) => {
                self.haggle.flags = n;
                self.rx = Rx::OptHeader;
            }
            // "the server MUST drop the TCP connection if the client sets an unknown flag"
            Err(_) => self.close(),
        }
    }

    fn on_option_header(&mut self, exports: &dyn Exports) {
        let fixed = self.haggle.flags.fixed_newstyle;
        match OptionHeader::decode(&self.stash[..OptionHeader::SIZE], self.cfg.max_option_len) {
            Ok(Some((header, _))) => {
                // Non-fixed newstyle knows only EXPORT_NAME and has no error replies.
                if !fixed && header.option != Opt::ExportName {
                    return self.close();
                }
                self.opt_buf.clear();
                if header.length == 0 {
                    self.on_option(header, exports);
                } else {
                    self.opt_buf.reserve(header.length as usize);
                    self.rx = Rx::OptData(header);
                }
            }
            Err(ProtocolError::OptionTooLong { option, length, .. }) => {
                let opt = Opt::from_wire(option);
                match opt {
                    // EXPORT_NAME cannot be answered with an error: end the session.
                    _ if !fixed || opt == Opt::ExportName => self.close(),
                    // The client is leaving anyway; its data does not matter.
                    Opt::Abort => {
                        self.option_reply(opt, OptionReply::Ack);
                        self.close();
                    }
                    _ => {
                        self.option_reply(
                            opt,
                            OptionReply::error(RepError::TooBig, "option data too long"),
                        );
                        self.rx = Rx::OptSkip(length);
                    }
                }
            }
            // Bad magic (garbage, or an oldstyle/extended client): the stream is lost.
            _ => self.close(),
        }
    }

    fn option_reply(&mut self, opt: Opt, reply: OptionReply<'_>) {
        self.out.ctrl_with(|v| reply.encode(opt, v));
    }

    /// Handles a complete option (header + data in `opt_buf`).
    fn on_option(&mut self, header: OptionHeader, exports: &dyn Exports) {
        let data = std::mem::take(&mut self.opt_buf);
        self.handle_option(header.option, &data, exports);
        self.opt_buf = data;
        if self.state != State::Handshake {
            // Transmission (or the end): option memory is no longer needed.
            self.opt_buf = Vec::new();
        }
    }

    fn handle_option(&mut self, opt: Opt, data: &[u8], exports: &dyn Exports) {
        // "Issuing this command replaces all previously-set metadata contexts (including
        // when this command fails)".
        if opt == Opt::SetMetaContext {
            self.haggle.meta = None;
        }
        if self.tls == TlsPolicy::Require && !self.tls_active {
            match opt {
                Opt::StartTls | Opt::Abort => {}
                // No error reply exists for EXPORT_NAME: the session ends.
                Opt::ExportName => return self.close(),
                _ => {
                    let msg = "TLS is required: send NBD_OPT_STARTTLS first";
                    return self.option_reply(opt, OptionReply::error(RepError::TlsReqd, msg));
                }
            }
        }
        let req = match OptionRequest::parse(opt, data) {
            Ok(req) => req,
            Err(e) => {
                match e.option_reply() {
                    Some(err) if opt != Opt::ExportName => {
                        let msg = e.to_string();
                        self.option_reply(opt, OptionReply::error(err, &msg));
                    }
                    _ => self.close(),
                }
                return;
            }
        };
        match req {
            OptionRequest::ExportName { name } => self.export_name(name, exports),
            OptionRequest::Abort => {
                self.option_reply(opt, OptionReply::Ack);
                self.close();
            }
            OptionRequest::List => {
                for e in exports.list() {
                    // A name over the string limit could not be asked for anyway.
                    if e.name.len() <= MAX_STRING_LEN {
                        self.option_reply(opt, OptionReply::server(&e.name, &e.description));
                    }
                }
                self.option_reply(opt, OptionReply::Ack);
            }
            OptionRequest::StartTls => self.start_tls(opt),
            OptionRequest::Info(r) => self.info(opt, r, exports, false),
            OptionRequest::Go(r) => self.info(opt, r, exports, true),
            OptionRequest::StructuredReply => {
                if self.haggle.structured {
                    let msg = "structured replies already negotiated";
                    self.option_reply(opt, OptionReply::error(RepError::Invalid, msg));
                } else {
                    self.haggle.structured = true;
                    self.option_reply(opt, OptionReply::Ack);
                }
            }
            OptionRequest::ListMetaContext(r) => self.meta_context(opt, r, exports, false),
            OptionRequest::SetMetaContext(r) => self.meta_context(opt, r, exports, true),
            OptionRequest::ExtendedHeaders => self.option_reply(
                opt,
                OptionReply::error(RepError::Unsup, "extended headers are not supported"),
            ),
            OptionRequest::Unsupported(_) => {
                self.option_reply(opt, OptionReply::error(RepError::Unsup, ""));
            }
        }
    }

    fn start_tls(&mut self, opt: Opt) {
        if self.tls == TlsPolicy::Off {
            let msg = "TLS is not enabled on this server";
            return self.option_reply(opt, OptionReply::error(RepError::Policy, msg));
        }
        if self.tls_active {
            let msg = "TLS is already in force";
            return self.option_reply(opt, OptionReply::error(RepError::Invalid, msg));
        }
        self.option_reply(opt, OptionReply::Ack);
        // What was negotiated in plain text does not carry over into TLS.
        self.haggle.structured = false;
        self.haggle.meta = None;
        self.rx = Rx::TlsWait;
    }

    /// The export an option names, with the block size constraints to advertise. The
    /// error reply says why not.
    fn resolve(
        &self,
        name: &str,
        exports: &dyn Exports,
    ) -> Result<(ExportInfo, BlockSize), (RepError, &'static str)> {
        let info = if name.is_empty() {
            exports.default_export().and_then(|d| exports.lookup(&d))
        } else {
            exports.lookup(name)
        };
        let info = info.ok_or((RepError::UnknownExport, "no such export"))?;
        let mut bs = info.block_size;
        if bs.min != 0 && bs.max > self.cfg.max_request_bytes {
            bs.max = (self.cfg.max_request_bytes / bs.min * bs.min).max(bs.min);
        }
        // A server must not advertise constraints that break the spec's rules.
        bs.check(info.size_bytes).map_err(|_| {
            (
                RepError::UnknownExport,
                "export has invalid block size constraints",
            )
        })?;
        Ok((info, bs))
    }

    fn info(&mut self, opt: Opt, r: ExportRequest<'_>, exports: &dyn Exports, go: bool) {
        let (info, bs) = match self.resolve(r.name, exports) {
            Ok(x) => x,
            Err((err, msg)) => return self.option_reply(opt, OptionReply::error(err, msg)),
        };
        let flags = info.transmission_flags(self.haggle.structured);
        let export = Info::Export {
            size: info.size_bytes,
            flags,
        };
        self.option_reply(opt, OptionReply::Info(export));
        // Sent whether asked or not (allowed): the constraints are enforced either way.
        self.option_reply(opt, OptionReply::Info(Info::BlockSize(bs)));
        if r.wants(InfoType::Name) && info.name.len() <= MAX_STRING_LEN {
            self.option_reply(opt, OptionReply::Info(Info::Name(info.name.as_bytes())));
        }
        if r.wants(InfoType::Description) && !info.description.is_empty() {
            let d = Info::Description(info.description.as_bytes());
            self.option_reply(opt, OptionReply::Info(d));
        }
        self.option_reply(opt, OptionReply::Ack);
        if go {
            self.enter_transmission(&info, bs);
        }
    }

    fn export_name(&mut self, name: &str, exports: &dyn Exports) {
        let Ok((info, bs)) = self.resolve(name, exports) else {
            // "If the chosen export does not exist ... the server MUST terminate the session."
            return self.close();
        };
        let reply = ExportNameReply {
            size: info.size_bytes,
            flags: info.transmission_flags(self.haggle.structured),
        };
        let no_zeroes = self.haggle.flags.no_zeroes;
        self.out.ctrl_with(|v| reply.encode(v, no_zeroes));
        self.enter_transmission(&info, bs);
    }

    fn meta_context(
        &mut self,
        opt: Opt,
        r: MetaContextRequest<'_>,
        exports: &dyn Exports,
        set: bool,
    ) {
        if !self.haggle.structured {
            let msg = "negotiate structured replies first";
            return self.option_reply(opt, OptionReply::error(RepError::Invalid, msg));
        }
        let info = match self.resolve(r.export, exports) {
            Ok((info, _)) => info,
            Err((err, msg)) => return self.option_reply(opt, OptionReply::error(err, msg)),
        };
        // LIST with no query lists everything; SET with none selects nothing. "base:" is
        // a wildcard for LIST and ignored by SET; unknown namespaces and leaves are ignored.
        let matches = if r.query_count() == 0 {
            !set
        } else {
            r.queries().any(|q| match split_context_name(q) {
                Some(("base", "allocation")) => true,
                Some(("base", "")) => !set,
                _ => false,
            })
        };
        if matches {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            self.option_reply(opt, OptionReply::meta_context(id, BASE_ALLOCATION));
            if set {
                self.haggle.meta = Some((info.name, info.handle));
            }
        }
        self.option_reply(opt, OptionReply::Ack);
    }

    fn enter_transmission(&mut self, info: &ExportInfo, bs: BlockSize) {
        let structured = self.haggle.structured;
        // Block status needs base:allocation selected for this very export.
        let block_status = structured
            && matches!(&self.haggle.meta, Some((n, h)) if *n == info.name && *h == info.handle);
        let params = TransmissionParams {
            export_size: info.size_bytes,
            flags: info.transmission_flags(structured),
            block_size: bs,
            block_status,
        };
        self.session = Some(Session {
            params,
            export: info.handle,
            structured,
            can_cache: info.can_cache,
        });
        let n = self.cfg.max_in_flight;
        self.slots
            .init(n, self.cfg.max_buffer_bytes, bs.max as usize);
        self.ready = VecDeque::with_capacity(n as usize);
        // Each slot has at most two segments (header + data) queued, plus coalesced control.
        self.out.reserve_segments(2 * n as usize + 2);
        self.extents = Vec::with_capacity(self.cfg.max_extents);
        self.state = State::Transmission;
        self.rx = Rx::ReqHeader;
    }

    // --- Transmission: accepting requests ----------------------------------------------

    /// Tries to start the pending request. Leaves it pending when resources are short.
    fn try_start(&mut self) {
        let Rx::Pending(req) = self.rx else {
            return;
        };
        let Some(session) = self.session else {
            return self.close();
        };
        if self.output_full() {
            return;
        }
        if let Err(rej) = classify_request(&req, &session.params) {
            let len = req.payload_len();
            if rej.disconnect {
                // Too much data to skip: answer, then hang up.
                self.reply_error(req.cookie, rej.errno, rej.reason);
                self.close();
            } else if len > 0 {
                self.rx = Rx::Skip {
                    left: len,
                    cookie: req.cookie,
                    errno: rej.errno,
                    reason: rej.reason,
                };
            } else {
                self.rx = Rx::ReqHeader;
                self.reply_error(req.cookie, rej.errno, rej.reason);
            }
            return;
        }
        let kind = match req.command {
            // "There is no reply to an NBD_CMD_DISC": finish what is in flight, then close.
            Command::Disc => return self.close(),
            Command::Cache if !session.can_cache => {
                // A hint the export does not use: success, with no effect.
                self.rx = Rx::ReqHeader;
                return self.reply_ok(req.cookie);
            }
            c => match io_kind(c, req.flags) {
                Some(kind) => kind,
                None => {
                    self.rx = Rx::ReqHeader;
                    return self.reply_error(req.cookie, Errno::Einval, "unsupported command");
                }
            },
        };
        let need = match kind {
            IoKind::Read | IoKind::Write => req.length as usize,
            _ => 0,
        };
        let Some(slot) = self.slots.acquire(need) else {
            return; // stays pending until a slot or buffer memory comes back
        };
        let Some(s) = self.slots.get_mut(slot) else {
            return self.close();
        };
        s.kind = kind;
        s.fua = req.flags.contains(CmdFlags::FUA);
        s.cookie = req.cookie;
        s.offset = req.offset;
        s.length = req.length;
        if kind == IoKind::Write && req.length > 0 {
            s.state = SlotState::Receiving;
            self.rx = Rx::Payload { slot, got: 0 };
        } else {
            s.state = SlotState::Ready;
            self.ready.push_back(slot);
            self.rx = Rx::ReqHeader;
        }
    }

    /// The next request to run, in arrival order.
    pub fn next_io(&mut self) -> Option<Io> {
        let export = self.session?.export;
        while let Some(slot) = self.ready.pop_front() {
            if let Some(s) = self.slots.in_state(slot, SlotState::Ready) {
                s.state = SlotState::Running;
                return Some(Io {
                    slot,
                    kind: s.kind,
                    offset: s.offset,
                    length: s.length,
                    fua: s.fua,
                    export,
                });
            }
        }
        None
    }

    /// The data buffer of a running request: `length` bytes for `Read` (fill it) and
    /// `Write` (the data received), empty otherwise or for a slot that is not running. The
    /// buffer is reused by later requests; a read must fill all of it before completing.
    ///
    /// Guarantee (the daemon may hand the memory to asynchronous I/O): from
    /// [`next_io`](Self::next_io) until [`complete`](Self::complete) for this slot (and,
    /// for a read, until its data has been consumed from the output), the buffer is neither
    /// moved, resized, freed, nor read or written by the connection. Buffers are only
    /// replaced or released while their slot is free. The connection itself must outlive
    /// the I/O, as with any buffer.
    pub fn buffer(&mut self, slot: u32) -> &mut [u8] {
        match self.slots.in_state(slot, SlotState::Running) {
            Some(s) => s.data_mut(),
            None => &mut [],
        }
    }

    // --- Transmission: completions --------------------------------------------------------

    /// Completes a running request. A successful `Read` sends its buffer; a `BlockStatus`
    /// completed this way reports the whole range with status 0 (always correct). Replies
    /// go out in completion order. Returns `false` (and does nothing) if `slot` is not
    /// running.
    pub fn complete(&mut self, slot: u32, result: Result<(), Errno>) -> bool {
        let Some(session) = self.session else {
            return false;
        };
        let Some(s) = self.slots.in_state(slot, SlotState::Running) else {
            return false;
        };
        let (kind, cookie, offset, length) = (s.kind, s.cookie, s.offset, s.length);
        match (kind, result) {
            (IoKind::Read, Ok(())) if length > 0 => {
                s.state = SlotState::Sending;
                self.out.ctrl_with(|v| {
                    if session.structured {
                        // One chunk, marked final: DF is honoured trivially.
                        let done = ReplyFlags::DONE;
                        // Cannot fail: length is at most the 32 MiB request limit.
                        let _ = encode_offset_data_header(v, done, cookie, offset, length);
                    } else {
                        SimpleReply {
                            error: None,
                            cookie,
                        }
                        .encode(v);
                    }
                });
                self.out.data(slot, length as usize);
            }
            (IoKind::BlockStatus { .. }, Ok(())) => {
                self.block_status_reply(slot, &[]);
                self.slots.release(slot);
            }
            (_, Ok(())) => {
                self.reply_ok(cookie);
                self.slots.release(slot);
            }
            (_, Err(errno)) => {
                self.reply_error(cookie, errno, failure_message(kind));
                self.slots.release(slot);
            }
        }
        self.advance();
        true
    }

    /// Completes a running `BlockStatus` with `(length, flags)` extents from its offset
    /// (flags: [`NBD_STATE_HOLE`], [`NBD_STATE_ZERO`]). They are clipped to the request,
    /// merged where consecutive flags are equal, cut at the first boundary not aligned to
    /// the minimum block size, limited to [`ServerConfig::max_extents`] (one with
    /// `REQ_ONE`); with no usable extent, the whole range is reported with status 0. A slot
    /// running another kind of request is failed with `EIO`. Returns `false` if `slot` is
    /// not running.
    pub fn complete_block_status(&mut self, slot: u32, extents: &[(u32, u32)]) -> bool {
        let Some(s) = self.slots.in_state(slot, SlotState::Running) else {
            return false;
        };
        if !matches!(s.kind, IoKind::BlockStatus { .. }) {
            return self.complete(slot, Err(Errno::Eio));
        }
        self.block_status_reply(slot, extents);
        self.slots.release(slot);
        self.advance();
        true
    }

    fn block_status_reply(&mut self, slot: u32, given: &[(u32, u32)]) {
        let (Some(session), Some(s)) = (self.session, self.slots.get(slot)) else {
            return;
        };
        let IoKind::BlockStatus { req_one } = s.kind else {
            return;
        };
        let (cookie, total) = (s.cookie, u64::from(s.length));
        let min = u64::from(session.params.block_size.min.max(1));
        let max = if req_one { 1 } else { self.cfg.max_extents };
        let ext = &mut self.extents;
        ext.clear();
        let mut at = 0u64;
        for &(len, flags) in given {
            if at >= total {
                break;
            }
            if len == 0 {
                continue;
            }
            let flags = flags & (NBD_STATE_HOLE | NBD_STATE_ZERO);
            let mut end = (at + u64::from(len)).min(total);
            let aligned = end == total || end % min == 0;
            if !aligned {
                // Extents must be multiples of the minimum block size: stop at the last
                // aligned boundary (a shorter answer is allowed).
                end = end / min * min;
                if end <= at {
                    break;
                }
            }
            let n = (end - at) as u32; // <= total <= u32::MAX
            let merge = ext.last().is_some_and(|last| last.flags == flags);
            if merge {
                if let Some(last) = ext.last_mut() {
                    last.length += n;
                }
            } else if ext.len() == max {
                break;
            } else {
                ext.push(Extent { length: n, flags });
            }
            at = end;
            if !aligned {
                break;
            }
        }
        if ext.is_empty() {
            // "a server MAY always safely report a status of 0 for any block"
            ext.push(Extent {
                length: total as u32,
                flags: 0,
            });
        }
        let done = ReplyFlags::DONE;
        let ext = &self.extents;
        self.out.ctrl_with(|v| {
            // Cannot fail: at most max_extents descriptors.
            let _ = encode_block_status(v, done, cookie, BASE_ALLOCATION_ID, ext);
        });
    }

    fn reply_ok(&mut self, cookie: u64) {
        self.out.ctrl_with(|v| {
            SimpleReply {
                error: None,
                cookie,
            }
            .encode(v)
        });
    }

    fn reply_error(&mut self, cookie: u64, errno: Errno, message: &'static str) {
        let structured = self.session.is_some_and(|s| s.structured);
        self.out.ctrl_with(|v| {
            if structured {
                // Structured error chunks carry the reason; a READ must not get a simple
                // reply once structured replies are on.
                let chunk = ReplyChunk::error(errno, message);
                // Cannot fail: the message is short.
                let _ = chunk.encode(ReplyFlags::DONE, cookie, v);
            } else {
                SimpleReply {
                    error: Some(errno),
                    cookie,
                }
                .encode(v);
            }
        });
    }

    // --- Output ----------------------------------------------------------------------------

    /// Pending output bytes.
    pub fn output_len(&self) -> usize {
        self.out.len()
    }

    /// Fills `iov` with the pending output, in order, and returns how many slices it
    /// filled (fewer than all pending when `iov` is short). Read data is lent straight from
    /// the slot buffers: write the slices (e.g. `write_vectored`), then call
    /// [`consume_output`](Self::consume_output) with the number of bytes written.
    pub fn output_iovecs<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        self.out.pieces(|p| {
            if n == iov.len() {
                return false;
            }
            iov[n] = IoSlice::new(self.piece_bytes(p));
            n += 1;
            true
        });
        n
    }

    /// The first contiguous run of pending output (empty when there is none).
    pub fn output_front(&self) -> &[u8] {
        let mut front: &[u8] = &[];
        self.out.pieces(|p| {
            front = self.piece_bytes(p);
            false
        });
        front
    }

    fn piece_bytes<'a>(&'a self, p: Piece<'a>) -> &'a [u8] {
        match p {
            Piece::Ctrl(b) => b,
            Piece::Data { slot, pos, end } => self
                .slots
                .get(slot)
                .and_then(|s| s.data().get(pos..end))
                .unwrap_or(&[]),
        }
    }

    /// Marks the first `n` pending bytes as sent (clamped to what is pending). A read's
    /// slot is reused once its data has been consumed.
    pub fn consume_output(&mut self, n: usize) {
        let slots = &mut self.slots;
        self.out.consume(n, |slot| slots.release(slot));
        self.advance();
    }

    /// Copies all pending output to `out` and consumes it; returns the number of bytes.
    /// For callers that cannot send from borrowed slices (and for tests).
    pub fn drain_output_into(&mut self, out: &mut Vec<u8>) -> usize {
        let n = self.out.len();
        out.reserve(n);
        self.out.pieces(|p| {
            out.extend_from_slice(self.piece_bytes(p));
            true
        });
        self.consume_output(n);
        n
    }

    // --- Lifecycle ---------------------------------------------------------------------------

    /// Stops reading input. A write whose data had not fully arrived is dropped (it was
    /// never acknowledged); everything accepted before is still answered.
    fn close(&mut self) {
        if let Rx::Payload { slot, .. } = self.rx {
            self.slots.release(slot);
        }
        self.rx = Rx::Done;
        if self.state != State::Closed {
            self.state = State::Closing;
        }
        self.maybe_finish();
    }

    /// After a completion or a send: retry a pending request, notice the end.
    fn advance(&mut self) {
        if matches!(self.rx, Rx::Pending(_)) {
            self.try_start();
        }
        self.maybe_finish();
    }

    fn maybe_finish(&mut self) {
        if self.state == State::Closing && self.slots.in_use() == 0 && self.out.is_empty() {
            self.state = State::Closed;
        }
    }
}

fn io_kind(command: Command, flags: CmdFlags) -> Option<IoKind> {
    Some(match command {
        Command::Read => IoKind::Read,
        Command::Write => IoKind::Write,
        Command::Flush => IoKind::Flush,
        Command::Trim => IoKind::Trim,
        Command::Cache => IoKind::Cache,
        Command::WriteZeroes => IoKind::WriteZeroes {
            no_hole: flags.contains(CmdFlags::NO_HOLE),
            fast_zero: flags.contains(CmdFlags::FAST_ZERO),
        },
        Command::BlockStatus => IoKind::BlockStatus {
            req_one: flags.contains(CmdFlags::REQ_ONE),
        },
        Command::Disc | Command::Resize | Command::Unknown(_) => return None,
    })
}

fn failure_message(kind: IoKind) -> &'static str {
    match kind {
        IoKind::Read => "read failed",
        IoKind::Write => "write failed",
        IoKind::Flush => "flush failed",
        IoKind::Trim => "trim failed",
        IoKind::WriteZeroes { .. } => "write zeroes failed",
        IoKind::Cache => "cache failed",
        IoKind::BlockStatus { .. } => "block status failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::ExportSummary;
    use crate::{encode_export_request, encode_option};

    struct Ex;

    impl Exports for Ex {
        fn list(&self) -> Vec<ExportSummary> {
            vec![ExportSummary {
                name: "vol".into(),
                description: "x".repeat(100),
            }]
        }

        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            (name == "vol").then(|| ExportInfo::new("vol", 1 << 20, 5))
        }

        fn default_export(&self) -> Option<String> {
            None
        }
    }

    fn hello() -> Vec<u8> {
        (ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
            .to_bytes()
            .to_vec()
    }

    fn go(b: &mut Vec<u8>) {
        encode_export_request(b, Opt::Go, "vol", &[]).unwrap();
    }

    fn read(b: &mut Vec<u8>, cookie: u64, offset: u64, length: u32) {
        Request {
            flags: CmdFlags::empty(),
            command: Command::Read,
            cookie,
            offset,
            length,
        }
        .encode(b);
    }

    fn ready(cfg: ServerConfig) -> ServerConn {
        let mut c = ServerConn::new(cfg);
        c.greeting();
        let mut b = hello();
        go(&mut b);
        assert_eq!(c.input(&b, &Ex), b.len());
        c.drain_output_into(&mut Vec::new());
        assert_eq!(c.state(), State::Transmission);
        c
    }

    #[test]
    fn connections_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<ServerConn>();
        send::<Io>();
    }

    #[test]
    fn config_is_clamped() {
        let c = ServerConn::new(ServerConfig {
            max_in_flight: 0,
            max_option_len: 0,
            max_request_bytes: u32::MAX,
            max_buffer_bytes: 0,
            max_pending_output: 0,
            max_extents: 0,
        });
        let cfg = c.config();
        assert_eq!(cfg.max_in_flight, 1);
        assert_eq!(cfg.max_option_len, 1);
        assert_eq!(cfg.max_request_bytes, DOS_PAYLOAD_THRESHOLD);
        assert_eq!(cfg.max_extents, 1);
        assert_eq!(cfg.max_reply_len(), 20 + 6 + MAX_STRING_LEN);
    }

    #[test]
    fn greeting_is_queued_once() {
        let mut c = ServerConn::new(ServerConfig::default());
        assert_eq!(c.output_len(), 0);
        c.greeting();
        c.greeting();
        assert_eq!(c.output_len(), ServerGreeting::SIZE);
        assert_eq!(c.output_front(), ServerGreeting::STACKBD.to_bytes());
    }

    #[test]
    fn requests_right_after_go_in_the_same_input() {
        let mut c = ServerConn::new(ServerConfig::default());
        let mut b = hello();
        go(&mut b);
        read(&mut b, 1, 0, 512);
        read(&mut b, 2, 512, 512);
        assert_eq!(c.input(&b, &Ex), b.len());
        let ios: Vec<_> = std::iter::from_fn(|| c.next_io()).collect();
        assert_eq!(ios.len(), 2);
        assert!(ios
            .iter()
            .all(|io| io.export == 5 && io.kind == IoKind::Read));
        assert!(
            c.opt_buf.capacity() == 0,
            "option memory released in transmission"
        );
    }

    #[test]
    fn a_write_split_across_inputs_lands_intact() {
        let mut c = ready(ServerConfig::default());
        let mut b = Vec::new();
        Request {
            flags: CmdFlags::empty(),
            command: Command::Write,
            cookie: 9,
            offset: 4096,
            length: 1024,
        }
        .encode(&mut b);
        b.extend((0..1024u32).map(|i| (i % 256) as u8));
        for piece in b.chunks(100) {
            assert_eq!(c.input(piece, &Ex), piece.len());
            if c.ready.is_empty() {
                assert!(matches!(c.rx, Rx::Payload { .. } | Rx::ReqHeader));
            }
        }
        let io = c.next_io().unwrap();
        assert_eq!(io.kind, IoKind::Write);
        assert_eq!(c.buffer(io.slot), &b[Request::SIZE..]);
        assert!(matches!(c.rx, Rx::ReqHeader));
    }

    #[test]
    fn queues_keep_their_capacity_in_steady_state() {
        let mut c = ready(ServerConfig {
            max_in_flight: 8,
            ..Default::default()
        });
        let mut b = Vec::new();
        for i in 0..8 {
            read(&mut b, i, i * 4096, 4096);
        }
        let mut caps = None;
        for _ in 0..50 {
            assert_eq!(c.input(&b, &Ex), b.len());
            while let Some(io) = c.next_io() {
                c.complete(io.slot, Ok(()));
            }
            let mut iov = [IoSlice::new(&[]); 4];
            let n = c.output_iovecs(&mut iov);
            assert_eq!(n, 4, "header, data, header, data, ...");
            c.drain_output_into(&mut Vec::new());
            let now = (
                c.ready.capacity(),
                c.extents.capacity(),
                c.slots.buffer_bytes(),
                c.stash.len(),
            );
            assert_eq!(*caps.get_or_insert(now), now);
        }
        assert_eq!(c.slots.buffer_bytes(), 8 * 4096);
    }

    #[test]
    fn option_replies_wait_for_the_client_to_read_them() {
        let mut c = ServerConn::new(ServerConfig {
            max_pending_output: 1000,
            ..Default::default()
        });
        let mut b = hello();
        for _ in 0..100 {
            encode_option(&mut b, Opt::List, &[]).unwrap();
        }
        let n = c.input(&b, &Ex);
        assert!(n < b.len());
        assert!(!c.wants_input());
        // Each LIST answer is 20 + 4 + 3 + 100 + 20 bytes; at most one answer past 1000.
        assert!(c.output_len() <= 1000 + 147, "{}", c.output_len());
        assert_eq!(c.input(&b[n..], &Ex), 0);
        c.drain_output_into(&mut Vec::new());
        assert!(c.wants_input());
        let mut pos = n;
        for _ in 0..100 {
            pos += c.input(&b[pos..], &Ex);
            c.drain_output_into(&mut Vec::new());
        }
        assert_eq!(pos, b.len());
        assert_eq!(c.state(), State::Handshake);
    }

    #[test]
    fn a_waiting_request_holds_only_its_header() {
        let mut c = ready(ServerConfig {
            max_in_flight: 1,
            ..Default::default()
        });
        let mut b = Vec::new();
        read(&mut b, 1, 0, 512);
        read(&mut b, 2, 0, 512);
        read(&mut b, 3, 0, 512);
        assert_eq!(c.input(&b, &Ex), 2 * Request::SIZE);
        assert!(matches!(c.rx, Rx::Pending(Request { cookie: 2, .. })));
        let io = c.next_io().unwrap();
        c.complete(io.slot, Ok(()));
        // The read's data is still queued: its slot is not free yet.
        assert!(c.next_io().is_none());
        c.drain_output_into(&mut Vec::new());
        let io = c.next_io().unwrap();
        assert!(matches!(c.rx, Rx::ReqHeader));
        assert_eq!(c.slots.get(io.slot).unwrap().cookie, 2);
    }
}
