//! LUKS volumes end to end, against the real tools: images that `cryptsetup` formatted (LUKS2
//! with 512- and 4096-byte sectors, argon2id and pbkdf2; LUKS1) open in `stackbd serve`; data
//! written through the NBD export decrypts, with the volume key `cryptsetup luksDump
//! --dump-volume-key` prints, to the same bytes in an independent decryptor (Python's
//! `cryptography`, i.e. OpenSSL); ciphertext that cryptsetup's offline `reencrypt --encrypt`
//! made reads back as the plaintext; LUKS1 data checks against `qemu-img convert` with qemu's
//! own LUKS driver; `stackbd luks format` images pass cryptsetup; a restart brings the volume
//! back from the state file, which holds no key; a wrong passphrase creates nothing.

mod common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

const PASS: &[u8] = b"correct horse battery staple";

fn cryptsetup() -> Command {
    let mut c = tool("cryptsetup");
    // Image files, no device-mapper: cryptsetup must not wait for udev or lock in /run.
    c.arg("-q");
    c
}

/// A sparse image file of `mib` MiB and the key file holding [`PASS`].
fn image(dir: &Path, name: &str, mib: u64) -> (PathBuf, PathBuf) {
    let img = dir.join(format!("{name}.img"));
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(mib * MIB).unwrap();
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&key, PASS).unwrap();
    (img, key)
}

/// `cryptsetup luksFormat` with cheap KDF settings; `extra` picks type, sector size, pbkdf.
fn luks_format(img: &Path, key: &Path, extra: &[&str]) {
    let mut c = cryptsetup();
    c.arg("luksFormat")
        .args(extra)
        .arg("--key-file")
        .arg(key)
        .arg(img);
    run_ok(&mut c, QUICK);
}

/// The volume key as `cryptsetup luksDump --dump-volume-key` prints it.
fn dumped_key(img: &Path, key: &Path) -> Vec<u8> {
    let mut c = cryptsetup();
    c.args(["luksDump", "--dump-volume-key", "--key-file"])
        .arg(key)
        .arg(img);
    let out = run_ok(&mut c, QUICK);
    let text = out.stdout;
    let at = text
        .find("MK dump:")
        .unwrap_or_else(|| panic!("no 'MK dump:' in luksDump output:\n{text}"));
    let hex: String = text[at + 8..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || c.is_whitespace())
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    assert!(hex.len() >= 32, "volume key too short in:\n{text}");
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// Decrypts `len` bytes of payload at `payload_off` with AES-XTS-plain64, independently of
/// stackbd: Python's `cryptography` (OpenSSL). IVs count 512-byte sectors unless `iv_large`.
fn py_decrypt(
    img: &Path,
    data_offset: u64,
    payload_off: u64,
    len: u64,
    key: &[u8],
    sector: u64,
    iv_large: bool,
) -> Vec<u8> {
    let script = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
img, doff, off, n, key, ss, large = sys.argv[1], *map(int, sys.argv[2:4]), int(sys.argv[4]), bytes.fromhex(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1"
out = bytearray()
with open(img, "rb") as f:
    f.seek(doff + off)
    ct = f.read(n)
for i in range(0, n, ss):
    s = (off + i) // ss if large else (off + i) // 512
    d = Cipher(algorithms.AES(key), modes.XTS(s.to_bytes(16, "little"))).decryptor()
    out += d.update(ct[i:i + ss]) + d.finalize()
sys.stdout.buffer.write(out)
"#;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(img)
        .arg(data_offset.to_string())
        .arg(payload_off.to_string())
        .arg(len.to_string())
        .arg(hex)
        .arg(sector.to_string())
        .arg(if iv_large { "1" } else { "0" })
        .output()
        .expect("run /usr/bin/python3 (Debian python3-cryptography)");
    assert!(
        out.status.success(),
        "python decrypt failed (Debian package python3-cryptography; scripts/test.sh installs \
         it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len() as u64, len);
    out.stdout
}

/// Serves `img` as LUKS volume `secret`, exported as `secret`.
fn serve_luks(dir: &Path, img: &Path, key: &Path) -> (Daemon, tempfile::TempDir) {
    let _ = dir;
    Daemon::with_config(&format!(
        "[leaf.disk]\nkind = \"file\"\npath = {img:?}\n\n[luks.secret]\ndevice = \"disk\"\n\
         key_file = {key:?}\n\n[export.secret]\nvolume = \"secret\"\n"
    ))
}

/// Writes `data` at `off` through the export and flushes; reads it back.
fn nbd_write_read(uri: &str, off: u64, data: &[u8], dir: &Path) -> Vec<u8> {
    let src = dir.join("payload.bin");
    std::fs::write(&src, data).unwrap();
    let back = dir.join("back.bin");
    let script = format!(
        "h.connect_uri({uri:?})\n\
         h.pwrite(open({src:?}, 'rb').read(), {off})\n\
         h.flush()\n\
         open({back:?}, 'wb').write(h.pread({len}, {off}))\n",
        src = src.to_str().unwrap(),
        back = back.to_str().unwrap(),
        len = data.len(),
    );
    nbdsh_run(&script, QUICK);
    std::fs::read(back).unwrap()
}

fn nbd_read(uri: &str, off: u64, len: usize, dir: &Path) -> Vec<u8> {
    let back = dir.join("read.bin");
    let script = format!(
        "h.connect_uri({uri:?})\nopen({back:?}, 'wb').write(h.pread({len}, {off}))\n",
        back = back.to_str().unwrap(),
    );
    nbdsh_run(&script, QUICK);
    std::fs::read(back).unwrap()
}

struct Variant {
    what: &'static str,
    args: &'static [&'static str],
    data_offset: u64,
    sector: u64,
    iv_large: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        what: "LUKS2, 4096-byte sectors, argon2id",
        args: &[
            "--type",
            "luks2",
            "--sector-size",
            "4096",
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "32768",
            "--pbkdf-force-iterations",
            "4",
        ],
        data_offset: 16 * MIB,
        sector: 4096,
        // cryptsetup counts IVs in 512-byte sectors for LUKS2 too (no iv_large_sectors).
        iv_large: false,
    },
    Variant {
        what: "LUKS2, 512-byte sectors, pbkdf2",
        args: &[
            "--type",
            "luks2",
            "--sector-size",
            "512",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ],
        data_offset: 16 * MIB,
        sector: 512,
        iv_large: false,
    },
    Variant {
        what: "LUKS1, pbkdf2",
        args: &["--type", "luks1", "--pbkdf-force-iterations", "1000"],
        data_offset: 2 * MIB,
        sector: 512,
        iv_large: false,
    },
];

#[test]
fn cryptsetup_images_open_and_what_stackbd_writes_decrypts_with_the_dumped_key() {
    let dir = tempdir();
    for (i, v) in VARIANTS.iter().enumerate() {
        let (img, key) = image(dir.path(), &format!("v{i}"), 24);
        luks_format(&img, &key, v.args);
        let vk = dumped_key(&img, &key);
        let (d, _cfg) = serve_luks(dir.path(), &img, &key);
        let uri = d.uri("secret");
        // 1 MiB + one crypt sector, starting one crypt sector in.
        let data = random_bytes((MIB + v.sector) as usize, 0x1u64 + i as u64);
        let back = nbd_write_read(&uri, v.sector, &data, dir.path());
        assert_same(&format!("{}: read back through NBD", v.what), &back, &data);
        drop(d);
        let plain = py_decrypt(
            &img,
            v.data_offset,
            v.sector,
            data.len() as u64,
            &vk,
            v.sector,
            v.iv_large,
        );
        assert_same(
            &format!("{}: image decrypted with cryptsetup's volume key", v.what),
            &plain,
            &data,
        );
    }
}

#[test]
fn ciphertext_from_cryptsetup_reencrypt_reads_back_as_the_plaintext() {
    let dir = tempdir();
    for (sector, what) in [("512", "512-byte sectors"), ("4096", "4096-byte sectors")] {
        let (img, key) = image(dir.path(), &format!("re{sector}"), 40);
        let plain = random_bytes((8 * MIB) as usize, 77);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.write_all_at(&plain, 0).unwrap();
        }
        let mut c = cryptsetup();
        c.args([
            "reencrypt",
            "--encrypt",
            "--type",
            "luks2",
            "--reduce-device-size",
            "32M",
            "--sector-size",
            sector,
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
        ])
        .arg(&key)
        .arg(&img);
        run_ok(&mut c, SLOW);
        let (d, _cfg) = serve_luks(dir.path(), &img, &key);
        let got = nbd_read(&d.uri("secret"), 0, plain.len(), dir.path());
        assert_same(
            &format!("reencrypt --encrypt, {what}: read through stackbd"),
            &got,
            &plain,
        );
    }
}

#[test]
fn luks1_data_written_by_stackbd_matches_qemu_img_luks_driver() {
    let dir = tempdir();
    let (img, key) = image(dir.path(), "q", 12);
    luks_format(&img, &key, VARIANTS[2].args);
    let (d, _cfg) = serve_luks(dir.path(), &img, &key);
    let data = random_bytes((3 * MIB) as usize, 9);
    let back = nbd_write_read(&d.uri("secret"), 512 * 7, &data, dir.path());
    assert_same("LUKS1 read back through NBD", &back, &data);
    drop(d);
    let raw = dir.path().join("q.raw");
    let mut c = tool("qemu-img");
    c.arg("convert")
        .arg("--object")
        .arg(format!("secret,id=sec0,file={}", key.display()))
        .arg("--image-opts")
        .arg(format!(
            "driver=luks,key-secret=sec0,file.filename={}",
            img.display()
        ))
        .args(["-O", "raw"])
        .arg(&raw);
    run_ok(&mut c, SLOW);
    let all = std::fs::read(&raw).unwrap();
    assert_same(
        "qemu-img's LUKS1 decryption of what stackbd wrote",
        &all[512 * 7..512 * 7 + data.len()],
        &data,
    );
}

fn stackbd(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    c
}

#[test]
fn stackbd_luks_format_makes_images_cryptsetup_accepts() {
    let dir = tempdir();
    for (i, extra) in [
        &[
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--sector-size",
            "512",
        ][..],
        &[
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "16384",
            "--pbkdf-force-iterations",
            "3",
            "--sector-size",
            "4096",
        ][..],
    ]
    .iter()
    .enumerate()
    {
        let (img, key) = image(dir.path(), &format!("f{i}"), 20);
        let mut c = stackbd(&["luks", "format"]);
        c.arg(&img).arg("--key-file").arg(&key).args(*extra);
        run_ok(&mut c, QUICK);
        let mut c = cryptsetup();
        c.arg("luksDump").arg(&img);
        let dump = run_ok(&mut c, QUICK).stdout;
        assert!(dump.contains("Version:       \t2"), "{dump}");
        // `stackbd luks dump` shows what cryptsetup shows: the same UUID, cipher, sector size.
        let ours = run_ok(stackbd(&["luks", "dump"]).arg(&img), QUICK).stdout;
        for field in ["UUID:", "cipher:", "sector:", "PBKDF:"] {
            let line = |t: &str| {
                t.lines()
                    .find(|l| l.trim_start().starts_with(field))
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            };
            assert!(
                line(&dump).is_some(),
                "cryptsetup shows no {field}:\n{dump}"
            );
            assert_eq!(
                line(&ours),
                line(&dump),
                "{field} differs\n--- stackbd luks dump ---\n{ours}\n--- cryptsetup ---\n{dump}"
            );
        }
        let mut c = cryptsetup();
        c.args(["open", "--test-passphrase", "--key-file"])
            .arg(&key)
            .arg(&img);
        run_ok(&mut c, QUICK);
        let wrong = dir.path().join("wrong.key");
        std::fs::write(&wrong, b"not it").unwrap();
        let mut c = cryptsetup();
        c.args(["open", "--test-passphrase", "--key-file"])
            .arg(&wrong)
            .arg(&img);
        assert!(!run(&mut c, QUICK).ok(), "a wrong passphrase must not open");
        // Data through stackbd decrypts with the key cryptsetup reads from our header.
        let vk = dumped_key(&img, &key);
        let (d, _cfg) = serve_luks(dir.path(), &img, &key);
        let data = random_bytes((256 * KIB) as usize, 5 + i as u64);
        nbd_write_read(&d.uri("secret"), 0, &data, dir.path());
        drop(d);
        let (sector, large) = if i == 0 { (512, false) } else { (4096, false) };
        let plain = py_decrypt(&img, 16 * MIB, 0, data.len() as u64, &vk, sector, large);
        assert_same(
            "stackbd-formatted image decrypted by OpenSSL",
            &plain,
            &data,
        );
    }
}

#[test]
fn luks_open_restart_and_a_missing_key_file() {
    let dir = tempdir();
    let (img, key) = image(dir.path(), "r", 20);
    luks_format(&img, &key, VARIANTS[1].args);
    let vk = dumped_key(&img, &key);
    let state = dir.path().join("state");
    let opts = Opts {
        state_dir: Some(state.clone()),
        ..Opts::default()
    };
    let mut d = Daemon::start(opts.clone());
    // A wrong passphrase: a clear error, and nothing created (no volume, no image leaf).
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, b"nope").unwrap();
    let r = d.control(&json!({"v": 1, "cmd": "luks_open", "name": "secret",
        "path": img, "key_file": wrong}));
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"].as_str().unwrap().to_lowercase();
    assert!(err.contains("passphrase"), "{err}");
    let ls = d.control(&json!({"v": 1, "cmd": "ls"}));
    assert!(!ls.to_string().contains("secret"), "left behind: {ls}");
    // The CLI verb opens it.
    let mut c = stackbd(&["luks", "open"]);
    c.arg(&img)
        .arg("secret")
        .arg("--key-file")
        .arg(&key)
        .arg("--control")
        .arg(&d.control);
    run_ok(&mut c, QUICK);
    let r = d.control(&json!({"v": 1, "cmd": "export_add", "volume": "secret"}));
    assert_eq!(r["ok"], true, "{r}");
    let data = random_bytes((128 * KIB) as usize, 3);
    nbd_write_read(&d.uri("secret"), 4096, &data, dir.path());
    // `table` hides the key unless asked, as dmsetup does.
    let hex: String = vk.iter().map(|b| format!("{b:02x}")).collect();
    let t = d.control(&json!({"v": 1, "cmd": "table", "name": "secret"}));
    assert!(!t.to_string().contains(&hex), "key shown: {t}");
    let t = d.control(&json!({"v": 1, "cmd": "table", "name": "secret", "showkeys": true}));
    assert!(t.to_string().contains(&hex), "--showkeys: {t}");
    d.signal("TERM");
    assert!(d.wait_exit(SLOW).success());
    let saved = std::fs::read_to_string(state.join("state.toml")).unwrap();
    assert!(
        !saved.contains(&hex),
        "the state file holds the key:\n{saved}"
    );
    assert!(saved.contains("[luks.secret]"), "{saved}");

    // Restart: the volume comes back, data intact.
    let d = Daemon::start(opts.clone());
    let got = nbd_read(&d.uri("secret"), 4096, data.len(), dir.path());
    assert_same("after a restart", &got, &data);
    drop(d);

    // Without its key file, the daemon starts, says which key it lacks, keeps the LUKS
    // volume (and its export) waiting, and brings it up once the key file is back.
    let aside = dir.path().join("r.key.aside");
    std::fs::rename(&key, &aside).unwrap();
    let d = Daemon::start(opts.clone());
    let log = d.log_text();
    assert!(
        log.contains("[luks.secret]") && log.contains(key.to_str().unwrap()),
        "no clear message about the missing key file:\n{log}"
    );
    let info = d.control(&json!({"v": 1, "cmd": "info", "name": "secret"}));
    let err = info["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("failed at start") && err.contains(key.to_str().unwrap()),
        "{info}"
    );
    let saved = std::fs::read_to_string(state.join("state.toml")).unwrap();
    assert!(
        saved.contains("[luks.secret]"),
        "dropped while waiting:\n{saved}"
    );
    std::fs::rename(&aside, &key).unwrap();
    let r = d.control(&json!({"v": 1, "cmd": "leaf_retry"}));
    assert!(
        r["brought_up"].to_string().contains("secret"),
        "the LUKS volume did not come up with its key file back: {r}"
    );
    let got = nbd_read(&d.uri("secret"), 4096, data.len(), dir.path());
    assert_same("after the key file came back", &got, &data);
}

#[test]
fn a_damaged_header_or_a_missing_image_creates_nothing() {
    let dir = tempdir();
    let (img, key) = image(dir.path(), "bad", 20);
    luks_format(&img, &key, VARIANTS[1].args);
    // Both LUKS2 binary headers damaged (primary at 0, secondary at 16 KiB).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(b"XXXX", 0).unwrap();
        f.write_all_at(b"XXXX", 16384).unwrap();
    }
    let d = Daemon::start(Opts::default());
    for (what, req) in [
        (
            "damaged header",
            json!({"v": 1, "cmd": "luks_open", "name": "x", "path": img, "key_file": key}),
        ),
        (
            "missing image",
            json!({"v": 1, "cmd": "luks_open", "name": "x", "path": dir.path().join("nope.img"), "key_file": key}),
        ),
        (
            "missing key file",
            json!({"v": 1, "cmd": "luks_open", "name": "x", "path": img, "key_file": dir.path().join("nope.key")}),
        ),
        (
            "relative path",
            json!({"v": 1, "cmd": "luks_open", "name": "x", "path": "rel.img", "key_file": key}),
        ),
    ] {
        let r = d.control(&req);
        assert_eq!(r["ok"], false, "{what}: {r}");
        assert!(!r["error"].as_str().unwrap_or("").is_empty(), "{what}: {r}");
        let ls = d.control(&json!({"v": 1, "cmd": "ls"}));
        assert!(
            !ls.to_string().contains("\"x\"") && !ls.to_string().contains("x-luks"),
            "{what}: left behind: {ls}"
        );
    }
}
