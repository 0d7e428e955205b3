//! The LUKS2 JSON metadata: keyslots, segments, digests, tokens, config. Every number is checked
//! (64-bit values come as decimal strings, small ones as JSON integers), every area must lie in
//! the keyslots area and inside the device, every reference must resolve.

use crate::luks::kdf::{Argon2Variant, HashAlg};
use crate::luks::{HeaderCopy, LuksError, MAX_ARGON2_MEMORY_KIB, SECTOR};
use base64::Engine;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Most keyslots (and tokens) LUKS2 has.
pub const MAX_KEYSLOTS: u32 = 32;
/// The largest volume or keyslot-cipher key accepted, in bytes.
pub const MAX_KEY_BYTES: u32 = 1024;
/// The largest keyslot area accepted (cryptsetup's keyslots area is at most 128 MiB).
pub const MAX_AREA_BYTES: u64 = 128 << 20;
const MAX_SALT: usize = 1024;

/// The AF splitter of a keyslot (`af.type = "luks1"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Af {
    /// Stripes (4000 for cryptsetup).
    pub stripes: u32,
    /// Diffuser hash name.
    pub hash: String,
}

/// A keyslot's `raw` area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Area {
    /// Byte offset on the device.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// The area cipher, dm-crypt syntax.
    pub encryption: String,
    /// The area cipher's key length in bytes (the KDF output length).
    pub key_size: u32,
}

/// A keyslot's KDF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// Hash name.
        hash: String,
        /// Iterations.
        iterations: u32,
        /// Salt.
        salt: Vec<u8>,
    },
    /// Argon2i or argon2id.
    Argon2 {
        /// Which one.
        variant: Argon2Variant,
        /// Time cost (passes).
        time: u32,
        /// Memory cost in KiB.
        memory_kib: u32,
        /// Lanes (`cpus`).
        cpus: u32,
        /// Salt.
        salt: Vec<u8>,
    },
}

/// A `luks2` keyslot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyslot {
    /// The volume key length in bytes.
    pub key_size: u32,
    /// 0 ignore, 1 normal, 2 high; `None` when absent (normal).
    pub priority: Option<u32>,
    /// AF splitter.
    pub af: Af,
    /// The encrypted area.
    pub area: Area,
    /// The KDF.
    pub kdf: Kdf,
}

/// A data segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// `crypt` (or `linear` during a reencryption).
    pub kind: String,
    /// Byte offset on the device.
    pub offset: u64,
    /// Size in bytes, `None` for `dynamic`.
    pub size: Option<u64>,
    /// IV tweak in 512-byte sectors (crypt only).
    pub iv_tweak: u64,
    /// Cipher (crypt only).
    pub encryption: String,
    /// Encryption sector size in bytes (crypt only).
    pub sector_size: u32,
    /// Whether it names an integrity profile.
    pub integrity: Option<String>,
    /// Segment flags.
    pub flags: Vec<String>,
}

/// A `pbkdf2` digest of the volume key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// Keyslots whose key it checks.
    pub keyslots: Vec<u32>,
    /// Segments using that key.
    pub segments: Vec<u32>,
    /// Hash name.
    pub hash: String,
    /// Iterations.
    pub iterations: u32,
    /// Salt.
    pub salt: Vec<u8>,
    /// The digest.
    pub digest: Vec<u8>,
}

/// The `config` object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// JSON area size (hdr_size - 4096).
    pub json_size: u64,
    /// Keyslots area size.
    pub keyslots_size: u64,
    /// Persistent activation flags.
    pub flags: Vec<String>,
    /// Mandatory requirements (e.g. `online-reencrypt-v2`): a volume with any cannot be mapped.
    pub requirements: Vec<String>,
}

/// The validated JSON metadata. Plain data owned by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// `luks2` keyslots by number.
    pub keyslots: BTreeMap<u32, Keyslot>,
    /// Keyslots of other types (e.g. `reencrypt`), by number, with their type.
    pub other_keyslots: BTreeMap<u32, String>,
    /// Segments by number.
    pub segments: BTreeMap<u32, Segment>,
    /// Digests by number.
    pub digests: BTreeMap<u32, Digest>,
    /// Token types by number.
    pub tokens: BTreeMap<u32, String>,
    /// Config.
    pub config: Config,
}

struct P {
    copy: HeaderCopy,
}

impl P {
    fn err(&self, path: &str, reason: impl Into<String>) -> LuksError {
        LuksError::json(self.copy, path, reason)
    }

    fn obj<'a>(&self, v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, LuksError> {
        v.as_object().ok_or_else(|| self.err(path, "not an object"))
    }

    fn get<'a>(
        &self,
        m: &'a Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Result<&'a Value, LuksError> {
        let full = if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        };
        m.get(key).ok_or_else(|| self.err(&full, "missing"))
    }

    fn str<'a>(
        &self,
        m: &'a Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Result<&'a str, LuksError> {
        self.get(m, key, path)?
            .as_str()
            .ok_or_else(|| self.err(&format!("{path}.{key}"), "not a string"))
    }

    /// A 64-bit number written as a decimal string.
    fn str_u64(&self, m: &Map<String, Value>, key: &str, path: &str) -> Result<u64, LuksError> {
        let s = self.str(m, key, path)?;
        let p = format!("{path}.{key}");
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(self.err(&p, format!("{s:?} is not a decimal number")));
        }
        s.parse::<u64>()
            .map_err(|_| self.err(&p, format!("{s} does not fit in 64 bits")))
    }

    /// A JSON integer in `min..=max`.
    fn int(
        &self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
        min: u64,
        max: u64,
    ) -> Result<u32, LuksError> {
        let v = self.get(m, key, path)?;
        let p = format!("{path}.{key}");
        let n = v
            .as_u64()
            .ok_or_else(|| self.err(&p, format!("{v} is not a non-negative integer")))?;
        if n < min || n > max {
            return Err(self.err(&p, format!("{n} is not in {min}..={max}")));
        }
        u32::try_from(n).map_err(|_| self.err(&p, format!("{n} does not fit in 32 bits")))
    }

    fn b64(&self, m: &Map<String, Value>, key: &str, path: &str) -> Result<Vec<u8>, LuksError> {
        let s = self.str(m, key, path)?;
        let p = format!("{path}.{key}");
        if s.len() > MAX_SALT * 2 {
            return Err(self.err(&p, "too long"));
        }
        let b = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| self.err(&p, format!("not base64: {e}")))?;
        if b.is_empty() {
            return Err(self.err(&p, "empty"));
        }
        Ok(b)
    }

    fn hash(&self, m: &Map<String, Value>, key: &str, path: &str) -> Result<String, LuksError> {
        let s = self.str(m, key, path)?;
        HashAlg::parse(s).map_err(|e| self.err(&format!("{path}.{key}"), e))?;
        Ok(s.to_string())
    }

    fn id(&self, key: &str, path: &str, max: u32) -> Result<u32, LuksError> {
        let p = format!("{path}.{key}");
        if key.is_empty() || key.len() > 10 || !key.bytes().all(|c| c.is_ascii_digit()) {
            return Err(self.err(&p, "the id is not a decimal number"));
        }
        match key.parse::<u32>() {
            Ok(n) if n < max => Ok(n),
            _ => Err(self.err(&p, format!("the id is not below {max}"))),
        }
    }

    fn id_list(
        &self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Result<Vec<u32>, LuksError> {
        let p = format!("{path}.{key}");
        let a = self
            .get(m, key, path)?
            .as_array()
            .ok_or_else(|| self.err(&p, "not an array"))?;
        a.iter()
            .map(|v| {
                let s = v
                    .as_str()
                    .ok_or_else(|| self.err(&p, "an entry is not a string"))?;
                self.id(s, &p, u32::MAX)
            })
            .collect()
    }

    fn str_list(&self, v: Option<&Value>, path: &str) -> Result<Vec<String>, LuksError> {
        let Some(v) = v else { return Ok(Vec::new()) };
        let a = v.as_array().ok_or_else(|| self.err(path, "not an array"))?;
        a.iter()
            .map(|e| {
                e.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(path, "an entry is not a string"))
            })
            .collect()
    }
}

/// The layout the metadata is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Metadata size of one copy.
    pub hdr_size: u64,
    /// Device size in bytes.
    pub dev_size: u64,
}

/// Parses and validates the JSON text of `copy`. Pure; allocates.
pub fn parse(text: &[u8], copy: HeaderCopy, layout: Layout) -> Result<Metadata, LuksError> {
    let p = P { copy };
    let root: Value = serde_json::from_slice(text)
        .map_err(|e| p.err("(document)", format!("not valid JSON: {e}")))?;
    let root = p.obj(&root, "(document)")?;

    let config = parse_config(&p, p.obj(p.get(root, "config", "")?, "config")?, layout)?;
    let ks_start = layout.hdr_size * 2;
    let ks_end = ks_start
        .checked_add(config.keyslots_size)
        .ok_or_else(|| p.err("config.keyslots_size", "overflows"))?;

    let mut keyslots = BTreeMap::new();
    let mut other_keyslots = BTreeMap::new();
    for (k, v) in p.obj(p.get(root, "keyslots", "")?, "keyslots")? {
        let id = p.id(k, "keyslots", MAX_KEYSLOTS)?;
        let path = format!("keyslots.{k}");
        let m = p.obj(v, &path)?;
        let kind = p.str(m, "type", &path)?;
        if kind != "luks2" {
            other_keyslots.insert(id, kind.to_string());
            continue;
        }
        keyslots.insert(id, parse_keyslot(&p, m, &path, (ks_start, ks_end), layout)?);
    }
    // Keyslot areas must not overlap.
    let mut areas: Vec<(u64, u64, u32)> = keyslots
        .iter()
        .map(|(i, k)| (k.area.offset, k.area.offset + k.area.size, *i))
        .collect();
    areas.sort_unstable();
    for w in areas.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(p.err(
                &format!("keyslots.{}.area", w[1].2),
                format!("overlaps the area of keyslot {}", w[0].2),
            ));
        }
    }

    let mut segments = BTreeMap::new();
    for (k, v) in p.obj(p.get(root, "segments", "")?, "segments")? {
        let id = p.id(k, "segments", 1024)?;
        let path = format!("segments.{k}");
        segments.insert(
            id,
            parse_segment(&p, p.obj(v, &path)?, &path, ks_end, layout)?,
        );
    }

    let mut digests = BTreeMap::new();
    for (k, v) in p.obj(p.get(root, "digests", "")?, "digests")? {
        let id = p.id(k, "digests", 1024)?;
        let path = format!("digests.{k}");
        let d = parse_digest(&p, p.obj(v, &path)?, &path)?;
        for s in &d.keyslots {
            if !keyslots.contains_key(s) && !other_keyslots.contains_key(s) {
                return Err(p.err(
                    &format!("{path}.keyslots"),
                    format!("keyslot {s} does not exist"),
                ));
            }
        }
        for s in &d.segments {
            if !segments.contains_key(s) {
                return Err(p.err(
                    &format!("{path}.segments"),
                    format!("segment {s} does not exist"),
                ));
            }
        }
        digests.insert(id, d);
    }

    let mut tokens = BTreeMap::new();
    for (k, v) in p.obj(p.get(root, "tokens", "")?, "tokens")? {
        let id = p.id(k, "tokens", MAX_KEYSLOTS)?;
        let path = format!("tokens.{k}");
        tokens.insert(id, p.str(p.obj(v, &path)?, "type", &path)?.to_string());
    }

    Ok(Metadata {
        keyslots,
        other_keyslots,
        segments,
        digests,
        tokens,
        config,
    })
}

fn parse_config(p: &P, m: &Map<String, Value>, layout: Layout) -> Result<Config, LuksError> {
    let json_size = p.str_u64(m, "json_size", "config")?;
    if json_size != layout.hdr_size - 4096 {
        return Err(p.err(
            "config.json_size",
            format!(
                "{json_size}, but the header says {}",
                layout.hdr_size - 4096
            ),
        ));
    }
    let keyslots_size = p.str_u64(m, "keyslots_size", "config")?;
    if keyslots_size % 4096 != 0 {
        return Err(p.err(
            "config.keyslots_size",
            format!("{keyslots_size} is not a multiple of 4096"),
        ));
    }
    let end = (layout.hdr_size * 2).checked_add(keyslots_size);
    if end.is_none_or(|e| e > layout.dev_size) {
        return Err(p.err(
            "config.keyslots_size",
            format!(
                "{keyslots_size}: the keyslots area ends past the end of the {}-byte device",
                layout.dev_size
            ),
        ));
    }
    let flags = p.str_list(m.get("flags"), "config.flags")?;
    let requirements = match m.get("requirements") {
        None => Vec::new(),
        Some(r) => p.str_list(
            p.obj(r, "config.requirements")?.get("mandatory"),
            "config.requirements.mandatory",
        )?,
    };
    Ok(Config {
        json_size,
        keyslots_size,
        flags,
        requirements,
    })
}

fn parse_keyslot(
    p: &P,
    m: &Map<String, Value>,
    path: &str,
    (ks_start, ks_end): (u64, u64),
    layout: Layout,
) -> Result<Keyslot, LuksError> {
    let key_size = p.int(m, "key_size", path, 1, u64::from(MAX_KEY_BYTES))?;
    let priority = match m.get("priority") {
        None => None,
        Some(_) => Some(p.int(m, "priority", path, 0, 2)?),
    };
    let afp = format!("{path}.af");
    let afm = p.obj(p.get(m, "af", path)?, &afp)?;
    if p.str(afm, "type", &afp)? != "luks1" {
        return Err(p.err(&format!("{afp}.type"), "only the luks1 AF splitter exists"));
    }
    let af = Af {
        stripes: p.int(afm, "stripes", &afp, 1, u64::from(u32::MAX))?,
        hash: p.hash(afm, "hash", &afp)?,
    };

    let ap = format!("{path}.area");
    let am = p.obj(p.get(m, "area", path)?, &ap)?;
    if p.str(am, "type", &ap)? != "raw" {
        return Err(p.err(&format!("{ap}.type"), "a luks2 keyslot needs a raw area"));
    }
    let area = Area {
        offset: p.str_u64(am, "offset", &ap)?,
        size: p.str_u64(am, "size", &ap)?,
        encryption: p.str(am, "encryption", &ap)?.to_string(),
        key_size: p.int(am, "key_size", &ap, 1, u64::from(MAX_KEY_BYTES))?,
    };
    if !area.offset.is_multiple_of(SECTOR) || !area.size.is_multiple_of(SECTOR) {
        return Err(p.err(&ap, "offset and size must be multiples of 512"));
    }
    if area.size > MAX_AREA_BYTES {
        return Err(p.err(
            &format!("{ap}.size"),
            format!("{} is more than {MAX_AREA_BYTES}", area.size),
        ));
    }
    let end = area
        .offset
        .checked_add(area.size)
        .ok_or_else(|| p.err(&ap, "offset + size overflows"))?;
    if area.offset < ks_start || end > ks_end {
        return Err(p.err(
            &ap,
            format!(
                "bytes {}..{end} are not inside the keyslots area {ks_start}..{ks_end}",
                area.offset
            ),
        ));
    }
    if end > layout.dev_size {
        return Err(p.err(
            &ap,
            format!(
                "ends at byte {end}, past the end of the {}-byte device",
                layout.dev_size
            ),
        ));
    }
    // key_size <= 1024 and stripes < 2^32: no overflow in u64.
    let af_len = u64::from(key_size) * u64::from(af.stripes);
    if af_len.div_ceil(SECTOR) * SECTOR > area.size {
        return Err(p.err(
            &ap,
            format!(
                "{} bytes cannot hold {} stripes of a {key_size}-byte key",
                area.size, af.stripes
            ),
        ));
    }

    let kp = format!("{path}.kdf");
    let km = p.obj(p.get(m, "kdf", path)?, &kp)?;
    let kdf = match p.str(km, "type", &kp)? {
        "pbkdf2" => Kdf::Pbkdf2 {
            hash: p.hash(km, "hash", &kp)?,
            iterations: p.int(km, "iterations", &kp, 1, u64::from(u32::MAX))?,
            salt: p.b64(km, "salt", &kp)?,
        },
        t @ ("argon2i" | "argon2id") => {
            let cpus = p.int(km, "cpus", &kp, 1, 0xff_ffff)?;
            let memory_kib = p.int(km, "memory", &kp, 1, u64::from(MAX_ARGON2_MEMORY_KIB))?;
            if u64::from(memory_kib) < 8 * u64::from(cpus) {
                return Err(p.err(
                    &format!("{kp}.memory"),
                    format!("{memory_kib} KiB is less than 8 KiB per thread ({cpus} threads)"),
                ));
            }
            Kdf::Argon2 {
                variant: if t == "argon2i" {
                    Argon2Variant::Argon2i
                } else {
                    Argon2Variant::Argon2id
                },
                time: p.int(km, "time", &kp, 1, u64::from(u32::MAX))?,
                memory_kib,
                cpus,
                salt: p.b64(km, "salt", &kp)?,
            }
        }
        t => return Err(p.err(&format!("{kp}.type"), format!("KDF {t:?} is not supported"))),
    };
    Ok(Keyslot {
        key_size,
        priority,
        af,
        area,
        kdf,
    })
}

fn parse_segment(
    p: &P,
    m: &Map<String, Value>,
    path: &str,
    ks_end: u64,
    layout: Layout,
) -> Result<Segment, LuksError> {
    let kind = p.str(m, "type", path)?.to_string();
    let offset = p.str_u64(m, "offset", path)?;
    let size = match p.str(m, "size", path)? {
        "dynamic" => None,
        _ => Some(p.str_u64(m, "size", path)?),
    };
    let flags = p.str_list(m.get("flags"), &format!("{path}.flags"))?;
    let (iv_tweak, encryption, sector_size, integrity) = if kind == "crypt" {
        let ss = p.int(m, "sector_size", path, 512, 4096)?;
        if !ss.is_power_of_two() {
            return Err(p.err(
                &format!("{path}.sector_size"),
                format!("{ss} is not 512, 1024, 2048 or 4096"),
            ));
        }
        let integrity = match m.get("integrity") {
            None => None,
            Some(v) => Some(
                p.str(
                    p.obj(v, &format!("{path}.integrity"))?,
                    "type",
                    &format!("{path}.integrity"),
                )?
                .to_string(),
            ),
        };
        (
            p.str_u64(m, "iv_tweak", path)?,
            p.str(m, "encryption", path)?.to_string(),
            ss,
            integrity,
        )
    } else {
        (0, String::new(), SECTOR as u32, None)
    };
    if offset % SECTOR != 0 {
        return Err(p.err(
            &format!("{path}.offset"),
            format!("{offset} is not a multiple of 512"),
        ));
    }
    if offset != 0 && offset < ks_end {
        return Err(p.err(
            &format!("{path}.offset"),
            format!("{offset} is inside the LUKS2 metadata and keyslots (they end at {ks_end})"),
        ));
    }
    if offset > layout.dev_size {
        return Err(p.err(
            &format!("{path}.offset"),
            format!(
                "{offset} is past the end of the {}-byte device",
                layout.dev_size
            ),
        ));
    }
    if let Some(sz) = size {
        if sz == 0 || sz % u64::from(sector_size) != 0 {
            return Err(p.err(
                &format!("{path}.size"),
                format!("{sz} is not a positive multiple of the {sector_size}-byte sector"),
            ));
        }
        let end = offset
            .checked_add(sz)
            .ok_or_else(|| p.err(&format!("{path}.size"), "offset + size overflows"))?;
        if end > layout.dev_size {
            return Err(p.err(
                &format!("{path}.size"),
                format!(
                    "the segment ends at byte {end}, past the end of the {}-byte device",
                    layout.dev_size
                ),
            ));
        }
    }
    if iv_tweak.checked_add(offset / SECTOR).is_none() {
        return Err(p.err(&format!("{path}.iv_tweak"), "overflows"));
    }
    Ok(Segment {
        kind,
        offset,
        size,
        iv_tweak,
        encryption,
        sector_size,
        integrity,
        flags,
    })
}

fn parse_digest(p: &P, m: &Map<String, Value>, path: &str) -> Result<Digest, LuksError> {
    let t = p.str(m, "type", path)?;
    if t != "pbkdf2" {
        return Err(p.err(
            &format!("{path}.type"),
            format!("digest type {t:?} is not supported"),
        ));
    }
    let hash = p.hash(m, "hash", path)?;
    let digest = p.b64(m, "digest", path)?;
    if digest.len() > 64 {
        return Err(p.err(
            &format!("{path}.digest"),
            format!("{} bytes is longer than 64", digest.len()),
        ));
    }
    Ok(Digest {
        keyslots: p.id_list(m, "keyslots", path)?,
        segments: p.id_list(m, "segments", path)?,
        hash,
        iterations: p.int(m, "iterations", path, 1, u64::from(u32::MAX))?,
        salt: p.b64(m, "salt", path)?,
        digest,
    })
}
