//! LUKS verbs: `luks_open` unlocks a LUKS header and creates a `crypt` volume over its payload
//! (see [`crate::crypttab`]); `luks_close` removes that volume, and the leaf `luks_open` made
//! for an image path. The key derivation is slow by design (argon2: about a second): it runs
//! with the engine lock held, as reading the header through the engine needs the engine.

use super::{changed, engine, es, volume_info, Daemon, Req};
use crate::crypttab::{KeySource, LuksDecl};
use serde_json::{json, Value};
use stackbd_core::engine::valid_name;
use stackbd_leaves::registry;
use std::path::PathBuf;
use std::sync::PoisonError;

/// The leaf `luks_open` makes for an image path: the volume's name with this suffix.
pub const IMAGE_LEAF_SUFFIX: &str = "-luks";

/// `luks_open {name, device | path, key_file | passphrase_file, key_slot?, allow_discards?}`.
/// `device` names a leaf or volume holding the header; `path` is an image file (or block
/// device), opened as a file leaf named `<name>-luks`. Paths must be absolute. On any error
/// nothing is left behind.
pub(super) fn luks_open(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    if !valid_name(name) {
        return Err(es(stackbd_core::EngineError::BadName(name.to_string())));
    }
    let key = match (r.opt_string("key_file")?, r.opt_string("passphrase_file")?) {
        (Some(k), None) => KeySource::KeyFile(absolute(r, "key_file", k)?),
        (None, Some(p)) => KeySource::PassphraseFile(absolute(r, "passphrase_file", p)?),
        _ => {
            return Err(format!(
                "{}: give exactly one of 'key_file' and 'passphrase_file'",
                r.cmd
            ))
        }
    };
    let key_slot = match r.opt_u64("key_slot")? {
        Some(s) if s < 32 => Some(s as u32),
        Some(s) => return Err(format!("{}: key_slot {s} is out of range (0..=31)", r.cmd)),
        None => None,
    };
    let (device, image) = match (r.opt_string("device")?, r.opt_string("path")?) {
        (Some(dev), None) => (dev.to_string(), None),
        (None, Some(p)) => {
            let p = absolute(r, "path", p)?;
            (format!("{name}{IMAGE_LEAF_SUFFIX}"), Some(p))
        }
        _ => {
            return Err(format!(
                "{}: give exactly one of 'device' (a leaf) and 'path' (an image file)",
                r.cmd
            ))
        }
    };
    let decl = LuksDecl {
        name: name.to_string(),
        line: 0,
        device,
        key,
        key_slot,
        allow_discards: r.flag("allow_discards")?,
    };
    let leaf = match &image {
        Some(p) => Some(image_leaf(name, p)?),
        None => None,
    };
    let mut e = engine(d);
    if e.dev_id(name).is_ok() {
        return Err(es(stackbd_core::EngineError::Exists(name.to_string())));
    }
    if let Some((params, leaf)) = leaf {
        e.add_leaf(&decl.device, leaf).map_err(es)?;
        if let Err(msg) = decl.open(&mut e) {
            let _ = e.remove_leaf(&decl.device);
            return Err(msg);
        }
        d.leaf_params
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(decl.device.clone(), params);
    } else {
        decl.open(&mut e)?;
    }
    tracing::info!(volume = name, device = %decl.device, "LUKS volume opened");
    d.luks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(name.to_string(), decl);
    changed(d, &e, true);
    Ok(json!({"info": volume_info(d, &e, name)?}))
}

/// `luks_close {name}`: removes a volume `luks_open` made, and its image leaf if it made one.
pub(super) fn luks_close(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let mut e = engine(d);
    let decl = d
        .luks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
        .cloned()
        .ok_or_else(|| format!("'{name}' is not a LUKS volume opened by luks open"))?;
    e.remove(name, false).map_err(es)?;
    d.luks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(name);
    let mut removed_leaf = false;
    if decl.device == format!("{name}{IMAGE_LEAF_SUFFIX}") && e.remove_leaf(&decl.device).is_ok() {
        d.leaf_params
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&decl.device);
        removed_leaf = true;
    }
    tracing::info!(volume = name, "LUKS volume closed");
    changed(d, &e, true);
    Ok(json!({"removed": name, "leaf_removed": removed_leaf.then_some(decl.device)}))
}

fn absolute(r: &Req<'_>, field: &str, p: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(p);
    if p.is_relative() {
        return Err(format!(
            "{}: {field} '{}' is relative; the daemon needs an absolute path",
            r.cmd,
            p.display()
        ));
    }
    Ok(p)
}

/// A file leaf over an image path (opened before the engine lock is taken: it may block).
fn image_leaf(
    name: &str,
    p: &std::path::Path,
) -> Result<(registry::LeafParams, std::sync::Arc<dyn stackbd_core::Leaf>), String> {
    let mut t = toml::Table::new();
    t.insert(
        "path".into(),
        toml::Value::String(p.to_string_lossy().into_owned()),
    );
    let params = registry::parse("file", &t).map_err(|e| format!("luks '{name}': {e}"))?;
    let leaf = params
        .build()
        .map_err(|e| format!("luks '{name}': cannot open {}: {e}", p.display()))?;
    Ok((params, leaf))
}
