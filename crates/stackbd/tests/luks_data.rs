//! The data segment as cryptsetup encrypts it: a plaintext image encrypted offline by
//! `cryptsetup reencrypt --encrypt`, opened with our unlock and `crypt_params`, decrypts to the
//! original plaintext with the crypt target's cipher. This pins the IV convention: LUKS2 with
//! 4096-byte sectors counts IVs in 512-byte sectors (no `iv_large_sectors`).

mod luks_util;

use luks_util::*;
use stackbd::luks::Header;
use stackbd_targets::crypt::cipher::{CipherSpec, SectorCipher};

const SIZE: u64 = 24 << 20;
const CHECK: usize = 256 << 10;

/// 512-byte sector `i` of the plaintext holds `i` as a little-endian u32, 128 times.
fn plaintext_sector(i: u64) -> Vec<u8> {
    (i as u32).to_le_bytes().repeat(128)
}

fn check(kind: &str, sector: Option<&str>) {
    let img = Img::new(SIZE);
    let mut data = Vec::with_capacity(SIZE as usize);
    for i in 0..SIZE / 512 {
        data.extend(plaintext_sector(i));
    }
    std::fs::write(&img.path, &data).unwrap();
    let kf = img.keyfile("pw", b"pw");
    let mut args = vec![
        "reencrypt",
        "-q",
        "--encrypt",
        "--type",
        kind,
        "--reduce-device-size",
        "8M",
    ];
    args.extend(fast_kdf("pbkdf2"));
    if let Some(s) = sector {
        args.extend(["--sector-size", s]);
    }
    args.extend(["--key-file", kf.as_str(), img.p()]);
    cryptsetup_ok(&args);

    let mut f = img.open();
    let h = Header::read(&mut f, SIZE).unwrap();
    let key = h.unlock(&mut f, b"pw", None).unwrap();
    let p = h.crypt_params().unwrap();
    assert_eq!(p.sector_size, sector.map_or(512, |s| s.parse().unwrap()));
    assert!(!p.iv_large_sectors);

    let spec = CipherSpec::parse(&p.cipher).unwrap();
    let ss = p.sector_size as usize;
    let cipher = SectorCipher::new(&spec, key.as_bytes(), ss).unwrap();
    let mut buf = vec![0u8; CHECK];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, p.payload_offset_sectors * 512)
        .unwrap();
    // IVs in 512-byte units from iv_offset, stepping by sector_size / 512 per crypt sector.
    let step = if p.iv_large_sectors {
        1
    } else {
        (ss / 512) as u64
    };
    let first = if p.iv_large_sectors {
        p.iv_offset / step
    } else {
        p.iv_offset
    };
    cipher.try_decrypt(first, step, &mut buf).unwrap();
    for (i, s) in buf.chunks(512).enumerate() {
        assert!(
            s == &plaintext_sector(i as u64)[..],
            "{kind} {sector:?}: 512-byte sector {i} of the data differs"
        );
    }
}

#[test]
fn luks2_4096_data_decrypts() {
    if have_cryptsetup("luks2_4096_data_decrypts") {
        check("luks2", Some("4096"));
    }
}

#[test]
fn luks2_512_data_decrypts() {
    if have_cryptsetup("luks2_512_data_decrypts") {
        check("luks2", Some("512"));
    }
}

// LUKS1 is left out: cryptsetup's LUKS1 offline encryption needs device-mapper.
