//! raid1 across hosts, end to end: two nbdkit servers (memory plugin), each in its own network
//! namespace reached over a veth pair on a private /30, are the two legs (metadata and data on
//! each, split by `linear` volumes) of a raid1 volume in `stackbd serve`, exported on loopback.
//! fio (`--ioengine=nbd`, `--verify=crc32c`) writes through it while one link is cut
//! (`ip link set ... down`) and later restored: fio sees no error and verifies clean, status
//! shows the leg `D`, then `a` while it resyncs, then `A`, the resync copies exactly the regions
//! its bitmap marked while the leg was away (far fewer than the whole leg), and the legs are
//! byte-identical (`cmp` of both legs copied out with nbdcopy).
//!
//! Needs root (network namespaces), `ip`, nbdkit, fio, nbdcopy, cmp. Only the namespaces and
//! links this test creates are touched; they are removed on drop.

mod common;

use common::{run, run_ok, tempdir, tool, Bg, Daemon, QUICK, SLOW};
use serde_json::json;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const DATA: u64 = 64 * MIB;
const DATA_SECTORS: u64 = DATA / 512;
const META_SECTORS: u64 = 2048;
const REGION: u64 = 2048; // 1 MiB
const PORT: u16 = 10809;

/// A namespace with one end of a veth pair; the other end in the root namespace.
struct Netns {
    ns: String,
    host_if: String,
    host_ip: String,
    peer_ip: String,
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args), QUICK);
}

impl Netns {
    fn new(i: u32) -> Netns {
        let tag = std::process::id() % 100_000;
        let ns = format!("sbdraid{tag}n{i}");
        let host_if = format!("sbr{tag}h{i}");
        let peer_if = format!("sbr{tag}p{i}");
        let host_ip = format!("10.213.{}.1", 10 + i);
        let peer_ip = format!("10.213.{}.2", 10 + i);
        let n = Netns {
            ns: ns.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            peer_ip: peer_ip.clone(),
        };
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", &ns]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{peer_ip}/30"),
            "dev",
            &peer_if,
        ]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", &peer_if, "up"]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        n
    }

    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
        if up {
            // Link-up drops the address's route until the link is ready; make sure it is there.
            let _ = run(
                Command::new("ip").args([
                    "addr",
                    "add",
                    &format!("{}/30", self.host_ip),
                    "dev",
                    &self.host_if,
                ]),
                QUICK,
            );
        }
    }

    /// nbdkit's memory plugin in this namespace, on the peer address.
    fn serve(&self, dir: &std::path::Path) -> Bg {
        let size = format!("{}", DATA + META_SECTORS * 512);
        let log = dir.join(format!("{}.log", self.ns));
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.ns,
            "nbdkit",
            "-f",
            "--exit-with-parent",
            "-i",
        ])
        .arg(&self.peer_ip)
        .args(["-p", &PORT.to_string(), "memory", &size]);
        let bg = Bg::start(&mut c, &log);
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((self.peer_ip.as_str(), PORT)).is_err() {
            assert!(Instant::now() < end, "nbdkit in {} did not listen", self.ns);
            std::thread::sleep(Duration::from_millis(20));
        }
        bg
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn status(d: &Daemon) -> String {
    let r = d.control(&json!({"v": 1, "cmd": "status", "name": "r"}));
    r["status"]
        .as_str()
        .unwrap_or_else(|| panic!("status: {r}"))
        .trim()
        .to_string()
}

fn message(d: &Daemon, m: &str) -> serde_json::Value {
    let argv: Vec<&str> = m.split_whitespace().collect();
    d.control(&json!({"v": 1, "cmd": "message", "name": "r", "sector": 0, "argv": argv}))
}

fn stat(d: &Daemon, name: &str) -> u64 {
    let r = message(d, "stats");
    let s = r["reply"]
        .as_str()
        .unwrap_or_else(|| panic!("stats: {r}"))
        .to_string();
    let w: Vec<&str> = s.split_whitespace().collect();
    let i = w.iter().position(|x| *x == name).unwrap();
    w[i + 1].parse().unwrap()
}

/// The daemon's raid1 log lines (for failure messages).
fn raid_log(d: &Daemon) -> String {
    d.log_text()
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .join("\n")
}

fn health(s: &str) -> String {
    s.split_whitespace().nth(5).unwrap_or("").to_string()
}

#[test]
fn a_leg_on_another_host_is_lost_and_comes_back_under_fio() {
    for t in ["ip", "nbdkit", "fio", "nbdcopy", "cmp"] {
        common::require_tool(t);
    }
    let dir = tempdir();
    let hosts = [Netns::new(1), Netns::new(2)];
    let _servers: Vec<Bg> = hosts.iter().map(|h| h.serve(dir.path())).collect();
    let mut cfg = String::new();
    for (i, h) in hosts.iter().enumerate() {
        cfg.push_str(&format!(
            "[leaf.n{i}]\nkind = \"nbd\"\nuri = \"nbd://{}:{PORT}/\"\ntimeout = \"3s\"\n",
            h.peer_ip
        ));
        cfg.push_str(&format!(
            "[volume.meta{i}]\ntable = \"0 {META_SECTORS} linear n{i} 0\"\n\
             [volume.d{i}]\ntable = \"0 {DATA_SECTORS} linear n{i} {META_SECTORS}\"\n\
             [export.d{i}]\nvolume = \"d{i}\"\nread_only = true\n"
        ));
    }
    cfg.push_str(&format!(
        "[volume.r]\ntable = \"0 {DATA_SECTORS} raid raid1 6 0 nosync region_size {REGION} \
         daemon_sleep 200 2 meta0 d0 meta1 d1\"\n[export.r]\nvolume = \"r\"\nread_only = false\n"
    ));
    let (d, _cdir) = Daemon::with_config(&cfg);
    let d = Arc::new(d);
    assert!(status(&d).contains(" AA "), "{}", status(&d));

    // Watch leg 1's health character.
    let seen = Arc::new(Mutex::new(Vec::<char>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (d, seen, stop) = (d.clone(), seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                let h = health(&status(&d));
                if let Some(c) = h.chars().nth(1) {
                    let mut v = seen.lock().unwrap();
                    if v.last() != Some(&c) {
                        v.push(c);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let report = dir.path().join("fio.json");
    let mut fio = tool("fio");
    fio.args([
        "--name=raid",
        "--ioengine=nbd",
        &format!("--uri=nbd://127.0.0.1:{}/r", d.port),
        "--rw=write",
        "--bs=64k",
        "--size=48M",
        "--rate=2m",
        "--iodepth=4",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
        &format!("--output={}", report.display()),
    ]);
    let fio_log = dir.path().join("fio.out");
    let mut fio = Bg::start(&mut fio, &fio_log);

    std::thread::sleep(Duration::from_secs(2));
    hosts[1].link(false);
    let cut_at = Instant::now();
    let end = Instant::now() + Duration::from_secs(20);
    while health(&status(&d)) != "AD" {
        assert!(
            Instant::now() < end,
            "leg 1 never went D: {}\n{}",
            status(&d),
            raid_log(&d)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2));
    hosts[1].link(true);
    // The nbd leaf reconnects on its own; then ask for the leg back (retrying while the leaf
    // still reconnects and the leg fails again).
    std::thread::sleep(Duration::from_millis(1500));
    let away = cut_at.elapsed();
    let to_copy = stat(&d, "dirty_regions");
    let copied0 = stat(&d, "copied_regions");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let r = message(&d, "recover");
        assert!(r.get("error").is_none(), "recover: {r}");
        let t = Instant::now();
        while Instant::now() < t + Duration::from_secs(3) && health(&status(&d)) != "AA" {
            std::thread::sleep(Duration::from_millis(20));
        }
        if health(&status(&d)) == "AA" {
            break;
        }
        assert!(
            Instant::now() < end,
            "leg 1 never came back: {}\n{}",
            status(&d),
            raid_log(&d)
        );
    }
    let st = fio.wait(SLOW);
    stop.store(true, SeqCst);
    watcher.join().unwrap();
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let out = std::fs::read_to_string(&fio_log).unwrap_or_default();
    assert!(st.success(), "fio failed: {out}\n{text}");
    let j: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    for job in j["jobs"].as_array().unwrap() {
        assert_eq!(job["error"].as_u64(), Some(0), "fio error: {job}");
    }
    let seen: String = seen.lock().unwrap().iter().collect();
    assert!(
        seen.contains("DaA"),
        "leg 1 went through {seen}\n{}",
        raid_log(&d)
    );
    let copied = stat(&d, "copied_regions") - copied0;
    let total = DATA_SECTORS / REGION;
    // At 2 MiB/s sequential, 1 MiB regions: about 2 regions a second while away, never the
    // whole leg.
    let by_rate = (away.as_secs_f64() + 1.0) * 2.0 + 4.0;
    eprintln!("away {away:?}, regions to copy {to_copy}, copied {copied} of {total}, health {seen}, status {}", status(&d));
    assert!(
        to_copy > 0 && (to_copy as f64) <= by_rate,
        "to copy {to_copy} (rate bound {by_rate})"
    );
    assert!(
        copied <= to_copy + 1 && copied > 0 && copied < total / 2,
        "copied {copied}, to copy {to_copy}"
    );
    // The legs are byte-identical.
    let mut files = Vec::new();
    for i in 0..2 {
        let f = dir.path().join(format!("leg{i}.img"));
        run_ok(
            Command::new("nbdcopy")
                .arg(format!("nbd://127.0.0.1:{}/d{i}", d.port))
                .arg(&f),
            SLOW,
        );
        files.push(f);
    }
    run_ok(Command::new("cmp").arg(&files[0]).arg(&files[1]), SLOW);
    assert!(
        status(&d).ends_with(&format!("AA {DATA_SECTORS}/{DATA_SECTORS} idle 0 0 -")),
        "{}",
        status(&d)
    );
}
