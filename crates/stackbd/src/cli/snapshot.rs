//! `stackbd snapshot create|merge|rm`: LVM's snapshot steps as a short sequence of control
//! requests, each undone if a later one fails:
//!
//! - `create ORIGIN NAME --cow DEV [--chunk 8KiB]`: the first snapshot moves ORIGIN's table to
//!   a new volume `ORIGIN-real` and re-tables ORIGIN as `snapshot-origin ORIGIN-real` (with
//!   ORIGIN suspended meanwhile); every snapshot is `snapshot ORIGIN-real DEV P CHUNK`, loaded
//!   while ORIGIN is suspended, as dm requires.
//! - `merge NAME`: removes the snapshot volume, re-tables ORIGIN as `snapshot-merge`, follows
//!   the merge in `status` (a progress bar on a terminal) and, once done, gives ORIGIN back the
//!   `-real` volume's table and removes `-real`.
//! - `rm NAME`: removes the snapshot; after the last one ORIGIN gets its own table back.
//!
//! Runs on the CLI's thread; every request blocks on the daemon's reply.

use super::Conn;
use clap::Subcommand;
use serde_json::{json, Value};
use stackbd::daemon::control::Client;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The `stackbd snapshot` verbs; see the module docs.
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot volume ORIGIN as NAME, its changed chunks kept on the COW device.
    Create {
        origin: String,
        name: String,
        /// The COW device (a leaf or a volume); its first chunk gets dm's header.
        #[arg(long, value_name = "DEVICE")]
        cow: String,
        /// Chunk size: a power of two from 4KiB (bytes, or with K/KiB/M/MiB).
        #[arg(long, value_name = "SIZE", default_value = "8KiB")]
        chunk: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Merge snapshot NAME back into its origin (waits for the merge; the snapshot goes away).
    Merge {
        name: String,
        /// Give up waiting after SECS seconds (the merge goes on in the daemon).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove snapshot NAME (after the last snapshot the origin gets its own table back).
    Rm {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

impl SnapshotCmd {
    /// The verb as typed, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            SnapshotCmd::Create { .. } => "snapshot create",
            SnapshotCmd::Merge { .. } => "snapshot merge",
            SnapshotCmd::Rm { .. } => "snapshot rm",
        }
    }

    /// How to reach the daemon and how to print.
    pub fn conn(&self) -> &Conn {
        match self {
            SnapshotCmd::Create { conn, .. }
            | SnapshotCmd::Merge { conn, .. }
            | SnapshotCmd::Rm { conn, .. } => conn,
        }
    }
}

/// Where the verbs send their requests: the daemon, or an engine in tests.
pub trait Control {
    /// One request; `Err` carries the daemon's refusal.
    fn call(&mut self, cmd: &str, args: Value) -> Result<Value, String>;
}

impl Control for Client {
    fn call(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let r = Client::call(self, cmd, args).map_err(|e| format!("lost the daemon: {e}"))?;
        if r.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(r)
        } else {
            Err(r
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the daemon refused the request without saying why")
                .to_string())
        }
    }
}

/// Runs a snapshot verb against the daemon and prints its result.
pub fn run(cmd: &SnapshotCmd) -> ExitCode {
    let conn = cmd.conn();
    let path = conn
        .control
        .clone()
        .unwrap_or_else(stackbd::daemon::default_control_path);
    let result = Client::connect_trusted(&path).and_then(|mut c| {
        let bar = std::io::stderr().is_terminal() && !conn.json;
        match cmd {
            SnapshotCmd::Create {
                origin,
                name,
                cow,
                chunk,
                ..
            } => create(&mut c, origin, name, cow, parse_chunk(chunk)?),
            SnapshotCmd::Merge { name, timeout, .. } => {
                let limit = timeout.map(Duration::from_secs_f64);
                merge(&mut c, name, limit, &mut |done, total| {
                    if bar && total > 0 {
                        eprint!(
                            "\rmerging {name}: {:3}% ({done}/{total} chunks)",
                            done * 100 / total
                        );
                        let _ = std::io::stderr().flush();
                    }
                })
                .inspect(|_| {
                    if bar {
                        eprintln!();
                    }
                })
            }
            SnapshotCmd::Rm { name, .. } => rm(&mut c, name),
        }
    });
    match result {
        Ok(v) => {
            let text = if conn.json {
                format!("{}\n", json!({"ok": true, "result": v}))
            } else {
                render(&v)
            };
            let _ = std::io::stdout().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            if conn.json {
                println!("{}", json!({"ok": false, "error": e}));
            }
            eprintln!("stackbd {}: {e}", cmd.name());
            ExitCode::FAILURE
        }
    }
}

fn render(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    match s("verb") {
        "create" => format!(
            "snapshot {} of {} created (COW {}, chunk {} sectors)\n",
            s("snapshot"),
            s("origin"),
            s("cow"),
            v["chunk_sectors"]
        ),
        "merge" => format!(
            "snapshot {} merged into {} ({} chunks)\n",
            s("snapshot"),
            s("origin"),
            v["chunks"]
        ),
        _ => format!(
            "snapshot {} removed{}\n",
            s("snapshot"),
            if v["origin_restored"] == json!(true) {
                format!("; {} has its own table again", s("origin"))
            } else {
                String::new()
            }
        ),
    }
}

/// `8KiB`, `4k`, `1MiB`, `16384` (bytes) -> sectors; a power of two of at least 4 KiB.
pub fn parse_chunk(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid chunk size '{s}': expected a size such as 8KiB"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        _ => return Err(format!("invalid chunk size '{s}': unknown unit '{unit}'")),
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("invalid chunk size '{s}': too large"))?;
    if !bytes.is_power_of_two() || !(4096..=1 << 30).contains(&bytes) {
        return Err(format!(
            "invalid chunk size '{s}': a power of two from 4KiB to 1GiB"
        ));
    }
    Ok((bytes / 512) as u32)
}

fn table(c: &mut dyn Control, name: &str) -> Result<String, String> {
    let r = c.call("table", json!({"name": name}))?;
    Ok(r["table"].as_str().unwrap_or("").trim().to_string())
}

fn table_size(t: &str) -> Result<u64, String> {
    t.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let s: u64 = f.next()?.parse().ok()?;
            let n: u64 = f.next()?.parse().ok()?;
            s.checked_add(n)
        })
        .max()
        .ok_or_else(|| format!("cannot read a size from table '{t}'"))
}

/// The argument words of a one-line table of target `kind` (None if it is not one).
fn one_line<'a>(t: &'a str, kind: &str) -> Option<Vec<&'a str>> {
    let mut lines = t.lines();
    let (l, None) = (lines.next()?, lines.next()) else {
        return None;
    };
    let f: Vec<&str> = l.split_whitespace().collect();
    (f.len() >= 3 && f[2] == kind).then(|| f[3..].to_vec())
}

fn volumes(c: &mut dyn Control) -> Result<Vec<String>, String> {
    let r = c.call("ls", json!({}))?;
    Ok(r["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["volume"] == json!(true))
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect())
}

/// The volume whose live table is `snapshot-origin REAL`, and the snapshots over REAL.
fn origin_of(c: &mut dyn Control, real: &str) -> Result<(String, Vec<String>), String> {
    let mut origin = None;
    let mut snaps = Vec::new();
    for v in volumes(c)? {
        let Ok(t) = table(c, &v) else { continue };
        if one_line(&t, "snapshot-origin").is_some_and(|a| a.first() == Some(&real)) {
            origin = Some(v.clone());
        }
        if one_line(&t, "snapshot").is_some_and(|a| a.first() == Some(&real)) {
            snaps.push(v);
        }
    }
    let origin = origin.ok_or_else(|| format!("no volume is a snapshot-origin over '{real}'"))?;
    Ok((origin, snaps))
}

fn suspend(c: &mut dyn Control, name: &str) -> Result<Value, String> {
    c.call("suspend", json!({"name": name, "noflush": false}))
}

fn resume(c: &mut dyn Control, name: &str) -> Result<Value, String> {
    c.call("resume", json!({ "name": name }))
}

/// `snapshot create`: see the module docs. Undoes its steps when one fails.
pub fn create(
    c: &mut dyn Control,
    origin: &str,
    name: &str,
    cow: &str,
    chunk: u32,
) -> Result<Value, String> {
    let t = table(c, origin)?;
    let size = table_size(&t)?;
    let existing = one_line(&t, "snapshot-origin").and_then(|a| a.first().map(|s| s.to_string()));
    let fresh = existing.is_none();
    let real = existing.unwrap_or_else(|| format!("{origin}-real"));
    if fresh {
        c.call("create", json!({"name": real, "table": t}))?;
    }
    let undo_real = |c: &mut dyn Control| {
        if fresh {
            let _ = c.call("remove", json!({"name": real, "force": false}));
        }
    };
    if let Err(e) = suspend(c, origin) {
        undo_real(c);
        return Err(e);
    }
    if fresh {
        let line = format!("0 {size} snapshot-origin {real}");
        if let Err(e) = c.call("load", json!({"name": origin, "table": line})) {
            let _ = resume(c, origin);
            undo_real(c);
            return Err(e);
        }
    }
    let line = format!("0 {size} snapshot {real} {cow} P {chunk}");
    if let Err(e) = c.call("create", json!({"name": name, "table": line})) {
        if fresh {
            let _ = c.call("clear", json!({ "name": origin }));
        }
        let _ = resume(c, origin);
        undo_real(c);
        return Err(e);
    }
    resume(c, origin)?;
    Ok(
        json!({"verb": "create", "origin": origin, "snapshot": name, "real": real,
              "cow": cow, "chunk_sectors": chunk}),
    )
}

/// Exceptions left in a snapshot or merge `status` line (`start len kind alloc/total meta`):
/// `None` when the status has no such figures.
fn merge_left(status: &str, chunk: u64) -> Option<u64> {
    let f: Vec<&str> = status.split_whitespace().collect();
    let alloc: u64 = f.get(3)?.split('/').next()?.parse().ok()?;
    let meta: u64 = f.get(4)?.parse().ok()?;
    Some(alloc.saturating_sub(meta) / chunk.max(1))
}

/// `snapshot merge`: see the module docs. `progress(done, total)` after each look.
pub fn merge(
    c: &mut dyn Control,
    name: &str,
    timeout: Option<Duration>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Value, String> {
    let t = table(c, name)?;
    let a = one_line(&t, "snapshot").ok_or_else(|| format!("'{name}' is not a snapshot"))?;
    let size = table_size(&t)?;
    let (real, cow, kind, chunk) = match a.as_slice() {
        [r, c, k, ch, ..] => (r.to_string(), c.to_string(), k.to_string(), ch.to_string()),
        _ => return Err(format!("cannot read snapshot table '{t}'")),
    };
    let chunk_n: u64 = chunk.parse().map_err(|_| format!("bad chunk in '{t}'"))?;
    let (origin, snaps) = origin_of(c, &real)?;
    let others: Vec<&String> = snaps.iter().filter(|s| *s != name).collect();
    if !others.is_empty() {
        return Err(format!(
            "'{origin}' has other snapshots ({}): remove them before merging",
            others
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // What there is to merge, from the snapshot's own status (dm's allocated minus metadata).
    let st = c.call("status", json!({ "name": name }))?;
    let total = merge_left(st["status"].as_str().unwrap_or(""), chunk_n).unwrap_or(0);
    c.call("remove", json!({"name": name, "force": false}))?;
    suspend(c, &origin)?;
    let line = format!("0 {size} snapshot-merge {real} {cow} {kind} {chunk}");
    if let Err(e) = c.call("load", json!({"name": origin, "table": line})) {
        let _ = resume(c, &origin);
        return Err(format!(
            "{e} (the snapshot volume is removed; its COW {cow} is intact)"
        ));
    }
    resume(c, &origin)?;
    let start = Instant::now();
    loop {
        let st = c.call("status", json!({ "name": origin }))?;
        let st = st["status"].as_str().unwrap_or("").trim().to_string();
        if st.contains("Merge failed") || st.contains("Invalid") {
            return Err(format!("the merge into '{origin}' failed: {st}"));
        }
        if let Some(left) = merge_left(&st, chunk_n) {
            progress(total - left.min(total), total);
            if left == 0 && st.split_whitespace().count() >= 5 {
                break;
            }
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            return Err(format!(
                "timed out; the merge into '{origin}' goes on (see its status)"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Done: the origin takes its own table back.
    let rt = table(c, &real)?;
    suspend(c, &origin)?;
    c.call("load", json!({"name": origin, "table": rt}))?;
    resume(c, &origin)?;
    c.call("remove", json!({"name": real, "force": false}))?;
    Ok(json!({"verb": "merge", "origin": origin, "snapshot": name, "chunks": total}))
}

/// `snapshot rm`: see the module docs.
pub fn rm(c: &mut dyn Control, name: &str) -> Result<Value, String> {
    let t = table(c, name)?;
    let a = one_line(&t, "snapshot").ok_or_else(|| format!("'{name}' is not a snapshot"))?;
    let real = a[0].to_string();
    let (origin, snaps) = origin_of(c, &real)?;
    c.call("remove", json!({"name": name, "force": false}))?;
    let last = snaps.iter().all(|s| s == name);
    if last {
        let rt = table(c, &real)?;
        suspend(c, &origin)?;
        c.call("load", json!({"name": origin, "table": rt}))?;
        resume(c, &origin)?;
        c.call("remove", json!({"name": real, "force": false}))?;
    }
    Ok(json!({"verb": "rm", "snapshot": name, "origin": origin, "origin_restored": last}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stackbd_core::{Engine, ReactorConfig, Status, SuspendOpts};
    use std::sync::Arc;

    /// The control requests the verbs use, on an in-process engine.
    struct Fake(Engine);

    impl Control for Fake {
        fn call(&mut self, cmd: &str, a: Value) -> Result<Value, String> {
            let e = &mut self.0;
            let name = a["name"].as_str().unwrap_or("");
            let t = a["table"].as_str().unwrap_or("");
            let r = match cmd {
                "table" => {
                    return Ok(json!({"table": e.table(name, false).map_err(|e| e.to_string())?}))
                }
                "status" => {
                    // A daemon's reactors run on their own; here a status look drives them.
                    e.poll();
                    return Ok(json!({"status": e.status(name).map_err(|e| e.to_string())?}));
                }
                "ls" => {
                    let d: Vec<Value> = e
                        .ls()
                        .into_iter()
                        .map(|(n, v)| json!({"name": n, "volume": v}))
                        .collect();
                    return Ok(json!({ "devices": d }));
                }
                "create" => e.create(name, Some(t)).map(|_| ()),
                "load" => e.load(name, t),
                "clear" => e.clear(name),
                "suspend" => e.suspend(name, SuspendOpts::default()),
                "resume" => e.resume(name),
                "remove" => e.remove(name, false),
                _ => panic!("unexpected request {cmd}"),
            };
            // The merge runs in the background on a daemon; here a status look drives it.
            e.poll();
            r.map(|()| json!({"ok": true})).map_err(|e| e.to_string())
        }
    }

    fn fake() -> (Fake, Vec<u8>) {
        let mut e = Engine::new(stackbd_targets::registry(), ReactorConfig::default());
        for (n, s) in [("m0", 4096u64), ("c0", 4096), ("c1", 4096)] {
            e.add_leaf(n, Arc::new(stackbd_leaves::MemLeaf::new(s * 512).unwrap()))
                .unwrap();
        }
        let v = e.create("vol", Some("0 2048 linear m0 0")).unwrap();
        let data: Vec<u8> = (0..2048 * 512).map(|i| (i / 512 % 251) as u8).collect();
        assert_eq!(e.write_at(v, 0, &data), Status::Ok);
        (Fake(e), data)
    }

    fn read(f: &mut Fake, name: &str) -> Vec<u8> {
        let id = f.0.dev_id(name).unwrap();
        let mut b = vec![0u8; 2048 * 512];
        assert_eq!(f.0.read_at(id, 0, &mut b), Status::Ok);
        b
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk("8KiB"), Ok(16));
        assert_eq!(parse_chunk("4k"), Ok(8));
        assert_eq!(parse_chunk("1MiB"), Ok(2048));
        assert_eq!(parse_chunk("65536"), Ok(128));
        assert!(parse_chunk("2KiB").unwrap_err().contains("from 4KiB"));
        assert!(parse_chunk("12KiB").unwrap_err().contains("power of two"));
        assert!(parse_chunk("8XB").unwrap_err().contains("unknown unit"));
        assert!(parse_chunk("99999999999999999999").is_err());
    }

    #[test]
    fn create_merge_and_rm_as_lvm_does() {
        let (mut f, before) = fake();
        let r = create(&mut f, "vol", "snap", "c0", 16).unwrap();
        assert_eq!(r["real"], "vol-real");
        assert_eq!(
            f.0.table("vol", false).unwrap(),
            "0 2048 snapshot-origin vol-real\n"
        );
        assert_eq!(
            f.0.table("vol-real", false).unwrap(),
            "0 2048 linear m0 0\n"
        );
        let v = f.0.dev_id("vol").unwrap();
        assert_eq!(f.0.write_at(v, 10, &[1u8; 512]), Status::Ok);
        assert_eq!(read(&mut f, "snap"), before);
        // A second snapshot reuses -real.
        create(&mut f, "vol", "snap2", "c1", 8).unwrap();
        assert!(merge(&mut f, "snap", None, &mut |_, _| {})
            .unwrap_err()
            .contains("other snapshots (snap2)"));
        let r = rm(&mut f, "snap2").unwrap();
        assert_eq!(r["origin_restored"], false);
        // Write to the snapshot, then merge it: vol reads as the snapshot, -real is gone.
        let s = f.0.dev_id("snap").unwrap();
        assert_eq!(f.0.write_at(s, 100, &[2u8; 512]), Status::Ok);
        let mut want = before.clone();
        want[100 * 512..101 * 512].fill(2);
        let mut seen = Vec::new();
        let r = merge(
            &mut f,
            "snap",
            Some(Duration::from_secs(30)),
            &mut |d, t| seen.push((d, t)),
        )
        .unwrap();
        assert_eq!(r["chunks"], 2);
        assert_eq!(seen.last(), Some(&(2, 2)));
        assert_eq!(f.0.table("vol", false).unwrap(), "0 2048 linear m0 0\n");
        assert!(f.0.dev_id("vol-real").is_err() && f.0.dev_id("snap").is_err());
        assert_eq!(read(&mut f, "vol"), want);
    }

    #[test]
    fn rm_of_the_last_snapshot_restores_the_origin_and_failures_undo() {
        let (mut f, _) = fake();
        // A bad COW: nothing is left behind.
        let err = create(&mut f, "vol", "snap", "nope", 16).unwrap_err();
        assert!(err.contains("nope"), "{err}");
        assert_eq!(f.0.table("vol", false).unwrap(), "0 2048 linear m0 0\n");
        assert!(f.0.dev_id("vol-real").is_err());
        assert!(!f.0.info("vol").unwrap().suspended);
        create(&mut f, "vol", "snap", "c0", 16).unwrap();
        let r = rm(&mut f, "snap").unwrap();
        assert_eq!(r["origin_restored"], true);
        assert_eq!(f.0.table("vol", false).unwrap(), "0 2048 linear m0 0\n");
        assert!(f.0.dev_id("vol-real").is_err());
        assert!(rm(&mut f, "vol").unwrap_err().contains("not a snapshot"));
    }
}
