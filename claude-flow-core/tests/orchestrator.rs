//! The orchestrator's guarantees, with in-memory parts.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use claude_flow_core::{
    Attempt, AttemptOutcome, ExitKind, FnRunner, Issue, IssueKey, IssueRecord, IssueStatus,
    MemorySource, MemoryStore, MockStateStore, MockWorkflowRunner, Orchestrator, Reported,
    RunOutcome, Settings, StateStore, StoreError, WorkflowJob,
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

/// An orchestrator over these parts with the test settings.
fn build(
    source: Arc<dyn claude_flow_core::IssueSource>,
    runner: Arc<dyn claude_flow_core::WorkflowRunner>,
    store: Arc<dyn StateStore>,
) -> Orchestrator {
    Orchestrator::builder()
        .source(source)
        .runner(runner)
        .store(store)
        .settings(settings())
        .build()
        .unwrap()
}

/// Runs the orchestrator on a task until the returned token is cancelled.
fn run_until_shutdown(
    orchestrator: &Arc<Orchestrator>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<claude_flow_core::Summary, claude_flow_core::Error>>,
) {
    let shutdown = CancellationToken::new();
    let (o, s) = (Arc::clone(orchestrator), shutdown.clone());
    (shutdown, tokio::spawn(async move { o.run(s).await }))
}

fn outcome(code: i32) -> RunOutcome {
    RunOutcome {
        exit: ExitKind::Code(code),
        pr_url: (code == 0).then(|| "https://github.com/acme/app/pull/1".to_owned()),
        log_path: None,
        duration: Duration::ZERO,
        retry_after: None,
    }
}

/// Counts attempts running at once, overall and per issue.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
    active: Mutex<HashSet<u64>>,
    overlaps: AtomicUsize,
}

impl Gauge {
    fn enter(&self, n: u64) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        if !self.active.lock().unwrap().insert(n) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn leave(&self, n: u64) {
        self.active.lock().unwrap().remove(&n);
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn concurrency_is_bounded_and_no_issue_runs_twice_at_once() {
    let source = Arc::new(MemorySource::new((1..=20).map(issue)));
    let store = Arc::new(MemoryStore::new());
    let gauge = Arc::new(Gauge::default());
    let g = Arc::clone(&gauge);
    // Odd issues fail twice before succeeding, so retries overlap new work.
    let runner = FnRunner::new(move |job: WorkflowJob, _cancel| {
        let g = Arc::clone(&g);
        async move {
            let n = job.issue.key.number;
            g.enter(n);
            tokio::time::sleep(Duration::from_millis(5)).await;
            g.leave(n);
            let code = if n % 2 == 1 && job.attempt < 3 { 1 } else { 0 };
            Ok(outcome(code))
        }
    });
    let orchestrator = build(source.clone(), Arc::new(runner), store.clone());
    let summary = orchestrator
        .run_once(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((summary.done, summary.failed), (20, 0));
    assert!(
        gauge.max.load(Ordering::SeqCst) <= 3,
        "more than max_concurrent ran at once"
    );
    assert!(
        gauge.max.load(Ordering::SeqCst) >= 2,
        "nothing ran concurrently"
    );
    assert_eq!(
        gauge.overlaps.load(Ordering::SeqCst),
        0,
        "an issue ran twice at once"
    );
    for record in store.list().await.unwrap() {
        let expected = if record.key().number % 2 == 1 { 3 } else { 1 };
        assert_eq!(record.attempts.len(), expected, "{}", record.key());
        assert_eq!(record.status, IssueStatus::Done);
    }
    // Every start was reported, and each success once.
    let reports = source.reports();
    let starts = reports
        .iter()
        .filter(|r| matches!(r, Reported::Started(..)))
        .count();
    let successes = reports
        .iter()
        .filter(|r| matches!(r, Reported::Succeeded(..)))
        .count();
    assert_eq!((starts, successes), (40, 20));
}

#[tokio::test]
async fn the_last_failure_is_reported_once_with_the_attempt_count() {
    let source = Arc::new(MemorySource::new([issue(1)]));
    let store = Arc::new(MemoryStore::new());
    let runner = FnRunner::new(|_job, _cancel| async { Ok(outcome(2)) });
    let orchestrator = build(source.clone(), Arc::new(runner), store.clone());
    let summary = orchestrator
        .run_once(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(summary.failed, 1);
    let failures: Vec<_> = source
        .reports()
        .into_iter()
        .filter_map(|r| match r {
            Reported::Failed(_, f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (failures[0].reason.as_str(), failures[0].attempts),
        ("exit code 2", 3)
    );
    let record = store.get(&key(1)).await.unwrap().unwrap();
    assert_eq!(record.reports.shown, Some(claude_flow_core::Shown::Failed));
}

#[tokio::test]
async fn an_attempt_running_at_a_crash_is_abandoned_then_run_again_uncounted() {
    let mut record = IssueRecord::new(issue(1));
    record.status = IssueStatus::Running;
    record.attempts.push(Attempt {
        number: 1,
        round: 1,
        run_id: "crashed-run".into(),
        started_at: SystemTime::now(),
        finished_at: None,
        outcome: None,
        exit_code: None,
        signal: None,
        log_path: None,
        pr_url: None,
        node: None,
    });
    let store = Arc::new(MemoryStore::with_records([record]));
    let mut runner = MockWorkflowRunner::new();
    runner.expect_preflight().returning(|| Ok(()));
    runner
        .expect_abandon()
        .withf(|run_id| run_id == "crashed-run")
        .times(1)
        .returning(|_| Ok(()));
    runner
        .expect_run()
        .withf(|job, _| job.attempt == 2)
        .times(1)
        .returning(|_, _| Ok(outcome(0)));
    let orchestrator = build(
        Arc::new(MemorySource::new([issue(1)])),
        Arc::new(runner),
        store.clone(),
    );
    orchestrator
        .run_once(CancellationToken::new())
        .await
        .unwrap();
    let after = store.get(&key(1)).await.unwrap().unwrap();
    assert_eq!(after.status, IssueStatus::Done);
    assert_eq!(after.attempts[0].outcome, Some(AttemptOutcome::Interrupted));
    assert_eq!(after.failures_this_round(), 0);
}

#[tokio::test]
async fn a_new_trigger_after_settling_starts_a_new_round() {
    let source = Arc::new(MemorySource::new([issue(1)]));
    let store = Arc::new(MemoryStore::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&runs);
    let runner = FnRunner::new(move |_job, _cancel| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok(outcome(0)) }
    });
    let orchestrator = build(source.clone(), Arc::new(runner), store.clone());
    orchestrator
        .run_once(CancellationToken::new())
        .await
        .unwrap();
    orchestrator
        .run_once(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "a settled issue ran again");
    let mut again = issue(1);
    again.trigger = "labeled-again".into();
    source.push(again);
    orchestrator
        .run_once(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(store.get(&key(1)).await.unwrap().unwrap().round, 2);
}

#[tokio::test]
async fn shutdown_waits_for_the_grace_then_interrupts_and_keeps_the_issue_queued() {
    let store = Arc::new(MemoryStore::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let s = Arc::clone(&started);
    let runner = FnRunner::new(move |_job, cancel: CancellationToken| {
        let s = Arc::clone(&s);
        async move {
            s.notify_one();
            cancel.cancelled().await;
            Ok(RunOutcome {
                exit: ExitKind::Cancelled,
                ..outcome(1)
            })
        }
    });
    let orchestrator = build(
        Arc::new(MemorySource::new([issue(1)])),
        Arc::new(runner),
        store.clone(),
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        started.notified().await;
        stop.cancel();
    });
    let summary = tokio::time::timeout(Duration::from_secs(60), orchestrator.run(shutdown))
        .await
        .expect("shutdown hung")
        .unwrap();
    assert_eq!(summary.interrupted, 1);
    let record = store.get(&key(1)).await.unwrap().unwrap();
    assert_eq!(record.status, IssueStatus::Queued);
    assert_eq!(
        record.attempts[0].outcome,
        Some(AttemptOutcome::Interrupted)
    );
}

#[tokio::test]
async fn a_store_that_cannot_write_stops_the_orchestrator_with_an_error() {
    let mut store = MockStateStore::new();
    store.expect_load().returning(|| Ok(Vec::new()));
    store
        .expect_load_service()
        .returning(|| Ok(Default::default()));
    store
        .expect_put()
        .returning(|_| Err(StoreError::Failed("disk full".into())));
    let orchestrator = build(
        Arc::new(MemorySource::new([issue(1)])),
        Arc::new(FnRunner::new(|_job, _cancel| async { Ok(outcome(0)) })),
        Arc::new(store),
    );
    let err = orchestrator
        .run_once(CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
}

#[tokio::test]
async fn a_missing_part_is_named_by_the_builder() {
    let err = Orchestrator::builder()
        .store(Arc::new(MemoryStore::new()))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("no source"), "{err}");
}

/// A runner whose attempts wait for cancellation, announcing each start.
fn blocking_runner(started: Arc<tokio::sync::Notify>) -> FnRunner {
    FnRunner::new(move |_job, cancel: CancellationToken| {
        let started = Arc::clone(&started);
        async move {
            started.notify_one();
            cancel.cancelled().await;
            Ok(RunOutcome {
                exit: ExitKind::Cancelled,
                ..outcome(1)
            })
        }
    })
}

#[tokio::test]
async fn status_shows_the_last_poll_and_what_runs_and_an_operator_can_cancel_it() {
    let started = Arc::new(tokio::sync::Notify::new());
    let store = Arc::new(MemoryStore::new());
    let orchestrator = Arc::new(build(
        Arc::new(MemorySource::new([issue(1)])),
        Arc::new(blocking_runner(Arc::clone(&started))),
        store.clone(),
    ));
    assert!(
        orchestrator.cancel(&key(1)).await.is_err(),
        "no loop runs yet"
    );
    let (shutdown, run) = run_until_shutdown(&orchestrator);
    started.notified().await;
    let status = orchestrator.status();
    assert_eq!(
        status
            .running
            .iter()
            .map(|r| r.issue.clone())
            .collect::<Vec<_>>(),
        [key(1)]
    );
    let poll = status.last_poll.expect("a poll happened");
    assert_eq!((poll.ready, poll.error), (Some(1), None));

    orchestrator.cancel(&key(1)).await.unwrap();
    let mut watch = orchestrator.subscribe_status();
    tokio::time::timeout(
        Duration::from_secs(60),
        watch.wait_for(|s| s.running.is_empty()),
    )
    .await
    .expect("the attempt was not stopped")
    .unwrap();
    let record = store.get(&key(1)).await.unwrap().unwrap();
    assert_eq!(record.status, IssueStatus::Cancelled);
    assert!(
        orchestrator.cancel(&key(1)).await.is_err(),
        "already settled"
    );

    // Retry starts a new round for the settled issue, through the loop.
    let again = orchestrator.retry(&key(1)).await.unwrap();
    assert_eq!((again.status, again.round), (IssueStatus::Queued, 2));
    orchestrator.poll_now();
    started.notified().await;
    assert!(
        orchestrator
            .retry(&key(1))
            .await
            .unwrap_err()
            .to_string()
            .contains("running")
    );

    shutdown.cancel();
    let summary = run.await.unwrap().unwrap();
    assert_eq!((summary.cancelled, summary.interrupted), (1, 1));
}

#[tokio::test]
async fn failing_polls_are_counted_in_a_row() {
    let mut source = claude_flow_core::MockIssueSource::new();
    source.expect_poll().returning(|| {
        Err(claude_flow_core::SourceError::Unavailable {
            what: "GET /repos/acme/app/issues".into(),
            message: "HTTP 502".into(),
        })
    });
    let orchestrator = Arc::new(build(
        Arc::new(source),
        Arc::new(FnRunner::new(|_job, _cancel| async { Ok(outcome(0)) })),
        Arc::new(MemoryStore::new()),
    ));
    let (shutdown, run) = run_until_shutdown(&orchestrator);
    let mut watch = orchestrator.subscribe_status();
    for failures in 1..=3 {
        if failures > 1 {
            orchestrator.poll_now();
        }
        tokio::time::timeout(
            Duration::from_secs(60),
            watch.wait_for(|s| s.consecutive_poll_failures >= failures),
        )
        .await
        .expect("the poll did not happen")
        .unwrap();
    }
    let last = orchestrator.status().last_poll.unwrap();
    assert!(last.error.unwrap().contains("HTTP 502"));
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

/// A MemorySource whose first `report_succeeded` fails, as GitHub may.
struct FlakyReports {
    inner: MemorySource,
    failures_left: AtomicUsize,
}

#[async_trait::async_trait]
impl claude_flow_core::IssueSource for FlakyReports {
    async fn poll(&self) -> Result<Vec<Issue>, claude_flow_core::SourceError> {
        self.inner.poll().await
    }
    async fn report(
        &self,
        issue: &Issue,
        report: &claude_flow_core::Report,
        reports: &mut claude_flow_core::Reports,
    ) -> Result<(), claude_flow_core::SourceError> {
        if matches!(report, claude_flow_core::Report::Succeeded(_))
            && self
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(claude_flow_core::SourceError::Unavailable {
                what: "PATCH comment".into(),
                message: "HTTP 502".into(),
            });
        }
        self.inner.report(issue, report, reports).await
    }
}

#[tokio::test]
async fn a_report_that_failed_is_repeated_at_the_next_poll_and_only_once() {
    let source = Arc::new(FlakyReports {
        inner: MemorySource::new([issue(1)]),
        failures_left: AtomicUsize::new(1),
    });
    let store = Arc::new(MemoryStore::new());
    let orchestrator = Arc::new(build(
        source.clone(),
        Arc::new(FnRunner::new(|_job, _cancel| async { Ok(outcome(0)) })),
        store.clone(),
    ));
    let (shutdown, run) = run_until_shutdown(&orchestrator);
    let mut watch = orchestrator.subscribe_status();
    // The attempt ends with a failed report...
    tokio::time::timeout(
        Duration::from_secs(60),
        watch.wait_for(|s| s.heartbeat > 0 && s.running.is_empty() && s.last_poll.is_some()),
    )
    .await
    .unwrap()
    .unwrap();
    // ...and each poll after that tries again until it goes through.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !store.list().await.unwrap().first().is_some_and(|r| {
        r.status == IssueStatus::Done && r.reports.shown == Some(claude_flow_core::Shown::Succeeded)
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the failed report was never repeated"
        );
        orchestrator.poll_now();
        let seen = orchestrator.status().heartbeat;
        tokio::time::timeout(
            Duration::from_secs(60),
            watch.wait_for(|s| s.heartbeat > seen + 1),
        )
        .await
        .unwrap()
        .unwrap();
    }
    let successes = source
        .inner
        .reports()
        .into_iter()
        .filter(|r| matches!(r, Reported::Succeeded(..)))
        .count();
    assert_eq!(successes, 1, "reported once it went through, not again");
    shutdown.cancel();
    run.await.unwrap().unwrap();
}
