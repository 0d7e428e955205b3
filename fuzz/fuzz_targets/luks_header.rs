//! LUKS header parsing (no KDF, no unlock): arbitrary bytes as a device, and arbitrary JSON text
//! wrapped in a LUKS2 binary header with a valid checksum so it reaches the JSON validator.
//! Reading must return a header or an error, never panic; a header read must dump and map.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackbd::luks::luks2::header::{build_copy, BinHeader};
use stackbd::luks::{Header, HeaderCopy};

fn exercise(dev: &[u8], size: u64) {
    let mut d = dev;
    if let Ok(h) = Header::read(&mut d, size) {
        let _ = h.dump();
        let _ = h.crypt_params();
        let _ = h.active_keyslots();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Raw bytes as the device; the claimed size may exceed what is there.
        let claimed = if mode & 2 == 0 {
            rest.len() as u64
        } else {
            20 << 20
        };
        exercise(rest, claimed);
        return;
    }
    // JSON text in a valid 16 KiB metadata area at 0 (and the same at 16 KiB when asked).
    let bin = BinHeader {
        hdr_size: 16384,
        seqid: 1,
        label: String::new(),
        csum_alg: "sha256".into(),
        salt: [0; 64],
        uuid: "00000000-0000-4000-8000-000000000000".into(),
        subsystem: String::new(),
        hdr_offset: 0,
    };
    let Ok(area) = build_copy(&bin, rest, HeaderCopy::Primary) else {
        return;
    };
    let mut dev = vec![0u8; 17 << 20];
    dev[..area.len()].copy_from_slice(&area);
    if mode & 2 != 0 {
        let second = BinHeader {
            hdr_offset: 16384,
            ..bin
        };
        if let Ok(a2) = build_copy(&second, rest, HeaderCopy::Secondary) {
            dev[16384..16384 + a2.len()].copy_from_slice(&a2);
        }
    }
    exercise(&dev, dev.len() as u64);
});
