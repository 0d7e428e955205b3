//! LUKS1: the 592-byte `phdr` (big-endian fields, eight key slots), unlock with PBKDF2.

use super::kdf::{ct_eq, HashAlg};
use super::{af, area, CryptParams, HeaderCopy, LuksError, ReadAt, VolumeKey, SECTOR};
use zeroize::Zeroizing;

/// The LUKS magic, shared by LUKS1 and a LUKS2 primary header.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The size of the LUKS1 `phdr`.
pub const PHDR_LEN: usize = 592;
/// Number of key slots.
pub const KEYSLOTS: usize = 8;
/// A key slot holding a key.
pub const KEY_ENABLED: u32 = 0x00AC_71F3;
/// A free key slot.
pub const KEY_DISABLED: u32 = 0x0000_DEAD;
/// The length of the master key digest.
pub const DIGEST_LEN: usize = 20;
/// The largest master key accepted (cryptsetup's own maximum is 512 bits for LUKS1 ciphers;
/// leave room for odd ones).
pub const MAX_KEY_BYTES: u32 = 256;

/// One LUKS1 key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Luks1Keyslot {
    /// Whether it holds a key (`active == KEY_ENABLED`).
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; 32],
    /// Where the key material starts, in 512-byte sectors.
    pub key_material_offset: u32,
    /// AF stripes.
    pub stripes: u32,
}

/// A validated LUKS1 header. Plain data owned by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Luks1Header {
    /// `cipher-name` as stored, e.g. `aes`.
    pub cipher_name: String,
    /// `cipher-mode` as stored, e.g. `xts-plain64`.
    pub cipher_mode: String,
    /// The hash for PBKDF2, the AF diffuser and the digest, e.g. `sha256`.
    pub hash_spec: String,
    /// Start of the data, in 512-byte sectors.
    pub payload_offset: u32,
    /// The master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_digest_salt: [u8; 32],
    /// Its iterations.
    pub mk_digest_iterations: u32,
    /// The UUID text.
    pub uuid: String,
    /// The eight key slots.
    pub keyslots: [Luks1Keyslot; KEYSLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn text(b: &[u8], field: &str) -> Result<String, LuksError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = std::str::from_utf8(&b[..end])
        .map_err(|_| LuksError::header(HeaderCopy::Luks1, field, "not UTF-8 text"))?;
    if s.chars().any(|c| c.is_control()) {
        return Err(LuksError::header(
            HeaderCopy::Luks1,
            field,
            "has control characters",
        ));
    }
    Ok(s.to_string())
}

impl Luks1Header {
    /// Parses and validates a `phdr` (`buf` at least [`PHDR_LEN`] bytes) on a device of
    /// `dev_size` bytes. Pure.
    pub fn parse(buf: &[u8], dev_size: u64) -> Result<Luks1Header, LuksError> {
        let bad = |field: &str, reason: String| LuksError::header(HeaderCopy::Luks1, field, reason);
        if buf.len() < PHDR_LEN {
            return Err(LuksError::Truncated {
                what: "LUKS1 header".into(),
                need: PHDR_LEN as u64,
                have: buf.len() as u64,
            });
        }
        if buf[..6] != MAGIC {
            return Err(LuksError::NotLuks);
        }
        let version = u16::from_be_bytes([buf[6], buf[7]]);
        if version != 1 {
            return Err(LuksError::UnsupportedVersion(version));
        }
        let cipher_name = text(&buf[8..40], "cipher-name")?;
        let cipher_mode = text(&buf[40..72], "cipher-mode")?;
        let hash_spec = text(&buf[72..104], "hash-spec")?;
        let payload_offset = be32(buf, 104);
        let key_bytes = be32(buf, 108);
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&buf[112..132]);
        let mut mk_digest_salt = [0u8; 32];
        mk_digest_salt.copy_from_slice(&buf[132..164]);
        let mk_digest_iterations = be32(buf, 164);
        let uuid = text(&buf[168..208], "uuid")?;

        if cipher_name.is_empty() || cipher_mode.is_empty() {
            return Err(bad("cipher-name/cipher-mode", "empty".into()));
        }
        HashAlg::parse(&hash_spec).map_err(|e| bad("hash-spec", e))?;
        if key_bytes == 0 || key_bytes > MAX_KEY_BYTES {
            return Err(bad(
                "key-bytes",
                format!("{key_bytes} is not in 1..={MAX_KEY_BYTES}"),
            ));
        }
        if mk_digest_iterations == 0 {
            return Err(bad("mk-digest-iter", "0".into()));
        }
        let payload_end = u64::from(payload_offset) * SECTOR;
        if payload_end > dev_size {
            return Err(bad(
                "payload-offset",
                format!("sector {payload_offset} is past the end of the {dev_size}-byte device"),
            ));
        }

        let mut keyslots: [Luks1Keyslot; KEYSLOTS] = std::array::from_fn(|_| Luks1Keyslot {
            active: false,
            iterations: 0,
            salt: [0; 32],
            key_material_offset: 0,
            stripes: 0,
        });
        for (i, ks) in keyslots.iter_mut().enumerate() {
            let at = 208 + i * 48;
            let field = |f: &str| format!("key slot {i} {f}");
            let active = match be32(buf, at) {
                KEY_ENABLED => true,
                KEY_DISABLED => false,
                v => {
                    return Err(bad(
                        &field("active"),
                        format!("{v:#010x} is neither enabled nor disabled"),
                    ))
                }
            };
            ks.active = active;
            ks.iterations = be32(buf, at + 4);
            ks.salt.copy_from_slice(&buf[at + 8..at + 40]);
            ks.key_material_offset = be32(buf, at + 40);
            ks.stripes = be32(buf, at + 44);
            if !active {
                continue;
            }
            if ks.iterations == 0 {
                return Err(bad(&field("iterations"), "0".into()));
            }
            if ks.stripes == 0 {
                return Err(bad(&field("stripes"), "0".into()));
            }
            // key_bytes <= 256 and stripes < 2^32: the product fits in u64.
            let len = u64::from(key_bytes) * u64::from(ks.stripes);
            let len = len.div_ceil(SECTOR) * SECTOR;
            let start = u64::from(ks.key_material_offset) * SECTOR;
            let end = start + len;
            if start < PHDR_LEN as u64 {
                return Err(bad(
                    &field("key-material-offset"),
                    format!("sector {} overlaps the header", ks.key_material_offset),
                ));
            }
            if end > dev_size {
                return Err(bad(
                    &field("key material"),
                    format!("ends at byte {end}, past the end of the {dev_size}-byte device"),
                ));
            }
            if payload_offset != 0 && end > payload_end {
                return Err(bad(
                    &field("key material"),
                    format!("ends at byte {end}, inside the data area (byte {payload_end})"),
                ));
            }
            if len > 64 << 20 {
                return Err(bad(
                    &field("stripes"),
                    format!("{} stripes make {len} bytes of key material", ks.stripes),
                ));
            }
        }
        Ok(Luks1Header {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iterations,
            uuid,
            keyslots,
        })
    }

    /// Reads and validates the header at byte 0. Blocks.
    pub fn read<D: ReadAt + ?Sized>(dev: &mut D, dev_size: u64) -> Result<Luks1Header, LuksError> {
        if dev_size < PHDR_LEN as u64 {
            return Err(LuksError::Truncated {
                what: "LUKS1 header".into(),
                need: PHDR_LEN as u64,
                have: dev_size,
            });
        }
        let mut buf = [0u8; PHDR_LEN];
        dev.read_exact_at(&mut buf, 0)
            .map_err(|e| LuksError::io("reading the LUKS1 header", e))?;
        let h = Self::parse(&buf, dev_size)?;
        tracing::debug!(uuid = %h.uuid, cipher = %h.cipher(), "read LUKS1 header");
        Ok(h)
    }

    /// The data cipher in dm-crypt syntax: `cipher-name` `-` `cipher-mode`.
    pub fn cipher(&self) -> String {
        format!("{}-{}", self.cipher_name, self.cipher_mode)
    }

    /// The active key slots.
    pub fn active_keyslots(&self) -> Vec<u32> {
        (0u32..)
            .zip(self.keyslots.iter())
            .filter(|(_, k)| k.active)
            .map(|(i, _)| i)
            .collect()
    }

    fn hash(&self) -> HashAlg {
        // Checked by parse.
        HashAlg::parse(&self.hash_spec).unwrap_or(HashAlg::Sha1)
    }

    /// Whether `key` matches the master key digest. Pure CPU.
    pub fn verify_key(&self, key: &[u8]) -> Result<bool, LuksError> {
        if key.len() != self.key_bytes as usize {
            return Ok(false);
        }
        let mut d = Zeroizing::new([0u8; DIGEST_LEN]);
        self.hash().pbkdf2(
            key,
            &self.mk_digest_salt,
            self.mk_digest_iterations,
            &mut d[..],
        )?;
        Ok(ct_eq(&d[..], &self.mk_digest))
    }

    /// Tries the given key slot, or every active one. Blocks (reads, PBKDF2).
    pub fn unlock<D: ReadAt + ?Sized>(
        &self,
        dev: &mut D,
        passphrase: &[u8],
        slot: Option<u32>,
    ) -> Result<VolumeKey, LuksError> {
        let slots = match slot {
            Some(s) => {
                let ks = self
                    .keyslots
                    .get(s as usize)
                    .ok_or(LuksError::NoSuchKeyslot(s))?;
                if !ks.active {
                    return Err(LuksError::NoSuchKeyslot(s));
                }
                vec![s]
            }
            None => self.active_keyslots(),
        };
        area::check_cipher(&self.cipher(), self.key_bytes as usize)?;
        let hash = self.hash();
        let n = self.key_bytes as usize;
        for s in slots {
            let ks = &self.keyslots[s as usize];
            let mut derived = Zeroizing::new(vec![0u8; n]);
            hash.pbkdf2(passphrase, &ks.salt, ks.iterations, &mut derived)?;
            // Bounded by parse: at most 64 MiB.
            let af_len = n * ks.stripes as usize;
            let mut buf = Zeroizing::new(vec![
                0u8;
                af_len.div_ceil(SECTOR as usize) * SECTOR as usize
            ]);
            dev.read_exact_at(&mut buf, u64::from(ks.key_material_offset) * SECTOR)
                .map_err(|e| LuksError::io(format!("reading key slot {s} key material"), e))?;
            area::decrypt(&self.cipher(), &derived, &mut buf)?;
            let mk = af::merge(hash, &buf[..af_len], n);
            if self.verify_key(&mk)? {
                tracing::info!(keyslot = s, uuid = %self.uuid, "LUKS1 key slot opened");
                return Ok(VolumeKey::new(mk, Some(s)));
            }
            tracing::debug!(
                keyslot = s,
                "LUKS1 key slot did not open with this passphrase"
            );
        }
        Err(LuksError::WrongPassphrase)
    }

    /// The data segment for a dm-crypt table.
    pub fn crypt_params(&self) -> CryptParams {
        CryptParams {
            cipher: self.cipher(),
            key_bytes: self.key_bytes as usize,
            payload_offset_sectors: u64::from(self.payload_offset),
            payload_sectors: None,
            sector_size: SECTOR as u32,
            iv_large_sectors: false,
            iv_offset: 0,
        }
    }
}
