//! The PostgreSQL store's claims: 600 ready issues claimed and finished by
//! one, two and three claimers (each its own pool, as separate daemons),
//! against the file store doing the same two transitions per issue; and
//! what an idle leader costs the database.
//!
//! Run: `CLAUDE_FLOW_TEST_POSTGRES=postgres://postgres@127.0.0.1:5432/postgres
//! cargo bench -p claude-flow-benches --bench postgres_claims`.

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use claude_flow_core::state::{Coordination, PostgresSettings, PostgresStore, TestDb};
use claude_flow_core::{
    Attempt, FileStore, Issue, IssueKey, IssueRecord, IssueStatus, MemorySource, Orchestrator,
    Settings, StateStore,
};
use sqlx::Connection;

mod support;

const ISSUES: u64 = 600;

fn record(n: u64) -> IssueRecord {
    let key = IssueKey::new("acme/app".parse().unwrap(), n);
    let mut issue = Issue::new(
        key,
        format!("Issue number {n} with a title of typical length"),
    );
    issue.body = "A body of a few hundred bytes. ".repeat(10);
    IssueRecord::new(issue)
}

fn begin(record: &mut IssueRecord) {
    let number = record.next_attempt_number();
    let run_id = format!("{}-{number}", record.key().number);
    record.attempts.push(Attempt::started(
        number,
        record.round,
        run_id,
        SystemTime::now(),
    ));
    record.status = IssueStatus::Running;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn claimers(k: usize) {
    let db = TestDb::create().await.unwrap();
    let seed = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    for n in 1..=ISSUES {
        seed.put(&record(n)).await.unwrap();
    }
    let mut stores = Vec::new();
    for _ in 0..k {
        stores.push(
            PostgresStore::connect(&db.url, PostgresSettings::default())
                .await
                .unwrap(),
        );
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, store) in stores.into_iter().enumerate() {
        tasks.spawn(async move {
            let node = format!("node-{i}");
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                let claims = store
                    .claim(&node, 1, SystemTime::now(), &begin)
                    .await
                    .unwrap();
                latencies.push(t.elapsed());
                let Some(claim) = claims.into_iter().next() else {
                    return latencies;
                };
                let mut done = claim.record.clone();
                done.status = IssueStatus::Done;
                store.finish(&claim, &done, &|_, _| {}).await.unwrap();
            }
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.unwrap());
    }
    let total = start.elapsed();
    latencies.sort();
    println!(
        "postgres, {k} claimer(s): {ISSUES} issues in {:.2} s = {:.0} issues/s; claim p50 {:.2} ms, p99 {:.2} ms",
        total.as_secs_f64(),
        ISSUES as f64 / total.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}

async fn file_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let records: Vec<IssueRecord> = (1..=ISSUES).map(record).collect();
    for r in &records {
        store.put(r).await.unwrap();
    }
    let start = Instant::now();
    for r in &records {
        let mut r = r.clone();
        begin(&mut r);
        store.put(&r).await.unwrap();
        r.status = IssueStatus::Done;
        store.put(&r).await.unwrap();
    }
    let total = start.elapsed();
    println!(
        "file store, one daemon, one at a time: {ISSUES} issues in {:.2} s = {:.0} issues/s",
        total.as_secs_f64(),
        ISSUES as f64 / total.as_secs_f64()
    );
}

/// Transactions the test database committed while one idle leader ran
/// for `window`.
async fn idle_leader(window: Duration) {
    let db = TestDb::create().await.unwrap();
    let store = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    let orchestrator = Arc::new(
        Orchestrator::builder()
            .source(Arc::new(MemorySource::new([])))
            .runner(Arc::new(claude_flow_core::FnRunner::new(|_, _| async {
                Err(claude_flow_core::RunnerError::Other("never runs".into()))
            })))
            .store(Arc::new(store))
            .settings(Settings {
                node: "idle".into(),
                ..Settings::default()
            })
            .build()
            .unwrap(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = {
        let (o, s) = (Arc::clone(&orchestrator), shutdown.clone());
        tokio::spawn(async move { o.run(s).await })
    };
    while orchestrator.status().last_poll.is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin = std::env::var("CLAUDE_FLOW_TEST_POSTGRES").unwrap();
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    let name = db.url.expose().rsplit('/').next().unwrap().to_owned();
    let before = support::transactions(&mut conn, &name).await;
    tokio::time::sleep(window).await;
    let after = support::transactions(&mut conn, &name).await;
    println!(
        "idle leader (lease 30s, poll 5m, local source): {} transactions in {} s = {:.2}/s",
        after - before,
        window.as_secs(),
        (after - before) as f64 / window.as_secs_f64()
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

fn main() {
    if std::env::var("CLAUDE_FLOW_TEST_POSTGRES").is_err() {
        println!("skipped: no PostgreSQL (set CLAUDE_FLOW_TEST_POSTGRES)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        file_store().await;
        for k in 1..=3 {
            claimers(k).await;
        }
        idle_leader(Duration::from_secs(60)).await;
    });
}
