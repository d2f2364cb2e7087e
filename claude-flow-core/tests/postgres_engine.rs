//! Several orchestrators on one PostgreSQL database
//! (`CLAUDE_FLOW_TEST_POSTGRES`): one leads (polls and reports), every one
//! claims and runs workflows, and another takes over leading when the
//! leader stops.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use claude_flow_core::state::TestDb;
use claude_flow_core::state::{PostgresSettings, PostgresStore};
use claude_flow_core::{
    ExitKind, FnRunner, Issue, IssueKey, IssueStatus, MemorySource, Orchestrator, RunOutcome,
    Secret, Settings, StateStore, Summary,
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
            Ok(ended(ExitKind::Code(0)))
        }
    })
}

/// A workflow's end with nothing else to tell.
fn ended(exit: ExitKind) -> RunOutcome {
    RunOutcome {
        exit,
        pr_url: None,
        log_path: None,
        duration: Duration::ZERO,
        retry_after: None,
    }
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
    launch(db, node, source, runner(running), |_| {}).await
}

/// A daemon on the test's database with `runner`, its settings changed by
/// `tweak`.
async fn launch(
    db: &TestDb,
    node: &str,
    source: Arc<MemorySource>,
    runner: FnRunner,
    tweak: impl FnOnce(&mut Settings),
) -> Daemon {
    let settings = PostgresSettings {
        lease: Duration::from_secs(2),
        ..PostgresSettings::default()
    };
    let store = PostgresStore::connect(&db.url, settings).await.unwrap();
    let mut settings = Settings {
        poll_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
        node: node.to_owned(),
        ..Settings::default()
    };
    tweak(&mut settings);
    let orchestrator = Arc::new(
        Orchestrator::builder()
            .source(source)
            .runner(Arc::new(runner))
            .store(Arc::new(store))
            .settings(settings)
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

/// Waits for one of `daemons` to follow (and the leader to have polled);
/// returns it.
async fn follower(daemons: &[Daemon]) -> Arc<Orchestrator> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let polled = daemons
            .iter()
            .any(|d| d.orchestrator.status().last_poll.is_some());
        let follower = daemons
            .iter()
            .find(|d| d.orchestrator.status().role == Some(claude_flow_core::Role::Follower));
        if let (true, Some(d)) = (polled, follower) {
            return Arc::clone(&d.orchestrator);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no polled leader and follower"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops every daemon gracefully.
async fn stop(daemons: Vec<Daemon>) {
    for d in daemons {
        d.shutdown.cancel();
        d.task.await.unwrap().unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_daemon_claims_and_runs_workflows_not_only_the_leader() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    // Each daemon runs one workflow at a time, and each workflow holds its
    // slot until workflows run on both daemons at once: the issues can
    // only get done if the follower runs work too.
    let source = Arc::new(MemorySource::new((1..=4).map(issue)));
    let busy = Arc::new(tokio::sync::watch::channel(std::collections::BTreeSet::<String>::new()).0);
    let ran_on = Arc::new(std::sync::Mutex::new(Vec::<(u64, String)>::new()));
    let mut daemons = Vec::new();
    for node in ["a", "b"] {
        let (busy, ran_on) = (Arc::clone(&busy), Arc::clone(&ran_on));
        let runner = FnRunner::new(move |job, _cancel| {
            let (busy, ran_on) = (Arc::clone(&busy), Arc::clone(&ran_on));
            async move {
                busy.send_modify(|b| {
                    b.insert(node.to_owned());
                });
                let mut seen = busy.subscribe();
                let _ = tokio::time::timeout(PATIENCE, seen.wait_for(|b| b.len() == 2)).await;
                ran_on
                    .lock()
                    .unwrap()
                    .push((job.issue.key.number, node.to_owned()));
                Ok(ended(ExitKind::Code(0)))
            }
        });
        daemons.push(
            launch(&db, node, Arc::clone(&source), runner, |s| {
                s.max_concurrent = 1
            })
            .await,
        );
    }
    let observer = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    wait_done(&observer, 1..=4).await;
    let ran_on = ran_on.lock().unwrap().clone();
    assert_eq!(ran_on.len(), 4, "each issue ran once: {ran_on:?}");
    for node in ["a", "b"] {
        assert!(
            ran_on.iter().any(|(_, n)| n == node),
            "{node} ran nothing: {ran_on:?}"
        );
    }
    // Each attempt names the daemon that ran it.
    for (n, node) in &ran_on {
        let record = observer.get(&key(*n)).await.unwrap().unwrap();
        assert_eq!(record.attempts[0].node.as_deref(), Some(node.as_str()));
    }
    stop(daemons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cancels_at_a_follower_and_the_daemon_running_it_stops_it() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let source = Arc::new(MemorySource::new([issue(1)]));
    let started = Arc::new(tokio::sync::Notify::new());
    let mut daemons = Vec::new();
    for node in ["a", "b"] {
        let started = Arc::clone(&started);
        let runner = FnRunner::new(move |_job, cancel| {
            let started = Arc::clone(&started);
            async move {
                started.notify_one();
                cancel.cancelled().await;
                Ok(ended(ExitKind::Cancelled))
            }
        });
        daemons.push(launch(&db, node, Arc::clone(&source), runner, |_| {}).await);
    }
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .unwrap();
    let follower = follower(&daemons).await;
    follower.cancel(&key(1)).await.unwrap();

    let observer = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let record = observer.get(&key(1)).await.unwrap().unwrap();
        let reported = source
            .reports()
            .iter()
            .any(|r| matches!(r, claude_flow_core::Reported::Cancelled(..)));
        if record.status == IssueStatus::Cancelled && reported {
            assert_eq!(
                record.last_error.as_deref(),
                Some("cancelled by an operator")
            );
            assert_eq!(
                record.attempts[0].outcome,
                Some(claude_flow_core::AttemptOutcome::Cancelled)
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not cancelled and reported: {record:?} {:?}",
            source.reports()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(daemons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_a_follower_to_poll_now_makes_the_leader_poll() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let source = Arc::new(MemorySource::new([]));
    let running = Arc::new(Running::default());
    // Polls an hour apart: only a wake-up can find the new issue in time.
    let mut daemons = Vec::new();
    for node in ["a", "b"] {
        let hourly = |s: &mut Settings| s.poll_interval = Duration::from_secs(3600);
        daemons.push(
            launch(
                &db,
                node,
                Arc::clone(&source),
                runner(Arc::clone(&running)),
                hourly,
            )
            .await,
        );
    }
    let follower = follower(&daemons).await;
    source.push(issue(1));
    follower.poll_now();
    let observer = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    wait_done(&observer, 1..=1).await;
    stop(daemons).await;
}

/// A TCP proxy to the database that the test can cut: a cut holds every
/// byte in both directions and keeps the sockets open, as a dead network
/// does (nothing tells either side).
struct Proxy {
    port: u16,
    open: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, _) = tokio::sync::watch::channel(true);
        let gate = open.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, gate.subscribe()));
                tokio::spawn(pipe(sr, cw, gate.subscribe()));
            }
        });
        Self { port, open }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while !*open.borrow_and_update() {
            if open.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `url` with its host and port replaced by `127.0.0.1:port`.
fn through(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, rest) = rest.split_once('@').unwrap();
    let (host, db) = rest.split_once('/').unwrap();
    (
        host.to_owned(),
        format!("{scheme}://{user}@127.0.0.1:{port}/{db}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_database_stops_its_workflow_before_another_runs_it() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (upstream, _) = through(db.url.expose(), 0);
    let proxy = Proxy::start(upstream).await;
    let (_, via_proxy) = through(db.url.expose(), proxy.port);
    let source = Arc::new(MemorySource::new([issue(1)]));

    // What happened, in order, across both daemons.
    let events = Arc::new(std::sync::Mutex::new(Vec::<&'static str>::new()));
    let started = Arc::new(tokio::sync::Notify::new());
    let lease = Duration::from_secs(2);
    let settings = PostgresSettings {
        lease,
        ..PostgresSettings::default()
    };
    let build = |store: PostgresStore, node: &str, runner: FnRunner| {
        Arc::new(
            Orchestrator::builder()
                .source(Arc::clone(&source) as Arc<dyn claude_flow_core::IssueSource>)
                .runner(Arc::new(runner))
                .store(Arc::new(store))
                .settings(Settings {
                    poll_interval: Duration::from_millis(100),
                    node: node.to_owned(),
                    ..Settings::default()
                })
                .build()
                .unwrap(),
        )
    };
    // A's workflow runs until it is stopped.
    let a_runner = {
        let (events, started) = (Arc::clone(&events), Arc::clone(&started));
        FnRunner::new(move |_job, cancel| {
            let (events, started) = (Arc::clone(&events), Arc::clone(&started));
            async move {
                events.lock().unwrap().push("a started");
                started.notify_one();
                cancel.cancelled().await;
                events.lock().unwrap().push("a stopped");
                Ok(ended(ExitKind::Cancelled))
            }
        })
    };
    let b_runner = {
        let events = Arc::clone(&events);
        FnRunner::new(move |_job, _cancel| {
            let events = Arc::clone(&events);
            async move {
                events.lock().unwrap().push("b ran");
                Ok(ended(ExitKind::Code(0)))
            }
        })
    };
    let a_store = PostgresStore::connect(&Secret::new(via_proxy), settings.clone())
        .await
        .unwrap();
    let a = build(a_store, "a", a_runner);
    let a_task = {
        let a = Arc::clone(&a);
        tokio::spawn(async move { a.run(CancellationToken::new()).await })
    };
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .unwrap();

    let b_store = PostgresStore::connect(&db.url, settings).await.unwrap();
    let b = build(b_store, "b", b_runner);
    let b_shutdown = CancellationToken::new();
    let b_task = {
        let (b, s) = (Arc::clone(&b), b_shutdown.clone());
        tokio::spawn(async move { b.run(s).await })
    };

    proxy.cut();
    let observer = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    wait_done(&observer, 1..=1).await;
    assert_eq!(
        *events.lock().unwrap(),
        ["a started", "a stopped", "b ran"],
        "the cut-off leader stopped its workflow before the other daemon ran the issue"
    );
    let record = observer.get(&key(1)).await.unwrap().unwrap();
    assert_eq!(record.attempts.len(), 2);
    assert_eq!(
        record.attempts[0].outcome,
        Some(claude_flow_core::AttemptOutcome::Interrupted)
    );
    b_shutdown.cancel();
    b_task.await.unwrap().unwrap();
    // A cannot record anything any more; it is left to its fate.
    a_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_into_a_silent_network_gives_up_within_the_lease() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (upstream, _) = through(db.url.expose(), 0);
    let proxy = Proxy::start(upstream).await;
    let (_, via_proxy) = through(db.url.expose(), proxy.port);
    let lease = Duration::from_secs(2);
    let store = PostgresStore::connect(
        &Secret::new(via_proxy),
        PostgresSettings {
            lease,
            ..PostgresSettings::default()
        },
    )
    .await
    .unwrap();
    store
        .put(&claude_flow_core::IssueRecord::new(issue(1)))
        .await
        .unwrap();
    proxy.cut();
    // The leader's loop must get an answer it can act on (stop leading),
    // not wait for as long as TCP retries.
    let answer = tokio::time::timeout(PATIENCE, store.get(&key(1)))
        .await
        .expect("the statement gave up");
    let e = answer.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("no answer from the database"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_work_after_leadership_is_lost_and_won_back() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let source = Arc::new(MemorySource::new([issue(1)]));
    let running = Arc::new(Running::default());
    let a = start(&db, "a", Arc::clone(&source), Arc::clone(&running)).await;
    let observer = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    wait_done(&observer, 1..=1).await;
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(db.url.expose())
        .await
        .unwrap();
    // The session holding the leader's advisory lock.
    let holder = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let first: i32 = loop {
        if let Some(pid) = sqlx::query_scalar::<_, i32>(holder)
            .fetch_optional(&mut admin)
            .await
            .unwrap()
        {
            break pid;
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    a.orchestrator.retry(&key(1)).await.unwrap();
    wait_done(&observer, 1..=1).await;
    // The leader's session ends (a database restart, a killed backend):
    // the daemon stops leading, then leads again.
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(first)
        .execute(&mut admin)
        .await
        .unwrap();
    loop {
        let now: Option<i32> = sqlx::query_scalar(holder)
            .fetch_optional(&mut admin)
            .await
            .unwrap();
        let status = a.orchestrator.status();
        if now.is_some_and(|p| p != first)
            && status.role == Some(claude_flow_core::Role::Leader)
            && status.last_poll.is_some()
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never led again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retried = a.orchestrator.retry(&key(1)).await;
    assert!(retried.is_ok(), "retry after leading again: {retried:?}");
    a.shutdown.cancel();
    a.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_loop_rests_while_issues_wait_for_a_slot() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let source = Arc::new(MemorySource::new((1..=2).map(issue)));
    let runner = FnRunner::new(|_job, cancel| async move {
        cancel.cancelled().await;
        Ok(ended(ExitKind::Cancelled))
    });
    let daemon = launch(&db, "a", Arc::clone(&source), runner, |s| {
        s.max_concurrent = 1;
    })
    .await;
    // One issue runs, the other waits for the only slot.
    let mut status = daemon.orchestrator.subscribe_status();
    tokio::time::timeout(
        PATIENCE,
        status.wait_for(|s| s.running.len() == 1 && s.waiting == 1),
    )
    .await
    .unwrap()
    .unwrap();
    // The loop wakes once a second (its heartbeat) and on events; a loop
    // that spins turns thousands of times in the same window.
    let before = daemon.orchestrator.status().heartbeat;
    let window = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let turns = daemon.orchestrator.status().heartbeat - before;
    let seconds = window.elapsed().as_secs_f64();
    assert!(
        (turns as f64) < 20.0 * seconds,
        "the leader's loop turned {turns} times in {seconds:.1} s"
    );
    daemon.shutdown.cancel();
    daemon.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_at_a_follower_starts_work_held_by_a_quota_pause() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    // A quota pause of an hour is in force when the daemons start.
    let seed = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    let paused = claude_flow_core::ServiceState {
        paused_until: Some(std::time::SystemTime::now() + Duration::from_secs(3600)),
        pause_reason: Some("the agent's quota".into()),
        ..claude_flow_core::ServiceState::default()
    };
    seed.put_service(&paused).await.unwrap();
    let source = Arc::new(MemorySource::new([issue(1)]));
    let running = Arc::new(Running::default());
    let mut daemons = Vec::new();
    for node in ["a", "b"] {
        daemons.push(start(&db, node, Arc::clone(&source), Arc::clone(&running)).await);
    }
    let follower = follower(&daemons).await;
    // Nothing starts while paused.
    let record = seed.get(&key(1)).await.unwrap();
    assert!(
        record
            .as_ref()
            .is_none_or(|r| r.status == IssueStatus::Queued),
        "{record:?}"
    );
    let resumed = follower.resume().await.unwrap();
    assert!(resumed.lifted_until.is_some());
    wait_done(&seed, 1..=1).await;
    stop(daemons).await;
}
