//! What a degraded build could not bring up: the declarations, each with why, so the daemon can
//! keep them (in its state file, in `leaf ls` and `ls`) and retry them later.

use super::{Config, ConfigError, ExportDecl, LeafDecl, Section, VolumeDecl};
use crate::crypttab::LuksDecl;
use std::collections::HashMap;

/// Declarations that failed, in file order, each with the reason.
#[derive(Clone, Debug, Default)]
pub struct Failed {
    pub leaves: Vec<(LeafDecl, String)>,
    pub luks: Vec<(LuksDecl, String)>,
    pub volumes: Vec<(VolumeDecl, String)>,
    /// Filled by the daemon (exports are added after the build).
    pub exports: Vec<(ExportDecl, String)>,
}

impl Failed {
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
            && self.luks.is_empty()
            && self.volumes.is_empty()
            && self.exports.is_empty()
    }

    /// The failed declarations of `cfg`, by the names the build marked bad, with the text of
    /// the first error about each.
    pub(super) fn collect(
        cfg: &Config,
        bad_leaf: &HashMap<String, &'static str>,
        bad_vol: &HashMap<String, &'static str>,
        errors: &[ConfigError],
    ) -> Failed {
        let why = |s: Section, fallback: &str| {
            errors
                .iter()
                .find(|e| e.section.as_ref() == Some(&s))
                .map_or_else(|| fallback.to_string(), |e| e.kind.to_string())
        };
        Failed {
            leaves: cfg
                .leaves
                .iter()
                .filter_map(|l| {
                    let b = bad_leaf.get(&l.name)?;
                    Some((l.clone(), why(Section::Leaf(l.name.clone()), b)))
                })
                .collect(),
            luks: cfg
                .luks
                .iter()
                .filter_map(|l| {
                    let b = bad_vol.get(&l.name)?;
                    Some((l.clone(), why(Section::Luks(l.name.clone()), b)))
                })
                .collect(),
            volumes: cfg
                .volumes
                .iter()
                .filter_map(|v| {
                    let b = bad_vol.get(&v.name)?;
                    Some((v.clone(), why(Section::Volume(v.name.clone()), b)))
                })
                .collect(),
            exports: Vec::new(),
        }
    }
}
