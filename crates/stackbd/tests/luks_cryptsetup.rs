//! Images made by cryptsetup: our reader parses them and our unlock returns exactly the volume
//! key cryptsetup prints, for LUKS2 (argon2id, argon2i, pbkdf2; 512 and 4096-byte sectors) and
//! LUKS1, for a second keyslot, with slot selection; wrong passphrases fail cleanly.

mod luks_util;

use luks_util::*;
use stackbd::luks::{Header, LuksError};

const SIZE: u64 = 20 << 20;

/// Formats an image with cryptsetup and returns it with the key file path.
fn make(kind: &str, kdf: &str, sector: Option<&str>) -> (Img, String) {
    let img = Img::new(SIZE);
    let kf = img.keyfile("pw1", b"first passphrase");
    let mut args = vec!["luksFormat", "-q", "--type", kind];
    args.extend(fast_kdf(kdf));
    if let Some(s) = sector {
        args.extend(["--sector-size", s]);
    }
    args.extend(["--key-file", kf.as_str(), img.p()]);
    cryptsetup_ok(&args);
    (img, kf)
}

fn check_unlock(kind: &str, kdf: &str, sector: Option<&str>) {
    let (img, kf) = make(kind, kdf, sector);
    let want = dumped_volume_key(&img.path, &kf);
    let mut f = img.open();
    let h = Header::read(&mut f, img.size()).expect("read header");
    assert_eq!(h.version(), if kind == "luks1" { 1 } else { 2 });
    assert!(h.warnings().is_empty(), "{:?}", h.warnings());
    assert_eq!(h.active_keyslots(), vec![0]);
    let key = h.unlock(&mut f, b"first passphrase", None).expect("unlock");
    assert_eq!(key.as_bytes(), &want[..], "{kind} {kdf} {sector:?}");
    assert_eq!(key.keyslot(), Some(0));
    assert!(h.verify_key(key.as_bytes()).unwrap());
    assert!(matches!(
        h.unlock(&mut f, b"first passphrasf", None),
        Err(LuksError::WrongPassphrase)
    ));
    assert!(matches!(
        h.unlock(&mut f, b"", Some(0)),
        Err(LuksError::WrongPassphrase)
    ));
    assert!(matches!(
        h.unlock(&mut f, b"first passphrase", Some(3)),
        Err(LuksError::NoSuchKeyslot(3))
    ));

    let p = h.crypt_params().expect("crypt params");
    assert_eq!(p.cipher, "aes-xts-plain64");
    assert_eq!(p.key_bytes, 64);
    assert_eq!(p.iv_offset, 0);
    assert!(!p.iv_large_sectors);
    let ss: u32 = sector.map_or(512, |s| s.parse().unwrap());
    assert_eq!(p.sector_size, ss);
    // cryptsetup puts the data at 16 MiB for LUKS2 and at 2 MiB (4096 sectors) for LUKS1.
    let off = if kind == "luks1" { 4096 } else { 32768 };
    assert_eq!(p.payload_offset_sectors, off);
    assert_eq!(p.payload_sectors, None);
    assert_eq!(p.payload_sectors_on(SIZE).unwrap(), SIZE / 512 - off);

    let dump = h.dump();
    assert!(dump.contains(h.uuid()), "{dump}");
    assert!(
        dump.contains(&format!("Version:       \t{}", h.version())),
        "{dump}"
    );
}

#[test]
fn luks2_argon2id_512() {
    if have_cryptsetup("luks2_argon2id_512") {
        check_unlock("luks2", "argon2id", Some("512"));
    }
}

#[test]
fn luks2_argon2id_4096() {
    if have_cryptsetup("luks2_argon2id_4096") {
        check_unlock("luks2", "argon2id", Some("4096"));
    }
}

#[test]
fn luks2_argon2i() {
    if have_cryptsetup("luks2_argon2i") {
        check_unlock("luks2", "argon2i", Some("512"));
    }
}

#[test]
fn luks2_pbkdf2_4096() {
    if have_cryptsetup("luks2_pbkdf2_4096") {
        check_unlock("luks2", "pbkdf2", Some("4096"));
    }
}

#[test]
fn luks1_pbkdf2() {
    if have_cryptsetup("luks1_pbkdf2") {
        check_unlock("luks1", "pbkdf2", None);
    }
}

/// A second keyslot added by cryptsetup opens too, alone or by number; each passphrase opens
/// only its own slot.
fn check_second_slot(kind: &str) {
    let (img, kf) = make(kind, "pbkdf2", (kind == "luks2").then_some("512"));
    let kf2 = img.keyfile("pw2", b"second one");
    let mut args = vec!["luksAddKey", "-q", "--key-file", kf.as_str()];
    args.extend(fast_kdf(if kind == "luks1" {
        "pbkdf2"
    } else {
        "argon2id"
    }));
    args.extend([img.p(), kf2.as_str()]);
    cryptsetup_ok(&args);
    let want = dumped_volume_key(&img.path, &kf2);
    let mut f = img.open();
    let h = Header::read(&mut f, img.size()).unwrap();
    assert_eq!(h.active_keyslots(), vec![0, 1]);
    let k = h.unlock(&mut f, b"second one", None).unwrap();
    assert_eq!((k.as_bytes(), k.keyslot()), (&want[..], Some(1)));
    let k = h.unlock(&mut f, b"second one", Some(1)).unwrap();
    assert_eq!(k.as_bytes(), &want[..]);
    assert!(matches!(
        h.unlock(&mut f, b"second one", Some(0)),
        Err(LuksError::WrongPassphrase)
    ));
    assert!(matches!(
        h.unlock(&mut f, b"first passphrase", Some(1)),
        Err(LuksError::WrongPassphrase)
    ));
    assert_eq!(
        h.unlock(&mut f, b"first passphrase", Some(0))
            .unwrap()
            .as_bytes(),
        &want[..]
    );
    assert!(h.dump().contains("  1: luks2") || h.dump().contains("Key Slot 1: ENABLED"));
}

#[test]
fn luks2_second_keyslot() {
    if have_cryptsetup("luks2_second_keyslot") {
        check_second_slot("luks2");
    }
}

#[test]
fn luks1_second_keyslot() {
    if have_cryptsetup("luks1_second_keyslot") {
        check_second_slot("luks1");
    }
}

/// A label set by cryptsetup shows, and the header read from memory equals the one from a file.
#[test]
fn luks2_label_and_memory_device() {
    if !have_cryptsetup("luks2_label_and_memory_device") {
        return;
    }
    let img = Img::new(SIZE);
    let kf = img.keyfile("pw1", b"pw");
    let mut args = vec![
        "luksFormat",
        "-q",
        "--type",
        "luks2",
        "--label",
        "my-volume",
    ];
    args.extend(fast_kdf("pbkdf2"));
    args.extend(["--key-file", kf.as_str(), img.p()]);
    cryptsetup_ok(&args);
    let mut mem = img.bytes();
    let h = Header::read(&mut mem, SIZE).unwrap();
    assert_eq!(h.label(), Some("my-volume"));
    assert!(h.dump().contains("Label:         \tmy-volume"));
    let k = h.unlock(&mut mem, b"pw", None).unwrap();
    assert_eq!(k.as_bytes(), &dumped_volume_key(&img.path, &kf)[..]);
}
