//! Several orchestrators on one PostgreSQL database
//! (`CLAUDE_FLOW_TEST_POSTGRES`): one leads and runs the work, the others
//! stand by, and one of them takes over when the leader stops.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use claude_flow_core::state::TestDb;
use claude_flow_core::state::{PostgresSettings, PostgresStore};
use claude_flow_core::{
    ExitKind, FnRunner, Issue, IssueKey, IssueStatus, MemorySource, Orchestrator, RunOutcome,
    Settings, StateStore, Summary,
};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(60);

fn key(n: u64) -> IssueKey {
    IssueKey::new("acme/app".parse().unwrap(), n)
}

fn issue(n: u64) -> Issue {
    Issue::new(key(n), format!("issue {n}"))
}

/// Counts workflow runs across every daemon; fails the workflow that
/// would make two run for one issue at once.
#[derive(Default)]
struct Running {
    runs: AtomicUsize,
    per_issue: std::sync::Mutex<std::collections::HashSet<u64>>,
}

fn runner(running: Arc<Running>) -> FnRunner {
    FnRunner::new(move |job, _cancel| {
        let running = Arc::clone(&running);
        async move {
            let n = job.issue.key.number;
            assert!(
                running.per_issue.lock().unwrap().insert(n),
                "issue {n} runs twice at once"
            );
            running.runs.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            running.per_issue.lock().unwrap().remove(&n);
            Ok(RunOutcome {
                exit: ExitKind::Code(0),
                pr_url: None,
                log_path: None,
                duration: Duration::ZERO,
                retry_after: None,
            })
        }
    })
}

struct Daemon {
    orchestrator: Arc<Orchestrator>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<Summary, claude_flow_core::Error>>,
}

async fn start(
    db: &TestDb,
    node: &str,
    source: Arc<MemorySource>,
    running: Arc<Running>,
) -> Daemon {
    let settings = PostgresSettings {
        lease: Duration::from_secs(2),
        ..PostgresSettings::default()
    };
    let store = PostgresStore::connect(&db.url, settings).await.unwrap();
    let orchestrator = Arc::new(
        Orchestrator::builder()
            .source(source)
            .runner(Arc::new(runner(running)))
            .store(Arc::new(store))
            .settings(Settings {
                poll_interval: Duration::from_millis(100),
                shutdown_grace: Duration::from_secs(5),
                node: node.to_owned(),
                ..Settings::default()
            })
            .build()
            .unwrap(),
    );
    let shutdown = CancellationToken::new();
    let (o, s) = (Arc::clone(&orchestrator), shutdown.clone());
    let task = tokio::spawn(async move { o.run(s).await });
    Daemon {
        orchestrator,
        shutdown,
        task,
    }
}

async fn wait_done(store: &PostgresStore, numbers: std::ops::RangeInclusive<u64>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let records = store.list().await.unwrap();
        let done = numbers.clone().all(|n| {
            records
                .iter()
                .any(|r| r.key() == &key(n) && r.status == IssueStatus::Done)
        });
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "issues {numbers:?} not all done: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_leads_the_others_stand_by_and_one_takes_over_when_it_stops() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let source = Arc::new(MemorySource::new((1..=5).map(issue)));
    let running = Arc::new(Running::default());
    let a = start(&db, "a", Arc::clone(&source), Arc::clone(&running)).await;
    let b = start(&db, "b", Arc::clone(&source), Arc::clone(&running)).await;
    let observer = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    wait_done(&observer, 1..=5).await;
    assert_eq!(
        running.runs.load(Ordering::SeqCst),
        5,
        "each issue ran once"
    );

    // Exactly one of them polled: the leader.
    let polled: Vec<bool> = [&a, &b]
        .iter()
        .map(|d| d.orchestrator.status().last_poll.is_some())
        .collect();
    assert_eq!(polled.iter().filter(|p| **p).count(), 1, "{polled:?}");
    let (leader, standby) = if polled[0] { (a, b) } else { (b, a) };

    // The leader stops gracefully: it hands over, and the other daemon
    // runs what comes next.
    leader.shutdown.cancel();
    leader.task.await.unwrap().unwrap();
    for n in 6..=8 {
        source.push(issue(n));
    }
    wait_done(&observer, 6..=8).await;
    assert!(standby.orchestrator.status().last_poll.is_some());
    assert_eq!(
        running.runs.load(Ordering::SeqCst),
        8,
        "each issue ran once"
    );
    standby.shutdown.cancel();
    standby.task.await.unwrap().unwrap();
}
