//! The errors of the LUKS module.

use std::fmt;

/// Which header a problem is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderCopy {
    /// The LUKS1 header (it has one copy).
    Luks1,
    /// The LUKS2 primary copy, at byte 0.
    Primary,
    /// The LUKS2 secondary copy, after the primary's metadata area.
    Secondary,
}

impl fmt::Display for HeaderCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeaderCopy::Luks1 => "LUKS1 header",
            HeaderCopy::Primary => "primary LUKS2 header",
            HeaderCopy::Secondary => "secondary LUKS2 header",
        })
    }
}

/// Everything that can go wrong reading, unlocking or formatting a LUKS volume. Each message
/// names the field and the header copy.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    /// The device could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The device ends before something the header needs.
    #[error("device too small for the {what}: it needs {need} bytes, the device has {have}")]
    Truncated {
        /// What did not fit.
        what: String,
        /// Bytes needed (an end offset).
        need: u64,
        /// Bytes there are.
        have: u64,
    },
    /// Neither LUKS magic is there.
    #[error("not a LUKS device (no LUKS magic at byte 0 and no LUKS2 secondary header)")]
    NotLuks,
    /// A LUKS magic with a version this module does not know.
    #[error("unsupported LUKS version {0}")]
    UnsupportedVersion(u16),
    /// A field of a binary header is invalid.
    #[error("{copy}: {field}: {reason}")]
    BadHeader {
        /// Which header.
        copy: HeaderCopy,
        /// The field, e.g. `hdr_size`, `checksum`, `keyslot 3 key material offset`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The LUKS2 JSON metadata is invalid.
    #[error("{copy}: JSON metadata: {path}: {reason}")]
    BadJson {
        /// Which header copy.
        copy: HeaderCopy,
        /// Where in the JSON, e.g. `keyslots.0.area.offset`.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No LUKS2 secondary header at any of the standard offsets.
    #[error("no secondary LUKS2 header at any standard offset")]
    NoSecondary,
    /// Both LUKS2 copies are unusable.
    #[error("both LUKS2 header copies are bad: primary: {primary}; secondary: {secondary}")]
    BothCopiesBad {
        /// Why the primary copy was rejected.
        primary: Box<LuksError>,
        /// Why the secondary copy was rejected.
        secondary: Box<LuksError>,
    },
    /// A valid header using something this module does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The requested keyslot does not exist or holds no key.
    #[error("keyslot {0} is not active")]
    NoSuchKeyslot(u32),
    /// No (or not the requested) keyslot opened with this passphrase.
    #[error(
        "no key available with this passphrase (wrong passphrase, or a damaged keyslot area or digest)"
    )]
    WrongPassphrase,
    /// A KDF refused its parameters.
    #[error("key derivation ({kdf}): {reason}")]
    Kdf {
        /// Which KDF.
        kdf: String,
        /// Why.
        reason: String,
    },
    /// The cipher named by the header (or the format options) cannot be used.
    #[error("cipher {cipher}: {reason}")]
    Cipher {
        /// The cipher string.
        cipher: String,
        /// Why.
        reason: String,
    },
    /// A bad parameter: format options, or a data segment the device cannot hold.
    #[error("{0}")]
    BadParam(String),
}

impl LuksError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LuksError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn bad_param(msg: impl Into<String>) -> Self {
        LuksError::BadParam(msg.into())
    }

    pub(crate) fn header(
        copy: HeaderCopy,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        LuksError::BadHeader {
            copy,
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn json(
        copy: HeaderCopy,
        path: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        LuksError::BadJson {
            copy,
            path: path.into(),
            reason: reason.into(),
        }
    }
}
