//! LUKS volumes the daemon opens, as `/etc/crypttab` opens them at boot: a `[luks.NAME]` section
//! of the config (or a `luks_open` request) names the device that holds the LUKS header, where
//! the passphrase is, and optionally the key slot; opening reads the header through the engine,
//! unlocks the volume key and creates the volume `NAME` with a `crypt` table over the payload.
//!
//! ```toml
//! [leaf.disk]
//! kind = "file"
//! path = "secret.img"
//!
//! [luks.secret]
//! device = "disk"                  # the device holding the LUKS header (a leaf)
//! key_file = "secret.key"          # the passphrase: the file's bytes, exactly (cryptsetup --key-file)
//! # passphrase_file = "pass.txt"   # or: the file's first line, without its newline
//! key_slot = 0                     # optional: try only this slot
//! allow_discards = false           # optional: pass discards down (they reveal free space)
//! ```
//!
//! The volume key never reaches the state file: the daemon writes the `[luks.NAME]` section back
//! (the key file's path, not its contents) instead of the volume's table, and a restart unlocks
//! again. Key and passphrase buffers are zeroed when dropped. Everything here runs on a control
//! thread and may block (file reads, the key derivation: argon2 takes a second by design).

use crate::luks::{CryptParams, Header, ReadAt, VolumeKey};
use stackbd_core::{Engine, SECTOR_SIZE};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Where the passphrase comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The whole file, byte for byte, is the passphrase (cryptsetup's `--key-file`).
    KeyFile(PathBuf),
    /// The file's first line, without its line end, is the passphrase (as it would be typed).
    PassphraseFile(PathBuf),
}

/// Longest key file read (cryptsetup's default `--keyfile-size` limit is 8 MiB).
pub const MAX_KEY_FILE_BYTES: u64 = 8 << 20;

impl KeySource {
    pub fn path(&self) -> &Path {
        match self {
            KeySource::KeyFile(p) | KeySource::PassphraseFile(p) => p,
        }
    }

    /// The TOML key this source is written under.
    pub fn key(&self) -> &'static str {
        match self {
            KeySource::KeyFile(_) => "key_file",
            KeySource::PassphraseFile(_) => "passphrase_file",
        }
    }

    /// Reads the passphrase. Errors name the file and say what is wrong with it.
    pub fn read(&self) -> Result<Zeroizing<Vec<u8>>, String> {
        use std::io::Read;
        let p = self.path();
        let f = std::fs::File::open(p)
            .map_err(|e| format!("cannot read {} {}: {e}", self.key(), p.display()))?;
        let mut buf = Zeroizing::new(Vec::new());
        f.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|e| format!("cannot read {} {}: {e}", self.key(), p.display()))?;
        if buf.len() as u64 > MAX_KEY_FILE_BYTES {
            return Err(format!(
                "{} {} is larger than {MAX_KEY_FILE_BYTES} bytes",
                self.key(),
                p.display()
            ));
        }
        if let KeySource::PassphraseFile(_) = self {
            let end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
            let end = if end > 0 && buf[end - 1] == b'\r' {
                end - 1
            } else {
                end
            };
            buf.truncate(end);
        }
        if buf.is_empty() {
            return Err(format!(
                "{} {} holds an empty passphrase",
                self.key(),
                p.display()
            ));
        }
        Ok(buf)
    }
}

/// One LUKS volume to open: a `[luks.NAME]` section or a `luks_open` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksDecl {
    /// The volume to create.
    pub name: String,
    /// 1-based file line of the section (0 when it did not come from a file).
    pub line: usize,
    /// The device holding the LUKS header and payload.
    pub device: String,
    pub key: KeySource,
    /// Only this key slot is tried.
    pub key_slot: Option<u32>,
    /// Discards go down to the device (`allow_discards`); off by default, as in dm-crypt.
    pub allow_discards: bool,
}

impl LuksDecl {
    /// The section's keys, as the state file writes them.
    pub fn to_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut out = format!(
            "device = {}\n{} = {}\n",
            q(&self.device),
            self.key.key(),
            q(&self.key.path().to_string_lossy())
        );
        if let Some(s) = self.key_slot {
            let _ = writeln!(out, "key_slot = {s}");
        }
        if self.allow_discards {
            out.push_str("allow_discards = true\n");
        }
        out
    }

    /// Unlocks the header on `device` and creates the volume over its payload. Nothing is
    /// created when anything fails (a wrong passphrase, a damaged header, a missing key file).
    /// Blocks: reads the device through the engine and runs the key derivation, with the
    /// engine borrowed; the daemon calls it with the engine lock held.
    pub fn open(&self, engine: &mut Engine) -> Result<(), String> {
        if engine.dev_id(&self.name).is_ok() {
            return Err(format!("device '{}' already exists", self.name));
        }
        let table = self.table(engine)?;
        engine
            .create(&self.name, Some(&table))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The `crypt` table for the unlocked volume (it holds the volume key in hex).
    pub fn table(&self, engine: &mut Engine) -> Result<Zeroizing<String>, String> {
        let dev = engine.dev_id(&self.device).map_err(|e| e.to_string())?;
        let size = engine
            .dev_info(&self.device)
            .map_err(|e| e.to_string())?
            .size;
        let passphrase = self.key.read()?;
        let size_bytes = size.saturating_mul(SECTOR_SIZE as u64);
        let mut reader = DevReader {
            engine,
            dev,
            size_bytes,
        };
        let u = unlock(&mut reader, size_bytes, &passphrase, self.key_slot)
            .map_err(|e| format!("{}: {e}", self.device))?;
        crypt_table(&u, &self.device, size, self.allow_discards)
    }
}

/// An unlocked LUKS header: where its payload is, how it is encrypted, and the volume key.
pub struct Unlocked {
    pub params: CryptParams,
    pub key: VolumeKey,
}

/// Reads the LUKS header on `dev` and opens a key slot with `passphrase`. Blocks (reads, KDF).
pub fn unlock<D: ReadAt + ?Sized>(
    dev: &mut D,
    dev_bytes: u64,
    passphrase: &[u8],
    slot: Option<u32>,
) -> Result<Unlocked, String> {
    let h = Header::read(dev, dev_bytes).map_err(|e| e.to_string())?;
    for w in h.warnings() {
        tracing::warn!("LUKS header: {w}");
    }
    let params = h.crypt_params().map_err(|e| e.to_string())?;
    let key = h.unlock(dev, passphrase, slot).map_err(|e| e.to_string())?;
    Ok(Unlocked { params, key })
}

/// `0 <len> crypt <cipher> <key hex> <iv_offset> <device> <offset> [opts]` for a payload.
pub fn crypt_table(
    u: &Unlocked,
    device: &str,
    device_sectors: u64,
    allow_discards: bool,
) -> Result<Zeroizing<String>, String> {
    let p = &u.params;
    let offset = p.payload_offset_sectors;
    let len = p
        .payload_sectors_on(device_sectors.saturating_mul(SECTOR_SIZE as u64))
        .map_err(|e| format!("{device}: {e}"))?;
    // Whole crypt sectors only: a tail shorter than one is not addressable.
    let per = u64::from(p.sector_size / 512).max(1);
    let len = len - len % per;
    if len == 0 {
        return Err(format!("{device}: the LUKS payload is empty"));
    }
    let mut opts = Vec::new();
    if allow_discards {
        opts.push("allow_discards".to_string());
    }
    if p.sector_size != 512 {
        opts.push(format!("sector_size:{}", p.sector_size));
    }
    if p.iv_large_sectors {
        opts.push("iv_large_sectors".to_string());
    }
    let mut t = Zeroizing::new(String::with_capacity(256));
    let _ = write!(t, "0 {len} crypt {} ", p.cipher);
    t.push_str(&u.key.to_hex());
    let _ = write!(t, " {} {device} {offset}", p.iv_offset);
    if !opts.is_empty() {
        let _ = write!(t, " {} {}", opts.len(), opts.join(" "));
    }
    Ok(t)
}

/// Reads a device through the engine at any byte offset (the LUKS code asks for unaligned
/// ranges; the engine takes whole sectors).
pub struct DevReader<'a> {
    engine: &'a mut Engine,
    dev: stackbd_core::DevId,
    size_bytes: u64,
}

impl ReadAt for DevReader<'_> {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let ss = SECTOR_SIZE as u64;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size_bytes)
            .ok_or_else(|| std::io::Error::other("read past the end of the device"))?;
        let first = offset / ss;
        let last = end.div_ceil(ss);
        // One request at most 1 MiB: headers are read in small pieces anyway.
        let mut at = first;
        let mut chunk = vec![0u8; 1 << 20];
        while at < last {
            let n = (last - at).min(chunk.len() as u64 / ss);
            let piece = &mut chunk[..(n * ss) as usize];
            let st = crate::devio::read_sectors(self.engine, self.dev, at, piece);
            if !st.is_ok() {
                return Err(std::io::Error::other(format!(
                    "read of sector {at} failed: {st:?}"
                )));
            }
            // Copy the overlap of [at*ss, (at+n)*ss) with [offset, end).
            let lo = (at * ss).max(offset);
            let hi = ((at + n) * ss).min(end);
            let src = &piece[(lo - at * ss) as usize..(hi - at * ss) as usize];
            buf[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(src);
            at += n;
        }
        Ok(())
    }
}

/// A table's text with the key of every `crypt` line replaced by as many `0`s, as `dmsetup
/// table` prints it without `--showkeys`. Key references (`:32:keyfile:/path`) print as they
/// are: they hold no key.
pub fn mask_keys(table: &str) -> String {
    let mut out = String::with_capacity(table.len());
    for line in table.split_inclusive('\n') {
        out.push_str(&mask_line(line));
    }
    out
}

fn mask_line(line: &str) -> String {
    // Fields: start length target cipher key ...
    let mut spans = Vec::with_capacity(8);
    let mut start = None;
    for (i, c) in line.char_indices() {
        if c.is_whitespace() {
            if let Some(s) = start.take() {
                spans.push((s, i));
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        spans.push((s, line.len()));
    }
    let is_crypt = spans.get(2).is_some_and(|&(a, b)| &line[a..b] == "crypt");
    let Some(&(a, b)) = spans.get(4).filter(|_| is_crypt) else {
        return line.to_string();
    };
    if line[a..b].starts_with(':') || &line[a..b] == "-" {
        return line.to_string();
    }
    format!("{}{}{}", &line[..a], "0".repeat(b - a), &line[b..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_masked_as_dmsetup_does() {
        let t = "0 8 linear m0 0\n8 16 crypt aes-xts-plain64 00ff11ee 0 m0 16 1 allow_discards\n";
        assert_eq!(
            mask_keys(t),
            "0 8 linear m0 0\n8 16 crypt aes-xts-plain64 00000000 0 m0 16 1 allow_discards\n"
        );
        let r = "0 8 crypt aes-xts-plain64 :64:keyfile:/k 0 m0 0";
        assert_eq!(mask_keys(r), r);
        assert_eq!(mask_keys("0 8 crypt x"), "0 8 crypt x");
        assert_eq!(mask_keys(""), "");
    }

    #[test]
    fn passphrase_files_drop_the_line_end_and_key_files_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, b"secret\r\nmore").unwrap();
        let pass = KeySource::PassphraseFile(p.clone()).read().unwrap();
        assert_eq!(&pass[..], b"secret");
        let key = KeySource::KeyFile(p.clone()).read().unwrap();
        assert_eq!(&key[..], b"secret\r\nmore");
        std::fs::write(&p, b"\n").unwrap();
        let e = KeySource::PassphraseFile(p.clone()).read().unwrap_err();
        assert!(e.contains("empty passphrase"), "{e}");
        let e = KeySource::KeyFile(dir.path().join("gone"))
            .read()
            .unwrap_err();
        assert!(
            e.contains("cannot read key_file") && e.contains("gone"),
            "{e}"
        );
    }
}
