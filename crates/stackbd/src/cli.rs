//! The dmsetup-style verbs (`create`, `load`, `suspend`, `info`, `ls --tree`, ...) plus leaf and
//! export management, `stats` and `shutdown`. Each verb sends one request to the daemon's control
//! socket and prints the reply as dmsetup would, where dmsetup has the verb; `--json` prints the
//! daemon's reply object instead. Errors go to stderr as `stackbd VERB: <error>`, exit status 1.

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use stackbd::daemon::control::{reply_line, Client};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

mod all;
mod leaf;
mod luks;
mod render;
mod snapshot;

use render::render;

pub use luks::LuksCmd;
pub use snapshot::SnapshotCmd;

/// How to reach the daemon and how to print; on every verb.
#[derive(Args, Debug, Clone, Default)]
pub struct Conn {
    /// The daemon's control socket [default: $STACKBD_CONTROL, else /run/stackbd/control.sock for root, else under $XDG_RUNTIME_DIR or /tmp/stackbd-UID]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print the daemon's reply object (one line of JSON) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A table, as dmsetup writes it: lines `start length target args...`.
#[derive(Args, Debug, Clone)]
pub struct TableSource {
    /// The table text; lines are separated by newlines or ';'.
    #[arg(long, value_name = "TEXT", conflicts_with = "table_file")]
    pub table: Option<String>,
    /// Read the table from a file ('-' reads standard input).
    #[arg(long, value_name = "FILE")]
    pub table_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Create a volume, empty or with a live table.
    Create {
        name: String,
        #[command(flatten)]
        table: TableSource,
        /// Create it without a table (otherwise, with neither --table nor --table-file, the
        /// table is read from standard input when that is not a terminal, as dmsetup does).
        #[arg(long, conflicts_with_all = ["table", "table_file"])]
        notable: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Load a table into the volume's inactive slot (the live table is untouched until resume).
    Load {
        name: String,
        #[command(flatten)]
        table: TableSource,
        #[command(flatten)]
        conn: Conn,
    },
    /// Drop the volume's inactive table.
    Clear {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Suspend a volume: in-flight I/O drains, new I/O is held (not failed).
    ///
    /// The volume resumes by itself after a deadline (60 s unless --deadline or --no-deadline),
    /// with a warning in the daemon's log.
    Suspend {
        name: String,
        /// Keep I/O that waits for a path (multipath queue_if_no_path) instead of failing it: it
        /// is held by the volume and goes on after resume, through a new table if one was loaded.
        #[arg(long)]
        noflush: bool,
        /// Resume by itself after SECS seconds, with a warning in the daemon's log.
        #[arg(
            long,
            value_name = "SECS",
            conflicts_with = "no_deadline",
            allow_hyphen_values = true
        )]
        deadline: Option<String>,
        /// Stay suspended until `resume`, however long that takes.
        #[arg(long)]
        no_deadline: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Resume a volume: swap in the inactive table if there is one, let held I/O go.
    Resume {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Load + suspend + resume: replace the live table.
    Reload {
        name: String,
        #[command(flatten)]
        table: TableSource,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a volume.
    ///
    /// Refused while another table uses it, or while it is open or exported, unless --force.
    Remove {
        name: String,
        /// Remove even though it is open or exported (its exports go too).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List devices (volumes and leaves); --tree shows what each volume stacks on.
    Ls {
        #[arg(long)]
        tree: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// State, tables, open count, event number of a volume.
    /// A volume's state (every volume's without NAME, as dmsetup does).
    Info {
        name: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a volume's live (or inactive) table.
    Table {
        /// Without it, every volume's table, each line prefixed `NAME: `.
        name: Option<String>,
        /// The inactive table instead of the live one.
        #[arg(long)]
        inactive: bool,
        /// Print crypt keys (without it they print as zeros, as in dmsetup).
        #[arg(long)]
        showkeys: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print each target's status.
    Status {
        /// Without it, every volume's status, each line prefixed `NAME: `.
        name: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove every volume (those no other volume uses first), as dmsetup remove_all.
    #[command(name = "remove_all", alias = "remove-all")]
    RemoveAll {
        /// Also volumes that are exported or open.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// The target types tables may use, with their versions.
    Targets,
    /// This program's version and the daemon's.
    Version {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show or set a volume's request queue (used while its table is request-based, e.g.
    /// multipath): the scheduler (none, deadline) and nr_requests (requests out at once per
    /// reactor).
    Queue {
        name: String,
        #[arg(long)]
        scheduler: Option<String>,
        #[arg(long)]
        nr_requests: Option<u32>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Send a message to the target that holds SECTOR (options go before SECTOR).
    Message {
        name: String,
        sector: String,
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "MSG"
        )]
        msg: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The devices a volume's live table maps onto.
    Deps {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Wait until the volume's event number exceeds EVENT_NR (default 0); prints it.
    Wait {
        name: String,
        event_nr: Option<String>,
        /// Give up after SECS seconds (exit status 1).
        #[arg(long, value_name = "SECS", allow_hyphen_values = true)]
        timeout: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Leaf devices: add, rm, ls, message.
    Leaf {
        #[command(subcommand)]
        cmd: LeafCmd,
    },
    /// NBD exports: add, rm, ls.
    Export {
        #[command(subcommand)]
        cmd: ExportCmd,
    },
    /// LUKS volumes: open (unlock a header, create a crypt volume), close, format, dump.
    Luks {
        #[command(subcommand)]
        cmd: LuksCmd,
    },
    /// Snapshots as LVM makes them: create (re-tables the origin), merge, rm.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Reactor counters (I/O, splits, pools, frame overflows), exports and volumes.
    Stats {
        /// Only this volume or export.
        name: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop the daemon cleanly (connections drain, leaves flush, state is written).
    Shutdown {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand, Debug)]
pub enum LeafCmd {
    /// Add a leaf: `m0 mem 1GiB`, `n0 null 1GiB`, `f0 file /path/disk.img [--direct]
    /// [--queue-depth N]`, `r0 nbd nbd://host:port/export [--connections N] [--timeout 5s]`
    /// (or `nbd+unix:///export?socket=PATH`), `p0 powercut 64MiB [seed=N tear=true
    /// reorder=true cut_after=N cut_random=LO..HI image=PATH]`; any parameter also as
    /// KEY=VALUE (`queue_depth=8`), as the config file names it.
    Add {
        name: String,
        /// mem, null, file, nbd or powercut.
        kind: String,
        /// The main parameter (mem, null, powercut: the size, bytes or 512K, 64MiB, 1GiB...; file: the
        /// path; nbd: the URI), then KEY=VALUE parameters.
        #[arg(value_name = "SIZE|PATH|URI|KEY=VALUE", required = true)]
        args: Vec<String>,
        /// O_DIRECT (file leaves).
        #[arg(long)]
        direct: bool,
        /// Ring depth per reactor (file leaves, 1..=4096, default 256).
        #[arg(long, value_name = "N")]
        queue_depth: Option<u32>,
        /// Connections per reactor when the server allows multi-conn (nbd leaves, 1..=64).
        #[arg(long, value_name = "N")]
        connections: Option<u32>,
        /// A request older than this is a path error (nbd leaves: 5s, 500ms; default 30s).
        #[arg(long, value_name = "DURATION")]
        timeout: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a leaf no table uses.
    Rm {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List leaves: kind, state, size, arguments, the volumes on them.
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
    /// Open again a leaf that failed at start (every one without NAME); what waited on it
    /// comes up. The daemon also retries by itself every 15 s.
    Retry {
        name: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Send a message to a leaf (powercut: `cut`, `save PATH`, `stats`); prints its reply.
    Message {
        name: String,
        /// The message words (`--` before any that starts with '-').
        #[arg(required = true, value_name = "ARG")]
        args: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand, Debug)]
pub enum ExportCmd {
    /// Export a volume over NBD (under its own name unless --name).
    Add {
        volume: String,
        /// The export name clients ask for.
        #[arg(long, value_name = "EXPORT")]
        name: Option<String>,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop exporting (connected clients keep their connection until they close it).
    Rm {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List exports.
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
}

impl Verb {
    /// The verb as the user typed it, for error messages.
    fn name(&self) -> &'static str {
        match self {
            Verb::Create { .. } => "create",
            Verb::Load { .. } => "load",
            Verb::Clear { .. } => "clear",
            Verb::Suspend { .. } => "suspend",
            Verb::Resume { .. } => "resume",
            Verb::Reload { .. } => "reload",
            Verb::Remove { .. } => "remove",
            Verb::Ls { .. } => "ls",
            Verb::Info { .. } => "info",
            Verb::Table { .. } => "table",
            Verb::Status { .. } => "status",
            Verb::RemoveAll { .. } => "remove_all",
            Verb::Targets => "targets",
            Verb::Version { .. } => "version",
            Verb::Queue { .. } => "queue",
            Verb::Message { .. } => "message",
            Verb::Deps { .. } => "deps",
            Verb::Wait { .. } => "wait",
            Verb::Leaf { cmd } => match cmd {
                LeafCmd::Add { .. } => "leaf add",
                LeafCmd::Rm { .. } => "leaf rm",
                LeafCmd::Ls { .. } => "leaf ls",
                LeafCmd::Retry { .. } => "leaf retry",
                LeafCmd::Message { .. } => "leaf message",
            },
            Verb::Export { cmd } => match cmd {
                ExportCmd::Add { .. } => "export add",
                ExportCmd::Rm { .. } => "export rm",
                ExportCmd::Ls { .. } => "export ls",
            },
            Verb::Luks { cmd } => cmd.name(),
            Verb::Snapshot { cmd } => cmd.name(),
            Verb::Stats { .. } => "stats",
            Verb::Shutdown { .. } => "shutdown",
        }
    }

    fn conn(&self) -> &Conn {
        match self {
            Verb::Create { conn, .. }
            | Verb::Load { conn, .. }
            | Verb::Clear { conn, .. }
            | Verb::Suspend { conn, .. }
            | Verb::Resume { conn, .. }
            | Verb::Reload { conn, .. }
            | Verb::Remove { conn, .. }
            | Verb::Ls { conn, .. }
            | Verb::Info { conn, .. }
            | Verb::Table { conn, .. }
            | Verb::Status { conn, .. }
            | Verb::RemoveAll { conn, .. }
            | Verb::Version { conn }
            | Verb::Queue { conn, .. }
            | Verb::Message { conn, .. }
            | Verb::Deps { conn, .. }
            | Verb::Wait { conn, .. }
            | Verb::Stats { conn, .. }
            | Verb::Shutdown { conn } => conn,
            Verb::Leaf { cmd } => match cmd {
                LeafCmd::Add { conn, .. }
                | LeafCmd::Rm { conn, .. }
                | LeafCmd::Ls { conn }
                | LeafCmd::Retry { conn, .. }
                | LeafCmd::Message { conn, .. } => conn,
            },
            Verb::Export { cmd } => match cmd {
                ExportCmd::Add { conn, .. }
                | ExportCmd::Rm { conn, .. }
                | ExportCmd::Ls { conn } => conn,
            },
            Verb::Luks { cmd } => cmd.conn().unwrap_or(&NO_CONN),
            Verb::Targets => &NO_CONN,
            Verb::Snapshot { cmd } => cmd.conn(),
        }
    }
}

/// Why a verb failed, and the daemon's reply line if there was one (printed with --json).
struct Fail {
    msg: String,
    reply: Option<String>,
}

impl From<String> for Fail {
    fn from(msg: String) -> Fail {
        Fail { msg, reply: None }
    }
}

/// The connection of a verb that needs no daemon.
static NO_CONN: Conn = Conn {
    control: None,
    json: false,
};

pub fn run(v: Verb) -> ExitCode {
    let verb = v.name();
    if let Verb::Targets = &v {
        out(&all::targets());
        return ExitCode::SUCCESS;
    }
    if let Verb::Snapshot { cmd } = &v {
        return snapshot::run(cmd);
    }
    if let Verb::Luks { cmd } = &v {
        if cmd.conn().is_none() {
            return match luks::run_local(cmd) {
                Ok(text) => {
                    out(&text);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stackbd {verb}: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    let conn = v.conn().clone();
    match execute(&v, &conn) {
        Ok(text) => {
            out(&text);
            ExitCode::SUCCESS
        }
        Err(f) => {
            if conn.json {
                let reply = f.reply.unwrap_or_else(|| reply_line(Err(f.msg.clone())));
                out(&format!("{reply}\n"));
            }
            eprintln!("stackbd {verb}: {}", f.msg);
            ExitCode::FAILURE
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
}

fn execute(v: &Verb, conn: &Conn) -> Result<String, Fail> {
    let path = conn
        .control
        .clone()
        .unwrap_or_else(stackbd::daemon::default_control_path);
    if let Verb::Version { .. } = v {
        return Ok(all::version(Client::connect_trusted(&path).ok().as_mut()));
    }
    let (cmd, args) = request(v)?;
    // Checks the socket's directory, the socket and the daemon's credentials first.
    let mut client = Client::connect_trusted(&path)?;
    match v {
        Verb::Info { name: None, .. }
        | Verb::Table { name: None, .. }
        | Verb::Status { name: None, .. } => return all::each_volume(v, &mut client, conn),
        Verb::RemoveAll { force, .. } => return all::remove_all(&mut client, *force),
        _ => {}
    }
    let (line, reply) = client
        .call_raw(cmd, args.clone())
        .map_err(|e| format!("lost the daemon at {}: {e}", path.display()))?;
    if reply.get("ok").and_then(Value::as_bool) != Some(true) {
        let msg = reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the daemon refused the request without saying why")
            .to_string();
        return Err(Fail {
            msg,
            reply: Some(line.clone()),
        });
    }
    if let Verb::Wait { name, .. } = v {
        if reply.get("timed_out").and_then(Value::as_bool) == Some(true) {
            let nr = reply.get("event_nr").and_then(Value::as_u64).unwrap_or(0);
            let after = args_u64(&args, "event_nr");
            return Err(Fail {
                msg: format!(
                    "timed out: the event number of '{name}' is still {nr} (waiting for more \
                     than {after})"
                ),
                reply: Some(line.clone()),
            });
        }
    }
    if let Verb::Shutdown { .. } = v {
        if !client.wait_closed(Duration::from_secs(90)) {
            return Err(Fail {
                msg: "the daemon accepted the shutdown but is still running after 90 s".into(),
                reply: Some(line.clone()),
            });
        }
    }
    if conn.json {
        return Ok(format!("{line}\n"));
    }
    Ok(render(v, &reply))
}

fn args_u64(args: &Value, k: &str) -> u64 {
    args.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn parse_u64(what: &str, s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .map_err(|_| format!("invalid {what} '{s}': expected a whole number"))
}

fn parse_secs(opt: &str, s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok(x),
        _ => Err(format!(
            "invalid {opt} '{s}': expected a number of seconds > 0"
        )),
    }
}

fn read_table(t: &TableSource) -> Result<Option<String>, String> {
    if let Some(text) = &t.table {
        return Ok(Some(text.clone()));
    }
    let Some(p) = &t.table_file else {
        return Ok(None);
    };
    let mut text = String::new();
    if p == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read the table from standard input: {e}"))?;
    } else {
        text = std::fs::read_to_string(p)
            .map_err(|e| format!("cannot read table file {}: {e}", p.display()))?;
    }
    Ok(Some(text))
}

/// `create NAME` with no table option: dmsetup reads the table from standard input; so do we,
/// unless it is a terminal (then the volume is created empty, as with `--notable`).
fn stdin_table() -> Result<Option<String>, String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the table from standard input: {e}"))?;
    Ok(Some(text))
}

fn required_table(t: &TableSource) -> Result<String, String> {
    read_table(t)?.ok_or_else(|| "a table is required: --table TEXT or --table-file FILE".into())
}

/// The request a verb sends: (command, fields).
fn request(v: &Verb) -> Result<(&'static str, Value), String> {
    Ok(match v {
        Verb::Create {
            name,
            table,
            notable,
            ..
        } => {
            let mut a = json!({ "name": name });
            let text = match read_table(table)? {
                Some(t) => Some(t),
                None if *notable => None,
                None => stdin_table()?,
            };
            if let Some(t) = text {
                a["table"] = json!(t);
            }
            ("create", a)
        }
        // Answered without a request of their own (see `execute`).
        Verb::RemoveAll { .. } | Verb::Targets | Verb::Version { .. } => ("ping", json!({})),
        Verb::Load { name, table, .. } => (
            "load",
            json!({"name": name, "table": required_table(table)?}),
        ),
        Verb::Reload { name, table, .. } => (
            "reload",
            json!({"name": name, "table": required_table(table)?}),
        ),
        Verb::Clear { name, .. } => ("clear", json!({ "name": name })),
        Verb::Suspend {
            name,
            noflush,
            deadline,
            no_deadline,
            ..
        } => {
            let mut a = json!({"name": name, "noflush": noflush});
            if *no_deadline {
                a["deadline_s"] = Value::Null;
            } else if let Some(s) = deadline {
                a["deadline_s"] = json!(parse_secs("--deadline", s)?);
            }
            ("suspend", a)
        }
        Verb::Resume { name, .. } => ("resume", json!({ "name": name })),
        Verb::Remove { name, force, .. } => ("remove", json!({"name": name, "force": force})),
        Verb::Ls { tree, .. } => ("ls", json!({ "tree": tree })),
        Verb::Info { name, .. } => ("info", json!({ "name": name })),
        Verb::Table {
            name,
            inactive,
            showkeys,
            ..
        } => (
            "table",
            json!({"name": name, "inactive": inactive, "showkeys": showkeys}),
        ),
        Verb::Luks { cmd } => luks::request(cmd)?,
        Verb::Snapshot { .. } => {
            unreachable!("snapshot verbs run several requests (cli::snapshot)")
        }
        Verb::Status { name, .. } => ("status", json!({ "name": name })),
        Verb::Queue {
            name,
            scheduler,
            nr_requests,
            ..
        } => (
            "queue",
            json!({"name": name, "scheduler": scheduler, "nr_requests": nr_requests}),
        ),
        Verb::Message {
            name, sector, msg, ..
        } => {
            let sector = sector.parse::<u64>().map_err(|_| {
                format!("invalid sector '{sector}': expected a whole number of 512-byte sectors")
            })?;
            (
                "message",
                json!({"name": name, "sector": sector, "argv": msg}),
            )
        }
        Verb::Deps { name, .. } => ("deps", json!({ "name": name })),
        Verb::Wait {
            name,
            event_nr,
            timeout,
            ..
        } => {
            let mut a = json!({ "name": name });
            if let Some(n) = event_nr {
                a["event_nr"] = json!(parse_u64("event number", n)?);
            }
            if let Some(t) = timeout {
                a["timeout_s"] = json!(parse_secs("--timeout", t)?);
            }
            ("wait", a)
        }
        Verb::Leaf { cmd } => match cmd {
            LeafCmd::Add {
                name,
                kind,
                args,
                direct,
                queue_depth,
                connections,
                timeout,
                ..
            } => {
                let a = leaf::AddArgs {
                    args,
                    direct: *direct,
                    queue_depth: *queue_depth,
                    connections: *connections,
                    timeout: timeout.as_deref(),
                };
                ("leaf_add", leaf::add_request(name, kind, &a)?)
            }
            LeafCmd::Rm { name, .. } => ("leaf_rm", json!({ "name": name })),
            LeafCmd::Ls { .. } => ("leaf_ls", json!({})),
            LeafCmd::Retry { name, .. } => ("leaf_retry", json!({ "name": name })),
            LeafCmd::Message { name, args, .. } => {
                ("leaf_message", leaf::message_request(name, args))
            }
        },
        Verb::Export { cmd } => match cmd {
            ExportCmd::Add {
                volume,
                name,
                read_only,
                ..
            } => {
                let mut a = json!({"volume": volume, "read_only": read_only});
                if let Some(n) = name {
                    a["name"] = json!(n);
                }
                ("export_add", a)
            }
            ExportCmd::Rm { name, .. } => ("export_rm", json!({ "name": name })),
            ExportCmd::Ls { .. } => ("export_ls", json!({})),
        },
        Verb::Stats { name, .. } => {
            let mut a = json!({});
            if let Some(n) = name {
                a["name"] = json!(n);
            }
            ("stats", a)
        }
        Verb::Shutdown { .. } => ("shutdown", json!({})),
    })
}
