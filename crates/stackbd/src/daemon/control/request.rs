//! The request envelope (object, version, command, known fields) and [`Req`], typed access to a
//! request's fields whose errors name the command and the field. No verbs live here.

use super::{COMMANDS, OPEN_COMMANDS, VERSION};
use serde_json::{Map, Value};
use std::time::Duration;

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value as an error message shows it: short.
fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// A request's fields, with typed access and errors that name the command and the field.
pub(super) struct Req<'a> {
    pub(super) cmd: &'a str,
    pub(super) m: &'a Map<String, Value>,
}

impl<'a> Req<'a> {
    /// A field; `null` counts as absent.
    pub(super) fn get(&self, k: &str) -> Option<&'a Value> {
        self.m.get(k).filter(|v| !v.is_null())
    }

    pub(super) fn wrong(&self, k: &str, want: &str, got: &Value) -> String {
        format!(
            "{}: field '{k}' must be {want} (got {} {})",
            self.cmd,
            type_name(got),
            shown(got)
        )
    }

    pub(super) fn missing(&self, k: &str) -> String {
        format!("{}: missing field '{k}'", self.cmd)
    }

    pub(super) fn string(&self, k: &str) -> Result<&'a str, String> {
        self.opt_string(k)?.ok_or_else(|| self.missing(k))
    }

    pub(super) fn opt_string(&self, k: &str) -> Result<Option<&'a str>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(k, "a string", v)),
        }
    }

    pub(super) fn flag(&self, k: &str) -> Result<bool, String> {
        match self.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong(k, "true or false", v)),
        }
    }

    pub(super) fn opt_u64(&self, k: &str) -> Result<Option<u64>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(k, "a whole number >= 0", v)),
        }
    }

    /// Seconds, as a positive number (fractions allowed).
    pub(super) fn opt_secs(&self, k: &str) -> Result<Option<Duration>, String> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let want = "a number of seconds > 0";
        let s = v.as_f64().ok_or_else(|| self.wrong(k, want, v))?;
        if s <= 0.0 {
            return Err(self.wrong(k, want, v));
        }
        Duration::try_from_secs_f64(s)
            .map(Some)
            .map_err(|_| self.wrong(k, "a number of seconds that fits in a Duration", v))
    }

    pub(super) fn argv(&self, k: &str) -> Result<Vec<&'a str>, String> {
        let want = "a non-empty array of strings";
        match self.get(k) {
            None => Err(self.missing(k)),
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|x| x.as_str().ok_or_else(|| self.wrong(k, want, x)))
                .collect(),
            Some(v) => Err(self.wrong(k, want, v)),
        }
    }
}

fn command_names() -> String {
    COMMANDS
        .iter()
        .map(|(c, _)| *c)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the envelope (object, version, command, known fields).
pub(super) fn envelope(req: &Value) -> Result<Req<'_>, String> {
    let Value::Object(m) = req else {
        return Err(format!(
            "malformed request: expected a JSON object, got {}",
            type_name(req)
        ));
    };
    match m.get("v") {
        None => {
            return Err(format!(
                "missing field 'v' (the protocol version; this daemon speaks {VERSION})"
            ))
        }
        Some(v) if v.as_u64() == Some(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {} not supported (this daemon speaks {VERSION})",
                shown(v)
            ))
        }
    }
    let cmd = match m.get("cmd") {
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(format!(
                "field 'cmd' must be a string (got {} {})",
                type_name(v),
                shown(v)
            ))
        }
        None => return Err(format!("missing field 'cmd' (one of: {})", command_names())),
    };
    let Some((_, fields)) = COMMANDS.iter().find(|(c, _)| *c == cmd) else {
        return Err(format!(
            "unknown command '{cmd}' (known: {})",
            command_names()
        ));
    };
    for k in m.keys() {
        if k != "v" && k != "cmd" && !fields.contains(&k.as_str()) && !OPEN_COMMANDS.contains(&cmd)
        {
            let takes = if fields.is_empty() {
                "no fields".to_string()
            } else {
                fields.join(", ")
            };
            return Err(format!("{cmd}: unknown field '{k}' ({cmd} takes: {takes})"));
        }
    }
    Ok(Req { cmd, m })
}
