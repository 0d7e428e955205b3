//! The control socket: one JSON object per line each way, versioned (`"v": 1`). Requests name a
//! command and its arguments; replies are `{"v":1,"ok":true,...}` or
//! `{"v":1,"ok":false,"error":"what, where and why"}`. The socket is created 0600 in a directory
//! that only its user (or root) can write (see [`super::trust`]); a client whose credentials
//! (`SO_PEERCRED`) are not the daemon's user or root gets one error line and is closed. At most
//! [`ControlLimits::max_conns`] connections are open at once (the longest-idle one is closed to
//! make room; a new one is refused only when all are busy), and one idle for
//! [`ControlLimits::idle_timeout`] is closed.
//!
//! ```text
//! -> {"v":1,"cmd":"create","name":"data","table":"0 2048 linear m0 0"}
//! <- {"v":1,"ok":true,"info":{"name":"data","state":"ACTIVE",...}}
//! -> {"v":1,"cmd":"info","name":"nosuch"}
//! <- {"v":1,"ok":false,"error":"device 'nosuch' does not exist"}
//! ```
//!
//! One request gets one reply, in order; a bad request (not JSON, not an object, wrong version,
//! unknown command or field, missing field, wrong type) gets an error reply and the connection
//! stays usable. [`COMMANDS`] lists the commands and the fields each takes. Commands that change
//! the daemon's state write the state file; table changes also refresh the export sizes. The
//! engine lock is held for one command at a time and never across a wait, except the drain of
//! a `suspend` (bounded by its drain timeout).

use super::nbd::ExportEntry;
use super::Daemon;
use serde_json::{json, Map, Value};
use stackbd_core::engine::{valid_name, VolumeInfo};
use stackbd_core::{Engine, SuspendOpts, SECTOR_SIZE};
use stackbd_leaves::registry::{self, Kind, ParamError};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

mod conns;
mod leaf_message;

pub use conns::ControlLimits;
use conns::{Admit, Conns, Slot};

pub const VERSION: u64 = 1;

/// The longest request line accepted; a longer one gets an error reply and the connection is
/// closed (its end cannot be found without reading it all).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// Every command and the fields it takes (besides `v` and `cmd`). Fields not listed are refused,
/// so a misspelt option is an error, not a silent default.
pub const COMMANDS: &[(&str, &[&str])] = &[
    ("create", &["name", "table"]),
    ("load", &["name", "table"]),
    ("clear", &["name"]),
    ("suspend", &["name", "noflush", "deadline_s"]),
    ("resume", &["name"]),
    ("reload", &["name", "table"]),
    ("remove", &["name", "force"]),
    ("ls", &["tree"]),
    ("info", &["name"]),
    ("table", &["name", "inactive"]),
    ("status", &["name"]),
    ("queue", &["name", "scheduler", "nr_requests"]),
    ("message", &["name", "sector", "argv"]),
    ("deps", &["name"]),
    ("wait", &["name", "event_nr", "timeout_s"]),
    // Besides these, leaf_add takes the kind's parameters as fields (see [`OPEN_COMMANDS`]).
    ("leaf_add", &["name", "kind", "params"]),
    ("leaf_rm", &["name"]),
    ("leaf_ls", &[]),
    ("leaf_message", &["name", "argv"]),
    ("export_add", &["volume", "name", "read_only"]),
    ("export_rm", &["name"]),
    ("export_ls", &[]),
    ("stats", &["name"]),
    (
        "copy_start",
        &["name", "src", "dst", "len", "emulate", "piece", "inflight"],
    ),
    ("copy_status", &["id"]),
    ("copy_cancel", &["id"]),
    ("ping", &[]),
    ("shutdown", &[]),
];

/// Commands that check their other fields themselves: `leaf_add` hands them to the leaf
/// registry as the kind's parameters (which refuses any the kind does not take).
const OPEN_COMMANDS: &[&str] = &["leaf_add"];

/// Stops the control thread when dropped.
pub struct ControlServer {
    join: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

pub fn spawn(d: Arc<Daemon>, path: &Path, limits: ControlLimits) -> Result<ControlServer, String> {
    super::trust::prepare_dir(path)?;
    if super::control_alive(path) {
        return Err(format!(
            "another daemon answers on control socket {}",
            path.display()
        ));
    }
    let l =
        super::trust::bind_unix(path, 0o600, None).map_err(|e| format!("control socket: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let conns = Conns::default();
    // Times the cap was hit, so a flood logs one line per power of two, not one per connection.
    let mut hits = 0u64;
    let join = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            while !d.stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => accept(&d, s, &conns, limits, &mut hits),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(ControlServer { join: Some(join) })
}

/// Sends one error line to a connection that is refused, and closes it.
fn refuse(s: &UnixStream, why: String) {
    let _ = s.set_nonblocking(true);
    let mut w: &UnixStream = s;
    let _ = writeln!(w, "{}", reply_line(Err(why)));
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// Checks a new connection (who it is, whether there is room) and gives it a thread.
fn accept(d: &Arc<Daemon>, s: UnixStream, conns: &Conns, limits: ControlLimits, hits: &mut u64) {
    match super::trust::peer_uid(&s) {
        Ok(uid) if super::trust::trusted_uid(uid) => {}
        Ok(uid) => {
            tracing::warn!(
                uid,
                "control connection refused: not the daemon's user or root"
            );
            eprintln!("stackbd: control connection from uid {uid} refused");
            return refuse(
                &s,
                format!(
                    "permission denied: this daemon runs as uid {} and takes requests only \
                     from that user or root, not from uid {uid}",
                    super::trust::my_uid()
                ),
            );
        }
        Err(e) => return refuse(&s, format!("cannot check who is connecting: {e}")),
    }
    let slot = match conns.admit(&s, limits.max_conns) {
        (Admit::Yes(slot), evicted) => {
            if let Some(idle) = evicted.filter(|_| log_hit(hits)) {
                tracing::warn!(
                    max = limits.max_conns,
                    "control connection cap reached; closed the longest-idle connection"
                );
                eprintln!(
                    "stackbd: control connection cap ({}) reached: closed the connection idle \
                     longest ({:.1} s; {} times so far)",
                    limits.max_conns,
                    idle.as_secs_f64(),
                    hits
                );
            }
            slot
        }
        (Admit::Full, _) => {
            if log_hit(hits) {
                tracing::warn!(
                    max = limits.max_conns,
                    "control connection cap reached; all busy, refused"
                );
                eprintln!(
                    "stackbd: control connection cap ({}) reached with every connection busy: \
                     refused one ({} times so far)",
                    limits.max_conns, hits
                );
            }
            return refuse(
                &s,
                format!(
                    "too many control connections: all {} are busy with requests; try again \
                     later",
                    limits.max_conns
                ),
            );
        }
    };
    let d = d.clone();
    // One thread per control client (at most `max_conns`): the control path may block
    // (suspend, wait); the data path never goes through here.
    let _ = std::thread::Builder::new()
        .name("control-client".into())
        .spawn(move || client(&d, s, &slot, limits.idle_timeout));
}

/// Counts one more time the cap was hit; true if this one is worth a log line (the 1st, 2nd,
/// 4th, 8th, ...).
fn log_hit(hits: &mut u64) -> bool {
    *hits += 1;
    hits.is_power_of_two()
}

/// Serves one control connection until it closes, goes idle for `idle` or is evicted.
fn client(d: &Daemon, s: UnixStream, slot: &Slot, idle: Duration) {
    let _ = s.set_nonblocking(false);
    // An idle client is dropped; so is one that stops reading its replies.
    let _ = s.set_read_timeout(Some(idle));
    let _ = s.set_write_timeout(Some(idle));
    let (Ok(w), Ok(probe)) = (s.try_clone(), s.try_clone()) else {
        return;
    };
    let mut w = std::io::BufWriter::new(w);
    let mut r = BufReader::new(s);
    let mut line = Vec::new();
    loop {
        line.clear();
        slot.idle();
        match (&mut r)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !slot.busy() {
            // Evicted while the request arrived: its socket is shut; do not run it.
            return;
        }
        if line.len() > MAX_REQUEST_BYTES && line.last() != Some(&b'\n') {
            let out = reply_line(Err(format!(
                "request longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
            )));
            let _ = writeln!(w, "{out}").and_then(|_| w.flush());
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (reply, shutdown) = respond(d, &line, &|| peer_gone(&probe));
        if writeln!(w, "{reply}").and_then(|_| w.flush()).is_err() {
            return;
        }
        if shutdown {
            // Only after the reply is out: the daemon may exit soon after.
            d.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// True once the client closed its end (checked during long waits, so a client that gave up
/// does not leave a thread waiting for it).
fn peer_gone(s: &UnixStream) -> bool {
    let fd = s.as_fd();
    let mut pfd = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::empty(),
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut pfd, Some(&zero)) {
        Ok(n) if n > 0 => pfd[0].revents().intersects(
            rustix::event::PollFlags::HUP
                | rustix::event::PollFlags::ERR
                | rustix::event::PollFlags::NVAL,
        ),
        _ => false,
    }
}

/// The reply line: `{"v":1,"ok":true,...fields}` or `{"v":1,"ok":false,"error":"..."}`, with
/// `v` and `ok` first so a person reading the socket sees them first.
pub fn reply_line(reply: Result<Value, String>) -> String {
    let (ok, body) = match reply {
        Ok(Value::Object(m)) => (true, m),
        Ok(v) => (true, Map::from_iter([("result".to_string(), v)])),
        Err(e) => (false, Map::from_iter([("error".to_string(), json!(e))])),
    };
    let mut out = format!("{{\"v\":{VERSION},\"ok\":{ok}");
    for (k, v) in body {
        if k == "v" || k == "ok" {
            continue;
        }
        out.push(',');
        out.push_str(&Value::String(k).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out.push('}');
    out
}

/// Parses and runs one request line; returns the reply line, and whether the daemon should
/// stop once it has been sent.
pub fn respond(d: &Daemon, line: &[u8], gone: &dyn Fn() -> bool) -> (String, bool) {
    let parsed = std::str::from_utf8(line)
        .map_err(|e| format!("malformed request (not UTF-8): {e}"))
        .and_then(|s| {
            serde_json::from_str::<Value>(s)
                .map_err(|e| format!("malformed request (not JSON): {e}"))
        });
    let mut shutdown = false;
    let reply = parsed.and_then(|req| {
        let r = handle_with(d, &req, gone);
        shutdown = r.is_ok() && req.get("cmd").and_then(Value::as_str) == Some("shutdown");
        r
    });
    (reply_line(reply), shutdown)
}

/// Runs one request (a parsed JSON value); the reply's fields without `v` and `ok`.
pub fn handle(d: &Daemon, req: &Value) -> Result<Value, String> {
    handle_with(d, req, &|| false)
}

fn type_name(v: &Value) -> &'static str {
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
struct Req<'a> {
    cmd: &'a str,
    m: &'a Map<String, Value>,
}

impl<'a> Req<'a> {
    /// A field; `null` counts as absent.
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.m.get(k).filter(|v| !v.is_null())
    }

    fn wrong(&self, k: &str, want: &str, got: &Value) -> String {
        format!(
            "{}: field '{k}' must be {want} (got {} {})",
            self.cmd,
            type_name(got),
            shown(got)
        )
    }

    fn missing(&self, k: &str) -> String {
        format!("{}: missing field '{k}'", self.cmd)
    }

    fn string(&self, k: &str) -> Result<&'a str, String> {
        self.opt_string(k)?.ok_or_else(|| self.missing(k))
    }

    fn opt_string(&self, k: &str) -> Result<Option<&'a str>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(k, "a string", v)),
        }
    }

    fn flag(&self, k: &str) -> Result<bool, String> {
        match self.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong(k, "true or false", v)),
        }
    }

    fn opt_u64(&self, k: &str) -> Result<Option<u64>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(k, "a whole number >= 0", v)),
        }
    }

    /// Seconds, as a positive number (fractions allowed).
    fn opt_secs(&self, k: &str) -> Result<Option<Duration>, String> {
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

    fn argv(&self, k: &str) -> Result<Vec<&'a str>, String> {
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

fn engine(d: &Daemon) -> MutexGuard<'_, Engine> {
    // A panic in another control thread must not take the control plane down with it.
    d.engine.lock().unwrap_or_else(PoisonError::into_inner)
}

fn es(e: stackbd_core::EngineError) -> String {
    e.to_string()
}

fn command_names() -> String {
    COMMANDS
        .iter()
        .map(|(c, _)| *c)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the envelope (object, version, command, known fields).
fn envelope(req: &Value) -> Result<Req<'_>, String> {
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

/// Names of the exports of `volume`.
fn exports_of(d: &Daemon, volume: &str) -> Vec<String> {
    d.exports
        .all()
        .into_iter()
        .filter(|x| x.volume == volume)
        .map(|x| x.name)
        .collect()
}

/// `info` as JSON; the same object is part of the replies of the table lifecycle commands.
pub fn info_json(i: &VolumeInfo, exports: Vec<String>) -> Value {
    json!({
        "name": i.name,
        "dev": i.dev.0,
        "state": if i.suspended { "SUSPENDED" } else { "ACTIVE" },
        "suspended": i.suspended,
        "live_table": i.live_table,
        "inactive_table": i.inactive_table,
        "open_count": i.open_count,
        "event_nr": i.event_nr,
        "sectors": i.size,
        "bytes": i.size * SECTOR_SIZE as u64,
        "targets": i.targets,
        "exports": exports,
    })
}

fn volume_info(d: &Daemon, e: &Engine, name: &str) -> Result<Value, String> {
    let i = e.info(name).map_err(es)?;
    Ok(info_json(&i, exports_of(d, name)))
}

fn export_json(x: &ExportEntry) -> Value {
    json!({"name": x.name, "volume": x.volume, "read_only": x.read_only, "bytes": x.size_bytes})
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
/// (what `leaf_add` takes and the state file writes), `args` the leaf's own description.
fn leaf_json(d: &Daemon, e: &Engine, name: &str) -> Result<Value, String> {
    let l = e.leaf(name).map_err(es)?;
    let params = d
        .leaf_params
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
        .map_or(Value::Null, |p| {
            serde_json::to_value(p.table()).unwrap_or(Value::Null)
        });
    Ok(json!({
        "name": name,
        "kind": l.kind(),
        "sectors": l.size(),
        "bytes": l.size() * SECTOR_SIZE as u64,
        "params": params,
        "args": l.args(),
        "used_by": users(e, name),
    }))
}

/// A table given as blank text (or only comments) means "no table", as `dmsetup create` does
/// with an empty table.
fn blank_table(t: &str) -> bool {
    t.split(['\n', ';'])
        .all(|l| l.split('#').next().unwrap_or("").trim().is_empty())
}

/// After a change: state file, and export sizes when tables may have changed.
fn changed(d: &Daemon, e: &Engine, tables: bool) {
    if tables {
        d.refresh_exports(e);
    }
    d.save(e);
}

fn handle_with(d: &Daemon, req: &Value, gone: &dyn Fn() -> bool) -> Result<Value, String> {
    let r = envelope(req)?;
    match r.cmd {
        "ping" => Ok(json!({
            "uptime_s": d.started.elapsed().as_secs_f64(),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
        })),
        "shutdown" => Ok(json!({"stopping": true})),
        "copy_start" => {
            let name = r.string("name")?;
            let need = |k: &str| r.opt_u64(k)?.ok_or_else(|| r.missing(k));
            let (src, dst, len) = (need("src")?, need("dst")?, need("len")?);
            let e = engine(d);
            let info = e.info(name).map_err(es)?;
            if src.checked_add(len).is_none_or(|x| x > info.size)
                || dst.checked_add(len).is_none_or(|x| x > info.size)
            {
                return Err(format!(
                    "copy_start: volume '{name}': range {src}+{len} -> {dst}+{len} passes the end ({} sectors); nothing copied",
                    info.size
                ));
            }
            let defaults = stackbd_core::copy::CopyOpts::default();
            let opts = stackbd_core::copy::CopyOpts {
                piece_sectors: r.opt_u64("piece")?.map_or(defaults.piece_sectors, |p| {
                    p.clamp(1, u32::MAX as u64) as u32
                }),
                max_inflight: r
                    .opt_u64("inflight")?
                    .map_or(defaults.max_inflight, |n| n.clamp(1, 1024) as usize),
                emulate: r.flag("emulate")?,
            };
            drop(e);
            let id = d.start_copy(info.dev, src, dst, len, opts);
            Ok(json!({"id": id, "total_sectors": len}))
        }
        "copy_status" | "copy_cancel" => {
            let id = r.opt_u64("id")?.ok_or_else(|| r.missing("id"))?;
            let (p, started) = d
                .copy_job(id)
                .ok_or_else(|| format!("{}: no copy job {id}", r.cmd))?;
            if r.cmd == "copy_cancel" {
                p.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let finished = p.finished.load(std::sync::atomic::Ordering::Acquire);
            let status =
                stackbd_core::Status::from_u8(p.status.load(std::sync::atomic::Ordering::Relaxed));
            Ok(json!({
                "id": id,
                "done_sectors": p.done_sectors.load(std::sync::atomic::Ordering::Relaxed),
                "total_sectors": p.total_sectors.load(std::sync::atomic::Ordering::Relaxed),
                "finished": finished,
                "status": if finished { status.to_string() } else { "running".into() },
                "seconds": started.elapsed().as_secs_f64(),
            }))
        }
        "create" => {
            let name = r.string("name")?;
            let table = r.opt_string("table")?.filter(|t| !blank_table(t));
            let mut e = engine(d);
            e.create(name, table).map_err(es)?;
            changed(d, &e, true);
            Ok(json!({"info": volume_info(d, &e, name)?}))
        }
        "load" | "reload" => {
            let name = r.string("name")?;
            let table = r.string("table")?;
            let mut e = engine(d);
            if r.cmd == "load" {
                e.load(name, table).map_err(es)?;
            } else {
                e.reload(name, table).map_err(es)?;
            }
            changed(d, &e, true);
            Ok(json!({"info": volume_info(d, &e, name)?}))
        }
        "clear" => {
            let name = r.string("name")?;
            let mut e = engine(d);
            e.clear(name).map_err(es)?;
            changed(d, &e, false);
            Ok(json!({"info": volume_info(d, &e, name)?}))
        }
        "suspend" => {
            let name = r.string("name")?;
            let noflush = r.flag("noflush")?;
            // Absent: the default deadline; null: none (wait for `resume` forever).
            let deadline = match r.m.get("deadline_s") {
                None => SuspendOpts::default().deadline,
                Some(Value::Null) => None,
                Some(_) => r.opt_secs("deadline_s")?,
            };
            let mut e = engine(d);
            let was = e.info(name).map_err(es)?.suspended;
            // The one command that holds the lock while it waits: the drain is bounded by the
            // drain timeout, and nothing may change the volume meanwhile.
            e.suspend(
                name,
                SuspendOpts {
                    noflush,
                    deadline,
                    ..SuspendOpts::default()
                },
            )
            .map_err(es)?;
            changed(d, &e, false);
            let mut out = json!({"info": volume_info(d, &e, name)?, "already_suspended": was});
            if !was {
                out["deadline_s"] = json!(deadline.map(|t| t.as_secs_f64()));
            }
            Ok(out)
        }
        "resume" => {
            let name = r.string("name")?;
            let mut e = engine(d);
            e.resume(name).map_err(es)?;
            changed(d, &e, true);
            Ok(json!({"info": volume_info(d, &e, name)?}))
        }
        "remove" => remove(d, &r),
        "ls" => {
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
            let mut out = json!({ "devices": devices });
            if r.flag("tree")? {
                out["tree"] = json!(e.tree());
            }
            Ok(out)
        }
        "info" => {
            let name = r.string("name")?;
            let e = engine(d);
            Ok(json!({"info": volume_info(d, &e, name)?}))
        }
        "table" => {
            let name = r.string("name")?;
            let inactive = r.flag("inactive")?;
            let e = engine(d);
            Ok(json!({"table": e.table(name, inactive).map_err(es)?, "inactive": inactive}))
        }
        "status" => {
            let name = r.string("name")?;
            let e = engine(d);
            Ok(json!({"status": e.status(name).map_err(es)?}))
        }
        "queue" => {
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
        "message" => {
            let name = r.string("name")?;
            let sector = r.opt_u64("sector")?.ok_or_else(|| r.missing("sector"))?;
            let argv = r.argv("argv")?;
            let mut e = engine(d);
            let reply = e.message(name, sector, &argv).map_err(es)?;
            // A target may change its own state on a message (not the tables).
            changed(d, &e, false);
            Ok(json!({ "reply": reply }))
        }
        "deps" => {
            let name = r.string("name")?;
            let e = engine(d);
            Ok(json!({"deps": e.deps(name).map_err(es)?}))
        }
        "wait" => wait(d, &r, gone),
        "leaf_add" => leaf_add(d, &r),
        "leaf_message" => leaf_message::leaf_message(d, &r),
        "leaf_rm" => {
            let name = r.string("name")?;
            let mut e = engine(d);
            e.remove_leaf(name).map_err(es)?;
            d.leaf_params
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(name);
            changed(d, &e, false);
            Ok(json!({ "removed": name }))
        }
        "leaf_ls" => {
            let e = engine(d);
            let leaves = e
                .ls()
                .into_iter()
                .filter(|(_, is_volume)| !is_volume)
                .map(|(n, _)| leaf_json(d, &e, &n))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(json!({ "leaves": leaves }))
        }
        "export_add" => {
            let volume = r.string("volume")?;
            let name = r.opt_string("name")?.unwrap_or(volume);
            let read_only = r.flag("read_only")?;
            if !valid_name(name) {
                return Err(format!(
                    "'{name}' is not a valid export name (letters, digits, '_', '-', '.'; \
                     starts with a letter)"
                ));
            }
            let mut e = engine(d);
            d.add_export(&mut e, name, volume, read_only)?;
            changed(d, &e, false);
            let x = d
                .exports
                .get(name)
                .ok_or_else(|| format!("export '{name}' vanished"))?;
            Ok(json!({"export": export_json(&x)}))
        }
        "export_rm" => {
            let name = r.string("name")?;
            let mut e = engine(d);
            let x = d
                .exports
                .remove(name)
                .ok_or_else(|| format!("export '{name}' does not exist"))?;
            // Its connections close; the export held the volume open.
            x.revoke();
            e.close(x.dev);
            changed(d, &e, false);
            Ok(json!({"removed": name, "volume": x.volume}))
        }
        "export_ls" => {
            Ok(json!({"exports": d.exports.all().iter().map(export_json).collect::<Vec<_>>()}))
        }
        "stats" => stats(d, &r),
        other => Err(format!("command '{other}' is listed but not handled")),
    }
}

/// `remove {name, force?}`: refused while another table uses the volume or while it is exported
/// (or otherwise open) unless forced; a forced removal drops the volume's exports too.
fn remove(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let force = r.flag("force")?;
    let mut e = engine(d);
    e.info(name).map_err(es)?;
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
    changed(d, &e, false);
    Ok(json!({
        "removed": name,
        "exports_removed": exports.iter().map(|x| x.name.clone()).collect::<Vec<_>>(),
    }))
}

/// `wait {name, event_nr?, timeout_s?}`: until the volume's event counter passes `event_nr`
/// (default 0, as `dmsetup wait`), polling its counter without the engine lock.
fn wait(d: &Daemon, r: &Req<'_>, gone: &dyn Fn() -> bool) -> Result<Value, String> {
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

/// `leaf_add {name, kind, params?: {...}, ...}`: the kind's parameters come in `params`, or as
/// fields beside `kind` (`{"kind":"mem","size":"1GiB"}`), or both; the leaf registry reads them
/// as the config file's `[leaf.NAME]` keys. Paths must be absolute (the daemon's working
/// directory means nothing to the client). Opening the leaf may block, outside the engine lock.
fn leaf_add(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let kind_name = r.string("kind")?;
    let kind = registry::kind(kind_name)
        .ok_or_else(|| format!("leaf '{name}': {}", registry::unknown_kind(kind_name)))?;
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
    changed(d, &e, false);
    Ok(json!({"leaf": leaf_json(d, &e, name)?}))
}

/// A registry error in the control socket's words.
fn param_error(cmd: &str, kind: &Kind, e: &ParamError) -> String {
    match e {
        ParamError::Unknown(k) => format!("{cmd}: field '{k}' does not apply ({})", kind.takes()),
        ParamError::Missing(k) => format!("{cmd}: missing field '{k}' ({})", kind.takes()),
        e => e.config_text(kind),
    }
}

/// `stats {name?}`: reactor counters, exports and volumes (only those named `name`, if given).
fn stats(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let only = r.opt_string("name")?;
    let e = engine(d);
    let mut reactors = Vec::new();
    let mut totals = Map::new();
    if let Some(t) = e.threads() {
        let threads = t.thread_stats();
        for (i, ts) in threads.iter().enumerate() {
            let counters = t.run_on(i, |r| {
                let p = r.pool();
                (
                    r.stats,
                    p.stats,
                    p.in_use(),
                    p.capacity(),
                    p.frame_bytes(),
                    r.fallback().overflows,
                )
            });
            let mut o = json!({
                "id": i,
                "loops": ts.loops,
                "sleeps": ts.sleeps,
                "frontends": ts.frontends,
            });
            if let Some((s, p, in_use, capacity, frame_bytes, overflows)) = counters {
                let more = json!({
                    "submitted": s.submitted,
                    "completed": s.completed,
                    "refused": s.refused,
                    "splits": s.splits,
                    "held": s.held,
                    "pushed_back": s.pushed_back,
                    "pool_allocs": p.allocs,
                    "pool_exhausted": p.exhausted,
                    "pool_grown": p.grown,
                    "pool_resized": p.resized,
                    "pool_notifications": p.notifications,
                    "pool_in_use": in_use,
                    "pool_capacity": capacity,
                    "frame_bytes": frame_bytes,
                    "frame_overflows": overflows,
                    "copy_offloaded_bytes": s.copy_offloaded_bytes,
                    "copy_kernel_bytes": s.copy_kernel_bytes,
                    "copy_emulated_bytes": s.copy_emulated_bytes,
                    "requeued": s.requeued,
                    "leaf_ios": s.leaf_ios,
                    "rq_bios": s.rq_bios,
                    "rq_requests": s.rq_requests,
                    "rq_merges": s.rq_merges,
                });
                if let (Value::Object(o), Value::Object(more)) = (&mut o, more) {
                    o.extend(more);
                }
            }
            if let Value::Object(m) = &o {
                for (k, v) in m {
                    if k == "id" || k == "frame_bytes" || k == "pool_capacity" {
                        continue;
                    }
                    if let Some(n) = v.as_u64() {
                        let sum = totals.get(k).and_then(Value::as_u64).unwrap_or(0) + n;
                        totals.insert(k.clone(), json!(sum));
                    }
                }
            }
            reactors.push(o);
        }
    }
    let exports: Vec<Value> = d
        .exports
        .all()
        .iter()
        .filter(|x| only.is_none_or(|n| n == x.name || n == x.volume))
        .map(export_json)
        .collect();
    let volumes = e
        .ls()
        .into_iter()
        .filter(|(n, is_volume)| *is_volume && only.is_none_or(|o| o == n))
        .map(|(n, _)| volume_info(d, &e, &n))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(n) = only {
        if exports.is_empty() && volumes.is_empty() {
            return Err(match e.dev_id(n) {
                Ok(_) => format!("'{n}': is a leaf; stats covers volumes and exports"),
                Err(_) => format!("no volume or export named '{n}'"),
            });
        }
    }
    Ok(json!({
        "uptime_s": d.started.elapsed().as_secs_f64(),
        "reactors": reactors,
        "totals": totals,
        "exports": exports,
        "volumes": volumes,
    }))
}

/// A connection to the control socket, for the CLI and tests.
pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        Client::from_stream(UnixStream::connect(path)?)
    }

    /// Connects after checking the socket's directory, the socket and the daemon's credentials
    /// ([`super::trust::connect_trusted`]); every refusal says why.
    pub fn connect_trusted(path: &Path) -> Result<Client, String> {
        let s = super::trust::connect_trusted(path)?;
        Client::from_stream(s).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_stream(s: UnixStream) -> std::io::Result<Client> {
        Ok(Client {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }

    /// Sends `{"v":1,"cmd":cmd,...args}` and returns the reply object as it came (check `ok`).
    pub fn call(&mut self, cmd: &str, args: Value) -> std::io::Result<Value> {
        Ok(self.call_raw(cmd, args)?.1)
    }

    /// As [`Client::call`], with the reply line exactly as the daemon sent it.
    pub fn call_raw(&mut self, cmd: &str, args: Value) -> std::io::Result<(String, Value)> {
        let mut req = match args {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        req.insert("v".into(), json!(VERSION));
        req.insert("cmd".into(), json!(cmd));
        self.exchange(&Value::Object(req).to_string())
    }

    /// Sends one raw line (a newline is added) and reads one reply line.
    pub fn send_line(&mut self, line: &str) -> std::io::Result<Value> {
        Ok(self.exchange(line)?.1)
    }

    fn exchange(&mut self, line: &str) -> std::io::Result<(String, Value)> {
        let mut buf = line.as_bytes().to_vec();
        buf.push(b'\n');
        let sent = self.w.write_all(&buf).and_then(|()| self.w.flush());
        let mut reply = String::new();
        // A daemon that refuses a connection (another user, too many connections) says why in
        // one line and closes at once, perhaps before the request is written: read that line.
        let got = self.r.read_line(&mut reply);
        if let Err(e) = sent {
            if reply.trim().is_empty() {
                return Err(e);
            }
        }
        if got? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without replying",
            ));
        }
        let v = serde_json::from_str(&reply).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("malformed reply from the daemon: {e}"),
            )
        })?;
        Ok((reply.trim_end().to_string(), v))
    }

    /// Waits until the daemon closes the connection (after `shutdown`); false on timeout.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let _ = self.r.get_ref().set_read_timeout(Some(timeout));
        let mut rest = Vec::new();
        self.r.read_to_end(&mut rest).is_ok()
    }
}
