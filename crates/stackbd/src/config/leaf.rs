//! `[leaf.NAME]` sections: the kind, then its parameters through the leaf registry
//! (`stackbd_leaves::registry`), which knows every kind's keys; each error is put on the line
//! of the key it is about. Runs on the thread reading the config; does not block.

use super::{check_name, Cx, Fields, LeafDecl, RawSection, Section};
use stackbd_leaves::registry::{self, ParamError};
use std::collections::BTreeMap;
use std::path::Path;

/// Reads one leaf section; `None` (with the errors in `cx`) if it is unusable.
pub(super) fn read_leaf(cx: &mut Cx<'_>, name: &str, map: RawSection) -> Option<LeafDecl> {
    let mut f = Fields::new(cx, Section::Leaf(name.to_string()), map);
    let name_ok = check_name(cx, &f);
    let known = registry::kind_names();
    let Some((kind, span)) = f.string(cx, "kind", &format!("one of: {known}")) else {
        // Without a kind nothing else can be judged; the other keys are not reported.
        return None;
    };
    let line = cx.lines.line(span.start);
    let Some(k) = registry::kind(&kind) else {
        f.invalid(cx, Some(line), registry::unknown_kind(&kind));
        return None;
    };
    let map = std::mem::take(&mut f.map);
    let lines: BTreeMap<String, usize> = map
        .iter()
        .map(|(key, v)| (key.clone(), cx.lines.line(v.span().start)))
        .collect();
    let table: toml::Table = map.into_iter().map(|(k, v)| (k, v.into_inner())).collect();
    let mut params = match k.parse(&table) {
        Ok(p) => p,
        Err(errors) => {
            for e in errors {
                // A missing key has no line of its own: the section's.
                let at = match e {
                    ParamError::Missing(_) => None,
                    _ => e.key().and_then(|key| lines.get(key).copied()),
                };
                f.invalid(cx, at, e.config_text(k));
            }
            return None;
        }
    };
    // Relative to the config file, not to wherever the program was started.
    if let Some(dir) = cx.path.and_then(Path::parent) {
        params.resolve_paths(dir);
    }
    name_ok.then(|| LeafDecl {
        name: name.to_string(),
        line,
        params,
    })
}
