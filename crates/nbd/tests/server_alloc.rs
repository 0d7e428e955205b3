//! Allocation gate: once warmed up, a connection serves requests (reads, writes, flushes,
//! trims, write-zeroes, cache, block status, rejected requests with skipped data), completed
//! out of order, with replies sent from `output_iovecs`, without a single heap allocation.
//!
//! The counter is per thread: the test harness's own threads (which may block on a channel, and
//! allocate for it, at any moment) are not counted.

use std::io::IoSlice;

use stackbd_core::alloc_count::{thread_allocs, CountingAlloc};
use stackbd_nbd::server::{
    ExportInfo, ExportSummary, Exports, Io, IoKind, ServerConfig, ServerConn,
};
use stackbd_nbd::*;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

struct One;

impl Exports for One {
    fn list(&self) -> Vec<ExportSummary> {
        Vec::new()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let mut e = ExportInfo::new(name, 64 << 20, 1);
        e.can_trim = true;
        e.can_write_zeroes = true;
        e.can_fast_zero = true;
        e.can_cache = true;
        Some(e)
    }

    fn default_export(&self) -> Option<String> {
        Some("vol".into())
    }
}

fn handshake(structured: bool) -> ServerConn {
    let mut conn = ServerConn::new(ServerConfig {
        max_in_flight: 16,
        ..Default::default()
    });
    conn.greeting();
    let mut b = Vec::new();
    (ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES).encode(&mut b);
    if structured {
        encode_option(&mut b, Opt::StructuredReply, &[]).unwrap();
        encode_meta_context_request(&mut b, Opt::SetMetaContext, "vol", &[BASE_ALLOCATION])
            .unwrap();
    }
    encode_export_request(&mut b, Opt::Go, "vol", &[InfoType::BlockSize]).unwrap();
    assert_eq!(conn.input(&b, &One), b.len());
    let mut sink = Vec::new();
    conn.drain_output_into(&mut sink);
    assert_eq!(conn.state(), server::State::Transmission);
    conn
}

/// One batch of requests, as the client would send them.
fn batch(structured: bool) -> Vec<u8> {
    let mut b = Vec::new();
    let mut cookie = 0;
    let mut req = |b: &mut Vec<u8>, command, flags, offset, length: u32| {
        cookie += 1;
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(b);
        if command == Command::Write {
            b.extend((0..length).map(|i| i as u8));
        }
    };
    let none = CmdFlags::empty();
    for round in 0..4u64 {
        let base = round << 20;
        req(&mut b, Command::Write, CmdFlags::FUA, base, 4096);
        req(&mut b, Command::Read, none, base, 4096);
        req(&mut b, Command::Read, none, base + 65536, 65536);
        req(&mut b, Command::Write, none, base + 8192, 16384);
        req(&mut b, Command::Trim, none, base + 4096, 4096);
        req(&mut b, Command::WriteZeroes, CmdFlags::NO_HOLE, base, 512);
        req(&mut b, Command::Cache, none, base, 1 << 20);
        req(&mut b, Command::Flush, none, 0, 0);
        // Rejected: misaligned read, misaligned write (its data is skipped), past the end.
        req(&mut b, Command::Read, none, base + 1, 512);
        req(&mut b, Command::Write, none, base + 3, 1024);
        req(&mut b, Command::Read, none, 64 << 20, 512);
        if structured {
            req(&mut b, Command::BlockStatus, none, base, 1 << 20);
            req(&mut b, Command::BlockStatus, CmdFlags::REQ_ONE, base, 4096);
        }
    }
    b
}

const EXTENTS: [(u32, u32); 5] = [
    (4096, 0),
    (8192, NBD_STATE_HOLE | NBD_STATE_ZERO),
    (4096, 0),
    (1000, NBD_STATE_HOLE),
    (1 << 20, 0),
];

/// Feeds the batch in pieces, runs the I/O (completing in reverse order of arrival,
/// a few at a time), and sends all output through `output_iovecs`. No allocation here.
fn serve(conn: &mut ServerConn, wire: &[u8], piece: usize, sent: &mut u64) {
    let mut pending: [Option<Io>; 16] = [None; 16];
    let mut pos = 0;
    let mut idle = 0;
    while idle < 2 {
        let end = (pos + piece).min(wire.len());
        let n = conn.input(&wire[pos..end], &One);
        pos += n;
        let mut progress = n > 0;
        while let Some(io) = conn.next_io() {
            let free = pending.iter_mut().find(|p| p.is_none()).expect("16 slots");
            *free = Some(io);
            progress = true;
        }
        // Complete the most recent ones first (out of order).
        for p in pending.iter_mut().rev() {
            let Some(io) = p.take() else { continue };
            match io.kind {
                IoKind::Read => conn.buffer(io.slot).fill(0xab),
                IoKind::Write => {
                    let sum: u64 = conn.buffer(io.slot).iter().map(|&x| u64::from(x)).sum();
                    *sent = sent.wrapping_add(sum);
                }
                _ => {}
            }
            let ok = match io.kind {
                IoKind::BlockStatus { .. } => conn.complete_block_status(io.slot, &EXTENTS),
                _ => conn.complete(io.slot, Ok(())),
            };
            assert!(ok);
        }
        loop {
            let mut iov = [IoSlice::new(&[]); 32];
            let k = conn.output_iovecs(&mut iov);
            let len: usize = iov[..k].iter().map(|s| s.len()).sum();
            if len == 0 {
                break;
            }
            *sent += len as u64;
            conn.consume_output(len);
            progress = true;
        }
        idle = if progress || pos < wire.len() {
            0
        } else {
            idle + 1
        };
    }
    assert_eq!(pos, wire.len());
    assert_eq!(conn.in_flight(), 0);
}

#[test]
fn steady_state_requests_do_not_allocate() {
    for structured in [true, false] {
        let mut conn = handshake(structured);
        let wire = batch(structured);
        let mut sent = 0u64;
        // Warm up: buffers reach their sizes, queues their capacities.
        for i in 0..20 {
            serve(&mut conn, &wire, 1000 + 97 * i, &mut sent);
        }
        let before = thread_allocs();
        for i in 0..200 {
            serve(&mut conn, &wire, 1000 + 97 * (i % 20), &mut sent);
        }
        let allocs = thread_allocs() - before;
        assert_eq!(
            allocs, 0,
            "heap allocations (and reallocations) over 200 batches (structured={structured})"
        );
        assert!(sent > 0);
    }
}
