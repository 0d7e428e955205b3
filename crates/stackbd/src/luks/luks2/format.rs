//! Formatting a new LUKS2 volume the way cryptsetup 2.6 lays one out: 16 KiB metadata copies at
//! 0 and 16 KiB, the keyslots area from 32 KiB up to the data offset (16 MiB by default), one
//! keyslot (a random volume key, AF-split into 4000 stripes, encrypted with the data cipher under
//! the passphrase's KDF output), one `pbkdf2` digest, one `dynamic` crypt segment.

use super::header::{self, BinHeader};
use crate::luks::kdf::{self, Argon2Variant, HashAlg};
use crate::luks::{af, area, HeaderCopy, LuksError, VolumeKey, WriteAt, MAX_ARGON2_MEMORY_KIB};
use base64::Engine;
use serde_json::json;
use zeroize::Zeroizing;

/// Metadata size of each copy.
pub const HDR_SIZE: u64 = 16 << 10;
/// Where the keyslots area starts (after both metadata copies).
pub const KEYSLOTS_OFFSET: u64 = 2 * HDR_SIZE;
/// The default data offset: 16 MiB, as cryptsetup 2.6.
pub const DEFAULT_DATA_OFFSET: u64 = 16 << 20;
/// AF stripes per keyslot, as cryptsetup.
pub const STRIPES: u32 = 4000;

/// The KDF for the keyslot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KdfOptions {
    /// Argon2 (cryptsetup's default is argon2id).
    Argon2 {
        /// argon2i or argon2id.
        variant: Argon2Variant,
        /// Passes.
        time: u32,
        /// Memory in KiB (at least 8 per lane, at most 4 GiB).
        memory_kib: u32,
        /// Lanes (cryptsetup calls them threads or cpus).
        parallel: u32,
    },
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// Hash name (sha1, sha256, sha512, ...).
        hash: String,
        /// Iterations.
        iterations: u32,
    },
}

/// What to format. `Default` gives aes-xts-plain64 with a 512-bit key, 512-byte sectors,
/// argon2id (4 passes, 256 MiB, 4 lanes), no label, a random UUID, data at 16 MiB. Tests choose
/// small KDF costs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatOptions {
    /// Data (and keyslot) cipher in dm-crypt syntax.
    pub cipher: String,
    /// Volume key length in bytes.
    pub key_bytes: usize,
    /// Encryption sector size: 512, 1024, 2048 or 4096.
    pub sector_size: u32,
    /// Keyslot KDF.
    pub kdf: KdfOptions,
    /// Label, at most 47 bytes.
    pub label: String,
    /// UUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`); random when `None`.
    pub uuid: Option<String>,
    /// Where the data starts, in bytes: a multiple of 4096 with room for the keyslot.
    pub data_offset: u64,
    /// PBKDF2-SHA256 iterations of the volume key digest.
    pub digest_iterations: u32,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            cipher: "aes-xts-plain64".into(),
            key_bytes: 64,
            sector_size: 512,
            kdf: KdfOptions::Argon2 {
                variant: Argon2Variant::Argon2id,
                time: 4,
                memory_kib: 256 * 1024,
                parallel: 4,
            },
            label: String::new(),
            uuid: None,
            data_offset: DEFAULT_DATA_OFFSET,
            digest_iterations: 100_000,
        }
    }
}

fn random(buf: &mut [u8]) -> Result<(), String> {
    getrandom::fill(buf).map_err(|e| format!("the OS random generator failed: {e}"))
}

fn random_uuid() -> Result<String, LuksError> {
    let mut b = [0u8; 16];
    random(&mut b).map_err(LuksError::bad_param)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn check_uuid(u: &str) -> Result<(), LuksError> {
    let ok = u.len() == 36
        && u.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(())
    } else {
        Err(LuksError::bad_param(format!(
            "UUID {u:?} is not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
        )))
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Checks the options against a device of `dev_size` bytes; returns the keyslot area size.
fn check(opts: &FormatOptions, dev_size: u64) -> Result<u64, LuksError> {
    let bad = |m: String| Err(LuksError::bad_param(m));
    area::check_cipher(&opts.cipher, opts.key_bytes)?;
    if opts.key_bytes == 0 || opts.key_bytes > super::json::MAX_KEY_BYTES as usize {
        return bad(format!(
            "key size {} bytes is not in 1..={}",
            opts.key_bytes,
            super::json::MAX_KEY_BYTES
        ));
    }
    if !matches!(opts.sector_size, 512 | 1024 | 2048 | 4096) {
        return bad(format!(
            "sector size {} is not 512, 1024, 2048 or 4096",
            opts.sector_size
        ));
    }
    if opts.label.len() > 47 || opts.label.chars().any(char::is_control) {
        return bad(format!(
            "label {:?} is longer than 47 bytes or has control characters",
            opts.label
        ));
    }
    if let Some(u) = &opts.uuid {
        check_uuid(u)?;
    }
    if opts.digest_iterations < 1000 {
        return bad(format!(
            "{} digest iterations is below cryptsetup's minimum of 1000",
            opts.digest_iterations
        ));
    }
    match &opts.kdf {
        KdfOptions::Argon2 {
            time,
            memory_kib,
            parallel,
            ..
        } => {
            if *time == 0 || *parallel == 0 || *parallel > 0xff_ffff {
                return bad(format!(
                    "argon2 time {time} and threads {parallel} must be positive"
                ));
            }
            if u64::from(*memory_kib) < 8 * u64::from(*parallel)
                || *memory_kib > MAX_ARGON2_MEMORY_KIB
            {
                return bad(format!(
                    "argon2 memory {memory_kib} KiB is not in {}..={MAX_ARGON2_MEMORY_KIB} KiB",
                    8 * parallel
                ));
            }
        }
        KdfOptions::Pbkdf2 { hash, iterations } => {
            HashAlg::parse(hash).map_err(LuksError::bad_param)?;
            if *iterations == 0 {
                return bad("pbkdf2 iterations must be positive".into());
            }
        }
    }
    let area_size = (opts.key_bytes as u64 * u64::from(STRIPES)).div_ceil(4096) * 4096;
    let off = opts.data_offset;
    if !off.is_multiple_of(4096)
        || off < KEYSLOTS_OFFSET + area_size
        || off - KEYSLOTS_OFFSET > super::json::MAX_AREA_BYTES
    {
        return bad(format!(
            "data offset {off} must be a multiple of 4096 in {}..={}",
            KEYSLOTS_OFFSET + area_size,
            KEYSLOTS_OFFSET + super::json::MAX_AREA_BYTES
        ));
    }
    let data = dev_size.saturating_sub(off);
    if data < u64::from(opts.sector_size) {
        return bad(format!(
            "the {dev_size}-byte device has no room for data after the header ({off} bytes)"
        ));
    }
    if !data.is_multiple_of(u64::from(opts.sector_size)) {
        return bad(format!(
            "the data area ({data} bytes) is not a multiple of the {}-byte sector",
            opts.sector_size
        ));
    }
    Ok(area_size)
}

/// Formats `dev` (`dev_size` bytes) as a new LUKS2 volume with one keyslot (0) opened by
/// `passphrase`, and returns the new random volume key. Writes the whole header region (zeroes
/// where nothing lives), the keyslot, then both metadata copies, then syncs. Bad options change
/// nothing. Blocks (KDF, I/O); allocates the keyslot area and a 1 MiB buffer.
pub fn format_luks2<D: WriteAt + ?Sized>(
    dev: &mut D,
    dev_size: u64,
    opts: &FormatOptions,
    passphrase: &[u8],
) -> Result<VolumeKey, LuksError> {
    let area_size = check(opts, dev_size)?;
    let rnd = |b: &mut [u8]| random(b).map_err(LuksError::bad_param);
    let mut vk = Zeroizing::new(vec![0u8; opts.key_bytes]);
    rnd(&mut vk)?;
    let mut ks_salt = [0u8; 32];
    rnd(&mut ks_salt)?;
    let mut dg_salt = [0u8; 32];
    rnd(&mut dg_salt)?;
    let mut salts = [[0u8; 64]; 2];
    rnd(&mut salts[0])?;
    rnd(&mut salts[1])?;
    let uuid = match &opts.uuid {
        Some(u) => u.to_ascii_lowercase(),
        None => random_uuid()?,
    };

    // The keyslot: KDF, AF split, encryption with the data cipher.
    let mut derived = Zeroizing::new(vec![0u8; opts.key_bytes]);
    let kdf_json = match &opts.kdf {
        KdfOptions::Argon2 {
            variant,
            time,
            memory_kib,
            parallel,
        } => {
            kdf::argon2(
                *variant,
                passphrase,
                &ks_salt,
                *time,
                *memory_kib,
                *parallel,
                &mut derived,
            )?;
            json!({"type": variant.name(), "time": time, "memory": memory_kib, "cpus": parallel, "salt": b64(&ks_salt)})
        }
        KdfOptions::Pbkdf2 { hash, iterations } => {
            let h = HashAlg::parse(hash).map_err(LuksError::bad_param)?;
            h.pbkdf2(passphrase, &ks_salt, *iterations, &mut derived)?;
            json!({"type": "pbkdf2", "hash": h.name(), "iterations": iterations, "salt": b64(&ks_salt)})
        }
    };
    let split =
        af::split(HashAlg::Sha256, &vk, STRIPES as usize, random).map_err(LuksError::bad_param)?;
    // area_size <= 128 MiB (checked).
    let mut area_buf = Zeroizing::new(vec![0u8; area_size as usize]);
    area_buf[..split.len()].copy_from_slice(&split);
    area::encrypt(&opts.cipher, &derived, &mut area_buf)?;

    let mut digest = [0u8; 32];
    HashAlg::Sha256.pbkdf2(&vk, &dg_salt, opts.digest_iterations, &mut digest)?;

    let keyslots_size = opts.data_offset - KEYSLOTS_OFFSET;
    let meta = json!({
        "keyslots": {"0": {
            "type": "luks2",
            "key_size": opts.key_bytes,
            "af": {"type": "luks1", "stripes": STRIPES, "hash": "sha256"},
            "area": {"type": "raw", "offset": KEYSLOTS_OFFSET.to_string(), "size": area_size.to_string(),
                     "encryption": opts.cipher, "key_size": opts.key_bytes},
            "kdf": kdf_json,
        }},
        "tokens": {},
        "segments": {"0": {
            "type": "crypt", "offset": opts.data_offset.to_string(), "size": "dynamic", "iv_tweak": "0",
            "encryption": opts.cipher, "sector_size": opts.sector_size,
        }},
        "digests": {"0": {
            "type": "pbkdf2", "keyslots": ["0"], "segments": ["0"], "hash": "sha256",
            "iterations": opts.digest_iterations, "salt": b64(&dg_salt), "digest": b64(&digest),
        }},
        "config": {"json_size": (HDR_SIZE - 4096).to_string(), "keyslots_size": keyslots_size.to_string()},
    });
    let text = serde_json::to_vec(&meta).map_err(|e| LuksError::bad_param(e.to_string()))?;
    let bin = BinHeader {
        hdr_size: HDR_SIZE,
        seqid: 1,
        label: opts.label.clone(),
        csum_alg: "sha256".into(),
        salt: salts[0],
        uuid: uuid.clone(),
        subsystem: String::new(),
        hdr_offset: 0,
    };
    // Build both copies before writing anything, so a bad field fails with nothing written.
    header::build_copy(&bin, &text, HeaderCopy::Primary)?;

    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < opts.data_offset {
        let n = (opts.data_offset - at).min(zeros.len() as u64);
        dev.write_all_at(&zeros[..n as usize], at)
            .map_err(|e| LuksError::io("wiping the LUKS2 header area", e))?;
        at += n;
    }
    dev.write_all_at(&area_buf, KEYSLOTS_OFFSET)
        .map_err(|e| LuksError::io("writing keyslot 0", e))?;
    header::write_copies(dev, &bin, salts[1], &text)?;
    tracing::info!(%uuid, cipher = %opts.cipher, sector_size = opts.sector_size, "formatted a LUKS2 volume");
    Ok(VolumeKey::new(vk, Some(0)))
}
