//! The leaf registry: every leaf kind, its typed parameters, and how to build it. The config
//! file, the control socket and the state file all go through here, so a leaf is declared,
//! added live and restored by one code path, and the state file writes back exactly the
//! parameters a leaf was built from.
//!
//! A kind is a type implementing [`LeafKind`]: its name, its parameters struct (serde), the
//! [`Field`]s of that struct (key, required, how to check one value) and a constructor.
//! [`KINDS`] lists them. [`Kind::parse`] reads a table of parameters (TOML from the config or
//! state file, JSON from the control socket converted with [`table_from_json`]), reports every
//! bad, missing or unknown key at once, and returns [`LeafParams`]: the kind and its parameters
//! in canonical form (what the typed struct serializes to). [`LeafParams::build`] creates the
//! leaf; [`LeafParams::to_toml`] prints the parameters back as config lines, which parse to
//! the same [`LeafParams`].
//!
//! # Adding a kind
//!
//! 1. Write its parameters struct, `#[derive(Serialize, Deserialize)]`, with
//!    `#[serde(deny_unknown_fields)]` and a `#[serde(default = ...)]` on each optional field.
//!    Use [`Size`] for sizes and [`TimeSpan`] for durations, plain integers, `bool`, `String`
//!    or `PathBuf` otherwise.
//! 2. Implement [`LeafKind`] on a unit struct: `NAME`, `FIELDS` (one [`Field`] per struct
//!    field, in the same order, with the check for its values; ranges belong here), `build`.
//! 3. Add `Kind::of::<YourKind>()` to [`KINDS`].
//!
//! The config reader, `stackbd check`, the control socket's `leaf_add`, the CLI's
//! `leaf add NAME KIND key=value...`, `leaf ls` and the state file then know it. The unit test
//! `every_kind_round_trips` checks that `FIELDS` matches what the struct serializes.
//!
//! Threads: everything here runs on control threads (config loading, the control socket, the
//! daemon's main thread); [`LeafParams::build`] may block (opening a file, connecting to an NBD
//! server, within the leaf's timeout) and must not be called on a reactor or under the engine
//! lock.

mod kinds;
mod powercut;
mod values;

pub use kinds::{File, FileParams, Mem, MemParams, Nbd, NbdParams, Null, NullParams};
pub use powercut::{CutRange, PowerCut, PowerCutParams, MAX_POWERCUT_BYTES};
pub use values::{
    check_bool, check_int, check_size, check_string, check_time, parse_size, Size, TimeSpan,
};

use serde::de::DeserializeOwned;
use serde::Serialize;
use stackbd_core::Leaf;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::{Table, Value};

/// Every leaf kind, in the order help texts list them.
pub static KINDS: &[Kind] = &[
    Kind::of::<Mem>(),
    Kind::of::<Null>(),
    Kind::of::<File>(),
    Kind::of::<Nbd>(),
    Kind::of::<PowerCut>(),
];

/// A leaf kind: its name, parameters and constructor. Implemented by a unit struct per kind.
pub trait LeafKind: 'static {
    /// As written in `kind = "..."`.
    const NAME: &'static str;
    /// The parameters' keys, in the struct's order (which is the order they print in).
    const FIELDS: &'static [Field];
    type Params: Serialize + DeserializeOwned;

    /// Checks across fields, after every field passed its own check (default: none). An error
    /// names the key it is about, if one.
    fn validate(_p: &Self::Params) -> Result<(), ParamError> {
        Ok(())
    }

    /// Creates the leaf. May block (files, sockets); never called on a reactor.
    fn build(p: &Self::Params) -> io::Result<Arc<dyn Leaf>>;
}

/// One parameter of a kind.
#[derive(Clone, Copy)]
pub struct Field {
    pub key: &'static str,
    pub required: bool,
    /// A filesystem path: the config resolves a relative one against its own folder, the
    /// control socket refuses it, the CLI makes it absolute.
    pub is_path: bool,
    /// Says what is wrong with a value, without the key (`"0 is out of range (1..=64)"`).
    pub check: fn(&Value) -> Result<(), String>,
}

impl Field {
    pub const fn required(key: &'static str, check: fn(&Value) -> Result<(), String>) -> Field {
        Field {
            key,
            required: true,
            is_path: false,
            check,
        }
    }

    pub const fn optional(key: &'static str, check: fn(&Value) -> Result<(), String>) -> Field {
        Field {
            key,
            required: false,
            is_path: false,
            check,
        }
    }

    /// Marks the field as a filesystem path.
    pub const fn path(self) -> Field {
        Field {
            is_path: true,
            ..self
        }
    }
}

/// What is wrong with a table of parameters; the caller words it for its audience (the config
/// says "unknown key", the control socket "field ... does not apply").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamError {
    /// A key the kind does not take.
    Unknown(String),
    /// A required key is absent.
    Missing(&'static str),
    /// A bad value (`key` is `None` for a problem of the whole table).
    Invalid { key: Option<String>, msg: String },
}

impl ParamError {
    pub fn key(&self) -> Option<&str> {
        match self {
            ParamError::Unknown(k) => Some(k),
            ParamError::Missing(k) => Some(k),
            ParamError::Invalid { key, .. } => key.as_deref(),
        }
    }

    /// The config's wording: `unknown key 'k' (TAKES)`, `missing 'k' (TAKES)`, `k: why`.
    pub fn config_text(&self, kind: &Kind) -> String {
        match self {
            ParamError::Unknown(k) => format!("unknown key '{k}' ({})", kind.takes()),
            ParamError::Missing(k) => format!("missing '{k}' ({})", kind.takes()),
            ParamError::Invalid { key: Some(k), msg } => format!("{k}: {msg}"),
            ParamError::Invalid { key: None, msg } => msg.clone(),
        }
    }
}

/// The type-erased entry of a kind in [`KINDS`].
pub struct Kind {
    pub name: &'static str,
    pub fields: &'static [Field],
    /// Typed round trip: deserialize the kind's params, validate, serialize back.
    canon: fn(Table) -> Result<Table, ParamError>,
    build: fn(&Table) -> io::Result<Arc<dyn Leaf>>,
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kind({})", self.name)
    }
}

fn canon<K: LeafKind>(t: Table) -> Result<Table, ParamError> {
    let bad = |e: &dyn fmt::Display| ParamError::Invalid {
        key: None,
        msg: e.to_string().trim().to_string(),
    };
    let p: K::Params = Value::Table(t).try_into().map_err(|e| bad(&e))?;
    K::validate(&p)?;
    match Value::try_from(&p).map_err(|e| bad(&e))? {
        Value::Table(t) => Ok(t),
        _ => Err(bad(&"parameters do not serialize as a table")),
    }
}

fn build<K: LeafKind>(t: &Table) -> io::Result<Arc<dyn Leaf>> {
    let p: K::Params = Value::Table(t.clone())
        .try_into()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    K::build(&p)
}

impl Kind {
    /// The entry of `K`, for [`KINDS`].
    pub const fn of<K: LeafKind>() -> Kind {
        Kind {
            name: K::NAME,
            fields: K::FIELDS,
            canon: canon::<K>,
            build: build::<K>,
        }
    }

    pub fn field(&self, key: &str) -> Option<&'static Field> {
        self.fields.iter().find(|f| f.key == key)
    }

    /// `file leaves take: kind, path, direct, queue_depth`.
    pub fn takes(&self) -> String {
        let keys: Vec<&str> = self.fields.iter().map(|f| f.key).collect();
        format!("{} leaves take: kind, {}", self.name, keys.join(", "))
    }

    /// Reads a table of parameters (without `kind`): every unknown key, missing key and bad
    /// value is reported, then the typed struct is built and printed back in canonical form.
    pub fn parse(&'static self, input: &Table) -> Result<LeafParams, Vec<ParamError>> {
        let mut errors = Vec::new();
        for k in input.keys() {
            if self.field(k).is_none() {
                errors.push(ParamError::Unknown(k.clone()));
            }
        }
        for f in self.fields {
            match input.get(f.key) {
                None if f.required => errors.push(ParamError::Missing(f.key)),
                None => {}
                Some(v) => {
                    if let Err(msg) = (f.check)(v) {
                        errors.push(ParamError::Invalid {
                            key: Some(f.key.to_string()),
                            msg,
                        });
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let table = (self.canon)(input.clone()).map_err(|e| vec![e])?;
        Ok(LeafParams { kind: self, table })
    }
}

/// The kind called `name`.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// `mem, null, file, nbd, powercut`.
pub fn kind_names() -> String {
    KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// `unknown kind 'x' (known: mem, null, file, nbd, powercut)`.
pub fn unknown_kind(name: &str) -> String {
    format!("unknown kind '{name}' (known: {})", kind_names())
}

/// Reads `kind` and the parameters from one table (a config section, or the control socket's
/// object converted with [`table_from_json`]-like code): the kind must be known.
pub fn parse(kind_name: &str, params: &Table) -> Result<LeafParams, LeafError> {
    let k = kind(kind_name).ok_or_else(|| LeafError::UnknownKind(kind_name.to_string()))?;
    k.parse(params).map_err(|e| LeafError::Params(k, e))
}

/// Why [`parse`] refused.
#[derive(Debug)]
pub enum LeafError {
    UnknownKind(String),
    Params(&'static Kind, Vec<ParamError>),
}

impl fmt::Display for LeafError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafError::UnknownKind(k) => f.write_str(&unknown_kind(k)),
            LeafError::Params(k, errs) => {
                let texts: Vec<String> = errs.iter().map(|e| e.config_text(k)).collect();
                f.write_str(&texts.join("; "))
            }
        }
    }
}

/// A leaf's kind and the parameters it is (or will be) built from, in canonical form: every
/// field present (defaults filled in), sizes and durations as they print. Two `LeafParams`
/// are equal when they build the same leaf.
#[derive(Clone, Debug)]
pub struct LeafParams {
    kind: &'static Kind,
    table: Table,
}

impl PartialEq for LeafParams {
    fn eq(&self, o: &Self) -> bool {
        self.kind.name == o.kind.name && self.table == o.table
    }
}

impl LeafParams {
    /// From a kind's typed parameters (for code that builds leaves without a config).
    pub fn from_typed<K: LeafKind>(p: &K::Params) -> Result<LeafParams, LeafError> {
        let t = match Value::try_from(p) {
            Ok(Value::Table(t)) => t,
            _ => {
                return Err(LeafError::Params(
                    kind(K::NAME).expect("K is in KINDS"),
                    vec![ParamError::Invalid {
                        key: None,
                        msg: "parameters do not serialize as a table".into(),
                    }],
                ))
            }
        };
        parse(K::NAME, &t)
    }

    pub fn kind(&self) -> &'static Kind {
        self.kind
    }

    pub fn kind_name(&self) -> &'static str {
        self.kind.name
    }

    /// The canonical parameters (without `kind`).
    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.table.get(key)
    }

    /// The parameters as the kind's typed struct.
    pub fn typed<P: DeserializeOwned>(&self) -> Result<P, String> {
        Value::Table(self.table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())
    }

    /// `(key, value)` in the kind's field order.
    pub fn values(&self) -> impl Iterator<Item = (&'static str, &Value)> + '_ {
        self.kind
            .fields
            .iter()
            .filter_map(|f| self.table.get(f.key).map(|v| (f.key, v)))
    }

    /// Config lines: `kind = "file"`, then `key = value` per parameter, each ending in `\n`.
    pub fn to_toml(&self) -> String {
        let mut out = format!("kind = {}\n", Value::String(self.kind.name.into()));
        for (k, v) in self.values() {
            out.push_str(&format!("{k} = {v}\n"));
        }
        out
    }

    /// `path="/x/disk.img" direct=false queue_depth=256`, for listings.
    pub fn summary(&self) -> String {
        self.values()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The values of the path fields.
    pub fn paths(&self) -> Vec<(&'static str, PathBuf)> {
        self.kind
            .fields
            .iter()
            .filter(|f| f.is_path)
            .filter_map(|f| match self.table.get(f.key) {
                Some(Value::String(s)) => Some((f.key, PathBuf::from(s))),
                _ => None,
            })
            .collect()
    }

    /// Makes relative paths relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for (key, p) in self.paths() {
            if p.is_relative() {
                let abs = base.join(p).to_string_lossy().into_owned();
                self.table.insert(key.to_string(), Value::String(abs));
            }
        }
    }

    /// Creates the leaf. May block (opening a file, connecting to a server); call it on a
    /// control thread, not under the engine lock.
    pub fn build(&self) -> io::Result<Arc<dyn Leaf>> {
        (self.kind.build)(&self.table)
    }
}

/// A JSON object (the control socket's) as a TOML table, for [`Kind::parse`]. `null` values are
/// left out (absent); a number that is not an integer stays a float (and a size or count check
/// refuses it).
pub fn table_from_json<T: Serialize>(obj: &T) -> Result<Table, String> {
    match Value::try_from(obj) {
        Ok(Value::Table(t)) => Ok(t),
        Ok(_) => Err("parameters must be an object".into()),
        Err(e) => Err(format!("parameters: {e}")),
    }
}

#[cfg(test)]
mod tests;
