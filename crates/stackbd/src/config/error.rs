//! Config errors: where (file, line, section) and what, one per line.

use stackbd_core::table::TableError;
use std::fmt;
use std::path::PathBuf;

/// Which part of the file an error is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Section {
    Leaf(String),
    Volume(String),
    Export(String),
    Luks(String),
}

impl Section {
    pub fn name(&self) -> &str {
        match self {
            Section::Leaf(n) | Section::Volume(n) | Section::Export(n) | Section::Luks(n) => n,
        }
    }

    fn table_name(&self) -> &'static str {
        match self {
            Section::Leaf(_) => "leaf",
            Section::Volume(_) => "volume",
            Section::Export(_) => "export",
            Section::Luks(_) => "luks",
        }
    }
}

/// `[leaf.m0]`, quoting the name when TOML needs it.
impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.name();
        let bare = !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if bare {
            write!(f, "[{}.{n}]", self.table_name())
        } else {
            write!(f, "[{}.{n:?}]", self.table_name())
        }
    }
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be read.
    Read(String),
    /// TOML syntax, or a section or value of the wrong shape.
    Toml(String),
    /// A key or value of a section.
    Invalid(String),
    /// The engine refused a volume's table.
    Table(TableError),
    /// Volumes that name each other (or themselves): `path` runs from the reported volume back
    /// to it; `others` are further volumes caught in the same loop.
    Cycle {
        path: Vec<String>,
        others: Vec<String>,
    },
    /// Not built because something it uses failed.
    Skipped { uses: String, why: String },
    /// Any other refusal from the engine.
    Engine(String),
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Read(e) => write!(f, "cannot read: {e}"),
            ErrorKind::Toml(e) | ErrorKind::Invalid(e) | ErrorKind::Engine(e) => f.write_str(e),
            ErrorKind::Table(e) => write!(f, "table line {}: {}: {}", e.line, e.field, e.reason),
            ErrorKind::Cycle { path, others } => {
                write!(
                    f,
                    "volume '{}' would stack on itself: {}",
                    path[0],
                    path.join(" -> ")
                )?;
                if !others.is_empty() {
                    write!(f, " (also in the loop: {})", others.join(", "))?;
                }
                Ok(())
            }
            ErrorKind::Skipped { uses, why } => write!(f, "skipped: it uses {uses}, which {why}"),
        }
    }
}

/// One error, located: `PATH:LINE[:COL]: [section.name]: what`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: Option<PathBuf>,
    /// 1-based file line.
    pub line: Option<usize>,
    /// 1-based column (TOML syntax errors only).
    pub column: Option<usize>,
    pub section: Option<Section>,
    pub kind: ErrorKind,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut loc = String::new();
        if let Some(p) = &self.path {
            loc.push_str(&p.display().to_string());
        }
        if let Some(l) = self.line {
            if !loc.is_empty() {
                loc.push(':');
            }
            loc.push_str(&l.to_string());
            if let Some(c) = self.column {
                loc.push_str(&format!(":{c}"));
            }
        }
        if !loc.is_empty() {
            write!(f, "{loc}: ")?;
        }
        if let Some(s) = &self.section {
            write!(f, "{s}: ")?;
        }
        write!(f, "{}", self.kind)
    }
}

impl std::error::Error for ConfigError {}

/// Every error found, in file order. Displays one per line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
