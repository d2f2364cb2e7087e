//! Embedding with a custom `WorkflowRunner`: a Rust closure does the work
//! instead of a subprocess, and honours cancellation. Issues come from a
//! directory of Markdown files, state from the durable file store.
//! Run: `cargo run -p claude-flow-core --example closure_runner`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use claude_flow_core::{
    ExitKind, FileStore, FnRunner, LocalSource, Orchestrator, RunOutcome, Settings, WorkflowJob,
};
use tokio_util::sync::CancellationToken;

/// The "workflow": pretends to work for a moment, unless cancelled.
async fn work(
    job: WorkflowJob,
    cancel: CancellationToken,
) -> Result<RunOutcome, claude_flow_core::RunnerError> {
    let started = Instant::now();
    let exit = tokio::select! {
        () = cancel.cancelled() => ExitKind::Cancelled,
        () = tokio::time::sleep(Duration::from_millis(100)) => ExitKind::Code(0),
    };
    println!("{} (attempt {}): {:?}", job.issue.key, job.attempt, exit);
    Ok(RunOutcome {
        exit,
        pr_url: Some(format!("https://example.com/pr/{}", job.issue.key.number)),
        log_path: None,
        duration: started.elapsed(),
        retry_after: None,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::temp_dir().join(format!(
        "claude-flow-closure-example-{}",
        std::process::id()
    ));
    let issues = root.join("issues");
    std::fs::create_dir_all(&issues)?;
    std::fs::write(
        issues.join("1-greet.md"),
        "# Greet the user\n\nSay hello.\n",
    )?;
    std::fs::write(issues.join("2-farewell.md"), "# Say goodbye\n")?;

    let orchestrator = Orchestrator::builder()
        .source(Arc::new(LocalSource::new(&issues)?))
        .runner(Arc::new(FnRunner::new(work)))
        .store(Arc::new(FileStore::open(root.join("state"))?))
        .settings(Settings {
            max_concurrent: 2,
            ..Settings::default()
        })
        .build()?;
    let summary = orchestrator.run_once(CancellationToken::new()).await?;
    println!(
        "{} done, {} failed; state in {}",
        summary.done,
        summary.failed,
        root.display()
    );
    Ok(())
}
