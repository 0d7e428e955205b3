//! `stackbd check CONFIG [--json]`: builds the stack in a throwaway engine and prints each leaf and
//! volume (size, canonical table, stacked limits), or every error, one per line, on stderr.

use clap::Args;
use serde_json::{json, Value};
use stackbd::config::{self, human_bytes, Built, ConfigError, ErrorKind};
use stackbd_core::{Limits, ReactorConfig, SECTOR_SIZE};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The configuration file (TOML).
    pub config: PathBuf,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &CheckArgs) -> ExitCode {
    let path = args.config.display().to_string();
    match config::check(&args.config, ReactorConfig::default()) {
        Ok(built) => {
            if args.json {
                out(&format!("{}\n", report_json(&path, &built)));
            } else {
                out(&report_text(&path, &built));
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            if args.json {
                let errs: Vec<Value> = errors.iter().map(error_json).collect();
                out(&format!(
                    "{}\n",
                    json!({ "config": path, "ok": false, "errors": errs })
                ));
            }
            let mut err = std::io::stderr().lock();
            for e in &errors {
                let _ = writeln!(err, "{e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
}

fn sectors_and_bytes(sectors: u64) -> String {
    let bytes = sectors * SECTOR_SIZE as u64;
    format!("{sectors} sectors ({})", human_bytes(bytes))
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn unlimited(n: u32) -> String {
    if n == 0 {
        "0 (no limit)".to_string()
    } else {
        n.to_string()
    }
}

/// Limits as (name, text) rows, named as the `Limits` fields are.
fn limit_rows(l: &Limits) -> Vec<(&'static str, String)> {
    vec![
        ("logical_block_bytes", l.logical_block_bytes.to_string()),
        ("physical_block_bytes", l.physical_block_bytes.to_string()),
        ("io_min_bytes", l.io_min_bytes.to_string()),
        (
            "io_opt_bytes",
            if l.io_opt_bytes == 0 {
                "0 (none)".to_string()
            } else {
                l.io_opt_bytes.to_string()
            },
        ),
        (
            "alignment_offset_bytes",
            l.alignment_offset_bytes.to_string(),
        ),
        ("max_sectors", unlimited(l.max_sectors)),
        (
            "chunk_sectors",
            if l.chunk_sectors == 0 {
                "0 (no boundary)".to_string()
            } else {
                l.chunk_sectors.to_string()
            },
        ),
        ("max_discard_sectors", unlimited(l.max_discard_sectors)),
        (
            "max_write_zeroes_sectors",
            unlimited(l.max_write_zeroes_sectors),
        ),
        (
            "max_copy_sectors",
            if l.max_copy_sectors == 0 {
                "0 (copies are emulated)".to_string()
            } else {
                l.max_copy_sectors.to_string()
            },
        ),
        ("copy_native", yes_no(l.copy_native).to_string()),
        ("poll", yes_no(l.poll).to_string()),
        ("nowait", yes_no(l.nowait).to_string()),
        ("misaligned", yes_no(l.misaligned).to_string()),
        ("per_io_bytes", l.per_io_bytes.to_string()),
        ("frame_depth", l.frame_depth.to_string()),
    ]
}

fn limits_json(l: &Limits) -> Value {
    json!({
        "logical_block_bytes": l.logical_block_bytes,
        "physical_block_bytes": l.physical_block_bytes,
        "io_min_bytes": l.io_min_bytes,
        "io_opt_bytes": l.io_opt_bytes,
        "alignment_offset_bytes": l.alignment_offset_bytes,
        "max_sectors": l.max_sectors,
        "chunk_sectors": l.chunk_sectors,
        "max_discard_sectors": l.max_discard_sectors,
        "max_write_zeroes_sectors": l.max_write_zeroes_sectors,
        "max_copy_sectors": l.max_copy_sectors,
        "copy_native": l.copy_native,
        "poll": l.poll,
        "nowait": l.nowait,
        "misaligned": l.misaligned,
        "per_io_bytes": l.per_io_bytes,
        "frame_depth": l.frame_depth,
    })
}

/// What `check` reports of one volume.
struct VolumeFacts {
    name: String,
    sectors: u64,
    table: String,
    deps: Vec<String>,
    limits: Limits,
}

fn volume_facts(b: &Built) -> Vec<VolumeFacts> {
    b.order
        .iter()
        .map(|name| {
            // Built means every volume has its live table; a miss is a bug in `config::build`.
            let t = b
                .engine
                .live_table(name)
                .ok()
                .flatten()
                .expect("a built volume has a live table");
            VolumeFacts {
                name: name.clone(),
                sectors: t.size(),
                table: t.to_string(),
                deps: b.engine.deps(name).unwrap_or_default(),
                limits: *t.limits(),
            }
        })
        .collect()
}

/// (name, kind, sectors) of each leaf, in file order.
fn leaf_facts(b: &Built) -> Vec<(String, &'static str, u64)> {
    b.config
        .leaves
        .iter()
        .map(|l| {
            let leaf = b.engine.leaf(&l.name).expect("a built leaf exists");
            (l.name.clone(), leaf.kind(), leaf.size())
        })
        .collect()
}

fn report_text(path: &str, b: &Built) -> String {
    let cfg = &b.config;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{path}: ok: {} leaves, {} volumes, {} exports",
        cfg.leaves.len(),
        cfg.volumes.len(),
        cfg.exports.len()
    );
    let leaves = leaf_facts(b);
    if !leaves.is_empty() {
        out.push('\n');
    }
    for (name, kind, sectors) in leaves {
        let _ = writeln!(out, "leaf {name}: {kind}, {}", sectors_and_bytes(sectors));
    }
    for v in volume_facts(b) {
        let _ = writeln!(out, "\nvolume {}: {}", v.name, sectors_and_bytes(v.sectors));
        let _ = writeln!(out, "  uses: {}", v.deps.join(", "));
        out.push_str("  table:\n");
        for line in v.table.lines() {
            let _ = writeln!(out, "    {line}");
        }
        out.push_str("  limits:\n");
        for (k, val) in limit_rows(&v.limits) {
            let _ = writeln!(out, "    {k:<26}{val}");
        }
    }
    if !cfg.exports.is_empty() {
        out.push('\n');
    }
    for e in &cfg.exports {
        let mode = if e.read_only {
            "read-only"
        } else {
            "read-write"
        };
        let _ = writeln!(out, "export {}: volume {}, {mode}", e.name, e.volume);
    }
    out
}

fn report_json(path: &str, b: &Built) -> Value {
    let leaves: Vec<Value> = leaf_facts(b)
        .into_iter()
        .map(|(name, kind, sectors)| {
            json!({
                "name": name,
                "kind": kind,
                "sectors": sectors,
                "bytes": sectors * SECTOR_SIZE as u64,
            })
        })
        .collect();
    let volumes: Vec<Value> = volume_facts(b)
        .into_iter()
        .map(|v| {
            json!({
                "name": v.name,
                "sectors": v.sectors,
                "bytes": v.sectors * SECTOR_SIZE as u64,
                "uses": v.deps,
                "table": v.table.trim_end(),
                "limits": limits_json(&v.limits),
            })
        })
        .collect();
    let exports: Vec<Value> = b
        .config
        .exports
        .iter()
        .map(|e| json!({ "name": e.name, "volume": e.volume, "read_only": e.read_only }))
        .collect();
    json!({
        "config": path,
        "ok": true,
        "leaves": leaves,
        "volumes": volumes,
        "exports": exports,
        "errors": [],
    })
}

fn error_json(e: &ConfigError) -> Value {
    let mut v = json!({
        "line": e.line,
        "column": e.column,
        "section": e.section.as_ref().map(|s| s.to_string()),
        "message": e.kind.to_string(),
        "text": e.to_string(),
    });
    if let ErrorKind::Table(t) = &e.kind {
        v["table_line"] = json!(t.line);
        v["field"] = json!(t.field);
        v["reason"] = json!(t.reason);
    }
    v
}
