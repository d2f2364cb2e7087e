//! Embedding with a custom `IssueSource`: the program feeds issues into an
//! in-process queue, and the real subprocess runner and file store do the
//! rest. Run: `cargo run -p claude-flow-core --example queue_source`.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use claude_flow_core::runner::SubprocessSettings;
use claude_flow_core::{
    FileStore, Issue, IssueKey, IssueSource, Orchestrator, Report, Reports, Settings, SourceError,
    SubprocessRunner,
};

/// Issues the program has queued; an issue stays wanted while queued
/// (one that leaves the queue is cancelled at the next poll).
#[derive(Default)]
struct QueueSource {
    queue: Mutex<Vec<Issue>>,
}

impl QueueSource {
    fn push(&self, number: u64, title: &str) -> Result<(), Box<dyn std::error::Error>> {
        let key = IssueKey::new("acme/app".parse()?, number);
        self.queue
            .lock()
            .map_err(|e| e.to_string())?
            .push(Issue::new(key, title));
        Ok(())
    }

    fn snapshot(&self) -> Vec<Issue> {
        self.queue.lock().map(|q| q.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl IssueSource for QueueSource {
    async fn poll(&self) -> Result<Vec<Issue>, SourceError> {
        Ok(self.snapshot())
    }

    /// The reporter calls this with each issue's latest state, off the
    /// workflow slots, and again later if it fails.
    async fn report(
        &self,
        issue: &Issue,
        report: &Report,
        _: &mut Reports,
    ) -> Result<(), SourceError> {
        match report {
            Report::Started(start) => println!("{}: attempt {} started", issue.key, start.attempt),
            Report::Succeeded(done) => println!(
                "{}: done, PR {}",
                issue.key,
                done.pr_url.as_deref().unwrap_or("none")
            ),
            Report::Failed(failure) => println!(
                "{}: failed after {} attempts: {}",
                issue.key, failure.attempts, failure.reason
            ),
            Report::Cancelled(cancel) => println!("{}: cancelled: {}", issue.key, cancel.reason),
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let state =
        std::env::temp_dir().join(format!("claude-flow-queue-example-{}", std::process::id()));
    let source = Arc::new(QueueSource::default());
    source.push(1, "Add a health check")?;
    source.push(2, "Fix the flaky test")?;

    let workflow = r#"echo "working on $CLAUDE_FLOW_ISSUE_TITLE"; echo "https://github.com/acme/app/pull/$CLAUDE_FLOW_ISSUE_NUMBER""#;
    let runner = SubprocessRunner::new(SubprocessSettings {
        command: vec!["sh".into(), "-c".into(), workflow.into()],
        workspace_dir: state.join("workspaces"),
        log_dir: state.join("logs"),
        timeout: std::time::Duration::from_secs(60),
        kill_grace: std::time::Duration::from_secs(5),
        env: Default::default(),
        token: None,
    });
    let orchestrator = Orchestrator::builder()
        .source(source)
        .runner(Arc::new(runner))
        .store(Arc::new(FileStore::open(state.join("state"))?))
        .settings(Settings::default())
        .build()?;
    let summary = orchestrator.run_once(Default::default()).await?;
    println!(
        "{} done, {} failed; state in {}",
        summary.done,
        summary.failed,
        state.display()
    );
    Ok(())
}
