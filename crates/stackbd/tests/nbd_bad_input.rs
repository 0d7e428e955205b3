//! `stackbd serve` against clients that break the NBD protocol, byte by byte over raw TCP
//! (messages built by hand from the spec, `doc/proto.md` of the NetworkBlockDevice project).
//!
//! Each case runs against its own daemon with reference data written and acknowledged first,
//! and a healthy nbdsh client looping writes and reads on one connection the whole time. After
//! the case: the daemon is alive, a NEW connection finds the reference data intact, and the
//! healthy client never saw an error.

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

// --- The protocol, from the spec ------------------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;

const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;

const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

const MAX_PAYLOAD: u32 = 32 << 20;

/// The export the cases use: the demo (1 GiB).
const EXPORT: &str = "demo";

/// Reference data: written and acknowledged (and flushed) before each case, checked after.
const REF_OFFSET: u64 = 60 * KIB;
const REF_LEN: usize = 200 * KIB as usize;

fn reference() -> Vec<u8> {
    random_bytes(REF_LEN, 0xbad1)
}

/// A raw NBD client on a TCP stream.
struct Raw {
    s: TcpStream,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Orderly close (read returned 0).
    Eof,
    /// Closed with unread data in the server's buffer: the kernel sends a reset.
    Reset,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the daemon");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s }
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the daemon");
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes from the daemon: {e}"));
        v
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    /// Reads the 18-byte greeting; returns the handshake flags.
    fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC, "greeting: NBDMAGIC");
        assert_eq!(self.u64(), IHAVEOPT, "greeting: IHAVEOPT");
        let flags = self.u16();
        assert_ne!(flags & 1, 0, "server does not offer fixed newstyle");
        flags
    }

    /// Greeting read, flags (fixed newstyle + no zeroes) sent.
    fn start(port: u16) -> Raw {
        let mut r = Raw::connect(port);
        r.greeting();
        r.send(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        r
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC, "option reply magic");
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32();
        assert!(len < 1 << 20, "option reply of {len} bytes");
        (opt, typ, self.recv(len as usize))
    }

    /// `NBD_OPT_GO` for `name` with no info requests; returns (size, transmission flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &data);
        let mut export = None;
        loop {
            let (opt, typ, data) = self.option_reply();
            assert_eq!(opt, OPT_GO, "reply to another option");
            match typ {
                REP_INFO => {
                    let t = u16::from_be_bytes([data[0], data[1]]);
                    if t == INFO_EXPORT {
                        assert_eq!(data.len(), 12, "NBD_INFO_EXPORT length");
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        export = Some((size, flags));
                    }
                }
                REP_ACK => return export.expect("GO acknowledged without NBD_INFO_EXPORT"),
                t => panic!(
                    "GO {name:?}: reply type {t:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    /// A connection in transmission on `EXPORT` (simple replies only).
    fn open(port: u16) -> (Raw, u64) {
        let mut r = Raw::start(port);
        let (size, _) = r.go(EXPORT);
        (r, size)
    }

    fn request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "simple reply magic");
        let err = self.u32();
        (err, self.u64())
    }

    fn expect_reply(&mut self, cookie: u64, what: &str) -> u32 {
        let (err, c) = self.reply();
        assert_eq!(c, cookie, "{what}: reply for another request");
        err
    }

    fn write(&mut self, offset: u64, data: &[u8], cookie: u64) -> u32 {
        self.request(CMD_WRITE, 0, cookie, offset, data.len() as u32);
        self.send(data);
        self.expect_reply(cookie, "write")
    }

    fn read(&mut self, offset: u64, len: u32, cookie: u64) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, cookie, offset, len);
        match self.expect_reply(cookie, "read") {
            0 => Ok(self.recv(len as usize)),
            e => Err(e),
        }
    }

    fn flush(&mut self, cookie: u64) -> u32 {
        self.request(CMD_FLUSH, 0, cookie, 0, 0);
        self.expect_reply(cookie, "flush")
    }

    /// Reads until the server closes; fails the test if it does not within the timeout.
    /// Bytes before the close are returned.
    fn end(&mut self) -> (End, Vec<u8>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return (End::Eof, got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return (End::Reset, got),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!(
                        "the daemon did not close the connection (got {} bytes: {:02x?})",
                        got.len(),
                        &got[..got.len().min(64)]
                    )
                }
                Err(e) => panic!("reading until the close: {e}"),
            }
        }
    }

    /// The server closes the connection cleanly, having sent nothing more.
    fn expect_clean_close(&mut self, what: &str) {
        let (end, got) = self.end();
        assert_eq!(end, End::Eof, "{what}: connection reset instead of closed");
        assert!(got.is_empty(), "{what}: unexpected bytes {got:02x?}");
    }
}

/// One daemon per case, with the reference data and a healthy client alongside.
struct Bench {
    d: Daemon,
    healthy: Bg,
    stop: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        let d = Daemon::demo();
        // Reference data from its own connection, acknowledged and flushed.
        let (mut r, size) = Raw::open(d.port);
        assert_eq!(size, DEMO_SIZE);
        assert_eq!(r.write(REF_OFFSET, &reference(), 1), 0, "reference write");
        assert_eq!(r.flush(2), 0, "reference flush");
        r.request(CMD_DISC, 0, 3, 0, 0);
        r.expect_clean_close("after NBD_CMD_DISC");

        // The healthy client: one nbdsh connection writing and verifying until told to stop.
        let dir = tempdir();
        let stop = dir.path().join("stop");
        let script = format!(
            r#"
import os, time
h.connect_uri({uri:?})
n = 0
deadline = time.time() + 100
while not os.path.exists({stop:?}):
    assert time.time() < deadline, "never told to stop"
    off = (64 << 20) + (n % 32) * (132 << 10) + (4 << 10)
    buf = os.urandom(132 << 10)
    h.pwrite(buf, off)
    assert h.pread(len(buf), off) == buf, "healthy client read back wrong data at %d" % off
    if n % 8 == 0:
        h.flush()
    n += 1
    if n == 1:
        print("healthy ready", flush=True)
h.flush()
h.shutdown()
print("healthy iterations", n)
"#,
            uri = d.uri(EXPORT),
            stop = stop.display().to_string(),
        );
        let mut c = nbdsh();
        c.arg("-c").arg(script);
        let mut healthy = Bg::start(&mut c, &dir.path().join("healthy.log"));
        // Wait until it is connected and has done I/O, so it overlaps the case.
        let start = std::time::Instant::now();
        while !healthy.output().contains("healthy ready") {
            if let Some(s) = healthy.try_exit() {
                panic!("the healthy client ended ({s}):\n{}", healthy.output());
            }
            assert!(
                start.elapsed() < QUICK,
                "the healthy client never got going"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Bench {
            d,
            healthy,
            stop,
            _dir: dir,
        }
    }

    fn port(&self) -> u16 {
        self.d.port
    }

    /// After a case: the daemon lives, a new connection reads the reference data, and works.
    fn check(&mut self, case: &str) {
        // Give the daemon a moment to notice the bad client went away.
        std::thread::sleep(Duration::from_millis(50));
        self.d.assert_alive();
        let (mut r, _) = Raw::open(self.port());
        let got = r
            .read(REF_OFFSET, REF_LEN as u32, 10)
            .unwrap_or_else(|e| panic!("after {case}: reading the reference data: errno {e}"));
        assert_same(&format!("after {case}: reference data"), &got, &reference());
        let probe = random_bytes(8192, 7);
        assert_eq!(r.write(512 * MIB, &probe, 11), 0, "after {case}: write");
        assert_eq!(r.read(512 * MIB, 8192, 12), Ok(probe), "after {case}: read");
        if let Some(s) = self.healthy.try_exit() {
            panic!(
                "after {case}: the healthy client ended early ({s}):\n{}",
                self.healthy.output()
            );
        }
    }

    /// Stops the healthy client and checks it never failed.
    fn finish(mut self) {
        std::fs::write(&self.stop, b"").unwrap();
        let s = self.healthy.wait(QUICK);
        let out = self.healthy.output();
        assert!(s.success(), "the healthy client failed ({s}):\n{out}");
        let n: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("healthy iterations "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("healthy client output: {out}"));
        assert!(n > 0, "the healthy client did no I/O");
        self.d.assert_alive();
    }
}

#[test]
fn malformed_handshakes_are_closed_cleanly() {
    let mut b = Bench::new();
    let port = b.port();

    // Unknown client flags: "the server MUST drop the TCP connection".
    for flags in [0xffff_ffffu32, 0x8000_0001, FLAG_FIXED_NEWSTYLE | 4] {
        let mut r = Raw::connect(port);
        r.greeting();
        r.send(&flags.to_be_bytes());
        r.expect_clean_close(&format!("client flags {flags:#x}"));
        b.check(&format!("client flags {flags:#x}"));
    }

    // Garbage instead of IHAVEOPT.
    let mut r = Raw::start(port);
    r.send(b"GARBAGE!GARBAGE!");
    r.expect_clean_close("garbage option magic");
    b.check("garbage option magic");

    // Plain newstyle (no FIXED flag) may only send EXPORT_NAME: anything else ends it.
    let mut r = Raw::connect(port);
    r.greeting();
    r.send(&0u32.to_be_bytes());
    r.option(OPT_LIST, &[]);
    r.expect_clean_close("LIST without fixed newstyle");
    b.check("LIST without fixed newstyle");

    // A huge option length: answered with an error or closed, never buffered.
    let mut r = Raw::start(port);
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hdr.extend_from_slice(&OPT_GO.to_be_bytes());
    hdr.extend_from_slice(&u32::MAX.to_be_bytes());
    r.send(&hdr);
    r.send(&[0u8; 4096]);
    drop(r);
    b.check("4 GiB option");

    // A client that vanishes mid-greeting, mid-flags, mid-option.
    let mut r = Raw::connect(port);
    r.recv(5);
    drop(r);
    let mut r = Raw::connect(port);
    r.greeting();
    r.send(&[0, 0]);
    drop(r);
    let mut r = Raw::start(port);
    r.send(&IHAVEOPT.to_be_bytes());
    r.send(&OPT_GO.to_be_bytes());
    r.send(&100u32.to_be_bytes());
    r.send(&[0u8; 10]);
    drop(r);
    b.check("clients gone mid-handshake");

    // ABORT is acknowledged (or the connection simply closed) and ends the session.
    let mut r = Raw::start(port);
    r.option(OPT_ABORT, &[]);
    let (end, got) = r.end();
    assert_eq!(end, End::Eof);
    if !got.is_empty() {
        assert_eq!(got.len(), 20, "ABORT reply: {got:02x?}");
        assert_eq!(&got[..8], &REPLY_MAGIC.to_be_bytes());
        assert_eq!(&got[12..16], &REP_ACK.to_be_bytes());
    }
    b.check("ABORT");
    b.finish();
}

#[test]
fn unknown_option_gets_unsup_and_the_handshake_continues() {
    let mut b = Bench::new();
    let mut r = Raw::start(b.port());
    for (opt, data) in [
        (0x1234u32, &b"some option data"[..]),
        (0x7fff_ffff, &[][..]),
        (0, &[1, 2, 3][..]),
    ] {
        r.option(opt, data);
        let (o, typ, msg) = r.option_reply();
        assert_eq!(o, opt, "reply names another option");
        assert_eq!(
            typ,
            REP_ERR_UNSUP,
            "option {opt:#x}: reply type {typ:#x} ({})",
            String::from_utf8_lossy(&msg)
        );
    }
    // LIST still works, then GO.
    r.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (o, typ, data) = r.option_reply();
        assert_eq!(o, OPT_LIST);
        match typ {
            REP_SERVER => {
                let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8_lossy(&data[4..4 + n]).into_owned());
            }
            REP_ACK => break,
            t => panic!("LIST: reply type {t:#x}"),
        }
    }
    assert_eq!(names, vec![EXPORT.to_string()]);
    // GO to an unknown export is an error, and the handshake continues.
    let mut data = Vec::new();
    data.extend_from_slice(&5u32.to_be_bytes());
    data.extend_from_slice(b"nosuc");
    data.extend_from_slice(&0u16.to_be_bytes());
    r.option(OPT_GO, &data);
    let (_, typ, _) = r.option_reply();
    assert!(
        typ & 0x8000_0000 != 0,
        "GO to a missing export: type {typ:#x}"
    );
    let (size, _) = r.go(EXPORT);
    assert_eq!(size, DEMO_SIZE);
    let got = r
        .read(REF_OFFSET, REF_LEN as u32, 1)
        .expect("read after GO");
    assert_same("read after GO", &got, &reference());
    b.check("unknown options");
    b.finish();
}

#[test]
fn unknown_command_gets_einval_and_the_connection_stays_usable() {
    let mut b = Bench::new();
    let (mut r, _) = Raw::open(b.port());
    for (i, cmd) in [99u16, 0xffff, 8, 9, 6000].into_iter().enumerate() {
        let cookie = 100 + i as u64;
        r.request(cmd, 0, cookie, 0, 4096);
        assert_eq!(
            r.expect_reply(cookie, "unknown command"),
            EINVAL,
            "command {cmd}"
        );
        let got = r
            .read(REF_OFFSET, 4096, 200 + i as u64)
            .expect("read after");
        assert_same("read after", &got, &reference()[..4096]);
    }
    // Unknown flags on a known command: EINVAL, still usable.
    r.request(CMD_READ, 0x8000, 300, 0, 4096);
    assert_eq!(r.expect_reply(300, "read with an unknown flag"), EINVAL);
    assert!(r.read(0, 4096, 301).is_ok());
    // A flush with a length is invalid.
    r.request(CMD_FLUSH, 0, 302, 0, 4096);
    assert_eq!(r.expect_reply(302, "flush with a length"), EINVAL);
    assert_eq!(r.flush(303), 0);
    b.check("unknown commands");
    b.finish();
}

#[test]
fn requests_past_the_end_get_errors() {
    let mut b = Bench::new();
    let (mut r, size) = Raw::open(b.port());
    let cases: [(u16, u64, u32, &[u32]); 6] = [
        (CMD_READ, size, 4096, &[EINVAL]),
        (CMD_READ, size - 4096, 8192, &[EINVAL]),
        (CMD_READ, u64::MAX - 4095, 4096, &[EINVAL]),
        (CMD_WRITE, size, 4096, &[ENOSPC, EINVAL]),
        (CMD_WRITE, size - 4096, 8192, &[ENOSPC, EINVAL]),
        (CMD_WRITE, u64::MAX - 4095, 8192, &[ENOSPC, EINVAL]),
    ];
    for (i, (cmd, off, len, errs)) in cases.into_iter().enumerate() {
        let cookie = 1000 + i as u64;
        r.request(cmd, 0, cookie, off, len);
        if cmd == CMD_WRITE {
            // The payload follows the header whether or not the request is valid.
            r.send(&vec![0xeeu8; len as usize]);
        }
        let err = r.expect_reply(cookie, "request past the end");
        assert!(
            errs.contains(&err),
            "cmd {cmd} at {off} len {len}: errno {err}, want one of {errs:?}"
        );
        let got = r
            .read(REF_OFFSET, REF_LEN as u32, 2000 + i as u64)
            .expect("read after");
        assert_same("read after an error", &got, &reference());
    }
    // The tail block is valid, and nothing of the refused writes landed anywhere.
    assert_eq!(r.read(size - 4096, 4096, 3000), Ok(vec![0u8; 4096]));
    assert_eq!(r.read(0, 4096, 3001), Ok(vec![0u8; 4096]));
    b.check("requests past the end");
    b.finish();
}

#[test]
fn oversized_requests() {
    let mut b = Bench::new();
    // A read over the 32 MiB maximum: an error, the connection stays usable.
    let (mut r, _) = Raw::open(b.port());
    r.request(CMD_READ, 0, 1, 0, MAX_PAYLOAD + 4096);
    let err = r.expect_reply(1, "oversized read");
    assert!(
        [EINVAL, EOVERFLOW].contains(&err),
        "oversized read: errno {err}"
    );
    assert!(r.read(REF_OFFSET, 4096, 2).is_ok());

    // A write of exactly 32 MiB is accepted (servers SHOULD take up to 32 MiB).
    let big = random_bytes(MAX_PAYLOAD as usize, 32);
    assert_eq!(r.write(256 * MIB, &big, 3), 0, "32 MiB write");
    let got = r.read(256 * MIB, MAX_PAYLOAD, 4).expect("32 MiB read");
    assert_same("32 MiB write", &got, &big);

    // A write over the maximum: the spec lets the server answer with an error and/or close
    // the connection rather than read the data. Header only, no payload.
    r.request(CMD_WRITE, 0, 5, 0, MAX_PAYLOAD + 4096);
    let (end, got) = r.end();
    assert_eq!(
        end,
        End::Eof,
        "oversized write: reset instead of a clean close"
    );
    if !got.is_empty() {
        assert_eq!(got.len(), 16, "oversized write: {got:02x?}");
        assert_eq!(&got[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(got[4..8].try_into().unwrap());
        assert!(err != 0, "oversized write acknowledged");
        assert_eq!(&got[8..16], &5u64.to_be_bytes());
    }
    b.check("oversized write (header only)");

    // The same with the payload on its way: the daemon may close with data unread.
    let (mut r, _) = Raw::open(b.port());
    r.request(CMD_WRITE, 0, 6, 0, MAX_PAYLOAD + 4096);
    let data = vec![0xddu8; (MAX_PAYLOAD + 4096) as usize];
    let _ = r.s.write_all(&data);
    let _ = r.end();
    b.check("oversized write (with payload)");
    b.finish();
}

#[test]
fn garbage_in_transmission_disconnects() {
    let mut b = Bench::new();
    // A request with a bad magic: the stream is out of sync, the server closes.
    let (mut r, _) = Raw::open(b.port());
    r.send(b"this is not an NBD request!!");
    r.expect_clean_close("garbage request");
    b.check("garbage request");

    // Garbage after a valid request: its reply comes first, then the close.
    let (mut r, _) = Raw::open(b.port());
    r.request(CMD_READ, 0, 77, REF_OFFSET, 4096);
    r.send(&[0xa5; 28]);
    let (end, got) = r.end();
    assert_eq!(end, End::Eof);
    assert_eq!(
        got.len(),
        16 + 4096,
        "reply to the good request, then the close"
    );
    assert_eq!(&got[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&got[4..8], &0u32.to_be_bytes());
    assert_eq!(&got[8..16], &77u64.to_be_bytes());
    assert_same("read before garbage", &got[16..], &reference()[..4096]);
    b.check("garbage after a request");

    // Lots of random garbage (more than the server reads before giving up): closed, maybe
    // with a reset since unread bytes remain.
    let (mut r, _) = Raw::open(b.port());
    let _ = r.s.write_all(&random_bytes(1 << 20, 99));
    let _ = r.end();
    b.check("1 MiB of garbage");

    // Garbage right after the greeting, instead of the client flags.
    let mut r = Raw::connect(b.port());
    r.greeting();
    let _ = r.s.write_all(&random_bytes(64 << 10, 98));
    let _ = r.end();
    b.check("garbage handshake");
    b.finish();
}

#[test]
fn clients_that_vanish_mid_request_do_not_disturb_the_daemon() {
    let mut b = Bench::new();
    let port = b.port();

    // Header of a 1 MiB write over the reference data, half the payload, then gone. The
    // write was never complete nor acknowledged: the reference data stays.
    let (mut r, _) = Raw::open(port);
    r.request(CMD_WRITE, 0, 1, REF_OFFSET, MIB as u32);
    r.send(&vec![0x66u8; (MIB / 2) as usize]);
    drop(r);
    b.check("half a write payload");

    // Half a request header.
    let (mut r, _) = Raw::open(port);
    r.send(&REQUEST_MAGIC.to_be_bytes());
    r.send(&[0, 0, 0, 1, 0, 0]);
    drop(r);
    b.check("half a request header");

    // Many reads in flight, then gone without reading a reply (the daemon's sends fail).
    let (mut r, _) = Raw::open(port);
    for i in 0..64 {
        r.request(CMD_READ, 0, i, (i % 16) * MIB, MIB as u32);
    }
    drop(r);
    b.check("64 reads in flight");

    // Writes in flight (full payloads), then gone: the daemon finishes them quietly.
    let (mut r, _) = Raw::open(port);
    let data = vec![0x42u8; 256 << 10];
    for i in 0..32u64 {
        r.request(CMD_WRITE, 0, i, 768 * MIB + i * (256 << 10), 256 << 10);
        r.send(&data);
    }
    r.request(CMD_FLUSH, 0, 99, 0, 0);
    drop(r);
    b.check("writes in flight");

    // A shutdown(write) half-close mid-payload: the server sees EOF, must not wait forever.
    let (mut r, _) = Raw::open(port);
    r.request(CMD_WRITE, 0, 1, REF_OFFSET, 8192);
    r.send(&[0x55; 100]);
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    let (end, got) = r.end();
    assert_eq!(end, End::Eof);
    assert!(got.is_empty(), "reply to an incomplete write: {got:02x?}");
    b.check("half-close mid-payload");

    // Complete requests, then a half-close before reading the replies: everything accepted
    // is still answered, then the daemon closes.
    let (mut r, _) = Raw::open(port);
    let data = random_bytes(64 << 10, 5);
    r.request(CMD_WRITE, 0, 1, 900 * MIB, 64 << 10);
    r.send(&data);
    r.request(CMD_FLUSH, 0, 2, 0, 0);
    // (Replies may come in any order; the read is of other data, not racing the write.)
    r.request(CMD_READ, 0, 3, REF_OFFSET, 64 << 10);
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    let (end, got) = r.end();
    assert_eq!(end, End::Eof);
    assert_eq!(got.len(), 3 * 16 + (64 << 10), "replies after a half-close");
    let mut at = 0;
    let mut cookies = Vec::new();
    while at < got.len() {
        assert_eq!(&got[at..at + 4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let cookie = u64::from_be_bytes(got[at + 8..at + 16].try_into().unwrap());
        assert_eq!(
            &got[at + 4..at + 8],
            &0u32.to_be_bytes(),
            "request {cookie} failed"
        );
        cookies.push(cookie);
        at += 16;
        if cookie == 3 {
            let data = &got[at..at + (64 << 10)];
            assert_same("read after a half-close", data, &reference()[..64 << 10]);
            at += 64 << 10;
        }
    }
    cookies.sort();
    assert_eq!(cookies, [1, 2, 3]);
    let (mut r, _) = Raw::open(port);
    assert_eq!(
        r.read(900 * MIB, 64 << 10, 1),
        Ok(data),
        "write before a half-close"
    );
    b.check("half-close after complete requests");

    // A storm of such clients at once.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            std::thread::spawn(move || {
                let (mut r, _) = Raw::open(port);
                r.request(CMD_WRITE, 0, i, REF_OFFSET, MIB as u32);
                r.send(&vec![i as u8; (i as usize + 1) * 1000]);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    b.check("16 clients gone mid-write");
    b.finish();
}

#[test]
fn pipelined_errors_without_reading_replies_are_all_answered() {
    // 20,000 invalid requests sent without reading any reply: the daemon must apply
    // back-pressure (stop reading) instead of buffering replies without bound, and answer
    // every one once the client reads.
    let mut b = Bench::new();
    let (r, _) = Raw::open(b.port());
    let mut w = r.s.try_clone().unwrap();
    const N: u64 = 20_000;
    let writer = std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(28 * 1000);
        for i in 0..N {
            buf.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            buf.extend_from_slice(&0u16.to_be_bytes());
            buf.extend_from_slice(&99u16.to_be_bytes());
            buf.extend_from_slice(&i.to_be_bytes());
            buf.extend_from_slice(&0u64.to_be_bytes());
            buf.extend_from_slice(&4096u32.to_be_bytes());
            if buf.len() >= 28 * 1000 {
                w.write_all(&buf).expect("send invalid requests");
                buf.clear();
            }
        }
        w.write_all(&buf).expect("send invalid requests");
    });
    // Let the writer fill the pipes first.
    std::thread::sleep(Duration::from_millis(300));
    let mut r = r;
    for i in 0..N {
        let (err, cookie) = r.reply();
        assert_eq!(cookie, i, "replies out of order");
        assert_eq!(err, EINVAL);
    }
    writer.join().unwrap();
    assert!(r.read(REF_OFFSET, 4096, N).is_ok());
    b.check("pipelined errors");
    b.finish();
}

#[test]
fn read_only_export_refuses_raw_writes() {
    // The same over raw bytes: EPERM for a write, its payload skipped, the stream in sync.
    let cfg = r#"[leaf.m0]
kind = "mem"
size = "16MiB"
[volume.v]
table = "0 32768 linear m0 0"
[export.rw]
volume = "v"
read_only = false
[export.ro]
volume = "v"
read_only = true
"#;
    let (d, _cdir) = Daemon::with_config(cfg);
    let mut w = Raw::start(d.port);
    w.go("rw");
    assert_eq!(w.write(0, &[0x31; 4096], 1), 0);
    assert_eq!(w.flush(2), 0);
    let mut r = Raw::start(d.port);
    let (_, flags) = r.go("ro");
    assert_ne!(flags & 2, 0, "NBD_FLAG_READ_ONLY not set");
    assert_eq!(r.write(0, &[0x32; 4096], 3), EPERM);
    assert_eq!(r.read(0, 4096, 4), Ok(vec![0x31; 4096]));
}

#[test]
fn export_name_option_with_and_without_zeroes() {
    // The old way in: NBD_OPT_EXPORT_NAME, answered with size + flags (+ 124 zero bytes
    // unless NO_ZEROES was agreed); no error is possible, an unknown name ends the session.
    let mut b = Bench::new();
    for no_zeroes in [true, false] {
        let mut r = Raw::connect(b.port());
        r.greeting();
        let flags = FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 };
        r.send(&flags.to_be_bytes());
        r.option(1, EXPORT.as_bytes());
        assert_eq!(r.u64(), DEMO_SIZE, "EXPORT_NAME size");
        let tflags = r.u16();
        assert_ne!(tflags & 1, 0, "NBD_FLAG_HAS_FLAGS");
        if !no_zeroes {
            assert_eq!(r.recv(124), vec![0u8; 124]);
        }
        let got = r.read(REF_OFFSET, REF_LEN as u32, 1).expect("read");
        assert_same("read after EXPORT_NAME", &got, &reference());
    }
    // The empty name picks the default export (the only one).
    let mut r = Raw::start(b.port());
    r.option(1, b"");
    assert_eq!(r.u64(), DEMO_SIZE);
    r.u16();
    assert!(r.read(REF_OFFSET, 4096, 1).is_ok());
    // An unknown name: the session ends.
    let mut r = Raw::start(b.port());
    r.option(1, b"nosuch");
    r.expect_clean_close("EXPORT_NAME of a missing export");
    b.check("EXPORT_NAME");
    b.finish();
}

#[test]
fn many_connections_at_once() {
    // 64 connections, spread over the reactors, each writing and reading back its own
    // region while every 4th client vanishes mid-write.
    let mut b = Bench::new();
    let port = b.port();
    let threads: Vec<_> = (0..64u64)
        .map(|i| {
            std::thread::spawn(move || {
                let (mut r, _) = Raw::open(port);
                let off = 128 * MIB + i * MIB;
                let data = random_bytes(MIB as usize, 1000 + i);
                if i % 4 == 3 {
                    r.request(CMD_WRITE, 0, 1, off, MIB as u32);
                    r.send(&data[..(i as usize) * 1000]);
                    return;
                }
                for round in 0..4u64 {
                    assert_eq!(r.write(off, &data, 10 + round), 0, "client {i} write");
                    let got = r.read(off, MIB as u32, 20 + round).expect("read");
                    assert_same(&format!("client {i}"), &got, &data);
                }
                assert_eq!(r.flush(99), 0);
                r.request(CMD_DISC, 0, 100, 0, 0);
                r.expect_clean_close("after DISC");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client failed");
    }
    // The vanished ones wrote nothing.
    let (mut r, _) = Raw::open(port);
    for i in (3..64u64).step_by(4) {
        let got = r.read(128 * MIB + i * MIB, MIB as u32, i).expect("read");
        assert!(
            got.iter().all(|&x| x == 0),
            "client {i}'s incomplete write landed"
        );
    }
    b.check("64 connections");
    b.finish();
}
