//! The configuration file: leaves, volumes (dmsetup tables) and exports, in TOML.
//!
//! ```toml
//! [leaf.m0]
//! kind = "mem"          # mem | null | file | nbd (stackbd_leaves::registry::KINDS)
//! size = "1GiB"         # bytes, or a whole number with B, K/KiB, M/MiB, G/GiB, T/TiB (binary)
//!
//! [leaf.f0]
//! kind = "file"         # a regular file or a block device, through io_uring; its size is the
//! path = "disk.img"     # file's (relative paths are relative to the config file's folder)
//! direct = true         # O_DIRECT (optional, default false)
//! queue_depth = 256     # ring depth per reactor (optional, 1..=4096, default 256)
//!
//! [leaf.n0]
//! kind = "nbd"          # a remote NBD export (nbd://host:port/export also works)
//! uri = "nbd+unix:///export?socket=/run/nbd.sock"
//! connections = 2       # per reactor, if the server allows multi-conn (optional, default 1)
//! timeout = "5s"        # older requests fail as path errors (optional, default 30s)
//!
//! [volume.data]
//! table = "0 2097152 linear m0 0"     # dmsetup table text; may span lines (""" ... """)
//!
//! [export.data]
//! volume = "data"
//! read_only = false
//! ```
//!
//! [`load`] / [`parse`] read a file strictly (any error refuses it); [`build`] turns a [`Config`]
//! into an [`Engine`] with every leaf and volume created, volumes in dependency order;
//! [`check`] / [`check_text`] do both while collecting every error they can find, for
//! `stackbd check`. Every error says which file, line and section it comes from, and for tables,
//! the table line, field and reason the engine gave.

use serde::Deserialize;
use stackbd_core::{Engine, EngineError, ReactorConfig};
pub use stackbd_leaves::registry::parse_size;
use stackbd_leaves::registry::LeafParams;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::{Spanned, Value};

mod error;
mod failed;
mod graph;
mod leaf;
mod luks;

pub use error::{ConfigError, ConfigErrors, ErrorKind, Section};
pub use failed::Failed;

// ---------------------------------------------------------------------------------------------
// The parsed configuration
// ---------------------------------------------------------------------------------------------

/// A whole configuration file, items in the order the file declares them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    /// The file it came from, if any (error messages start with it).
    pub path: Option<PathBuf>,
    pub leaves: Vec<LeafDecl>,
    pub volumes: Vec<VolumeDecl>,
    pub exports: Vec<ExportDecl>,
    /// LUKS volumes to open (after the leaves, before the volumes).
    pub luks: Vec<crate::crypttab::LuksDecl>,
}

impl Config {
    pub fn leaf(&self, name: &str) -> Option<&LeafDecl> {
        self.leaves.iter().find(|l| l.name == name)
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeDecl> {
        self.volumes.iter().find(|v| v.name == name)
    }

    pub fn export(&self, name: &str) -> Option<&ExportDecl> {
        self.exports.iter().find(|e| e.name == name)
    }
}

/// `[leaf.NAME]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LeafDecl {
    pub name: String,
    /// 1-based file line of the section's first key.
    pub line: usize,
    /// Its kind and parameters (relative paths already resolved against the config's folder),
    /// as the registry reads them; the daemon keeps them to write the state file.
    pub params: LeafParams,
}

/// `[volume.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeDecl {
    pub name: String,
    /// 1-based file line of `table = ...`.
    pub line: usize,
    /// dmsetup table text.
    pub table: String,
    /// File line holding line 1 of the table text, when the string maps line for line onto the
    /// file (no escapes in a basic string); table errors then point at the exact file line.
    pub table_first_line: Option<usize>,
    /// Request queue settings (used when the table is request-based, e.g. multipath).
    pub queue: stackbd_core::QueueOpts,
}

impl VolumeDecl {
    /// The file line of a 1-based line of the table text (the `table =` line if unknown).
    pub fn file_line(&self, table_line: usize) -> usize {
        self.table_first_line
            .map_or(self.line, |l| l + table_line.saturating_sub(1))
    }
}

/// `[export.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportDecl {
    pub name: String,
    /// 1-based file line of `volume = ...`.
    pub line: usize,
    pub volume: String,
    pub read_only: bool,
}

// ---------------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------------

/// Bytes for people: `1 GiB`, `1.5 MiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    while i + 1 < UNITS.len() && bytes >> (10 * (i + 1)) > 0 {
        i += 1;
    }
    let unit = 1u64 << (10 * i);
    if bytes.is_multiple_of(unit) {
        format!("{} {}", bytes / unit, UNITS[i])
    } else {
        let s = format!("{:.2}", bytes as f64 / unit as f64);
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s} {}", UNITS[i])
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the file
// ---------------------------------------------------------------------------------------------

type RawSection = BTreeMap<String, Spanned<Value>>;

/// The shape serde checks; each section's keys are read by hand so that every bad key or value
/// is reported, with its line, and not only the first.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    leaf: BTreeMap<String, RawSection>,
    #[serde(default)]
    volume: BTreeMap<String, RawSection>,
    #[serde(default)]
    export: BTreeMap<String, RawSection>,
    #[serde(default)]
    luks: BTreeMap<String, RawSection>,
}

/// Byte offsets to lines and columns.
struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Lines {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Lines { starts }
    }

    /// 1-based (line, column) of a byte offset.
    fn at(&self, offset: usize) -> (usize, usize) {
        let i = self.starts.partition_point(|&s| s <= offset).max(1) - 1;
        (i + 1, offset - self.starts[i] + 1)
    }

    fn line(&self, offset: usize) -> usize {
        self.at(offset).0
    }
}

/// Reading state: where we are, and what went wrong so far.
struct Cx<'a> {
    path: Option<&'a Path>,
    text: &'a str,
    lines: Lines,
    errors: Vec<ConfigError>,
    /// Declared names whose declaration is unusable: what uses them is skipped, not refused as
    /// an unknown device.
    broken: BTreeSet<Section>,
}

impl Cx<'_> {
    fn error(&mut self, line: Option<usize>, section: Option<Section>, kind: ErrorKind) {
        self.errors.push(ConfigError {
            path: self.path.map(Path::to_path_buf),
            line,
            column: None,
            section,
            kind,
        });
    }
}

/// The keys of one section, taken one by one; what is left at the end is unknown.
struct Fields {
    section: Section,
    /// Line of the section's first key, for errors about missing keys.
    line: usize,
    map: RawSection,
}

impl Fields {
    fn new(cx: &Cx<'_>, section: Section, map: RawSection) -> Fields {
        // An empty section has no key to point at: look for its header instead.
        let first = map
            .values()
            .map(|v| v.span().start)
            .min()
            .or_else(|| cx.text.find(&section.to_string()));
        Fields {
            section,
            line: first.map_or(0, |o| cx.lines.line(o)),
            map,
        }
    }

    fn line(&self) -> Option<usize> {
        (self.line > 0).then_some(self.line)
    }

    fn invalid(&self, cx: &mut Cx<'_>, line: Option<usize>, msg: String) {
        cx.error(
            line.or(self.line()),
            Some(self.section.clone()),
            ErrorKind::Invalid(msg),
        );
    }

    fn take(&mut self, key: &str) -> Option<Spanned<Value>> {
        self.map.remove(key)
    }

    fn missing(&self, cx: &mut Cx<'_>, key: &str, takes: &str) {
        self.invalid(cx, None, format!("missing '{key}' ({takes})"));
    }

    fn wrong_type(&self, cx: &mut Cx<'_>, key: &str, want: &str, v: &Spanned<Value>) {
        let line = cx.lines.line(v.span().start);
        self.invalid(
            cx,
            Some(line),
            format!("{key}: expected {want}, got {}", v.get_ref().type_str()),
        );
    }

    /// A required string; returns it with its span.
    fn string(
        &mut self,
        cx: &mut Cx<'_>,
        key: &str,
        takes: &str,
    ) -> Option<(String, Range<usize>)> {
        let v = match self.take(key) {
            Some(v) => v,
            None => {
                self.missing(cx, key, takes);
                return None;
            }
        };
        match v.get_ref() {
            Value::String(s) => Some((s.clone(), v.span())),
            _ => {
                self.wrong_type(cx, key, "a string", &v);
                None
            }
        }
    }

    /// An optional boolean (`default` when absent); `None` on a bad value.
    fn bool(&mut self, cx: &mut Cx<'_>, key: &str, default: bool) -> Option<bool> {
        let v = match self.take(key) {
            Some(v) => v,
            None => return Some(default),
        };
        match v.get_ref() {
            Value::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(cx, key, "true or false", &v);
                None
            }
        }
    }

    /// An optional integer in `range`: `Some(None)` when absent, `None` on a bad value.
    fn integer(
        &mut self,
        cx: &mut Cx<'_>,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<Option<i64>> {
        let Some(v) = self.take(key) else {
            return Some(None);
        };
        match v.get_ref() {
            Value::Integer(n) if range.contains(n) => Some(Some(*n)),
            Value::Integer(n) => {
                let line = cx.lines.line(v.span().start);
                self.invalid(
                    cx,
                    Some(line),
                    format!(
                        "{key}: {n} is out of range ({}..={})",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
            _ => {
                self.wrong_type(cx, key, "a whole number", &v);
                None
            }
        }
    }

    /// Reports every key nobody took.
    fn finish(self, cx: &mut Cx<'_>, takes: &str) {
        let mut left: Vec<_> = self.map.iter().collect();
        left.sort_by_key(|(_, v)| v.span().start);
        for (k, v) in left {
            let line = cx.lines.line(v.span().start);
            self.invalid(cx, Some(line), format!("unknown key '{k}' ({takes})"));
        }
    }
}

fn check_name(cx: &mut Cx<'_>, f: &Fields) -> bool {
    let name = f.section.name();
    if stackbd_core::engine::valid_name(name) {
        true
    } else {
        f.invalid(cx, None, EngineError::BadName(name.to_string()).to_string());
        false
    }
}

/// The file line of the first line of a string value's text, if the string maps line for line.
fn string_first_line(cx: &Cx<'_>, span: Range<usize>) -> Option<usize> {
    let raw = cx.text.get(span.clone())?;
    let literal = raw.starts_with('\'');
    if !literal && raw.contains('\\') {
        return None;
    }
    let (delim, mut skip) = if raw.starts_with("\"\"\"") || raw.starts_with("'''") {
        (3, 3)
    } else {
        (1, 1)
    };
    // A multi-line string drops a newline right after its opening delimiter.
    if delim == 3 {
        if raw[skip..].starts_with("\r\n") {
            skip += 2;
        } else if raw[skip..].starts_with('\n') {
            skip += 1;
        }
    }
    Some(cx.lines.line(span.start + skip))
}

fn read_volume(cx: &mut Cx<'_>, name: &str, map: RawSection) -> Option<VolumeDecl> {
    const TAKES: &str = "volumes take: table, scheduler, nr_requests";
    let mut f = Fields::new(cx, Section::Volume(name.to_string()), map);
    let name_ok = check_name(cx, &f);
    let table = f.string(cx, "table", TAKES);
    let scheduler = match f.take("scheduler") {
        None => Some(stackbd_core::Scheduler::None),
        Some(v) => match v.get_ref() {
            Value::String(s) => s
                .parse::<stackbd_core::Scheduler>()
                .map_err(|e| {
                    let line = cx.lines.line(v.span().start);
                    f.invalid(cx, Some(line), format!("scheduler: {e}"));
                })
                .ok(),
            _ => {
                f.wrong_type(cx, "scheduler", "\"none\" or \"deadline\"", &v);
                None
            }
        },
    };
    let nr_requests = f.integer(cx, "nr_requests", 1..=4096);
    f.finish(cx, TAKES);
    let (table, span) = table?;
    let queue = stackbd_core::QueueOpts {
        scheduler: scheduler?,
        nr_requests: nr_requests?.map_or(stackbd_core::rq::DEFAULT_NR_REQUESTS, |n| n as u32),
    };
    name_ok.then(|| VolumeDecl {
        name: name.to_string(),
        line: cx.lines.line(span.start),
        table_first_line: string_first_line(cx, span),
        table,
        queue,
    })
}

fn read_export(cx: &mut Cx<'_>, name: &str, map: RawSection) -> Option<ExportDecl> {
    const TAKES: &str = "exports take: volume, read_only";
    let mut f = Fields::new(cx, Section::Export(name.to_string()), map);
    let volume = f.string(cx, "volume", TAKES);
    let read_only = f.bool(cx, "read_only", false);
    f.finish(cx, TAKES);
    let (volume, span) = volume?;
    Some(ExportDecl {
        name: name.to_string(),
        line: cx.lines.line(span.start),
        volume,
        read_only: read_only?,
    })
}

/// Sections in file order (by their first key; empty sections last, by name).
fn in_file_order(map: BTreeMap<String, RawSection>) -> Vec<(String, RawSection)> {
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by_key(|(_, s)| {
        s.values()
            .map(|x| x.span().start)
            .min()
            .unwrap_or(usize::MAX)
    });
    v
}

/// Reads a file's text, collecting every error; items with errors that make them unusable are
/// left out of the config and remembered in `cx.broken`.
fn read(cx: &mut Cx<'_>) -> Option<Config> {
    let raw: RawConfig = match toml::from_str(cx.text) {
        Ok(r) => r,
        Err(e) => {
            let (line, column) = match e.span() {
                Some(s) => {
                    let (l, c) = cx.lines.at(s.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            let msg = e.message().trim().replace('\n', "; ");
            cx.errors.push(ConfigError {
                path: cx.path.map(Path::to_path_buf),
                line,
                column,
                section: None,
                kind: ErrorKind::Toml(msg),
            });
            return None;
        }
    };
    let mut cfg = Config {
        path: cx.path.map(Path::to_path_buf),
        ..Config::default()
    };
    for (name, map) in in_file_order(raw.leaf) {
        match leaf::read_leaf(cx, &name, map) {
            Some(l) => cfg.leaves.push(l),
            None => {
                cx.broken.insert(Section::Leaf(name));
            }
        }
    }
    for (name, map) in in_file_order(raw.volume) {
        let Some(v) = read_volume(cx, &name, map) else {
            cx.broken.insert(Section::Volume(name));
            continue;
        };
        let leaf_clash = cfg.leaf(&name).map(|l| l.line).or_else(|| {
            cx.broken
                .contains(&Section::Leaf(name.clone()))
                .then_some(0)
        });
        if let Some(l) = leaf_clash {
            let at = if l > 0 {
                format!(" (line {l})")
            } else {
                String::new()
            };
            cx.error(
                Some(v.line),
                Some(Section::Volume(name.clone())),
                ErrorKind::Invalid(format!(
                    "the name '{name}' is already taken by {}{at}; leaves and volumes share one \
                     namespace",
                    Section::Leaf(name.clone())
                )),
            );
            cx.broken.insert(Section::Volume(name));
            continue;
        }
        cfg.volumes.push(v);
    }
    for (name, map) in in_file_order(raw.luks) {
        let Some(l) = luks::read_luks(cx, &name, map) else {
            cx.broken.insert(Section::Luks(name));
            continue;
        };
        let taken = cfg
            .leaf(&name)
            .map(|x| (Section::Leaf(name.clone()), x.line))
            .or_else(|| {
                cfg.volume(&name)
                    .map(|x| (Section::Volume(name.clone()), x.line))
            });
        if let Some((other, line)) = taken {
            cx.error(
                Some(l.line),
                Some(Section::Luks(name.clone())),
                ErrorKind::Invalid(format!(
                    "the name '{name}' is already taken by {other} (line {line}); a luks \
                     section creates a volume of its name"
                )),
            );
            cx.broken.insert(Section::Luks(name));
            continue;
        }
        cfg.luks.push(l);
    }
    for (name, map) in in_file_order(raw.export) {
        match read_export(cx, &name, map) {
            Some(e) => cfg.exports.push(e),
            None => {
                cx.broken.insert(Section::Export(name));
            }
        }
    }
    Some(cfg)
}

fn sorted(mut errors: Vec<ConfigError>) -> ConfigErrors {
    // Stable: errors on one line keep the order they were found in.
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    ConfigErrors(errors)
}

fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::from(ConfigError {
            path: Some(path.to_path_buf()),
            line: None,
            column: None,
            section: None,
            kind: ErrorKind::Read(e.to_string()),
        })
    })
}

/// Parses config text; refused if anything in it is wrong. `path` only labels errors.
pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigErrors> {
    let mut cx = Cx {
        path,
        text,
        lines: Lines::new(text),
        errors: Vec::new(),
        broken: BTreeSet::new(),
    };
    match read(&mut cx) {
        Some(cfg) if cx.errors.is_empty() => Ok(cfg),
        _ => Err(sorted(cx.errors)),
    }
}

/// Reads and parses a config file; refused if anything in it is wrong.
pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigErrors> {
    let path = path.as_ref();
    parse(&read_file(path)?, Some(path))
}

// ---------------------------------------------------------------------------------------------
// Building the stack
// ---------------------------------------------------------------------------------------------

/// An engine with everything the config declares (or, after a degraded build, everything that
/// could be brought up, and in `failed` the rest with why).
pub struct Built {
    pub config: Config,
    pub engine: Engine,
    /// Volume names, each after every volume its table uses.
    pub order: Vec<String>,
    /// What could not be built, with why (empty unless the build was degraded).
    pub failed: Failed,
}

/// Names a table uses: its arguments (comments, layout numbers and target types left out); the
/// raw whitespace-separated tokens when the text does not even parse as lines.
fn table_tokens(text: &str) -> Vec<String> {
    match stackbd_core::table::parse_lines(text) {
        Ok(lines) => lines.into_iter().flat_map(|l| l.args).collect(),
        Err(_) => text.split_whitespace().map(str::to_string).collect(),
    }
}

fn build_in(
    cfg: &Config,
    broken: &BTreeSet<Section>,
    mut engine: Engine,
    cx: &mut Cx<'_>,
) -> Built {
    // Why a leaf or volume is unusable, by name: what uses it is skipped.
    let mut bad_leaf: HashMap<String, &'static str> = HashMap::new();
    let mut bad_vol: HashMap<String, &'static str> = HashMap::new();
    for s in broken {
        match s {
            Section::Leaf(n) => bad_leaf.insert(n.clone(), "is invalid"),
            Section::Volume(n) => bad_vol.insert(n.clone(), "is invalid"),
            Section::Luks(n) => bad_vol.insert(n.clone(), "is invalid"),
            Section::Export(_) => None,
        };
    }

    for l in &cfg.leaves {
        let r = l
            .params
            .build()
            .map_err(|e| leaf_build_error(&l.params, &e))
            .and_then(|leaf| engine.add_leaf(&l.name, leaf).map_err(|e| e.to_string()));
        if let Err(msg) = r {
            cx.error(
                Some(l.line),
                Some(Section::Leaf(l.name.clone())),
                ErrorKind::Engine(msg),
            );
            bad_leaf.insert(l.name.clone(), "failed");
        }
    }

    open_luks(cfg, &mut engine, &bad_leaf, &mut bad_vol, cx);

    // What each table uses, by scanning it for declared names; a name declared as a leaf is
    // the leaf (a volume of the same name was refused).
    let index: HashMap<&str, usize> = cfg
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(cfg.volumes.len());
    let mut uses: Vec<Vec<Use>> = Vec::with_capacity(cfg.volumes.len());
    for v in &cfg.volumes {
        let (mut ds, mut us) = (Vec::new(), Vec::new());
        for t in table_tokens(&v.table) {
            let u = if let Some(&i) = index.get(t.as_str()) {
                Use::Volume(i)
            } else if cfg.leaf(&t).is_some() || bad_leaf.contains_key(&t) {
                Use::Leaf(t)
            } else if bad_vol.contains_key(&t) {
                Use::BrokenVolume(t)
            } else {
                continue;
            };
            if let Use::Volume(i) = u {
                if !ds.contains(&i) {
                    ds.push(i);
                }
            }
            if !us.contains(&u) {
                us.push(u);
            }
        }
        deps.push(ds);
        uses.push(us);
    }

    let (order, left) = graph::topo_order(&deps);

    for &i in &order {
        let v = &cfg.volumes[i];
        let section = Some(Section::Volume(v.name.clone()));
        let blocked = uses[i].iter().find_map(|u| match u {
            Use::Volume(d) => {
                let n = &cfg.volumes[*d].name;
                bad_vol.get(n).map(|why| (format!("volume '{n}'"), *why))
            }
            Use::BrokenVolume(n) => bad_vol.get(n).map(|why| (format!("volume '{n}'"), *why)),
            Use::Leaf(n) => bad_leaf.get(n).map(|why| (format!("leaf '{n}'"), *why)),
        });
        if let Some((what, why)) = blocked {
            cx.error(
                Some(v.line),
                section,
                ErrorKind::Skipped {
                    uses: what,
                    why: why.to_string(),
                },
            );
            bad_vol.insert(v.name.clone(), "was skipped");
            continue;
        }
        let created = engine
            .create(&v.name, Some(&v.table))
            .and_then(|_| engine.set_queue(&v.name, v.queue));
        if let Err(e) = created {
            let (line, kind) = match e {
                EngineError::Table { source, .. } => {
                    (v.file_line(source.line), ErrorKind::Table(source))
                }
                e => (v.line, ErrorKind::Engine(e.to_string())),
            };
            cx.error(Some(line), section, kind);
            bad_vol.insert(v.name.clone(), "failed");
        }
    }

    // Left over: volumes in a cycle, and volumes above one. Each cycle is reported once, at its
    // first volume in the file.
    let mut in_cycle = BTreeSet::new();
    for comp in graph::components(&deps, &left) {
        let looped = comp.len() > 1 || deps[comp[0]].contains(&comp[0]);
        if !looped {
            continue;
        }
        let start = comp[0];
        let path = graph::cycle_through(&deps, &comp, start);
        let others = comp
            .iter()
            .filter(|c| !path.contains(c))
            .map(|&c| cfg.volumes[c].name.clone())
            .collect();
        let v = &cfg.volumes[start];
        cx.error(
            Some(v.line),
            Some(Section::Volume(v.name.clone())),
            ErrorKind::Cycle {
                path: path.iter().map(|&p| cfg.volumes[p].name.clone()).collect(),
                others,
            },
        );
        in_cycle.extend(comp);
    }
    for &i in &left {
        let v = &cfg.volumes[i];
        if in_cycle.contains(&i) {
            bad_vol.insert(v.name.clone(), "is in a cycle");
            continue;
        }
        let d = deps[i]
            .iter()
            .copied()
            .find(|d| left.contains(d))
            .expect("a left-over volume uses another left-over one");
        let why = if in_cycle.contains(&d) {
            "is in a cycle"
        } else {
            "was skipped"
        };
        cx.error(
            Some(v.line),
            Some(Section::Volume(v.name.clone())),
            ErrorKind::Skipped {
                uses: format!("volume '{}'", cfg.volumes[d].name),
                why: why.to_string(),
            },
        );
        bad_vol.insert(v.name.clone(), "was skipped");
    }

    for e in &cfg.exports {
        let section = Some(Section::Export(e.name.clone()));
        let name = &e.volume;
        let is_leaf = cfg.leaf(name).is_some() || bad_leaf.contains_key(name);
        let kind = if !is_leaf && bad_vol.contains_key(name) {
            ErrorKind::Skipped {
                uses: format!("volume '{name}'"),
                why: bad_vol[name].to_string(),
            }
        } else if index.contains_key(name.as_str()) || cfg.luks.iter().any(|l| &l.name == name) {
            continue;
        } else if is_leaf {
            ErrorKind::Invalid(format!(
                "volume: '{name}' is a leaf; exports serve volumes (declare one with table = \
                 \"0 <sectors> linear {name} 0\")"
            ))
        } else {
            let known: Vec<_> = cfg.volumes.iter().map(|v| v.name.as_str()).collect();
            ErrorKind::Invalid(format!(
                "volume: no volume '{name}' is declared (volumes: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        };
        cx.error(Some(e.line), section, kind);
    }

    let failed = Failed::collect(cfg, &bad_leaf, &bad_vol, &cx.errors);
    Built {
        config: cfg.clone(),
        engine,
        order: order.iter().map(|&i| cfg.volumes[i].name.clone()).collect(),
        failed,
    }
}

/// Why a leaf could not be built (the leaf's error names its file where it has one).
pub fn leaf_build_error(p: &LeafParams, e: &std::io::Error) -> String {
    format!("cannot create {} leaf: {e}", p.kind_name())
}

/// Opens the `[luks.NAME]` volumes, over leaves only (they are opened before any volume).
fn open_luks(
    cfg: &Config,
    engine: &mut Engine,
    bad_leaf: &HashMap<String, &'static str>,
    bad_vol: &mut HashMap<String, &'static str>,
    cx: &mut Cx<'_>,
) {
    for l in &cfg.luks {
        let section = Some(Section::Luks(l.name.clone()));
        if let Some(why) = bad_leaf.get(&l.device) {
            cx.error(
                Some(l.line),
                section,
                ErrorKind::Skipped {
                    uses: format!("leaf '{}'", l.device),
                    why: why.to_string(),
                },
            );
            bad_vol.insert(l.name.clone(), "was skipped");
            continue;
        }
        let r = if cfg.leaf(&l.device).is_none() {
            Err(format!(
                "device: '{}' is not a leaf of this config (luks sections open leaves)",
                l.device
            ))
        } else {
            l.open(engine)
        };
        if let Err(msg) = r {
            cx.error(Some(l.line), section, ErrorKind::Engine(msg));
            bad_vol.insert(l.name.clone(), "failed");
        }
    }
}

/// Something a table names.
#[derive(PartialEq, Eq)]
enum Use {
    /// A volume of the config, by index.
    Volume(usize),
    Leaf(String),
    /// A volume declared in the file but left out of the config as invalid.
    BrokenVolume(String),
}

/// Builds an engine with the config's leaves and volumes (volumes in dependency order), or
/// every error found on the way.
pub fn build(cfg: &Config, reactor: ReactorConfig) -> Result<Built, ConfigErrors> {
    build_on(cfg, Engine::new(stackbd_targets::registry(), reactor))
}

/// [`build`] into a given engine (one with reactor threads, for `serve` and `bench`), which
/// should have no device yet whose name the config uses.
pub fn build_on(cfg: &Config, engine: Engine) -> Result<Built, ConfigErrors> {
    let (built, errors) = build_degraded(cfg, engine);
    if errors.is_empty() {
        Ok(built)
    } else {
        Err(errors)
    }
}

/// [`build_on`] for a daemon's start: a leaf that cannot be opened, a LUKS volume that cannot
/// be unlocked, a table the engine refuses do not stop the rest. What failed is in
/// `Built::failed` (with why), and every error in the list returned beside it.
pub fn build_degraded(cfg: &Config, engine: Engine) -> (Built, ConfigErrors) {
    let mut cx = Cx {
        path: cfg.path.as_deref(),
        text: "",
        lines: Lines::new(""),
        errors: Vec::new(),
        broken: BTreeSet::new(),
    };
    let built = build_in(cfg, &BTreeSet::new(), engine, &mut cx);
    (built, sorted(cx.errors))
}

/// Parses and builds config text, reporting every error in the file and in the stack it
/// describes (a bad leaf does not hide a bad table elsewhere). `path` only labels errors.
pub fn check_text(
    text: &str,
    path: Option<&Path>,
    reactor: ReactorConfig,
) -> Result<Built, ConfigErrors> {
    let mut cx = Cx {
        path,
        text,
        lines: Lines::new(text),
        errors: Vec::new(),
        broken: BTreeSet::new(),
    };
    let Some(cfg) = read(&mut cx) else {
        return Err(sorted(cx.errors));
    };
    let broken = std::mem::take(&mut cx.broken);
    let engine = Engine::new(stackbd_targets::registry(), reactor);
    let built = build_in(&cfg, &broken, engine, &mut cx);
    if cx.errors.is_empty() {
        Ok(built)
    } else {
        Err(sorted(cx.errors))
    }
}

/// [`check_text`] on a file.
pub fn check(path: impl AsRef<Path>, reactor: ReactorConfig) -> Result<Built, ConfigErrors> {
    let path = path.as_ref();
    check_text(&read_file(path)?, Some(path), reactor)
}

#[cfg(test)]
mod tests;
