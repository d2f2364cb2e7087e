//! State-store transitions and loads. Run: `cargo bench -p claude-flow-benches --bench state_store`.

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

use std::sync::Arc;

use claude_flow_core::{FileStore, Issue, IssueKey, IssueRecord, IssueStatus, StateStore};

fn main() {
    divan::main();
}

fn record(n: u64) -> IssueRecord {
    let key = IssueKey::new("acme/app".parse().unwrap(), n);
    let mut issue = Issue::new(
        key,
        format!("Issue number {n} with a title of typical length"),
    );
    issue.body = "A body of a few hundred bytes. ".repeat(10);
    issue.html_url = format!("https://github.com/acme/app/issues/{n}");
    IssueRecord::new(issue)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One transition at a time: the latency of a durable put (write + fdatasync).
#[divan::bench(sample_count = 20)]
fn put_one_at_a_time(bencher: divan::Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let rt = runtime();
    let mut r = record(1);
    bencher.bench_local(|| {
        r.status = if r.status == IssueStatus::Running {
            IssueStatus::Done
        } else {
            IssueStatus::Running
        };
        rt.block_on(store.put(&r)).unwrap();
    });
}

/// 64 transitions in flight together: group commit shares the syncs.
#[divan::bench(sample_count = 20)]
fn put_64_concurrent(bencher: divan::Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let rt = runtime();
    let records: Vec<IssueRecord> = (0..64).map(record).collect();
    bencher
        .counter(divan::counter::ItemsCount::new(64usize))
        .bench_local(|| {
            rt.block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                for r in &records {
                    let (store, r) = (Arc::clone(&store), r.clone());
                    tasks.spawn(async move { store.put(&r).await });
                }
                while let Some(done) = tasks.join_next().await {
                    done.unwrap().unwrap();
                }
            });
        });
}

/// Loading a store of 10,000 records, as the CLI and a restart do.
#[divan::bench(sample_count = 10)]
fn load_10000_records(bencher: divan::Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    {
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..10_000 {
                let store = Arc::clone(&store);
                tasks.spawn(async move { store.put(&record(n)).await });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap().unwrap();
            }
        });
    }
    bencher.bench_local(|| {
        let store = FileStore::open_read_only(dir.path()).unwrap();
        let all = rt.block_on(store.load()).unwrap();
        assert_eq!(all.len(), 10_000);
    });
}
