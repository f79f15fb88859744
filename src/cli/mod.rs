//! The `twinvm` command line.

mod clone;
mod demo;
mod drill;
pub mod pair;
mod replay;
mod run;
pub mod size;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use drill::DrillArgs;
pub use pair::{BackupArgs, PrimaryArgs, StatusArgs};
pub use replay::{RecordArgs, ReplayArgs};
pub use run::RunArgs;

/// twinvm: fault-tolerant single-vCPU KVM virtual machines.
#[derive(Debug, Parser)]
#[command(name = "twinvm", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest (a test guest ELF, `builtin:NAME`, or a Linux kernel) and run it until it powers off.
    Run(run::PlainRunArgs),
    /// Run a guest like `run` and record its nondeterministic inputs to a log.
    Record(RecordArgs),
    /// Re-execute a guest from a recorded log and check it ends in the identical state.
    Replay(ReplayArgs),
    /// Run the primary replica of a fault-tolerant VM: stream the log to the backup, hold outputs until acknowledged.
    Primary(PrimaryArgs),
    /// Run the backup replica: replay the primary's log one epoch behind, go live if the primary is lost.
    Backup(BackupArgs),
    /// Show a running replica's role, state, lag, log rate and held outputs.
    Status(StatusArgs),
    /// Repair a pair: clone a primary running alone, live, to a new backup
    /// (`twinvm backup --from-clone`), and show the copy's progress.
    Clone(clone::CloneArgs),
    /// The arbiter: a Raft-replicated test-and-set service (serve, tas, reset, get, status, selftest, ...).
    #[command(subcommand)]
    Arbiter(arbiter::cli::ArbiterCommand),
    /// Failover drills: kill the primary or backup, cut the logging link, or kill the arbiter's
    /// leader, and report who went live, the failover time, lost requests and split-brain.
    Drill(DrillArgs),
    /// Show a VM survive the loss of its host (the local kill-primary drill), then record and replay a guest.
    Demo,
    /// List the test guests embedded in this binary (use them as `--kernel builtin:NAME`).
    Guests,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Entry point of the `twinvm` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Record(args) => replay::record(&args),
        Command::Replay(args) => replay::replay(&args),
        Command::Primary(args) => pair::primary(&args),
        Command::Backup(args) => pair::backup(&args),
        Command::Status(args) => pair::status(&args),
        Command::Clone(args) => clone::clone(&args),
        Command::Arbiter(cmd) => std::env::current_exe()
            .map_err(anyhow::Error::from)
            .and_then(|exe| {
                // Servers the selftest or a benchmark starts are this binary's `arbiter serve`.
                let launcher = arbiter::local_cluster::Launcher {
                    exe,
                    prefix_args: vec!["arbiter".into(), "serve".into()],
                };
                arbiter::cli::run_with_launcher(cmd, launcher)
            }),
        Command::Drill(args) => drill::drill(&args),
        Command::Demo => demo::demo(),
        Command::Guests => {
            for name in crate::guests::names() {
                println!("builtin:{name:<12}  {}", crate::guests::describe(name));
            }
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("twinvm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
