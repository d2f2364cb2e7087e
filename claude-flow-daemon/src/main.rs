//! `claude-flow-daemon`: the long-running service. It runs the orchestrator
//! until SIGINT or SIGTERM, then stops gracefully.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use claude_flow_core::{Config, Error, app, logging, signals};

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
        .and_then(|rt| rt.block_on(serve(&args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("claude-flow-daemon: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

async fn serve(args: &Args) -> Result<(), Error> {
    let config = Config::load(&args.config)?;
    logging::init(&config.log);
    let (orchestrator, _store) = app::orchestrator(&config)?;
    let shutdown = signals::shutdown_token()
        .map_err(|e| Error::Other(format!("cannot listen for signals: {e}")))?;
    tracing::info!(config = %args.config.display(), "claude-flow-daemon started");
    orchestrator.run(shutdown).await?;
    tracing::info!("claude-flow-daemon stopped");
    Ok(())
}
