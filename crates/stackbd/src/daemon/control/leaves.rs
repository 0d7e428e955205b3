//! Leaf verbs: `leaf_add`, `leaf_rm` and `leaf_ls` (`leaf_message` has its own module).

use super::{changed, engine, es, Daemon, Req};
use serde_json::{json, Map, Value};
use stackbd_core::engine::valid_name;
use stackbd_core::{Engine, HealthState, Leaf, LeafHealth, SECTOR_SIZE};
use stackbd_leaves::registry::{self, Kind, LeafParams, ParamError};
use std::sync::{Arc, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// `leaf_add {name, kind, params?: {...}, ...}`: the kind's parameters come in `params`, or as
/// fields beside `kind` (`{"kind":"mem","size":"1GiB"}`), or both; the leaf registry reads them
/// as the config file's `[leaf.NAME]` keys. Paths must be absolute (the daemon's working
/// directory means nothing to the client). Opening the leaf may block, outside the engine lock.
pub(super) fn leaf_add(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let kind_name = r.string("kind")?;
    let kind = registry::kind(kind_name)
        .ok_or_else(|| format!("leaf '{name}': {}", registry::unknown_kind(kind_name)))?;
    let params = leaf_params(r, name, kind)?;
    // Refuse a bad or taken name before opening or allocating anything.
    if !valid_name(name) {
        return Err(es(stackbd_core::EngineError::BadName(name.to_string())));
    }
    if engine(d).dev_id(name).is_ok() {
        return Err(es(stackbd_core::EngineError::Exists(name.to_string())));
    }
    // Opening a file may block: not under the engine lock.
    let leaf = params
        .build()
        .map_err(|e| format!("leaf '{name}': cannot create {kind_name} leaf: {e}"))?;
    let mut e = engine(d);
    e.add_leaf(name, leaf).map_err(es)?;
    d.leaf_params
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(name.to_string(), params);
    // Adding a leaf that failed at start replaces it; what waited on it comes up now.
    d.pending().leaves.retain(|(l, _)| l.name != name);
    let up = d.bring_up_dependents(&mut e);
    changed(d, &e, !up.is_empty());
    let (mut v, leaf) = leaf_json(d, &e, name)?;
    drop(e);
    add_health(&mut v, &leaf.health());
    Ok(json!({ "leaf": v, "brought_up": up }))
}

/// `leaf_retry {name?}`: opens again a leaf that failed at start (every one without a name),
/// and brings up what waited on it. Blocks while leaves open (not under the engine lock).
pub(super) fn leaf_retry(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.opt_string("name")?;
    if let Some(n) = name {
        if !d.pending().leaves.iter().any(|(l, _)| l.name == n) {
            return Err(if engine(d).dev_id(n).is_ok() {
                format!("leaf '{n}' has not failed: nothing to retry")
            } else {
                format!("no failed leaf '{n}' (stackbd leaf ls lists them)")
            });
        }
    }
    let up = d.retry_pending(name);
    let still = d
        .pending()
        .leaves
        .iter()
        .filter(|(l, _)| name.is_none_or(|n| n == l.name))
        .map(|(l, why)| json!({"name": l.name, "error": why}))
        .collect::<Vec<_>>();
    Ok(json!({"brought_up": up, "still_failed": still}))
}

/// The kind's parameters of a `leaf_add`, parsed by the registry; paths must be absolute.
fn leaf_params(r: &Req<'_>, name: &str, kind: &'static Kind) -> Result<LeafParams, String> {
    let obj = param_fields(r)?;
    let table = registry::table_from_json(&obj).map_err(|e| format!("leaf '{name}': {e}"))?;
    let params = kind.parse(&table).map_err(|errs| {
        let texts: Vec<String> = errs.iter().map(|e| param_error(r.cmd, kind, e)).collect();
        format!("leaf '{name}': {}", texts.join("; "))
    })?;
    for (key, p) in params.paths() {
        if p.is_relative() {
            return Err(format!(
                "leaf '{name}': {key} '{}' is relative; the daemon needs an absolute path",
                p.display()
            ));
        }
    }
    Ok(params)
}

/// The fields of a `leaf_add` that are the kind's parameters: `params`, and those beside `kind`.
fn param_fields(r: &Req<'_>) -> Result<Map<String, Value>, String> {
    let mut obj = match r.get("params") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(v) => return Err(r.wrong("params", "an object of the kind's parameters", v)),
    };
    for (k, v) in r.m {
        if ["v", "cmd", "name", "kind", "params"].contains(&k.as_str()) || v.is_null() {
            continue;
        }
        if obj.insert(k.clone(), v.clone()).is_some() {
            return Err(format!(
                "{}: field '{k}' is given twice (in params and beside them)",
                r.cmd
            ));
        }
    }
    obj.retain(|_, v| !v.is_null());
    Ok(obj)
}

/// A registry error in the control socket's words.
fn param_error(cmd: &str, kind: &Kind, e: &ParamError) -> String {
    match e {
        ParamError::Unknown(k) => format!("{cmd}: field '{k}' does not apply ({})", kind.takes()),
        ParamError::Missing(k) => format!("{cmd}: missing field '{k}' ({})", kind.takes()),
        e => e.config_text(kind),
    }
}

/// `leaf_rm {name}`: removes a leaf no volume uses.
pub(super) fn leaf_rm(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let mut e = engine(d);
    {
        // A leaf that failed at start: forget it (what waits on it keeps waiting).
        let mut p = d.pending();
        if let Some(i) = p.leaves.iter().position(|(l, _)| l.name == name) {
            p.leaves.remove(i);
            drop(p);
            changed(d, &e, false);
            return Ok(json!({ "removed": name, "was_failed": true }));
        }
    }
    e.remove_leaf(name).map_err(es)?;
    d.leaf_params
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(name);
    changed(d, &e, false);
    Ok(json!({ "removed": name }))
}

/// `leaf_ls`: every leaf, as [`leaf_json`] shows it, with its health (asked of each leaf
/// after the engine lock is released: a file leaf's `fstat` may block).
pub(super) fn leaf_ls(d: &Daemon) -> Result<Value, String> {
    let e = engine(d);
    let leaves = e
        .ls()
        .into_iter()
        .filter(|(_, is_volume)| !is_volume)
        .map(|(n, _)| leaf_json(d, &e, &n))
        .collect::<Result<Vec<_>, _>>()?;
    drop(e);
    let mut leaves: Vec<Value> = leaves
        .into_iter()
        .map(|(mut v, leaf)| {
            add_health(&mut v, &leaf.health());
            v
        })
        .collect();
    // Leaves that failed at start, with why: kept, and retried.
    for (l, why) in &d.pending().leaves {
        leaves.push(json!({
            "name": l.name,
            "kind": l.params.kind_name(),
            "state": "failed",
            "error": why,
            "params": serde_json::to_value(l.params.table()).unwrap_or(Value::Null),
            "args": l.params.summary(),
            "used_by": [],
        }));
    }
    Ok(json!({ "leaves": leaves }))
}

/// Seconds since the Unix epoch (fractional), as the JSON says times.
fn unix_s(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A leaf's health as the JSON says it: `state` (ok, degraded, reconnecting, failed), `since`
/// (when it entered that state, Unix seconds) and `for_s` (seconds ago), `error` (why it is
/// not ok; only when it is not), `last_error` and `last_error_at` (the last error seen, even
/// after a recovery).
pub(super) fn health_fields(h: &LeafHealth) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("state".into(), json!(h.state.as_str()));
    if let Some(t) = h.since {
        m.insert("since".into(), json!(unix_s(t)));
        let ago = SystemTime::now().duration_since(t).unwrap_or_default();
        m.insert("for_s".into(), json!(ago.as_secs_f64()));
    }
    if let Some((text, at)) = &h.last_error {
        if h.state != HealthState::Ok {
            m.insert("error".into(), json!(text));
        }
        m.insert("last_error".into(), json!(text));
        m.insert("last_error_at".into(), json!(unix_s(*at)));
    }
    m
}

/// Adds [`health_fields`] to a leaf's JSON object.
fn add_health(v: &mut Value, h: &LeafHealth) {
    if let Value::Object(o) = v {
        o.extend(health_fields(h));
    }
}

/// Volumes whose live table maps onto `dev`.
fn users(e: &Engine, dev: &str) -> Vec<String> {
    e.ls()
        .into_iter()
        .filter(|(v, is_volume)| {
            *is_volume && e.deps(v).is_ok_and(|deps| deps.iter().any(|x| x == dev))
        })
        .map(|(v, _)| v)
        .collect()
}

/// A leaf as `leaf_ls` and `leaf_add` show it: `params` are the parameters it was built from
/// (what `leaf_add` takes and the state file writes), `args` the leaf's own description; and
/// the leaf, whose health the caller adds once the engine lock is released.
fn leaf_json(d: &Daemon, e: &Engine, name: &str) -> Result<(Value, Arc<dyn Leaf>), String> {
    let l = e.leaf(name).map_err(es)?;
    let params = d
        .leaf_params
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
        .map_or(Value::Null, |p| {
            serde_json::to_value(p.table()).unwrap_or(Value::Null)
        });
    let v = json!({
        "name": name,
        "kind": l.kind(),
        "sectors": l.size(),
        "bytes": l.size() * SECTOR_SIZE as u64,
        "params": params,
        "args": l.args(),
        "used_by": users(e, name),
    });
    Ok((v, l))
}
