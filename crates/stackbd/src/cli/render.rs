//! How replies print: dmsetup's layouts where dmsetup has the verb, aligned columns for the
//! listings, an iostat-like table for `stats`.

use super::{leaf, luks, ExportCmd, LeafCmd, Verb};
use serde_json::Value;
use stackbd::config::human_bytes;

pub(super) fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn b(v: &Value, k: &str) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(false)
}

fn list<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v.get(k)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Text that ends with a newline unless empty.
pub(super) fn lines(text: &str) -> String {
    if text.is_empty() || text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}

/// Left-aligned columns, two spaces apart.
fn columns(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|x| x.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, x) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(x);
            } else {
                line.push_str(&format!("{x:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn size_text(sectors: u64) -> String {
    format!(
        "{sectors} sectors ({})",
        human_bytes(sectors * stackbd_core::SECTOR_SIZE as u64)
    )
}

/// `dmsetup info`'s layout.
pub(super) fn info_text(i: &Value) -> String {
    let tables = match (b(i, "live_table"), b(i, "inactive_table")) {
        (true, true) => "LIVE & INACTIVE",
        (true, false) => "LIVE",
        (false, true) => "INACTIVE",
        (false, false) => "None",
    };
    let mut t = String::new();
    t += &format!("Name:              {}\n", s(i, "name"));
    t += &format!("State:             {}\n", s(i, "state"));
    if let Some(f) = i.get("suspending_for_s").and_then(Value::as_f64) {
        t += &format!("Suspending for:    {f:.1} s (draining in-flight I/O)\n");
    }
    match i.get("suspend_deadline_s") {
        Some(Value::Null) => t += "Suspend deadline:  none (until resume)\n",
        Some(v) => {
            let left = v.as_f64().unwrap_or(0.0);
            t += &format!("Suspend deadline:  resumes by itself in {left:.1} s\n");
        }
        None => {}
    }
    t += &format!("Tables present:    {tables}\n");
    t += &format!("Open count:        {}\n", n(i, "open_count"));
    t += &format!("Event number:      {}\n", n(i, "event_nr"));
    t += &format!("Number of targets: {}\n", n(i, "targets"));
    t += &format!("Size:              {}\n", size_text(n(i, "sectors")));
    let exports: Vec<&str> = list(i, "exports")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if !exports.is_empty() {
        t += &format!("Exports:           {}\n", exports.join(", "));
    }
    t
}

pub(super) fn render(v: &Verb, r: &Value) -> String {
    match v {
        Verb::Info { .. } => info_text(r.get("info").unwrap_or(&Value::Null)),
        Verb::Table { .. } => lines(s(r, "table")),
        Verb::Luks { cmd } => luks::render(cmd, r),
        Verb::Status { .. } => lines(s(r, "status")),
        Verb::Queue { .. } => format!(
            "Scheduler: {}\nnr_requests: {}\nRequest-based: {}\n",
            s(r, "scheduler"),
            n(r, "nr_requests"),
            if b(r, "request_based") { "yes" } else { "no" }
        ),
        Verb::Message { .. }
        | Verb::Leaf {
            cmd: LeafCmd::Message { .. },
        } => lines(s(r, "reply")),
        Verb::Deps { .. } => {
            let deps: Vec<String> = list(r, "deps")
                .iter()
                .filter_map(Value::as_str)
                .map(|d| format!("({d})"))
                .collect();
            format!("{} dependencies\t: {}\n", deps.len(), deps.join(" "))
        }
        Verb::Wait { .. } => format!("Event number: {}\n", n(r, "event_nr")),
        Verb::Ls { tree, .. } => {
            if *tree {
                let t = s(r, "tree");
                return if t.is_empty() {
                    "No devices found\n".into()
                } else {
                    lines(t)
                };
            }
            let devs = list(r, "devices");
            if devs.is_empty() {
                return "No devices found\n".into();
            }
            devs.iter()
                .map(|d| {
                    let mut kind = if b(d, "volume") {
                        "volume".to_string()
                    } else {
                        format!("{} leaf", s(d, "kind"))
                    };
                    if let Some(why) = d.get("failed").and_then(Value::as_str) {
                        kind += &format!(", failed: {why}");
                    }
                    format!("{}\t({kind})\n", s(d, "name"))
                })
                .collect()
        }
        Verb::Leaf {
            cmd: LeafCmd::Ls { .. },
        } => {
            let leaves = list(r, "leaves");
            if leaves.is_empty() {
                return "No leaves\n".into();
            }
            let mut rows = vec![[
                "NAME", "KIND", "STATE", "SECTORS", "SIZE", "USED BY", "PARAMS",
            ]
            .map(String::from)
            .to_vec()];
            let mut notes = String::new();
            for l in leaves {
                let state = l.get("state").and_then(Value::as_str).unwrap_or("ok");
                if let Some(err) = l.get("error").and_then(Value::as_str) {
                    notes += &format!("{}: {state}: {err}{}\n", s(l, "name"), ago(l));
                }
                let users: Vec<&str> = list(l, "used_by")
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                rows.push(vec![
                    s(l, "name").into(),
                    s(l, "kind").into(),
                    state.into(),
                    n(l, "sectors").to_string(),
                    human_bytes(n(l, "bytes")),
                    if users.is_empty() {
                        "-".into()
                    } else {
                        users.join(",")
                    },
                    leaf::params_text(s(l, "kind"), &l["params"]),
                ]);
            }
            columns(&rows) + &notes
        }
        Verb::Export {
            cmd: ExportCmd::Ls { .. },
        } => {
            let exports = list(r, "exports");
            if exports.is_empty() {
                return "No exports\n".into();
            }
            let mut rows = vec![["NAME", "VOLUME", "SIZE", "MODE"]
                .map(String::from)
                .to_vec()];
            for x in exports {
                rows.push(vec![
                    s(x, "name").into(),
                    s(x, "volume").into(),
                    human_bytes(n(x, "bytes")),
                    if b(x, "read_only") { "ro" } else { "rw" }.into(),
                ]);
            }
            columns(&rows)
        }
        Verb::Stats { .. } => stats_text(r),
        // Changes print nothing, as dmsetup's do.
        _ => String::new(),
    }
}

/// " (for N s)": how long a leaf has been in its state, if the reply says.
fn ago(l: &Value) -> String {
    l.get("for_s")
        .and_then(Value::as_f64)
        .map_or(String::new(), |t| format!(" (for {t:.0} s)"))
}

fn stats_text(r: &Value) -> String {
    let mut t = format!(
        "Uptime: {:.1} s\n",
        r.get("uptime_s").and_then(Value::as_f64).unwrap_or(0.0)
    );
    const COLS: [(&str, &str); 17] = [
        ("submitted", "SUBMITTED"),
        ("completed", "COMPLETED"),
        ("splits", "SPLITS"),
        ("held", "HELD"),
        ("requeued", "REQUEUED"),
        ("leaf_ios", "LEAF_IOS"),
        ("rq_requests", "REQUESTS"),
        ("rq_merges", "MERGES"),
        ("pool_allocs", "ALLOCS"),
        ("pool_exhausted", "EXHAUSTED"),
        ("pool_grown", "GROWN"),
        ("pool_notifications", "NOTIFIED"),
        ("frame_overflows", "OVERFLOWS"),
        ("loops", "LOOPS"),
        ("sleeps", "SLEEPS"),
        ("frontends", "FRONTENDS"),
        ("refused", "REFUSED"),
    ];
    let reactors = list(r, "reactors");
    if !reactors.is_empty() {
        let mut rows = vec![std::iter::once("REACTOR")
            .chain(COLS.iter().map(|c| c.1))
            .map(String::from)
            .collect::<Vec<_>>()];
        let row = |label: String, o: &Value| {
            std::iter::once(label)
                .chain(COLS.iter().map(|c| match o.get(c.0) {
                    Some(x) => x.to_string(),
                    None => "-".into(),
                }))
                .collect::<Vec<_>>()
        };
        for x in reactors {
            rows.push(row(n(x, "id").to_string(), x));
        }
        if reactors.len() > 1 {
            rows.push(row("total".into(), r.get("totals").unwrap_or(&Value::Null)));
        }
        t += &columns(&rows);
    }
    let exports = list(r, "exports");
    if !exports.is_empty() {
        t += "\n";
        let mut rows = vec![["EXPORT", "VOLUME", "SIZE", "MODE"]
            .map(String::from)
            .to_vec()];
        for x in exports {
            rows.push(vec![
                s(x, "name").into(),
                s(x, "volume").into(),
                human_bytes(n(x, "bytes")),
                if b(x, "read_only") { "ro" } else { "rw" }.into(),
            ]);
        }
        t += &columns(&rows);
    }
    let volumes = list(r, "volumes");
    if !volumes.is_empty() {
        t += "\n";
        let mut rows = vec![[
            "VOLUME", "STATE", "SECTORS", "SIZE", "TARGETS", "OPEN", "EVENTS",
        ]
        .map(String::from)
        .to_vec()];
        for v in volumes {
            rows.push(vec![
                s(v, "name").into(),
                s(v, "state").into(),
                n(v, "sectors").to_string(),
                human_bytes(n(v, "bytes")),
                n(v, "targets").to_string(),
                n(v, "open_count").to_string(),
                n(v, "event_nr").to_string(),
            ]);
        }
        t += &columns(&rows);
    }
    let leaves = list(r, "leaves");
    if !leaves.is_empty() {
        t += "\n";
        let mut rows = vec![["LEAF", "KIND", "STATE", "FOR", "LAST ERROR"]
            .map(String::from)
            .to_vec()];
        for l in leaves {
            rows.push(vec![
                s(l, "name").into(),
                s(l, "kind").into(),
                s(l, "state").into(),
                l.get("for_s")
                    .and_then(Value::as_f64)
                    .map_or("-".into(), |x| format!("{x:.0} s")),
                l.get("last_error")
                    .and_then(Value::as_str)
                    .unwrap_or("-")
                    .into(),
            ]);
        }
        t += &columns(&rows);
    }
    t
}
