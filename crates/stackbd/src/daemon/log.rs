//! The daemon's log: `tracing` events to standard error, one line each, as text (with a UTC
//! timestamp and the level) or JSON. `--log-level` sets the default filter; `RUST_LOG`, when set,
//! wins (the usual `target=level,...` directives). Installed once, at the start of `serve`.

use tracing_subscriber::EnvFilter;

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-03T18:40:00.123456Z  WARN stackbd::daemon: message key=value`
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Least severe events logged: error, warn, info, debug or trace (RUST_LOG, when set, wins).
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
    /// How each log line is written.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Installs the subscriber; a second call (tests that start several daemons in one process)
/// keeps the first.
pub fn init(a: &LogArgs) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&a.log_level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = match a.log_format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}
