//! Damaged and hostile headers: a bad primary copy falls back to the secondary (and says so),
//! two bad copies give a clear error, damaged keyslot areas and digests fail to unlock cleanly,
//! absurd JSON numbers and bad text are refused with the field named, truncated devices are
//! refused, and random mutations never panic.

mod luks_util;

use luks_util::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use stackbd::luks::luks2::header::{write_copies, BinHeader};
use stackbd::luks::{format_luks2, FormatOptions, Header, HeaderCopy, KdfOptions, LuksError};

const SIZE: u64 = 17 << 20;

/// A small LUKS2 volume made by our format (fast pbkdf2), with its key.
fn base() -> (Vec<u8>, Vec<u8>) {
    let mut dev = vec![0u8; SIZE as usize];
    let o = FormatOptions {
        kdf: KdfOptions::Pbkdf2 {
            hash: "sha256".into(),
            iterations: 1000,
        },
        digest_iterations: 1000,
        ..FormatOptions::default()
    };
    let key = format_luks2(&mut dev, SIZE, &o, b"pw").unwrap();
    (dev, key.as_bytes().to_vec())
}

fn luks2(h: &Header) -> &stackbd::luks::luks2::Luks2Header {
    match h {
        Header::Luks2(h) => h,
        _ => panic!("not LUKS2"),
    }
}

/// The JSON text of the primary copy.
fn json_of(dev: &[u8]) -> Value {
    let area = &dev[4096..16384];
    let end = area.iter().position(|&b| b == 0).unwrap();
    serde_json::from_slice(&area[..end]).unwrap()
}

/// Rewrites both copies with `f` applied to the JSON (checksums valid), as a hostile or buggy
/// writer would.
fn rewrite(dev: &mut Vec<u8>, f: impl FnOnce(&mut Value)) {
    let h = Header::read(dev, SIZE).unwrap();
    let mut bin: BinHeader = luks2(&h).bin.clone();
    bin.seqid += 1;
    let mut v = json_of(dev);
    f(&mut v);
    let text = serde_json::to_vec(&v).unwrap();
    let salt = bin.salt;
    write_copies(dev, &bin, salt, &text).unwrap();
}

#[test]
fn bad_primary_falls_back_to_secondary() {
    let (clean, key) = base();
    // A byte of the binary header (label), of the JSON area, the magic, the version.
    for (at, what) in [
        (30usize, "binary header"),
        (4096 + 20, "JSON area"),
        (0, "magic"),
        (7, "version"),
    ] {
        let mut dev = clean.clone();
        dev[at] ^= 0x5a;
        let h = Header::read(&mut dev, SIZE).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(luks2(&h).copy, HeaderCopy::Secondary, "{what}");
        let w = h.warnings().join("\n");
        assert!(
            w.contains("primary LUKS2 header is bad") && w.contains("using the secondary"),
            "{what}: {w}"
        );
        if at > 7 {
            assert!(w.contains("checksum"), "{what}: {w}");
        }
        assert_eq!(
            h.unlock(&mut dev, b"pw", None).unwrap().as_bytes(),
            &key[..]
        );
    }
}

#[test]
fn bad_secondary_is_reported_and_primary_used() {
    let (mut dev, _) = base();
    dev[16384 + 4096 + 3] ^= 1;
    let h = Header::read(&mut dev, SIZE).unwrap();
    assert_eq!(luks2(&h).copy, HeaderCopy::Primary);
    assert!(
        h.warnings()
            .join("")
            .contains("secondary LUKS2 header is bad"),
        "{:?}",
        h.warnings()
    );
}

#[test]
fn both_copies_bad_is_a_clear_error() {
    let (mut dev, _) = base();
    dev[4096 + 20] ^= 1;
    dev[16384 + 4096 + 20] ^= 1;
    let e = Header::read(&mut dev, SIZE).unwrap_err();
    assert!(matches!(e, LuksError::BothCopiesBad { .. }), "{e}");
    let m = e.to_string();
    assert!(
        m.contains("primary LUKS2 header: checksum")
            && m.contains("secondary LUKS2 header: checksum"),
        "{m}"
    );
    // Both magics gone: not LUKS at all.
    let (mut dev, _) = base();
    dev[0] = 0;
    dev[16384] = 0;
    assert!(matches!(
        Header::read(&mut dev, SIZE),
        Err(LuksError::NotLuks)
    ));
}

#[test]
fn newer_secondary_wins() {
    let (mut dev, _) = base();
    let h = Header::read(&mut dev, SIZE).unwrap();
    let mut bin = luks2(&h).bin.clone();
    bin.seqid += 7;
    bin.label = "newer".into();
    bin.hdr_offset = 16384;
    let text = serde_json::to_vec(&json_of(&dev)).unwrap();
    let area =
        stackbd::luks::luks2::header::build_copy(&bin, &text, HeaderCopy::Secondary).unwrap();
    dev[16384..32768].copy_from_slice(&area);
    let h = Header::read(&mut dev, SIZE).unwrap();
    assert_eq!(
        (luks2(&h).copy, h.label()),
        (HeaderCopy::Secondary, Some("newer"))
    );
    assert!(
        h.warnings().join("").contains("differ"),
        "{:?}",
        h.warnings()
    );
}

#[test]
fn damaged_keyslot_area_or_digest_fails_cleanly() {
    let (clean, _) = base();
    let mut dev = clean.clone();
    dev[32768 + 1000] ^= 0x80;
    let h = Header::read(&mut dev, SIZE).unwrap();
    assert!(matches!(
        h.unlock(&mut dev, b"pw", None),
        Err(LuksError::WrongPassphrase)
    ));
    assert!(matches!(
        h.unlock(&mut dev, b"pw", Some(0)),
        Err(LuksError::WrongPassphrase)
    ));

    let mut dev = clean.clone();
    rewrite(&mut dev, |v| {
        let d = v["digests"]["0"]["digest"].as_str().unwrap().to_string();
        let flipped = if d.starts_with('A') {
            d.replacen('A', "B", 1)
        } else {
            format!("A{}", &d[1..])
        };
        v["digests"]["0"]["digest"] = json!(flipped);
    });
    let h = Header::read(&mut dev, SIZE).unwrap();
    assert!(h.warnings().is_empty());
    let e = h.unlock(&mut dev, b"pw", None).unwrap_err();
    assert!(matches!(e, LuksError::WrongPassphrase));
    assert!(
        e.to_string().contains("damaged keyslot area or digest"),
        "{e}"
    );
}

/// Hostile JSON values, each with a checksum that verifies: refused, with the field named.
#[test]
fn absurd_json_is_refused_with_the_field_named() {
    let (clean, _) = base();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "keyslots.0.area",
            Box::new(|v| v["keyslots"]["0"]["area"]["offset"] = json!("999999999999")),
        ),
        (
            "keyslots.0.area.size",
            Box::new(|v| v["keyslots"]["0"]["area"]["size"] = json!("99999999999999999999999")),
        ),
        (
            "keyslots.0.area.offset",
            Box::new(|v| v["keyslots"]["0"]["area"]["offset"] = json!("-4096")),
        ),
        (
            "keyslots.0.area.offset",
            Box::new(|v| v["keyslots"]["0"]["area"]["offset"] = json!(32768)),
        ),
        (
            "keyslots.0.area",
            Box::new(|v| v["keyslots"]["0"]["area"]["offset"] = json!("18446744073709551104")),
        ),
        (
            "keyslots.0.key_size",
            Box::new(|v| v["keyslots"]["0"]["key_size"] = json!(-1)),
        ),
        (
            "keyslots.0.key_size",
            Box::new(|v| v["keyslots"]["0"]["key_size"] = json!(1_000_000_000u64)),
        ),
        (
            "keyslots.0.key_size",
            Box::new(|v| v["keyslots"]["0"]["key_size"] = json!(1.5)),
        ),
        (
            "keyslots.0.area",
            Box::new(|v| v["keyslots"]["0"]["af"]["stripes"] = json!(4_000_000_000u64)),
        ),
        (
            "keyslots.0.kdf.iterations",
            Box::new(|v| v["keyslots"]["0"]["kdf"]["iterations"] = json!(1u64 << 40)),
        ),
        (
            "keyslots.0.kdf.salt",
            Box::new(|v| v["keyslots"]["0"]["kdf"]["salt"] = json!("***")),
        ),
        (
            "keyslots.0.kdf.hash",
            Box::new(|v| v["keyslots"]["0"]["kdf"]["hash"] = json!("whirlpool")),
        ),
        (
            "keyslots.0.kdf.memory",
            Box::new(
                |v| v["keyslots"]["0"]["kdf"] = json!({"type": "argon2id", "time": 1, "memory": 5u64 << 20, "cpus": 1, "salt": "AAAA"}),
            ),
        ),
        (
            "keyslots.99",
            Box::new(|v| v["keyslots"]["99"] = v["keyslots"]["0"].clone()),
        ),
        (
            "keyslots.x",
            Box::new(|v| v["keyslots"]["x"] = v["keyslots"]["0"].clone()),
        ),
        (
            "keyslots.1.area",
            Box::new(|v| v["keyslots"]["1"] = v["keyslots"]["0"].clone()),
        ),
        (
            "segments.0.offset",
            Box::new(|v| v["segments"]["0"]["offset"] = json!("36028797018963968")),
        ),
        (
            "segments.0.offset",
            Box::new(|v| v["segments"]["0"]["offset"] = json!("4096")),
        ),
        (
            "segments.0.size",
            Box::new(|v| v["segments"]["0"]["size"] = json!("18446744073709551615")),
        ),
        (
            "segments.0.sector_size",
            Box::new(|v| v["segments"]["0"]["sector_size"] = json!(3000)),
        ),
        (
            "segments.0.iv_tweak",
            Box::new(|v| v["segments"]["0"]["iv_tweak"] = json!("18446744073709551615")),
        ),
        (
            "digests.0.keyslots",
            Box::new(|v| v["digests"]["0"]["keyslots"] = json!(["5"])),
        ),
        (
            "digests.0.segments",
            Box::new(|v| v["digests"]["0"]["segments"] = json!(["3"])),
        ),
        (
            "digests.0.digest",
            Box::new(|v| v["digests"]["0"]["digest"] = json!("A".repeat(200))),
        ),
        (
            "config.json_size",
            Box::new(|v| v["config"]["json_size"] = json!("4096")),
        ),
        (
            "config.keyslots_size",
            Box::new(|v| v["config"]["keyslots_size"] = json!("18446744073709551615")),
        ),
        (
            "config.keyslots_size",
            Box::new(|v| v["config"]["keyslots_size"] = json!("123")),
        ),
        (
            "config",
            Box::new(|v| {
                v.as_object_mut()
                    .unwrap()
                    .remove("config")
                    .map(drop)
                    .unwrap()
            }),
        ),
        ("(document)", Box::new(|v| *v = json!([1, 2, 3]))),
    ];
    for (path, edit) in cases {
        let mut dev = clean.clone();
        rewrite(&mut dev, |v| edit(v));
        let e = Header::read(&mut dev, SIZE).expect_err(path);
        let m = e.to_string();
        assert!(matches!(e, LuksError::BothCopiesBad { .. }), "{path}: {m}");
        assert!(m.contains(&format!("JSON metadata: {path}")), "{path}: {m}");
    }
}

/// Bad bytes where text belongs: JSON that is not UTF-8, a label that is not.
#[test]
fn bad_utf8_is_refused() {
    let (clean, _) = base();
    let h = Header::read(&mut clean.clone(), SIZE).unwrap();
    let bin = luks2(&h).bin.clone();
    let mut text = serde_json::to_vec(&json_of(&clean)).unwrap();
    let at = text.windows(6).position(|w| w == b"sha256").unwrap();
    text[at] = 0xff;
    let mut dev = clean.clone();
    write_copies(&mut dev, &bin, bin.salt, &text).unwrap();
    let m = Header::read(&mut dev, SIZE).unwrap_err().to_string();
    assert!(m.contains("not valid JSON"), "{m}");

    let mut dev = clean.clone();
    dev[24] = 0xc3; // label: a lone UTF-8 lead byte
    dev[16384 + 24] = 0xc3;
    let m = Header::read(&mut dev, SIZE).unwrap_err().to_string();
    assert!(m.contains("label: not UTF-8"), "{m}");
}

#[test]
fn truncated_devices_are_refused() {
    let (clean, _) = base();
    for len in [
        0usize,
        7,
        8,
        100,
        4095,
        4096,
        16383,
        16384,
        20000,
        32768,
        40000,
        1 << 20,
        (16 << 20) - 4096,
    ] {
        let mut dev = clean[..len].to_vec();
        let e = Header::read(&mut dev, len as u64).expect_err("truncated");
        assert!(!e.to_string().is_empty());
    }
    // Cut right at the data offset: the metadata is whole (as in a header backup), but there is
    // nothing to map.
    let mut dev = clean[..16 << 20].to_vec();
    let h = Header::read(&mut dev, 16 << 20).unwrap();
    let m = h
        .crypt_params()
        .unwrap()
        .payload_sectors_on(16 << 20)
        .unwrap_err()
        .to_string();
    assert!(m.contains("no data area"), "{m}");
    // A reader that claims more than it has: an I/O error, not a panic.
    let mut dev = clean[..100_000].to_vec();
    let h = Header::read(&mut dev, SIZE).unwrap();
    let e = h.unlock(&mut dev, b"pw", None).unwrap_err();
    assert!(
        matches!(e, LuksError::Io { .. }) && e.to_string().contains("keyslot 0"),
        "{e}"
    );
}

#[test]
fn luks1_damage() {
    if !have_cryptsetup("luks1_damage") {
        return;
    }
    let img = Img::new(4 << 20);
    let kf = img.keyfile("pw", b"pw");
    let mut args = vec!["luksFormat", "-q", "--type", "luks1"];
    args.extend(fast_kdf("pbkdf2"));
    args.extend(["--key-file", kf.as_str(), img.p()]);
    cryptsetup_ok(&args);
    let clean = img.bytes();
    let size = clean.len() as u64;
    // Key material damaged: wrong passphrase, cleanly.
    let mut dev = clean.clone();
    dev[8 * 512 + 77] ^= 1;
    let h = Header::read(&mut dev, size).unwrap();
    assert!(matches!(
        h.unlock(&mut dev, b"pw", None),
        Err(LuksError::WrongPassphrase)
    ));
    // MK digest damaged.
    let mut dev = clean.clone();
    dev[112] ^= 1;
    let h = Header::read(&mut dev, size).unwrap();
    assert!(matches!(
        h.unlock(&mut dev, b"pw", None),
        Err(LuksError::WrongPassphrase)
    ));
    // Absurd fields.
    let field = |at: usize, v: u32, expect: &str| {
        let mut dev = clean.clone();
        dev[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let m = Header::read(&mut dev, size).unwrap_err().to_string();
        assert!(m.contains(expect), "{expect}: {m}");
    };
    field(104, u32::MAX, "payload-offset");
    field(108, 0, "key-bytes");
    field(108, 100_000, "key-bytes");
    field(208, 0x1234, "key slot 0 active");
    field(208 + 40, u32::MAX, "key slot 0 key material");
    field(208 + 44, u32::MAX, "key slot 0");
    field(208 + 44, 0, "key slot 0 stripes");
    field(208 + 4, 0, "key slot 0 iterations");
    for len in [0usize, 10, 591, 592, 4096, 8 * 512 + 100] {
        let mut dev = clean[..len].to_vec();
        assert!(Header::read(&mut dev, len as u64).is_err(), "{len}");
    }
}

fn exercise(dev: &mut Vec<u8>, size: u64) {
    if let Ok(h) = Header::read(dev, size) {
        let _ = h.dump();
        let _ = h.crypt_params();
        let _ = h.active_keyslots();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random byte changes anywhere in both LUKS2 metadata copies never panic.
    #[test]
    fn mutated_luks2_bytes_never_panic(muts in prop::collection::vec((0usize..32768, any::<u8>()), 1..16)) {
        thread_local!(static BASE: Vec<u8> = base().0);
        let mut dev = BASE.with(|b| b.clone());
        for (at, v) in muts {
            dev[at] = v;
        }
        exercise(&mut dev, SIZE);
    }

    /// Random edits of the JSON text, re-checksummed so they reach the JSON validator, never
    /// panic; whatever is accepted dumps and maps without panicking.
    #[test]
    fn mutated_json_never_panics(muts in prop::collection::vec((0usize..2000, any::<u8>()), 1..8)) {
        thread_local!(static BASE: Vec<u8> = base().0);
        let mut dev = BASE.with(|b| b.clone());
        let h = Header::read(&mut dev, SIZE).unwrap();
        let bin = luks2(&h).bin.clone();
        let mut text = serde_json::to_vec(&json_of(&dev)).unwrap();
        for (at, v) in muts {
            let i = at % text.len();
            text[i] = if v == 0 { b'9' } else { v };
        }
        write_copies(&mut dev, &bin, bin.salt, &text).unwrap();
        exercise(&mut dev, SIZE);
    }
}
