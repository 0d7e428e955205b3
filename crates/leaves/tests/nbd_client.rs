//! The `nbd` leaf against real NBD servers: nbdkit (memory, error and delay filters) and
//! qemu-nbd. The tools are required (scripts/test.sh installs them): a missing tool fails.

use stackbd_core::alloc_count::{thread_allocs, CountingAlloc};
use stackbd_core::{DataBuf, DevId, Engine, Leaf, Op, Request, Status};
use stackbd_leaves::nbd_client::{NbdLeaf, NbdOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::Server;

#[global_allocator]
static A: CountingAlloc = CountingAlloc;

const MIB: u64 = 1 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn engine() -> Engine {
    Engine::new(stackbd_targets::registry(), Default::default())
}

fn opts(connections: u32, queue_depth: u32) -> NbdOptions {
    NbdOptions {
        connections,
        queue_depth,
        timeout: Duration::from_secs(5),
    }
}

/// Random writes, reads, discards, write-zeroes and flushes on `v`, checked against `model`.
fn exercise(e: &mut Engine, v: DevId, model: &mut [u8], seed: u64, rounds: usize) {
    let mut rng = Rng(seed);
    let sectors = model.len() as u64 / 512;
    let mut buf = vec![0u8; 1 << 20];
    for round in 0..rounds {
        // Aligned to 4 KiB for discards (nbdkit memory trims whole pages to zero).
        let len = 8 * (1 + rng.below(64));
        let sector = rng.below((sectors - len) / 8) * 8;
        let (off, n) = (sector as usize * 512, len as usize * 512);
        match rng.below(10) {
            0..=3 => {
                for (k, b) in buf[..n].iter_mut().enumerate() {
                    *b = (round as u64 * 31 + k as u64 * 7 + seed) as u8 | 1;
                }
                assert_eq!(e.write_at(v, sector, &buf[..n]), Status::Ok);
                model[off..off + n].copy_from_slice(&buf[..n]);
            }
            4..=6 => {
                assert_eq!(e.read_at(v, sector, &mut buf[..n]), Status::Ok);
                assert!(
                    buf[..n] == model[off..off + n],
                    "round {round}: read mismatch at sector {sector} len {len}"
                );
            }
            7 => {
                assert_eq!(e.discard(v, sector, len as u32), Status::Ok);
                model[off..off + n].fill(0);
            }
            8 => {
                assert_eq!(e.write_zeroes(v, sector, len as u32), Status::Ok);
                model[off..off + n].fill(0);
            }
            _ => assert_eq!(e.flush(v), Status::Ok),
        }
    }
    // Full compare at the end.
    let mut s = 0;
    while s < sectors {
        let n = (sectors - s).min(2048);
        let b = &mut buf[..n as usize * 512];
        assert_eq!(e.read_at(v, s, b), Status::Ok);
        assert!(
            b[..] == model[s as usize * 512..(s + n) as usize * 512],
            "final compare at sector {s}"
        );
        s += n;
    }
}

/// Submits `n` requests of `len` sectors at once and returns their statuses.
fn batch(
    e: &mut Engine,
    v: DevId,
    op: Op,
    first: u64,
    n: usize,
    len: u32,
    buf: &mut [u8],
) -> Vec<Status> {
    let bytes = len as usize * 512;
    let mut reqs = Vec::new();
    for k in 0..n {
        let data = if op == Op::Read || op == Op::Write {
            let piece = &mut buf[k * bytes..(k + 1) * bytes];
            // SAFETY: `buf` outlives the batch, which is polled to completion below.
            unsafe { DataBuf::from_slice(piece) }
        } else {
            DataBuf::EMPTY
        };
        reqs.push(Request::new(
            op,
            v,
            first + k as u64 * len as u64,
            len,
            data,
            k as u64,
        ));
    }
    for r in &reqs {
        e.submit(r).unwrap();
    }
    let mut out = vec![None; n];
    let mut left = n;
    let deadline = Instant::now() + Duration::from_secs(30);
    while left > 0 {
        e.poll();
        while let Some(c) = e.reap() {
            out[c.user_data as usize] = Some(c.status);
            left -= 1;
        }
        assert!(Instant::now() < deadline, "batch never completed");
    }
    out.into_iter().map(Option::unwrap).collect()
}

#[test]
fn linear_and_striped_over_nbdkit_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s0 = Server::nbdkit(&dir.path().join("s0"), &["memory", "64M"]);
    let s1 = Server::nbdkit(&dir.path().join("s1"), &["memory", "64M"]);
    let l0 = NbdLeaf::connect(&s0.uri(""), opts(2, 8)).unwrap();
    let l1 = NbdLeaf::connect(&s1.uri(""), opts(1, 4)).unwrap();
    assert_eq!(l0.size(), 64 * MIB / 512);
    assert_eq!(l0.kind(), "nbd");
    assert_eq!(l0.connections(), 2, "nbdkit memory allows multi-conn");
    let lim = l0.limits();
    assert!(!lim.poll && lim.nowait && !lim.copy_native);
    assert!(lim.logical_block_bytes >= 512);
    let mut e = engine();
    e.add_leaf("n0", Arc::new(l0)).unwrap();
    e.add_leaf("n1", Arc::new(l1)).unwrap();
    let half = 64 * MIB / 512 / 2;
    let lin = e
        .create("lin", Some(&format!("0 {half} linear n0 0")))
        .unwrap();
    let st = e
        .create(
            "st",
            Some(&format!("0 {} striped 2 64 n0 {half} n1 0", 2 * half)),
        )
        .unwrap();
    let mut m_lin = vec![0u8; (half * 512) as usize];
    let mut m_st = vec![0u8; (2 * half * 512) as usize];
    exercise(&mut e, lin, &mut m_lin, 0x1234_5678, 400);
    exercise(&mut e, st, &mut m_st, 0x9abc_def1, 400);

    // Deep batches: more than the per-connection depth, so the backlog is used.
    let mut buf = vec![0u8; 64 * 16 * 512];
    for (k, b) in buf.iter_mut().enumerate() {
        *b = (k / 512) as u8 ^ 0x5a;
    }
    let w = batch(&mut e, st, Op::Write, 1000, 64, 16, &mut buf);
    assert!(w.iter().all(|s| *s == Status::Ok), "{w:?}");
    let mut rbuf = vec![0u8; buf.len()];
    let r = batch(&mut e, st, Op::Read, 1000, 64, 16, &mut rbuf);
    assert!(r.iter().all(|s| *s == Status::Ok), "{r:?}");
    assert!(rbuf == buf);
    // Copy is not offloaded; the engine emulates it through reads and writes.
    assert_eq!(e.flush(st), Status::Ok);
}

#[test]
fn writes_reach_a_qemu_nbd_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let sock = dir.path().join("q.sock");
    let _q = Server::spawn(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-x",
            "exp",
            "-t",
            "--shared=8",
            "--cache=none",
            "--discard=unmap",
            "-k",
            sock.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
        &sock,
    );
    let uri = format!("nbd+unix:///exp?socket={}", sock.display());
    let leaf = NbdLeaf::connect(&uri, opts(2, 16)).unwrap();
    assert_eq!(leaf.size(), 16 * MIB / 512);
    let mut e = engine();
    e.add_leaf("q", Arc::new(leaf)).unwrap();
    let v = e.create("v", Some("0 32768 linear q 0")).unwrap();
    let mut model = vec![0u8; 16 * MIB as usize];
    exercise(&mut e, v, &mut model, 42, 300);
    assert_eq!(e.flush(v), Status::Ok);
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk == model, "file differs from what was written");
    // A wrong export name is refused at connect.
    let bad = format!("nbd+unix:///nope?socket={}", sock.display());
    assert!(NbdLeaf::connect(&bad, opts(1, 4)).is_err());
}

#[test]
fn server_error_is_a_target_error_and_the_connection_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-reads");
    let trig = format!("error-pread-file={}", trigger.display());
    let s = Server::nbdkit(
        &dir.path().join("e"),
        &[
            "--filter=error",
            "memory",
            "16M",
            "error=EIO",
            "error-pread-rate=1",
            &trig,
        ],
    );
    let leaf = NbdLeaf::connect(&s.uri(""), opts(1, 8)).unwrap();
    let mut e = engine();
    e.add_leaf("n", Arc::new(leaf)).unwrap();
    let v = e.create("v", Some("0 32768 linear n 0")).unwrap();
    let data = vec![0x77u8; 8192];
    assert_eq!(e.write_at(v, 8, &data), Status::Ok);
    std::fs::write(&trigger, b"").unwrap();
    let mut buf = vec![0u8; 8192];
    for _ in 0..3 {
        let st = e.read_at(v, 8, &mut buf);
        assert_eq!(st, Status::IoError);
        assert!(!st.is_path_error());
    }
    // Writes still work on the same connection while reads fail.
    assert_eq!(e.write_at(v, 64, &data), Status::Ok);
    std::fs::remove_file(&trigger).unwrap();
    assert_eq!(e.read_at(v, 8, &mut buf), Status::Ok);
    assert!(buf == data);
}

#[test]
fn lost_server_gives_path_errors_then_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k");
    // Reads take 3 s, so they are in flight when the server dies.
    let mut s = Server::nbdkit(&sock, &["--filter=delay", "memory", "16M", "delay-read=3"]);
    let leaf = NbdLeaf::connect(&s.uri(""), opts(2, 4)).unwrap();
    let mut e = engine();
    e.add_leaf("n", Arc::new(leaf)).unwrap();
    let v = e.create("v", Some("0 32768 linear n 0")).unwrap();
    let data = vec![0x33u8; 4096];
    assert_eq!(e.write_at(v, 0, &data), Status::Ok);

    let mut buf = vec![0u8; 12 * 4096];
    let reqs: Vec<Request> = (0..12)
        .map(|k| {
            // SAFETY: `buf` outlives these requests, which are polled to completion below.
            let d = unsafe { DataBuf::from_slice(&mut buf[k * 4096..(k + 1) * 4096]) };
            Request::new(Op::Read, v, k as u64 * 8, 8, d, k as u64)
        })
        .collect();
    for r in &reqs {
        e.submit(r).unwrap();
    }
    for _ in 0..50 {
        e.poll();
    }
    s.kill();
    let t0 = Instant::now();
    let mut got = Vec::new();
    while got.len() < reqs.len() {
        e.poll();
        while let Some(c) = e.reap() {
            got.push(c.status);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "in-flight bios lost"
        );
    }
    assert!(got.iter().all(|s| *s == Status::PathError), "{got:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "path error came late"
    );
    // While the server is away, new bios fail at once with a path error.
    let t1 = Instant::now();
    let mut small = vec![0u8; 4096];
    assert_eq!(e.read_at(v, 0, &mut small), Status::PathError);
    assert_eq!(e.write_at(v, 0, &data), Status::PathError);
    assert!(t1.elapsed() < Duration::from_secs(1));

    // Back on the same socket (fresh memory, no delay): I/O works again within seconds.
    let _s2 = Server::nbdkit(&sock, &["memory", "16M"]);
    let t2 = Instant::now();
    loop {
        match e.write_at(v, 0, &data) {
            Status::Ok => break,
            Status::PathError => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(t2.elapsed() < Duration::from_secs(5), "no reconnect");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(e.read_at(v, 0, &mut small), Status::Ok);
    assert!(small == data);
}

#[test]
fn request_timeout_is_a_path_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::nbdkit(
        &dir.path().join("t"),
        &["--filter=delay", "memory", "16M", "delay-read=3"],
    );
    let leaf = NbdLeaf::connect(
        &s.uri(""),
        NbdOptions {
            timeout: Duration::from_millis(300),
            ..opts(1, 4)
        },
    )
    .unwrap();
    let mut e = engine();
    e.add_leaf("n", Arc::new(leaf)).unwrap();
    let v = e.create("v", Some("0 32768 linear n 0")).unwrap();
    let mut buf = vec![0u8; 4096];
    let t0 = Instant::now();
    assert_eq!(e.read_at(v, 0, &mut buf), Status::Timeout);
    assert!(t0.elapsed() < Duration::from_secs(2));
    // The connection comes back (writes are not delayed).
    let data = vec![1u8; 4096];
    let t1 = Instant::now();
    while e.write_at(v, 0, &data) != Status::Ok {
        assert!(t1.elapsed() < Duration::from_secs(5), "no reconnect");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn no_heap_allocation_per_io_in_steady_state() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::nbdkit(&dir.path().join("a"), &["memory", "64M"]);
    let leaf = NbdLeaf::connect(&s.uri(""), opts(2, 4)).unwrap();
    let mut e = engine();
    e.add_leaf("n", Arc::new(leaf)).unwrap();
    let v = e.create("v", Some("0 65536 linear n 0")).unwrap();
    let mut wbuf = vec![0xa5u8; 64 * 1024];
    let mut rbuf = vec![0u8; 64 * 1024];
    let mut round = |e: &mut Engine, i: u64| {
        let sector = (i * 136) % 60000;
        wbuf[0] = i as u8;
        assert_eq!(e.write_at(v, sector, &wbuf), Status::Ok);
        assert_eq!(e.read_at(v, sector, &mut rbuf), Status::Ok);
        assert_eq!(rbuf[0], i as u8);
        // Deeper than the connections, so the backlog is used.
        let mut reqs = [None; 12];
        for (k, slot) in reqs.iter_mut().enumerate() {
            let piece = &mut rbuf[k * 4096..(k + 1) * 4096];
            // SAFETY: `rbuf` outlives the batch, which is polled to completion below.
            let d = unsafe { DataBuf::from_slice(piece) };
            *slot = Some(Request::new(
                Op::Read,
                v,
                sector + k as u64 * 8,
                8,
                d,
                k as u64,
            ));
        }
        for r in reqs.iter().flatten() {
            e.submit(r).unwrap();
        }
        let mut left = reqs.len();
        while left > 0 {
            e.poll();
            while let Some(c) = e.reap() {
                assert_eq!(c.status, Status::Ok);
                left -= 1;
            }
        }
        assert_eq!(e.write_zeroes(v, sector + 200, 16), Status::Ok);
        assert_eq!(e.flush(v), Status::Ok);
    };
    for i in 0..50 {
        round(&mut e, i);
    }
    let before = thread_allocs();
    for i in 50..300 {
        round(&mut e, i);
    }
    let n = thread_allocs() - before;
    assert_eq!(n, 0, "{n} allocations in 250 steady-state rounds");
}

#[test]
fn interrupt_waits_sleep_on_the_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::nbdkit(&dir.path().join("w"), &["memory", "16M"]);
    for conns in [1, 3] {
        let leaf = NbdLeaf::connect(&s.uri(""), opts(conns, 4)).unwrap();
        let mut e = engine();
        e.add_leaf("n", Arc::new(leaf)).unwrap();
        e.create("v", Some("0 32768 linear n 0")).unwrap();
        let h = e.open_volume("v", stackbd_core::Wait::Interrupt).unwrap();
        for i in 0..100u64 {
            let data = vec![(i % 251) as u8 | 1; 16 * 512];
            assert_eq!(e.write(&h, i * 40, &data), Status::Ok);
            let mut back = vec![0u8; 16 * 512];
            assert_eq!(e.read(&h, i * 40, &mut back), Status::Ok);
            assert_eq!(back, data);
        }
        e.close_volume(h);
    }
}

/// Replaces the server on `sock` by a listener that accepts (the kernel queues connections)
/// and never speaks: every handshake hangs until the client's timeout.
fn silence(s: &mut Server, sock: &std::path::Path) -> std::os::unix::net::UnixListener {
    s.kill();
    std::fs::remove_file(sock).unwrap();
    std::os::unix::net::UnixListener::bind(sock).unwrap()
}

/// An nbd leaf (3 s timeout, `conns` connections) made while nbdkit answered on `DIR/name`,
/// whose server is then silenced; the listener must live as long as the test needs it silent.
fn leaf_of_a_silenced_server(
    name: &str,
    conns: u32,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    NbdLeaf,
    std::os::unix::net::UnixListener,
) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join(name);
    let mut s = Server::nbdkit(&sock, &["memory", "16M"]);
    let o = NbdOptions {
        timeout: Duration::from_secs(3),
        ..opts(conns, 4)
    };
    let leaf = NbdLeaf::connect(&s.uri(""), o).unwrap();
    let silent = silence(&mut s, &sock);
    (dir, sock, leaf, silent)
}

/// A reconnect runs on a connector thread, never on the reactor: while the server's socket
/// accepts connections and never answers the handshake (each attempt hangs until the leaf's
/// 2 s timeout), a RAM volume on the same reactor keeps completing I/O without a stall, and a
/// bio for the NBD volume waits for the attempt briefly, then fails with a path error.
#[test]
fn reconnects_never_block_the_reactor() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h");
    let mut s = Server::nbdkit(&sock, &["memory", "16M"]);
    let o = NbdOptions {
        timeout: Duration::from_secs(2),
        ..opts(1, 4)
    };
    let leaf = NbdLeaf::connect(&s.uri(""), o).unwrap();
    let mut e = engine();
    e.add_leaf("n", Arc::new(leaf.clone())).unwrap();
    let v = e.create("v", Some("0 32768 linear n 0")).unwrap();
    e.add_leaf(
        "m",
        Arc::new(stackbd_leaves::mem::MemLeaf::new(16 * MIB).unwrap()),
    )
    .unwrap();
    let w = e.create("w", Some("0 32768 linear m 0")).unwrap();
    let data = vec![0x6du8; 4096];
    assert_eq!(e.write_at(v, 0, &data), Status::Ok);

    // The server goes silent; a thread takes the connections and holds them.
    let silent = silence(&mut s, &sock);
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((c, _)) = silent.accept() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(c);
        }
    });

    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` outlives the read, which is reaped below before the test ends.
    let d = unsafe { DataBuf::from_slice(&mut buf) };
    e.submit(&Request::new(Op::Read, v, 0, 8, d, 77)).unwrap();
    let mut buf2 = vec![0u8; 4096];
    // SAFETY: as above.
    let d2 = unsafe { DataBuf::from_slice(&mut buf2) };
    let mut second: Option<Instant> = None;
    let mut nbd_status = Vec::new();
    let (mut slow, mut worst, mut n) = (0, Duration::ZERO, 0u64);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        if second.is_none() && t0.elapsed() > Duration::from_millis(300) {
            // Issued while reconnects are being tried: it waits for one, then fails.
            e.submit(&Request::new(Op::Read, v, 8, 8, d2, 78)).unwrap();
            second = Some(Instant::now());
        }
        let t = Instant::now();
        assert_eq!(e.write_at(w, (n % 64) * 8, &data), Status::Ok);
        let took = t.elapsed();
        worst = worst.max(took);
        if took > Duration::from_millis(150) {
            slow += 1;
        }
        n += 1;
        while let Some(c) = e.reap() {
            let since = if c.user_data == 77 {
                t0
            } else {
                second.unwrap()
            };
            nbd_status.push((c.user_data, c.status, since.elapsed()));
        }
    }
    eprintln!("{n} RAM writes during reconnects, worst {worst:?}; nbd read: {nbd_status:?}");
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "no reconnect was attempted"
    );
    // A reconnect on the reactor would stall it for the attempt (200 ms and more) each time.
    assert!(
        slow <= 1,
        "{slow} RAM writes took over 150 ms (worst {worst:?})"
    );
    nbd_status.sort_by_key(|x| x.0);
    assert_eq!(
        nbd_status.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
        [(77, Status::PathError), (78, Status::PathError)],
        "{nbd_status:?}"
    );
    for &(tag, _, at) in &nbd_status {
        assert!(at < Duration::from_secs(1), "NBD read {tag} waited {at:?}");
    }
}

/// Even a channel's first connections are opened off the reactor: adding the leaf to an engine
/// while its server accepts and never answers returns at once (it used to wait out the
/// handshake timeout on every reactor), I/O fails with path errors, and once a real server is
/// back on the socket the channel connects and I/O works.
#[test]
fn first_connections_do_not_hold_up_the_engine() {
    let (_dir, sock, leaf, silent) = leaf_of_a_silenced_server("f", 2);

    let mut e = engine();
    let t = Instant::now();
    e.add_leaf("n", Arc::new(leaf.clone())).unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1500), "add_leaf took {took:?}");
    let v = e.create("v", Some("0 32768 linear n 0")).unwrap();
    let data = vec![0x4eu8; 4096];
    assert_eq!(e.write_at(v, 0, &data), Status::PathError);

    // A real server again: the hung attempts time out, a later one connects.
    drop(silent);
    std::fs::remove_file(&sock).unwrap();
    let _s2 = Server::nbdkit(&sock, &["memory", "16M"]);
    let t = Instant::now();
    while e.write_at(v, 0, &data) != Status::Ok {
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", leaf.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut back = vec![0u8; 4096];
    assert_eq!(e.read_at(v, 0, &mut back), Status::Ok);
    assert!(back == data);
}

/// While bios wait for a connect, the reactor sleeps (on the channel's wake eventfd) instead
/// of spinning: a write issued as the leaf's first connection hangs in the handshake waits its
/// 200 ms and fails with a path error, and the thread that ran the reactor meanwhile (the
/// inline engine's, this one) used a small part of that time on the CPU.
#[test]
fn the_reactor_sleeps_while_bios_wait_for_a_connect() {
    use rustix::time::{clock_gettime, ClockId};
    let cpu = || {
        let t = clock_gettime(ClockId::ThreadCPUTime);
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    };
    let (_dir, _sock, leaf, _silent) = leaf_of_a_silenced_server("w", 1);

    let mut e = engine();
    e.add_leaf("n", Arc::new(leaf)).unwrap();
    let v = e.create("v", Some("0 32768 linear n 0")).unwrap();
    let (t, c) = (Instant::now(), cpu());
    let st = e.write_at(v, 0, &[0x11u8; 4096]);
    let (took, on_cpu) = (t.elapsed(), cpu() - c);
    eprintln!("write: {st:?} after {took:?}, {on_cpu:?} on the CPU");
    assert_eq!(st, Status::PathError);
    assert!(
        took >= Duration::from_millis(150),
        "it did not wait: {took:?}"
    );
    // Spinning would keep the thread on the CPU for nearly all of the wait.
    assert!(
        on_cpu < took / 4,
        "the reactor spun: {on_cpu:?} on the CPU in {took:?}"
    );
}
