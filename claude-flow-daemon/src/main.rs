//! `claude-flow-daemon`: the long-running service. Runs until SIGINT or
//! SIGTERM (graceful; a second signal stops at once), reloads its
//! configuration on SIGHUP.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use claude_flow_core::Error;
use claude_flow_daemon::{Daemon, signals};

/// The claude-flow service: watches for triggered issues and runs their workflows.
#[derive(Debug, Parser)]
#[command(name = "claude-flow-daemon", version)]
struct Args {
    /// The configuration file.
    #[arg(
        long,
        env = "CLAUDE_FLOW_CONFIG",
        default_value = claude_flow_core::config::DEFAULT_CONFIG_PATH
    )]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        // Blocking work is short file I/O; a few threads (each with its own
        // allocator arena) are plenty.
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))
        .and_then(|rt| {
            rt.block_on(async {
                let handle = Daemon::builder(&args.config).build()?.start().await?;
                signals::forward(&handle)
                    .map_err(|e| Error::Other(format!("cannot listen for signals: {e}")))?;
                handle.wait().await
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("claude-flow-daemon: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}
