//! The `crypt` table line: `<cipher> <key> <iv_offset> <device path> <offset> [<#opt_params>
//! <opt_params>]`, parsed with dm-crypt's checks and printed back in dm's canonical form.
//!
//! Keys: hex digits (length checked against the cipher), or a reference
//! `:<bytes>:keyfile:<path>` read from the file when the table is loaded (exactly `<bytes>`
//! bytes), printed back as the reference so the key never reaches a table listing or a state
//! file. dm's keyring references (`:<bytes>:logon:<desc>`, `user`, `encrypted`, `trusted`) have no
//! userspace equivalent and are refused, as is the empty key `-`. Control path only.

use std::fmt::Write as _;

use stackbd_core::target::parse_num;
use stackbd_core::{ArgError, Sector};
use zeroize::Zeroizing;

use super::cipher::CipherSpec;

/// Where a key came from, as the table prints it.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Given as hex in the table (printed back as lowercase hex).
    Hex,
    /// `:<bytes>:keyfile:<path>`.
    File { bytes: usize, path: String },
}

/// A key and its source. The bytes are zeroized on drop; `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    pub source: KeySource,
    pub bytes: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            KeySource::Hex => write!(f, "Key(hex, {} bytes)", self.bytes.len()),
            KeySource::File { bytes, path } => write!(f, "Key(:{bytes}:keyfile:{path})"),
        }
    }
}

impl Key {
    /// Parses a key field for `spec`: hex or a keyfile reference (read now). Checks the length.
    pub fn parse(spec: &CipherSpec, s: &str) -> Result<Key, ArgError> {
        let bad = |r: String| ArgError::new("key", r);
        if s == "-" {
            return Err(bad(format!(
                "cipher {spec} needs a key; the empty key '-' is refused"
            )));
        }
        let key = if let Some(rest) = s.strip_prefix(':') {
            let mut it = rest.splitn(3, ':');
            let (n, kind, desc) = (it.next(), it.next(), it.next());
            let (Some(n), Some(kind), Some(desc)) = (n, kind, desc) else {
                return Err(bad("key reference must be :<bytes>:keyfile:<path>".into()));
            };
            let bytes: usize = n
                .parse()
                .ok()
                .filter(|&b| b > 0 && b <= 1024)
                .ok_or_else(|| {
                    bad(format!(
                        "key reference size {n:?} must be a number of bytes (1..1024)"
                    ))
                })?;
            match kind {
                "keyfile" => {}
                "logon" | "user" | "encrypted" | "trusted" => {
                    return Err(bad(format!(
                        "kernel keyring keys ({kind}) are not available here; use :{bytes}:keyfile:<path>"
                    )))
                }
                other => return Err(bad(format!("unknown key type {other:?} (keyfile)"))),
            }
            if desc.is_empty() || desc.chars().any(char::is_whitespace) {
                return Err(bad(
                    "key file path must be non-empty and have no spaces".into()
                ));
            }
            let data = Zeroizing::new(
                std::fs::read(desc)
                    .map_err(|e| bad(format!("cannot read key file {desc}: {e}")))?,
            );
            if data.len() != bytes {
                return Err(bad(format!(
                    "key file {desc} holds {} bytes, the reference says {bytes}",
                    data.len()
                )));
            }
            Key {
                source: KeySource::File {
                    bytes,
                    path: desc.to_string(),
                },
                bytes: data,
            }
        } else {
            Key {
                source: KeySource::Hex,
                bytes: parse_hex(s).map_err(bad)?,
            }
        };
        spec.check_key_len(key.bytes.len()).map_err(bad)?;
        Ok(key)
    }

    /// The key field as the table prints it (hex, or the reference).
    pub fn table_text(&self) -> String {
        match &self.source {
            KeySource::Hex => {
                let mut s = String::with_capacity(self.bytes.len() * 2);
                for b in self.bytes.iter() {
                    let _ = write!(s, "{b:02x}");
                }
                s
            }
            KeySource::File { bytes, path } => format!(":{bytes}:keyfile:{path}"),
        }
    }
}

fn parse_hex(s: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return Err(format!(
            "key must be an even number of hex digits, got {} characters",
            s.len()
        ));
    }
    let mut out = Zeroizing::new(Vec::with_capacity(s.len() / 2));
    for pair in s.as_bytes().chunks_exact(2) {
        let hi = (pair[0] as char).to_digit(16);
        let lo = (pair[1] as char).to_digit(16);
        match (hi, lo) {
            (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
            _ => return Err("key has a character that is not a hex digit".into()),
        }
    }
    Ok(out)
}

/// Optional parameters (dm-crypt's feature arguments).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CryptOpts {
    pub allow_discards: bool,
    pub same_cpu_crypt: bool,
    pub submit_from_crypt_cpus: bool,
    pub no_read_workqueue: bool,
    pub no_write_workqueue: bool,
    /// Crypt sector size in bytes (512 unless `sector_size:<n>`).
    pub sector_size: u32,
    pub iv_large_sectors: bool,
}

/// A parsed crypt table line (device not yet resolved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CryptArgs {
    pub cipher: CipherSpec,
    pub key: Key,
    /// Added to the target-relative sector (512-byte units) before the IV is computed.
    pub iv_offset: u64,
    pub dev: String,
    pub offset: Sector,
    pub opts: CryptOpts,
}

impl CryptArgs {
    /// Parses a crypt line's arguments for a target of `len` sectors, with dm's checks (and a
    /// few of ours: see the module doc). Reads a key file if the key names one.
    pub fn parse(args: &[&str], len: Sector) -> Result<CryptArgs, ArgError> {
        if args.len() < 5 {
            return Err(ArgError::new(
                "arguments",
                "Not enough arguments (crypt <cipher> <key> <iv_offset> <dev> <offset> [<#opt> <opt>...])",
            ));
        }
        let opts = parse_opts(&args[5..])?;
        let cipher = CipherSpec::parse(args[0]).map_err(|e| ArgError::new("cipher", e))?;
        let key = Key::parse(&cipher, args[1])?;
        let units = u64::from(opts.sector_size / 512);
        if !len.is_multiple_of(units) {
            return Err(ArgError::new(
                "length",
                format!("Device size is not multiple of sector_size feature ({len} sectors, sector_size {})", opts.sector_size),
            ));
        }
        let iv_offset: u64 = parse_num("iv_offset", args[2])?;
        if !iv_offset.is_multiple_of(units) {
            return Err(ArgError::new(
                "iv_offset",
                "Invalid iv_offset sector (not a multiple of sector_size)",
            ));
        }
        if iv_offset.checked_add(len).is_none() {
            return Err(ArgError::new(
                "iv_offset",
                format!("iv_offset {iv_offset} + length {len} overflows"),
            ));
        }
        let offset: Sector = parse_num("offset", args[4])?;
        if !offset.is_multiple_of(units) {
            return Err(ArgError::new(
                "offset",
                "Invalid device sector (not a multiple of sector_size)",
            ));
        }
        Ok(CryptArgs {
            cipher,
            key,
            iv_offset,
            dev: args[3].to_string(),
            offset,
            opts,
        })
    }

    /// dm's `STATUSTYPE_TABLE` text, the device printed as `dev`.
    pub fn table_args(&self, dev: &str, key: &str) -> String {
        let o = &self.opts;
        let mut s = format!(
            "{} {key} {} {dev} {}",
            self.cipher, self.iv_offset, self.offset
        );
        let feats: [(bool, &str); 5] = [
            (o.allow_discards, "allow_discards"),
            (o.same_cpu_crypt, "same_cpu_crypt"),
            (o.submit_from_crypt_cpus, "submit_from_crypt_cpus"),
            (o.no_read_workqueue, "no_read_workqueue"),
            (o.no_write_workqueue, "no_write_workqueue"),
        ];
        let mut words: Vec<String> = feats
            .iter()
            .filter(|f| f.0)
            .map(|f| f.1.to_string())
            .collect();
        if o.sector_size != 512 {
            words.push(format!("sector_size:{}", o.sector_size));
        }
        if o.iv_large_sectors {
            words.push("iv_large_sectors".into());
        }
        if !words.is_empty() {
            let _ = write!(s, " {} {}", words.len(), words.join(" "));
        }
        s
    }
}

fn parse_opts(rest: &[&str]) -> Result<CryptOpts, ArgError> {
    let mut o = CryptOpts {
        sector_size: 512,
        ..CryptOpts::default()
    };
    let Some((count, words)) = rest.split_first() else {
        return Ok(o);
    };
    let n: usize = parse_num("#opt_params", count)
        .map_err(|_| ArgError::new("#opt_params", "Invalid number of feature args"))?;
    if n != words.len() {
        return Err(ArgError::new(
            "#opt_params",
            format!(
                "Invalid number of feature args: {n} given, {} present",
                words.len()
            ),
        ));
    }
    for w in words {
        let lw = w.to_ascii_lowercase();
        match lw.as_str() {
            "allow_discards" => o.allow_discards = true,
            "same_cpu_crypt" => o.same_cpu_crypt = true,
            "submit_from_crypt_cpus" => o.submit_from_crypt_cpus = true,
            "no_read_workqueue" => o.no_read_workqueue = true,
            "no_write_workqueue" => o.no_write_workqueue = true,
            "iv_large_sectors" => o.iv_large_sectors = true,
            _ => {
                if let Some(v) = lw.strip_prefix("sector_size:") {
                    o.sector_size = v
                        .parse::<u32>()
                        .ok()
                        .filter(|s| (512..=4096).contains(s) && s.is_power_of_two())
                        .ok_or_else(|| {
                            ArgError::new(
                                "sector_size",
                                "Invalid feature value for sector_size (512..4096, a power of two)",
                            )
                        })?;
                } else if lw.starts_with("integrity:") {
                    return Err(ArgError::new(
                        "opt_params",
                        "integrity (dm-integrity tags) is not supported",
                    ));
                } else {
                    return Err(ArgError::new(
                        "opt_params",
                        format!("Invalid feature arguments: {w:?}"),
                    ));
                }
            }
        }
    }
    Ok(o)
}
