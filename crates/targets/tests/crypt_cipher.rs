//! Known-answer tests for `crypt::cipher`: IEEE 1619 XTS-AES vectors, cryptsetup's IV-generator
//! vectors (tests/crypto-vectors.c), cross-checks against an independent XTS implementation, and
//! the cipher-string parser.

use aes::cipher::{generic_array::GenericArray, KeyInit};
use aes::{Aes128, Aes256};
use sha2::{Digest, Sha256};
use stackbd_targets::crypt::cipher::{ChainMode, CipherSpec, IvMode, SectorCipher};
use xts_mode::Xts128;

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn cipher(spec: &str, key: &[u8], sector: usize) -> SectorCipher {
    SectorCipher::new(&CipherSpec::parse(spec).unwrap(), key, sector).unwrap()
}

/// 0, 1, ..., 255, 0, 1, ..., 255: IEEE 1619's 512-byte plaintext.
fn pt512() -> Vec<u8> {
    (0..512).map(|i| i as u8).collect()
}

const K128: &str = "27182818284590452353602874713526 31415926535897932384626433832795";
const K256: &str = "2718281828459045235360287471352662497757247093699959574966967627\
                    3141592653589793238462643383279502884197169399375105820974944592";

/// IEEE 1619-2007 vector 4 (XTS-AES-128, data unit 0, 512 bytes).
const V4_CT: &str = "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad02655ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f4341332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203ebb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18deb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568";

/// IEEE 1619-2007 vector 10 (XTS-AES-256, data unit 0xff, 512 bytes).
const V10_CT: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";

#[test]
fn ieee1619_vector4_xts_aes128() {
    let c = cipher("aes-xts-plain64", &unhex(K128), 512);
    let mut buf = pt512();
    c.encrypt(0, 1, &mut buf);
    assert_eq!(buf, unhex(V4_CT));
    c.decrypt(0, 1, &mut buf);
    assert_eq!(buf, pt512());
}

#[test]
fn ieee1619_vector10_xts_aes256() {
    let c = cipher("aes-xts-plain64", &unhex(K256), 512);
    let mut buf = pt512();
    c.encrypt(0xff, 1, &mut buf);
    assert_eq!(buf, unhex(V10_CT));
    c.decrypt(0xff, 1, &mut buf);
    assert_eq!(buf, pt512());
}

/// XTS works block by block (no stealing for whole sectors), so a 32-byte IEEE data unit is the
/// first 32 bytes of a 512-byte sector with the same tweak. Vector 1 has equal key halves (the
/// xts-mode fallback), vectors 2 and 3 do not (OpenSSL).
#[test]
fn ieee1619_vectors_1_to_3_first_blocks() {
    let cases = [
        (
            "00000000000000000000000000000000 00000000000000000000000000000000",
            0u64,
            [0u8; 32],
            "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e",
        ),
        (
            "11111111111111111111111111111111 22222222222222222222222222222222",
            0x3333333333,
            [0x44; 32],
            "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
        ),
        (
            "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0 22222222222222222222222222222222",
            0x3333333333,
            [0x44; 32],
            "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
        ),
    ];
    for (key, seq, pt, ct) in cases {
        let c = cipher("aes-xts-plain64", &unhex(key), 512);
        let mut buf = vec![0u8; 512];
        buf[..32].copy_from_slice(&pt);
        c.encrypt(seq, 1, &mut buf);
        assert_eq!(&buf[..32], &unhex(ct)[..], "key {key}");
        c.decrypt(seq, 1, &mut buf);
        assert_eq!(&buf[..32], &pt[..]);
    }
}

/// Several sectors in one call: sector i uses IV sector start + i*step. The second of two
/// 512-byte sectors starting at 0xfe is vector 10; every sector matches an independent XTS.
#[test]
fn multi_sector_xts_uses_consecutive_tweaks() {
    let key = unhex(K256);
    let c = cipher("aes-xts-plain64", &key, 512);
    let mut buf = [pt512(), pt512()].concat();
    c.encrypt(0xfe, 1, &mut buf);
    assert_eq!(&buf[512..], &unhex(V10_CT)[..]);
    let x = Xts128::new(
        Aes256::new(GenericArray::from_slice(&key[..32])),
        Aes256::new(GenericArray::from_slice(&key[32..])),
    );
    let mut first = pt512();
    x.encrypt_sector(&mut first, xts_mode::get_tweak_default(0xfe));
    assert_eq!(&buf[..512], &first[..]);
    // With a step of 8 (4096-byte sectors counted in 512-byte units), 0xf7 + 8 = 0xff.
    let c = cipher("aes-xts-plain64", &key, 512);
    let mut buf = [pt512(), pt512()].concat();
    c.encrypt(0xf7, 8, &mut buf);
    assert_eq!(&buf[512..], &unhex(V10_CT)[..]);
}

struct Lcg(u64);
impl Lcg {
    fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *x = (self.0 >> 33) as u8;
        }
    }
}

/// OpenSSL's XTS against RustCrypto's xts-mode on random data, keys and sector sizes, across
/// the 32- and 64-bit sector-number wraps.
#[test]
fn xts_matches_independent_implementation() {
    let mut rng = Lcg(7);
    for &sector in &[512usize, 1024, 2048, 4096] {
        for &klen in &[32usize, 64] {
            for &start in &[0u64, 0xffff_fff0, u64::MAX - 3] {
                let mut key = vec![0u8; klen];
                rng.fill(&mut key);
                let mut data = vec![0u8; sector * 4];
                rng.fill(&mut data);
                let c = cipher("aes-xts-plain64", &key, sector);
                let mut ours = data.clone();
                c.encrypt(start, 1, &mut ours);
                let mut theirs = data.clone();
                let h = klen / 2;
                for (i, chunk) in theirs.chunks_exact_mut(sector).enumerate() {
                    let tweak = xts_mode::get_tweak_default(start.wrapping_add(i as u64) as u128);
                    if h == 16 {
                        Xts128::new(
                            Aes128::new(GenericArray::from_slice(&key[..h])),
                            Aes128::new(GenericArray::from_slice(&key[h..])),
                        )
                        .encrypt_sector(chunk, tweak);
                    } else {
                        Xts128::new(
                            Aes256::new(GenericArray::from_slice(&key[..h])),
                            Aes256::new(GenericArray::from_slice(&key[h..])),
                        )
                        .encrypt_sector(chunk, tweak);
                    }
                }
                assert_eq!(ours, theirs, "sector {sector} key {klen} start {start:#x}");
                c.decrypt(start, 1, &mut ours);
                assert_eq!(ours, data);
            }
        }
    }
}

/// cryptsetup's tests/crypto-vectors.c, "Cipher IV tests": AES-128-CBC with key
/// 2b7e151628aed2a6abf7158809cf4f3c over 8192 zero bytes, starting at IV offset `iv_offset` (in
/// 512-byte sectors); the SHA-256 of the ciphertext per (sector size, large IV). cryptsetup's
/// IV sector for chunk i is (iv_offset + i*sector/512) >> (large ? log2(sector/512) : 0).
#[test]
fn cryptsetup_iv_vectors() {
    const ZEROS_SHA256: &str = "9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47";
    type Out = (usize, bool, &'static str);
    let vectors: [(&str, u64, [Out; 7]); 5] = [
        (
            "null",
            u32::MAX as u64 - 7,
            [
                (
                    512,
                    false,
                    "fd05d04d51b9d487a4579a620739c94a00903eafe8b2ac12caeb58f948f6ef08",
                ),
                (
                    1024,
                    false,
                    "55875cde866a8bab08be5b381753dfe57eb95f59af07a4ca6a24d112a91525f4",
                ),
                (
                    1024,
                    true,
                    "55875cde866a8bab08be5b381753dfe57eb95f59af07a4ca6a24d112a91525f4",
                ),
                (
                    2048,
                    false,
                    "555b8e74909d0d4b748c167e29cfa9a3f3428b62da2d8cdac932c878e27ed270",
                ),
                (
                    2048,
                    true,
                    "555b8e74909d0d4b748c167e29cfa9a3f3428b62da2d8cdac932c878e27ed270",
                ),
                (
                    4096,
                    false,
                    "c645bae0403a96095e460d199d584b9378c53fa42e9eb019044b7326f4a6b5c3",
                ),
                (
                    4096,
                    true,
                    "c645bae0403a96095e460d199d584b9378c53fa42e9eb019044b7326f4a6b5c3",
                ),
            ],
        ),
        (
            "plain",
            u32::MAX as u64 - 7,
            [
                (
                    512,
                    false,
                    "43fd6e2580b213f5ca717918e41291e06e372432fd404b42cbc1721ac75a19c8",
                ),
                (
                    1024,
                    false,
                    "18798dadf27b380327a5761907cd1262033657858850d06cf6dff1cfb8cf0177",
                ),
                (
                    1024,
                    true,
                    "d021cfb27a01a894b28749c49f9cb23a7cc40d5008ea4dfb87e4498c1ad6ec16",
                ),
                (
                    2048,
                    false,
                    "a48972b9cf780c2ac8204fd513cb753090d24afdd3b2e8f0d2b79d07bda97097",
                ),
                (
                    2048,
                    true,
                    "2acf0757c8ea64c7d0d528e6d19ab57de4b963a2665a3d14bd27c709c03cd900",
                ),
                (
                    4096,
                    false,
                    "121b00546e2d08c1158b1557c511308b633364a0d145d6cbdd49910429e69308",
                ),
                (
                    4096,
                    true,
                    "44aaf1230c34322afae3f7957a7ca88b3478bd125cae4a65238a6f3a9605faae",
                ),
            ],
        ),
        (
            "plain64",
            u32::MAX as u64 - 7,
            [
                (
                    512,
                    false,
                    "b3657e6cbae039cd1e1daf65aeb7da2025176a387579684c9a75c7fb2ba217d2",
                ),
                (
                    1024,
                    false,
                    "0aa3237280d376338b2bae010399a5cacd95274027ec1490fd58b0089b9927e2",
                ),
                (
                    1024,
                    true,
                    "d021cfb27a01a894b28749c49f9cb23a7cc40d5008ea4dfb87e4498c1ad6ec16",
                ),
                (
                    2048,
                    false,
                    "6787ebede116850a3fb25cbc27619952fe64b9ab24dd2c1a2cffcd7e2e74b5d4",
                ),
                (
                    2048,
                    true,
                    "2acf0757c8ea64c7d0d528e6d19ab57de4b963a2665a3d14bd27c709c03cd900",
                ),
                (
                    4096,
                    false,
                    "b2f10e66d4584e93e798ae9c3ea7adf2931aaa3cc4901205005825 8f1f5dc667",
                ),
                (
                    4096,
                    true,
                    "44aaf1230c34322afae3f7957a7ca88b3478bd125cae4a65238a6f3a9605faae",
                ),
            ],
        ),
        (
            "plain64be",
            u32::MAX as u64 - 7,
            [
                (
                    512,
                    false,
                    "28bf09e168cc051b20af8d0136218a8d7a9498a899e9f466d8b799ca04588390",
                ),
                (
                    1024,
                    false,
                    "9b74f7d55a6bb23ad209dd805928708f3a61f214c30da8d7d9cb5726738893d2",
                ),
                (
                    1024,
                    true,
                    "36b568082955b9e901c1a8cf3e5b0028b6d135c5f70cf659b58fb9a200432948",
                ),
                (
                    2048,
                    false,
                    "944fc8b4feaddc56f062008d520b2d58c005d61d4735c66a42ec98ee21747be5",
                ),
                (
                    2048,
                    true,
                    "146baa2ff4a8243f4e92971aca1cbb46a708bbc595ac73812534334195 71d9e7",
                ),
                (
                    4096,
                    false,
                    "a8175d84c816067fa268dd1e7d6334937b452df4100b90fa148b7386bc094ae3",
                ),
                (
                    4096,
                    true,
                    "e2c330d8a1b3a8ebdedcfe9be00b624e382fa1450e8f6cf04e88581713b51098",
                ),
            ],
        ),
        (
            "essiv:sha256",
            0,
            [
                (
                    512,
                    false,
                    "a53e74c41a5cf36b6349d5d9bb7a895ad53e766f4c2d0bd38b5e0e91a38c2ade",
                ),
                (
                    1024,
                    false,
                    "416bc6752e9976a183ead597640e248c91170338e7d86664aad727502ad30be6",
                ),
                (
                    1024,
                    true,
                    "023cbee61e9af314ab16ff6fb6a23e03a1bde9e4fa445b22c653e860581599ea",
                ),
                (
                    2048,
                    false,
                    "84dc45d36103a851855beff8926b12062cfe753ecf28d18b4dcb889e31b00b92",
                ),
                (
                    2048,
                    true,
                    "4b9de43ce24e7a13720248f87a7e15e83ac3920be830acb79ae0cff9b1f5615b",
                ),
                (
                    4096,
                    false,
                    "bb1ba3a941bf17d87619088e3f50edfd571dd2c28a3201b9d98acc0da0658b6d",
                ),
                (
                    4096,
                    true,
                    "a6dc7dc8c49b788172e9dd356c07eb7bd6569ee4dff5dd2e2c198f6358dba7d0",
                ),
            ],
        ),
    ];
    let key = unhex("2b7e151628aed2a6abf7158809cf4f3c");
    for (iv, iv_offset, outs) in vectors {
        for (sector, large, sha) in outs {
            let c = cipher(&format!("aes-cbc-{iv}"), &key, sector);
            let units = (sector / 512) as u64;
            let (start, step) = if large {
                (iv_offset >> units.trailing_zeros(), 1)
            } else {
                (iv_offset, units)
            };
            let mut buf = vec![0u8; 8192];
            c.encrypt(start, step, &mut buf);
            assert_eq!(
                Sha256::digest(&buf)[..],
                unhex(sha)[..],
                "aes-cbc-{iv} sector {sector} large {large}"
            );
            c.decrypt(start, step, &mut buf);
            assert_eq!(Sha256::digest(&buf)[..], unhex(ZEROS_SHA256)[..]);
        }
    }
}

#[test]
fn plain_truncates_to_32_bits_and_plain64_does_not() {
    let key = unhex(K256);
    let plain = cipher("aes-xts-plain", &key, 512);
    let plain64 = cipher("aes-xts-plain64", &key, 512);
    let enc = |c: &SectorCipher, s: u64| {
        let mut b = pt512();
        c.encrypt(s, 1, &mut b);
        b
    };
    assert_eq!(enc(&plain, 0x1_0000_00ff), enc(&plain, 0xff));
    assert_eq!(enc(&plain, 0x1_0000_00ff), unhex(V10_CT));
    assert_ne!(enc(&plain64, 0x1_0000_00ff), enc(&plain64, 0xff));
    assert_eq!(enc(&plain64, 0xff), unhex(V10_CT));
}

#[test]
fn many_threads_share_one_cipher() {
    let key = unhex(K256);
    let c = std::sync::Arc::new(cipher("aes-xts-plain64", &key, 512));
    // More threads than the context pool has slots: the overflow takes temporary contexts.
    let handles: Vec<_> = (0..80)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let mut b = pt512();
                    c.encrypt(0xff, 1, &mut b);
                    assert_eq!(b, unhex(V10_CT));
                    c.decrypt(0xff, 1, &mut b);
                    assert_eq!(b, pt512());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn parse_accepts_dm_forms_and_prints_them_back() {
    let ok = [
        ("aes-xts-plain64", ChainMode::Xts, IvMode::Plain64),
        ("aes-xts-plain", ChainMode::Xts, IvMode::Plain),
        ("aes-xts-plain64be", ChainMode::Xts, IvMode::Plain64Be),
        ("aes-cbc-essiv:sha256", ChainMode::Cbc, IvMode::EssivSha256),
        ("aes-cbc-plain64", ChainMode::Cbc, IvMode::Plain64),
        ("aes-cbc-plain", ChainMode::Cbc, IvMode::Plain),
        ("aes-cbc-null", ChainMode::Cbc, IvMode::Null),
        ("aes", ChainMode::Cbc, IvMode::Plain),
        ("aes-plain", ChainMode::Cbc, IvMode::Plain),
        ("aes:1-xts-plain64", ChainMode::Xts, IvMode::Plain64),
        ("capi:xts(aes)-plain64", ChainMode::Xts, IvMode::Plain64),
        (
            "capi:cbc(aes)-essiv:sha256",
            ChainMode::Cbc,
            IvMode::EssivSha256,
        ),
    ];
    for (s, chain, iv) in ok {
        let spec = CipherSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!((spec.chain(), spec.iv_mode()), (chain, iv), "{s}");
        assert_eq!(spec.to_string(), s);
        assert_eq!(CipherSpec::parse(&spec.to_string()).unwrap(), spec);
    }
    // The capi and legacy forms key the same cipher.
    let key = unhex(K256);
    let mut a = pt512();
    let mut b = pt512();
    cipher("capi:xts(aes)-plain64", &key, 512).encrypt(0xff, 1, &mut a);
    cipher("aes-xts-plain64", &key, 512).encrypt(0xff, 1, &mut b);
    assert_eq!(a, b);
}

#[test]
fn parse_refuses_the_rest_with_a_reason() {
    let bad = [
        ("", "only aes"),
        ("twofish-xts-plain64", "only aes"),
        ("aes-xts", "IV mode is required"),
        ("aes-ecb-plain", "chain mode"),
        ("aes-xts-benbi", "not supported"),
        ("aes-xts-lmk", "not supported"),
        ("aes-cbc-essiv", "sha256"),
        ("aes-cbc-essiv:sha1", "sha256"),
        ("aes-xts-plain64:x", "takes no options"),
        ("aes:2-xts-plain64", "key count"),
        ("capi:xts(aes)", "IV mode is required"),
        ("capi:xts(serpent)-plain64", "only aes"),
        ("capi:xts-plain64", "capi form"),
        ("capi:gcm(aes)-random", "chain mode"),
    ];
    for (s, why) in bad {
        let e = CipherSpec::parse(s).expect_err(s);
        assert!(e.contains(why), "{s:?}: {e}");
    }
}

#[test]
fn key_and_sector_size_checks() {
    let xts = CipherSpec::parse("aes-xts-plain64").unwrap();
    let cbc = CipherSpec::parse("aes-cbc-essiv:sha256").unwrap();
    for n in [0, 16, 24, 31, 33, 48, 65] {
        assert!(xts.check_key_len(n).is_err(), "xts {n}");
    }
    for n in [32, 64] {
        xts.check_key_len(n).unwrap();
    }
    for n in [0, 8, 15, 17, 48, 64] {
        assert!(cbc.check_key_len(n).is_err(), "cbc {n}");
    }
    for n in [16, 24, 32] {
        cbc.check_key_len(n).unwrap();
    }
    let e = SectorCipher::new(&xts, &[1; 48], 512).unwrap_err();
    assert!(e.contains("48 bytes"), "{e}");
    for s in [0, 256, 768, 8192, 513] {
        assert!(
            SectorCipher::new(&xts, &unhex(K256), s).is_err(),
            "sector {s}"
        );
    }
    let c = SectorCipher::new(&xts, &unhex(K256), 4096).unwrap();
    let mut odd = vec![0u8; 4096 + 512];
    assert!(c.try_encrypt(0, 1, &mut odd).is_err());
    // Debug never shows the key.
    let dbg = format!("{c:?}");
    assert!(
        dbg.contains("aes-xts-plain64") && !dbg.contains("2718"),
        "{dbg}"
    );
}

/// The out-of-place encryption (the write path's) equals the in-place one, on OpenSSL and on
/// the equal-halves fallback, and refuses mismatched lengths.
#[test]
fn encrypt_into_matches_in_place() {
    let mut rng = Lcg(11);
    for key in [unhex(K256), vec![3u8; 64], unhex(K128)] {
        for spec in ["aes-xts-plain64", "aes-xts-plain"] {
            let c = cipher(spec, &key, 1024);
            let mut src = vec![0u8; 8192];
            rng.fill(&mut src);
            let mut inplace = src.clone();
            c.encrypt(0xffff_fffe, 2, &mut inplace);
            let mut out = vec![0u8; 8192];
            c.try_encrypt_into(0xffff_fffe, 2, &src, &mut out).unwrap();
            assert_eq!(out, inplace, "{spec}");
            assert!(c.try_encrypt_into(0, 1, &src, &mut out[..4096]).is_err());
        }
    }
}
