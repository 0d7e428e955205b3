//! `[luks.NAME]` sections: a LUKS volume opened at start, like a crypttab line (see
//! [`crate::crypttab`]). Runs on the thread reading the config; does not block (the key file is
//! read when the volume is opened, not here).

use super::{check_name, Cx, Fields, RawSection, Section};
use crate::crypttab::{KeySource, LuksDecl};
use std::path::{Path, PathBuf};

const TAKES: &str =
    "luks sections take: device, key_file or passphrase_file, key_slot, allow_discards";

/// Reads one luks section; `None` (with the errors in `cx`) if it is unusable.
pub(super) fn read_luks(cx: &mut Cx<'_>, name: &str, map: RawSection) -> Option<LuksDecl> {
    let mut f = Fields::new(cx, Section::Luks(name.to_string()), map);
    let name_ok = check_name(cx, &f);
    let device = f.string(cx, "device", TAKES);
    let key = read_key(cx, &mut f);
    let key_slot = f.integer(cx, "key_slot", 0..=31);
    let allow_discards = f.bool(cx, "allow_discards", false);
    f.finish(cx, TAKES);
    let (device, span) = device?;
    let (key_slot, allow_discards, key) = (key_slot?, allow_discards?, key?);
    name_ok.then(|| LuksDecl {
        name: name.to_string(),
        line: cx.lines.line(span.start),
        device,
        key,
        key_slot: key_slot.map(|s| s as u32),
        allow_discards,
    })
}

/// `key_file` or `passphrase_file` (exactly one), relative to the config file's folder.
fn read_key(cx: &mut Cx<'_>, f: &mut Fields) -> Option<KeySource> {
    let has_key = f.map.contains_key("key_file");
    let has_pass = f.map.contains_key("passphrase_file");
    if has_key && has_pass {
        f.invalid(
            cx,
            None,
            "give key_file or passphrase_file, not both".to_string(),
        );
        f.take("key_file");
        f.take("passphrase_file");
        return None;
    }
    let dir = cx.path.and_then(Path::parent).map(Path::to_path_buf);
    let resolve = |p: String| -> PathBuf {
        let p = PathBuf::from(p);
        match &dir {
            Some(d) if p.is_relative() => d.join(p),
            _ => p,
        }
    };
    if has_pass {
        let (p, _) = f.string(cx, "passphrase_file", TAKES)?;
        return Some(KeySource::PassphraseFile(resolve(p)));
    }
    let (p, _) = f.string(cx, "key_file", TAKES)?;
    Some(KeySource::KeyFile(resolve(p)))
}
