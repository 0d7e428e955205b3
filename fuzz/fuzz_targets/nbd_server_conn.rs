//! Feeds arbitrary bytes to a `ServerConn` with fake exports, as a daemon would: in pieces
//! of varying size, running every `Io` against `Vec<u8>` disks and completing it (in
//! varying order, sometimes with errors), and sending the output in varying amounts (or not
//! at all).
//!
//! Checks, besides "no panic": the output and buffer bounds hold; every `Io` lies inside
//! its export and has a buffer of exactly its length; read-only exports never see writes;
//! a connection with nothing left to do is closed; and when the session negotiated
//! structured replies, everything the server sent parses with the codec's client side.
//!
//! The first input byte picks a client prelude and the daemon's habits; the rest is the
//! client's stream after the prelude.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stackbd_nbd::server::{
    ExportInfo, ExportSummary, Exports, Io, IoKind, ServerConfig, ServerConn, State,
};
use stackbd_nbd::*;

const SIZES: [u64; 3] = [256 << 10, 64 << 10, 1000];

struct Ex;

impl Exports for Ex {
    fn list(&self) -> Vec<ExportSummary> {
        ["disk", "ro", "tiny"]
            .iter()
            .map(|n| ExportSummary {
                name: n.to_string(),
                description: String::new(),
            })
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let (i, ro) = match name {
            "disk" => (0, false),
            "ro" => (1, true),
            "tiny" => (2, false),
            _ => return None,
        };
        let mut e = ExportInfo::new(name, SIZES[i], i as u64 + 1);
        e.read_only = ro;
        e.can_trim = true;
        e.can_write_zeroes = true;
        e.can_fast_zero = true;
        e.can_cache = i == 0;
        Some(e)
    }

    fn default_export(&self) -> Option<String> {
        Some("disk".into())
    }
}

fn cfg() -> ServerConfig {
    ServerConfig {
        max_in_flight: 8,
        max_option_len: 2048,
        max_request_bytes: 64 << 10,
        max_buffer_bytes: 256 << 10,
        max_pending_output: 4096,
        max_extents: 16,
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Client preludes: nothing, flags only, EXPORT_NAME, GO with structured replies and
/// base:allocation (on "disk" or "ro").
fn prelude(kind: u8) -> Vec<u8> {
    let mut s = Vec::new();
    if kind == 0 {
        return s;
    }
    s.extend_from_slice(&(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES).to_bytes());
    let name = if kind == 4 { "ro" } else { "disk" };
    match kind {
        2 => encode_export_name(&mut s, name).unwrap(),
        3 | 4 => {
            encode_option(&mut s, Opt::StructuredReply, &[]).unwrap();
            encode_meta_context_request(&mut s, Opt::SetMetaContext, name, &[BASE_ALLOCATION])
                .unwrap();
            encode_export_request(&mut s, Opt::Go, name, &[InfoType::BlockSize]).unwrap();
        }
        _ => {}
    }
    s
}

fn run(io: &Io, conn: &mut ServerConn, disks: &mut [Vec<u8>; 3]) {
    assert!((1..=3).contains(&io.export), "{io:?}");
    let disk = &mut disks[io.export as usize - 1];
    let end = io.offset + u64::from(io.length);
    assert!(end <= disk.len() as u64, "Io outside its export: {io:?}");
    let (off, len) = (io.offset as usize, io.length as usize);
    let writes = matches!(
        io.kind,
        IoKind::Write | IoKind::Trim | IoKind::WriteZeroes { .. }
    );
    assert!(
        !(writes && io.export == 2),
        "write on a read-only export: {io:?}"
    );
    match io.kind {
        IoKind::Read => {
            let buf = conn.buffer(io.slot);
            assert_eq!(buf.len(), len);
            buf.copy_from_slice(&disk[off..off + len]);
        }
        IoKind::Write => {
            let buf = conn.buffer(io.slot);
            assert_eq!(buf.len(), len);
            disk[off..off + len].copy_from_slice(buf);
        }
        IoKind::Trim | IoKind::WriteZeroes { .. } => disk[off..off + len].fill(0),
        IoKind::Flush => assert_eq!((io.offset, io.length), (0, 0)),
        IoKind::Cache | IoKind::BlockStatus { .. } => {
            assert!(conn.buffer(io.slot).is_empty())
        }
    }
}

/// Parses everything a structured session sent: greeting, the three option exchanges of
/// prelude 3/4, then only well-formed transmission replies.
fn check_structured_stream(out: &[u8]) {
    let (_, mut at) = ServerGreeting::decode(out).unwrap().unwrap();
    let mut finals = 0;
    while finals < 3 {
        let (h, n) = OptionReplyHeader::decode(&out[at..], u32::MAX)
            .unwrap()
            .unwrap();
        let data = &out[at + n..at + n + h.length as usize];
        let r = OptionReply::parse(&h, data).unwrap();
        assert!(
            !matches!(r, OptionReply::Error { .. }),
            "prelude refused: {r:?}"
        );
        finals += usize::from(r.is_final());
        at += n + h.length as usize;
    }
    while at < out.len() {
        let (h, n) = ReplyHeader::decode(&out[at..])
            .unwrap()
            .expect("whole header");
        at += n;
        if let ReplyHeader::Structured(sh) = h {
            let end = at + sh.length as usize;
            let chunk = ReplyChunk::parse(&sh, &out[at..end]).unwrap();
            assert!(sh.is_done(), "one chunk per reply");
            if let ReplyChunk::BlockStatus {
                context_id,
                extents,
            } = chunk
            {
                assert_eq!(context_id, server::BASE_ALLOCATION_ID);
                assert!(extents.len() <= cfg().max_extents);
            }
            at = end;
        }
    }
    assert_eq!(at, out.len());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let kind = mode % 5;
    let read_output = (mode >> 3) % 4; // 0: never; else every 1-in-n steps, partially
    let mut rng = Rng(u64::from(mode) << 32 | data.len() as u64);
    let mut input = prelude(kind);
    input.extend_from_slice(stream);

    let c = cfg();
    let ctrl_bound =
        c.max_pending_output + 4096 + (c.max_in_flight as usize + 1) * c.max_reply_len();
    let bound = ctrl_bound + c.max_buffer_bytes;
    let mut conn = ServerConn::new(c);
    conn.greeting();
    let mut disks = SIZES.map(|n| vec![0x5a; n as usize]);
    let mut running: Vec<Io> = Vec::new();
    let mut sent = Vec::new();
    let mut pos = 0;
    let mut idle = 0;
    while idle < 3 {
        let most = if rng.below(4) == 0 { 8 } else { 4096 };
        let piece = 1 + rng.below(most) as usize;
        let end = (pos + piece).min(input.len());
        let n = conn.input(&input[pos..end], &Ex);
        assert!(n <= end - pos);
        pos += n;
        while let Some(io) = conn.next_io() {
            run(&io, &mut conn, &mut disks);
            running.push(io);
        }
        let k = rng.below(running.len() as u64 + 1);
        for _ in 0..k {
            let io = running.swap_remove(rng.below(running.len() as u64) as usize);
            let ok = match (io.kind, rng.below(10)) {
                (_, 0) => conn.complete(io.slot, Err(Errno::Eio)),
                (IoKind::BlockStatus { .. }, _) => {
                    let ext: Vec<(u32, u32)> = (0..rng.below(24))
                        .map(|_| {
                            (
                                512 * rng.below(20) as u32 + rng.below(3) as u32,
                                rng.next() as u32,
                            )
                        })
                        .collect();
                    conn.complete_block_status(io.slot, &ext)
                }
                _ => conn.complete(io.slot, Ok(())),
            };
            assert!(ok);
        }
        assert!(
            conn.output_len() <= bound,
            "output {} > {bound}",
            conn.output_len()
        );
        assert!(conn.buffer_bytes() <= c.max_buffer_bytes);
        assert!(conn.in_flight() <= c.max_in_flight as usize);
        if read_output > 0 && rng.below(u64::from(read_output)) == 0 {
            let mut iov = [std::io::IoSlice::new(&[]); 64];
            let k = conn.output_iovecs(&mut iov);
            let avail: usize = iov[..k].iter().map(|s| s.len()).sum();
            assert_eq!(avail, conn.output_len(), "64 slices cover all the output");
            let take = if rng.below(2) == 0 {
                avail
            } else {
                rng.below(avail as u64 + 1) as usize
            };
            let mut left = take;
            for s in &iov[..k] {
                let t = left.min(s.len());
                sent.extend_from_slice(&s[..t]);
                left -= t;
            }
            conn.consume_output(take);
        }
        let progress = n > 0 || !running.is_empty();
        idle = if progress { 0 } else { idle + 1 };
    }
    // The daemon finishes everything and sends everything.
    for io in running.drain(..) {
        conn.complete(io.slot, Ok(()));
    }
    while let Some(io) = conn.next_io() {
        run(&io, &mut conn, &mut disks);
        conn.complete(io.slot, Ok(()));
    }
    conn.drain_output_into(&mut sent);
    assert!(
        conn.in_flight() <= 1,
        "only a write waiting for its data may remain"
    );
    if conn.state() == State::Closing && conn.in_flight() == 0 {
        assert!(conn.output_len() > 0, "nothing left to do: must be closed");
    }
    if kind >= 3 && conn.transmission().is_some() {
        check_structured_stream(&sent);
    }
});
