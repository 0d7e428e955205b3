//! TLS for NBD, against real peers: `stackbd serve --tls ...` with libnbd (nbdinfo, nbdsh) and
//! qemu (qemu-img, qemu-io) for x509 and PSK; a plain-text client refused by a TLS-only server
//! with `NBD_REP_ERR_TLS_REQD` and nothing else; client-certificate verification; an export's
//! allow-list; and the nbd leaf as a TLS client to nbdkit, qemu-nbd and stackbd itself.
//!
//! Certificates are made per test with the `openssl` CLI (CA, server with SAN localhost and
//! 127.0.0.1, client CN=alice), laid out as libnbd, qemu and nbdkit expect them.

mod common;

use common::*;
use stackbd_core::{Engine, ReactorConfig, Status};
use stackbd_leaves::nbd_client::{NbdLeaf, NbdOptions};
use stackbd_nbd::{
    encode_export_name, encode_export_request, encode_option, ClientFlags, Opt, OptionReplyHeader,
    RepError, ReplyType, ServerGreeting,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A CA, a server certificate and a client certificate (CN=alice) in `dir` (ca-cert.pem,
/// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem).
fn pki(dir: &Path) {
    let openssl = require_tool("openssl");
    let script = r#"set -e
ec() { "$OPENSSL" ecparam -name prime256v1 -genkey -noout -out "$1"; }
ec ca-key.pem
"$OPENSSL" req -new -x509 -key ca-key.pem -out ca-cert.pem -days 30 -subj "/CN=stackbd test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
for who in server client; do
  ec $who-key.pem
  if [ $who = server ]; then
    ext="subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"; cn=localhost
  else
    ext="extendedKeyUsage=clientAuth"; cn=alice
  fi
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n%s\n' "$ext" > $who.ext
  "$OPENSSL" req -new -key $who-key.pem -subj "/CN=$cn" -out $who.csr
  "$OPENSSL" x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
    -extfile $who.ext -out $who-cert.pem
done
"#;
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(script)
        .env("OPENSSL", openssl)
        .current_dir(dir);
    run_ok(&mut c, QUICK);
}

/// A directory with only the CA (a client without a certificate of its own).
fn ca_only(pki: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
}

/// `keys.psk` in `dir` with users alice and bob.
fn psk(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("keys.psk");
    std::fs::write(
        &p,
        "alice:8c0d6a1f3bb2c8e16b30d4f7e6a2a9c1d5f00e4b7a6c3d2e1f0a9b8c7d6e5f41\n\
         bob:0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0\n",
    )
    .unwrap();
    p
}

fn x509_daemon(pki: &Path, more: &[&str]) -> Daemon {
    let p = |f: &str| pki.join(f).display().to_string();
    let mut args = vec![
        "--tls".to_string(),
        "require".into(),
        "--tls-cert".into(),
        p("server-cert.pem"),
        "--tls-key".into(),
        p("server-key.pem"),
        "--tls-ca".into(),
        p("ca-cert.pem"),
    ];
    args.extend(more.iter().map(|s| s.to_string()));
    Daemon::start(Opts {
        unix: true,
        args,
        ..Opts::default()
    })
}

fn psk_daemon(keys: &Path, more: &[&str]) -> Daemon {
    let mut args = vec!["--tls-psk".to_string(), keys.display().to_string()];
    args.extend(more.iter().map(|s| s.to_string()));
    Daemon::start(Opts {
        args,
        ..Opts::default()
    })
}

fn nbdinfo(uri: &str) -> Out {
    let mut c = tool("nbdinfo");
    c.arg(uri);
    run(&mut c, QUICK)
}

fn qemu_img_info(object: &str, d: &Daemon) -> Out {
    let mut c = tool("qemu-img");
    c.args(["info", "--object", object, "--image-opts"])
        .arg(format!(
            "driver=nbd,host=127.0.0.1,port={},export=demo,tls-creds=tls0",
            d.port
        ));
    run(&mut c, QUICK)
}

#[test]
fn x509_with_libnbd_and_qemu() {
    let t = tempdir();
    pki(t.path());
    let d = x509_daemon(t.path(), &[]);
    let dir = t.path().display();
    let out = nbdinfo(&format!(
        "nbds://127.0.0.1:{}/demo?tls-certificates={dir}",
        d.port
    ));
    if !out.ok() || !out.stdout.contains("with TLS") || !out.stdout.contains("1073741824") {
        out.fail("nbdinfo over TLS");
    }
    // Data both ways through nbdsh, and TLS really negotiated.
    let script = format!(
        "h.set_tls(nbd.TLS_REQUIRE)\n\
         h.set_tls_certificates('{dir}')\n\
         h.set_export_name('demo')\n\
         h.connect_tcp('127.0.0.1', '{}')\n\
         assert h.get_tls_negotiated()\n\
         buf = bytes(range(256)) * 1024\n\
         h.pwrite(buf, 1048576)\n\
         h.flush()\n\
         assert h.pread(len(buf), 1048576) == buf\n\
         h.shutdown()\n",
        d.port
    );
    nbdsh_run(&script, QUICK);
    // qemu: the bytes nbdsh wrote, read back, then a write and read of its own.
    let obj = format!("tls-creds-x509,id=tls0,dir={dir},endpoint=client");
    let out = qemu_img_info(&obj, &d);
    if !out.ok() || !out.stdout.contains("1073741824") {
        out.fail("qemu-img info over TLS");
    }
    let mut c = tool("qemu-io");
    c.args(["--object", &obj, "--image-opts"])
        .arg(format!(
            "driver=nbd,host=127.0.0.1,port={},export=demo,tls-creds=tls0",
            d.port
        ))
        .args(["-c", "write -P 0x5a 4M 1M", "-c", "read -P 0x5a 4M 1M"])
        .args(["-c", "read -v 1048576 16"]);
    let out = run_ok(&mut c, QUICK);
    if out.stdout.contains("failed") || !out.stdout.contains("00 01 02 03 04 05 06 07") {
        out.fail("qemu-io over TLS");
    }
}

#[test]
fn psk_with_libnbd_and_qemu() {
    let t = tempdir();
    let keys = psk(&t.path().join("psk"));
    let d = psk_daemon(&keys, &[]);
    let out = nbdinfo(&format!(
        "nbds://alice@127.0.0.1:{}/demo?tls-psk-file={}",
        d.port,
        keys.display()
    ));
    if !out.ok() || !out.stdout.contains("with TLS") {
        out.fail("nbdinfo over TLS-PSK");
    }
    let obj = format!(
        "tls-creds-psk,id=tls0,dir={},username=bob,endpoint=client",
        t.path().join("psk").display()
    );
    let out = qemu_img_info(&obj, &d);
    if !out.ok() || !out.stdout.contains("1073741824") {
        out.fail("qemu-img info over TLS-PSK");
    }
    // A key the server does not have: refused.
    let wrong = t.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::write(
        wrong.join("keys.psk"),
        "alice:00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    let out = nbdinfo(&format!(
        "nbds://alice@127.0.0.1:{}/demo?tls-psk-file={}",
        d.port,
        wrong.join("keys.psk").display()
    ));
    assert!(!out.ok(), "a wrong key connects:\n{}", out.stdout);
}

/// Reads one option reply (header and data) from a plain-text socket.
fn opt_reply(s: &mut TcpStream) -> (OptionReplyHeader, Vec<u8>) {
    let mut h = [0u8; OptionReplyHeader::SIZE];
    s.read_exact(&mut h).expect("an option reply");
    let (hdr, _) = OptionReplyHeader::decode(&h, 1 << 20).unwrap().unwrap();
    let mut data = vec![0u8; hdr.length as usize];
    s.read_exact(&mut data).unwrap();
    (hdr, data)
}

/// After the greeting and the client flags, on a plain-text connection.
fn plain(d: &Daemon) -> TcpStream {
    let mut s = TcpStream::connect(d.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; ServerGreeting::SIZE];
    s.read_exact(&mut g).unwrap();
    let flags = ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES;
    s.write_all(&flags.to_bytes()).unwrap();
    s
}

/// True when the server closed `s` without sending anything more.
fn closed_silently(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
}

#[test]
fn a_plain_text_client_gets_tls_reqd_and_nothing_else() {
    let t = tempdir();
    pki(t.path());
    let mut d = x509_daemon(t.path(), &[]);
    // Raw: every option but STARTTLS gets TLS_REQD, with no export information; EXPORT_NAME
    // (which cannot be refused softly) closes the connection with nothing sent.
    let mut s = plain(&d);
    for opt in [Opt::List, Opt::StructuredReply] {
        let mut b = Vec::new();
        encode_option(&mut b, opt, &[]).unwrap();
        s.write_all(&b).unwrap();
        let (h, _) = opt_reply(&mut s);
        assert_eq!(h.reply, ReplyType::Error(RepError::TlsReqd), "{opt:?}");
    }
    let mut b = Vec::new();
    encode_export_request(&mut b, Opt::Go, "demo", &[]).unwrap();
    s.write_all(&b).unwrap();
    let (h, _) = opt_reply(&mut s);
    assert_eq!(h.option, Opt::Go);
    assert_eq!(
        h.reply,
        ReplyType::Error(RepError::TlsReqd),
        "GO: no INFO first"
    );
    let mut b = Vec::new();
    encode_export_name(&mut b, "demo").unwrap();
    s.write_all(&b).unwrap();
    assert!(closed_silently(&mut s), "EXPORT_NAME must end the session");
    // STARTTLS acknowledged, then plain-text garbage instead of a ClientHello: dropped.
    let mut s = plain(&d);
    let mut b = Vec::new();
    encode_option(&mut b, Opt::StartTls, &[]).unwrap();
    s.write_all(&b).unwrap();
    let (h, _) = opt_reply(&mut s);
    assert_eq!((h.option, h.reply), (Opt::StartTls, ReplyType::Ack));
    s.write_all(&[0x42; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.len() < 64, "a TLS alert at most, no NBD: {rest:?}");
    // The tools: libnbd and qemu say TLS is required and get no data.
    let out = nbdinfo(&d.uri("demo"));
    assert!(
        !out.ok(),
        "nbdinfo in plain text succeeded:\n{}",
        out.stdout
    );
    let mut c = tool("qemu-img");
    c.args(["info", &d.uri("demo")]);
    let out = run(&mut c, QUICK);
    assert!(
        !out.ok() && out.stderr.contains("TLS negotiation required"),
        "qemu-img in plain text:\n{}{}",
        out.stdout,
        out.stderr
    );
    // The unix socket is TLS-only too.
    let sock = d.socket.clone().unwrap();
    let mut u = UnixStream::connect(&sock).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; ServerGreeting::SIZE];
    u.read_exact(&mut g).unwrap();
    u.write_all(&ClientFlags::FIXED_NEWSTYLE.to_bytes())
        .unwrap();
    let mut b = Vec::new();
    encode_export_request(&mut b, Opt::Info, "demo", &[]).unwrap();
    u.write_all(&b).unwrap();
    let mut h = [0u8; OptionReplyHeader::SIZE];
    u.read_exact(&mut h).unwrap();
    let (h, _) = OptionReplyHeader::decode(&h, 1 << 20).unwrap().unwrap();
    assert_eq!(h.reply, ReplyType::Error(RepError::TlsReqd));
    // And the daemon still serves TLS clients.
    d.assert_alive();
    let out = nbdinfo(&format!(
        "nbds://127.0.0.1:{}/demo?tls-certificates={}",
        d.port,
        t.path().display()
    ));
    if !out.ok() {
        out.fail("TLS client after the plain-text ones");
    }
}

#[test]
fn verify_peer_refuses_a_client_without_a_certificate() {
    let t = tempdir();
    pki(t.path());
    let d = x509_daemon(t.path(), &["--tls-verify-peer"]);
    let anon = t.path().join("anon");
    ca_only(t.path(), &anon);
    let out = nbdinfo(&format!(
        "nbds://127.0.0.1:{}/demo?tls-certificates={}",
        d.port,
        anon.display()
    ));
    assert!(
        !out.ok(),
        "no client certificate, yet connected:\n{}",
        out.stdout
    );
    let out = nbdinfo(&format!(
        "nbds://127.0.0.1:{}/demo?tls-certificates={}",
        d.port,
        t.path().display()
    ));
    if !out.ok() {
        out.fail("a client with a certificate from the CA");
    }
}

#[test]
fn an_allow_list_lets_only_its_identities_in() {
    let t = tempdir();
    let keys = psk(&t.path().join("psk"));
    let d = psk_daemon(&keys, &["--tls-allow", "demo=alice"]);
    let uri = |user: &str, opt: &str| {
        format!(
            "nbds://{user}@127.0.0.1:{}/demo?tls-psk-file={}{opt}",
            d.port,
            keys.display()
        )
    };
    let out = nbdinfo(&uri("alice", ""));
    if !out.ok() {
        out.fail("alice is on the list");
    }
    let out = nbdinfo(&uri("bob", ""));
    assert!(!out.ok(), "bob is not on the list:\n{}", out.stdout);
    let mut c = tool("nbdinfo");
    c.arg("--list").arg(uri("bob", ""));
    let out = run(&mut c, QUICK);
    assert!(
        !out.stdout.contains("export=\"demo\""),
        "bob sees the export:\n{}",
        out.stdout
    );
    // x509: the client certificate's CN is the identity.
    let p = tempdir();
    pki(p.path());
    let d = x509_daemon(p.path(), &["--tls-allow", "demo=alice"]);
    let anon = p.path().join("anon");
    ca_only(p.path(), &anon);
    let uri = |dir: &Path| {
        format!(
            "nbds://127.0.0.1:{}/demo?tls-certificates={}",
            d.port,
            dir.display()
        )
    };
    assert!(!nbdinfo(&uri(&anon)).ok(), "no certificate, no identity");
    let out = nbdinfo(&uri(p.path()));
    if !out.ok() {
        out.fail("CN=alice is on the list");
    }
}

/// Writes and reads back through a volume on the nbd leaf at `uri`.
fn through_leaf(uri: &str) {
    let leaf = NbdLeaf::connect(
        uri,
        NbdOptions {
            timeout: Duration::from_secs(20),
            ..NbdOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    e.add_leaf("remote", Arc::new(leaf)).unwrap();
    let v = e.create("v", Some("0 8192 linear remote 0")).unwrap();
    let data: Vec<u8> = (0..512 * 1024).map(|i| (i % 253) as u8).collect();
    assert_eq!(e.write_at(v, 8, &data), Status::Ok, "{uri}");
    assert_eq!(e.flush(v), Status::Ok);
    let mut back = vec![0u8; data.len()];
    assert_eq!(e.read_at(v, 8, &mut back), Status::Ok, "{uri}");
    assert!(back == data, "{uri}: read back what was written");
}

fn wait_socket(bg: &mut Bg, sock: &Path) {
    let start = Instant::now();
    while UnixStream::connect(sock).is_err() {
        if let Some(st) = bg.try_exit() {
            panic!("{} exited ({st}):\n{}", bg.what, bg.output());
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{}", bg.output());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_nbd_leaf_speaks_tls_to_nbdkit_qemu_nbd_and_stackbd() {
    let t = tempdir();
    let dir = t.path();
    pki(dir);
    let keys = psk(&dir.join("psk"));
    let d = dir.display();
    // nbdkit, x509 (verifying our client certificate too).
    let s = NbdServer::nbdkit(
        "x509",
        dir,
        &[
            "--tls=require",
            &format!("--tls-certificates={d}"),
            "--tls-verify-peer",
            "memory",
            "16M",
        ],
    );
    through_leaf(&format!(
        "nbds+unix:///?socket={}&tls-certificates={d}",
        s.sock.display()
    ));
    // A plain-text leaf is refused by it.
    let e = NbdLeaf::connect(&s.uri(), NbdOptions::default()).unwrap_err();
    assert!(e.to_string().contains("TlsReqd"), "{e}");
    // nbdkit, PSK.
    let s = NbdServer::nbdkit(
        "psk",
        dir,
        &[
            "--tls=require",
            &format!("--tls-psk={}", keys.display()),
            "memory",
            "16M",
        ],
    );
    through_leaf(&format!(
        "nbds+unix:///?socket={}&tls-psk-file={}&tls-username=alice",
        s.sock.display(),
        keys.display()
    ));
    // qemu-nbd, x509 with peer verification.
    let img = dir.join("q.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let qsock = dir.join("q.sock");
    let mut c = tool("qemu-nbd");
    c.args(["--object"])
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={d},endpoint=server,verify-peer=on"
        ))
        .args([
            "--tls-creds",
            "tls0",
            "--persistent",
            "--shared=4",
            "-f",
            "raw",
            "-x",
            "q",
        ])
        .arg("-k")
        .arg(&qsock)
        .arg(&img);
    let mut q = Bg::start(&mut c, &dir.join("qemu-nbd.log"));
    wait_socket(&mut q, &qsock);
    through_leaf(&format!(
        "nbds+unix:///q?socket={}&tls-certificates={d}",
        qsock.display()
    ));
    // stackbd itself over TCP: the server's name (127.0.0.1) is checked against its SAN.
    let sd = x509_daemon(dir, &[]);
    through_leaf(&format!(
        "nbds://127.0.0.1:{}/demo?tls-certificates={d}",
        sd.port
    ));
    // A server certificate from another CA: refused.
    let other = tempdir();
    pki(other.path());
    let e = NbdLeaf::connect(
        &format!(
            "nbds://127.0.0.1:{}/demo?tls-certificates={}",
            sd.port,
            other.path().display()
        ),
        NbdOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("TLS handshake failed"), "{e}");
}
