//! Interop with cryptsetup (needs `cryptsetup` from cryptsetup-bin, which scripts/test.sh
//! installs; a missing one fails the test): cryptsetup's own offline `reencrypt --encrypt` turns known plaintext into a LUKS2
//! volume, `luksDump --dump-volume-key` gives the volume key, and `SectorCipher` must decrypt the
//! data segment. Pins the IV convention of LUKS2 with 4096-byte sectors: IVs count 512-byte
//! units from the start of the data segment (so they step by 8 per crypt sector; cryptsetup does
//! not set dm's `iv_large_sectors` for LUKS2), which `SectorCipher` takes as `iv_step = 8`.

use std::path::{Path, PathBuf};
use std::process::Command;

use stackbd_targets::crypt::cipher::{CipherSpec, SectorCipher};

/// Fails the test, naming the package, when cryptsetup cannot run.
fn require_cryptsetup() {
    let ok = Command::new("cryptsetup")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "cryptsetup is required (Debian package cryptsetup-bin; scripts/test.sh installs it)"
    );
}

fn scratch(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!(
        "stackbd-crypt-{tag}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run cryptsetup");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 16 bytes per line numbered 0, 1, 2, ... (little-endian u128): every 16 bytes differ.
fn pattern(len: usize) -> Vec<u8> {
    (0..len / 16)
        .flat_map(|i| (i as u128).to_le_bytes())
        .collect()
}

fn data_offset(dump: &str) -> usize {
    let seg = dump.split("Data segments:").nth(1).expect("data segments");
    let line = seg
        .lines()
        .find(|l| l.trim_start().starts_with("offset:"))
        .expect("offset line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn luks2_roundtrip(dir: &Path, sector: usize, cipher: &str, key_bits: usize) {
    let img = dir.join("img");
    let plain = pattern(4 << 20);
    let mut file = plain.clone();
    file.resize(8 << 20, 0);
    std::fs::write(&img, &file).unwrap();
    std::fs::write(dir.join("kf"), b"interop-passphrase").unwrap();
    run(Command::new("cryptsetup")
        .args([
            "reencrypt",
            "--encrypt",
            "--type",
            "luks2",
            "--batch-mode",
            "--reduce-device-size",
            "4M",
        ])
        .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .args([
            "--sector-size",
            &sector.to_string(),
            "--cipher",
            cipher,
            "--key-size",
            &key_bits.to_string(),
        ])
        .arg("--key-file")
        .arg(dir.join("kf"))
        .arg(&img));
    run(Command::new("cryptsetup")
        .args([
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--volume-key-file",
        ])
        .arg(dir.join("vk"))
        .arg("--key-file")
        .arg(dir.join("kf"))
        .arg(&img));
    let dump = run(Command::new("cryptsetup").arg("luksDump").arg(&img));
    assert!(
        dump.contains(&format!("sector: {sector} [bytes]")),
        "{dump}"
    );
    let key = std::fs::read(dir.join("vk")).unwrap();
    assert_eq!(key.len() * 8, key_bits);
    let off = data_offset(&dump);
    let disk = std::fs::read(&img).unwrap();
    let n = plain.len().min(disk.len() - off);
    let spec = CipherSpec::parse(cipher).unwrap();
    let c = SectorCipher::new(&spec, &key, sector).unwrap();

    // LUKS2 counts IVs in 512-byte units whatever the sector size (dm-crypt without
    // iv_large_sectors): crypt sector i of the segment uses IV sector i * sector/512.
    let step = (sector / 512) as u64;
    let mut got = disk[off..off + n].to_vec();
    c.decrypt(0, step, &mut got);
    assert!(
        got == plain[..n],
        "LUKS2 {cipher} sector {sector}: 512-byte-unit IVs do not decrypt"
    );
    if sector > 512 {
        // ... and not one IV per large sector (iv_large_sectors), which differs from sector 1 on.
        let mut other = disk[off..off + n].to_vec();
        c.decrypt(0, 1, &mut other);
        assert!(other[..sector] == plain[..sector]);
        assert!(other[sector..] != plain[sector..n]);
    }
    // And the other way: our encryption of the plaintext is cryptsetup's ciphertext.
    let mut enc = plain[..n].to_vec();
    c.encrypt(0, step, &mut enc);
    assert!(enc == disk[off..off + n]);
}

#[test]
fn luks2_4096_sector_volume_uses_512_byte_iv_units() {
    require_cryptsetup();
    let dir = scratch("luks2-4k");
    luks2_roundtrip(&dir, 4096, "aes-xts-plain64", 512);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn luks2_512_sector_volumes_xts_and_cbc_essiv() {
    require_cryptsetup();
    let dir = scratch("luks2-512");
    luks2_roundtrip(&dir, 512, "aes-xts-plain64", 256);
    let dir2 = scratch("luks2-essiv");
    luks2_roundtrip(&dir2, 512, "aes-cbc-essiv:sha256", 256);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&dir2).ok();
}
