//! Helpers shared by the `luks_*` tests: running cryptsetup on image files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Checks that cryptsetup runs; fails the test (naming the package) when it does not.
pub fn have_cryptsetup(test: &str) -> bool {
    let ok = Command::new("cryptsetup")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    // Required, never skipped: scripts/test.sh installs it.
    assert!(
        ok,
        "{test}: cryptsetup is required (Debian package cryptsetup-bin; scripts/test.sh \
         installs it)"
    );
    ok
}

/// Runs cryptsetup with `args`; returns (success, stdout, stderr).
pub fn cryptsetup(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("cryptsetup")
        .args(args)
        .output()
        .expect("run cryptsetup");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs cryptsetup and panics with its output if it fails.
pub fn cryptsetup_ok(args: &[&str]) -> String {
    let (ok, out, err) = cryptsetup(args);
    assert!(ok, "cryptsetup {args:?} failed:\n{out}\n{err}");
    out
}

/// A temp dir with an image file of `size` bytes and helpers for key files.
pub struct Img {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Img {
    pub fn new(size: u64) -> Img {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        Img { dir, path }
    }

    pub fn p(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Writes `pass` to a key file named `name` and returns its path.
    pub fn keyfile(&self, name: &str, pass: &[u8]) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, pass).unwrap();
        p.to_str().unwrap().to_string()
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    pub fn size(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }

    pub fn open(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }
}

/// The volume key `cryptsetup luksDump --dump-volume-key` prints for `img` opened by `keyfile`.
pub fn dumped_volume_key(img: &Path, keyfile: &str) -> Vec<u8> {
    let out = cryptsetup_ok(&[
        "luksDump",
        "-q",
        "--dump-volume-key",
        "--key-file",
        keyfile,
        img.to_str().unwrap(),
    ]);
    let start = out.find("MK dump:").expect("an MK dump line") + "MK dump:".len();
    let mut key = Vec::new();
    for (i, line) in out[start..].lines().enumerate() {
        if i > 0 && !line.starts_with(|c: char| c.is_whitespace()) {
            break;
        }
        for tok in line.split_whitespace() {
            key.push(u8::from_str_radix(tok, 16).expect("hex byte"));
        }
    }
    assert!(!key.is_empty(), "no key in:\n{out}");
    key
}

/// KDF arguments that keep cryptsetup (and our debug-built unlock) fast.
pub fn fast_kdf(kdf: &str) -> Vec<&'static str> {
    match kdf {
        "pbkdf2" => vec![
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--hash",
            "sha256",
        ],
        "argon2i" => vec![
            "--pbkdf",
            "argon2i",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "32",
            "--pbkdf-parallel",
            "1",
        ],
        "argon2id" => vec![
            "--pbkdf",
            "argon2id",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "64",
            "--pbkdf-parallel",
            "2",
        ],
        other => panic!("no fast args for {other}"),
    }
}
