//! `stackbd leaf add`, `leaf ls` and `leaf message`: the kind's parameters go to the daemon as the leaf
//! registry (`stackbd_leaves::registry`) names them, and come back for the listing. Runs on
//! the CLI's only thread; nothing here blocks.

use serde_json::{json, Map, Value};
use stackbd_leaves::registry::{self, Kind};

/// `leaf add` options besides the name and kind.
pub struct AddArgs<'a> {
    /// The main parameter (the kind's first: size, path, URI), then `key=value`s.
    pub args: &'a [String],
    pub direct: bool,
    pub queue_depth: Option<u32>,
    pub connections: Option<u32>,
    pub timeout: Option<&'a str>,
}

/// The `leaf_add` request: `{"name", "kind", "params": {...}}`. Path parameters are made
/// absolute (the daemon runs elsewhere); other values are read as TOML literals (`8`, `true`)
/// or else taken as strings (`1GiB`, `5s`, a URI).
pub fn add_request(name: &str, kind_name: &str, a: &AddArgs<'_>) -> Result<Value, String> {
    let kind = registry::kind(kind_name).ok_or_else(|| registry::unknown_kind(kind_name))?;
    let mut params = Map::new();
    let mut put = |key: &str, v: Value| -> Result<(), String> {
        if params.insert(key.to_string(), v).is_some() {
            return Err(format!("parameter '{key}' is given twice"));
        }
        Ok(())
    };
    for (i, arg) in a.args.iter().enumerate() {
        let (key, text) = match arg.split_once('=') {
            Some((k, v)) if kind.field(k).is_some() => (k, v),
            _ if i == 0 => (kind.fields[0].key, arg.as_str()),
            _ => return Err(format!("'{arg}': expected KEY=VALUE ({})", kind.takes())),
        };
        put(key, value(kind, key, text)?)?;
    }
    let flags = [
        ("direct", a.direct.then_some(json!(true))),
        ("queue_depth", a.queue_depth.map(|n| json!(n))),
        ("connections", a.connections.map(|n| json!(n))),
        ("timeout", a.timeout.map(|t| json!(t))),
    ];
    for (key, v) in flags {
        let Some(v) = v else { continue };
        if kind.field(key).is_none() {
            let have: Vec<&str> = registry::KINDS
                .iter()
                .filter(|k| k.field(key).is_some())
                .map(|k| k.name)
                .collect();
            return Err(format!(
                "--{} applies to {} leaves, not {kind_name}",
                key.replace('_', "-"),
                have.join(", ")
            ));
        }
        put(key, v)?;
    }
    Ok(json!({"name": name, "kind": kind_name, "params": params}))
}

fn value(kind: &Kind, key: &str, text: &str) -> Result<Value, String> {
    if kind.field(key).is_some_and(|f| f.is_path) {
        let p = std::path::absolute(text)
            .map_err(|e| format!("cannot make '{text}' an absolute path: {e}"))?;
        return Ok(json!(p.to_string_lossy()));
    }
    let literal = toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    Ok(match literal {
        Some(v) => serde_json::to_value(v).map_err(|e| e.to_string())?,
        None => json!(text),
    })
}

/// The `leaf_message` request: the words go as they are; the leaf reads them.
pub fn message_request(name: &str, args: &[String]) -> Value {
    json!({"name": name, "argv": args})
}

/// `key=value ...` in the kind's field order, values as the config writes them.
pub fn params_text(kind: &str, params: &Value) -> String {
    let Some(m) = params.as_object() else {
        return "-".into();
    };
    let mut keys: Vec<&str> = registry::kind(kind)
        .map(|k| k.fields.iter().map(|f| f.key).collect())
        .unwrap_or_default();
    let others: Vec<&str> = m
        .keys()
        .map(String::as_str)
        .filter(|k| !keys.contains(k))
        .collect();
    keys.extend(others);
    keys.iter()
        .filter_map(|k| {
            let v = m.get(*k)?;
            let shown = toml::Value::try_from(v).map_or_else(|_| v.to_string(), |t| t.to_string());
            Some(format!("{k}={shown}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(kind: &str, args: &[&str]) -> Result<Value, String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        add_request(
            "x",
            kind,
            &AddArgs {
                args: &args,
                direct: false,
                queue_depth: None,
                connections: None,
                timeout: None,
            },
        )
    }

    #[test]
    fn main_parameter_then_key_values() {
        let r = add("nbd", &["nbd://h/e", "connections=2", "timeout=1500ms"]).unwrap();
        assert_eq!(
            r["params"],
            json!({"uri": "nbd://h/e", "connections": 2, "timeout": "1500ms"})
        );
        let r = add("mem", &["1GiB"]).unwrap();
        assert_eq!(r["params"], json!({"size": "1GiB"}));
        let r = add("file", &["/a=b direct", "direct=true"]).unwrap();
        assert_eq!(r["params"], json!({"path": "/a=b direct", "direct": true}));
        assert!(add("mem", &["1GiB", "size=2GiB"])
            .unwrap_err()
            .contains("twice"));
        assert!(add("mem", &["1GiB", "colour=red"])
            .unwrap_err()
            .contains("KEY=VALUE"));
        assert!(add("tape", &["1"])
            .unwrap_err()
            .contains("unknown kind 'tape'"));
    }

    #[test]
    fn params_print_in_field_order() {
        let p = json!({"queue_depth": 8, "direct": true, "path": "/x y"});
        assert_eq!(
            params_text("file", &p),
            "path=\"/x y\" direct=true queue_depth=8"
        );
    }
}
