//! The `StateStore` contract, one test body run against every durable
//! store: the file journal and PostgreSQL (when `CLAUDE_FLOW_TEST_POSTGRES`
//! names a server).
#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use claude_flow_core::state::Guarantees;
use claude_flow_core::{
    FileStore, Issue, IssueKey, IssueRecord, IssueStatus, RepoId, ServiceState, StateStore,
};

type Opened = Pin<Box<dyn Future<Output = Box<dyn StateStore>>>>;

fn record(n: u64) -> IssueRecord {
    let key = IssueKey::new(RepoId::new("acme", "widgets").unwrap(), n);
    IssueRecord::new(Issue::new(key, format!("issue {n}")))
}

/// What every durable store must do. `open` opens the same store again,
/// as a restarted service would (the previous handle is dropped first).
async fn contract(open: impl Fn() -> Opened) {
    let store = open().await;
    assert!(store.load().await.unwrap().is_empty());
    assert_eq!(store.load_service().await.unwrap(), ServiceState::default());
    assert!(store.guarantees().durable);

    let mut first = record(1);
    store.put(&first).await.unwrap();
    store.put(&record(2)).await.unwrap();
    first.status = IssueStatus::Retrying;
    first.next_retry_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000));
    first.last_error = Some("exit code 3".into());
    store.put(&first).await.unwrap();
    assert_eq!(store.get(first.key()).await.unwrap().as_ref(), Some(&first));
    let missing = IssueKey::new(RepoId::new("acme", "widgets").unwrap(), 99);
    assert_eq!(store.get(&missing).await.unwrap(), None);

    let mut third = record(3);
    third.status = IssueStatus::Done;
    store.put_relaxed(&third).await.unwrap();
    let paused = ServiceState {
        paused_until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)),
        pause_reason: Some("quota".into()),
        quota_exits: 2,
        ..ServiceState::default()
    };
    store.put_service(&paused).await.unwrap();
    drop(store);

    // A restarted service sees every acknowledged write, the last one per
    // issue winning.
    let store = open().await;
    let mut loaded = store.load().await.unwrap();
    loaded.sort_by(|a, b| a.key().cmp(b.key()));
    assert_eq!(loaded, vec![first.clone(), record_like(&loaded[1]), third]);
    assert_eq!(loaded[1].key().number, 2);
    assert_eq!(store.list().await.unwrap().len(), 3);
    assert_eq!(store.load_service().await.unwrap(), paused);
}

/// Record 2 as stored (its `updated_at` is whatever `record` gave it).
fn record_like(stored: &IssueRecord) -> IssueRecord {
    let mut expected = record(2);
    expected.updated_at = stored.updated_at;
    expected
}

#[tokio::test]
async fn the_file_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    contract(move || {
        let path = path.clone();
        Box::pin(async move {
            let store = FileStore::open(&path).unwrap();
            assert_eq!(store.guarantees(), Guarantees::SINGLE_DAEMON);
            assert!(store.coordination().is_none());
            Box::new(store) as Box<dyn StateStore>
        })
    })
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn the_postgres_store_keeps_the_contract() {
    use claude_flow_core::state::{PostgresSettings, PostgresStore};
    let Some(db) = claude_flow_core::state::TestDb::create().await else {
        return;
    };
    let url = db.url.clone();
    contract(move || {
        let url = url.clone();
        Box::pin(async move {
            let store = PostgresStore::connect(&url, PostgresSettings::default())
                .await
                .unwrap();
            assert_eq!(store.guarantees(), Guarantees::SHARED);
            assert!(store.coordination().is_some());
            Box::new(store) as Box<dyn StateStore>
        })
    })
    .await;
}
