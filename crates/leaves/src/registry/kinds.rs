//! The built-in leaf kinds: `mem`, `null`, `file`, `nbd`, each a [`LeafKind`] with its
//! parameters struct. See the module above for how to add one.

use super::values::{check_bool, check_int, check_size, check_string, check_time, Size, TimeSpan};
use super::{Field, LeafKind};
use crate::file::{FileOptions, DEFAULT_QUEUE_DEPTH, MAX_QUEUE_DEPTH};
use crate::nbd_client::{NbdOptions, NbdUri};
use crate::{FileLeaf, MemLeaf, NbdLeaf, NullLeaf};
use serde::{Deserialize, Serialize};
use stackbd_core::Leaf;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use toml::Value;

/// `kind = "mem"`: sparse RAM.
pub struct Mem;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemParams {
    pub size: Size,
}

impl LeafKind for Mem {
    const NAME: &'static str = "mem";
    const FIELDS: &'static [Field] = &[Field::required("size", check_size)];
    type Params = MemParams;

    fn build(p: &MemParams) -> io::Result<Arc<dyn Leaf>> {
        let leaf = MemLeaf::new(p.size.bytes())
            .map_err(|e| io::Error::new(e.kind(), format!("size {}: {e}", p.size)))?;
        Ok(Arc::new(leaf))
    }
}

/// `kind = "null"`: reads zeros, drops writes.
pub struct Null;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullParams {
    pub size: Size,
}

impl LeafKind for Null {
    const NAME: &'static str = "null";
    const FIELDS: &'static [Field] = &[Field::required("size", check_size)];
    type Params = NullParams;

    fn build(p: &NullParams) -> io::Result<Arc<dyn Leaf>> {
        Ok(Arc::new(NullLeaf::new(p.size.bytes())))
    }
}

/// `kind = "file"`: a regular file or a block device through io_uring, sized by the file.
pub struct File;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileParams {
    pub path: PathBuf,
    /// `O_DIRECT`.
    #[serde(default)]
    pub direct: bool,
    /// Ring depth per reactor.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
}

fn default_queue_depth() -> u32 {
    DEFAULT_QUEUE_DEPTH
}

impl LeafKind for File {
    const NAME: &'static str = "file";
    const FIELDS: &'static [Field] = &[
        Field::required("path", check_string).path(),
        Field::optional("direct", check_bool),
        Field::optional("queue_depth", |v| check_int(v, 1, MAX_QUEUE_DEPTH as i64)),
    ];
    type Params = FileParams;

    fn build(p: &FileParams) -> io::Result<Arc<dyn Leaf>> {
        let opts = FileOptions {
            direct: p.direct,
            queue_depth: p.queue_depth,
            ..FileOptions::default()
        };
        // The open error alone ("No such file or directory") does not say which file.
        let leaf = FileLeaf::open(&p.path, opts)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.path.display())))?;
        Ok(Arc::new(leaf))
    }
}

/// `kind = "nbd"`: a remote NBD export.
pub struct Nbd;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdParams {
    /// `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`.
    pub uri: String,
    /// Connections per reactor (used when the server allows multi-conn).
    #[serde(default = "one")]
    pub connections: u32,
    /// A request older than this is a path error; also bounds a connect.
    #[serde(default = "default_timeout")]
    pub timeout: TimeSpan,
    /// TLS (`nbds://` URIs only): directory with `ca-cert.pem` and, optionally,
    /// `client-cert.pem` + `client-key.pem` (the URI's `tls-certificates`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_certificates: Option<PathBuf>,
    /// TLS-PSK key file, psktool's `username:hexkey` lines (the URI's `tls-psk-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_psk_file: Option<PathBuf>,
    /// PSK username (the URI's `user@` or `tls-username`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_username: Option<String>,
}

fn one() -> u32 {
    1
}

fn default_timeout() -> TimeSpan {
    TimeSpan::new(NbdOptions::default().timeout).expect("the default timeout is valid")
}

fn check_uri(v: &Value) -> Result<(), String> {
    check_string(v)?;
    NbdUri::parse(v.as_str().unwrap_or_default())
        .map(drop)
        .map_err(|e| e.to_string())
}

impl LeafKind for Nbd {
    const NAME: &'static str = "nbd";
    const FIELDS: &'static [Field] = &[
        Field::required("uri", check_uri),
        Field::optional("connections", |v| check_int(v, 1, 64)),
        Field::optional("timeout", check_time),
        Field::optional("tls_certificates", check_string),
        Field::optional("tls_psk_file", check_string),
        Field::optional("tls_username", check_string),
    ];
    type Params = NbdParams;

    fn build(p: &NbdParams) -> io::Result<Arc<dyn Leaf>> {
        let opts = NbdOptions {
            connections: p.connections,
            timeout: p.timeout.get(),
            ..NbdOptions::default()
        };
        let mut uri = NbdUri::parse(&p.uri)?;
        let given =
            p.tls_certificates.is_some() || p.tls_psk_file.is_some() || p.tls_username.is_some();
        match &mut uri.tls {
            Some(t) => {
                if let Some(d) = &p.tls_certificates {
                    t.certificates = Some(d.clone());
                }
                if let Some(f) = &p.tls_psk_file {
                    t.psk_file = Some(f.clone());
                }
                if let Some(u) = &p.tls_username {
                    t.username = Some(u.clone());
                }
                t.check()
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.uri)))?;
            }
            None if given => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: tls_* parameters need an nbds:// or nbds+unix:// URI",
                        p.uri
                    ),
                ))
            }
            None => {}
        }
        Ok(Arc::new(NbdLeaf::connect_uri(&p.uri, uri, opts)?))
    }
}
