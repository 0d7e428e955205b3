//! Export verbs: `export_add`, `export_rm` and `export_ls`.

use super::super::nbd::ExportEntry;
use super::{changed, engine, Daemon, Req};
use serde_json::{json, Value};
use stackbd_core::engine::valid_name;

/// `export_add {volume, name?, read_only?}`: exports a volume over NBD (by default under its name).
pub(super) fn export_add(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let volume = r.string("volume")?;
    let name = r.opt_string("name")?.unwrap_or(volume);
    let read_only = r.flag("read_only")?;
    if !valid_name(name) {
        return Err(format!(
            "'{name}' is not a valid export name (letters, digits, '_', '-', '.'; \
             starts with a letter)"
        ));
    }
    let mut e = engine(d);
    d.add_export(&mut e, name, volume, read_only)?;
    changed(d, &e, false);
    let x = d
        .exports
        .get(name)
        .ok_or_else(|| format!("export '{name}' vanished"))?;
    Ok(json!({"export": export_json(&x)}))
}

/// `export_rm {name}`: drops an export, closes its connections and lets go of its volume.
pub(super) fn export_rm(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let mut e = engine(d);
    let x = d
        .exports
        .remove(name)
        .ok_or_else(|| format!("export '{name}' does not exist"))?;
    // Its connections close; the export held the volume open.
    x.revoke();
    e.close(x.dev);
    changed(d, &e, false);
    Ok(json!({"removed": name, "volume": x.volume}))
}

/// `export_ls`: every export.
pub(super) fn export_ls(d: &Daemon) -> Result<Value, String> {
    Ok(json!({"exports": d.exports.all().iter().map(export_json).collect::<Vec<_>>()}))
}

/// Names of the exports of `volume`.
pub(super) fn exports_of(d: &Daemon, volume: &str) -> Vec<String> {
    d.exports
        .all()
        .into_iter()
        .filter(|x| x.volume == volume)
        .map(|x| x.name)
        .collect()
}

/// An export as `export_ls`, `export_add` and `stats` show it.
pub(super) fn export_json(x: &ExportEntry) -> Value {
    json!({"name": x.name, "volume": x.volume, "read_only": x.read_only, "bytes": x.size_bytes})
}
