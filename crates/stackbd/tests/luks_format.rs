//! Volumes made by `format_luks2` are accepted by cryptsetup: luksDump, open --test-passphrase
//! (and a wrong passphrase refused), luksAddKey, and --dump-volume-key prints the key format
//! returned. pbkdf2 and argon2id, 512 and 4096-byte sectors.

mod luks_util;

use luks_util::*;
use stackbd::luks::{format_luks2, Argon2Variant, FormatOptions, Header, KdfOptions, LuksError};

const SIZE: u64 = 20 << 20;

fn opts(kdf: &str, sector: u32) -> FormatOptions {
    FormatOptions {
        sector_size: sector,
        kdf: match kdf {
            "pbkdf2" => KdfOptions::Pbkdf2 {
                hash: "sha256".into(),
                iterations: 1000,
            },
            _ => KdfOptions::Argon2 {
                variant: Argon2Variant::Argon2id,
                time: 3,
                memory_kib: 64,
                parallel: 2,
            },
        },
        label: "stackbd-test".into(),
        digest_iterations: 1000,
        ..FormatOptions::default()
    }
}

fn check(kdf: &str, sector: u32) {
    let img = Img::new(SIZE);
    let key = {
        let mut f = img.open();
        format_luks2(&mut f, SIZE, &opts(kdf, sector), b"our passphrase").expect("format")
    };
    assert_eq!(key.len(), 64);
    assert_eq!(key.keyslot(), Some(0));

    let dump = cryptsetup_ok(&["luksDump", img.p()]);
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(
        dump.contains(&format!("sector: {sector} [bytes]")),
        "{dump}"
    );
    assert!(dump.contains("Label:         \tstackbd-test"), "{dump}");
    assert!(dump.contains(&format!("PBKDF:      {kdf}")), "{dump}");

    let good = img.keyfile("good", b"our passphrase");
    let bad = img.keyfile("bad", b"our passphrasE");
    cryptsetup_ok(&["open", "--test-passphrase", "--key-file", &good, img.p()]);
    let (ok, _, _) = cryptsetup(&["open", "--test-passphrase", "--key-file", &bad, img.p()]);
    assert!(!ok, "cryptsetup accepted a wrong passphrase");
    assert_eq!(dumped_volume_key(&img.path, &good), key.as_bytes());

    let second = img.keyfile("second", b"added by cryptsetup");
    let mut args = vec!["luksAddKey", "-q", "--key-file", good.as_str()];
    args.extend(fast_kdf("argon2id"));
    args.extend([img.p(), second.as_str()]);
    cryptsetup_ok(&args);
    assert_eq!(dumped_volume_key(&img.path, &second), key.as_bytes());

    // Our reader agrees, after cryptsetup rewrote the metadata.
    let mut f = img.open();
    let h = Header::read(&mut f, SIZE).unwrap();
    assert!(h.warnings().is_empty(), "{:?}", h.warnings());
    assert_eq!(h.label(), Some("stackbd-test"));
    assert_eq!(h.active_keyslots(), vec![0, 1]);
    assert_eq!(
        h.unlock(&mut f, b"added by cryptsetup", Some(1))
            .unwrap()
            .as_bytes(),
        key.as_bytes()
    );
    assert_eq!(
        h.unlock(&mut f, b"our passphrase", None)
            .unwrap()
            .as_bytes(),
        key.as_bytes()
    );
    let p = h.crypt_params().unwrap();
    assert_eq!(
        (p.sector_size, p.payload_offset_sectors, p.payload_sectors),
        (sector, 32768, None)
    );
}

#[test]
fn format_pbkdf2_512() {
    if have_cryptsetup("format_pbkdf2_512") {
        check("pbkdf2", 512);
    }
}

#[test]
fn format_pbkdf2_4096() {
    if have_cryptsetup("format_pbkdf2_4096") {
        check("pbkdf2", 4096);
    }
}

#[test]
fn format_argon2id_512() {
    if have_cryptsetup("format_argon2id_512") {
        check("argon2id", 512);
    }
}

#[test]
fn format_argon2id_4096() {
    if have_cryptsetup("format_argon2id_4096") {
        check("argon2id", 4096);
    }
}

/// Our own round trip, in memory, and the given UUID is kept.
#[test]
fn format_then_unlock_in_memory() {
    let mut dev = vec![0u8; SIZE as usize];
    let mut o = opts("pbkdf2", 512);
    o.uuid = Some("0123abcd-0000-4000-8000-00000000beef".into());
    let key = format_luks2(&mut dev, SIZE, &o, b"pw").unwrap();
    let h = Header::read(&mut dev, SIZE).unwrap();
    assert_eq!(h.uuid(), "0123abcd-0000-4000-8000-00000000beef");
    assert_eq!(
        h.unlock(&mut dev, b"pw", None).unwrap().as_bytes(),
        key.as_bytes()
    );
    assert!(matches!(
        h.unlock(&mut dev, b"pW", None),
        Err(LuksError::WrongPassphrase)
    ));
}

/// Bad options are refused before anything is written.
#[test]
fn bad_format_options_write_nothing() {
    let mut dev = vec![0u8; SIZE as usize];
    let cases: Vec<(&str, FormatOptions)> = vec![
        (
            "sector",
            FormatOptions {
                sector_size: 1000,
                ..opts("pbkdf2", 512)
            },
        ),
        (
            "cipher",
            FormatOptions {
                cipher: "nosuch-xts-plain64".into(),
                ..opts("pbkdf2", 512)
            },
        ),
        (
            "key",
            FormatOptions {
                key_bytes: 13,
                ..opts("pbkdf2", 512)
            },
        ),
        (
            "label",
            FormatOptions {
                label: "x".repeat(48),
                ..opts("pbkdf2", 512)
            },
        ),
        (
            "uuid",
            FormatOptions {
                uuid: Some("not-a-uuid".into()),
                ..opts("pbkdf2", 512)
            },
        ),
        (
            "offset",
            FormatOptions {
                data_offset: 4096,
                ..opts("pbkdf2", 512)
            },
        ),
        (
            "offset align",
            FormatOptions {
                data_offset: (16 << 20) + 512,
                ..opts("pbkdf2", 512)
            },
        ),
        (
            "digest iters",
            FormatOptions {
                digest_iterations: 10,
                ..opts("pbkdf2", 512)
            },
        ),
        (
            "argon memory",
            FormatOptions {
                kdf: KdfOptions::Argon2 {
                    variant: Argon2Variant::Argon2id,
                    time: 1,
                    memory_kib: 8,
                    parallel: 4,
                },
                ..opts("pbkdf2", 512)
            },
        ),
        (
            "hash",
            FormatOptions {
                kdf: KdfOptions::Pbkdf2 {
                    hash: "md4".into(),
                    iterations: 1000,
                },
                ..opts("pbkdf2", 512)
            },
        ),
    ];
    for (what, o) in cases {
        let e = format_luks2(&mut dev, SIZE, &o, b"pw").expect_err(what);
        assert!(!e.to_string().is_empty());
        assert!(dev.iter().all(|&b| b == 0), "{what}: something was written");
    }
    // A device with no room for data after the 16 MiB header, or not a whole 4096-byte sector.
    let mut small = vec![0u8; 16 << 20];
    assert!(format_luks2(&mut small, 16 << 20, &opts("pbkdf2", 512), b"pw").is_err());
    let mut odd = vec![0u8; (17 << 20) + 512];
    assert!(format_luks2(&mut odd, (17 << 20) + 512, &opts("pbkdf2", 4096), b"pw").is_err());
    assert!(small.iter().chain(odd.iter()).all(|&b| b == 0));
}
