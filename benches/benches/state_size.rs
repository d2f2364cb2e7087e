//! How big the file store's journal gets: 1,000 issues with 64 KiB bodies,
//! three attempts each (two failures, then success), through the real
//! `FileStore` with the writes a real run makes. Prints the size of
//! `state.jsonl` at the end and its peak along the way.
//!
//! Run: `cargo bench -p claude-flow-benches --bench state_size` (add
//! `--profile dev` to skip the release build: sizes do not depend on it).
//! `CLAUDE_FLOW_BENCH_ISSUES` and `CLAUDE_FLOW_BENCH_BODY` change the issue
//! count and the body size in bytes.

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

use std::time::{Duration, Instant, SystemTime};

use claude_flow_core::{
    Attempt, AttemptOutcome, FileStore, Issue, IssueKey, IssueRecord, IssueStatus, Shown,
    StateStore,
};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let issues = env_or("CLAUDE_FLOW_BENCH_ISSUES", 1000);
    let body_len = env_or("CLAUDE_FLOW_BENCH_BODY", 64 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("state.jsonl");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut peak = 0u64;
    let mut writes = 0usize;
    {
        let store = FileStore::open(dir.path()).unwrap();
        rt.block_on(async {
            for n in 1..=issues as u64 {
                writes += run_issue(&store, n, body_len).await;
                peak = peak.max(std::fs::metadata(&journal).unwrap().len());
            }
        });
    }
    let elapsed = started.elapsed();
    let size = std::fs::metadata(&journal).unwrap().len();
    peak = peak.max(size);
    let load = Instant::now();
    let reader = FileStore::open_read_only(dir.path()).unwrap();
    let records = rt.block_on(reader.load()).unwrap();
    assert_eq!(records.len(), issues);
    assert!(records.iter().all(|r| r.issue.body.len() == body_len));
    let load = load.elapsed();
    let live = (issues * body_len) as f64;
    println!(
        "{issues} issues, {body_len}-byte bodies, {writes} writes: state.jsonl {} at the end \
         ({:.2}x the bodies), peak {} ({:.2}x); run {:.1} s, load {} ms",
        mib(size),
        size as f64 / live,
        mib(peak),
        peak as f64 / live,
        elapsed.as_secs_f64(),
        load.as_millis(),
    );
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The writes the orchestrator makes for one issue: queued, then per
/// attempt running and the start report (relaxed), a failure twice
/// (retrying), and finally done with its report. Returns the write count.
async fn run_issue(store: &FileStore, n: u64, body_len: usize) -> usize {
    let key = IssueKey::new("acme/app".parse().unwrap(), n);
    let mut issue = Issue::new(
        key,
        format!("Issue number {n} with a title of typical length"),
    );
    issue.body = body(n, body_len);
    issue.html_url = format!("https://github.com/acme/app/issues/{n}");
    issue.labels = vec!["claude-flow".into()];
    let mut r = IssueRecord::new(issue);
    store.put(&r).await.unwrap();
    let mut writes = 1;
    for number in 1..=3u32 {
        let now = SystemTime::now();
        r.status = IssueStatus::Running;
        r.next_retry_at = None;
        r.attempts.push(Attempt {
            number,
            round: r.round,
            run_id: format!("run-{n}-{number}"),
            started_at: now,
            finished_at: None,
            outcome: None,
            exit_code: None,
            signal: None,
            log_path: Some(format!("/var/lib/claude-flow/logs/acme/app/{n}/1-{number}.log").into()),
            pr_url: None,
            node: None,
        });
        r.updated_at = now;
        store.put(&r).await.unwrap();
        r.reports.shown = Some(Shown::Started { attempt: number });
        store.put_relaxed(&r).await.unwrap();
        writes += 2;
        let attempt = r.attempts.last_mut().unwrap();
        attempt.finished_at = Some(now + Duration::from_secs(60));
        if number < 3 {
            attempt.outcome = Some(AttemptOutcome::Failed {
                reason: "exit code 1".into(),
            });
            attempt.exit_code = Some(1);
            r.status = IssueStatus::Retrying;
            r.next_retry_at = Some(now + Duration::from_secs(120));
            r.last_error = Some("exit code 1".into());
            store.put(&r).await.unwrap();
            writes += 1;
        } else {
            let pr = format!("https://github.com/acme/app/pull/{}", 10_000 + n);
            attempt.outcome = Some(AttemptOutcome::Succeeded);
            attempt.exit_code = Some(0);
            attempt.pr_url = Some(pr.clone());
            r.status = IssueStatus::Done;
            r.pr_url = Some(pr);
            store.put(&r).await.unwrap();
            r.reports.shown = Some(Shown::Succeeded);
            store.put_relaxed(&r).await.unwrap();
            writes += 2;
        }
    }
    writes
}

/// Text that does not compress to nothing, different for every issue.
fn body(n: u64, len: usize) -> String {
    let mut s = String::with_capacity(len + 64);
    let mut i = 0u64;
    while s.len() < len {
        s.push_str(&format!(
            "Issue {n}, paragraph {i}: steps to reproduce and what was expected.\n"
        ));
        i += 1;
    }
    s.truncate(len);
    s
}
