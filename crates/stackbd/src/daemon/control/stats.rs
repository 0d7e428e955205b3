//! Counters and copy jobs: `stats`, `copy_start`, `copy_status` and `copy_cancel`.

use super::exports::export_json;
use super::leaves::health_fields;
use super::{engine, es, volume_info, Daemon, Req};
use serde_json::{json, Map, Value};
use stackbd_core::runtime::{ReactorThreads, ThreadStats};
use std::sync::atomic::Ordering;

/// `stats {name?}`: reactor counters, exports, volumes (only those named `name`, if given) and
/// every leaf's health (asked after the engine lock is released).
pub(super) fn stats(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let only = r.opt_string("name")?;
    let e = engine(d);
    let (reactors, totals) = e.threads().map_or_else(Default::default, reactors);
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
    let leaves: Vec<_> = e
        .ls()
        .into_iter()
        .filter(|(_, is_volume)| !is_volume)
        .filter_map(|(n, _)| Some((e.leaf(&n).ok()?, n)))
        .collect();
    drop(e);
    let leaves: Vec<Value> = leaves
        .into_iter()
        .map(|(l, n)| {
            let mut o = json!({"name": n, "kind": l.kind()});
            if let Value::Object(m) = &mut o {
                m.extend(health_fields(&l.health()));
            }
            o
        })
        .collect();
    Ok(json!({
        "uptime_s": d.started.elapsed().as_secs_f64(),
        "reactors": reactors,
        "totals": totals,
        "exports": exports,
        "volumes": volumes,
        "leaves": leaves,
    }))
}

/// Every reactor's counters, and their sums over all reactors.
fn reactors(t: &ReactorThreads) -> (Vec<Value>, Map<String, Value>) {
    let mut totals = Map::new();
    let reactors = t
        .thread_stats()
        .iter()
        .enumerate()
        .map(|(i, ts)| {
            let o = reactor_json(t, i, ts);
            add_totals(&mut totals, &o);
            o
        })
        .collect();
    (reactors, totals)
}

/// One reactor's counters: its thread's, and (if it answers) its own and its pool's.
fn reactor_json(t: &ReactorThreads, i: usize, ts: &ThreadStats) -> Value {
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
    o
}

/// Adds one reactor's counters to the totals (not its id or sizes, which do not add up).
fn add_totals(totals: &mut Map<String, Value>, o: &Value) {
    if let Value::Object(m) = o {
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
}

/// `copy_start {name, src, dst, len, emulate?, piece?, inflight?}`: starts a copy in a volume.
pub(super) fn copy_start(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let need = |k: &str| r.opt_u64(k)?.ok_or_else(|| r.missing(k));
    let (src, dst, len) = (need("src")?, need("dst")?, need("len")?);
    let e = engine(d);
    let info = e.info(name).map_err(es)?;
    if src.checked_add(len).is_none_or(|x| x > info.size)
        || dst.checked_add(len).is_none_or(|x| x > info.size)
    {
        return Err(format!(
            "copy_start: volume '{name}': range {src}+{len} -> {dst}+{len} passes the end ({} \
             sectors); nothing copied",
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

/// `copy_status {id}` / `copy_cancel {id}`: a copy job's progress (`copy_cancel` cancels it).
pub(super) fn copy_status(d: &Daemon, r: &Req<'_>) -> Result<Value, String> {
    let id = r.opt_u64("id")?.ok_or_else(|| r.missing("id"))?;
    let (p, started) = d
        .copy_job(id)
        .ok_or_else(|| format!("{}: no copy job {id}", r.cmd))?;
    if r.cmd == "copy_cancel" {
        p.cancel.store(true, Ordering::Relaxed);
    }
    let finished = p.finished.load(Ordering::Acquire);
    let status = stackbd_core::Status::from_u8(p.status.load(Ordering::Relaxed));
    Ok(json!({
        "id": id,
        "done_sectors": p.done_sectors.load(Ordering::Relaxed),
        "total_sectors": p.total_sectors.load(Ordering::Relaxed),
        "finished": finished,
        "status": if finished { status.to_string() } else { "running".into() },
        "seconds": started.elapsed().as_secs_f64(),
    }))
}
