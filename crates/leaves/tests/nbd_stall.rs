//! The `nbd` leaf through server stalls: nbdkit stopped (SIGSTOP) for longer than the leaf's
//! timeout, and a server whose accept queue is full, then a working server again. I/O fails
//! with a bounded wait while the server is away, works again within a bound once it answers,
//! and the data written before the stall is intact. nbdkit is required (scripts/test.sh).

use stackbd_core::{DevId, Engine, HealthState, Leaf, LeafHealth, Status};
use stackbd_leaves::nbd_client::{NbdLeaf, NbdOptions};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

mod common;
use common::Server;

/// The leaf's request and connect timeout in these tests.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Once the server answers again, I/O must work within this (a backoff of at most 2 s, plus
/// an attempt that connected while the server was stopped finishing its handshake).
const RECOVERY: Duration = Duration::from_secs(6);
/// Bytes written before the stall and checked after it.
const DATA_BYTES: usize = 1 << 20;

fn engine() -> Engine {
    Engine::new(stackbd_targets::registry(), Default::default())
}

fn opts() -> NbdOptions {
    NbdOptions {
        connections: 1,
        queue_depth: 4,
        timeout: TIMEOUT,
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..DATA_BYTES)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// An engine with the leaf `n` and a volume `v` over it, `pattern(seed)` written at sector 0.
fn engine_with(leaf: &NbdLeaf, seed: u8) -> (Engine, DevId) {
    let mut e = engine();
    e.add_leaf("n", Arc::new(leaf.clone())).unwrap();
    let v = e.create("v", Some("0 32768 linear n 0")).unwrap();
    assert_eq!(e.write_at(v, 0, &pattern(seed)), Status::Ok);
    assert_eq!(e.flush(v), Status::Ok);
    (e, v)
}

/// Reads while the server is away for `away`: each read ends (with an error) in a bounded time,
/// none hangs. Returns the statuses seen.
fn read_while_away(e: &mut Engine, v: DevId, away: Duration) -> Vec<Status> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while t0.elapsed() < away {
        let t = Instant::now();
        let st = e.read_at(v, 8, &mut buf);
        let took = t.elapsed();
        assert!(
            took < TIMEOUT + Duration::from_secs(2),
            "a read took {took:?} while the server was away ({st:?})"
        );
        seen.push(st);
        std::thread::sleep(Duration::from_millis(250));
    }
    seen
}

/// Reads until one succeeds; panics after [`RECOVERY`]. Returns how long it took.
fn wait_recovered(e: &mut Engine, v: DevId, leaf: &NbdLeaf) -> Duration {
    let t0 = Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        let st = e.read_at(v, 0, &mut buf);
        if st == Status::Ok {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < RECOVERY,
            "no recovery {:?} after the server came back: last {st:?}, {:?}",
            t0.elapsed(),
            leaf.stats()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_intact(e: &mut Engine, v: DevId, seed: u8) {
    let mut back = vec![0u8; DATA_BYTES];
    assert_eq!(e.read_at(v, 0, &mut back), Status::Ok);
    assert!(
        back == pattern(seed),
        "data written before the stall changed"
    );
}

/// The leaf is down: `reconnecting` or `failed` (or exactly `want`), since a moment after
/// `down_at`, with an error that says `what`.
fn assert_down(h: &LeafHealth, want: Option<HealthState>, what: &str, down_at: SystemTime) {
    match want {
        Some(w) => assert_eq!(h.state, w, "{h:?}"),
        None => assert!(
            matches!(h.state, HealthState::Reconnecting | HealthState::Failed),
            "{h:?}"
        ),
    }
    let err = h.error().unwrap_or_else(|| panic!("no error: {h:?}"));
    // A stopped unix-socket server first times out; once its accept queue is full, connects
    // are refused.
    let refused = what == "timed out" && err.contains("refused");
    assert!(
        err.contains(what) || refused,
        "the error does not say '{what}': {h:?}"
    );
    // `since` is kept in milliseconds.
    let since = h.since.expect("no since") + Duration::from_millis(1);
    assert!(
        since >= down_at && since <= SystemTime::now() + Duration::from_millis(1),
        "since is not after {down_at:?}: {h:?}"
    );
}

/// nbdkit stopped for `stall` (longer than the leaf's timeout) with reads going on, resumed:
/// reads work again within [`RECOVERY`] and the data is intact; writes work too. The leaf's
/// health says `reconnecting` or `failed` (`want`, if given) with a timeout while the server
/// is stopped, `ok` once it is back.
fn stall_and_recover(stall: Duration, want: Option<HealthState>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let s = Server::nbdkit(&sock, &["memory", "16M"]);
    let leaf = NbdLeaf::connect(&s.uri(""), opts()).unwrap();
    let (mut e, v) = engine_with(&leaf, 0x5a);
    assert_eq!(leaf.health().state, HealthState::Ok);
    assert_eq!(leaf.health().last_error, None);

    let stopped_at = SystemTime::now();
    s.stop();
    let seen = read_while_away(&mut e, v, stall);
    let h = leaf.health();
    eprintln!("during the stall: {seen:?}; {:?}; {h:?}", leaf.stats());
    assert_down(&h, want, "timed out", stopped_at);
    assert!(
        seen.iter().all(|s| *s != Status::Ok),
        "a read succeeded while the server was stopped: {seen:?}"
    );
    assert!(
        seen.contains(&Status::Timeout),
        "the read in flight did not time out: {seen:?}"
    );
    s.resume();
    let took = wait_recovered(&mut e, v, &leaf);
    let h = leaf.health();
    eprintln!(
        "recovered {took:?} after SIGCONT; {:?}; {h:?}",
        leaf.stats()
    );
    assert_eq!(h.state, HealthState::Ok, "{h:?}");
    assert!(h.error().is_some(), "the last error was forgotten: {h:?}");
    assert_intact(&mut e, v, 0x5a);
    let more = vec![0x77u8; 8192];
    assert_eq!(e.write_at(v, 4096, &more), Status::Ok);
    let mut back = vec![0u8; 8192];
    assert_eq!(e.read_at(v, 4096, &mut back), Status::Ok);
    assert!(back == more);
}

/// A stall four times the leaf's timeout.
#[test]
fn recovers_after_a_stall_longer_than_the_timeout() {
    stall_and_recover(4 * TIMEOUT, None);
}

/// The bar: a 60 s SIGSTOP of the server (about 65 s).
#[test]
fn recovers_after_a_60s_stall() {
    stall_and_recover(Duration::from_secs(60), Some(HealthState::Failed));
}

/// A unix listener on `sock` that never accepts, its accept queue filled: connects to it fail
/// with `EAGAIN`. Returns the listener and the connections that fill its queue.
fn full_listener(sock: &std::path::Path) -> (rustix::fd::OwnedFd, Vec<rustix::fd::OwnedFd>) {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    let addr = SocketAddrUnix::new(sock).unwrap();
    let l = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&l, &addr).unwrap();
    rustix::net::listen(&l, 1).unwrap();
    (l, fill_queue(sock))
}

/// Connects to `sock` until its accept queue is full; returns the queued connections.
fn fill_queue(sock: &std::path::Path) -> Vec<rustix::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(sock).unwrap();
    let mut held = Vec::new();
    loop {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => held.push(fd),
            Err(rustix::io::Errno::AGAIN) => return held,
            Err(e) => panic!("connect {}: {e}", sock.display()),
        }
        assert!(held.len() < 20_000, "the accept queue never filled");
    }
}

/// A server whose accept queue is full (a listener that never accepts): I/O fails in bounded
/// time, the leaf says so (`failed`/`reconnecting`, timed out); then a working server on the
/// same path (nbdkit on the same file): I/O works again within [`RECOVERY`], data intact.
#[test]
fn recovers_from_a_server_whose_accept_queue_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q");
    let img = dir.path().join("img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let img_s = img.to_str().unwrap();
    let mut s = Server::nbdkit(&sock, &["file", img_s]);
    let leaf = NbdLeaf::connect(&s.uri(""), opts()).unwrap();
    let (mut e, v) = engine_with(&leaf, 0x3c);

    s.kill();
    std::fs::remove_file(&sock).unwrap();
    let down_at = SystemTime::now();
    let (listener, queued) = full_listener(&sock);
    eprintln!("{} connections fill the accept queue", queued.len());
    let seen = read_while_away(&mut e, v, 3 * TIMEOUT);
    let h = leaf.health();
    eprintln!("while full: {seen:?}; {:?}; {h:?}", leaf.stats());
    assert!(seen.iter().all(|s| *s == Status::PathError), "{seen:?}");
    assert_down(&h, None, "timed out", down_at);

    drop((listener, queued));
    std::fs::remove_file(&sock).unwrap();
    let _s2 = Server::nbdkit(&sock, &["file", img_s]);
    let took = wait_recovered(&mut e, v, &leaf);
    let h = leaf.health();
    eprintln!("recovered {took:?} after the new server; {h:?}");
    assert_eq!(h.state, HealthState::Ok, "{h:?}");
    assert_intact(&mut e, v, 0x3c);
}

/// nbdkit stopped with its own accept queue full (the leaf's reconnects and thousands of
/// other clients queued on it), then resumed: it works through the queue and the leaf is back
/// within [`RECOVERY`], data intact.
#[test]
fn recovers_when_a_stopped_server_had_its_accept_queue_full() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("f");
    let s = Server::nbdkit(&sock, &["memory", "16M"]);
    let leaf = NbdLeaf::connect(&s.uri(""), opts()).unwrap();
    let (mut e, v) = engine_with(&leaf, 0x21);

    let down_at = SystemTime::now();
    s.stop();
    let queued = fill_queue(&sock);
    eprintln!("{} connections fill nbdkit's accept queue", queued.len());
    let seen = read_while_away(&mut e, v, 3 * TIMEOUT);
    let h = leaf.health();
    eprintln!(
        "while stopped and full: {seen:?}; {:?}; {h:?}",
        leaf.stats()
    );
    assert_down(&h, None, "timed out", down_at);
    // The other clients give up; the server, resumed, takes their dead connections first.
    drop(queued);
    s.resume();
    let took = wait_recovered(&mut e, v, &leaf);
    eprintln!("recovered {took:?} after SIGCONT; {:?}", leaf.health());
    assert_eq!(leaf.health().state, HealthState::Ok);
    assert_intact(&mut e, v, 0x21);
}
