//! Volume lifecycle verbs: `create`, `load`, `reload`, `clear`, `suspend`, `resume`, `remove`,
//! and the verbs that act on a volume in place: `queue` and `message`.

use super::super::nbd::ExportEntry;
use super::suspending::suspend_unlocked;
use super::{changed, engine, es, volume_info, Daemon, Req};
use serde_json::{json, Value};
use stackbd_core::{Engine, SuspendOpts};

/// `create {name, table?}`: a new volume, with a live table unless the table is blank.
pub(super) fn create(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let table = r.opt_string("table")?.filter(|t| !blank_table(t));
    let mut e = engine(d);
    e.create(name, table).map_err(es)?;
    changed(d, &e, true);
    Ok(json!({"info": volume_info(d, &e, name)?}))
}

/// `load {name, table}` / `reload {name, table}`: loads an inactive table (`reload` swaps it in).
pub(super) fn load_or_reload(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let table = r.string("table")?;
    let mut e = engine(d);
    if r.cmd == "reload" && e.is_suspending(name) {
        // Refused before anything is loaded.
        return e.reload(name, table).map(|_| Value::Null).map_err(es);
    }
    e.load(name, table).map_err(es)?;
    if r.cmd == "reload" {
        // The drain waits without the engine lock; then the swap, with it.
        drop(e);
        let s = suspend_unlocked(d, name, SuspendOpts::default())?;
        e = s.engine;
        e.resume(name).map_err(es)?;
    }
    changed(d, &e, true);
    Ok(json!({"info": volume_info(d, &e, name)?}))
}

/// `clear {name}`: drops the volume's inactive table.
pub(super) fn clear(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let mut e = engine(d);
    e.clear(name).map_err(es)?;
    changed(d, &e, false);
    Ok(json!({"info": volume_info(d, &e, name)?}))
}

/// `suspend {name, noflush?, deadline_s?}`: drains the volume and holds its I/O until `resume`.
pub(super) fn suspend(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let noflush = r.flag("noflush")?;
    // Absent: the default deadline; null: none (wait for `resume` forever).
    let deadline = match r.m.get("deadline_s") {
        None => SuspendOpts::default().deadline,
        Some(Value::Null) => None,
        Some(_) => r.opt_secs("deadline_s")?,
    };
    let opts = SuspendOpts {
        noflush,
        deadline,
        ..SuspendOpts::default()
    };
    // The drain waits without the engine lock: other verbs go on meanwhile.
    let s = suspend_unlocked(d, name, opts)?;
    let (e, was) = (s.engine, s.already);
    changed(d, &e, false);
    let mut out = json!({"info": volume_info(d, &e, name)?, "already_suspended": was});
    if !was {
        out["deadline_s"] = json!(deadline.map(|t| t.as_secs_f64()));
    }
    Ok(out)
}

/// `resume {name}`: swaps in the inactive table (if any) and lets held I/O go.
pub(super) fn resume(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let mut e = engine(d);
    let i = e.info(name).map_err(es)?;
    if i.inactive_table && !i.suspended && i.suspending.is_none() {
        // The swap needs the volume suspended: drain without the engine lock first.
        drop(e);
        e = suspend_unlocked(d, name, SuspendOpts::default())?.engine;
    }
    e.resume(name).map_err(es)?;
    changed(d, &e, true);
    Ok(json!({"info": volume_info(d, &e, name)?}))
}

/// `remove {name, force?}`: refused while another table uses the volume or while it is exported
/// (or otherwise open) unless forced; a forced removal drops the volume's exports too. The
/// volume is suspended first with the drain outside the engine lock; if the removal is then
/// refused (something changed meanwhile), a suspend this call made is undone.
pub(super) fn remove(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let force = r.flag("force")?;
    let mut e = engine(d);
    {
        // A volume that failed at start: forget it.
        let mut p = d.pending();
        let before = p.volumes.len() + p.luks.len();
        p.volumes.retain(|(v, _)| v.name != name);
        p.luks.retain(|(l, _)| l.name != name);
        if p.volumes.len() + p.luks.len() != before {
            drop(p);
            changed(d, &e, false);
            return Ok(json!({"removed": name, "was_failed": true, "exports_removed": []}));
        }
    }
    let mut ours = false;
    if e.info(name).map_err(es)?.suspended {
        // Nothing to drain.
    } else if unexported(d, name, force).is_ok() && e.remove_check(name, force).is_ok() {
        drop(e);
        let s = suspend_unlocked(
            d,
            name,
            SuspendOpts {
                deadline: None,
                ..SuspendOpts::default()
            },
        )?;
        e = s.engine;
        ours = !s.already;
    }
    let out = remove_now(d, &mut e, name, force);
    if out.is_err() && ours {
        let _ = e.release(name);
    }
    out
}

/// Refuses to remove an exported volume unless forced; the exports otherwise.
fn unexported(d: &Daemon, name: &str, force: bool) -> Result<Vec<ExportEntry>, String> {
    let exports: Vec<ExportEntry> = d
        .exports
        .all()
        .into_iter()
        .filter(|x| x.volume == name)
        .collect();
    if !exports.is_empty() && !force {
        let names: Vec<String> = exports.iter().map(|x| format!("'{}'", x.name)).collect();
        return Err(format!(
            "'{name}' is busy: exported as {} (remove the export first, or force the removal)",
            names.join(", ")
        ));
    }
    Ok(exports)
}

/// The removal itself, with the engine locked (and the volume drained, unless the engine
/// drains it itself).
fn remove_now(d: &Daemon, e: &mut Engine, name: &str, force: bool) -> Result<Value, String> {
    e.info(name).map_err(es)?;
    let exports = unexported(d, name, force)?;
    // Drop the exports first so no new connection finds the volume; put them back if the
    // engine refuses (another table uses the volume).
    for x in &exports {
        d.exports.remove(&x.name);
    }
    if let Err(err) = e.remove(name, force) {
        for x in exports {
            d.exports.set(x);
        }
        return Err(es(err));
    }
    // Before the lock goes (and any later volume can take the freed id): connections of the
    // dropped exports stop for good.
    for x in &exports {
        x.revoke();
    }
    // A LUKS volume removed by plain `remove` is gone from the state too.
    d.luks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(name);
    changed(d, e, false);
    Ok(json!({
        "removed": name,
        "exports_removed": exports.iter().map(|x| x.name.clone()).collect::<Vec<_>>(),
    }))
}

/// `queue {name, scheduler?, nr_requests?}`: shows, or sets, the volume's request queue.
pub(super) fn queue(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let mut e = engine(d);
    let mut q = e.queue(name).map_err(es)?;
    let mut set = false;
    if let Some(sched) = r.opt_string("scheduler")? {
        q.scheduler = sched.parse().map_err(|m: String| m)?;
        set = true;
    }
    if let Some(n) = r.opt_u64("nr_requests")? {
        q.nr_requests = u32::try_from(n).unwrap_or(0);
        set = true;
    }
    if set {
        e.set_queue(name, q).map_err(es)?;
        changed(d, &e, false);
    }
    let rq = e
        .live_table(name)
        .map_err(es)?
        .is_some_and(|t| t.request_based());
    Ok(json!({
        "scheduler": q.scheduler.to_string(),
        "nr_requests": q.nr_requests,
        "request_based": rq,
    }))
}

/// `message {name, sector, argv}`: a message to the volume's target at `sector`.
pub(super) fn message(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let sector = r.opt_u64("sector")?.ok_or_else(|| r.missing("sector"))?;
    let argv = r.argv("argv")?;
    let mut e = engine(d);
    let reply = e.message(name, sector, &argv).map_err(es)?;
    // A target may change its own state on a message (not the tables).
    changed(d, &e, false);
    Ok(json!({ "reply": reply }))
}

/// A table given as blank text (or only comments) means "no table", as `dmsetup create` does
/// with an empty table.
fn blank_table(t: &str) -> bool {
    t.split(['\n', ';'])
        .all(|l| l.split('#').next().unwrap_or("").trim().is_empty())
}
