//! dmsetup habits scripts depend on: `info`, `table` and `status` without a NAME go over every
//! volume (each line of `table`/`status` prefixed with `NAME: `, `info` blocks separated by a
//! blank line); `remove_all` removes every volume, tops first; `targets` and `version`.

use super::{render::render, Conn, Fail, Verb};
use serde_json::{json, Value};
use stackbd::daemon::control::Client;

/// The daemon's volumes, by name, in the order `ls` gives.
fn volumes(c: &mut Client) -> Result<Vec<String>, Fail> {
    let r = call(c, "ls", json!({}))?;
    Ok(r["devices"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter(|x| x["volume"] == true && x.get("failed").is_none())
                .filter_map(|x| x["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn call(c: &mut Client, cmd: &str, args: Value) -> Result<Value, Fail> {
    let (line, reply) = c
        .call_raw(cmd, args)
        .map_err(|e| Fail::from(format!("lost the daemon: {e}")))?;
    if reply["ok"] != true {
        return Err(Fail {
            msg: reply["error"]
                .as_str()
                .unwrap_or("the daemon refused without saying why")
                .to_string(),
            reply: Some(line),
        });
    }
    Ok(reply)
}

/// `info`, `table` or `status` of every volume.
pub(super) fn each_volume(v: &Verb, c: &mut Client, conn: &Conn) -> Result<String, Fail> {
    let names = volumes(c)?;
    if names.is_empty() {
        return Ok(if conn.json {
            format!("{}\n", json!({"v": 1, "ok": true, "volumes": []}))
        } else {
            "No devices found\n".into()
        });
    }
    let mut replies = Vec::new();
    let mut text = String::new();
    for name in &names {
        let (cmd, args) = match v {
            Verb::Info { .. } => ("info", json!({ "name": name })),
            Verb::Table {
                inactive, showkeys, ..
            } => (
                "table",
                json!({"name": name, "inactive": inactive, "showkeys": showkeys}),
            ),
            _ => ("status", json!({ "name": name })),
        };
        let r = match call(c, cmd, args) {
            Ok(r) => r,
            // Removed between `ls` and now: not an error of this listing.
            Err(f) if f.msg.contains("does not exist") => continue,
            Err(f) => return Err(f),
        };
        let body = render(v, &r);
        match v {
            Verb::Info { .. } => {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&body);
            }
            _ if body.is_empty() => text.push_str(&format!("{name}: \n")),
            _ => {
                for l in body.lines() {
                    text.push_str(&format!("{name}: {l}\n"));
                }
            }
        }
        replies.push(r);
    }
    if conn.json {
        // One object, as every verb's `--json`: each volume's reply in `volumes`.
        return Ok(format!(
            "{}\n",
            json!({"v": 1, "ok": true, "volumes": replies})
        ));
    }
    Ok(text)
}

/// `remove_all [--force]`: removes every volume, those no other volume uses first, pass after
/// pass, until none is left or a pass removes nothing (then says what is left and why).
pub(super) fn remove_all(c: &mut Client, force: bool) -> Result<String, Fail> {
    let mut left = volumes(c)?;
    let mut removed = 0;
    loop {
        let mut why = Vec::new();
        let before = left.len();
        let mut next = Vec::new();
        for name in left {
            match call(c, "remove", json!({"name": name, "force": force})) {
                Ok(_) => removed += 1,
                Err(f) => {
                    why.push(format!("{name}: {}", f.msg));
                    next.push(name);
                }
            }
        }
        left = next;
        if left.is_empty() {
            return Ok(format!("removed {removed} volumes\n"));
        }
        if left.len() == before {
            return Err(Fail::from(format!(
                "removed {removed} volumes; {} left: {}",
                left.len(),
                why.join("; ")
            )));
        }
    }
}

/// `targets`: every target type this stackbd builds tables with, and its version.
pub(super) fn targets() -> String {
    let reg = stackbd_targets::registry();
    let mut kinds: Vec<&str> = reg.kinds().collect();
    kinds.sort_unstable();
    kinds
        .iter()
        .map(|k| format!("{k:<16} v{}\n", env!("CARGO_PKG_VERSION")))
        .collect()
}

/// `version`: this program's, and the daemon's when one answers.
pub(super) fn version(c: Option<&mut Client>) -> String {
    let mut t = format!("Library version:   stackbd {}\n", env!("CARGO_PKG_VERSION"));
    match c.and_then(|c| call(c, "ping", json!({})).ok()) {
        Some(r) => {
            t += &format!(
                "Driver version:    stackbd {} (daemon pid {})\n",
                r["version"].as_str().unwrap_or("?"),
                r["pid"]
            );
        }
        None => t += "Driver version:    (no daemon answers)\n",
    }
    t
}
