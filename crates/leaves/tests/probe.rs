//! `Leaf::probe`, as a multipath path checker calls it: the `nbd` leaf against real nbdkit
//! servers (unix socket and loopback TCP), dead and silent peers, the reconnect nudge a
//! successful probe gives the leaf's channels, and the file leaf.

use stackbd_core::{Engine, Leaf, Status};
use stackbd_leaves::file::{FileLeaf, FileOptions};
use stackbd_leaves::nbd_client::{NbdLeaf, NbdOptions};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{free_port, Server};

const PROBE: Duration = Duration::from_secs(5);

fn opts() -> NbdOptions {
    NbdOptions {
        connections: 1,
        queue_depth: 4,
        timeout: Duration::from_secs(5),
    }
}

/// Probes and returns the result with how long it took.
fn timed_probe(leaf: &dyn Leaf, timeout: Duration) -> (Result<(), String>, Duration) {
    let t = Instant::now();
    let r = leaf.probe(timeout);
    (r, t.elapsed())
}

#[test]
fn probe_answers_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let su = Server::nbdkit(&dir.path().join("u"), &["memory", "16M"]);
    let st = Server::nbdkit_tcp(free_port(), &["memory", "16M"]);
    for s in [&su, &st] {
        let leaf = NbdLeaf::connect(&s.uri(""), opts()).unwrap();
        for _ in 0..3 {
            let (r, took) = timed_probe(&leaf, PROBE);
            assert_eq!(r, Ok(()), "{}", s.uri(""));
            assert!(took < Duration::from_secs(1), "{took:?}");
        }
        let stats = leaf.stats();
        assert_eq!((stats.probes_ok, stats.probes_failed), (3, 0));
    }
}

#[test]
fn an_error_reply_still_means_the_path_answers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::nbdkit(
        &dir.path().join("e"),
        &[
            "--filter=error",
            "memory",
            "16M",
            "error=EIO",
            "error-pread-rate=1",
        ],
    );
    let leaf = NbdLeaf::connect(&s.uri(""), opts()).unwrap();
    assert_eq!(leaf.probe(PROBE), Ok(()));
    // The server's ESHUTDOWN, though, says it is going away.
    let s2 = Server::nbdkit(
        &dir.path().join("x"),
        &[
            "--filter=error",
            "memory",
            "16M",
            "error=ESHUTDOWN",
            "error-pread-rate=1",
        ],
    );
    let leaf = NbdLeaf::connect(&s2.uri(""), opts()).unwrap();
    let err = leaf.probe(PROBE).unwrap_err();
    assert!(err.starts_with("read nbd+unix:///"), "{err}");
    assert!(err.contains("ESHUTDOWN"), "{err}");
}

#[test]
fn probe_fails_fast_when_the_server_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g");
    let mut s = Server::nbdkit(&sock, &["memory", "16M"]);
    let uri = s.uri("");
    let leaf = NbdLeaf::connect(&uri, opts()).unwrap();
    assert_eq!(leaf.probe(PROBE), Ok(()));
    // Killed: the socket file stays, nobody listens.
    s.kill();
    let (r, took) = timed_probe(&leaf, PROBE);
    let err = r.unwrap_err();
    assert!(
        err.starts_with(&format!("connect {uri}: Connection refused")),
        "{err}"
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    // No socket at all.
    std::fs::remove_file(&sock).unwrap();
    let (r, took) = timed_probe(&leaf, PROBE);
    let err = r.unwrap_err();
    assert!(
        err.starts_with(&format!("connect {uri}: No such file or directory")),
        "{err}"
    );
    assert!(took < Duration::from_millis(500), "{took:?}");

    // TCP: nothing listens on the port any more.
    let mut t = Server::nbdkit_tcp(free_port(), &["memory", "16M"]);
    let turi = t.uri("");
    let leaf = NbdLeaf::connect(&turi, opts()).unwrap();
    assert_eq!(leaf.probe(PROBE), Ok(()));
    t.kill();
    let (r, took) = timed_probe(&leaf, PROBE);
    let err = r.unwrap_err();
    assert!(
        err.starts_with(&format!("connect {turi}: Connection refused")),
        "{err}"
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(leaf.stats().probes_failed, 1);
}

/// Asserts that a probe of `leaf` fails in about `timeout` with an error starting with `what`.
fn assert_times_out(leaf: &NbdLeaf, timeout: Duration, what: &str) {
    let (r, took) = timed_probe(leaf, timeout);
    let err = r.unwrap_err();
    assert!(err.starts_with(what), "{err}");
    assert!(err.contains("timed out"), "{err}");
    assert!(
        took >= timeout - Duration::from_millis(20) && took < timeout + Duration::from_millis(300),
        "took {took:?} for a {timeout:?} probe"
    );
}

#[test]
fn a_server_that_never_answers_times_the_probe_out() {
    let timeout = Duration::from_millis(400);
    let dir = tempfile::tempdir().unwrap();

    // Unix: nbdkit replaced by a listener that accepts nothing and says nothing.
    let sock = dir.path().join("s");
    let mut s = Server::nbdkit(&sock, &["memory", "16M"]);
    let uri = s.uri("");
    let leaf = NbdLeaf::connect(&uri, opts()).unwrap();
    s.kill();
    std::fs::remove_file(&sock).unwrap();
    let silent = UnixListener::bind(&sock).unwrap();
    assert_times_out(&leaf, timeout, &format!("handshake {uri}: "));
    drop(silent);

    // Unix, and the listener's accept queue is full: a blocking connect would hang for good.
    std::fs::remove_file(&sock).unwrap();
    let full = full_unix_listener(&sock);
    assert_times_out(&leaf, timeout, &format!("connect {uri}: "));
    drop(full);

    // TCP: the kernel completes the TCP handshake, the NBD one never comes.
    let port = free_port();
    let mut t = Server::nbdkit_tcp(port, &["memory", "16M"]);
    let turi = t.uri("");
    let leaf = NbdLeaf::connect(&turi, opts()).unwrap();
    t.kill();
    let silent = TcpListener::bind(("127.0.0.1", port)).unwrap();
    assert_times_out(&leaf, timeout, &format!("handshake {turi}: "));
    // Accepted, and still silent.
    let holder = std::thread::spawn(move || {
        let c = silent.accept().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        drop(c);
    });
    assert_times_out(&leaf, timeout, &format!("handshake {turi}: "));
    holder.join().unwrap();
}

/// A unix listener (backlog 0) whose accept queue is full: the next connect would block.
fn full_unix_listener(path: &std::path::Path) -> Vec<std::os::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path).unwrap();
    let sock =
        |flags| rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None);
    let l = sock(SocketFlags::CLOEXEC).unwrap();
    rustix::net::bind(&l, &addr).unwrap();
    rustix::net::listen(&l, 0).unwrap();
    let mut fds = vec![l];
    for _ in 0..64 {
        let c = sock(SocketFlags::CLOEXEC | SocketFlags::NONBLOCK).unwrap();
        match rustix::net::connect(&c, &addr) {
            Ok(()) => fds.push(c),
            Err(rustix::io::Errno::AGAIN) => return fds,
            Err(e) => panic!("connect: {e}"),
        }
    }
    panic!("the accept queue never filled");
}

#[test]
fn a_successful_probe_makes_the_channel_reconnect_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("r");
    let mut s = Server::nbdkit(&sock, &["memory", "16M"]);
    let leaf = NbdLeaf::connect(&s.uri(""), opts()).unwrap();
    let mut e = Engine::new(stackbd_targets::registry(), Default::default());
    e.add_leaf("n", Arc::new(leaf.clone())).unwrap();
    let v = e.create("v", Some("0 32768 linear n 0")).unwrap();
    let data = vec![0x5au8; 4096];
    assert_eq!(e.write_at(v, 0, &data), Status::Ok);

    // The server dies; I/O fails until the connection's backoff is at its 2 s maximum: after
    // the loss it retries in 10 ms, then each failed attempt doubles the wait (20, 40 .. 1280,
    // then 2000 ms), so after 8 failed attempts the next one is 2 s away.
    s.kill();
    let failures = leaf.stats().connect_failures;
    let t = Instant::now();
    while leaf.stats().connect_failures < failures + 8 {
        assert_eq!(e.write_at(v, 0, &data), Status::PathError);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", leaf.stats());
        std::thread::sleep(Duration::from_millis(2));
    }
    let last_attempt = Instant::now();

    // Back on the same socket. Without a probe the channel keeps backing off: I/O still fails.
    let _s2 = Server::nbdkit(&sock, &["memory", "16M"]);
    let st = e.write_at(v, 0, &data);
    assert!(
        last_attempt.elapsed() < Duration::from_millis(1500),
        "the server took too long to restart for this test"
    );
    assert_eq!(st, Status::PathError, "the backoff was not large");
    let nudges = leaf.stats().nudges;

    // The path checker's probe succeeds; the next I/O reconnects at once and succeeds.
    let (r, took) = timed_probe(&leaf, PROBE);
    assert_eq!(r, Ok(()));
    assert!(took < Duration::from_millis(500), "{took:?}");
    let t = Instant::now();
    assert_eq!(e.write_at(v, 8, &data), Status::Ok);
    let io = t.elapsed();
    assert!(io < Duration::from_millis(300), "I/O took {io:?}");
    assert!(
        last_attempt.elapsed() < Duration::from_millis(1900),
        "waited out the backoff"
    );
    assert_eq!(leaf.stats().nudges, nudges + 1);
    let mut back = vec![0u8; 4096];
    assert_eq!(e.read_at(v, 8, &mut back), Status::Ok);
    assert!(back == data);

    // With its connection up, the channel ignores further probes.
    assert_eq!(leaf.probe(PROBE), Ok(()));
    assert_eq!(e.write_at(v, 16, &data), Status::Ok);
    assert_eq!(leaf.stats().nudges, nudges + 1);
}

#[test]
fn file_probe_reads_the_first_block() {
    for direct in [false, true] {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let leaf = FileLeaf::open(
            f.path(),
            FileOptions {
                direct,
                ..FileOptions::default()
            },
        )
        .unwrap();
        for _ in 0..3 {
            let (r, took) = timed_probe(&leaf, PROBE);
            assert_eq!(r, Ok(()), "direct={direct}");
            assert!(took < Duration::from_secs(1), "{took:?}");
        }
    }
    // An empty file has nothing to read, and answers.
    let f = tempfile::NamedTempFile::new().unwrap();
    let leaf = FileLeaf::open(f.path(), FileOptions::default()).unwrap();
    assert_eq!(leaf.probe(PROBE), Ok(()));
}
