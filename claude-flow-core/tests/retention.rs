//! Retention in the running service: the orchestrator removes the files of
//! issues settled longer ago than `service.retention` by itself at start,
//! and when an operator asks (`Orchestrator::prune`), never those of a
//! running or waiting issue; records stay, marked as pruned.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use claude_flow_core::retention::Retention;
use claude_flow_core::{
    ExitKind, FnRunner, Issue, IssueKey, IssueRecord, IssueStatus, MemorySource, MemoryStore,
    Orchestrator, RunOutcome, Settings, StateStore,
};
use tokio_util::sync::CancellationToken;

const DAY: Duration = Duration::from_secs(86_400);

fn key(n: u64) -> IssueKey {
    IssueKey::new("acme/app".parse().unwrap(), n)
}

fn issue(n: u64) -> Issue {
    Issue::new(key(n), format!("issue {n}"))
}

fn settled_long_ago(n: u64, status: IssueStatus) -> IssueRecord {
    let mut r = IssueRecord::new(issue(n));
    r.status = status;
    r.updated_at = SystemTime::now() - 40 * DAY;
    r
}

/// What a workflow leaves: a workspace with a file, and a log directory.
fn leave_files(retention: &Retention, n: u64, marker: &str) {
    let [workspace, logs] = retention.issue_dirs(&key(n));
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::write(workspace.join(marker), vec![b'w'; 4096]).unwrap();
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("round-1-attempt-1.log"), "log line\n").unwrap();
    std::fs::write(logs.join("round-1-attempt-1.body"), "the body").unwrap();
}

fn has_files(retention: &Retention, n: u64) -> bool {
    retention.issue_dirs(&key(n)).iter().all(|d| d.is_dir())
}

fn has_no_files(retention: &Retention, n: u64) -> bool {
    retention.issue_dirs(&key(n)).iter().all(|d| !d.exists())
}

/// Waits (up to a minute) until `check` holds.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn record(store: &MemoryStore, n: u64) -> IssueRecord {
    store.get(&key(n)).await.unwrap().expect("the record stays")
}

fn exit(code: i32) -> RunOutcome {
    RunOutcome {
        exit: ExitKind::Code(code),
        pr_url: None,
        log_path: None,
        duration: Duration::ZERO,
        retry_after: None,
    }
}

type Running = tokio::task::JoinHandle<Result<claude_flow_core::Summary, claude_flow_core::Error>>;

/// Starts an orchestrator (three slots, one poll an hour) until the token fires.
fn start(
    source: Arc<MemorySource>,
    runner: FnRunner,
    store: Arc<MemoryStore>,
    retention: Option<Retention>,
) -> (Arc<Orchestrator>, CancellationToken, Running) {
    let orchestrator = Arc::new(
        Orchestrator::builder()
            .source(source)
            .runner(Arc::new(runner))
            .store(store)
            .settings(Settings {
                poll_interval: Duration::from_secs(3600),
                max_concurrent: 3,
                retention,
                ..Settings::default()
            })
            .build()
            .unwrap(),
    );
    let shutdown = CancellationToken::new();
    let (o, s) = (Arc::clone(&orchestrator), shutdown.clone());
    let task = tokio::spawn(async move { o.run(s).await });
    (orchestrator, shutdown, task)
}

#[tokio::test]
async fn the_service_prunes_settled_issues_and_never_a_running_or_waiting_ones() {
    let root = tempfile::tempdir().unwrap();
    let retention = Retention {
        after: Duration::from_secs(1),
        workspace_dir: root.path().join("workspaces"),
        log_dir: root.path().join("logs"),
    };
    let store = Arc::new(MemoryStore::new());
    // 1: settled long ago. 2: waiting for a retry, its last change long
    // ago. 4: settled long ago, and triggered again (a new round).
    store
        .put(&settled_long_ago(1, IssueStatus::Done))
        .await
        .unwrap();
    let mut waiting = settled_long_ago(2, IssueStatus::Retrying);
    waiting.next_retry_at = Some(SystemTime::now() + DAY);
    store.put(&waiting).await.unwrap();
    store
        .put(&settled_long_ago(4, IssueStatus::Failed))
        .await
        .unwrap();
    for n in [1, 2, 4] {
        leave_files(&retention, n, "old");
    }
    let mut again = issue(4);
    again.trigger = "applied again".into();
    let source = Arc::new(MemorySource::new([issue(2), issue(3), again, issue(5)]));

    // 3 and 4 run until released; 5 settles at once.
    let release = CancellationToken::new();
    let old_files_seen = Arc::new(AtomicBool::new(false));
    let runner = {
        let (retention, release, seen) = (
            retention.clone(),
            release.clone(),
            Arc::clone(&old_files_seen),
        );
        FnRunner::new(move |job, cancel| {
            let n = job.issue.key.number;
            let [workspace, _] = retention.issue_dirs(&job.issue.key);
            if workspace.join("old").exists() {
                seen.store(true, Ordering::SeqCst);
            }
            leave_files(&retention, n, "new");
            let release = release.clone();
            async move {
                if n != 5 {
                    tokio::select! {
                        () = release.cancelled() => {}
                        () = cancel.cancelled() => {}
                    }
                }
                Ok(exit(0))
            }
        })
    };
    let (orchestrator, shutdown, task) =
        start(source, runner, store.clone(), Some(retention.clone()));

    // At start: the issue settled long ago loses its files, keeps its record.
    until("issue 1 to be pruned", async || {
        record(&store, 1).await.pruned_at.is_some()
    })
    .await;
    assert!(has_no_files(&retention, 1));
    assert_eq!(record(&store, 1).await.status, IssueStatus::Done);
    // Triggered again, issue 4 runs its new round in a fresh workspace.
    until("issues 3 and 4 to run", async || {
        record(&store, 3).await.status == IssueStatus::Running
            && record(&store, 4).await.status == IssueStatus::Running
    })
    .await;
    assert!(!old_files_seen.load(Ordering::SeqCst));
    assert_eq!(record(&store, 4).await.pruned_at, None);

    // Issue 5 settled after the start's pass: due once a second has
    // passed, it waits for the next pass, or an operator.
    let done = async || record(&store, 5).await.status == IssueStatus::Done;
    until("issue 5 to settle", done).await;
    let settled = record(&store, 5).await.updated_at;
    until("issue 5 to be older than the retention", async || {
        SystemTime::now() >= settled + retention.after
    })
    .await;
    let dry = orchestrator.prune(true).await.unwrap();
    assert!(dry.dry_run);
    let pruned: Vec<&str> = dry.issues.iter().map(|i| i.issue.as_str()).collect();
    assert_eq!(pruned, ["acme/app#5"], "{dry:?}");
    assert!(dry.bytes >= 4096, "{dry:?}");
    assert!(has_files(&retention, 5));
    assert_eq!(record(&store, 5).await.pruned_at, None);

    let report = orchestrator.prune(false).await.unwrap();
    assert!(!report.dry_run);
    assert_eq!(report.issues, dry.issues);
    assert!(has_no_files(&retention, 5));
    assert!(record(&store, 5).await.pruned_at.is_some());

    // The waiting and the running issues keep theirs.
    for n in [2, 3, 4] {
        assert!(has_files(&retention, n), "issue {n} lost its files");
    }
    assert!(Path::new(&retention.issue_dirs(&key(4))[0].join("new")).exists());

    release.cancel();
    until("issues 3 and 4 to settle", async || {
        record(&store, 3).await.status == IssueStatus::Done
            && record(&store, 4).await.status == IssueStatus::Done
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the service stops")
        .unwrap()
        .unwrap();
    // Stopped, it answers no prune.
    assert!(orchestrator.prune(true).await.is_err());
}

#[tokio::test]
async fn with_retention_null_nothing_is_pruned() {
    let store = Arc::new(MemoryStore::new());
    store
        .put(&settled_long_ago(1, IssueStatus::Done))
        .await
        .unwrap();
    let runner = FnRunner::new(|_, _| async { Ok(exit(0)) });
    let (orchestrator, shutdown, task) =
        start(Arc::new(MemorySource::new([])), runner, store.clone(), None);
    let answer = loop {
        match orchestrator.prune(false).await {
            Err(claude_flow_core::Error::NotRunning(_)) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other,
        }
    };
    let e = answer.unwrap_err().to_string();
    assert!(e.contains("service.retention is null"), "{e}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(record(&store, 1).await.pruned_at, None);
}
