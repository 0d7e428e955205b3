//! Queries and daemon verbs that change nothing: `ping`, `shutdown` (its reply; the caller
//! stops the daemon once it is sent), `ls`, `info`, `table`, `status`, `deps` and `wait`.

use super::{engine, es, volume_info, Daemon, Req};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `ping`: the daemon's uptime, version and pid.
pub(super) fn ping(d: &Daemon) -> Result<Value, String> {
    Ok(json!({
        "uptime_s": d.started.elapsed().as_secs_f64(),
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
    }))
}

/// `shutdown`: the reply that says the daemon stops.
pub(super) fn shutdown() -> Result<Value, String> {
    Ok(json!({"stopping": true}))
}

/// `ls {tree?}`: every device (volumes and leaves), and the stacking tree if asked.
pub(super) fn ls(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let e = engine(d);
    let devices: Vec<Value> = e
        .ls()
        .into_iter()
        .map(|(n, is_volume)| {
            let kind = if is_volume {
                "volume"
            } else {
                e.leaf(&n).map_or("?", |l| l.kind())
            };
            let sectors = e.dev_info(&n).map_or(0, |i| i.size);
            json!({"name": n, "volume": is_volume, "kind": kind, "sectors": sectors})
        })
        .collect();
    // What failed at start is listed too, with why.
    let mut devices = devices;
    let mut tree = if r.flag("tree")? {
        Some(e.tree())
    } else {
        None
    };
    {
        let p = d.pending();
        let failed = p
            .leaves
            .iter()
            .map(|(l, why)| (l.name.as_str(), false, l.params.kind_name(), why))
            .chain(
                p.luks
                    .iter()
                    .map(|(l, why)| (l.name.as_str(), true, "volume", why)),
            )
            .chain(
                p.volumes
                    .iter()
                    .map(|(v, why)| (v.name.as_str(), true, "volume", why)),
            );
        for (name, is_volume, kind, why) in failed {
            devices.push(json!({"name": name, "volume": is_volume, "kind": kind,
                "sectors": 0, "failed": why}));
            if let Some(t) = tree.as_mut() {
                t.push_str(&format!("{name} (failed at start: {why})\n"));
            }
        }
    }
    let mut out = json!({ "devices": devices });
    if let Some(t) = tree {
        out["tree"] = json!(t);
    }
    Ok(out)
}

/// `info {name}`: a volume's state, tables, size and exports.
pub(super) fn info(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let e = engine(d);
    if e.dev_id(name).is_err() {
        failed_at_start(d, name)?;
    }
    Ok(json!({"info": volume_info(d, &e, name)?}))
}

/// `table {name, inactive?}`: a volume's live (or inactive) table as text.
pub(super) fn table(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let inactive = r.flag("inactive")?;
    let showkeys = r.flag("showkeys")?;
    let e = engine(d);
    let text = e.table(name, inactive).map_err(es)?;
    // As dmsetup: crypt keys print as zeros unless asked for (key references print as is).
    let text = if showkeys {
        text
    } else {
        crate::crypttab::mask_keys(&text)
    };
    Ok(json!({"table": text, "inactive": inactive}))
}

/// `status {name}`: the status of the targets of a volume's live table.
pub(super) fn status(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let e = engine(d);
    Ok(json!({"status": e.status(name).map_err(es)?}))
}

/// `deps {name}`: the devices a volume's live table maps onto.
pub(super) fn deps(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let e = engine(d);
    Ok(json!({"deps": e.deps(name).map_err(es)?}))
}

/// `wait {name, event_nr?, timeout_s?}`: until the volume's event counter passes `event_nr`
/// (default 0, as `dmsetup wait`), polling its counter without the engine lock.
pub(super) fn wait(d: &Daemon, r: &Req<'_>, gone: &dyn Fn() -> bool) -> Result<Value, String> {
    let name = r.string("name")?;
    let after = r.opt_u64("event_nr")?.unwrap_or(0);
    let timeout = r.opt_secs("timeout_s")?;
    let events = engine(d).events(name).map_err(es)?;
    let start = Instant::now();
    let mut checked = start;
    loop {
        let nr = events.nr();
        if nr > after {
            return Ok(json!({"event_nr": nr, "timed_out": false}));
        }
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            return Ok(json!({"event_nr": nr, "timed_out": true}));
        }
        if d.stop.load(Ordering::Relaxed) {
            return Err(format!(
                "wait for an event on '{name}': the daemon is shutting down"
            ));
        }
        if checked.elapsed() >= Duration::from_millis(200) {
            checked = Instant::now();
            if gone() {
                return Err("the client went away".into());
            }
            // The volume may have been removed (and its name reused) meanwhile.
            let same = engine(d)
                .events(name)
                .is_ok_and(|now| Arc::ptr_eq(&now, &events));
            if !same {
                return Err(format!("volume '{name}' was removed while waiting"));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The error for a name that failed at start and waits to be retried; `Ok` if it did not.
fn failed_at_start(d: &Daemon, name: &str) -> Result<(), String> {
    let p = d.pending();
    let why = p
        .volumes
        .iter()
        .map(|(v, w)| (&v.name, w))
        .chain(p.luks.iter().map(|(l, w)| (&l.name, w)))
        .chain(p.leaves.iter().map(|(l, w)| (&l.name, w)))
        .find(|(n, _)| *n == name);
    match why {
        Some((_, w)) => Err(format!(
            "'{name}' failed at start: {w} (retried every {} s; `stackbd leaf retry` retries now)",
            crate::daemon::pending::RETRY_EVERY.as_secs()
        )),
        None => Ok(()),
    }
}
