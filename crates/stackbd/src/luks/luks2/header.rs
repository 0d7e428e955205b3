//! The LUKS2 binary header (4096 bytes, big-endian) and its checksum over the whole metadata
//! area (binary header with the checksum field zeroed, then the JSON area).

use crate::luks::kdf::{ct_eq, HashAlg};
use crate::luks::{HeaderCopy, LuksError, ReadAt, WriteAt};

/// Primary copy magic.
pub const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
/// Secondary copy magic.
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
/// The binary header's size.
pub const BIN_LEN: usize = 4096;
/// The metadata sizes (binary header + JSON area) LUKS2 allows; the secondary copy sits at one of
/// these offsets.
pub const HDR_SIZES: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];

const OFF_HDR_SIZE: usize = 8;
const OFF_SEQID: usize = 16;
const OFF_LABEL: usize = 24;
const OFF_CSUM_ALG: usize = 72;
const OFF_SALT: usize = 104;
const OFF_UUID: usize = 168;
const OFF_SUBSYSTEM: usize = 208;
const OFF_HDR_OFFSET: usize = 256;
const OFF_CSUM: usize = 448;
const CSUM_LEN: usize = 64;

/// The fields of one binary header copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinHeader {
    /// Metadata size: binary header plus JSON area.
    pub hdr_size: u64,
    /// Sequence number, raised on every metadata update.
    pub seqid: u64,
    /// Label (may be empty).
    pub label: String,
    /// The checksum algorithm, `sha256` in practice.
    pub csum_alg: String,
    /// Per-copy salt.
    pub salt: [u8; 64],
    /// The volume UUID.
    pub uuid: String,
    /// Subsystem (may be empty).
    pub subsystem: String,
    /// This copy's own offset.
    pub hdr_offset: u64,
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn text(b: &[u8], copy: HeaderCopy, field: &str) -> Result<String, LuksError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| LuksError::header(copy, field, "not NUL-terminated"))?;
    let s = std::str::from_utf8(&b[..end])
        .map_err(|_| LuksError::header(copy, field, "not UTF-8 text"))?;
    if s.chars().any(|c| c.is_control()) {
        return Err(LuksError::header(copy, field, "has control characters"));
    }
    Ok(s.to_string())
}

fn put_text(b: &mut [u8], s: &str, field: &str) -> Result<(), LuksError> {
    if s.len() >= b.len() {
        return Err(LuksError::bad_param(format!(
            "{field} {s:?} is longer than {} bytes",
            b.len() - 1
        )));
    }
    b[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

impl BinHeader {
    /// Parses the binary header of `copy` found at `at`. Checks magic, version, size, own offset.
    pub fn parse(b: &[u8], copy: HeaderCopy, at: u64) -> Result<BinHeader, LuksError> {
        if b.len() < BIN_LEN {
            return Err(LuksError::header(copy, "binary header", "short"));
        }
        let magic = match copy {
            HeaderCopy::Secondary => MAGIC_SECONDARY,
            _ => MAGIC_PRIMARY,
        };
        if b[..6] != magic {
            return Err(LuksError::header(copy, "magic", "missing"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 2 {
            return Err(LuksError::header(
                copy,
                "version",
                format!("{version}, not 2"),
            ));
        }
        let hdr_size = be64(b, OFF_HDR_SIZE);
        if !HDR_SIZES.contains(&hdr_size) {
            return Err(LuksError::header(
                copy,
                "hdr_size",
                format!("{hdr_size} is not a LUKS2 metadata size (16 KiB..4 MiB, a power of two)"),
            ));
        }
        let hdr_offset = be64(b, OFF_HDR_OFFSET);
        if hdr_offset != at {
            return Err(LuksError::header(
                copy,
                "hdr_offset",
                format!("{hdr_offset}, but the copy is at byte {at}"),
            ));
        }
        let mut salt = [0u8; 64];
        salt.copy_from_slice(&b[OFF_SALT..OFF_SALT + 64]);
        Ok(BinHeader {
            hdr_size,
            seqid: be64(b, OFF_SEQID),
            label: text(&b[OFF_LABEL..OFF_LABEL + 48], copy, "label")?,
            csum_alg: text(&b[OFF_CSUM_ALG..OFF_CSUM_ALG + 32], copy, "checksum_alg")?,
            salt,
            uuid: text(&b[OFF_UUID..OFF_UUID + 40], copy, "uuid")?,
            subsystem: text(&b[OFF_SUBSYSTEM..OFF_SUBSYSTEM + 48], copy, "subsystem")?,
            hdr_offset,
        })
    }

    /// The binary header bytes of `copy` with the checksum field zeroed.
    pub fn to_bytes(&self, copy: HeaderCopy) -> Result<Vec<u8>, LuksError> {
        let mut b = vec![0u8; BIN_LEN];
        b[..6].copy_from_slice(match copy {
            HeaderCopy::Secondary => &MAGIC_SECONDARY,
            _ => &MAGIC_PRIMARY,
        });
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        b[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].copy_from_slice(&self.hdr_size.to_be_bytes());
        b[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&self.seqid.to_be_bytes());
        put_text(&mut b[OFF_LABEL..OFF_LABEL + 48], &self.label, "label")?;
        put_text(
            &mut b[OFF_CSUM_ALG..OFF_CSUM_ALG + 32],
            &self.csum_alg,
            "checksum_alg",
        )?;
        b[OFF_SALT..OFF_SALT + 64].copy_from_slice(&self.salt);
        put_text(&mut b[OFF_UUID..OFF_UUID + 40], &self.uuid, "uuid")?;
        put_text(
            &mut b[OFF_SUBSYSTEM..OFF_SUBSYSTEM + 48],
            &self.subsystem,
            "subsystem",
        )?;
        b[OFF_HDR_OFFSET..OFF_HDR_OFFSET + 8].copy_from_slice(&self.hdr_offset.to_be_bytes());
        Ok(b)
    }
}

/// The checksum of a whole metadata area (`area.len() == hdr_size`), computed with the checksum
/// field taken as zero.
fn checksum(alg: HashAlg, area: &[u8]) -> ([u8; 64], usize) {
    alg.hash(&[
        &area[..OFF_CSUM],
        &[0u8; CSUM_LEN],
        &area[OFF_CSUM + CSUM_LEN..],
    ])
}

/// Verifies the stored checksum of a metadata area read for `copy`.
pub fn verify_checksum(bin: &BinHeader, area: &[u8], copy: HeaderCopy) -> Result<(), LuksError> {
    let alg =
        HashAlg::parse(&bin.csum_alg).map_err(|e| LuksError::header(copy, "checksum_alg", e))?;
    let (sum, n) = checksum(alg, area);
    let stored = &area[OFF_CSUM..OFF_CSUM + CSUM_LEN];
    if !ct_eq(&sum[..n], &stored[..n]) {
        return Err(LuksError::header(
            copy,
            "checksum",
            format!(
                "the {} of the metadata does not match the stored one",
                alg.name()
            ),
        ));
    }
    Ok(())
}

/// Reads the metadata area (`hdr_size` bytes) of the copy at `at`: binary header checked,
/// checksum verified. Returns the header and the JSON text (up to its first NUL). Blocks.
pub fn read_copy<D: ReadAt + ?Sized>(
    dev: &mut D,
    dev_size: u64,
    at: u64,
    copy: HeaderCopy,
) -> Result<(BinHeader, Vec<u8>), LuksError> {
    let end = at
        .checked_add(BIN_LEN as u64)
        .ok_or_else(|| LuksError::header(copy, "hdr_offset", "overflows"))?;
    if end > dev_size {
        return Err(LuksError::Truncated {
            what: format!("{copy}"),
            need: end,
            have: dev_size,
        });
    }
    let mut bin = vec![0u8; BIN_LEN];
    dev.read_exact_at(&mut bin, at)
        .map_err(|e| LuksError::io(format!("reading the {copy}"), e))?;
    let h = BinHeader::parse(&bin, copy, at)?;
    let end = at
        .checked_add(h.hdr_size)
        .ok_or_else(|| LuksError::header(copy, "hdr_size", "overflows"))?;
    if end > dev_size {
        return Err(LuksError::Truncated {
            what: format!("{copy} metadata ({} bytes)", h.hdr_size),
            need: end,
            have: dev_size,
        });
    }
    // hdr_size is at most 4 MiB (checked by parse).
    let mut area = vec![0u8; h.hdr_size as usize];
    area[..BIN_LEN].copy_from_slice(&bin);
    dev.read_exact_at(&mut area[BIN_LEN..], at + BIN_LEN as u64)
        .map_err(|e| LuksError::io(format!("reading the {copy} JSON area"), e))?;
    verify_checksum(&h, &area, copy)?;
    let json = &area[BIN_LEN..];
    let len = json.iter().position(|&c| c == 0).unwrap_or(json.len());
    let json = json[..len].to_vec();
    Ok((h, json))
}

/// Builds a whole metadata area for `copy` (binary header, JSON text zero-padded to
/// `hdr_size - 4096`, checksum filled in). Allocates `hdr_size` bytes.
pub fn build_copy(h: &BinHeader, json: &[u8], copy: HeaderCopy) -> Result<Vec<u8>, LuksError> {
    let alg = HashAlg::parse(&h.csum_alg).map_err(LuksError::bad_param)?;
    if !HDR_SIZES.contains(&h.hdr_size) {
        return Err(LuksError::bad_param(format!(
            "hdr_size {} is not a LUKS2 metadata size",
            h.hdr_size
        )));
    }
    let json_area = h.hdr_size as usize - BIN_LEN;
    if json.len() >= json_area {
        return Err(LuksError::bad_param(format!(
            "JSON metadata of {} bytes does not fit in {json_area} bytes",
            json.len()
        )));
    }
    let mut area = h.to_bytes(copy)?;
    area.resize(h.hdr_size as usize, 0);
    area[BIN_LEN..BIN_LEN + json.len()].copy_from_slice(json);
    let (sum, n) = checksum(alg, &area);
    area[OFF_CSUM..OFF_CSUM + n].copy_from_slice(&sum[..n]);
    Ok(area)
}

/// Writes both copies of the metadata (secondary first, then primary, then a sync): `h` gives
/// the fields (its `hdr_offset` is set per copy; each copy gets the salt given). Blocks.
pub fn write_copies<D: WriteAt + ?Sized>(
    dev: &mut D,
    h: &BinHeader,
    secondary_salt: [u8; 64],
    json: &[u8],
) -> Result<(), LuksError> {
    let mut second = h.clone();
    second.hdr_offset = h.hdr_size;
    second.salt = secondary_salt;
    let area = build_copy(&second, json, HeaderCopy::Secondary)?;
    dev.write_all_at(&area, second.hdr_offset)
        .map_err(|e| LuksError::io("writing the secondary LUKS2 header", e))?;
    let mut first = h.clone();
    first.hdr_offset = 0;
    let area = build_copy(&first, json, HeaderCopy::Primary)?;
    dev.write_all_at(&area, 0)
        .map_err(|e| LuksError::io("writing the primary LUKS2 header", e))?;
    dev.sync()
        .map_err(|e| LuksError::io("syncing the LUKS2 headers", e))
}
