//! Several whole daemons on one PostgreSQL database (issue 11, CONTRACT
//! section 8), against one daemon with the file store measured in the
//! same run:
//!
//! 1. **Throughput**: 600 issues pushed at once into a `MemorySource`,
//!    through one, two and three orchestrators (each a daemon: its own
//!    `PostgresStore` pool, its own `Settings::node`, `max_concurrent` 4),
//!    and through one orchestrator on a `FileStore`: issues per second
//!    from the push to the last outcome being in the store, and the
//!    claim-to-start latency of each attempt (from the attempt's
//!    `started_at`, taken just before its durable start record, to the
//!    runner being called). Twice: with a no-op workflow (the daemons'
//!    own cost is the bottleneck) and with a 25 ms workflow (the slots
//!    are).
//! 2. **Wake-up**: the leader holds its only slot with a long workflow;
//!    two idle followers; 50 single issues, one at a time: from the issue
//!    becoming ready (the moment the bench's own `LISTEN
//!    claude_flow_work` hears of it, which is the notification the
//!    followers wait on) and from the push into the source, to the
//!    workflow starting on a follower. Target: < 250 ms.
//! 3. **The real daemon binary** ×3 on one database, local source with an
//!    empty issues directory, workflow `true`: resident memory once
//!    settled (target ≤ 20 MiB each), then the transactions the database
//!    commits and the CPU the daemons use while idle (target: no busy
//!    polling); then the resident memory after 600 issues went through
//!    them.
//!
//! Run: `CLAUDE_FLOW_TEST_POSTGRES=postgres://postgres@127.0.0.1:5432/postgres
//! cargo bench -p claude-flow-benches --bench several_daemons` (it builds
//! the release binaries first). `CLAUDE_FLOW_BENCH_ROUNDS` repeats the
//! throughput cases (default 1; one run of the bench stays under about
//! two minutes); `CLAUDE_FLOW_BENCH_PARTS` picks some of `throughput`,
//! `statements`, `wake-up` and `real` (default all); `CLAUDE_FLOW_BENCH_PG_LOG`
//! names the server's log, if the bench may read it: then the statements
//! of 600 issues through one and three daemons (an untimed case, since
//! logging slows the server) and of the idle daemons are counted one by
//! one (`log_statement = all` on the bench's databases only).
//! Results: docs/BENCHMARKS.md.

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use claude_flow_core::state::{PostgresSettings, PostgresStore, TestDb};
use claude_flow_core::{
    ExitKind, FileStore, FnRunner, Issue, IssueKey, IssueStatus, MemorySource, Orchestrator, Role,
    RunOutcome, Settings, StateStore,
};
use serde_json::json;
use sqlx::Connection;
use sqlx::postgres::PgListener;
use support::{ms, start_daemon, status_field, terminate};
use tokio_util::sync::CancellationToken;

const ISSUES: u64 = 600;
/// `service.max_concurrent` of every daemon.
const SLOTS: u32 = 4;
/// The workflow of the second throughput series.
const WORKFLOW: Duration = Duration::from_millis(25);
/// Single issues in the wake-up measurement.
const WAKE_UPS: u64 = 50;
/// The issue that holds the leader's only slot in the wake-up case.
const BLOCKER: u64 = 1_000_000;
/// Idle daemons are measured over this long: the default lease (30 s),
/// so that every periodic duty of a daemon falls in it about once.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Generous bound on anything the bench waits for.
const PATIENCE: Duration = Duration::from_secs(120);

fn key(n: u64) -> IssueKey {
    IssueKey::new("acme/app".parse().unwrap(), n)
}

fn issue(n: u64) -> Issue {
    let mut issue = Issue::new(
        key(n),
        format!("Issue number {n} with a title of typical length"),
    );
    issue.body = "A body of a few hundred bytes. ".repeat(10);
    issue
}

fn ended() -> RunOutcome {
    RunOutcome {
        exit: ExitKind::Code(0),
        pr_url: None,
        log_path: None,
        duration: Duration::ZERO,
        retry_after: None,
    }
}

/// What the workflows of every daemon of one case saw.
struct Probe {
    /// When each issue's workflow was first called, and on which node.
    started: Mutex<HashMap<u64, (SystemTime, String)>>,
    /// Workflow calls, all issues, all daemons.
    runs: AtomicUsize,
    /// Calls for an issue that had already run: must stay 0.
    again: AtomicUsize,
    /// The number of the last issue whose workflow started.
    last: tokio::sync::watch::Sender<u64>,
    /// How long each workflow takes.
    work: Duration,
    /// Ends the blocker's workflow.
    release: CancellationToken,
}

impl Probe {
    fn new(work: Duration) -> Arc<Self> {
        Arc::new(Self {
            started: Mutex::new(HashMap::new()),
            runs: AtomicUsize::new(0),
            again: AtomicUsize::new(0),
            last: tokio::sync::watch::channel(0).0,
            work,
            release: CancellationToken::new(),
        })
    }

    fn runner(self: &Arc<Self>, node: &str) -> FnRunner {
        let (probe, node) = (Arc::clone(self), node.to_owned());
        FnRunner::new(move |job, _cancel| {
            let (probe, node) = (Arc::clone(&probe), node.clone());
            async move {
                let at = SystemTime::now();
                let n = job.issue.key.number;
                probe.runs.fetch_add(1, Ordering::SeqCst);
                if probe
                    .started
                    .lock()
                    .unwrap()
                    .insert(n, (at, node))
                    .is_some()
                {
                    probe.again.fetch_add(1, Ordering::SeqCst);
                }
                probe.last.send_replace(n);
                if n == BLOCKER {
                    probe.release.cancelled().await;
                } else if !probe.work.is_zero() {
                    tokio::time::sleep(probe.work).await;
                }
                Ok(ended())
            }
        })
    }
}

/// One daemon inside this process.
struct Daemon {
    orchestrator: Arc<Orchestrator>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<claude_flow_core::Summary, claude_flow_core::Error>>,
}

impl Daemon {
    fn start(
        store: Arc<dyn StateStore>,
        source: &Arc<MemorySource>,
        probe: &Arc<Probe>,
        node: &str,
        slots: u32,
    ) -> Self {
        let orchestrator = Arc::new(
            Orchestrator::builder()
                .source(Arc::clone(source) as Arc<dyn claude_flow_core::IssueSource>)
                .runner(Arc::new(probe.runner(node)))
                .store(store)
                .settings(Settings {
                    max_concurrent: slots,
                    node: node.to_owned(),
                    ..Settings::default()
                })
                .build()
                .unwrap(),
        );
        let shutdown = CancellationToken::new();
        let (o, s) = (Arc::clone(&orchestrator), shutdown.clone());
        let task = tokio::spawn(async move { o.run(s).await });
        Self {
            orchestrator,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Waits, checking every few milliseconds, until `done` holds.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + PATIENCE;
    while !done().await {
        assert!(Instant::now() < deadline, "waited too long for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The server's connection, on its own database (whose statistics these
/// are not).
async fn admin() -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&std::env::var("CLAUDE_FLOW_TEST_POSTGRES").unwrap())
        .await
        .unwrap()
}

fn database_name(db: &TestDb) -> String {
    db.url.expose().rsplit('/').next().unwrap().to_owned()
}

/// Issues the database holds as done.
async fn done_in(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM claude_flow_issues WHERE status = 'done'")
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

/// Daemons known to the database (each has sent its first heartbeat).
async fn nodes_in(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM claude_flow_nodes")
        .fetch_one(&mut *conn)
        .await
        .unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// One daemon on the file store.
    File,
    /// This many daemons on one PostgreSQL database.
    Postgres(usize),
}

impl Backend {
    fn name(self) -> String {
        match self {
            Self::File => "file store, 1 daemon".into(),
            Self::Postgres(1) => "PostgreSQL, 1 daemon".into(),
            Self::Postgres(k) => format!("PostgreSQL, {k} daemons"),
        }
    }
}

/// One throughput case.
struct Through {
    wall: Duration,
    /// Claim (attempt `started_at`) to workflow start, sorted.
    claim_to_start: Vec<Duration>,
    /// Workflows run per node.
    per_node: Vec<usize>,
    /// With a statement log: the statements the daemons ran, from the
    /// push to their stop, by statement.
    statements: Option<Vec<(String, usize)>>,
}

/// 600 issues through `backend`; with `log` (the server's log), every
/// statement of the database is logged and counted (a case of its own:
/// logging slows the server).
async fn through(backend: Backend, work: Duration, log: Option<&Path>) -> Through {
    let source = Arc::new(MemorySource::new([]));
    let probe = Probe::new(work);
    let mut daemons = Vec::new();
    let (mut db, mut file_store, mut file_dir) = (None, None, None);
    match backend {
        Backend::File => {
            let dir = support::run_dir();
            let store = Arc::new(FileStore::open(dir.path()).unwrap());
            daemons.push(Daemon::start(
                Arc::clone(&store) as Arc<dyn StateStore>,
                &source,
                &probe,
                "file",
                SLOTS,
            ));
            file_store = Some(store);
            file_dir = Some(dir);
        }
        Backend::Postgres(k) => {
            let test_db = TestDb::create().await.unwrap();
            if log.is_some() {
                log_statements(&test_db).await;
            }
            for i in 0..k {
                let store = PostgresStore::connect(&test_db.url, PostgresSettings::default())
                    .await
                    .unwrap();
                daemons.push(Daemon::start(
                    Arc::new(store),
                    &source,
                    &probe,
                    &format!("d{i}"),
                    SLOTS,
                ));
            }
            db = Some(test_db);
        }
    }
    // Everyone up and idle: the leader has polled (nothing), every worker
    // has said it is alive.
    until("the first poll", || {
        let polled = daemons
            .iter()
            .any(|d| d.orchestrator.status().last_poll.is_some());
        async move { polled }
    })
    .await;
    let mut observer = None;
    if let Some(db) = &db {
        let mut conn = sqlx::PgConnection::connect(db.url.expose()).await.unwrap();
        let k = daemons.len() as i64;
        let deadline = Instant::now() + PATIENCE;
        while nodes_in(&mut conn).await < k {
            assert!(Instant::now() < deadline, "the daemons did not all start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        observer = Some(conn);
    }

    let log_from = log.map(log_len);
    let start = Instant::now();
    for n in 1..=ISSUES {
        source.push(issue(n));
    }
    for d in &daemons {
        d.orchestrator.poll_now();
    }
    // Until every outcome is in the store.
    let deadline = Instant::now() + PATIENCE;
    match (&mut observer, &file_store) {
        (Some(conn), _) => {
            while done_in(conn).await < ISSUES as i64 {
                assert!(
                    Instant::now() < deadline,
                    "{}: not all done",
                    backend.name()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        (None, Some(store)) => {
            let mut pending: Vec<u64> = (1..=ISSUES).collect();
            loop {
                let mut still = Vec::new();
                for n in pending {
                    let settled = store
                        .get(&key(n))
                        .await
                        .unwrap()
                        .is_some_and(|r| r.status == IssueStatus::Done);
                    if !settled {
                        still.push(n);
                    }
                }
                pending = still;
                if pending.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: not all done",
                    backend.name()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        (None, None) => unreachable!(),
    }
    let wall = start.elapsed();

    // Each issue ran once; the claim-to-start latencies from the records.
    assert_eq!(probe.again.load(Ordering::SeqCst), 0, "an issue ran twice");
    assert_eq!(probe.runs.load(Ordering::SeqCst), ISSUES as usize);
    let records = match (&db, &file_store) {
        (Some(db), _) => PostgresStore::connect(&db.url, PostgresSettings::default())
            .await
            .unwrap()
            .list()
            .await
            .unwrap(),
        (None, Some(store)) => store.list().await.unwrap(),
        (None, None) => unreachable!(),
    };
    assert_eq!(records.len(), ISSUES as usize);
    let started = probe.started.lock().unwrap().clone();
    let mut claim_to_start: Vec<Duration> = records
        .iter()
        .map(|r| {
            assert_eq!(r.status, IssueStatus::Done, "{}", r.key());
            assert_eq!(r.attempts.len(), 1, "{} ran more than once", r.key());
            let (at, _) = started[&r.key().number];
            at.duration_since(r.attempts[0].started_at)
                .unwrap_or_default()
        })
        .collect();
    claim_to_start.sort();
    let per_node = daemons
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let node = match backend {
                Backend::File => "file".to_owned(),
                Backend::Postgres(_) => format!("d{i}"),
            };
            started.values().filter(|(_, n)| *n == node).count()
        })
        .collect();
    for d in daemons {
        d.stop().await;
    }
    let statements = match (log, log_from, &db) {
        (Some(path), Some(from), Some(db)) => Some(
            statements_since(path, from, &database_name(db))
                .into_iter()
                // Not the bench's own looks at the count, nor its reading
                // of the records afterwards.
                .filter(|(s, _)| !s.starts_with("SELECT count(*)") && !s.contains("ORDER BY issue"))
                .collect(),
        ),
        _ => None,
    };
    drop(file_dir);
    drop(db);
    Through {
        wall,
        claim_to_start,
        per_node,
        statements,
    }
}

/// The statements the daemons run per issue, from the server's log
/// (untimed: logging every statement slows the server).
async fn statements_per_issue(log: &Path) {
    for k in [1, 3] {
        let t = through(Backend::Postgres(k), Duration::ZERO, Some(log)).await;
        let statements = t.statements.unwrap();
        let total: usize = statements.iter().map(|(_, n)| n).sum();
        println!(
            "## statements per issue, {ISSUES} issues, no-op workflow, {k} daemon(s), from push to stop: {:.2}",
            total as f64 / ISSUES as f64
        );
        for (statement, n) in statements
            .iter()
            .filter(|(_, n)| *n >= ISSUES as usize / 20)
        {
            println!("  {:>5.2}  {statement}", *n as f64 / ISSUES as f64);
        }
    }
}

/// Makes the server log every statement of `db`'s sessions (this
/// database only; sessions opened from now on).
async fn log_statements(db: &TestDb) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {} SET log_statement = 'all'",
        database_name(db)
    )))
    .execute(&mut admin().await)
    .await
    .unwrap();
}

async fn throughput(rounds: usize) {
    for (work, what) in [
        (Duration::ZERO, "no-op workflow"),
        (WORKFLOW, "25 ms workflow"),
    ] {
        println!(
            "## {ISSUES} issues, {what}, max_concurrent {SLOTS} per daemon (load average {})",
            support::load_average()
        );
        println!(
            "{:>5} | {:>24} | {:>9} | {:>9} | {:>8} | {:>22} | {:>12}",
            "round", "case", "wall", "issues/s", "÷ file", "claim→start p50, p99", "runs per node"
        );
        for round in 0..rounds {
            let mut cases = vec![
                Backend::File,
                Backend::Postgres(1),
                Backend::Postgres(2),
                Backend::Postgres(3),
            ];
            // Alternate the order, so that no case always runs first.
            if round % 2 == 1 {
                cases.reverse();
            }
            let mut results = Vec::new();
            for case in cases {
                results.push((case, through(case, work, None).await));
            }
            let file = results
                .iter()
                .find(|(c, _)| *c == Backend::File)
                .map(|(_, t)| t.wall)
                .unwrap();
            results.sort_by_key(|(c, _)| match c {
                Backend::File => 0,
                Backend::Postgres(k) => *k,
            });
            for (case, t) in &results {
                let rate = ISSUES as f64 / t.wall.as_secs_f64();
                let file_rate = ISSUES as f64 / file.as_secs_f64();
                println!(
                    "{:>5} | {:>24} | {:>6.0} ms | {:>9.0} | {:>8.2} | {:>8.2} ms, {:>7.2} ms | {:?}",
                    round + 1,
                    case.name(),
                    ms(t.wall),
                    rate,
                    rate / file_rate,
                    ms(percentile(&t.claim_to_start, 0.5)),
                    ms(percentile(&t.claim_to_start, 0.99)),
                    t.per_node
                );
            }
        }
    }
}

/// Wake-ups of idle followers: see the module's documentation.
async fn wake_up() {
    let db = TestDb::create().await.unwrap();
    let source = Arc::new(MemorySource::new([]));
    let probe = Probe::new(Duration::ZERO);
    let connect = || async {
        Arc::new(
            PostgresStore::connect(&db.url, PostgresSettings::default())
                .await
                .unwrap(),
        )
    };
    // The leader first, alone, with one slot that the blocker then holds.
    let leader = Daemon::start(connect().await, &source, &probe, "leader", 1);
    until("the leader's first poll", || {
        let s = leader.orchestrator.status();
        let ok = s.role == Some(Role::Leader) && s.last_poll.is_some();
        async move { ok }
    })
    .await;
    source.push(issue(BLOCKER));
    leader.orchestrator.poll_now();
    let mut last = probe.last.subscribe();
    tokio::time::timeout(PATIENCE, last.wait_for(|n| *n == BLOCKER))
        .await
        .unwrap()
        .unwrap();
    let followers = [
        Daemon::start(connect().await, &source, &probe, "f1", SLOTS),
        Daemon::start(connect().await, &source, &probe, "f2", SLOTS),
    ];
    let mut observer = sqlx::PgConnection::connect(db.url.expose()).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while nodes_in(&mut observer).await < 3 {
        assert!(Instant::now() < deadline, "the followers did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for f in &followers {
        assert_eq!(f.orchestrator.status().role, Some(Role::Follower));
    }
    let mut listener = PgListener::connect(db.url.expose()).await.unwrap();
    listener.listen("claude_flow_work").await.unwrap();

    let (mut from_ready, mut from_push) = (Vec::new(), Vec::new());
    let mut late_listener = 0;
    for n in 1..=WAKE_UPS {
        // Idle for a while first (100 to 300 ms, varying, so that the
        // pushes do not keep step with any timer of the daemons).
        tokio::time::sleep(Duration::from_millis(100 + (n * 37) % 200)).await;
        while listener.next_buffered().is_some() {}
        let wanted = key(n).to_string();
        let pushed = SystemTime::now();
        source.push(issue(n));
        leader.orchestrator.poll_now();
        let ready = loop {
            let note = tokio::time::timeout(PATIENCE, listener.recv())
                .await
                .unwrap()
                .unwrap();
            if note.payload() == wanted {
                break SystemTime::now();
            }
        };
        tokio::time::timeout(PATIENCE, last.wait_for(|last| *last == n))
            .await
            .unwrap()
            .unwrap();
        let (started, node) = probe.started.lock().unwrap()[&n].clone();
        assert_ne!(node, "leader", "the leader's slot is held");
        match started.duration_since(ready) {
            Ok(d) => from_ready.push(d),
            // The bench's listener heard of it after the follower had
            // already started it.
            Err(_) => {
                late_listener += 1;
                from_ready.push(Duration::ZERO);
            }
        }
        from_push.push(started.duration_since(pushed).unwrap_or_default());
        let deadline = Instant::now() + PATIENCE;
        while done_in(&mut observer).await < n as i64 {
            assert!(Instant::now() < deadline, "issue {n} not done");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(probe.again.load(Ordering::SeqCst), 0, "an issue ran twice");
    from_ready.sort();
    from_push.sort();
    let per_node: Vec<(String, usize)> = ["f1", "f2"]
        .iter()
        .map(|f| {
            let count = probe
                .started
                .lock()
                .unwrap()
                .values()
                .filter(|(_, node)| node == f)
                .count();
            ((*f).to_owned(), count)
        })
        .collect();
    println!(
        "## wake-up of idle followers: {WAKE_UPS} single issues, the leader's only slot held (load average {})",
        support::load_average()
    );
    for (what, d) in [
        ("ready (NOTIFY heard) → start", &from_ready),
        ("push into source + poll_now → start", &from_push),
    ] {
        println!(
            "{what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, over 250 ms: {}",
            ms(percentile(d, 0.5)),
            ms(percentile(d, 0.99)),
            ms(d[d.len() - 1]),
            d.iter()
                .filter(|d| **d > Duration::from_millis(250))
                .count()
        );
    }
    println!(
        "started on {per_node:?}; the bench's listener heard later than the start: {late_listener}"
    );
    probe.release.cancel();
    for f in followers {
        f.stop().await;
    }
    leader.stop().await;
}

/// A run directory for one real daemon: its configuration and state
/// directory; issues come from `issues`, shared by all.
fn daemon_dir(url: &str, node: &str, issues: &Path, poll: &str) -> tempfile::TempDir {
    let dir = support::run_dir();
    let config = json!({
        "source": "local",
        "local": {"dir": issues},
        "workflow": {"command": ["true"]},
        "service": {"state_dir": "state", "max_concurrent": SLOTS, "max_attempts": 1,
                    "listen": "", "node": node, "poll_interval": poll},
        "store": {"kind": "postgres", "postgres": {"url": url}},
        // The default level: it also says which daemon leads.
        "log": {"level": "info"}
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn kib(field: &str) -> f64 {
    field
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Three real daemons on one database.
struct Three {
    db: TestDb,
    daemons: Vec<Child>,
    /// Each daemon's run directory.
    dirs: Vec<tempfile::TempDir>,
    /// Holds the shared issues directory.
    shared: tempfile::TempDir,
    observer: sqlx::PgConnection,
}

impl Three {
    /// Starts them on a fresh database, their local source reading
    /// `issues` issue files; returns once each has sent its first
    /// heartbeat. With `log_statements`, the database logs every
    /// statement of its sessions (`log_statement = all`, this database
    /// only).
    async fn start(bin: &Path, issues: u64, poll: &str, log_statements: bool) -> Self {
        let db = TestDb::create().await.unwrap();
        if log_statements {
            self::log_statements(&db).await;
        }
        let shared = support::run_dir();
        let dir = shared.path().join("issues");
        std::fs::create_dir(&dir).unwrap();
        let three = |db: &TestDb| {
            (1..=3)
                .map(|i| daemon_dir(db.url.expose(), &format!("d{i}"), &dir, poll))
                .collect::<Vec<_>>()
        };
        let dirs = three(&db);
        let mut this = Self {
            observer: sqlx::PgConnection::connect(db.url.expose()).await.unwrap(),
            daemons: dirs.iter().map(|d| start_daemon(bin, d.path())).collect(),
            db,
            dirs,
            shared,
        };
        this.add_issues(1..=issues);
        let deadline = Instant::now() + PATIENCE;
        // The schema exists once a daemon migrated it; then each
        // heartbeats.
        while nodes_in(&mut this.observer).await < 3 {
            assert!(Instant::now() < deadline, "the daemons did not start");
            this.check_alive();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        this
    }

    fn add_issues(&self, numbers: std::ops::RangeInclusive<u64>) {
        let dir = self.shared.path().join("issues");
        for n in numbers {
            std::fs::write(
                dir.join(format!("{n}-bench.md")),
                format!("# Bench {n}\n\nbody\n"),
            )
            .unwrap();
        }
    }

    fn check_alive(&mut self) {
        for (d, dir) in self.daemons.iter_mut().zip(&self.dirs) {
            assert!(
                d.try_wait().unwrap().is_none(),
                "a daemon exited: {}",
                std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default()
            );
        }
    }

    async fn wait_done(&mut self, n: u64) -> Duration {
        let start = Instant::now();
        let deadline = start + PATIENCE;
        while done_in(&mut self.observer).await < n as i64 {
            assert!(
                Instant::now() < deadline,
                "{n} issues not done by the daemons"
            );
            self.check_alive();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    /// Which daemon leads, from what each logged last about it.
    fn roles(&self) -> Vec<&'static str> {
        self.dirs
            .iter()
            .map(|d| {
                let log = std::fs::read_to_string(d.path().join("daemon.log")).unwrap_or_default();
                let leading = log.rfind("leading:");
                let following = log.rfind("following:");
                match (leading, following) {
                    (Some(l), Some(f)) if l > f => "leader",
                    (Some(_), None) => "leader",
                    _ => "follower",
                }
            })
            .collect()
    }

    /// Each daemon's resident memory, peak, and proportional share
    /// (PSS: pages shared with another process count by their share);
    /// and the PSS of its guardian, the process its runner forks at its
    /// first workflow (runner/guardian.rs), which shares the daemon's
    /// pages as they were at the fork.
    fn memory(&self) -> String {
        self.daemons
            .iter()
            .zip(self.roles())
            .map(|(d, role)| {
                let guardians = guardians_of(d.id());
                let guardian = if guardians.is_empty() {
                    "no guardian yet".to_owned()
                } else {
                    let kib: f64 = guardians.iter().map(|g| pss(*g)).sum();
                    format!("guardian PSS {:.1}", kib / 1024.0)
                };
                format!(
                    "{role} {:.1} MiB (peak {:.1}, PSS {:.1}; {guardian})",
                    kib(&status_field(d.id(), "VmRSS:")) / 1024.0,
                    kib(&status_field(d.id(), "VmHWM:")) / 1024.0,
                    pss(d.id()) / 1024.0,
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn stop(mut self) {
        for d in &self.daemons {
            terminate(d);
        }
        for d in &mut self.daemons {
            d.wait().unwrap();
        }
    }
}

/// A process's proportional set size, in KiB (`/proc/<pid>/smaps_rollup`).
fn pss(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .map_or(0.0, kib)
}

/// The guardians of daemon `pid`: forks of it, so the same command line,
/// but not its children (the guardian is forked twice).
fn guardians_of(pid: u32) -> Vec<u32> {
    let cmdline = |p: u32| std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
    let own = cmdline(pid);
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| *p != pid && cmdline(*p) == own)
        .collect()
}

/// The server's log, when the bench may read it
/// (`CLAUDE_FLOW_BENCH_PG_LOG`, e.g.
/// /var/log/postgresql/postgresql-15-main.log): then the idle daemons'
/// statements are counted exactly, one by one.
fn server_log() -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from(std::env::var_os("CLAUDE_FLOW_BENCH_PG_LOG")?);
    std::fs::File::open(&path).ok().map(|_| path)
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The statements the sessions of database `name` ran, as the server
/// logged them after `offset`, by statement (the first 70 characters).
fn statements_since(path: &Path, offset: u64, name: &str) -> Vec<(String, usize)> {
    use std::io::{Read, Seek};
    let mut file = std::fs::File::open(path).unwrap();
    file.seek(std::io::SeekFrom::Start(offset)).unwrap();
    let mut text = String::new();
    file.read_to_string(&mut text).unwrap();
    let marker = format!("@{name} LOG:  ");
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let Some((_, rest)) = line.split_once(&marker) else {
            continue;
        };
        let statement = if let Some(s) = rest.strip_prefix("statement: ") {
            s
        } else if let Some(s) = rest.strip_prefix("execute ") {
            s.split_once(": ").map_or(s, |(_, s)| s)
        } else {
            continue;
        };
        // Transaction brackets are not work of their own.
        if matches!(statement, "BEGIN" | "COMMIT" | "ROLLBACK") {
            continue;
        }
        *counts
            .entry(statement.chars().take(70).collect())
            .or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts
}

/// Three real daemons: memory and idle cost with nothing to do; then
/// memory as issues go through three others.
async fn real_daemons(bin: &Path) {
    let log = server_log();
    let three = Three::start(bin, 0, "5m", log.is_some()).await;
    // Settled: every daemon has been up for a few seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "## three real daemons (release build), one database, empty issues directory, defaults (lease 30 s, poll 5 min) (load average {})",
        support::load_average()
    );
    println!("settled: VmRSS {}", three.memory());
    let name = database_name(&three.db);
    let mut a = admin().await;
    let pids: Vec<u32> = three.daemons.iter().map(Child::id).collect();
    let before = settled_transactions(&mut a, &name).await;
    let log_from = log.as_deref().map(log_len);
    let cpu_before: Vec<Duration> = pids.iter().map(|p| support::cpu_time(*p)).collect();
    let window_start = Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let window = window_start.elapsed();
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu_before)
        .map(|(p, b)| {
            (support::cpu_time(*p).saturating_sub(*b)).as_secs_f64() / window.as_secs_f64() * 100.0
        })
        .collect();
    let statements = match (&log, log_from) {
        (Some(path), Some(from)) => Some(statements_since(path, from, &name)),
        _ => None,
    };
    let after = settled_transactions(&mut a, &name).await;
    let per_second = (after - before) as f64 / window.as_secs_f64();
    println!(
        "idle over {:.1} s: pg_stat_database counted {} transactions = {:.3}/s for 3 daemons, {:.3}/s per daemon; CPU % of a core per daemon {}",
        window.as_secs_f64(),
        after - before,
        per_second,
        per_second / 3.0,
        cpu.iter()
            .map(|c| format!("{c:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(statements) = statements {
        let total: usize = statements.iter().map(|(_, n)| n).sum();
        println!(
            "  statements the server logged in the window: {total} = {:.3}/s per daemon",
            total as f64 / window.as_secs_f64() / 3.0
        );
        for (statement, n) in statements {
            println!("  {n:>4}  {statement}");
        }
    }
    println!("after idling: VmRSS {}", three.memory());
    three.stop();

    // Issues through three other daemons, polling every second so that
    // each batch is found at once.
    let mut three = Three::start(bin, ISSUES, "1s", false).await;
    println!("## three real daemons (release build), workflow `true`, poll every second");
    for batch in 1..=3 {
        if batch > 1 {
            three.add_issues((batch - 1) * ISSUES + 1..=batch * ISSUES);
        }
        let took = three.wait_done(batch * ISSUES).await;
        let per_node: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT record->'attempts'->0->>'node', count(*) FROM claude_flow_issues GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&mut three.observer)
        .await
        .unwrap();
        // Let the leader's reports and the workers' last writes end.
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!(
            "after {} issues (this batch done in {:.1} s; attempts per node {per_node:?}): VmRSS {}",
            batch * ISSUES,
            took.as_secs_f64(),
            three.memory()
        );
    }
    three.stop();
}

fn main() {
    if !support::measuring("several_daemons") {
        return;
    }
    if std::env::var("CLAUDE_FLOW_TEST_POSTGRES").is_err() {
        println!("skipped: no PostgreSQL (set CLAUDE_FLOW_TEST_POSTGRES)");
        return;
    }
    let bin = support::build_binaries();
    let rounds = std::env::var("CLAUDE_FLOW_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // `CLAUDE_FLOW_BENCH_PARTS`: some of throughput, wake-up, real.
    let parts = std::env::var("CLAUDE_FLOW_BENCH_PARTS")
        .unwrap_or_else(|_| "throughput,statements,wake-up,real".into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);
    rt.block_on(async {
        if part("throughput") {
            throughput(rounds).await;
        }
        if part("statements")
            && let Some(log) = server_log()
        {
            statements_per_issue(&log).await;
        }
        if part("wake-up") {
            wake_up().await;
        }
        if part("real") {
            real_daemons(&bin).await;
        }
    });
}

/// The database's transaction count once the backends have sent theirs
/// (each at most once a second, and when idle).
async fn settled_transactions(conn: &mut sqlx::PgConnection, name: &str) -> i64 {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    support::transactions(conn, name).await
}
