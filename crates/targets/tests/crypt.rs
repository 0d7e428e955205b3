//! The crypt target through the engine: what lands on the device is dm-crypt's ciphertext (an
//! independent `SectorCipher` encryption of the plaintext), what a client reads back is the
//! plaintext, the submitter's buffer is never changed, table text, refused tables, messages,
//! discards, write-zeroes, sector_size 4096 alignment, a random model test through a stack, and
//! zero heap allocations per I/O at QD32.

use stackbd_core::{DataBuf, DevId, Engine, Op, ReactorConfig, Request, Status, SuspendOpts};
use stackbd_targets::crypt::cipher::{CipherSpec, SectorCipher};
use std::sync::Arc;

#[global_allocator]
static ALLOC: stackbd_core::alloc_count::CountingAlloc = stackbd_core::alloc_count::CountingAlloc;

const KEY64: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                     f0e0d0c0b0a090807060504030201000ffeeddccbbaa99887766554433221100";
const KEY32: &str = "2b7e151628aed2a6abf7158809cf4f3c762e7160f38b4da56a784d9045190cfe";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
    fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            *x = self.next() as u8;
        }
    }
}

fn engine_with_leaves(names: &[&str], sectors: u64) -> Engine {
    let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
    for m in names {
        e.add_leaf(
            m,
            Arc::new(stackbd_leaves::MemLeaf::new(sectors * 512).unwrap()),
        )
        .unwrap();
    }
    e
}

fn read(e: &mut Engine, dev: DevId, sector: u64, sectors: usize) -> (Status, Vec<u8>) {
    let mut b = vec![0u8; sectors * 512];
    let s = e.read_at(dev, sector, &mut b);
    (s, b)
}

fn ok_read(e: &mut Engine, dev: DevId, sector: u64, sectors: usize) -> Vec<u8> {
    let (s, b) = read(e, dev, sector, sectors);
    assert_eq!(s, Status::Ok);
    b
}

fn cipher(spec: &str, key: &str, sector: usize) -> SectorCipher {
    SectorCipher::new(&CipherSpec::parse(spec).unwrap(), &unhex(key), sector).unwrap()
}

/// Writes land encrypted (IV = target sector + iv_offset), at the device offset; reads decrypt;
/// the writer's buffer is untouched.
#[test]
fn writes_land_as_dm_crypt_ciphertext_and_read_back() {
    let mut e = engine_with_leaves(&["m0"], 4096);
    let v = e
        .create(
            "v",
            Some(&format!("0 2048 crypt aes-xts-plain64 {KEY64} 100 m0 64")),
        )
        .unwrap();
    let leaf = e.dev_id("m0").unwrap();
    let mut rng = Lcg(1);
    let mut data = vec![0u8; 24 * 512];
    rng.fill(&mut data);
    let orig = data.clone();
    assert_eq!(e.write_at(v, 40, &data), Status::Ok);
    assert_eq!(data, orig, "the submitter's buffer changed");
    let mut want = orig.clone();
    cipher("aes-xts-plain64", KEY64, 512).encrypt(140, 1, &mut want);
    assert_eq!(
        ok_read(&mut e, leaf, 104, 24),
        want,
        "ciphertext on the device"
    );
    assert_eq!(ok_read(&mut e, v, 40, 24), orig);
    // A read that starts inside the written range decrypts with its own IVs.
    assert_eq!(ok_read(&mut e, v, 45, 3), orig[5 * 512..8 * 512].to_vec());
}

#[test]
fn sector_size_4096_refuses_misaligned_io_and_uses_dm_ivs() {
    for (large, spec) in [
        (false, "aes-xts-plain64"),
        (true, "aes-xts-plain64"),
        (false, "aes-cbc-essiv:sha256"),
    ] {
        let key = if spec.contains("cbc") { KEY32 } else { KEY64 };
        let mut e = engine_with_leaves(&["m0"], 4096);
        let opts = if large {
            "2 sector_size:4096 iv_large_sectors"
        } else {
            "1 sector_size:4096"
        };
        let v = e
            .create(
                "v",
                Some(&format!("0 2048 crypt {spec} {key} 16 m0 0 {opts}")),
            )
            .unwrap();
        let leaf = e.dev_id("m0").unwrap();
        let mut data = vec![0u8; 16 * 512];
        Lcg(2).fill(&mut data);
        assert_eq!(e.write_at(v, 8, &data), Status::Ok);
        let mut want = data.clone();
        let c = cipher(spec, key, 4096);
        if large {
            c.encrypt((8 + 16) / 8, 1, &mut want);
        } else {
            c.encrypt(8 + 16, 8, &mut want);
        }
        assert_eq!(ok_read(&mut e, leaf, 8, 16), want, "{spec} large {large}");
        assert_eq!(ok_read(&mut e, v, 8, 16), data);
        // Not a whole 4096-byte sector: refused, nothing written.
        assert_ne!(e.write_at(v, 9, &[7u8; 512]), Status::Ok);
        assert_ne!(read(&mut e, v, 8, 1).0, Status::Ok);
        assert_eq!(ok_read(&mut e, leaf, 8, 16), want);
    }
}

#[test]
fn table_prints_dms_canonical_form() {
    let dir = std::env::temp_dir().join(format!("stackbd-crypt-kf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kf = dir.join("key");
    std::fs::write(&kf, unhex(KEY64)).unwrap();
    let kfs = kf.to_str().unwrap();
    let upper = KEY64.to_uppercase();
    let cases = [
        (format!("crypt aes-xts-plain64 {upper} 0 m0 0"), format!("crypt aes-xts-plain64 {KEY64} 0 m0 0")),
        (
            format!("crypt aes-xts-plain64 {KEY64} 8 m0 8 3 SECTOR_SIZE:4096 iv_large_sectors allow_discards"),
            format!("crypt aes-xts-plain64 {KEY64} 8 m0 8 3 allow_discards sector_size:4096 iv_large_sectors"),
        ),
        (
            format!("crypt aes-xts-plain64 {KEY64} 0 m0 0 5 no_write_workqueue no_read_workqueue submit_from_crypt_cpus same_cpu_crypt sector_size:512"),
            format!("crypt aes-xts-plain64 {KEY64} 0 m0 0 4 same_cpu_crypt submit_from_crypt_cpus no_read_workqueue no_write_workqueue"),
        ),
        (format!("crypt capi:xts(aes)-plain64 :64:keyfile:{kfs} 0 m0 0"), format!("crypt capi:xts(aes)-plain64 :64:keyfile:{kfs} 0 m0 0")),
        (format!("crypt aes-cbc-essiv:sha256 {KEY32} 0 m0 0 0"), format!("crypt aes-cbc-essiv:sha256 {KEY32} 0 m0 0")),
    ];
    for (line, want) in cases {
        let mut e = engine_with_leaves(&["m0"], 4096);
        e.create("v", Some(&format!("0 1024 {line}")))
            .unwrap_or_else(|err| panic!("{line}: {err}"));
        let t = e.table("v", false).unwrap();
        assert_eq!(t.trim(), format!("0 1024 {want}"));
        // The printed table loads again to the same text.
        e.create("w", Some(t.trim())).unwrap();
        assert_eq!(e.table("w", false).unwrap(), t);
        assert_eq!(e.status("v").unwrap().trim(), "0 1024 crypt");
    }
    // A keyfile table never prints the key.
    let mut e = engine_with_leaves(&["m0"], 4096);
    e.create(
        "v",
        Some(&format!(
            "0 1024 crypt aes-xts-plain64 :64:keyfile:{kfs} 0 m0 0"
        )),
    )
    .unwrap();
    assert!(!e.table("v", false).unwrap().contains(&KEY64[..16]));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_tables_are_refused_with_a_reason() {
    let dir = std::env::temp_dir().join(format!("stackbd-crypt-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("short"), [1u8; 32]).unwrap();
    let short = dir.join("short");
    let short = short.to_str().unwrap();
    let k = KEY64;
    let cases: Vec<(String, &str)> = vec![
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0"),
            "Not enough arguments",
        ),
        (
            format!("0 1024 crypt serpent-xts-plain64 {k} 0 m0 0"),
            "only aes",
        ),
        (
            format!("0 1024 crypt aes-xts-benbi {k} 0 m0 0"),
            "not supported",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {} 0 m0 0", &k[..62]),
            "key must be",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {}zz 0 m0 0", &k[..126]),
            "not a hex digit",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {}a 0 m0 0", &k[..126]),
            "even number",
        ),
        (
            format!("0 1024 crypt aes-cbc-plain64 {k} 0 m0 0"),
            "key must be",
        ),
        (
            "0 1024 crypt aes-xts-plain64 - 0 m0 0".to_string(),
            "empty key",
        ),
        (
            "0 1024 crypt aes-xts-plain64 :64:logon:cryptsetup:x 0 m0 0".to_string(),
            "keyring",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 :64:keyfile:{short} 0 m0 0"),
            "holds 32 bytes",
        ),
        (
            "0 1024 crypt aes-xts-plain64 :64:keyfile:/nonexistent/k 0 m0 0".to_string(),
            "cannot read",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 0 1 bogus"),
            "Invalid feature",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 0 2 allow_discards"),
            "Invalid number of feature args",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 0 1 allow_discards x"),
            "Invalid number of feature args",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 0 x"),
            "Invalid number of feature args",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 0 1 sector_size:1024x"),
            "sector_size",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 0 1 sector_size:8192"),
            "sector_size",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 0 1 sector_size:768"),
            "sector_size",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 0 1 integrity:28:aead"),
            "integrity",
        ),
        (
            format!("0 1020 crypt aes-xts-plain64 {k} 0 m0 0 1 sector_size:4096"),
            "not multiple of sector_size",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 4 m0 0 1 sector_size:4096"),
            "iv_offset",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 4 1 sector_size:4096"),
            "Invalid device sector",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 18446744073709551615 m0 0"),
            "overflows",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} x m0 0"),
            "iv_offset",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 m0 3500"),
            "passes the end",
        ),
        (
            format!("0 1024 crypt aes-xts-plain64 {k} 0 nodev 0"),
            "unknown device",
        ),
    ];
    for (line, why) in cases {
        let mut e = engine_with_leaves(&["m0"], 4096);
        let err = e.create("v", Some(&line)).expect_err(&line).to_string();
        assert!(err.contains(why), "{line}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn key_messages_only_while_suspended_and_wipe_fails_io() {
    let mut e = engine_with_leaves(&["m0"], 4096);
    let v = e
        .create(
            "v",
            Some(&format!("0 1024 crypt aes-xts-plain64 {KEY64} 0 m0 0")),
        )
        .unwrap();
    let data = vec![0x5au8; 4096];
    assert_eq!(e.write_at(v, 0, &data), Status::Ok);
    for argv in [vec!["key", "wipe"], vec!["key", "set", KEY64]] {
        let err = e
            .message("v", 0, &argv)
            .expect_err("refused while live")
            .to_string();
        assert!(err.contains("not suspended"), "{err}");
    }
    assert_eq!(ok_read(&mut e, v, 0, 8), data);
    e.suspend("v", SuspendOpts::default()).unwrap();
    e.message("v", 0, &["key", "wipe"]).unwrap();
    e.resume("v").unwrap();
    assert!(e.table("v", false).unwrap().contains(&"0".repeat(128)));
    assert_eq!(read(&mut e, v, 0, 8).0, Status::IoError);
    assert_eq!(e.write_at(v, 0, &data), Status::IoError);
    e.suspend("v", SuspendOpts::default()).unwrap();
    assert!(
        e.message("v", 0, &["key", "set", &KEY64[..48]]).is_err(),
        "wrong length"
    );
    e.message("v", 0, &["key", "set", KEY64]).unwrap();
    e.resume("v").unwrap();
    assert_eq!(ok_read(&mut e, v, 0, 8), data);
    assert!(e.table("v", false).unwrap().contains(KEY64));
    assert!(e.message("v", 0, &["key", "bogus"]).is_err());
}

#[test]
fn discards_need_allow_discards_and_write_zeroes_write_encrypted_zeros() {
    let mut e = engine_with_leaves(&["m0"], 4096);
    let v = e
        .create(
            "v",
            Some(&format!("0 1024 crypt aes-xts-plain64 {KEY64} 0 m0 0")),
        )
        .unwrap();
    let leaf = e.dev_id("m0").unwrap();
    assert_eq!(e.write_at(v, 0, &[9u8; 8192]), Status::Ok);
    assert_eq!(e.discard(v, 0, 8), Status::NotSupported);
    assert_eq!(ok_read(&mut e, v, 0, 16), vec![9u8; 8192]);
    assert_eq!(e.write_zeroes(v, 4, 8), Status::Ok);
    let mut want = vec![0u8; 8 * 512];
    cipher("aes-xts-plain64", KEY64, 512).encrypt(4, 1, &mut want);
    assert_eq!(
        ok_read(&mut e, leaf, 4, 8),
        want,
        "encrypted zeros on the device"
    );
    assert_eq!(ok_read(&mut e, v, 4, 8), vec![0u8; 4096]);
    assert_eq!(e.flush(v), Status::Ok);

    let mut e = engine_with_leaves(&["m0"], 4096);
    let v = e
        .create(
            "v",
            Some(&format!(
                "0 1024 crypt aes-xts-plain64 {KEY64} 0 m0 0 1 allow_discards"
            )),
        )
        .unwrap();
    let leaf = e.dev_id("m0").unwrap();
    assert_eq!(e.write_at(v, 0, &[9u8; 8192]), Status::Ok);
    assert_eq!(e.discard(v, 0, 8), Status::Ok);
    assert_eq!(
        ok_read(&mut e, leaf, 0, 8),
        vec![0u8; 4096],
        "discard reached the mem leaf"
    );
}

/// Random reads, writes, flushes, write-zeroes and discards through `linear -> crypt ->
/// striped -> mem` (and a crypt with sector_size 4096) against a flat plaintext model; at the
/// end the striped device holds exactly the independent encryption of the model.
#[test]
fn model_through_a_stack_matches_plaintext_and_ciphertext() {
    for (ss, opts) in [
        (512usize, "1 allow_discards"),
        (4096, "3 allow_discards sector_size:4096 iv_large_sectors"),
    ] {
        let leaf_sectors = 8192u64;
        let mut e = engine_with_leaves(&["m0", "m1"], leaf_sectors);
        let size = 2 * leaf_sectors;
        e.create("s", Some(&format!("0 {size} striped 2 64 m0 0 m1 0")))
            .unwrap();
        let clen = size - 1024;
        e.create(
            "c",
            Some(&format!(
                "0 {clen} crypt aes-xts-plain64 {KEY64} 0 s 1024 {opts}"
            )),
        )
        .unwrap();
        let top = e
            .create("top", Some(&format!("0 {clen} linear c 0")))
            .unwrap();
        let s = e.dev_id("s").unwrap();
        let units = (ss / 512) as u64;
        let mut model = vec![0u8; clen as usize * 512];
        // Start from a known state: everything written once.
        let mut rng = Lcg(ss as u64);
        rng.fill(&mut model);
        for at in (0..clen).step_by(2048) {
            let n = 2048.min(clen - at) as usize;
            assert_eq!(
                e.write_at(top, at, &model[at as usize * 512..(at as usize + n) * 512]),
                Status::Ok
            );
        }
        let mut unknown = vec![false; (clen / units) as usize];
        for i in 0..1500 {
            let n = rng.range(1, 40) * units;
            let at = rng.range(0, (clen - n) / units) * units;
            let (a, b) = (at as usize * 512, (at + n) as usize * 512);
            let (ua, ub) = ((at / units) as usize, ((at + n) / units) as usize);
            match rng.range(0, 10) {
                0..=3 => {
                    let mut d = vec![0u8; b - a];
                    rng.fill(&mut d);
                    assert_eq!(e.write_at(top, at, &d), Status::Ok, "write {i}");
                    model[a..b].copy_from_slice(&d);
                    unknown[ua..ub].fill(false);
                }
                4..=7 => {
                    let got = ok_read(&mut e, top, at, n as usize);
                    for (k, u) in (ua..ub).enumerate() {
                        if !unknown[u] {
                            let (x, y) = (k * ss, (k + 1) * ss);
                            assert!(
                                got[x..y] == model[a + x..a + y],
                                "read {i} at {at}+{n}, unit {u}"
                            );
                        }
                    }
                }
                8 => {
                    assert_eq!(e.write_zeroes(top, at, n as u32), Status::Ok);
                    model[a..b].fill(0);
                    unknown[ua..ub].fill(false);
                }
                _ => {
                    if i % 2 == 0 {
                        assert_eq!(e.flush(top), Status::Ok);
                    } else {
                        assert_eq!(e.discard(top, at, n as u32), Status::Ok);
                        unknown[ua..ub].fill(true);
                    }
                }
            }
        }
        // Ciphertext on the striped device = our own encryption of the model.
        let c = cipher("aes-xts-plain64", KEY64, ss);
        let below = ok_read(&mut e, s, 1024, clen as usize);
        for u in 0..unknown.len() {
            if unknown[u] {
                continue;
            }
            let mut want = model[u * ss..(u + 1) * ss].to_vec();
            // 512: IV = 512-byte sector; 4096 with iv_large_sectors: IV = 4096-byte sector.
            c.encrypt(u as u64, 1, &mut want);
            assert!(
                below[u * ss..(u + 1) * ss] == want[..],
                "ciphertext of unit {u}, sector size {ss}"
            );
        }
    }
}

/// QD32 reads and writes through `crypt -> mem`: no heap allocation once warm.
#[test]
fn zero_heap_allocations_per_io_at_qd32() {
    for opts in ["", " 1 sector_size:4096"] {
        let mut e = engine_with_leaves(&["m0"], 32768);
        let size = 32768u64;
        let top = e
            .create(
                "c",
                Some(&format!(
                    "0 {size} crypt aes-xts-plain64 {KEY64} 0 m0 0{opts}"
                )),
            )
            .unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 64 * 512]).collect();
        let mut rng = Lcg(9);
        let mut rounds = |e: &mut Engine, n: usize, rng: &mut Lcg| {
            for _ in 0..n {
                for (i, b) in bufs.iter_mut().enumerate() {
                    // Each slot keeps its size, so warm-up fills every bounce class it needs.
                    let sectors = (1 + (i as u32 / 2) % 8) * 8;
                    // 64-sector aligned: no I/O crosses a MAX_IO_SECTORS boundary, whose split
                    // pieces would need bounce sizes the warm-up may not have met yet.
                    let sector = rng.range(0, size / 64) * 64;
                    let op = if i % 2 == 0 { Op::Write } else { Op::Read };
                    // SAFETY: `bufs` outlives the round, which reaps every completion first.
                    let data = unsafe { DataBuf::from_slice(&mut b[..sectors as usize * 512]) };
                    e.submit(&Request::new(op, top, sector, sectors, data, i as u64))
                        .unwrap();
                }
                let mut done = 0;
                while done < 32 {
                    e.poll();
                    while let Some(c) = e.reap() {
                        assert!(c.status.is_ok(), "{:?}", c.status);
                        done += 1;
                    }
                }
            }
        };
        rounds(&mut e, 100, &mut rng);
        let before = stackbd_core::alloc_count::thread_allocs();
        rounds(&mut e, 1000, &mut rng);
        let n = stackbd_core::alloc_count::thread_allocs() - before;
        assert_eq!(
            n, 0,
            "{n} heap allocations over 32,000 crypt I/Os at QD32 ({opts:?})"
        );
    }
}
