//! `claude-flow`: run, operate and inspect the orchestrator.

mod cli;
mod commands;
mod out;
mod prune;
mod service;
mod store;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        // Blocking work is short file I/O; a few threads (each with its own
        // allocator arena) are plenty.
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("claude-flow: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is_quiet() {
                // Not eprintln!, which panics when stderr is a closed pipe.
                let _ = writeln!(std::io::stderr(), "claude-flow: {e}");
            }
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}
