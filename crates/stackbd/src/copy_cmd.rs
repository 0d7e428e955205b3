//! `stackbd copy VOLUME --src SECTOR --dst SECTOR --len SECTORS`: a copy within a volume through
//! the copy engine, offloaded or emulated layer by layer. With `--config FILE` it runs in this
//! process on the stack the file describes; otherwise the daemon runs it.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use stackbd::config;
use stackbd_core::copy::CopyOpts;
use stackbd_core::{ReactorConfig, SECTOR_SIZE};

#[derive(clap::Args, Debug)]
pub struct CopyArgs {
    /// The volume to copy within.
    pub volume: String,
    /// First source sector.
    #[arg(long)]
    pub src: u64,
    /// First destination sector.
    #[arg(long)]
    pub dst: u64,
    /// Sectors to copy.
    #[arg(long)]
    pub len: u64,
    /// Run in this process on the stack this config file describes (no daemon).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Emulate every piece (read + write), to compare with offload.
    #[arg(long)]
    pub emulate: bool,
    /// Sectors per piece.
    #[arg(long, default_value_t = 16 << 11)]
    pub piece: u32,
    /// Pieces in flight.
    #[arg(long, default_value_t = 8)]
    pub inflight: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket (without --config).
    #[arg(long)]
    pub control: Option<std::path::PathBuf>,
}

/// What a copy did.
#[derive(Debug, Default, serde::Serialize)]
pub struct CopySummary {
    pub volume: String,
    pub bytes: u64,
    pub seconds: f64,
    pub mib_s: f64,
    pub offloaded_bytes: u64,
    pub kernel_bytes: u64,
    pub emulated_bytes: u64,
}

pub fn run(args: &CopyArgs) -> ExitCode {
    let r = match &args.config {
        Some(path) => run_local(args, path),
        None => run_daemon(args),
    };
    match r {
        Ok(s) => {
            if args.json {
                println!("{}", serde_json::to_string(&s).unwrap());
            } else {
                println!(
                    "copied {} bytes in {:.3} s ({:.1} MiB/s): offloaded {}, kernel {}, emulated {}",
                    s.bytes, s.seconds, s.mib_s, s.offloaded_bytes, s.kernel_bytes, s.emulated_bytes
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stackbd copy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_local(args: &CopyArgs, path: &std::path::Path) -> Result<CopySummary, String> {
    let cfg = config::load(path).map_err(|e| e.to_string())?;
    let built = config::build(&cfg, ReactorConfig::default()).map_err(|e| e.to_string())?;
    let mut engine = built.engine;
    let dev = engine.dev_id(&args.volume).map_err(|e| e.to_string())?;
    let opts = CopyOpts {
        piece_sectors: args.piece.max(1),
        max_inflight: args.inflight.max(1),
        emulate: args.emulate,
    };
    let bar = std::io::stderr().is_terminal() && !args.json;
    let start = Instant::now();
    let mut last_draw = Instant::now();
    let r = engine
        .copy_with(dev, args.src, args.dst, args.len, opts, |done, total| {
            if bar && (last_draw.elapsed().as_millis() >= 100 || done == total) {
                last_draw = Instant::now();
                draw(done, total, start.elapsed().as_secs_f64());
            }
            true
        })
        .map_err(|s| {
            format!(
                "copy of {} sectors from {} to {} on '{}' failed: {s}",
                args.len, args.src, args.dst, args.volume
            )
        })?;
    if bar {
        eprintln!();
    }
    // Copied data must be durable like written data: flush the leaves.
    for (name, is_volume) in engine.ls() {
        if !is_volume {
            if let Ok(l) = engine.leaf(&name) {
                l.sync().map_err(|e| format!("flushing leaf {name}: {e}"))?;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(CopySummary {
        volume: args.volume.clone(),
        bytes: r.bytes,
        seconds,
        mib_s: r.bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        offloaded_bytes: r.offloaded_bytes,
        kernel_bytes: r.kernel_bytes,
        emulated_bytes: r.emulated_bytes,
    })
}

/// Runs the copy on the daemon's reactors and follows its progress.
fn run_daemon(args: &CopyArgs) -> Result<CopySummary, String> {
    use serde_json::{json, Value};
    use stackbd::daemon::control::Client;
    let path = args
        .control
        .clone()
        .unwrap_or_else(stackbd::daemon::default_control_path);
    let mut c = Client::connect_trusted(&path)?;
    let mut call = |cmd: &str, a: Value| -> Result<Value, String> {
        let r = c.call(cmd, a).map_err(|e| format!("control socket: {e}"))?;
        if r.get("ok") == Some(&Value::Bool(true)) {
            Ok(r)
        } else {
            Err(r
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_string())
        }
    };
    let stats =
        |call: &mut dyn FnMut(&str, Value) -> Result<Value, String>| -> Result<[u64; 3], String> {
            let s = call("stats", json!({}))?;
            let t = &s["totals"];
            Ok([
                "copy_offloaded_bytes",
                "copy_kernel_bytes",
                "copy_emulated_bytes",
            ]
            .map(|k| t[k].as_u64().unwrap_or(0)))
        };
    let before = stats(&mut call)?;
    let start = call(
        "copy_start",
        json!({"name": args.volume, "src": args.src, "dst": args.dst, "len": args.len,
               "emulate": args.emulate, "piece": args.piece, "inflight": args.inflight}),
    )?;
    let id = start["id"].as_u64().ok_or("daemon gave no job id")?;
    let bar = std::io::stderr().is_terminal() && !args.json;
    let t0 = Instant::now();
    let status = loop {
        let s = call("copy_status", json!({"id": id}))?;
        let (done, total) = (
            s["done_sectors"].as_u64().unwrap_or(0),
            s["total_sectors"].as_u64().unwrap_or(0),
        );
        if bar {
            draw(done, total, t0.elapsed().as_secs_f64());
        }
        if s["finished"] == Value::Bool(true) {
            break s["status"].as_str().unwrap_or("?").to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if bar {
        eprintln!();
    }
    if status != "ok" {
        return Err(format!("copy on '{}' failed: {status}", args.volume));
    }
    let after = stats(&mut call)?;
    let seconds = t0.elapsed().as_secs_f64();
    let bytes = args.len * SECTOR_SIZE as u64;
    Ok(CopySummary {
        volume: args.volume.clone(),
        bytes,
        seconds,
        mib_s: bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        offloaded_bytes: after[0] - before[0],
        kernel_bytes: after[1] - before[1],
        emulated_bytes: after[2] - before[2],
    })
}

fn draw(done: u64, total: u64, secs: f64) {
    let width = 40;
    let frac = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = (frac * width as f64) as usize;
    let rate = done as f64 * SECTOR_SIZE as f64 / (1 << 20) as f64 / secs.max(1e-9);
    let mut e = std::io::stderr();
    let _ = write!(
        e,
        "\r[{}{}] {:>3.0}% {:.0} MiB/s",
        "=".repeat(filled),
        " ".repeat(width - filled),
        frac * 100.0,
        rate
    );
    let _ = e.flush();
}
