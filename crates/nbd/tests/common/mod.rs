//! Test harness for `ServerConn`: fake exports backed by `Vec<u8>` disks, a client built
//! from the codec's client-side encoders and decoders, and a "daemon" that applies each
//! `Io` to the disks.

#![allow(dead_code)]

use std::collections::HashMap;

use stackbd_nbd::server::{
    ExportInfo, ExportSummary, Exports, Io, IoKind, ServerConfig, ServerConn, State,
};
use stackbd_nbd::*;

pub const KIB: u32 = 1024;
pub const MIB: u32 = 1 << 20;

/// A writable export with every optional command.
pub fn full_export(name: &str, size: u64, handle: u64) -> ExportInfo {
    let mut e = ExportInfo::new(name, size, handle);
    e.can_trim = true;
    e.can_write_zeroes = true;
    e.can_fast_zero = true;
    e.can_cache = true;
    e.can_multi_conn = true;
    e
}

/// Exports and their contents.
#[derive(Clone)]
pub struct Disks {
    pub exports: Vec<ExportInfo>,
    pub default: Option<String>,
    pub data: HashMap<u64, Vec<u8>>,
}

impl Disks {
    /// `disk` (1 MiB, handle 1, the default, with a description), `ro` (64 KiB,
    /// read-only, handle 2), `small` (1 MiB with a 64 KiB maximum block size, handle 3).
    pub fn standard() -> Self {
        static TEMPLATE: std::sync::OnceLock<Disks> = std::sync::OnceLock::new();
        TEMPLATE.get_or_init(Self::build_standard).clone()
    }

    fn build_standard() -> Self {
        let mut disk = full_export("disk", MIB as u64, 1);
        disk.description = "the main disk".into();
        let mut ro = full_export("ro", 64 * KIB as u64, 2);
        ro.read_only = true;
        let mut small = full_export("small", MIB as u64, 3);
        small.block_size = BlockSize::new(512, 4096, 64 * KIB);
        let mut d = Self {
            exports: vec![disk, ro, small],
            default: Some("disk".into()),
            data: HashMap::new(),
        };
        for e in &d.exports {
            let bytes = (0..e.size_bytes)
                .map(|i| (i % 251) as u8 ^ e.handle as u8)
                .collect();
            d.data.insert(e.handle, bytes);
        }
        d
    }

    pub fn disk(&self, handle: u64) -> &[u8] {
        &self.data[&handle]
    }

    pub fn disk_mut(&mut self, handle: u64) -> &mut Vec<u8> {
        self.data.get_mut(&handle).unwrap()
    }

    /// base:allocation by 512-byte sector: all-zero sectors are holes that read as zero.
    pub fn extents(&self, handle: u64, offset: u64, length: u32) -> Vec<(u32, u32)> {
        let disk = self.disk(handle);
        let mut out: Vec<(u32, u32)> = Vec::new();
        let end = (offset + u64::from(length)).min(disk.len() as u64);
        let mut at = offset;
        while at < end {
            let next = ((at / 512 + 1) * 512).min(end);
            let zero = disk[at as usize..next as usize].iter().all(|&b| b == 0);
            let flags = if zero {
                NBD_STATE_HOLE | NBD_STATE_ZERO
            } else {
                0
            };
            let n = (next - at) as u32;
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => out.push((n, flags)),
            }
            at = next;
        }
        out
    }
}

impl Exports for Disks {
    fn list(&self) -> Vec<ExportSummary> {
        self.exports
            .iter()
            .map(|e| ExportSummary {
                name: e.name.clone(),
                description: e.description.clone(),
            })
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.exports.iter().find(|e| e.name == name).cloned()
    }

    fn default_export(&self) -> Option<String> {
        self.default.clone()
    }
}

/// A parsed transmission reply (one simple reply or one structured chunk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rep {
    Simple {
        cookie: u64,
        error: Option<Errno>,
        data: Vec<u8>,
    },
    Chunk {
        cookie: u64,
        done: bool,
        body: Body,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Data { offset: u64, data: Vec<u8> },
    Status { context: u32, extents: Vec<Extent> },
    Error { error: Errno, message: String },
    Other(String),
}

impl Rep {
    pub fn cookie(&self) -> u64 {
        match self {
            Rep::Simple { cookie, .. } | Rep::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The error of the reply, if it is one.
    pub fn error(&self) -> Option<Errno> {
        match self {
            Rep::Simple { error, .. } => *error,
            Rep::Chunk {
                body: Body::Error { error, .. },
                ..
            } => Some(*error),
            _ => None,
        }
    }

    /// Read data carried by the reply.
    pub fn data(&self) -> Option<&[u8]> {
        match self {
            Rep::Simple {
                data, error: None, ..
            } => Some(data),
            Rep::Chunk {
                body: Body::Data { data, .. },
                ..
            } => Some(data),
            _ => None,
        }
    }

    pub fn extents(&self) -> Option<&[Extent]> {
        match self {
            Rep::Chunk {
                body: Body::Status { extents, .. },
                ..
            } => Some(extents),
            _ => None,
        }
    }
}

/// A connection, its exports, and the client side of the wire.
pub struct H {
    pub conn: ServerConn,
    pub disks: Disks,
    /// Server output not yet parsed by the client.
    pub rx: Vec<u8>,
    /// Read requests sent and not yet answered: cookie -> length (needed to parse simple
    /// replies, which do not say whether data follows).
    pub reads: HashMap<u64, u32>,
}

impl H {
    pub fn new() -> Self {
        Self::with(ServerConfig::default(), Disks::standard())
    }

    pub fn with(cfg: ServerConfig, disks: Disks) -> Self {
        let mut conn = ServerConn::new(cfg);
        conn.greeting();
        Self {
            conn,
            disks,
            rx: Vec::new(),
            reads: HashMap::new(),
        }
    }

    /// Offers bytes; returns how many were consumed.
    pub fn input(&mut self, b: &[u8]) -> usize {
        self.conn.input(b, &self.disks)
    }

    /// Offers bytes that must all be consumed.
    pub fn send(&mut self, b: &[u8]) {
        let n = self.input(b);
        assert_eq!(n, b.len(), "input not fully consumed");
    }

    /// Moves all pending server output to the client.
    pub fn pump(&mut self) {
        self.conn.drain_output_into(&mut self.rx);
    }

    pub fn take(&mut self, n: usize) -> Vec<u8> {
        assert!(self.rx.len() >= n, "want {n} bytes, have {}", self.rx.len());
        self.rx.drain(..n).collect()
    }

    // --- Handshake ---------------------------------------------------------------------

    /// Reads the greeting and sends client flags.
    pub fn start(&mut self, flags: ClientFlags) {
        self.pump();
        let (g, n) = ServerGreeting::decode(&self.rx).unwrap().unwrap();
        assert_eq!(g, ServerGreeting::STACKBD);
        self.take(n);
        self.send(&flags.to_bytes());
    }

    /// One option reply, if complete.
    pub fn try_opt_reply(&mut self) -> Option<(OptionReplyHeader, Vec<u8>)> {
        self.pump();
        let (h, n) = OptionReplyHeader::decode(&self.rx, u32::MAX).unwrap()?;
        if self.rx.len() < n + h.length as usize {
            return None;
        }
        self.take(n);
        let data = self.take(h.length as usize);
        // Every reply must parse on the client side.
        OptionReply::parse(&h, &data).expect("well-formed option reply");
        Some((h, data))
    }

    /// Option replies up to and including the final one (ACK or error).
    pub fn opt_replies(&mut self) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let (h, d) = self.try_opt_reply().expect("a final option reply");
            let last = matches!(h.reply, ReplyType::Ack | ReplyType::Error(_));
            v.push((h, d));
            if last {
                return v;
            }
        }
    }

    /// Sends an option (raw data) and returns its replies.
    pub fn option(&mut self, opt: Opt, data: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut b = Vec::new();
        encode_option(&mut b, opt, data).unwrap();
        self.send(&b);
        self.opt_replies()
    }

    /// Sends INFO or GO and returns the replies.
    pub fn info(
        &mut self,
        opt: Opt,
        name: &str,
        infos: &[InfoType],
    ) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut b = Vec::new();
        encode_export_request(&mut b, opt, name, infos).unwrap();
        self.send(&b);
        self.opt_replies()
    }

    pub fn meta(
        &mut self,
        opt: Opt,
        export: &str,
        queries: &[&str],
    ) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut b = Vec::new();
        encode_meta_context_request(&mut b, opt, export, queries).unwrap();
        self.send(&b);
        self.opt_replies()
    }

    /// A connection in transmission on `export` via GO, with structured replies and
    /// base:allocation if asked.
    pub fn ready(export: &str, structured: bool, meta: bool) -> Self {
        Self::ready_with(
            ServerConfig::default(),
            Disks::standard(),
            export,
            structured,
            meta,
        )
    }

    pub fn ready_with(
        cfg: ServerConfig,
        disks: Disks,
        export: &str,
        structured: bool,
        meta: bool,
    ) -> Self {
        let mut h = Self::with(cfg, disks);
        h.start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES);
        if structured {
            let r = h.option(Opt::StructuredReply, &[]);
            assert_eq!(r[0].0.reply, ReplyType::Ack);
        }
        if meta {
            let r = h.meta(Opt::SetMetaContext, export, &[BASE_ALLOCATION]);
            assert_eq!(r.len(), 2, "{r:?}");
        }
        let r = h.info(Opt::Go, export, &[InfoType::BlockSize]);
        assert_eq!(r.last().unwrap().0.reply, ReplyType::Ack, "{r:?}");
        assert_eq!(h.conn.state(), server::State::Transmission);
        h
    }

    // --- Transmission ------------------------------------------------------------------

    /// Encodes a request (with `payload` for writes) and remembers reads.
    pub fn encode_req(
        &mut self,
        command: Command,
        flags: CmdFlags,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut b = Vec::new();
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(&mut b);
        b.extend_from_slice(payload);
        if command == Command::Read {
            self.reads.insert(cookie, length);
        }
        b
    }

    /// Sends a request; all of it must be consumed.
    pub fn req(
        &mut self,
        command: Command,
        flags: CmdFlags,
        cookie: u64,
        offset: u64,
        length: u32,
    ) {
        let b = self.encode_req(command, flags, cookie, offset, length, &[]);
        self.send(&b);
    }

    pub fn write(&mut self, flags: CmdFlags, cookie: u64, offset: u64, data: &[u8]) {
        let b = self.encode_req(
            Command::Write,
            flags,
            cookie,
            offset,
            data.len() as u32,
            data,
        );
        self.send(&b);
    }

    pub fn ios(&mut self) -> Vec<Io> {
        std::iter::from_fn(|| self.conn.next_io()).collect()
    }

    /// Runs an `Io` against the disks, like the daemon would.
    pub fn exec(&mut self, io: &Io) -> Result<(), Errno> {
        let (off, len) = (io.offset as usize, io.length as usize);
        match io.kind {
            IoKind::Read => {
                let src = self.disks.disk(io.export)[off..off + len].to_vec();
                let buf = self.conn.buffer(io.slot);
                assert_eq!(buf.len(), len);
                buf.copy_from_slice(&src);
            }
            IoKind::Write => {
                let data = self.conn.buffer(io.slot).to_vec();
                assert_eq!(data.len(), len);
                self.disks.disk_mut(io.export)[off..off + len].copy_from_slice(&data);
            }
            IoKind::Trim | IoKind::WriteZeroes { .. } => {
                self.disks.disk_mut(io.export)[off..off + len].fill(0);
            }
            IoKind::Flush | IoKind::Cache | IoKind::BlockStatus { .. } => {}
        }
        Ok(())
    }

    /// Runs and completes one `Io`.
    pub fn finish(&mut self, io: Io) {
        if let IoKind::BlockStatus { .. } = io.kind {
            let e = self.disks.extents(io.export, io.offset, io.length);
            assert!(self.conn.complete_block_status(io.slot, &e));
        } else {
            let r = self.exec(&io);
            assert!(self.conn.complete(io.slot, r));
        }
    }

    /// Runs every queued `Io` in order; returns how many.
    pub fn run_all(&mut self) -> usize {
        let ios = self.ios();
        let n = ios.len();
        for io in ios {
            self.finish(io);
        }
        n
    }

    /// One transmission reply, if complete.
    pub fn try_reply(&mut self) -> Option<Rep> {
        self.pump();
        let (h, n) = ReplyHeader::decode(&self.rx).unwrap()?;
        match h {
            ReplyHeader::Simple(s) => {
                let data_len = match (s.error, self.reads.get(&s.cookie)) {
                    (None, Some(&len)) => len as usize,
                    _ => 0,
                };
                if self.rx.len() < n + data_len {
                    return None;
                }
                self.take(n);
                let data = self.take(data_len);
                self.reads.remove(&s.cookie);
                Some(Rep::Simple {
                    cookie: s.cookie,
                    error: s.error,
                    data,
                })
            }
            ReplyHeader::Structured(sh) => {
                if self.rx.len() < n + sh.length as usize {
                    return None;
                }
                self.take(n);
                let payload = self.take(sh.length as usize);
                let chunk = ReplyChunk::parse(&sh, &payload).expect("well-formed chunk");
                let body = match chunk {
                    ReplyChunk::OffsetData { offset, data } => Body::Data {
                        offset,
                        data: data.to_vec(),
                    },
                    ReplyChunk::BlockStatus {
                        context_id,
                        extents,
                    } => Body::Status {
                        context: context_id,
                        extents: extents.iter().collect(),
                    },
                    ReplyChunk::Error { error, message } => Body::Error {
                        error,
                        message: String::from_utf8(message.to_vec()).unwrap(),
                    },
                    other => Body::Other(format!("{other:?}")),
                };
                if sh.is_done() {
                    self.reads.remove(&sh.cookie);
                }
                Some(Rep::Chunk {
                    cookie: sh.cookie,
                    done: sh.is_done(),
                    body,
                })
            }
        }
    }

    pub fn reply(&mut self) -> Rep {
        self.try_reply().expect("a complete reply")
    }

    /// Every complete reply available now.
    pub fn replies(&mut self) -> Vec<Rep> {
        std::iter::from_fn(|| self.try_reply()).collect()
    }
}

impl Default for H {
    fn default() -> Self {
        Self::new()
    }
}

/// What a client saw from a scripted session.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    /// Option replies, in order.
    pub options: Vec<(OptionReplyHeader, Vec<u8>)>,
    /// Transmission replies, sorted by cookie (their order depends on timing).
    pub replies: Vec<Rep>,
    pub disk: Vec<u8>,
    pub state: State,
}

/// Runs a client script: feeds `stream` in pieces of `piece` bytes, running every `Io` as
/// soon as it appears, then parses what the server sent (`options` option exchanges, then
/// transmission replies). `reads` lists the read requests (cookie, length) in the stream.
pub fn run_script(
    stream: &[u8],
    piece: usize,
    options: usize,
    reads: &[(u64, u32)],
    cfg: ServerConfig,
) -> Seen {
    let mut h = H::with(cfg, Disks::standard());
    h.reads.extend(reads.iter().copied());
    let mut pos = 0;
    let mut stalls = 0;
    while pos < stream.len() && stalls < 3 {
        let end = (pos + piece.max(1)).min(stream.len());
        let n = h.input(&stream[pos..end]);
        pos += n;
        stalls = if n == 0 { stalls + 1 } else { 0 };
        h.run_all();
        h.conn.drain_output_into(&mut h.rx);
    }
    h.run_all();
    let (_, n) = ServerGreeting::decode(&h.rx).unwrap().unwrap();
    h.take(n);
    let options = (0..options).flat_map(|_| h.opt_replies()).collect();
    let mut replies = h.replies();
    assert!(h.rx.is_empty(), "unparsed output");
    replies.sort_by_key(|r| r.cookie());
    Seen {
        options,
        replies,
        disk: h.disks.disk(1).to_vec(),
        state: h.conn.state(),
    }
}
