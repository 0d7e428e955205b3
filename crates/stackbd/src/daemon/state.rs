//! The state file: the daemon's leaves, volumes (live tables) and exports, in the config file's
//! format, written atomically (temp file, fsync, rename, fsync of the directory) on every change.
//! Leaves are written from the parameters they were built from (the daemon's [`LeafTable`],
//! printed by the leaf registry), so a restart builds them with every parameter unchanged.
//! Runs on whichever control thread made the change, with the engine lock held; blocks on
//! the disk.

use super::nbd::ExportTable;
use super::{LeafTable, LuksTable};
use crate::config::Failed;
use stackbd_core::Engine;
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn path(dir: &Path) -> PathBuf {
    dir.join("state.toml")
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A table key: bare where TOML allows it, quoted otherwise (names may hold '.').
fn key(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        s.to_string()
    } else {
        quote(s)
    }
}

/// Renders the engine's state as a config file. A LUKS volume is written as its `[luks.NAME]`
/// section (where its key file is), never as its table (which holds the volume key).
/// What failed at start and waits (`pending`) is written too, so a restart still has it.
pub fn render(
    engine: &Engine,
    leaves: &LeafTable,
    luks: &LuksTable,
    exports: &ExportTable,
    pending: &Failed,
) -> String {
    let mut out = String::from(
        "# stackbd state: written by the daemon on every change; a valid config file\n",
    );
    let devices = engine.ls();
    for (name, is_volume) in &devices {
        if *is_volume {
            continue;
        }
        match leaves.get(name) {
            Some(p) => out.push_str(&format!("\n[leaf.{}]\n{}", key(name), p.to_toml())),
            // Every leaf is added with its parameters; one without cannot be restored.
            None => out.push_str(&format!("\n# leaf {name}: parameters unknown\n")),
        }
    }
    for (l, why) in &pending.leaves {
        out.push_str(&format!(
            "\n# failed at start: {}\n[leaf.{}]\n{}",
            one_line(why),
            key(&l.name),
            l.params.to_toml()
        ));
    }
    for (l, why) in &pending.luks {
        out.push_str(&format!(
            "\n# failed at start: {}\n[luks.{}]\n{}",
            one_line(why),
            key(&l.name),
            l.to_toml()
        ));
    }
    for (name, is_volume) in &devices {
        if let (true, Some(l)) = (*is_volume, luks.get(name)) {
            out.push_str(&format!("\n[luks.{}]\n{}", key(name), l.to_toml()));
        }
    }
    for (name, is_volume) in &devices {
        if !*is_volume || luks.contains_key(name) {
            continue;
        }
        let table = engine.table(name, false).unwrap_or_default();
        if table.is_empty() {
            // A volume without a live table has nothing to restore but its name.
            out.push_str(&format!("\n# volume {name} has no live table\n"));
            continue;
        }
        out.push_str(&format!(
            "\n[volume.{}]\ntable = \"\"\"\n{table}\"\"\"\n",
            key(name)
        ));
        if let Ok(q) = engine.queue(name) {
            if q != stackbd_core::QueueOpts::default() {
                out.push_str(&format!(
                    "scheduler = {}\nnr_requests = {}\n",
                    quote(&q.scheduler.to_string()),
                    q.nr_requests
                ));
            }
        }
    }
    for (v, why) in &pending.volumes {
        out.push_str(&format!(
            "\n# failed at start: {}\n[volume.{}]\ntable = \"\"\"\n{}\n\"\"\"\n",
            one_line(why),
            key(&v.name),
            v.table.trim_end()
        ));
        if v.queue != stackbd_core::QueueOpts::default() {
            out.push_str(&format!(
                "scheduler = {}\nnr_requests = {}\n",
                quote(&v.queue.scheduler.to_string()),
                v.queue.nr_requests
            ));
        }
    }
    for (x, why) in &pending.exports {
        out.push_str(&format!(
            "\n# failed at start: {}\n[export.{}]\nvolume = {}\nread_only = {}\n",
            one_line(why),
            key(&x.name),
            quote(&x.volume),
            x.read_only
        ));
    }
    for e in exports.all() {
        out.push_str(&format!(
            "\n[export.{}]\nvolume = {}\nread_only = {}\n",
            key(&e.name),
            quote(&e.volume),
            e.read_only
        ));
    }
    out
}

/// Writes the state atomically.
pub fn save(
    dir: &Path,
    engine: &Engine,
    leaves: &LeafTable,
    luks: &LuksTable,
    exports: &ExportTable,
    pending: &Failed,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let text = render(engine, leaves, luks, exports, pending);
    let final_path = path(dir);
    let tmp = dir.join(".state.toml.tmp");
    {
        // Only its user reads it: it names key files and may hold tables with keys in them.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &final_path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// A reason as one comment line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}
