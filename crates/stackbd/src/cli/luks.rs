//! `stackbd luks open|close|format|dump`. `open` and `close` ask the daemon (it reads the header
//! through its engine and creates the `crypt` volume); `format` and `dump` work on an image file
//! here, without a daemon, as cryptsetup does.

use super::Conn;
use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum LuksCmd {
    /// Unlock a LUKS1/LUKS2 header and create a crypt volume NAME over its payload. SOURCE is an
    /// image file (opened as a file leaf NAME-luks) or a leaf of the daemon.
    Open {
        #[arg(value_name = "IMAGE|LEAF")]
        source: String,
        name: String,
        #[command(flatten)]
        key: KeyArgs,
        /// Try only this key slot.
        #[arg(long, value_name = "N")]
        key_slot: Option<u32>,
        /// Pass discards down to the device (they reveal which blocks are free).
        #[arg(long)]
        allow_discards: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a volume `luks open` made (and the leaf it made for an image file).
    Close {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a new LUKS2 header on an image file (its data is lost), as `cryptsetup luksFormat`.
    Format {
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        /// The data cipher.
        #[arg(long, default_value = "aes-xts-plain64")]
        cipher: String,
        /// Volume key bits (512 for aes-xts: AES-256).
        #[arg(long, value_name = "BITS", default_value_t = 512)]
        key_size: u32,
        /// Encryption sector size in bytes (512, 1024, 2048 or 4096).
        #[arg(long, value_name = "BYTES", default_value_t = 4096)]
        sector_size: u32,
        /// The key derivation function of the key slot.
        #[arg(long, value_enum, default_value_t = Pbkdf::Argon2id)]
        pbkdf: Pbkdf,
        /// argon2 memory cost in KiB.
        #[arg(long, value_name = "KIB")]
        pbkdf_memory: Option<u32>,
        /// argon2 lanes.
        #[arg(long, value_name = "N")]
        pbkdf_parallel: Option<u32>,
        /// Iterations (pbkdf2) or time cost (argon2), instead of the defaults.
        #[arg(long, value_name = "N")]
        pbkdf_force_iterations: Option<u32>,
        /// A label stored in the header.
        #[arg(long)]
        label: Option<String>,
    },
    /// Print a LUKS header as `cryptsetup luksDump` does.
    Dump { image: PathBuf },
}

#[derive(clap::Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct KeyArgs {
    /// The passphrase is this file's bytes, exactly (cryptsetup's --key-file).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// The passphrase is this file's first line, without its line end.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pbkdf {
    Argon2id,
    Argon2i,
    Pbkdf2,
}

impl LuksCmd {
    pub fn name(&self) -> &'static str {
        match self {
            LuksCmd::Open { .. } => "luks open",
            LuksCmd::Close { .. } => "luks close",
            LuksCmd::Format { .. } => "luks format",
            LuksCmd::Dump { .. } => "luks dump",
        }
    }

    /// The daemon connection, for the verbs that use one.
    pub fn conn(&self) -> Option<&Conn> {
        match self {
            LuksCmd::Open { conn, .. } | LuksCmd::Close { conn, .. } => Some(conn),
            LuksCmd::Format { .. } | LuksCmd::Dump { .. } => None,
        }
    }
}

fn absolute(what: &str, p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{what} {}: {e}", p.display()))
}

/// The request `open`/`close` send.
pub fn request(cmd: &LuksCmd) -> Result<(&'static str, Value), String> {
    match cmd {
        LuksCmd::Open {
            source,
            name,
            key,
            key_slot,
            allow_discards,
            ..
        } => {
            let mut a = json!({"name": name, "allow_discards": allow_discards});
            // A path names a file; a bare word that is no file names a leaf.
            let p = Path::new(source);
            if source.contains('/') || p.exists() {
                a["path"] = json!(absolute("image", p)?);
            } else {
                a["device"] = json!(source);
            }
            match (&key.key_file, &key.passphrase_file) {
                (Some(k), _) => a["key_file"] = json!(absolute("key file", k)?),
                (None, Some(pf)) => a["passphrase_file"] = json!(absolute("passphrase file", pf)?),
                (None, None) => return Err("give --key-file or --passphrase-file".into()),
            }
            if let Some(s) = key_slot {
                a["key_slot"] = json!(s);
            }
            Ok(("luks_open", a))
        }
        LuksCmd::Close { name, .. } => Ok(("luks_close", json!({ "name": name }))),
        _ => Err("this luks verb runs without the daemon".into()),
    }
}

/// What `open`/`close` print.
pub fn render(cmd: &LuksCmd, r: &Value) -> String {
    match cmd {
        LuksCmd::Open { name, .. } => {
            let size = r
                .pointer("/info/sectors")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            format!(
                "{name}: opened, {} ({size} sectors)\n",
                stackbd::config::human_bytes(size.saturating_mul(512))
            )
        }
        LuksCmd::Close { name, .. } => format!("{name}: closed\n"),
        _ => String::new(),
    }
}

/// `format` and `dump`, here, on the image file.
pub fn run_local(cmd: &LuksCmd) -> Result<String, String> {
    match cmd {
        LuksCmd::Format { .. } => format(cmd),
        LuksCmd::Dump { image } => {
            let mut f = std::fs::File::open(image)
                .map_err(|e| format!("cannot open {}: {e}", image.display()))?;
            let size = f
                .metadata()
                .map_err(|e| format!("cannot stat {}: {e}", image.display()))?
                .len();
            let h = stackbd::luks::Header::read(&mut f, size)
                .map_err(|e| format!("{}: {e}", image.display()))?;
            Ok(h.dump())
        }
        _ => Err("this luks verb needs the daemon".into()),
    }
}

fn format(cmd: &LuksCmd) -> Result<String, String> {
    let LuksCmd::Format {
        image,
        key,
        cipher,
        key_size,
        sector_size,
        pbkdf,
        pbkdf_memory,
        pbkdf_parallel,
        pbkdf_force_iterations,
        label,
    } = cmd
    else {
        unreachable!("format() is called for Format only");
    };
    let source = match (&key.key_file, &key.passphrase_file) {
        (Some(k), _) => stackbd::crypttab::KeySource::KeyFile(k.clone()),
        (None, Some(p)) => stackbd::crypttab::KeySource::PassphraseFile(p.clone()),
        (None, None) => return Err("give --key-file or --passphrase-file".into()),
    };
    let pass = source.read()?;
    if key_size % 8 != 0 {
        return Err(format!(
            "--key-size {key_size}: not a whole number of bytes"
        ));
    }
    let defaults = stackbd::luks::FormatOptions::default();
    let kdf = match pbkdf {
        Pbkdf::Pbkdf2 => stackbd::luks::KdfOptions::Pbkdf2 {
            hash: "sha256".into(),
            iterations: pbkdf_force_iterations.unwrap_or(1_000_000),
        },
        Pbkdf::Argon2id | Pbkdf::Argon2i => {
            let (time, memory_kib, parallel) = match defaults.kdf {
                stackbd::luks::KdfOptions::Argon2 {
                    time,
                    memory_kib,
                    parallel,
                    ..
                } => (time, memory_kib, parallel),
                _ => (4, 256 * 1024, 4),
            };
            stackbd::luks::KdfOptions::Argon2 {
                variant: if *pbkdf == Pbkdf::Argon2id {
                    stackbd::luks::Argon2Variant::Argon2id
                } else {
                    stackbd::luks::Argon2Variant::Argon2i
                },
                time: pbkdf_force_iterations.unwrap_or(time),
                memory_kib: pbkdf_memory.unwrap_or(memory_kib),
                parallel: pbkdf_parallel.unwrap_or(parallel),
            }
        }
    };
    let opts = stackbd::luks::FormatOptions {
        cipher: cipher.clone(),
        key_bytes: (*key_size / 8) as usize,
        sector_size: *sector_size,
        kdf,
        label: label.clone().unwrap_or_default(),
        ..defaults
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| format!("cannot open {}: {e}", image.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", image.display()))?
        .len();
    stackbd::luks::format_luks2(&mut f, size, &opts, &pass)
        .map_err(|e| format!("{}: {e}", image.display()))?;
    Ok(format!(
        "{}: LUKS2 header written ({cipher}, {key_size}-bit key, {sector_size}-byte sectors)\n",
        image.display()
    ))
}
