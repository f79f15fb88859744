//! `twinvm-arbiter`: the arbiter's own binary (same subcommands as `twinvm arbiter`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "twinvm-arbiter",
    about = "Raft-replicated test-and-set arbiter for twinvm"
)]
struct Cli {
    #[command(subcommand)]
    command: arbiter::cli::ArbiterCommand,
}

fn main() -> ExitCode {
    arbiter::cli::init_logging();
    let cli = Cli::parse();
    match arbiter::cli::run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
