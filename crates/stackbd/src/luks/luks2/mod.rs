//! LUKS2: two metadata copies (binary header + JSON), chosen by checksum and sequence number;
//! keyslots opened with PBKDF2 or argon2; the volume key checked against a `pbkdf2` digest.

pub mod format;
pub mod header;
pub mod json;

use super::kdf::{self, ct_eq, HashAlg};
use super::{af, area, CryptParams, HeaderCopy, LuksError, ReadAt, VolumeKey, SECTOR};
use header::{BinHeader, BIN_LEN, HDR_SIZES, MAGIC_SECONDARY};
pub use json::{Af, Area, Config, Digest, Kdf, Keyslot, Metadata, Segment};
use zeroize::Zeroizing;

/// A validated LUKS2 header: the fields of the copy in use and its metadata. Plain data owned by
/// the caller.
#[derive(Clone, Debug)]
pub struct Luks2Header {
    /// The copy the metadata was taken from.
    pub copy: HeaderCopy,
    /// Its binary header.
    pub bin: BinHeader,
    /// The volume UUID.
    pub uuid: String,
    /// The label (may be empty).
    pub label: String,
    /// The JSON metadata.
    pub meta: Metadata,
    /// What the reader worked around (a bad copy, differing sequence numbers).
    pub warnings: Vec<String>,
}

type Copy = (BinHeader, Metadata);

fn read_one<D: ReadAt + ?Sized>(
    dev: &mut D,
    dev_size: u64,
    at: u64,
    copy: HeaderCopy,
) -> Result<Copy, LuksError> {
    let (bin, text) = header::read_copy(dev, dev_size, at, copy)?;
    let meta = json::parse(
        &text,
        copy,
        json::Layout {
            hdr_size: bin.hdr_size,
            dev_size,
        },
    )?;
    Ok((bin, meta))
}

/// Finds the secondary copy when the primary cannot say where it is: the first standard offset
/// holding the secondary magic.
fn find_secondary<D: ReadAt + ?Sized>(dev: &mut D, dev_size: u64) -> Result<Copy, LuksError> {
    for &at in &HDR_SIZES {
        if at.saturating_add(BIN_LEN as u64) > dev_size {
            break;
        }
        let mut magic = [0u8; 8];
        dev.read_exact_at(&mut magic, at)
            .map_err(|e| LuksError::io("looking for the secondary LUKS2 header", e))?;
        if magic[..6] == MAGIC_SECONDARY && magic[6..] == 2u16.to_be_bytes() {
            return read_one(dev, dev_size, at, HeaderCopy::Secondary);
        }
    }
    Err(LuksError::NoSecondary)
}

impl Luks2Header {
    /// Reads both copies on a device of `dev_size` bytes and keeps the valid one with the higher
    /// sequence number (the primary on a tie); a bad copy is named in
    /// [`Luks2Header::warnings`] and logged. Blocks; allocates up to twice 4 MiB.
    pub fn read<D: ReadAt + ?Sized>(dev: &mut D, dev_size: u64) -> Result<Luks2Header, LuksError> {
        let primary = read_one(dev, dev_size, 0, HeaderCopy::Primary);
        let secondary = match &primary {
            Ok((bin, _)) => read_one(dev, dev_size, bin.hdr_size, HeaderCopy::Secondary),
            Err(_) => find_secondary(dev, dev_size),
        };
        let mut warnings = Vec::new();
        let (copy, (bin, meta)) = match (primary, secondary) {
            (Ok(p), Ok(s)) => {
                if p.0.seqid != s.0.seqid {
                    warnings.push(format!(
                        "the LUKS2 header copies differ: primary seqid {}, secondary seqid {}; using the newer",
                        p.0.seqid, s.0.seqid
                    ));
                }
                if s.0.seqid > p.0.seqid {
                    (HeaderCopy::Secondary, s)
                } else {
                    (HeaderCopy::Primary, p)
                }
            }
            (Ok(p), Err(e)) => {
                warnings.push(format!(
                    "secondary LUKS2 header is bad ({e}); using the primary"
                ));
                (HeaderCopy::Primary, p)
            }
            (Err(e), Ok(s)) => {
                warnings.push(format!(
                    "primary LUKS2 header is bad ({e}); using the secondary"
                ));
                (HeaderCopy::Secondary, s)
            }
            (Err(p), Err(s)) => {
                return Err(LuksError::BothCopiesBad {
                    primary: Box::new(p),
                    secondary: Box::new(s),
                })
            }
        };
        for w in &warnings {
            tracing::warn!("{w}");
        }
        tracing::debug!(uuid = %bin.uuid, seqid = bin.seqid, ?copy, "read LUKS2 header");
        Ok(Luks2Header {
            copy,
            uuid: bin.uuid.clone(),
            label: bin.label.clone(),
            bin,
            meta,
            warnings,
        })
    }

    /// The single crypt segment stackbd can map, with its id.
    fn data_segment(&self) -> Result<(u32, &Segment), LuksError> {
        if !self.meta.config.requirements.is_empty() {
            return Err(LuksError::Unsupported(format!(
                "the volume has mandatory requirements: {}",
                self.meta.config.requirements.join(", ")
            )));
        }
        let mut it = self.meta.segments.iter();
        let (id, seg) = match (it.next(), it.next()) {
            (Some(s), None) => s,
            (None, _) => {
                return Err(LuksError::Unsupported(
                    "the volume has no data segment".into(),
                ))
            }
            _ => {
                return Err(LuksError::Unsupported(
                    "the volume has several data segments (a reencryption?)".into(),
                ))
            }
        };
        if seg.kind != "crypt" {
            return Err(LuksError::Unsupported(format!(
                "segment {id} is of type {:?}, not crypt",
                seg.kind
            )));
        }
        if let Some(i) = &seg.integrity {
            return Err(LuksError::Unsupported(format!(
                "segment {id} uses integrity ({i})"
            )));
        }
        Ok((*id, seg))
    }

    /// The digest that checks the data segment's key.
    fn segment_digest(&self) -> Result<&Digest, LuksError> {
        let (sid, _) = self.data_segment()?;
        self.meta
            .digests
            .values()
            .find(|d| d.segments.contains(&sid))
            .ok_or_else(|| LuksError::Unsupported(format!("no digest for segment {sid}")))
    }

    /// Whether `key` matches the data segment's digest. Pure CPU.
    pub fn verify_key(&self, key: &[u8]) -> Result<bool, LuksError> {
        digest_matches(self.segment_digest()?, key)
    }

    /// Tries `slot`, or every keyslot bound to the data segment (high priority first, priority
    /// 0 skipped). Blocks (KDF, reads).
    pub fn unlock<D: ReadAt + ?Sized>(
        &self,
        dev: &mut D,
        passphrase: &[u8],
        slot: Option<u32>,
    ) -> Result<VolumeKey, LuksError> {
        let digest = self.segment_digest()?;
        let slots: Vec<u32> = match slot {
            Some(s) => {
                if !self.meta.keyslots.contains_key(&s) {
                    return Err(LuksError::NoSuchKeyslot(s));
                }
                if !digest.keyslots.contains(&s) {
                    return Err(LuksError::Unsupported(format!(
                        "keyslot {s} does not hold the data segment's key"
                    )));
                }
                vec![s]
            }
            None => {
                let mut v: Vec<(u32, u32)> = self
                    .meta
                    .keyslots
                    .iter()
                    .filter(|(i, k)| digest.keyslots.contains(i) && k.priority != Some(0))
                    .map(|(i, k)| (k.priority.unwrap_or(1), *i))
                    .collect();
                v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                v.into_iter().map(|(_, i)| i).collect()
            }
        };
        for s in slots {
            let ks = &self.meta.keyslots[&s];
            let key = open_keyslot(dev, ks, passphrase).map_err(|e| match e {
                LuksError::Io { what, source } => LuksError::Io {
                    what: format!("keyslot {s}: {what}"),
                    source,
                },
                e => e,
            })?;
            if digest_matches(digest, &key)? {
                tracing::info!(keyslot = s, uuid = %self.uuid, "LUKS2 keyslot opened");
                return Ok(VolumeKey::new(key, Some(s)));
            }
            tracing::debug!(
                keyslot = s,
                "LUKS2 keyslot did not open with this passphrase"
            );
        }
        Err(LuksError::WrongPassphrase)
    }

    /// The data segment for a dm-crypt table.
    pub fn crypt_params(&self) -> Result<CryptParams, LuksError> {
        let (_, seg) = self.data_segment()?;
        let digest = self.segment_digest()?;
        let key_bytes = digest
            .keyslots
            .iter()
            .find_map(|s| self.meta.keyslots.get(s))
            .map(|k| k.key_size as usize)
            .ok_or_else(|| {
                LuksError::Unsupported("no keyslot holds the data segment's key".into())
            })?;
        area::check_cipher(&seg.encryption, key_bytes)?;
        Ok(CryptParams {
            cipher: seg.encryption.clone(),
            key_bytes,
            payload_offset_sectors: seg.offset / SECTOR,
            payload_sectors: seg.size.map(|s| s / SECTOR),
            sector_size: seg.sector_size,
            iv_large_sectors: false,
            iv_offset: seg.iv_tweak,
        })
    }
}

/// Derives the keyslot key, decrypts the area and merges the AF stripes: the candidate volume
/// key (not yet checked).
fn open_keyslot<D: ReadAt + ?Sized>(
    dev: &mut D,
    ks: &Keyslot,
    passphrase: &[u8],
) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    area::check_cipher(&ks.area.encryption, ks.area.key_size as usize)?;
    let mut derived = Zeroizing::new(vec![0u8; ks.area.key_size as usize]);
    match &ks.kdf {
        Kdf::Pbkdf2 {
            hash,
            iterations,
            salt,
        } => {
            let h = HashAlg::parse(hash).map_err(LuksError::Unsupported)?;
            h.pbkdf2(passphrase, salt, *iterations, &mut derived)?;
        }
        Kdf::Argon2 {
            variant,
            time,
            memory_kib,
            cpus,
            salt,
        } => kdf::argon2(
            *variant,
            passphrase,
            salt,
            *time,
            *memory_kib,
            *cpus,
            &mut derived,
        )?,
    }
    let key_len = ks.key_size as usize;
    // Bounded by json::parse: key_size * stripes fits in the area (<= 128 MiB).
    let af_len = key_len * ks.af.stripes as usize;
    let mut buf = Zeroizing::new(vec![
        0u8;
        af_len.div_ceil(SECTOR as usize) * SECTOR as usize
    ]);
    dev.read_exact_at(&mut buf, ks.area.offset)
        .map_err(|e| LuksError::io("reading the keyslot area", e))?;
    area::decrypt(&ks.area.encryption, &derived, &mut buf)?;
    let h = HashAlg::parse(&ks.af.hash).map_err(LuksError::Unsupported)?;
    Ok(af::merge(h, &buf[..af_len], key_len))
}

fn digest_matches(d: &Digest, key: &[u8]) -> Result<bool, LuksError> {
    let h = HashAlg::parse(&d.hash).map_err(LuksError::Unsupported)?;
    let mut out = Zeroizing::new(vec![0u8; d.digest.len()]);
    h.pbkdf2(key, &d.salt, d.iterations, &mut out)?;
    Ok(ct_eq(&out, &d.digest))
}
