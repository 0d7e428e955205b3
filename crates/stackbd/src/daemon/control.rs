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
//! engine lock is held for one command at a time and never across a wait: a suspend's drain
//! (also the one `resume`, `reload` and `remove` start) waits without it (see `suspending`),
//! and `info` shows such a volume as `SUSPENDING`.
//!
//! [`handle`] checks a request's envelope (`request`) and hands it to its verb's handler:
//! volume lifecycle verbs in `volume`, queries in `query`, leaves in `leaves` and
//! `leaf_message`, exports in `exports`, counters and copy jobs in `stats`. The client end
//! is [`Client`].

use super::Daemon;
use serde_json::{json, Map, Value};
use stackbd_core::engine::VolumeInfo;
use stackbd_core::{Engine, SECTOR_SIZE};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::Duration;

mod client;
mod conns;
mod exports;
mod leaf_message;
mod leaves;
mod luks;
mod query;
mod request;
mod stats;
mod suspending;
mod volume;

pub use client::Client;
pub use conns::ControlLimits;
use conns::{Admit, Conns, Slot};
use request::{envelope, Req};

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
    ("table", &["name", "inactive", "showkeys"]),
    ("status", &["name"]),
    ("queue", &["name", "scheduler", "nr_requests"]),
    ("message", &["name", "sector", "argv"]),
    ("deps", &["name"]),
    ("wait", &["name", "event_nr", "timeout_s"]),
    // Besides these, leaf_add takes the kind's parameters as fields (see [`OPEN_COMMANDS`]).
    ("leaf_add", &["name", "kind", "params"]),
    ("leaf_rm", &["name"]),
    ("leaf_retry", &["name"]),
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
    (
        "luks_open",
        &[
            "name",
            "device",
            "path",
            "key_file",
            "passphrase_file",
            "key_slot",
            "allow_discards",
        ],
    ),
    ("luks_close", &["name"]),
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

/// The engine, locked.
fn engine(d: &Daemon) -> MutexGuard<'_, Engine> {
    // A panic in another control thread must not take the control plane down with it.
    d.engine.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An engine error as the reply's text.
fn es(e: stackbd_core::EngineError) -> String {
    e.to_string()
}

/// `info` as JSON; the same object is part of the replies of the table lifecycle commands.
/// A suspending volume also has `suspending_since` (Unix seconds) and `suspending_for_s`; a
/// suspended one `suspend_deadline_s`, the seconds left before it resumes by itself (null: no
/// deadline).
pub fn info_json(i: &VolumeInfo, exports: Vec<String>) -> Value {
    let state = match (i.suspended, &i.suspending) {
        (true, _) => "SUSPENDED",
        (false, Some(_)) => "SUSPENDING",
        (false, None) => "ACTIVE",
    };
    let mut out = json!({
        "name": i.name,
        "dev": i.dev.0,
        "state": state,
        "suspended": i.suspended,
        "live_table": i.live_table,
        "inactive_table": i.inactive_table,
        "open_count": i.open_count,
        "event_nr": i.event_nr,
        "sectors": i.size,
        "bytes": i.size * SECTOR_SIZE as u64,
        "targets": i.targets,
        "exports": exports,
    });
    if let Some(running) = i.suspending {
        let since = std::time::SystemTime::now()
            .checked_sub(running)
            .unwrap_or(std::time::UNIX_EPOCH);
        let unix = since
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        out["suspending_since"] = json!(unix);
        out["suspending_for_s"] = json!(running.as_secs_f64());
    }
    if i.suspended {
        out["suspend_deadline_s"] = json!(i.suspend_deadline.map(|d| d.as_secs_f64()));
    }
    out
}

/// A volume's `info` object, with its exports.
fn volume_info(d: &Daemon, e: &Engine, name: &str) -> Result<Value, String> {
    let i = e.info(name).map_err(es)?;
    Ok(info_json(&i, exports::exports_of(d, name)))
}

/// After a change: state file, and export sizes when tables may have changed.
fn changed(d: &Daemon, e: &Engine, tables: bool) {
    if tables {
        d.refresh_exports(e);
    }
    d.save(e);
}

/// Runs one request: checks its envelope and hands it to its verb's handler.
fn handle_with(d: &Daemon, req: &Value, gone: &dyn Fn() -> bool) -> Result<Value, String> {
    let r = envelope(req)?;
    match r.cmd {
        "ping" => query::ping(d),
        "shutdown" => query::shutdown(),
        "copy_start" => stats::copy_start(d, &r),
        "copy_status" | "copy_cancel" => stats::copy_status(d, &r),
        "create" => volume::create(d, &r),
        "load" | "reload" => volume::load_or_reload(d, &r),
        "clear" => volume::clear(d, &r),
        "suspend" => volume::suspend(d, &r),
        "resume" => volume::resume(d, &r),
        "remove" => volume::remove(d, &r),
        "ls" => query::ls(d, &r),
        "info" => query::info(d, &r),
        "table" => query::table(d, &r),
        "status" => query::status(d, &r),
        "queue" => volume::queue(d, &r),
        "message" => volume::message(d, &r),
        "deps" => query::deps(d, &r),
        "wait" => query::wait(d, &r, gone),
        "leaf_add" => leaves::leaf_add(d, &r),
        "leaf_message" => leaf_message::leaf_message(d, &r),
        "leaf_rm" => leaves::leaf_rm(d, &r),
        "leaf_retry" => leaves::leaf_retry(d, &r),
        "leaf_ls" => leaves::leaf_ls(d),
        "export_add" => exports::export_add(d, &r),
        "export_rm" => exports::export_rm(d, &r),
        "export_ls" => exports::export_ls(d),
        "stats" => stats::stats(d, &r),
        "luks_open" => luks::luks_open(d, &r),
        "luks_close" => luks::luks_close(d, &r),
        other => Err(format!("command '{other}' is listed but not handled")),
    }
}
