//! The engine under real conditions (issue 8): reports off the workflow
//! slots, waiting issues that stop being eligible, bounded quota pauses,
//! interruptions, and attempts counted within their round.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use claude_flow_core::{
    Attempt, AttemptOutcome, ExitKind, FnRunner, Issue, IssueKey, IssueRecord, IssueSource,
    IssueStatus, MemorySource, MemoryStore, Orchestrator, Report, Reports, RunOutcome, Settings,
    SourceError, StateStore, WorkflowJob,
};
use tokio_util::sync::CancellationToken;

fn key(n: u64) -> IssueKey {
    IssueKey::new("acme/app".parse().unwrap(), n)
}

fn issue(n: u64) -> Issue {
    Issue::new(key(n), format!("issue {n}"))
}

fn settings() -> Settings {
    Settings {
        poll_interval: Duration::from_secs(3600),
        max_concurrent: 3,
        max_attempts: 3,
        retry_backoff: Duration::from_millis(10),
        retry_backoff_max: Duration::from_millis(40),
        shutdown_grace: Duration::from_millis(50),
        ..Settings::default()
    }
}

fn build(
    source: Arc<dyn IssueSource>,
    runner: FnRunner,
    store: Arc<dyn StateStore>,
    settings: Settings,
) -> Arc<Orchestrator> {
    Arc::new(
        Orchestrator::builder()
            .source(source)
            .runner(Arc::new(runner))
            .store(store)
            .settings(settings)
            .build()
            .unwrap(),
    )
}

fn run(
    orchestrator: &Arc<Orchestrator>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<claude_flow_core::Summary, claude_flow_core::Error>>,
) {
    let shutdown = CancellationToken::new();
    let (o, s) = (Arc::clone(orchestrator), shutdown.clone());
    (shutdown, tokio::spawn(async move { o.run(s).await }))
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

/// Polls the store until `check` holds for the record of `key`.
async fn wait_record(
    store: &MemoryStore,
    key: &IssueKey,
    what: &str,
    check: impl Fn(&IssueRecord) -> bool,
) -> IssueRecord {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = store.get(key).await.unwrap()
            && check(&r)
        {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            store.get(key).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A source whose reports never return: GitHub hanging on every write.
struct HangingReports(MemorySource);

#[async_trait]
impl IssueSource for HangingReports {
    async fn poll(&self) -> Result<Vec<Issue>, SourceError> {
        self.0.poll().await
    }
    async fn report(&self, _: &Issue, _: &Report, _: &mut Reports) -> Result<(), SourceError> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn workflows_start_while_every_report_hangs() {
    let source = Arc::new(HangingReports(MemorySource::new((1..=5).map(issue))));
    let store = Arc::new(MemoryStore::new());
    let started = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&started);
    let runner = FnRunner::new(move |_job, _cancel| {
        s.fetch_add(1, Ordering::SeqCst);
        async { Ok(exit(0)) }
    });
    let orchestrator = build(source, runner, store.clone(), settings());
    let (shutdown, task) = run(&orchestrator);
    // Five issues through three slots: the slots must free up without
    // waiting for any report.
    for n in 1..=5 {
        wait_record(&store, &key(n), "the workflow to finish", |r| {
            r.status == IssueStatus::Done
        })
        .await;
    }
    assert_eq!(started.load(Ordering::SeqCst), 5);
    // The service still stops, with reports still owed.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("shutdown waited for a hanging report")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_waiting_issue_that_is_no_longer_eligible_is_cancelled_at_the_next_poll() {
    let source = Arc::new(MemorySource::new([issue(1)]));
    let store = Arc::new(MemoryStore::new());
    let runner = FnRunner::new(|_job, _cancel| async { Ok(exit(1)) });
    let orchestrator = build(
        source.clone(),
        runner,
        store.clone(),
        Settings {
            retry_backoff: Duration::from_secs(3600),
            retry_backoff_max: Duration::from_secs(3600),
            ..settings()
        },
    );
    let (shutdown, task) = run(&orchestrator);
    wait_record(&store, &key(1), "a retry to be scheduled", |r| {
        r.status == IssueStatus::Retrying
    })
    .await;
    source.remove(&key(1));
    orchestrator.poll_now();
    let record = wait_record(&store, &key(1), "the cancellation", |r| {
        r.status == IssueStatus::Cancelled
    })
    .await;
    assert_eq!(record.next_retry_at, None);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

fn quota(until: SystemTime) -> RunOutcome {
    RunOutcome {
        retry_after: Some(until),
        ..exit(75)
    }
}

#[tokio::test]
async fn a_quota_marker_in_the_past_pauses_at_least_the_retry_backoff() {
    let store = Arc::new(MemoryStore::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&runs);
    let runner = FnRunner::new(move |_job, _cancel| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok(quota(SystemTime::UNIX_EPOCH)) }
    });
    let backoff = Duration::from_secs(600);
    let orchestrator = build(
        Arc::new(MemorySource::new([issue(1)])),
        runner,
        store.clone(),
        Settings {
            retry_backoff: backoff,
            retry_backoff_max: Duration::from_secs(3600),
            ..settings()
        },
    );
    let before = SystemTime::now();
    let (shutdown, task) = run(&orchestrator);
    let mut watch = orchestrator.subscribe_status();
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        watch.wait_for(|s| s.paused_until.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let until = status.paused_until.unwrap();
    assert!(
        until >= before + backoff,
        "paused only until {until:?}, less than retry_backoff"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_far_quota_marker_pauses_no_longer_than_max_pause() {
    let store = Arc::new(MemoryStore::new());
    let far = SystemTime::UNIX_EPOCH + Duration::from_secs(60 * 365 * 24 * 3600);
    let runner = FnRunner::new(move |_job, _cancel| async move { Ok(quota(far)) });
    let orchestrator = build(
        Arc::new(MemorySource::new([issue(1)])),
        runner,
        store.clone(),
        settings(),
    );
    let (shutdown, task) = run(&orchestrator);
    let mut watch = orchestrator.subscribe_status();
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        watch.wait_for(|s| s.paused_until.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    // CONTRACT: service.max_pause defaults to 6h.
    let limit = SystemTime::now() + Duration::from_secs(6 * 3600);
    assert!(status.paused_until.unwrap() <= limit, "{status:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

fn interrupted_attempt(number: u32, round: u32) -> Attempt {
    Attempt {
        number,
        round,
        run_id: format!("run-{round}-{number}"),
        started_at: SystemTime::now(),
        finished_at: Some(SystemTime::now()),
        outcome: Some(AttemptOutcome::Interrupted),
        exit_code: None,
        signal: None,
        log_path: None,
        pr_url: None,
    }
}

#[tokio::test]
async fn an_attempt_interrupted_three_times_in_a_row_fails_its_round() {
    let mut record = IssueRecord::new(issue(1));
    record.attempts.push(interrupted_attempt(1, 1));
    record.attempts.push(interrupted_attempt(2, 1));
    let mut running = interrupted_attempt(3, 1);
    running.outcome = None;
    running.finished_at = None;
    record.attempts.push(running);
    record.status = IssueStatus::Running;
    let store = Arc::new(MemoryStore::with_records([record]));
    let runs = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&runs);
    let runner = FnRunner::new(move |_job, _cancel| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok(exit(0)) }
    });
    let orchestrator = build(
        Arc::new(MemorySource::new([issue(1)])),
        runner,
        store.clone(),
        settings(),
    );
    orchestrator
        .run_once(CancellationToken::new())
        .await
        .unwrap();
    let after = store.get(&key(1)).await.unwrap().unwrap();
    assert_eq!(after.status, IssueStatus::Failed, "{after:?}");
    assert!(
        after
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("interrupted")),
        "{after:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "ran a fourth time");
}

#[tokio::test]
async fn attempts_count_from_one_in_every_round() {
    let mut record = IssueRecord::new(issue(1));
    for n in 1..=3 {
        let mut a = interrupted_attempt(n, 1);
        a.outcome = Some(AttemptOutcome::Failed {
            reason: "exit code 1".into(),
        });
        record.attempts.push(a);
    }
    record.status = IssueStatus::Failed;
    let store = Arc::new(MemoryStore::with_records([record]));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let runner = FnRunner::new(move |job: WorkflowJob, _cancel| {
        s.lock().unwrap().push(job.attempt);
        async { Ok(exit(0)) }
    });
    let mut again = issue(1);
    again.trigger = "labeled-again".into();
    let orchestrator = build(
        Arc::new(MemorySource::new([again])),
        runner,
        store.clone(),
        settings(),
    );
    orchestrator
        .run_once(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![1]);
    let after = store.get(&key(1)).await.unwrap().unwrap();
    assert_eq!((after.round, after.summary().attempts), (2, 1));
    assert_eq!(after.last_attempt().unwrap().number, 1);
}
