//! `stackbd serve` against real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh (libnbd
//! from Python), fio's nbd engine, and nbdfuse + a loop device + ext4. Every tool is required:
//! a missing one fails its test (`scripts/test.sh` installs them).
//!
//! The demo export is 1 GiB striped over two mem leaves with 64 KiB chunks (128 sectors), so
//! offsets like 60 KiB and lengths like 200 KiB cross chunk (and leaf) boundaries.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// Runs qemu-io commands (`-c` each) against `uri` in one process; all must succeed.
fn qemu_io(uri: &str, cmds: &[&str]) -> Out {
    qemu_io_opts(&[], uri, cmds)
}

/// [`qemu_io`] with more options (`-r` for a read-only export).
fn qemu_io_opts(opts: &[&str], uri: &str, cmds: &[&str]) -> Out {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]).args(opts);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    let out = run(&mut c, QUICK);
    // qemu-io exits 1 if any command failed, and says why on stdout.
    if !out.ok() || out.stdout.contains("failed") || out.stderr.contains("failed") {
        out.fail("qemu-io command failed");
    }
    out
}

#[test]
fn qemu_io_patterns_across_stripe_chunks() {
    let d = Daemon::demo();
    let uri = d.uri("demo");
    // One connection: write, read back, zero, discard, flush, all at odd offsets crossing the
    // 64 KiB stripe chunks.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 60k 200k",
            "read -P 0xab 60k 200k",
            "read -P 0 0 60k",
            "read -P 0 260k 64k",
            "write -z 100k 70k",
            "read -P 0 100k 70k",
            "read -P 0xab 60k 40k",
            "read -P 0xab 170k 90k",
            "write -P 0xcd 1020k 132k",
            "discard 1030k 100k",
            "read -P 0xcd 1020k 10k",
            "read -P 0 1030k 100k",
            "read -P 0xcd 1130k 22k",
            "flush",
        ],
    );
    // A new connection sees what the first one left.
    qemu_io(
        &uri,
        &[
            "read -P 0xab 60k 40k",
            "read -P 0 100k 70k",
            "read -P 0xab 170k 90k",
            "read -P 0 260k 4k",
            "read -P 0xcd 1020k 10k",
            "read -P 0 1030k 100k",
            "read -P 0xcd 1130k 22k",
        ],
    );
    // Writes straddling the end of the export and a whole-chunk-multiple region at the end.
    qemu_io(
        &uri,
        &[
            "write -P 0x5e 1048572k 4k",
            "read -P 0x5e 1048572k 4k",
            "write -P 0x11 1048000k 576k",
            "read -P 0x11 1048000k 576k",
            "discard 1048000k 576k",
            "read -P 0 1048000k 576k",
            "flush",
        ],
    );
    // A read that is supposed to fail really fails (the check above means something).
    let out = run(
        tool("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x77 60k 4k"])
            .arg(&uri),
        QUICK,
    );
    assert!(
        !out.ok() && out.stdout.contains("Pattern verification failed"),
        "a wrong pattern was not reported: {out:?}"
    );
}

#[test]
fn qemu_io_over_unix_socket() {
    let d = Daemon::demo();
    let unix = d.unix_uri("demo");
    qemu_io(
        &unix,
        &[
            "write -P 0x3c 60k 200k",
            "read -P 0x3c 60k 200k",
            "write -z 124k 8k",
            "read -P 0 124k 8k",
            "discard 192k 64k",
            "read -P 0 192k 64k",
            "flush",
        ],
    );
    // The same export over TCP sees it.
    qemu_io(
        &d.uri("demo"),
        &[
            "read -P 0x3c 60k 64k",
            "read -P 0 124k 8k",
            "read -P 0x3c 132k 60k",
            "read -P 0 192k 64k",
            "read -P 0x3c 256k 4k",
        ],
    );
    // nbdinfo over the unix socket, too.
    let out = run_ok(tool("nbdinfo").arg("--size").arg(&unix), QUICK);
    assert_eq!(out.stdout.trim(), DEMO_SIZE.to_string());
    // An empty export name picks the default export (the demo).
    let out = run_ok(
        tool("nbdinfo")
            .arg("--size")
            .arg(format!("nbd://127.0.0.1:{}", d.port)),
        QUICK,
    );
    assert_eq!(out.stdout.trim(), DEMO_SIZE.to_string());
    qemu_io(
        &format!("nbd://127.0.0.1:{}", d.port),
        &["read -P 0x3c 60k 64k"],
    );
}

#[test]
fn qemu_img_convert_roundtrip_and_compare() {
    let (d, cdir) = Daemon::with_config(&striped_config("img", 64));
    let uri = d.uri("img");
    let src = cdir.path().join("src.raw");
    let back = cdir.path().join("back.raw");
    let mut data = random_bytes((64 * MIB) as usize, 0x5eed);
    // A zero run in the middle: qemu-img writes it as zeroes (WRITE_ZEROES), over old data.
    data[(8 * MIB) as usize..(9 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    // Old data everywhere first, so the zero run must really be written.
    qemu_io(
        &uri,
        &["write -P 0xcc 0 32M", "write -P 0xcc 32M 32M", "flush"],
    );
    run_ok(
        tool("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
        SLOW,
    );
    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
        SLOW,
    );
    run_ok(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&back),
        SLOW,
    );
    // And straight against the export.
    let out = run_ok(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        SLOW,
    );
    assert!(out.stdout.contains("identical"), "{out:?}");
    assert_same("qemu-img round trip", &std::fs::read(&back).unwrap(), &data);
    // A difference is found (the comparison is real).
    qemu_io(&uri, &["write -P 0x01 40M 4k"]);
    let out = run(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        SLOW,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare missed a difference: {out:?}"
    );
}

/// Two exports of one volume, one of them read-only.
fn two_exports_config() -> String {
    r#"[leaf.m0]
kind = "mem"
size = "32MiB"
[leaf.m1]
kind = "mem"
size = "32MiB"
[volume.stripe]
table = "0 131072 striped 2 128 m0 0 m1 0"
[volume.disk]
table = "0 131072 linear stripe 0"
[export.disk]
volume = "disk"
read_only = false
[export.ro]
volume = "disk"
read_only = true
"#
    .to_string()
}

/// `nbdinfo --map` lines as (offset, length, type, description).
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32, String)> {
    let out = run_ok(tool("nbdinfo").arg("--map").arg(uri), QUICK);
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 4, "odd nbdinfo --map line {l:?}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3..].join(" "),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_list_size_and_map() {
    let (d, _cdir) = Daemon::with_config(&two_exports_config());
    let size = 64 * MIB;

    // --list: both exports, with their descriptions.
    let out = run_ok(tool("nbdinfo").arg("--list").arg(d.uri("")), QUICK);
    for name in ["disk", "ro"] {
        assert!(
            out.stdout.contains(&format!("export=\"{name}\":")),
            "--list misses export {name}:\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains("description: stackbd volume disk"),
        "--list has no description:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("using structured packets"),
        "{}",
        out.stdout
    );
    let out = run_ok(
        tool("nbdinfo").args(["--list", "--json"]).arg(d.uri("")),
        QUICK,
    );
    let j: serde_json::Value = serde_json::from_str(&out.stdout).expect("nbdinfo --json");
    let exports = j["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 2, "{j}");
    for e in exports {
        let name = e["export-name"].as_str().unwrap();
        assert_eq!(e["export-size"].as_u64(), Some(size), "{e}");
        assert_eq!(e["description"], "stackbd volume disk", "{e}");
        assert_eq!(e["is_read_only"].as_bool(), Some(name == "ro"), "{e}");
        assert_eq!(e["can_trim"].as_bool(), Some(name != "ro"), "{e}");
        assert_eq!(e["can_multi_conn"].as_bool(), Some(true), "{e}");
        assert_eq!(e["block_size_minimum"].as_u64(), Some(512), "{e}");
        assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB), "{e}");
        let ctx = e["contexts"].as_array().expect("contexts");
        assert!(ctx.iter().any(|c| c == "base:allocation"), "{e}");
    }

    // --size: exact.
    let out = run_ok(tool("nbdinfo").arg("--size").arg(d.uri("disk")), QUICK);
    assert_eq!(out.stdout.trim(), size.to_string());
    let out = run_ok(tool("nbdinfo").arg("--size").arg(d.uri("ro")), QUICK);
    assert_eq!(out.stdout.trim(), size.to_string());

    // --map of a fresh export: one hole, zero extent.
    assert_eq!(
        nbdinfo_map(&d.uri("disk")),
        vec![(0, size, 3, "hole,zero".to_string())]
    );

    // Write 1 MiB at 60 KiB (crossing chunks), trim 256 KiB of it in the middle.
    qemu_io(
        &d.uri("disk"),
        &["write -P 0x42 60k 1M", "discard 316k 256k", "flush"],
    );
    let want = vec![
        (0, 60 * KIB, 3, "hole,zero".to_string()),
        (60 * KIB, 256 * KIB, 0, "data".to_string()),
        (316 * KIB, 256 * KIB, 3, "hole,zero".to_string()),
        (572 * KIB, 512 * KIB, 0, "data".to_string()),
        (1084 * KIB, size - 1084 * KIB, 3, "hole,zero".to_string()),
    ];
    assert_eq!(nbdinfo_map(&d.uri("disk")), want);
    // The read-only export of the same volume maps the same.
    assert_eq!(nbdinfo_map(&d.uri("ro")), want);
    // The data around the trim is intact and the trimmed range reads zeros.
    qemu_io_opts(
        &["-r"],
        &d.uri("ro"),
        &[
            "read -P 0x42 60k 256k",
            "read -P 0 316k 256k",
            "read -P 0x42 572k 512k",
        ],
    );

    // An unknown export is refused.
    let out = run(tool("nbdinfo").arg(d.uri("nosuch")), QUICK);
    assert!(!out.ok(), "nbdinfo on a missing export succeeded: {out:?}");
}

#[test]
fn nbdcopy_export_to_file_and_back() {
    let (d, cdir) = Daemon::with_config(&striped_config("img", 64));
    let uri = d.uri("img");
    let dir = cdir.path();
    let data = random_bytes((64 * MIB) as usize, 0xc0b1);
    let src = dir.join("src.raw");
    std::fs::write(&src, &data).unwrap();

    // file -> export (several connections: multi-conn), then export -> file.
    run_ok(
        tool("nbdcopy")
            .args(["--flush", "--connections=4", "--requests=16"])
            .arg(&src)
            .arg(&uri),
        SLOW,
    );
    let back = dir.join("back.raw");
    run_ok(tool("nbdcopy").arg(&uri).arg(&back), SLOW);
    assert_same("nbdcopy round trip", &std::fs::read(&back).unwrap(), &data);

    // A partly zero export -> file -> a second export region via a fresh copy: the sparse
    // paths (block status, zeroing) keep contents equal.
    qemu_io(&uri, &["write -z 1M 3M", "discard 10M 2M", "flush"]);
    let mut want = data.clone();
    want[MIB as usize..(4 * MIB) as usize].fill(0);
    want[(10 * MIB) as usize..(12 * MIB) as usize].fill(0);
    let back2 = dir.join("back2.raw");
    run_ok(tool("nbdcopy").arg(&uri).arg(&back2), SLOW);
    assert_same(
        "nbdcopy after zeroing",
        &std::fs::read(&back2).unwrap(),
        &want,
    );
    // Copy the original back over the zeroed export; equal again.
    run_ok(tool("nbdcopy").arg("--flush").arg(&src).arg(&uri), SLOW);
    let back3 = dir.join("back3.raw");
    run_ok(tool("nbdcopy").arg(&uri).arg(&back3), SLOW);
    assert_same(
        "nbdcopy second round",
        &std::fs::read(&back3).unwrap(),
        &data,
    );
}

/// Python helpers shared by the nbdsh probes.
const PY_PRELUDE: &str = r#"
import errno, os
def expect_err(fn, errs, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum in errs, "%s: got %s (%s), want one of %s" % (what, e.errno, e.string, errs)
    else:
        raise AssertionError("%s: succeeded, want an error" % what)
def still_works(hh, off=0):
    buf = os.urandom(8192)
    hh.pwrite(buf, off)
    assert hh.pread(8192, off) == buf, "handle no longer reads back what it wrote"
def extents(hh, off, count):
    """(start, length, flags) covering [off, off+count), from as many calls as needed."""
    out = []
    pos = off
    while pos < off + count:
        got = []
        def cb(meta, offset, entries, err):
            assert meta == nbd.CONTEXT_BASE_ALLOCATION, meta
            assert offset == pos, (offset, pos)
            got.extend(zip(entries[0::2], entries[1::2]))
            return 0
        hh.block_status(off + count - pos, pos, cb)
        assert got, "empty block status reply"
        for (n, f) in got:
            assert n > 0, "zero-length extent"
            n = min(n, off + count - pos)
            out.append((pos, n, f))
            pos += n
            if pos >= off + count:
                break
    return out
def flags_in(hh, off, count):
    return set(f for (_, _, f) in extents(hh, off, count))
"#;

fn nbdsh_probe(uri: &str, body: &str) -> Out {
    let script = format!("{PY_PRELUDE}\nURI = {uri:?}\n{body}\nprint('probe ok')\n");
    let out = nbdsh_run(&script, QUICK);
    assert!(out.stdout.contains("probe ok"), "{out:?}");
    out
}

#[test]
fn nbdsh_structured_replies_and_block_status() {
    let d = Daemon::demo();
    nbdsh_probe(
        &d.uri("demo"),
        r#"
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(URI)
assert h.get_structured_replies_negotiated(), "structured replies not negotiated"
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated"
assert h.get_size() == 1 << 30
HZ = nbd.STATE_HOLE | nbd.STATE_ZERO
# Never written: hole and zero everywhere (sampled: start, middle, end).
for (o, n) in [(0, 1 << 20), (300 << 20, 64 << 20), ((1 << 30) - (1 << 20), 1 << 20)]:
    assert flags_in(h, o, n) == {HZ}, (o, n, extents(h, o, n))
# Written across chunk boundaries: 0 on the written range, holes around it.
base = 8 << 20
h.pwrite(b"\x5a" * (200 << 10), base + (60 << 10))
assert flags_in(h, base + (60 << 10), 200 << 10) == {0}, extents(h, base, 1 << 20)
assert flags_in(h, base, 60 << 10) == {HZ}, extents(h, base, 1 << 20)
assert flags_in(h, base + (260 << 10), 764 << 10) == {HZ}, extents(h, base, 1 << 20)
# A trim in the middle brings the hole back; the rest stays data.
h.trim(64 << 10, base + (128 << 10))
assert flags_in(h, base + (128 << 10), 64 << 10) == {HZ}, extents(h, base, 1 << 20)
assert flags_in(h, base + (60 << 10), 68 << 10) == {0}, extents(h, base, 1 << 20)
assert flags_in(h, base + (192 << 10), 68 << 10) == {0}, extents(h, base, 1 << 20)
assert h.pread(64 << 10, base + (128 << 10)) == bytes(64 << 10)
# REQ_ONE: one extent, starting at the offset.
got = []
h.block_status(1 << 20, base, lambda m, o, e, err: got.extend(e) or 0, nbd.CMD_FLAG_REQ_ONE)
assert len(got) == 2 and got[1] == HZ and got[0] == 60 << 10, got
# Reads after all this still come back as structured data.
assert h.pread(4096, base + (60 << 10)) == b"\x5a" * 4096
"#,
    );
}

#[test]
fn nbdsh_multi_conn_sees_flushed_writes() {
    let d = Daemon::demo();
    nbdsh_probe(
        &d.uri("demo"),
        r#"
h.connect_uri(URI)
h2 = nbd.NBD()
h2.connect_uri(URI)
assert h.can_multi_conn() and h2.can_multi_conn(), "multi-conn not advertised"
assert h.can_flush() and h2.can_flush()
for i in range(8):
    off = (16 << 20) + i * (196 << 10) + (60 << 10)
    a = os.urandom(200 << 10)
    h.pwrite(a, off)
    h.flush()
    assert h2.pread(len(a), off) == a, "h2 does not see h's flushed write %d" % i
    b = os.urandom(100 << 10)
    h2.pwrite(b, off + (50 << 10))
    h2.flush()
    assert h.pread(len(a), off) == a[:50 << 10] + b + a[150 << 10:], "h does not see h2's write %d" % i
h2.shutdown()
"#,
    );
}

#[test]
fn nbdsh_fua_writes() {
    let d = Daemon::demo();
    nbdsh_probe(
        &d.uri("demo"),
        r#"
h.connect_uri(URI)
assert h.can_fua(), "FUA not advertised"
buf = os.urandom(200 << 10)
off = (32 << 20) + (60 << 10)
h.pwrite(buf, off, nbd.CMD_FLAG_FUA)
assert h.pread(len(buf), off) == buf
h.zero(4096, off, nbd.CMD_FLAG_FUA)
assert h.pread(4096, off) == bytes(4096)
h.trim(64 << 10, off + (68 << 10), nbd.CMD_FLAG_FUA)
assert h.pread(64 << 10, off + (68 << 10)) == bytes(64 << 10)
assert h.pread(4096, off + (132 << 10)) == buf[132 << 10:136 << 10]
h.zero(8192, off, nbd.CMD_FLAG_NO_HOLE)
h.zero(8192, off, nbd.CMD_FLAG_FAST_ZERO)
h2 = nbd.NBD()
h2.connect_uri(URI)
assert h2.pread(4096, off + (16 << 10)) == buf[16 << 10:20 << 10], "FUA data not seen"
assert h2.pread(8192, off) == bytes(8192), "zeroes not seen"
"#,
    );
}

#[test]
fn nbdsh_out_of_range_requests_fail_and_the_handle_survives() {
    let d = Daemon::demo();
    nbdsh_probe(
        &d.uri("demo"),
        r#"
EINVAL, ENOSPC = errno.EINVAL, errno.ENOSPC
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(URI)
h.set_strict_mode(0)   # let libnbd send what the server must refuse
size = h.get_size()
cases = [
    (lambda: h.pread(4096, size), (EINVAL,), "read at the end"),
    (lambda: h.pread(8192, size - 4096), (EINVAL,), "read across the end"),
    (lambda: h.pread(4096, (1 << 63) - 4096), (EINVAL,), "read far past the end"),
    (lambda: h.pread(4096, (1 << 64) - 4096), (EINVAL,), "read at offset 2^64-4096"),
    (lambda: h.pwrite(b"x" * 4096, size), (ENOSPC, EINVAL), "write at the end"),
    (lambda: h.pwrite(b"x" * 8192, size - 4096), (ENOSPC, EINVAL), "write across the end"),
    (lambda: h.zero(8192, size - 4096), (ENOSPC, EINVAL), "zero across the end"),
    (lambda: h.trim(8192, size - 4096), (ENOSPC, EINVAL), "trim across the end"),
    (lambda: h.cache(8192, size - 4096), (EINVAL,), "cache across the end"),
    (lambda: h.block_status(8192, size, lambda *a: 0), (EINVAL,), "block status past the end"),
]
for (fn, errs, what) in cases:
    expect_err(fn, errs, what)
    still_works(h, 4 << 20)
# The last block is fine.
h.pwrite(b"\x7e" * 4096, size - 4096)
assert h.pread(4096, size - 4096) == b"\x7e" * 4096
# Nothing past the end landed at the start (no wrap-around).
assert h.pread(8192, 0) == bytes(8192)
"#,
    );
}

#[test]
fn nbdsh_zero_length_and_unaligned_requests_fail_and_the_handle_survives() {
    let d = Daemon::demo();
    nbdsh_probe(
        &d.uri("demo"),
        r#"
EINVAL = errno.EINVAL
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(URI)
h.set_strict_mode(0)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
cases = [
    (lambda: h.pread(0, 4096), "zero-length read"),
    (lambda: h.pwrite(b"", 4096), "zero-length write"),
    (lambda: h.trim(0, 4096), "zero-length trim"),
    (lambda: h.zero(0, 4096), "zero-length write zeroes"),
    (lambda: h.cache(0, 4096), "zero-length cache"),
    (lambda: h.block_status(0, 4096, lambda *a: 0), "zero-length block status"),
    (lambda: h.pread(512, 100), "read at an unaligned offset"),
    (lambda: h.pread(100, 4096), "read of an unaligned length"),
    (lambda: h.pwrite(b"y" * 512, 7), "write at an unaligned offset"),
    (lambda: h.pwrite(b"y" * 1000, 4096), "write of an unaligned length"),
    (lambda: h.trim(1000, 4096), "trim of an unaligned length"),
    (lambda: h.zero(512, 4097), "zero at an unaligned offset"),
    (lambda: h.pread(4096, 0, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE), "read with a write flag"),
]
for (fn, what) in cases:
    expect_err(fn, (EINVAL,), what)
    still_works(h, 1 << 20)
# Unaligned data never reached the disk.
assert h.pread(8192, 0) == bytes(8192), "an unaligned write landed"
"#,
    );
}

#[test]
fn nbdsh_read_only_export_refuses_writes() {
    let (d, _cdir) = Daemon::with_config(&two_exports_config());
    let script = format!("RW = {:?}\n", d.uri("disk"))
        + r#"
EPERM, EINVAL = errno.EPERM, errno.EINVAL
h.connect_uri(RW)
h.pwrite(b"\x77" * (128 << 10), 60 << 10)
h.flush()
r = nbd.NBD()
r.connect_uri(URI)
assert r.is_read_only(), "read-only flag not advertised"
assert not r.can_trim() and not r.can_zero()
assert r.pread(128 << 10, 60 << 10) == b"\x77" * (128 << 10)
# libnbd refuses on its own first...
expect_err(lambda: r.pwrite(b"\x11" * 4096, 64 << 10), (EPERM,), "strict write")
# ...and the server refuses what gets through.
r.set_strict_mode(0)
expect_err(lambda: r.pwrite(b"\x11" * 4096, 64 << 10), (EPERM,), "write")
expect_err(lambda: r.pwrite(b"\x11" * 4096, 64 << 10, nbd.CMD_FLAG_FUA), (EPERM,), "FUA write")
expect_err(lambda: r.trim(4096, 64 << 10), (EPERM, EINVAL), "trim")
expect_err(lambda: r.zero(4096, 64 << 10), (EPERM, EINVAL), "write zeroes")
r.flush()
assert r.pread(128 << 10, 60 << 10) == b"\x77" * (128 << 10), "read-only export was modified"
assert h.pread(128 << 10, 60 << 10) == b"\x77" * (128 << 10), "read-only export was modified"
"#;
    nbdsh_probe(&d.uri("ro"), &script);
}

fn fio(uri: &str, name: &str, rw: &str, extra: &[&str]) -> Out {
    let mut c = tool("fio");
    c.arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .args([
            "--bs=4k",
            "--iodepth=16",
            "--size=64M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .args(extra);
    let out = run_ok(&mut c, SLOW);
    if !out.stdout.contains("err= 0") || out.stdout.contains("verify: bad") {
        out.fail("fio reported errors");
    }
    out
}

#[test]
fn fio_randwrite_verify() {
    let d = Daemon::demo();
    fio(&d.uri("demo"), "randwrite", "randwrite", &[]);
}

#[test]
fn fio_verify_in_poll_and_hybrid_modes() {
    for mode in ["poll", "hybrid"] {
        let d = Daemon::start(Opts {
            mode: Some(mode.into()),
            reactors: Some(1),
            ..Opts::default()
        });
        fio(
            &d.uri("demo"),
            mode,
            "randrw",
            &["--size=16M", "--bsrange=4k-128k"],
        );
    }
}

#[test]
fn fio_deep_queues_on_one_reactor() {
    // 8 connections x 128 deep x 1 MiB (each split into 16 stripe chunks) on one reactor: far
    // more bios than its pool holds, so requests wait for room and are retried.
    let d = Daemon::start(Opts {
        reactors: Some(1),
        ..Opts::default()
    });
    let mut c = tool("fio");
    c.arg("--name=deep")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", d.uri("demo")))
        .args([
            "--rw=randwrite",
            "--bs=1M",
            "--iodepth=128",
            "--numjobs=8",
            "--size=32M",
            "--offset_increment=64M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--group_reporting",
        ]);
    let out = run_ok(&mut c, SLOW);
    if !out.stdout.contains("err= 0") {
        out.fail("fio reported errors");
    }
}

#[test]
fn fio_randrw_verify() {
    let d = Daemon::demo();
    // Mixed reads and writes, odd block sizes crossing chunks, at an offset.
    fio(
        &d.uri("demo"),
        "randrw",
        "randrw",
        &["--offset=60k", "--bsrange=4k-200k", "--rwmixread=50"],
    );
}

// ---------------------------------------------------------------------------------------------
// nbdfuse + loop device + ext4
// ---------------------------------------------------------------------------------------------

/// nbdfuse serving the export as `mnt/nbd`; unmounted (and reaped) on drop.
struct Fuse {
    bg: Bg,
    mnt: std::path::PathBuf,
    mounted: bool,
}

impl Drop for Fuse {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run(tool("fusermount3").arg("-u").arg(&self.mnt), QUICK);
        }
        // nbdfuse exits by itself after the unmount; Bg's drop kills it if it did not.
        if self.bg.try_exit().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// A loop device, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run(tool("losetup").arg("-d").arg(&self.0), QUICK);
    }
}

/// A mount, unmounted on drop.
struct Mount(std::path::PathBuf, bool);

impl Drop for Mount {
    fn drop(&mut self) {
        if self.1 {
            let _ = run(tool("umount").arg(&self.0), QUICK);
        }
    }
}

fn md5(path: &Path) -> String {
    let out = run_ok(Command::new("md5sum").arg(path), QUICK);
    out.stdout.split_whitespace().next().unwrap().to_string()
}

#[test]
fn nbdfuse_loop_mkfs_mount_fsck() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is not available: this test needs FUSE (load the fuse module, or run the \
         container with --device /dev/fuse); it does not skip"
    );
    for t in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "debugfs",
        "nbdcopy",
        "mount",
        "umount",
    ] {
        require_tool(t);
    }
    let (d, cdir) = Daemon::with_config(&striped_config("disk", 256));
    let dir = cdir.path();
    let mnt = dir.join("nbd");
    let fsdir = dir.join("fs");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(&fsdir).unwrap();
    let pidfile = dir.join("nbdfuse.pid");

    // 1. nbdfuse: the export as the file mnt/nbd.
    let bg = Bg::start(
        tool("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&mnt)
            .arg(d.uri("disk")),
        &dir.join("nbdfuse.log"),
    );
    let mut fuse = Fuse {
        bg,
        mnt: mnt.clone(),
        mounted: false,
    };
    let start = std::time::Instant::now();
    while !pidfile.exists() {
        if let Some(s) = fuse.bg.try_exit() {
            panic!("nbdfuse exited ({s}) before serving:\n{}", fuse.bg.output());
        }
        assert!(
            start.elapsed() < QUICK,
            "nbdfuse not ready after {QUICK:?}:\n{}",
            fuse.bg.output()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fuse.mounted = true;
    let file = mnt.join("nbd");
    assert_eq!(
        std::fs::metadata(&file).expect("nbdfuse file").len(),
        256 * MIB
    );

    // fio through the FUSE file with io_uring (the kernel's view of the export), verified.
    let out = run_ok(
        tool("fio")
            .arg("--name=uring")
            .arg("--ioengine=io_uring")
            .arg(format!("--filename={}", file.display()))
            .args([
                "--rw=randrw",
                "--bs=4k",
                "--iodepth=16",
                "--offset=200M",
                "--size=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ]),
        SLOW,
    );
    if !out.stdout.contains("err= 0") {
        out.fail("fio over nbdfuse reported errors");
    }

    // 2. A loop device over it.
    let out = run_ok(tool("losetup").args(["--find", "--show"]).arg(&file), QUICK);
    let dev = out.stdout.trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    let lo = Loop(dev.clone());

    // 3. ext4, mounted, files written with checksums, sync, unmounted.
    run_ok(tool("mkfs.ext4").args(["-q", "-F"]).arg(&dev), SLOW);
    run_ok(tool("mount").arg(&dev).arg(&fsdir), QUICK);
    let mut m = Mount(fsdir.clone(), true);
    // Files made outside, checksummed, copied in.
    let srcdir = dir.join("src");
    std::fs::create_dir(&srcdir).unwrap();
    let mut sums = Vec::new();
    for (i, len) in [(0u64, MIB), (1, 7 * MIB + 12345), (2, 300), (3, 20 * MIB)] {
        let src = srcdir.join(format!("f{i}"));
        std::fs::write(&src, random_bytes(len as usize, 100 + i)).unwrap();
        let p = fsdir.join(format!("f{i}"));
        std::fs::copy(&src, &p).unwrap();
        sums.push((p, md5(&src)));
    }
    std::fs::create_dir(fsdir.join("sub")).unwrap();
    for i in 0..200 {
        std::fs::write(
            fsdir.join("sub").join(format!("s{i}")),
            format!("small {i}\n"),
        )
        .unwrap();
    }
    run_ok(&mut Command::new("sync"), SLOW);
    for (p, sum) in &sums {
        assert_eq!(&md5(p), sum, "{} changed", p.display());
    }
    run_ok(tool("umount").arg(&fsdir), QUICK);
    m.1 = false;

    // 4. fsck is clean.
    let out = run(tool("e2fsck").arg("-fn").arg(&dev), SLOW);
    if out.status.code() != Some(0) {
        out.fail("e2fsck -fn found problems");
    }

    // 5. Detach the loop device, unmount FUSE; nbdfuse exits by itself.
    drop(m);
    drop(lo);
    run_ok(tool("fusermount3").arg("-u").arg(&mnt), QUICK);
    fuse.mounted = false;
    let s = fuse.bg.wait(QUICK);
    assert!(
        s.success(),
        "nbdfuse exited with {s}:\n{}",
        fuse.bg.output()
    );

    // 6. The filesystem is in the daemon, not in some cache on the way: copied out over NBD,
    // it checks clean and holds the same files.
    let img = dir.join("fs.img");
    run_ok(tool("nbdcopy").arg(d.uri("disk")).arg(&img), SLOW);
    let out = run(tool("e2fsck").arg("-fn").arg(&img), SLOW);
    if out.status.code() != Some(0) {
        out.fail("e2fsck -fn of the exported image found problems");
    }
    for (i, (_, sum)) in sums.iter().enumerate() {
        let dump = dir.join(format!("dump{i}"));
        run_ok(
            tool("debugfs")
                .arg("-R")
                .arg(format!("dump /f{i} {}", dump.display()))
                .arg(&img),
            QUICK,
        );
        assert_eq!(&md5(&dump), sum, "f{i} in the exported image differs");
    }
    let out = run_ok(
        tool("debugfs").arg("-R").arg("cat /sub/s199").arg(&img),
        QUICK,
    );
    assert_eq!(out.stdout, "small 199\n");
}
