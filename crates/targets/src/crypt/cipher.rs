//! dm-crypt's cipher specifications and a keyed sector cipher.
//!
//! [`CipherSpec`] parses the cipher field of a `crypt` table line (and of a LUKS header), both the
//! legacy form `cipher[:keycount]-chainmode-ivmode[:ivopts]` (`aes-xts-plain64`,
//! `aes-cbc-essiv:sha256`, `aes` = `aes-cbc-plain`) and the crypto-API form
//! `capi:chainmode(cipher)-ivmode[:ivopts]` (`capi:xts(aes)-plain64`). Supported: AES in XTS or
//! CBC, with the IV generators `plain` (sector number truncated to 32 bits, little-endian),
//! `plain64` (64-bit little-endian), `plain64be` (64-bit big-endian in the IV's last 8 bytes),
//! `essiv:sha256` (the plain64 IV encrypted with AES keyed by SHA-256 of the volume key) and
//! `null` (all-zero IV; insecure, accepted for compatibility). Anything else is refused.
//!
//! [`SectorCipher`] encrypts and decrypts whole crypt sectors in place. XTS and CBC run on
//! OpenSSL's EVP (AES-NI/VAES assembly; see `ossl`), except an XTS key whose two halves are
//! equal, which OpenSSL refuses to encrypt with and the kernel (outside FIPS mode) accepts: that
//! one runs on RustCrypto's `xts-mode` (slow, correct). Key material lives in the EVP contexts,
//! the `aes` key schedules and a zeroizing copy; all of it is wiped when the cipher is dropped.

use std::fmt;

use aes::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes256};
use sha2::{Digest, Sha256};
use xts_mode::Xts128;
use zeroize::Zeroizing;

use super::ossl::{CtxPool, EvpKind};

/// The block cipher mode of a [`CipherSpec`] (the cipher itself is always AES).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainMode {
    /// XTS (IEEE 1619); the key holds two AES keys.
    Xts,
    /// CBC, restarted with the sector's IV at every crypt sector.
    Cbc,
}

/// How a crypt sector's IV is made from its IV sector number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvMode {
    /// All zeros (insecure; dm-crypt's `null`).
    Null,
    /// Low 32 bits of the sector number, little-endian, rest zero.
    Plain,
    /// The 64-bit sector number, little-endian, rest zero.
    Plain64,
    /// The 64-bit sector number, big-endian, in the IV's last 8 bytes.
    Plain64Be,
    /// `essiv:sha256`: the plain64 IV encrypted with AES-256 keyed by SHA-256(volume key).
    EssivSha256,
}

/// A parsed dm-crypt cipher specification. Plain data: built on the control path, cloned freely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    /// The text as given; dm prints it back unchanged in `table`.
    text: String,
    chain: ChainMode,
    iv: IvMode,
}

impl CipherSpec {
    /// Parses a dm-crypt cipher string: `aes-xts-plain64`, `aes-xts-plain`,
    /// `aes-cbc-essiv:sha256`, `aes-cbc-plain64`, `aes-cbc-plain`, `aes-xts-plain64be`,
    /// `aes-cbc-null`, `aes` (= cbc-plain), `aes:1-...`, and the capi forms
    /// `capi:xts(aes)-plain64`, `capi:cbc(aes)-essiv:sha256`, ... A clear error for anything
    /// else. Pure; allocates the kept text.
    pub fn parse(s: &str) -> Result<CipherSpec, String> {
        let (chain, iv, ivopts) = if let Some(rest) = s.strip_prefix("capi:") {
            // capi:<chain>(<cipher>)-<ivmode>[:<ivopts>]
            let close = rest
                .find(')')
                .ok_or_else(|| format!("cipher {s:?}: capi form needs chainmode(cipher)-ivmode"))?;
            let (api, tail) = rest.split_at(close + 1);
            let open = api
                .find('(')
                .ok_or_else(|| format!("cipher {s:?}: capi form needs chainmode(cipher)"))?;
            let chain = &api[..open];
            let cipher = &api[open + 1..api.len() - 1];
            if cipher != "aes" {
                return Err(format!(
                    "cipher {s:?}: only aes is supported, not {cipher:?}"
                ));
            }
            let ivspec = tail
                .strip_prefix('-')
                .ok_or_else(|| format!("cipher {s:?}: an IV mode is required (e.g. -plain64)"))?;
            let (iv, ivopts) = split_ivopts(ivspec);
            (chain, iv, ivopts)
        } else {
            // cipher[:keycount]-chainmode-ivmode[:ivopts]
            let mut parts = s.splitn(3, '-');
            let cipher_kc = parts.next().unwrap_or("");
            let (cipher, keycount) = match cipher_kc.split_once(':') {
                Some((c, k)) => (c, Some(k)),
                None => (cipher_kc, None),
            };
            if cipher != "aes" {
                return Err(format!(
                    "cipher {s:?}: only aes is supported, not {cipher:?}"
                ));
            }
            if let Some(k) = keycount {
                if k != "1" {
                    return Err(format!(
                        "cipher {s:?}: key count {k:?} is not supported (only 1)"
                    ));
                }
            }
            match (parts.next(), parts.next()) {
                // dm: a bare cipher name, or cipher-plain, means cbc-plain.
                (None, _) | (Some("plain"), None) => ("cbc", "plain", None),
                (Some(chain), None) => {
                    return Err(format!(
                        "cipher {s:?}: an IV mode is required after {chain:?}"
                    ))
                }
                (Some(chain), Some(ivspec)) => {
                    let (iv, ivopts) = split_ivopts(ivspec);
                    (chain, iv, ivopts)
                }
            }
        };
        let chain = match chain {
            "xts" => ChainMode::Xts,
            "cbc" => ChainMode::Cbc,
            other => {
                return Err(format!(
                    "cipher {s:?}: chain mode {other:?} is not supported (xts, cbc)"
                ))
            }
        };
        let iv = match (iv, ivopts) {
            ("null", None) => IvMode::Null,
            ("plain", None) => IvMode::Plain,
            ("plain64", None) => IvMode::Plain64,
            ("plain64be", None) => IvMode::Plain64Be,
            ("essiv", Some("sha256")) => IvMode::EssivSha256,
            ("essiv", other) => {
                return Err(format!(
                    "cipher {s:?}: essiv needs the hash sha256 (essiv:sha256), got {other:?}"
                ))
            }
            (m @ ("null" | "plain" | "plain64" | "plain64be"), Some(o)) => {
                return Err(format!(
                    "cipher {s:?}: IV mode {m:?} takes no options, got {o:?}"
                ))
            }
            (other, _) => {
                return Err(format!(
                    "cipher {s:?}: IV mode {other:?} is not supported \
                     (plain, plain64, plain64be, essiv:sha256, null)"
                ))
            }
        };
        Ok(CipherSpec {
            text: s.to_string(),
            chain,
            iv,
        })
    }

    /// Is a key of `n` bytes valid for this cipher (XTS: 32 or 64; CBC: 16, 24 or 32)?
    pub fn check_key_len(&self, n: usize) -> Result<(), String> {
        let ok = match self.chain {
            ChainMode::Xts => matches!(n, 32 | 64),
            ChainMode::Cbc => matches!(n, 16 | 24 | 32),
        };
        if ok {
            return Ok(());
        }
        let want = match self.chain {
            ChainMode::Xts => "32 or 64 bytes (AES-128 or AES-256 XTS)",
            ChainMode::Cbc => "16, 24 or 32 bytes (AES-128/192/256)",
        };
        Err(format!(
            "cipher {}: key must be {want}, got {n} bytes",
            self.text
        ))
    }

    /// The chain mode.
    pub fn chain(&self) -> ChainMode {
        self.chain
    }

    /// The IV generator.
    pub fn iv_mode(&self) -> IvMode {
        self.iv
    }
}

fn split_ivopts(ivspec: &str) -> (&str, Option<&str>) {
    match ivspec.split_once(':') {
        Some((m, o)) => (m, Some(o)),
        None => (ivspec, None),
    }
}

impl fmt::Display for CipherSpec {
    /// The cipher string as given, which is what dm-crypt prints in `table`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a sector operation failed (no allocation to report it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptFailure {
    /// The buffer is not a whole number of crypt sectors.
    Misaligned,
    /// The cipher library refused the operation (not seen in practice).
    Library,
}

enum Engine {
    Evp(CtxPool),
    Xts128(Box<Xts128<Aes128>>),
    Xts256(Box<Xts128<Aes256>>),
}

/// A keyed sector cipher: one per key (a table's target, a LUKS header's keyslot area). `Send +
/// Sync`, used from any thread at once; `encrypt`/`decrypt` never block, take no lock and do not
/// allocate in steady state (a thread's first call keys an OpenSSL context for it). Key material
/// is zeroized on drop.
pub struct SectorCipher {
    spec: CipherSpec,
    sector_bytes: usize,
    engine: Engine,
    /// ESSIV's salt cipher (AES-256 keyed with SHA-256 of the key).
    essiv: Option<Aes256>,
}

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SectorCipher")
            .field("spec", &self.spec.text)
            .field("sector_bytes", &self.sector_bytes)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// Keys a cipher. `sector_bytes`: 512..=4096, a power of two. Control path: allocates and
    /// keys OpenSSL contexts; errors for a bad key length, sector size, or a key the library
    /// refuses.
    pub fn new(spec: &CipherSpec, key: &[u8], sector_bytes: usize) -> Result<SectorCipher, String> {
        spec.check_key_len(key.len())?;
        if !(512..=4096).contains(&sector_bytes) || !sector_bytes.is_power_of_two() {
            return Err(format!(
                "sector size {sector_bytes} must be a power of two from 512 to 4096"
            ));
        }
        let half = key.len() / 2;
        let engine = match (spec.chain, key.len()) {
            (ChainMode::Xts, _) if key[..half] == key[half..] => {
                tracing::warn!(
                    "crypt: XTS key halves are equal (refused by FIPS and OpenSSL); \
                     using the slower xts-mode implementation"
                );
                if half == 16 {
                    Engine::Xts128(Box::new(Xts128::new(
                        Aes128::new(GenericArray::from_slice(&key[..half])),
                        Aes128::new(GenericArray::from_slice(&key[half..])),
                    )))
                } else {
                    Engine::Xts256(Box::new(Xts128::new(
                        Aes256::new(GenericArray::from_slice(&key[..half])),
                        Aes256::new(GenericArray::from_slice(&key[half..])),
                    )))
                }
            }
            (ChainMode::Xts, 32) => Engine::Evp(CtxPool::new(EvpKind::Aes128Xts, key)?),
            (ChainMode::Xts, _) => Engine::Evp(CtxPool::new(EvpKind::Aes256Xts, key)?),
            (ChainMode::Cbc, 16) => Engine::Evp(CtxPool::new(EvpKind::Aes128Cbc, key)?),
            (ChainMode::Cbc, 24) => Engine::Evp(CtxPool::new(EvpKind::Aes192Cbc, key)?),
            (ChainMode::Cbc, _) => Engine::Evp(CtxPool::new(EvpKind::Aes256Cbc, key)?),
        };
        let essiv = (spec.iv == IvMode::EssivSha256).then(|| {
            let salt = Zeroizing::new(<[u8; 32]>::from(Sha256::digest(key)));
            Aes256::new(GenericArray::from_slice(&salt[..]))
        });
        Ok(SectorCipher {
            spec: spec.clone(),
            sector_bytes,
            engine,
            essiv,
        })
    }

    /// The specification this cipher was keyed for.
    pub fn spec(&self) -> &CipherSpec {
        &self.spec
    }

    /// The crypt sector size in bytes.
    pub fn sector_bytes(&self) -> usize {
        self.sector_bytes
    }

    /// The IV of IV sector `sector`.
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.spec.iv {
            IvMode::Null => {}
            IvMode::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvMode::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvMode::Plain64Be => iv[8..].copy_from_slice(&sector.to_be_bytes()),
            IvMode::EssivSha256 => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                if let Some(salt) = &self.essiv {
                    salt.encrypt_block(GenericArray::from_mut_slice(&mut iv));
                }
            }
        }
        iv
    }

    fn run(
        &self,
        enc: bool,
        iv_sector: u64,
        iv_step: u64,
        buf: &mut [u8],
    ) -> Result<(), CryptFailure> {
        let sb = self.sector_bytes;
        if !buf.len().is_multiple_of(sb) {
            return Err(CryptFailure::Misaligned);
        }
        let mut sector = iv_sector;
        match &self.engine {
            Engine::Evp(pool) => {
                let ok = pool.with(enc, |ctx| {
                    for chunk in buf.chunks_exact_mut(sb) {
                        if !ctx.crypt(&self.iv(sector), chunk) {
                            return false;
                        }
                        sector = sector.wrapping_add(iv_step);
                    }
                    true
                });
                if !ok {
                    return Err(CryptFailure::Library);
                }
            }
            Engine::Xts128(x) => {
                for chunk in buf.chunks_exact_mut(sb) {
                    let iv = self.iv(sector);
                    if enc {
                        x.encrypt_sector(chunk, iv)
                    } else {
                        x.decrypt_sector(chunk, iv)
                    }
                    sector = sector.wrapping_add(iv_step);
                }
            }
            Engine::Xts256(x) => {
                for chunk in buf.chunks_exact_mut(sb) {
                    let iv = self.iv(sector);
                    if enc {
                        x.encrypt_sector(chunk, iv)
                    } else {
                        x.decrypt_sector(chunk, iv)
                    }
                    sector = sector.wrapping_add(iv_step);
                }
            }
        }
        Ok(())
    }

    /// Encrypts `buf` in place: crypt sector `i` of it uses IV sector
    /// `iv_sector + i * iv_step` (wrapping; `plain` then keeps the low 32 bits). `iv_step` is 1,
    /// or `sector_bytes / 512` when dm counts IVs in 512-byte units (sector size > 512 without
    /// `iv_large_sectors`). Errors, without touching `buf`'s length, when `buf.len()` is not a
    /// multiple of the sector size or the library fails. Any thread; no allocation.
    pub fn try_encrypt(
        &self,
        iv_sector: u64,
        iv_step: u64,
        buf: &mut [u8],
    ) -> Result<(), CryptFailure> {
        self.run(true, iv_sector, iv_step, buf)
    }

    /// Decrypts `buf` in place; the inverse of [`SectorCipher::try_encrypt`].
    pub fn try_decrypt(
        &self,
        iv_sector: u64,
        iv_step: u64,
        buf: &mut [u8],
    ) -> Result<(), CryptFailure> {
        self.run(false, iv_sector, iv_step, buf)
    }

    /// Encrypts `src` into `dst` (same length, whole sectors), IVs as for
    /// [`SectorCipher::try_encrypt`]: one pass over the data where a copy then an in-place
    /// encryption would make two (the crypt target's write path). Any thread; no allocation.
    pub fn try_encrypt_into(
        &self,
        iv_sector: u64,
        iv_step: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<(), CryptFailure> {
        let sb = self.sector_bytes;
        if src.len() != dst.len() || !src.len().is_multiple_of(sb) {
            return Err(CryptFailure::Misaligned);
        }
        let Engine::Evp(pool) = &self.engine else {
            dst.copy_from_slice(src);
            return self.run(true, iv_sector, iv_step, dst);
        };
        let mut sector = iv_sector;
        let ok = pool.with(true, |ctx| {
            for (s, d) in src.chunks_exact(sb).zip(dst.chunks_exact_mut(sb)) {
                if !ctx.crypt_into(&self.iv(sector), s, d) {
                    return false;
                }
                sector = sector.wrapping_add(iv_step);
            }
            true
        });
        if ok {
            Ok(())
        } else {
            Err(CryptFailure::Library)
        }
    }

    /// [`SectorCipher::try_encrypt`] for callers that guarantee whole sectors. On a failure
    /// (a misaligned buffer, or the library) the buffer is zeroed rather than left as
    /// plaintext, and the failure is logged.
    pub fn encrypt(&self, iv_sector: u64, iv_step: u64, buf: &mut [u8]) {
        if let Err(e) = self.try_encrypt(iv_sector, iv_step, buf) {
            tracing::error!(
                ?e,
                len = buf.len(),
                "crypt: encryption failed; buffer zeroed"
            );
            buf.fill(0);
        }
    }

    /// [`SectorCipher::try_decrypt`] for callers that guarantee whole sectors. On a failure
    /// the buffer is zeroed and the failure is logged.
    pub fn decrypt(&self, iv_sector: u64, iv_step: u64, buf: &mut [u8]) {
        if let Err(e) = self.try_decrypt(iv_sector, iv_step, buf) {
            tracing::error!(
                ?e,
                len = buf.len(),
                "crypt: decryption failed; buffer zeroed"
            );
            buf.fill(0);
        }
    }
}
