//! The daemon's control plane under random request sequences: the input decodes into control
//! request lines (well-formed requests of every verb with names, tables over mem and null
//! leaves, numbers and deadlines drawn from an edge-case pool, and raw bytes), each fed to the
//! daemon's real request handler (`stackbd::daemon::control::respond`) in-process, over an
//! inline engine (no sockets, no state file). Asserts, after each step:
//! - no panic, and every request answered within [`BOUND`] (a watchdog thread aborts);
//! - every volume the engine reports ACTIVE, whose stack has no suspended volume, serves a 4 KiB
//!   read and write through the library API (and reads back what it wrote when it is linear or
//!   striped over mem leaves only);
//! - no volume stays suspended past the deadline its suspend was given, and `info` never shows
//!   more time left than that deadline.
//!
//! Requests that would leave the sandbox or wait by design are skipped before they are sent:
//! leaves other than `mem`/`null` (files, NBD, power-cut), mem/null sizes over 1 GiB, tables
//! with `delay` or `multipath` (they hold I/O by design), `wait` without a short timeout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use stackbd::daemon::nbd::ExportTable;
use stackbd::daemon::{control, Daemon};
use stackbd_core::runtime::{ReactorThreads, RuntimeConfig};
use stackbd_core::{Engine, ReactorConfig, Status, Wait};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest one request may take.
const BOUND: Duration = Duration::from_secs(2);
/// Steps per input at most (keeps an exec short).
const MAX_STEPS: usize = 24;

struct World {
    d: Daemon,
    /// The leaves every input starts with (reused: a fresh engine takes the same ones) and
    /// the parameters they were built from.
    base: Vec<(String, Arc<dyn stackbd_core::Leaf>)>,
    base_params: stackbd::daemon::LeafTable,
    /// Keeps the side reactor (used only by `copy_start`) alive.
    _side: ReactorThreads,
}

/// Request under way: its start (ms since `base`, 0 = none) and text, for the watchdog.
struct Watch {
    base: Instant,
    since_ms: AtomicU64,
    req: Mutex<String>,
}

fn watch() -> &'static Watch {
    static W: OnceLock<&'static Watch> = OnceLock::new();
    W.get_or_init(|| {
        let w: &'static Watch = Box::leak(Box::new(Watch {
            base: Instant::now(),
            since_ms: AtomicU64::new(0),
            req: Mutex::new(String::new()),
        }));
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let s = w.since_ms.load(Ordering::Acquire);
            let now = w.base.elapsed().as_millis() as u64;
            if s != 0 && now.saturating_sub(s) > BOUND.as_millis() as u64 {
                let req = w.req.lock().map(|r| r.clone()).unwrap_or_default();
                eprintln!("control request took more than {BOUND:?}: {req}");
                std::process::abort();
            }
        });
        w
    })
}

fn fresh_engine() -> Engine {
    Engine::new(
        stackbd_targets::registry(),
        ReactorConfig {
            pool_capacity: 16,
            per_io_bytes: 256,
            fallback_chunks: 4,
            fallback_chunk_bytes: 512,
        },
    )
}

fn world() -> &'static Mutex<World> {
    static W: OnceLock<Mutex<World>> = OnceLock::new();
    W.get_or_init(|| {
        let side = ReactorThreads::spawn(RuntimeConfig::default()).expect("side reactor");
        let d = Daemon {
            engine: Mutex::new(fresh_engine()),
            exports: Arc::new(ExportTable::default()),
            state_dir: None,
            stop: Arc::new(AtomicBool::new(false)),
            closing: Arc::new(AtomicBool::new(false)),
            attacher: side.attacher(),
            started: Instant::now(),
            copies: Mutex::new(Default::default()),
            leaf_params: Mutex::new(Default::default()),
            luks: Mutex::new(Default::default()),
            pending: Mutex::new(Default::default()),
        };
        // The starting leaves, made once through the handler as a client would.
        for req in [
            r#"{"v":1,"cmd":"leaf_add","name":"m0","kind":"mem","size":"1MiB"}"#,
            r#"{"v":1,"cmd":"leaf_add","name":"m1","kind":"mem","size":"1MiB"}"#,
            r#"{"v":1,"cmd":"leaf_add","name":"n0","kind":"null","size":"1MiB"}"#,
        ] {
            let (reply, _) = control::respond(&d, req.as_bytes(), &|| false);
            assert!(reply.contains("\"ok\":true"), "setup {req}: {reply}");
        }
        let e = d.engine.lock().unwrap();
        let base = ["m0", "m1", "n0"]
            .iter()
            .map(|n| (n.to_string(), e.leaf(n).unwrap()))
            .collect();
        drop(e);
        let base_params = d.leaf_params.lock().unwrap().clone();
        Mutex::new(World {
            d,
            base,
            base_params,
            _side: side,
        })
    })
}

/// Back to the starting state: a fresh engine (same daemon, same threads, same leaves) with
/// two mem leaves, a null leaf and a linear volume `v0`; no exports, no copies.
fn reset(w: &World) {
    let d = &w.d;
    let mut e = fresh_engine();
    for (n, l) in &w.base {
        e.add_leaf(n, l.clone()).unwrap();
    }
    e.create("v0", Some("0 2048 linear m0 0")).unwrap();
    *d.engine.lock().unwrap_or_else(|e| e.into_inner()) = e;
    for x in d.exports.all() {
        d.exports.remove(&x.name);
    }
    *d.leaf_params.lock().unwrap() = w.base_params.clone();
    d.luks.lock().unwrap().clear();
    *d.pending.lock().unwrap() = Default::default();
    d.copies.lock().unwrap().clear();
    d.stop.store(false, Ordering::Relaxed);
}

/// Reads the input a byte at a time; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn empty(&self) -> bool {
        self.0.is_empty()
    }
    fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.u8() as usize % from.len()].clone()
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// Up to `max` raw bytes.
    fn take(&mut self, max: usize) -> &[u8] {
        let n = (self.u8() as usize).min(max).min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn text(&mut self, max: usize) -> String {
        String::from_utf8_lossy(self.take(max)).into_owned()
    }
}

const NAMES: &[&str] = &[
    "m0", "m1", "n0", "v0", "v1", "v2", "e0", "x", "1v", "", "bad name", "v0 ", "a.b-c_d", "m0\n",
    "V", "vol/1",
];
const TARGETS: &[&str] = &[
    "linear", "striped", "zero", "error", "flakey", "dust", "nosuch", "linear", "striped",
];

fn number(b: &mut Bytes) -> Value {
    match b.u8() % 24 {
        0 => json!(0),
        1 => json!(1),
        2 => json!(8),
        3 => json!(512),
        4 => json!(2048),
        5 => json!(4096),
        6 => json!(u32::MAX),
        7 => json!(1u64 << 32),
        8 => json!(1u64 << 53),
        9 => json!(i64::MAX),
        10 => json!(1u64 << 63),
        11 => json!(u64::MAX),
        12 => json!(-1),
        13 => json!(i64::MIN),
        14 => json!(1e19),
        15 => json!(0.5),
        16 => json!(1e-9),
        17 => json!(1e308),
        18 => json!(-0.0),
        19 => json!(2_592_000),
        20 => json!(2_592_001),
        21 => json!("12"),
        22 => Value::Null,
        _ => json!(b.u8() as u64 * 7),
    }
}

/// A table: one to three lines over the leaves and volumes, or something odd.
fn table(b: &mut Bytes) -> String {
    match b.u8() % 8 {
        0 => return String::new(),
        1 => return "# nothing".into(),
        2 => return b.text(64),
        _ => {}
    }
    let lines = 1 + b.u8() % 3;
    let mut start = 0u64;
    let mut out = Vec::new();
    for _ in 0..lines {
        let len: u64 = b.pick(&[8, 16, 128, 1024, 2048, 4096, 0, u64::MAX, 1 << 62]);
        let t = b.pick(TARGETS);
        let dev = b.pick(NAMES);
        let off: u64 = b.pick(&[0, 8, 1024, 2047, 2048, u64::MAX - 7]);
        let args = match t {
            "linear" => format!("{dev} {off}"),
            "striped" => format!(
                "2 {} {dev} {off} {} 0",
                b.pick(&[8, 128, 0, 3]),
                b.pick(NAMES)
            ),
            "flakey" => format!("{dev} {off} {} {}", b.pick(&[0, 1, 5]), b.pick(&[0, 1, 5])),
            "dust" => format!("{dev} {off} 512"),
            _ => String::new(),
        };
        let s = if b.u8() % 8 == 0 {
            b.pick(&[1, 7, u64::MAX])
        } else {
            start
        };
        out.push(format!("{s} {len} {t} {args}"));
        start = start.saturating_add(len);
    }
    out.join(if b.bool() { "\n" } else { ";" })
}

/// One request line.
fn request(b: &mut Bytes) -> Vec<u8> {
    let verbs = [
        "create",
        "load",
        "clear",
        "suspend",
        "resume",
        "reload",
        "remove",
        "ls",
        "info",
        "table",
        "status",
        "queue",
        "message",
        "deps",
        "wait",
        "leaf_add",
        "leaf_rm",
        "leaf_ls",
        "leaf_message",
        "export_add",
        "export_rm",
        "export_ls",
        "stats",
        "copy_start",
        "copy_status",
        "copy_cancel",
        "ping",
        "shutdown",
        "leaf_retry",
        "luks_open",
        "luks_close",
    ];
    let sel = b.u8();
    if sel >= 240 {
        // Raw bytes: malformed JSON, wrong envelopes, anything.
        return b.take(200).to_vec();
    }
    let cmd = verbs[sel as usize % verbs.len()];
    let mut m = Map::new();
    m.insert(
        "v".into(),
        if b.u8() % 16 == 0 {
            number(b)
        } else {
            json!(1)
        },
    );
    m.insert("cmd".into(), json!(cmd));
    let name = |b: &mut Bytes| -> Value {
        match b.u8() % 16 {
            0 => number(b),
            1 => json!(b.text(8)),
            _ => json!(b.pick(NAMES)),
        }
    };
    match cmd {
        "create" | "load" | "reload" => {
            m.insert("name".into(), name(b));
            if cmd != "create" || b.bool() {
                m.insert("table".into(), json!(table(b)));
            }
        }
        "suspend" => {
            m.insert("name".into(), name(b));
            if b.bool() {
                m.insert("noflush".into(), json!(b.bool()));
            }
            match b.u8() % 4 {
                0 => {}
                1 => {
                    m.insert("deadline_s".into(), Value::Null);
                }
                2 => {
                    let s: f64 = b.pick(&[0.001, 0.002, 0.005, 0.02, 1.0, 3600.0]);
                    m.insert("deadline_s".into(), json!(s));
                }
                _ => {
                    m.insert("deadline_s".into(), number(b));
                }
            }
        }
        "remove" => {
            m.insert("name".into(), name(b));
            m.insert("force".into(), json!(b.bool()));
        }
        "table" => {
            m.insert("name".into(), name(b));
            m.insert("inactive".into(), json!(b.bool()));
        }
        "queue" => {
            m.insert("name".into(), name(b));
            if b.bool() {
                m.insert(
                    "scheduler".into(),
                    json!(b.pick(&["none", "deadline", "bfq", ""])),
                );
            }
            if b.bool() {
                m.insert("nr_requests".into(), number(b));
            }
        }
        "message" => {
            m.insert("name".into(), name(b));
            m.insert("sector".into(), number(b));
            let argv: Vec<String> = (0..1 + b.u8() % 3)
                .map(|_| {
                    b.pick(&["drop_writes", "up", "down", "addbadblock", "1", "x", ""])
                        .to_string()
                })
                .collect();
            m.insert("argv".into(), json!(argv));
        }
        "wait" => {
            m.insert("name".into(), name(b));
            m.insert("event_nr".into(), number(b));
            m.insert("timeout_s".into(), json!(b.pick(&[0.001, 0.005, 0.01])));
        }
        "leaf_add" => {
            m.insert("name".into(), name(b));
            m.insert(
                "kind".into(),
                json!(b.pick(&["mem", "null", "mem", "bogus", "file"])),
            );
            let size = match b.u8() % 6 {
                0 => json!("4MiB"),
                1 => json!("1MiB"),
                2 => json!("64K"),
                3 => json!(b.text(8)),
                4 => number(b),
                _ => json!("1000"),
            };
            if b.bool() {
                m.insert("size".into(), size);
            } else {
                m.insert("params".into(), json!({"size": size}));
            }
        }
        "leaf_message" => {
            m.insert("name".into(), name(b));
            m.insert(
                "argv".into(),
                json!([b.pick(&["fail", "ok", "powercut", "x", ""])]),
            );
        }
        "export_add" => {
            m.insert("volume".into(), name(b));
            m.insert("name".into(), name(b));
            m.insert("read_only".into(), json!(b.bool()));
        }
        "stats" => {
            if b.bool() {
                m.insert("name".into(), name(b));
            }
        }
        "copy_start" => {
            m.insert("name".into(), name(b));
            for k in ["src", "dst", "len"] {
                m.insert(k.into(), number(b));
            }
            if b.bool() {
                m.insert("piece".into(), number(b));
            }
        }
        "copy_status" | "copy_cancel" => {
            m.insert("id".into(), number(b));
        }
        "ls" => {
            m.insert("tree".into(), json!(b.bool()));
        }
        "ping" | "shutdown" | "leaf_ls" | "export_ls" => {}
        _ => {
            m.insert("name".into(), name(b));
        }
    }
    if b.u8() % 32 == 0 {
        // An unknown field, or a known one of the wrong type.
        m.insert(
            b.pick(&["name", "bogus", "table", "force"]).into(),
            json!([1, {"a": null}]),
        );
    }
    serde_json::to_vec(&Value::Object(m)).expect("serializable")
}

/// A size the filter lets through: at most 1 GiB (whole numbers, or a few units).
fn small_size(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_u64().is_some_and(|n| n <= 1 << 30),
        Value::String(s) => {
            let s = s.trim();
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            let unit = s[digits.len()..].trim();
            let Ok(n) = digits.parse::<u64>() else {
                return true;
            };
            let mult: u64 = match unit {
                "" | "B" => 1,
                "K" | "KiB" => 1 << 10,
                "M" | "MiB" => 1 << 20,
                "G" | "GiB" => 1 << 30,
                _ if unit.chars().any(|c| "TPEZYtpezy".contains(c)) => return false,
                _ => 1 << 30,
            };
            n.checked_mul(mult).is_some_and(|b| b <= 1 << 30)
        }
        _ => true,
    }
}

/// Requests left out: those that leave the sandbox or wait by design (see the file's doc).
fn allowed(line: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(line);
    if text.contains("delay") || text.contains("multipath") {
        return None;
    }
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return Some(Value::Null);
    };
    let Some(m) = v.as_object() else {
        return Some(Value::Null);
    };
    match m.get("cmd").and_then(Value::as_str) {
        // An image path would open files outside the sandbox.
        Some("luks_open") if m.contains_key("path") => None,
        Some("wait") => match m.get("timeout_s") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_f64().is_none_or(|t| t > 0.02) => None,
            _ => Some(v),
        },
        Some("leaf_add") => {
            // Only mem and null leaves, of a modest size.
            let kind_ok = match m.get("kind") {
                Some(Value::String(k)) => !["file", "nbd", "powercut"].contains(&k.as_str()),
                _ => true,
            };
            let sizes_ok = m
                .values()
                .chain(
                    m.get("params")
                        .and_then(Value::as_object)
                        .into_iter()
                        .flat_map(|p| p.values()),
                )
                .all(small_size);
            let params_only = m
                .iter()
                .all(|(k, _)| ["v", "cmd", "name", "kind", "params", "size"].contains(&k.as_str()))
                && m.get("params")
                    .and_then(Value::as_object)
                    .is_none_or(|p| p.keys().all(|k| k == "size"));
            (kind_ok && sizes_ok && params_only).then_some(v)
        }
        _ => Some(v),
    }
}

/// Targets whose reads and writes on mem leaves are plain data (read back what was written).
fn plain(t: &str) -> bool {
    matches!(t, "linear" | "striped")
}

/// Whether `name`'s stack is all ACTIVE, and whether it is plain data over mem leaves.
fn stack(e: &Engine, name: &str, depth: usize) -> (bool, bool) {
    if depth > 16 {
        return (false, false);
    }
    if let Ok(l) = e.leaf(name) {
        return (true, l.kind() == "mem");
    }
    let Ok(i) = e.info(name) else {
        return (false, false);
    };
    if i.suspended || i.suspending.is_some() || !i.live_table {
        return (false, false);
    }
    let text = e.table(name, false).unwrap_or_default();
    // Plain, and every range still on its device: a volume under this one may have been
    // reloaded smaller since (dm allows it; I/O past its end then fails, as it should).
    let mut is_plain = text
        .lines()
        .all(|l| l.split_whitespace().nth(2).is_some_and(plain) && fits(e, l));
    for dep in e.deps(name).unwrap_or_default() {
        let (active, p) = stack(e, &dep, depth + 1);
        if !active {
            return (false, false);
        }
        is_plain &= p;
    }
    (true, is_plain)
}

/// Whether a linear or striped table line's ranges lie within their devices' current sizes.
fn fits(e: &Engine, line: &str) -> bool {
    let t: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| t.get(i).and_then(|x| x.parse::<u64>().ok());
    let size = |dev: &str| e.dev_info(dev).map(|i| i.size).ok();
    let within = |dev: Option<&&str>, off: Option<u64>, len: u64| match (dev, off) {
        (Some(d), Some(o)) => {
            size(d).is_some_and(|s| o.checked_add(len).is_some_and(|end| end <= s))
        }
        _ => false,
    };
    let Some(len) = num(1) else { return false };
    match t.get(2) {
        Some(&"linear") => within(t.get(3), num(4), len),
        Some(&"striped") => {
            let Some(n) = num(3).filter(|&n| n > 0) else {
                return false;
            };
            let per = len / n;
            (0..n as usize).all(|k| within(t.get(5 + 2 * k), num(6 + 2 * k), per))
        }
        _ => true,
    }
}

/// The invariants after a step.
fn check(d: &Daemon, deadlines: &HashMap<String, (Instant, Duration)>) {
    let mut e = d.engine.lock().unwrap_or_else(|e| e.into_inner());
    // What the daemon's main loop does every 50 ms: expire suspend deadlines.
    e.poll();
    let now = Instant::now();
    for (name, is_volume) in e.ls() {
        if !is_volume {
            continue;
        }
        let i = e.info(&name).expect("listed volume has info");
        assert!(
            i.suspending.is_none(),
            "{name}: still suspending after its request answered"
        );
        if i.suspended {
            if let Some((at, given)) = deadlines.get(&name) {
                assert!(
                    now <= *at + *given + Duration::from_millis(100),
                    "{name}: suspended past its deadline ({given:?} given)"
                );
                let left = i.suspend_deadline.expect("a deadline was given");
                assert!(
                    left <= *given,
                    "{name}: {left:?} left of a {given:?} deadline"
                );
            }
            continue;
        }
        let (active, is_plain) = stack(&e, &name, 0);
        if !active || i.size < 8 {
            continue;
        }
        let h = e
            .open_volume(&name, Wait::Interrupt)
            .expect("open an active volume");
        let pattern = [0x5au8 ^ (i.event_nr as u8); 4096];
        let w = e.write(&h, 0, &pattern);
        let mut got = [0u8; 4096];
        let r = e.read(&h, 0, &mut got);
        e.close_volume(h);
        if is_plain {
            assert_eq!(w, Status::Ok, "{name}: write on a plain active volume");
            assert_eq!(r, Status::Ok, "{name}: read on a plain active volume");
            assert!(
                got == pattern,
                "{name}: read back differs from what was written"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let w = watch();
    let world = world().lock().unwrap_or_else(|e| e.into_inner());
    reset(&world);
    let d = &world.d;
    let mut b = Bytes(data);
    // Volume -> (when its suspend answered, the deadline it was given).
    let mut deadlines: HashMap<String, (Instant, Duration)> = HashMap::new();
    for _ in 0..MAX_STEPS {
        if b.empty() {
            break;
        }
        let line = request(&mut b);
        let Some(req) = allowed(&line) else { continue };
        *w.req.lock().unwrap() = String::from_utf8_lossy(&line).into_owned();
        w.since_ms.store(
            w.base.elapsed().as_millis().max(1) as u64,
            Ordering::Release,
        );
        let (reply, _stop) = control::respond(d, &line, &|| false);
        w.since_ms.store(0, Ordering::Release);
        if std::env::var_os("CP_TRACE").is_some() {
            eprintln!(
                "-> {}\n<- {}",
                String::from_utf8_lossy(&line),
                reply.trim_end()
            );
        }
        let reply: Value = serde_json::from_str(&reply).expect("a reply is one JSON object");
        assert_eq!(reply["v"], 1);
        let ok = reply["ok"] == true;
        assert!(
            ok || reply["error"].as_str().is_some_and(|e| !e.is_empty()),
            "error without text: {reply}"
        );
        let name = req
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match req.get("cmd").and_then(Value::as_str) {
            Some("suspend") if ok && reply["already_suspended"] == false => {
                match reply["deadline_s"].as_f64() {
                    Some(s) => {
                        deadlines.insert(name, (Instant::now(), Duration::from_secs_f64(s)));
                    }
                    None => {
                        deadlines.remove(&name);
                    }
                }
            }
            Some("remove") if ok => {
                deadlines.remove(&name);
            }
            _ => {}
        }
        check(d, &deadlines);
    }
});
