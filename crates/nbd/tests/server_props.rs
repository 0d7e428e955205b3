//! Property tests for `ServerConn`: arbitrary byte streams (raw, or shaped like options
//! and requests after a valid handshake) never panic, never make the output or the buffers
//! grow past their bounds, and give the same answers however the input is split.

mod common;

use common::*;
use proptest::prelude::*;
use stackbd_nbd::server::{IoKind, ServerConfig, ServerConn, State};
use stackbd_nbd::*;

/// Small limits, so the bounds are reached quickly.
fn cfg() -> ServerConfig {
    ServerConfig {
        max_in_flight: 8,
        max_option_len: 4096,
        max_request_bytes: 64 * KIB,
        max_buffer_bytes: 256 * KIB as usize,
        max_pending_output: 4096,
        max_extents: 64,
    }
}

/// Control output allowed by the documented bound: the back-pressure threshold, one
/// option's replies (small with these exports), one reply per request in flight plus the
/// one being refused.
fn ctrl_bound(c: &ServerConfig) -> usize {
    c.max_pending_output + 4096 + (c.max_in_flight as usize + 1) * c.max_reply_len()
}

/// Deterministic choices for the "daemon" (completion results, extents, how much output
/// the client reads).
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

#[derive(Clone, Debug)]
enum Part {
    Raw(Vec<u8>),
    Opt(u32, Vec<u8>),
    Req {
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    },
}

/// Parts of a client stream. `raw` weighs raw garbage (which usually ends the connection)
/// against 40 for well-framed options and requests; `DISC` is rare for the same reason.
/// Unless `may_end`, nothing can end the connection: no `DISC`, no options (garbage once
/// in transmission), no write too large to skip.
fn part(raw: u32, may_end: bool) -> impl Strategy<Value = Part> {
    let disc = u32::from(may_end);
    let command = prop_oneof![
        30 => prop::sample::select(vec![0u16, 1, 3, 4, 5, 6, 7]),
        disc => Just(2u16),
        2 => any::<u16>().prop_filter("DISC", move |&c| may_end || c != 2),
    ];
    let huge = if may_end { u32::MAX } else { 70_000 };
    let flags = prop_oneof![6 => Just(0u16), 3 => 0u16..64, 1 => any::<u16>()];
    let offset = prop_oneof![
        8 => (0u64..2100).prop_map(|s| s * 512),
        1 => any::<u64>(),
        1 => 0u64..(2 << 20),
    ];
    let length = prop_oneof![
        12 => (0u32..17).prop_map(|s| s * 512),
        2 => (0u32..160).prop_map(|s| s * 512),
        1 => 0..=huge,
        1 => 0u32..70_000,
    ];
    prop_oneof![
        raw => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Part::Raw),
        2 * disc => (0u32..13, proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(o, d)| Part::Opt(o, d)),
        38 => (command, flags, offset, length).prop_map(|(command, flags, offset, length)| {
            Part::Req {
                command,
                flags,
                offset,
                length,
            }
        }),
    ]
}

/// A client prelude: nothing, flags only, EXPORT_NAME, or GO with structured replies and
/// base:allocation (on "disk" or on the read-only export).
fn prelude(kind: u8) -> Vec<u8> {
    let mut s = Vec::new();
    if kind == 0 {
        return s;
    }
    s.extend_from_slice(&(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES).to_bytes());
    match kind {
        2 => encode_export_name(&mut s, "disk").unwrap(),
        3 | 4 => {
            let name = if kind == 3 { "disk" } else { "ro" };
            encode_option(&mut s, Opt::StructuredReply, &[]).unwrap();
            encode_meta_context_request(&mut s, Opt::SetMetaContext, name, &[BASE_ALLOCATION])
                .unwrap();
            encode_export_request(&mut s, Opt::Go, name, &[InfoType::BlockSize]).unwrap();
        }
        _ => {}
    }
    s
}

/// Longer than any write the generators make on purpose (`huge` aside).
const TRUNCATE: u32 = 128 * 1024;

fn serialize(prelude_kind: u8, parts: &[Part]) -> Vec<u8> {
    let mut s = prelude(prelude_kind);
    for (i, p) in parts.iter().enumerate() {
        match p {
            Part::Raw(b) => s.extend_from_slice(b),
            Part::Opt(o, d) => encode_option(&mut s, Opt::from_wire(*o), d).unwrap(),
            Part::Req {
                command,
                flags,
                offset,
                length,
            } => {
                Request {
                    flags: CmdFlags::from_bits(*flags),
                    command: Command::from_wire(*command),
                    cookie: i as u64,
                    offset: *offset,
                    length: *length,
                }
                .encode(&mut s);
                if *command == 1 {
                    // Write data; cut short only for the rare huge lengths (the stream then
                    // ends mid-write, or the server refuses to read that much).
                    let n = (*length).min(TRUNCATE) as usize;
                    s.extend((0..n).map(|k| (k as u8) ^ (i as u8)));
                }
            }
        }
    }
    s
}

/// Feeds `stream` in random pieces to a connection, completes every `Io` with random
/// results, and has the client read random amounts of output (or none when `read` is
/// false). Checks the bounds after every step.
fn drive(stream: &[u8], seed: u64, read: bool) {
    let c = cfg();
    let mut h = H::with(c, Disks::standard());
    let mut rng = Rng(seed);
    let mut pos = 0;
    let mut idle = 0;
    let mut running = Vec::new();
    let bound = ctrl_bound(&c) + c.max_buffer_bytes;
    while idle < 4 {
        let piece = 1 + rng.below(3000) as usize;
        let end = (pos + piece).min(stream.len());
        let n = h.input(&stream[pos..end]);
        pos += n;
        while let Some(io) = h.conn.next_io() {
            running.push(io);
        }
        // Complete some of the running I/O, in random order.
        let k = rng.below(running.len() as u64 + 1) as usize;
        for _ in 0..k {
            let i = rng.below(running.len() as u64) as usize;
            let io = running.swap_remove(i);
            match (io.kind, rng.below(8)) {
                (_, 0) => assert!(h.conn.complete(io.slot, Err(Errno::Eio))),
                (IoKind::BlockStatus { .. }, _) => {
                    let extents: Vec<(u32, u32)> = (0..rng.below(80))
                        .map(|_| {
                            let len = if rng.below(4) == 0 {
                                rng.next() as u32
                            } else {
                                512 * rng.below(9) as u32
                            };
                            (len, rng.next() as u32)
                        })
                        .collect();
                    assert!(h.conn.complete_block_status(io.slot, &extents));
                }
                _ => {
                    let r = h.exec(&io);
                    assert!(h.conn.complete(io.slot, r));
                }
            }
        }
        assert!(
            h.conn.output_len() <= bound,
            "output {} > {bound}",
            h.conn.output_len()
        );
        assert!(
            h.conn.buffer_bytes() <= c.max_buffer_bytes,
            "{}",
            h.conn.buffer_bytes()
        );
        assert!(h.conn.in_flight() <= c.max_in_flight as usize);
        if read && rng.below(3) > 0 {
            let mut iov = [std::io::IoSlice::new(&[]); 16];
            let k = h.conn.output_iovecs(&mut iov);
            let avail: usize = iov[..k].iter().map(|s| s.len()).sum();
            assert!(avail <= h.conn.output_len());
            let take = rng.below(avail as u64 + 1) as usize;
            h.conn.consume_output(take);
        }
        let progress = n > 0 || !running.is_empty();
        idle = if progress { 0 } else { idle + 1 };
        if pos == stream.len() && running.is_empty() {
            idle += 1;
        }
    }
    // Whatever happened, finishing all I/O and reading all output leaves nothing behind.
    for io in running {
        h.conn.complete(io.slot, Ok(()));
    }
    while h
        .conn
        .next_io()
        .map(|io| h.conn.complete(io.slot, Ok(())))
        .is_some()
    {}
    let mut sink = Vec::new();
    h.conn.drain_output_into(&mut sink);
    let left = h.conn.in_flight();
    assert!(
        left <= 1,
        "at most one request left: a write waiting for its data"
    );
    if h.conn.state() == State::Closing && left == 0 && h.conn.output_len() == 0 {
        panic!("closing with nothing left to do must be closed");
    }
}

proptest! {
    // Long streams that cannot end the connection: back-pressure has to hold the output.
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn output_is_bounded_when_the_client_never_reads(
        parts in proptest::collection::vec(part(0, false), 0..300),
        seed in any::<u64>(),
    ) {
        drive(&serialize(3, &parts), seed, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn raw_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), seed in any::<u64>()) {
        drive(&bytes, seed, false);
        let mut conn = ServerConn::new(cfg());
        conn.greeting();
        let n = conn.input(&bytes, &Disks::standard());
        prop_assert!(n <= bytes.len());
    }

    #[test]
    fn shaped_streams_never_panic_nor_overflow(
        kind in 0u8..5,
        parts in prop_oneof![
            proptest::collection::vec(part(1, true), 0..60),
            proptest::collection::vec(part(0, false), 0..150),
        ],
        seed in any::<u64>(),
        read in any::<bool>(),
    ) {
        drive(&serialize(kind, &parts), seed, read);
    }


    /// Requests only (unique cookies), every Io run at once and successfully: however the
    /// stream is cut, the client sees the same replies and the disk ends the same.
    #[test]
    fn splitting_the_input_changes_nothing(
        parts in proptest::collection::vec(part(0, true), 0..40),
        piece in 1usize..600,
    ) {
        let parts: Vec<Part> = parts.into_iter().filter(|p| matches!(p, Part::Req { .. })).collect();
        let stream = serialize(3, &parts);
        let reads: Vec<(u64, u32)> = parts
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match p {
                Part::Req { command: 0, length, .. } => Some((i as u64, *length)),
                _ => None,
            })
            .collect();
        let whole = run_script(&stream, stream.len(), 3, &reads, cfg());
        let cut = run_script(&stream, piece, 3, &reads, cfg());
        prop_assert_eq!(&whole, &cut);
        if stream.len() < 100_000 {
            let bytewise = run_script(&stream, 1, 3, &reads, cfg());
            prop_assert_eq!(&whole, &bytewise);
        }
    }
}
