//! `kind = "powercut"`: the power-cut leaf ([`crate::powercut`]), a RAM device with a volatile
//! write cache for crash-consistency tests, declared in the config, added live or restored
//! from the state file like any other kind. `image` boots it from a durable image saved by
//! `stackbd leaf message NAME save PATH` (the "reboot").

use super::values::{check_bool, check_int, check_string, Size};
use super::{Field, LeafKind, ParamError};
use crate::{PowerCutLeaf, PowerCutOptions};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use stackbd_core::Leaf;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use toml::Value;

/// The largest powercut device: it keeps two full images in RAM (durable and current).
pub const MAX_POWERCUT_BYTES: u64 = 4 << 30;

/// `kind = "powercut"`.
pub struct PowerCut;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerCutParams {
    /// Required unless `image` is given; with `image`, must be the image's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub tear: bool,
    #[serde(default)]
    pub reorder: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_random: Option<CutRange>,
    /// Boot from this durable image (a file written by the `save` message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
}

/// `cut_random = "LO..HI"`: a write count in `[LO, HI]`, LO <= HI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutRange {
    pub lo: u64,
    pub hi: u64,
}

impl CutRange {
    pub fn parse(text: &str) -> Result<CutRange, String> {
        let bad = |why: &str| format!("'{text}': {why}");
        let (lo, hi) = text
            .split_once("..")
            .ok_or_else(|| bad("expected LO..HI, two write counts"))?;
        let num = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| bad(&format!("'{s}' is not a whole number >= 0")))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo > hi {
            return Err(bad(&format!("LO ({lo}) is more than HI ({hi})")));
        }
        Ok(CutRange { lo, hi })
    }
}

impl fmt::Display for CutRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.lo, self.hi)
    }
}

impl Serialize for CutRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CutRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        CutRange::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

fn check_cut_range(v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) => CutRange::parse(s).map(drop),
        v => Err(format!(
            "expected a string \"LO..HI\", got {}",
            v.type_str()
        )),
    }
}

fn check_powercut_size(v: &Value) -> Result<(), String> {
    let s = Size::from_value(v)?;
    if s.bytes() > MAX_POWERCUT_BYTES {
        return Err(format!(
            "{s} is too large for a powercut leaf (at most {}: it keeps two images in RAM)",
            Size::new(MAX_POWERCUT_BYTES).map_or_else(|e| e, |m| m.to_string())
        ));
    }
    Ok(())
}

/// Counts are TOML integers, so at most `i64::MAX`.
fn check_count(v: &Value) -> Result<(), String> {
    check_int(v, 0, i64::MAX)
}

impl LeafKind for PowerCut {
    const NAME: &'static str = "powercut";
    const FIELDS: &'static [Field] = &[
        Field::optional("size", check_powercut_size),
        Field::optional("seed", check_count),
        Field::optional("tear", check_bool),
        Field::optional("reorder", check_bool),
        Field::optional("cut_after", check_count),
        Field::optional("cut_random", check_cut_range),
        Field::optional("image", check_string).path(),
    ];
    type Params = PowerCutParams;

    fn validate(p: &PowerCutParams) -> Result<(), ParamError> {
        if p.size.is_none() && p.image.is_none() {
            return Err(ParamError::Invalid {
                key: Some("size".into()),
                msg: "missing: a powercut leaf needs a size, or an image to boot from".into(),
            });
        }
        Ok(())
    }

    /// Reads the image (blocks on the file) or allocates the device.
    fn build(p: &PowerCutParams) -> io::Result<Arc<dyn Leaf>> {
        let opts = PowerCutOptions {
            seed: p.seed,
            tear: p.tear,
            reorder: p.reorder,
            cut_after: p.cut_after,
            cut_random: p.cut_random.map(|r| (r.lo, r.hi)),
        };
        let leaf = match &p.image {
            Some(path) => {
                let shown = path.display();
                let at = |e: io::Error| io::Error::new(e.kind(), format!("image {shown}: {e}"));
                let bytes = std::fs::metadata(path).map_err(at)?.len();
                let refuse = |why: String| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("image {shown}: {why}"))
                };
                let size =
                    Size::new(bytes).map_err(|e| refuse(e.replace("invalid size", "size")))?;
                if bytes > MAX_POWERCUT_BYTES {
                    return Err(refuse(format!(
                        "{size} is too large for a powercut leaf (at most 4GiB)"
                    )));
                }
                if let Some(want) = p.size {
                    if want != size {
                        return Err(refuse(format!(
                            "the image is {size} ({bytes} bytes) but size says {want} ({} \
                             bytes)",
                            want.bytes()
                        )));
                    }
                }
                let leaf = PowerCutLeaf::load(path, opts).map_err(at)?;
                // The file changed between the two looks: refuse rather than boot a surprise.
                if leaf.size() * stackbd_core::SECTOR_SIZE as u64 != bytes {
                    return Err(refuse("the file changed while it was read".into()));
                }
                leaf
            }
            None => {
                let size = p.size.map(Size::bytes).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "missing size (or image)")
                })?;
                PowerCutLeaf::new(size, opts)
                    .map_err(|e| io::Error::new(e.kind(), format!("size {size}: {e}")))?
            }
        };
        Ok(Arc::new(leaf))
    }
}
