//! The PostgreSQL store against a real server (`CLAUDE_FLOW_TEST_POSTGRES`):
//! its errors, its schema's versions, and the coordination of several
//! daemons: claims, leases, leadership and wake-ups.
#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion
#![cfg(feature = "postgres")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use claude_flow_core::state::TestDb;
use claude_flow_core::state::{Coordination, PostgresSettings, PostgresStore, StopRequest};
use claude_flow_core::{
    Attempt, AttemptOutcome, Error, Issue, IssueKey, IssueRecord, IssueStatus, RepoId, Secret,
    StateStore, StoreError,
};
use sqlx::Connection;

const PATIENCE: Duration = Duration::from_secs(60);

fn record(n: u64) -> IssueRecord {
    let key = IssueKey::new(RepoId::new("acme", "widgets").unwrap(), n);
    IssueRecord::new(Issue::new(key, format!("issue {n}")))
}

/// What the engine does to a claimed record: a new running attempt.
fn begin(record: &mut IssueRecord) {
    let number = record.next_attempt_number();
    let run_id = format!(
        "{}-{number}-{:08x}",
        record.key().number,
        rand::random::<u32>()
    );
    record.attempts.push(Attempt::started(
        number,
        record.round,
        run_id,
        SystemTime::now(),
    ));
    record.status = IssueStatus::Running;
}

/// What the leader does to an attempt whose lease ran out.
/// A finish's settle that keeps the record as it is.
fn keep(_: &mut IssueRecord, _: Option<StopRequest>) {}

fn interrupt(record: &mut IssueRecord, _stop: Option<StopRequest>) {
    if let Some(attempt) = record.attempts.last_mut() {
        attempt.outcome = Some(AttemptOutcome::Interrupted);
        attempt.finished_at = Some(SystemTime::now());
    }
    record.status = IssueStatus::Queued;
    record.updated_at = SystemTime::now();
}

async fn store(db: &TestDb, lease: Duration) -> PostgresStore {
    let settings = PostgresSettings {
        lease,
        ..PostgresSettings::default()
    };
    PostgresStore::connect(&db.url, settings).await.unwrap()
}

/// Fails the test when `deadline` has passed; else waits a little before
/// the caller looks again.
async fn not_yet(what: &str, deadline: tokio::time::Instant) {
    assert!(
        tokio::time::Instant::now() < deadline,
        "timed out waiting until {what}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_refused_login_is_a_configuration_error_naming_the_key_not_the_password() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let url = Secret::new(db.url_as("no_such_user_cf", "hunter2"));
    let e = PostgresStore::connect(&url, PostgresSettings::default())
        .await
        .unwrap_err();
    let text = e.to_string();
    assert_eq!(e.exit_code(), 78, "{text}");
    assert!(
        text.contains("store.postgres.url: the server refused"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    // Nothing listens on port 1: the store's error, retryable, secret-free.
    let url = Secret::new("postgres://cf:hunter2@127.0.0.1:1/claude_flow");
    let e = PostgresStore::connect(&url, PostgresSettings::default())
        .await
        .unwrap_err();
    let text = e.to_string();
    match &e {
        Error::Store(s) => assert!(s.is_retryable(), "{text}"),
        other => panic!("expected a store error, got {other:?}"),
    }
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn daemons_starting_together_migrate_once_and_all_start() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = db.url.clone();
        starts
            .spawn(async move { PostgresStore::connect(&url, PostgresSettings::default()).await });
    }
    while let Some(started) = starts.join_next().await {
        started.unwrap().unwrap();
    }
    let mut conn = sqlx::PgConnection::connect(db.url.expose()).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM claude_flow_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied, newest());
    let migrated = PostgresStore::migrate(&db.url).await.unwrap();
    assert_eq!((migrated.from, migrated.to), (Some(newest()), newest()));
}

/// The newest migration in the repository: one file per version.
fn newest() -> i64 {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count()
        .try_into()
        .unwrap()
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_refuses_to_start_and_changes_nothing() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    store(&db, Duration::from_secs(30)).await.close().await;
    let mut conn = sqlx::PgConnection::connect(db.url.expose()).await.unwrap();
    sqlx::query(
        "INSERT INTO claude_flow_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', true, '\\x00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    for e in [
        PostgresStore::connect(&db.url, PostgresSettings::default())
            .await
            .unwrap_err(),
        PostgresStore::connect_current(&db.url, PostgresSettings::default())
            .await
            .unwrap_err(),
    ] {
        let text = e.to_string();
        assert!(
            matches!(
                e,
                Error::Store(StoreError::SchemaTooNew {
                    found: 9999,
                    known
                }) if known == newest()
            ),
            "{text}"
        );
        assert!(text.contains("upgrade claude-flow"), "{text}");
    }
}

#[tokio::test]
async fn concurrent_claimers_never_claim_an_issue_twice() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let seed = store(&db, Duration::from_secs(30)).await;
    const ISSUES: u64 = 60;
    for n in 1..=ISSUES {
        seed.put(&record(n)).await.unwrap();
    }
    // A store per claimer: separate pools, as separate daemons have.
    let mut claimers = tokio::task::JoinSet::new();
    for worker in 0..12 {
        let store = store(&db, Duration::from_secs(30)).await;
        claimers.spawn(async move {
            let node = format!("node-{worker}");
            let mut mine = Vec::new();
            loop {
                let claims = store
                    .claim(&node, 1 + worker % 3, SystemTime::now(), &begin)
                    .await
                    .unwrap();
                if claims.is_empty() {
                    return mine;
                }
                mine.extend(claims);
            }
        });
    }
    let mut claimed: HashMap<IssueKey, usize> = HashMap::new();
    while let Some(done) = claimers.join_next().await {
        for claim in done.unwrap() {
            assert_eq!(claim.record.status, IssueStatus::Running);
            *claimed.entry(claim.record.key().clone()).or_default() += 1;
        }
    }
    assert_eq!(claimed.len() as u64, ISSUES, "every issue claimed");
    assert!(claimed.values().all(|n| *n == 1), "{claimed:?}");
    // Stored as claimed: running, one attempt each, nothing left to claim.
    for stored in seed.list().await.unwrap() {
        assert_eq!(stored.status, IssueStatus::Running);
        assert_eq!(stored.attempts.len(), 1);
    }
    let again = seed
        .claim("late", 10, SystemTime::now(), &begin)
        .await
        .unwrap();
    assert!(again.is_empty());
}

#[tokio::test]
async fn claims_wait_for_due_retries_and_the_holder_finishes_its_own() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = store(&db, Duration::from_secs(30)).await;
    let mut later = record(1);
    later.status = IssueStatus::Retrying;
    later.next_retry_at = Some(SystemTime::now() + Duration::from_secs(3600));
    store.put(&later).await.unwrap();
    let mut done = record(2);
    done.status = IssueStatus::Done;
    store.put(&done).await.unwrap();
    assert!(
        store
            .claim("a", 5, SystemTime::now(), &begin)
            .await
            .unwrap()
            .is_empty()
    );
    let in_two_hours = SystemTime::now() + Duration::from_secs(7200);
    let claims = store.claim("a", 5, in_two_hours, &begin).await.unwrap();
    assert_eq!(claims.len(), 1);
    let claim = &claims[0];

    let renewed = store.renew(&claims).await.unwrap();
    assert_eq!(renewed.len(), 1);
    assert!(renewed[0].lease_until >= claim.lease_until);
    let mut finished = claim.record.clone();
    finished.status = IssueStatus::Done;
    store.finish(claim, &finished, &keep).await.unwrap();
    assert_eq!(
        store.get(finished.key()).await.unwrap(),
        Some(finished.clone())
    );
    // The claim is given up: a second finish is refused.
    let e = store.finish(claim, &finished, &keep).await.unwrap_err();
    assert!(matches!(e, StoreError::LeaseLost { .. }), "{e}");
}

#[tokio::test]
async fn an_expired_lease_fences_its_holder_and_the_issue_runs_again_elsewhere() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let lease = Duration::from_secs(1);
    let holder = store(&db, lease).await;
    let leader = store(&db, lease).await;
    holder.put(&record(7)).await.unwrap();
    let claims = holder
        .claim("dead", 1, SystemTime::now(), &begin)
        .await
        .unwrap();
    assert_eq!(claims.len(), 1);
    assert!(claims[0].lease_until <= SystemTime::now() + lease);

    // The holder stops renewing (it died, or lost the database).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let expired = loop {
        let expired = leader.expire(&interrupt).await.unwrap();
        if !expired.is_empty() {
            break expired;
        }
        not_yet("the leader expires the lease", deadline).await;
    };
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].status, IssueStatus::Queued);
    assert_eq!(
        expired[0].last_attempt().unwrap().outcome,
        Some(AttemptOutcome::Interrupted)
    );

    // Fenced: the old holder can neither renew nor write its outcome.
    assert!(holder.renew(&claims).await.unwrap().is_empty());
    let mut late = claims[0].record.clone();
    late.status = IssueStatus::Done;
    let e = holder.finish(&claims[0], &late, &keep).await.unwrap_err();
    assert!(matches!(e, StoreError::LeaseLost { .. }), "{e}");

    // Another daemon runs it again, as the round's next attempt.
    let again = leader
        .claim("alive", 1, SystemTime::now(), &begin)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].record.attempts.len(), 2);
    assert_eq!(
        again[0].record.attempts[0].outcome,
        Some(AttemptOutcome::Interrupted)
    );
}

#[tokio::test]
async fn one_leader_at_a_time_and_another_takes_over_when_it_goes() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let stores: Vec<PostgresStore> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(store(&db, Duration::from_secs(2)).await);
        }
        v
    };
    let mut leaders = Vec::new();
    for (i, s) in stores.iter().enumerate() {
        if s.lead(&format!("node-{i}")).await.unwrap() {
            leaders.push(i);
        }
    }
    assert_eq!(leaders, vec![0]);
    // Asking again confirms, and changes nothing.
    assert!(stores[0].lead("node-0").await.unwrap());
    assert!(!stores[1].lead("node-1").await.unwrap());

    // The leader's process dies: its connection ends.
    stores[0].close().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let new_leader = 'found: loop {
        for (i, store) in stores.iter().enumerate().skip(1) {
            if store.lead(&format!("node-{i}")).await.unwrap() {
                break 'found i;
            }
        }
        not_yet("another daemon leads", deadline).await;
    };
    let other = 3 - new_leader;
    assert!(!stores[other].lead("other").await.unwrap());

    // A graceful stop hands over at once.
    stores[new_leader].resign().await.unwrap();
    assert!(stores[other].lead("other").await.unwrap());
}

#[tokio::test]
async fn idle_daemons_wake_when_an_issue_becomes_ready() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let follower = Arc::new(store(&db, Duration::from_secs(30)).await);
    let leader = store(&db, Duration::from_secs(30)).await;
    // Nothing arrives: the wait ends with its timeout.
    assert!(
        !follower
            .wait_for_work(Duration::from_millis(200))
            .await
            .unwrap()
    );
    let waiting = {
        let follower = Arc::clone(&follower);
        tokio::spawn(async move { follower.wait_for_work(PATIENCE).await })
    };
    // The follower is listening once its first wait returned; the write
    // that makes an issue ready wakes it, whoever makes it.
    leader.put(&record(5)).await.unwrap();
    assert!(waiting.await.unwrap().unwrap(), "woken before the timeout");
    let claims = follower
        .claim("f", 1, SystemTime::now(), &begin)
        .await
        .unwrap();
    assert_eq!(claims.len(), 1);

    follower.heartbeat("f").await.unwrap();
    leader.heartbeat("l").await.unwrap();
    let nodes: Vec<String> = leader
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.node)
        .collect();
    assert_eq!(nodes, ["f", "l"]);
}

#[tokio::test]
async fn a_write_from_an_older_copy_does_not_take_back_an_operators_cancel() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let leader = store(&db, Duration::from_secs(6)).await;
    let operator = store(&db, Duration::from_secs(6)).await;
    let mut r = record(7);
    r.status = IssueStatus::Queued;
    leader.put(&r).await.unwrap();
    // The leader's copy in memory, then an operator's cancel elsewhere.
    let leader_copy = leader.get(r.key()).await.unwrap().unwrap();
    let cancelled = claude_flow_core::ops::cancel(&operator, r.key())
        .await
        .unwrap();
    assert_eq!(cancelled.status, IssueStatus::Cancelled);
    // The leader notes a report that went through: a whole-record write of
    // its older copy, with newer reports.
    let mut noted = leader_copy.clone();
    noted.reports.shown = Some(claude_flow_core::Shown::Cancelled);
    leader.put(&noted).await.unwrap();
    let claimed = operator
        .claim("x", 1, SystemTime::now(), &begin)
        .await
        .unwrap();
    assert!(claimed.is_empty(), "a cancelled issue was claimed");
    let now = operator.get(r.key()).await.unwrap().unwrap();
    assert_eq!(now.status, IssueStatus::Cancelled);
    assert_eq!(
        now.reports.shown,
        Some(claude_flow_core::Shown::Cancelled),
        "the leader's note is kept"
    );
}

#[tokio::test]
async fn a_stop_the_holder_had_not_seen_is_handed_to_its_finish() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = store(&db, Duration::from_secs(30)).await;
    store.put(&record(7)).await.unwrap();
    let claim = store
        .claim("a", 1, SystemTime::now(), &begin)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert!(
        store
            .request_stop(claim.record.key(), &claim.run_id, StopRequest::Operator)
            .await
            .unwrap()
    );
    // The workflow failed on its own before the holder heard of the stop.
    let mut failed = claim.record.clone();
    failed.status = IssueStatus::Retrying;
    let seen = std::sync::Mutex::new(None);
    let settle = |r: &mut IssueRecord, stop: Option<StopRequest>| {
        *seen.lock().unwrap() = stop;
        if stop.is_some() {
            r.status = IssueStatus::Cancelled;
        }
    };
    store.finish(&claim, &failed, &settle).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), Some(StopRequest::Operator));
    let stored = store.get(claim.record.key()).await.unwrap().unwrap();
    assert_eq!(stored.status, IssueStatus::Cancelled);
}
