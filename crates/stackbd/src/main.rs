//! `stackbd`: the command line. One subcommand per verb; `check` for now (`serve`, `bench` and the
//! dmsetup verbs come as further `Command` variants, each in its own module).

mod bench;
mod check;
mod cli;
mod copy_cmd;

use clap::{Parser, Subcommand};
use stackbd_core::alloc_count::CountingAlloc;
use std::process::ExitCode;

/// Counts heap allocations per thread, so `bench` can report allocations per I/O.
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[derive(Parser, Debug)]
#[command(
    name = "stackbd",
    version,
    about = "A device mapper that runs as a program"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build the stack a config file describes and print it, or print every error in it.
    Check(check::CheckArgs),
    /// Load a volume from reactor threads and report IOPS, latency and allocations per I/O.
    Bench(bench::BenchArgs),
    /// Run the daemon: serve volumes over NBD (the demo stack without --config).
    Serve(Box<stackbd::daemon::ServeArgs>),
    /// Copy sectors within a volume through the copy engine (offloaded where the stack can).
    Copy(copy_cmd::CopyArgs),
    /// The dmsetup-style verbs, leaf/export management, stats and shutdown (via the daemon).
    #[command(flatten)]
    Client(cli::Verb),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => stackbd::daemon::run(&args),
        Command::Copy(args) => copy_cmd::run(&args),
        Command::Client(verb) => cli::run(verb),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
