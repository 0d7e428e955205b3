//! LUKS1 and LUKS2 headers: read (both LUKS2 copies, checksums, JSON metadata), unlock a keyslot
//! with a passphrase, format a new LUKS2 volume, and dump the metadata as `cryptsetup luksDump`
//! does.
//!
//! Written from the on-disk format documents (LUKS1 "On-Disk Format Specification" 1.2.3, LUKS2
//! "On-Disk Format Specification" 1.1.x) and checked against images cryptsetup 2.6 makes.
//!
//! Ownership and cost: everything here runs on a control thread (the CLI or a daemon service
//! thread), never on a reactor. Reading a header allocates (up to 4 MiB of metadata per copy);
//! unlocking runs the keyslot's KDF (argon2 may allocate up to 4 GiB, as the header asks, and
//! take seconds) and reads the keyslot area; formatting writes the whole header region. The
//! device is any [`ReadAt`]/[`WriteAt`]; I/O on it blocks.
//!
//! Every number read from a header is checked (checked arithmetic, areas inside the device,
//! bounded sizes) and bad input gives a [`LuksError`] that names the field and the header copy.

mod af;
mod area;
mod dump;
mod error;
mod io;
mod kdf;
pub mod luks1;
pub mod luks2;

pub use error::{HeaderCopy, LuksError};
pub use io::{ReadAt, WriteAt};
pub use kdf::Argon2Variant;
pub use luks2::format::{format_luks2, FormatOptions, KdfOptions};

use zeroize::Zeroizing;

/// LUKS always counts its offsets in 512-byte sectors where it counts in sectors.
pub const SECTOR: u64 = 512;

/// The most memory an argon2 keyslot may ask for, in KiB (cryptsetup's own maximum, 4 GiB).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 4 * 1024 * 1024;

/// A volume (master) key. Owned by the caller; its bytes are zeroed when it is dropped. Cloning
/// is not offered: pass it by reference.
pub struct VolumeKey {
    bytes: Zeroizing<Vec<u8>>,
    keyslot: Option<u32>,
}

impl VolumeKey {
    pub(crate) fn new(bytes: Zeroizing<Vec<u8>>, keyslot: Option<u32>) -> Self {
        VolumeKey { bytes, keyslot }
    }

    /// The key bytes. Do not copy them anywhere that is not zeroed after use.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The key length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the key is empty (never, for a key this module returns).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The keyslot that opened it (or, after a format, the keyslot written).
    pub fn keyslot(&self) -> Option<u32> {
        self.keyslot
    }

    /// The key as lowercase hex in a zeroed-on-drop string, as a dm-crypt table line wants it.
    /// Allocates.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(self.bytes.len() * 2));
        for b in self.bytes.iter() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 15)] as char);
        }
        s
    }
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VolumeKey({} bytes, keyslot {:?})",
            self.bytes.len(),
            self.keyslot
        )
    }
}

/// What a dm-crypt table line for the volume needs, apart from the key and the device path:
/// `0 <payload_sectors> crypt <cipher> <key> <iv_offset> <dev> <payload_offset_sectors>
/// [<#opts> sector_size:<sector_size> [iv_large_sectors]]`. A plain value, owned by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CryptParams {
    /// The data cipher in dm-crypt's syntax, e.g. `aes-xts-plain64`.
    pub cipher: String,
    /// The volume key length in bytes.
    pub key_bytes: usize,
    /// Where the data starts on the device, in 512-byte sectors.
    pub payload_offset_sectors: u64,
    /// The data length in 512-byte sectors, `None` for "the rest of the device" (LUKS1 always,
    /// LUKS2 `"size": "dynamic"`); use [`CryptParams::payload_sectors_on`] for a number.
    pub payload_sectors: Option<u64>,
    /// The encryption sector size in bytes (512, 1024, 2048 or 4096).
    pub sector_size: u32,
    /// Whether IVs count `sector_size` units (dm-crypt's `iv_large_sectors`). cryptsetup never
    /// sets it for LUKS1 or LUKS2 (IVs count 512-byte sectors even with 4096-byte sectors).
    pub iv_large_sectors: bool,
    /// dm-crypt's `iv_offset`, in 512-byte sectors (LUKS2 `iv_tweak`, 0 for LUKS1).
    pub iv_offset: u64,
}

impl CryptParams {
    /// The data length in 512-byte sectors on a device of `dev_bytes` bytes: the fixed size, or
    /// for a dynamic one what follows the payload offset, rounded down to whole encryption
    /// sectors. An error if the device does not reach past the payload offset.
    pub fn payload_sectors_on(&self, dev_bytes: u64) -> Result<u64, LuksError> {
        let start = self
            .payload_offset_sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| LuksError::bad_param("payload offset overflows"))?;
        let avail = dev_bytes.saturating_sub(start);
        let sectors = match self.payload_sectors {
            Some(n) => {
                let need = n
                    .checked_mul(SECTOR)
                    .ok_or_else(|| LuksError::bad_param("payload size overflows"))?;
                if need > avail {
                    return Err(LuksError::bad_param(format!(
                        "the data segment ends at byte {} but the device has {dev_bytes} bytes",
                        start.saturating_add(need)
                    )));
                }
                n
            }
            None => {
                let ss = u64::from(self.sector_size);
                (avail / ss * ss) / SECTOR
            }
        };
        if sectors == 0 {
            return Err(LuksError::bad_param(format!(
                "no data area: the payload starts at byte {start} of a {dev_bytes}-byte device"
            )));
        }
        Ok(sectors)
    }
}

/// A parsed LUKS header of either version. Owned by the caller; reading it is the only I/O, the
/// accessors are pure.
#[derive(Clone, Debug)]
pub enum Header {
    /// A LUKS1 `phdr`.
    Luks1(Box<luks1::Luks1Header>),
    /// A LUKS2 header (the copy chosen by [`luks2::Luks2Header::read`]).
    Luks2(Box<luks2::Luks2Header>),
}

impl Header {
    /// Reads and validates the header of a device of `dev_size` bytes: LUKS1 or LUKS2 by its
    /// magic and version. Blocks on the reads; allocates the metadata.
    pub fn read<D: ReadAt + ?Sized>(dev: &mut D, dev_size: u64) -> Result<Header, LuksError> {
        let mut first = [0u8; 8];
        if dev_size < first.len() as u64 {
            return Err(LuksError::Truncated {
                what: "LUKS magic".into(),
                need: first.len() as u64,
                have: dev_size,
            });
        }
        dev.read_exact_at(&mut first, 0)
            .map_err(|e| LuksError::io("reading the LUKS magic", e))?;
        let version = u16::from_be_bytes([first[6], first[7]]);
        let magic_ok = first[..6] == luks1::MAGIC;
        match (magic_ok, version) {
            (true, 1) => Ok(Header::Luks1(Box::new(luks1::Luks1Header::read(
                dev, dev_size,
            )?))),
            // A LUKS2 primary copy; or a bad primary whose secondary may still be good.
            (true, 2) => Ok(Header::Luks2(Box::new(luks2::Luks2Header::read(
                dev, dev_size,
            )?))),
            // An unknown version: a LUKS2 primary whose version field is damaged still has its
            // secondary copy; otherwise the version is what is wrong.
            (true, v) => match luks2::Luks2Header::read(dev, dev_size) {
                Ok(h) => Ok(Header::Luks2(Box::new(h))),
                Err(_) => Err(LuksError::UnsupportedVersion(v)),
            },
            (false, _) => {
                // No primary magic: a LUKS2 device whose primary binary header is damaged can
                // still be read from its secondary copy.
                match luks2::Luks2Header::read(dev, dev_size) {
                    Ok(h) => Ok(Header::Luks2(Box::new(h))),
                    Err(LuksError::BothCopiesBad { secondary, .. })
                        if matches!(*secondary, LuksError::NoSecondary) =>
                    {
                        Err(LuksError::NotLuks)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// 1 or 2.
    pub fn version(&self) -> u16 {
        match self {
            Header::Luks1(_) => 1,
            Header::Luks2(_) => 2,
        }
    }

    /// The volume UUID as the header stores it.
    pub fn uuid(&self) -> &str {
        match self {
            Header::Luks1(h) => &h.uuid,
            Header::Luks2(h) => &h.uuid,
        }
    }

    /// The LUKS2 label, if one is set.
    pub fn label(&self) -> Option<&str> {
        match self {
            Header::Luks1(_) => None,
            Header::Luks2(h) => (!h.label.is_empty()).then_some(h.label.as_str()),
        }
    }

    /// Things the reader noticed and worked around, e.g. a damaged primary copy; log or show
    /// them.
    pub fn warnings(&self) -> &[String] {
        match self {
            Header::Luks1(_) => &[],
            Header::Luks2(h) => &h.warnings,
        }
    }

    /// The numbers of the keyslots that hold a key.
    pub fn active_keyslots(&self) -> Vec<u32> {
        match self {
            Header::Luks1(h) => h.active_keyslots(),
            Header::Luks2(h) => h.meta.keyslots.keys().copied().collect(),
        }
    }

    /// Opens a keyslot with `passphrase`: the given `slot`, or each active one in priority
    /// order. Runs the KDF (may take seconds and, for argon2, the memory the header asks), reads
    /// the keyslot area from `dev`, checks the key against the digest. Blocks.
    /// [`LuksError::WrongPassphrase`] if no keyslot opened.
    pub fn unlock<D: ReadAt + ?Sized>(
        &self,
        dev: &mut D,
        passphrase: &[u8],
        slot: Option<u32>,
    ) -> Result<VolumeKey, LuksError> {
        match self {
            Header::Luks1(h) => h.unlock(dev, passphrase, slot),
            Header::Luks2(h) => h.unlock(dev, passphrase, slot),
        }
    }

    /// Whether `key` is this volume's key (its digest matches). Pure CPU (one PBKDF2).
    pub fn verify_key(&self, key: &[u8]) -> Result<bool, LuksError> {
        match self {
            Header::Luks1(h) => h.verify_key(key),
            Header::Luks2(h) => h.verify_key(key),
        }
    }

    /// What a dm-crypt table needs for the data segment. An error for a LUKS2 volume that
    /// stackbd cannot map (mandatory requirements such as an unfinished reencryption, several
    /// segments, integrity).
    pub fn crypt_params(&self) -> Result<CryptParams, LuksError> {
        match self {
            Header::Luks1(h) => Ok(h.crypt_params()),
            Header::Luks2(h) => h.crypt_params(),
        }
    }

    /// The metadata as text in the layout of `cryptsetup luksDump`. Allocates.
    pub fn dump(&self) -> String {
        match self {
            Header::Luks1(h) => dump::luks1(h),
            Header::Luks2(h) => dump::luks2(h),
        }
    }
}
