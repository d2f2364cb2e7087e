//! Retention through the real binaries: `claude-flow prune [--dry-run]`
//! with no service and through a running one, and the daemon pruning by
//! itself at start. Never a running or waiting issue's files; records stay.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, SystemTime};

use claude_flow_daemon::Daemon;
use common::{Fixture, free_port, time, wait_for};
use serde_json::json;

/// Retention in these tests: an issue is due a second after it settled.
const RETENTION: Duration = Duration::from_secs(1);

/// Runs the CLI off the async threads (the daemon may run in this process).
async fn cli(f: &Fixture, args: &[&str]) -> Output {
    let mut cmd = f.cli_process(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn issue_dirs(f: &Fixture, n: u64) -> [PathBuf; 2] {
    [
        f.workspace(n),
        f.path(&format!("state/logs/local__issues/issue-{n}")),
    ]
}

fn has_files(f: &Fixture, n: u64) -> bool {
    issue_dirs(f, n).iter().all(|d| d.is_dir())
}

fn has_no_files(f: &Fixture, n: u64) -> bool {
    issue_dirs(f, n).iter().all(|d| !d.exists())
}

/// Waits until issue `n` settled longer ago than the retention.
fn wait_until_due(f: &Fixture, n: u64) {
    let settled = time(&f.show(n)["updated_at"]);
    wait_for("the issue to be older than the retention", || {
        SystemTime::now() >= settled + RETENTION
    });
}

/// A workflow that leaves 100 KB in its workspace and a link to a
/// directory outside it; issue 2 runs until `release` exists, issue 4
/// fails.
const WORKFLOW: &str = r#"
head -c 100000 /dev/zero > big
ln -sfn "$OUTSIDE" escape
echo "working on $CLAUDE_FLOW_ISSUE_NUMBER"
case "$CLAUDE_FLOW_ISSUE_NUMBER" in
  2) touch started; while [ ! -e "$OUTSIDE/release" ]; do sleep 0.05; done ;;
  4) exit 1 ;;
esac
exit 0
"#;

fn fixture(listen: &str, retention: serde_json::Value) -> Fixture {
    let f = Fixture::new();
    std::fs::create_dir(f.path("outside")).unwrap();
    std::fs::write(f.path("outside/precious"), "keep me").unwrap();
    f.config(json!({
        "service": {
            "retention": retention,
            "listen": listen,
            "retry_backoff": "1h",
            "retry_backoff_max": "1h"
        },
        "workflow": {"env": {"OUTSIDE": f.path("outside")}},
    }));
    f.workflow(WORKFLOW);
    f
}

#[test]
fn prune_by_hand_says_what_it_frees_and_keeps_the_records() {
    let f = fixture("", json!("1s"));
    f.issue(1, "One", "");
    f.issue(3, "Three", "");
    let out = f.cli().args(["run", "--once"]).output().unwrap();
    stdout(&out);
    wait_until_due(&f, 1);
    wait_until_due(&f, 3);

    let dry = stdout(&f.cli().args(["prune", "--dry-run"]).output().unwrap());
    assert!(
        dry.contains("local/issues#1: would free 97.") && dry.contains(" KiB (round 1)"),
        "{dry}"
    );
    assert!(dry.contains("local/issues#3: would free"), "{dry}");
    assert!(
        dry.contains("in total, 2 issues (dry run: nothing removed)"),
        "{dry}"
    );
    assert!(has_files(&f, 1) && has_files(&f, 3));

    let json: serde_json::Value = serde_json::from_str(&stdout(
        &f.cli()
            .args(["prune", "--dry-run", "--json"])
            .output()
            .unwrap(),
    ))
    .unwrap();
    assert_eq!(json["dry_run"], true);
    assert!(json["bytes"].as_u64().unwrap() >= 200_000, "{json}");

    let done = stdout(&f.cli().arg("prune").output().unwrap());
    assert!(done.contains("local/issues#1: freed 97."), "{done}");
    assert!(done.contains("freed 19"), "{done}");
    assert!(done.contains("in total, 2 issues"), "{done}");
    assert!(has_no_files(&f, 1) && has_no_files(&f, 3));
    // Links were removed, not followed.
    assert_eq!(
        std::fs::read_to_string(f.path("outside/precious")).unwrap(),
        "keep me"
    );
    // The records stay, marked.
    assert_eq!(f.list().len(), 2);
    assert!(f.show(1)["pruned_at"].is_string());
    assert_eq!(f.show(1)["status"], "done");
    let shown = stdout(&f.cli().args(["show", "1"]).output().unwrap());
    assert!(shown.contains("workspace and logs removed"), "{shown}");

    let logs = f.cli().args(["logs", "3"]).output().unwrap();
    assert_eq!(logs.status.code(), Some(1));
    let err = String::from_utf8_lossy(&logs.stderr);
    assert!(err.contains("its logs were removed"), "{err}");

    let again = stdout(&f.cli().arg("prune").output().unwrap());
    assert_eq!(again.trim(), "freed 0 B in total, 0 issues");

    // A new round after pruning works in a fresh workspace.
    let out = f.cli().args(["retry", "1"]).output().unwrap();
    stdout(&out);
    stdout(&f.cli().args(["run", "--once"]).output().unwrap());
    assert_eq!(f.show(1)["status"], "done");
    assert!(f.show(1)["pruned_at"].is_null());
    assert!(f.workspace(1).join("big").exists());
}

#[test]
fn with_retention_null_prune_refuses_and_says_why() {
    let f = fixture("", serde_json::Value::Null);
    f.issue(1, "One", "");
    stdout(&f.cli().args(["run", "--once"]).output().unwrap());
    let out = f.cli().arg("prune").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("service.retention is null"), "{err}");
    assert!(has_files(&f, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_prunes_by_itself_and_prune_goes_through_it() {
    let listen = format!("127.0.0.1:{}", free_port());
    let f = fixture(&listen, json!("1s"));
    // Issue 1 settled in an earlier run.
    f.issue(1, "One", "");
    stdout(&cli(&f, &["run", "--once"]).await);
    let f = tokio::task::spawn_blocking(move || {
        wait_until_due(&f, 1);
        f
    })
    .await
    .unwrap();
    // 2 runs until released, 3 settles, 4 fails and waits an hour.
    for n in 2..=4 {
        f.issue(n, &format!("Issue {n}"), "");
    }
    let handle = Daemon::builder(f.config_path())
        .init_logging(false)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let f = tokio::task::spawn_blocking(move || {
        wait_for("issue 1 to be pruned at start", || {
            f.show(1)["pruned_at"].is_string()
        });
        assert!(has_no_files(&f, 1));
        wait_for("issue 2 to run", || f.workspace(2).join("started").exists());
        wait_for("issue 3 to settle", || f.show(3)["status"] == "done");
        wait_for("issue 4 to wait for its retry", || {
            f.show(4)["status"] == "retrying"
        });
        wait_until_due(&f, 3);
        f
    })
    .await
    .unwrap();

    // Like every action of the API, it needs the token.
    assert_eq!(common::post_without_token(&listen, "/api/prune").await, 401);
    assert!(has_files(&f, 3));

    let dry = stdout(&cli(&f, &["prune", "--dry-run"]).await);
    assert!(dry.contains("local/issues#3: would free"), "{dry}");
    assert!(dry.contains("in total, 1 issue (dry run"), "{dry}");
    assert!(has_files(&f, 3));
    let done = stdout(&cli(&f, &["prune"]).await);
    assert!(done.contains("local/issues#3: freed"), "{done}");
    assert!(done.contains("in total, 1 issue"), "{done}");
    assert!(has_no_files(&f, 3));
    let shown = stdout(&cli(&f, &["show", "3"]).await);
    assert!(shown.contains("workspace and logs removed"), "{shown}");
    // The running and the waiting issue keep theirs.
    assert!(has_files(&f, 2) && has_files(&f, 4));
    assert_eq!(f.list().len(), 4);

    std::fs::write(f.path("outside/release"), "").unwrap();
    let f = tokio::task::spawn_blocking(move || {
        wait_for("issue 2 to settle", || f.show(2)["status"] == "done");
        f
    })
    .await
    .unwrap();
    handle.shutdown();
    handle.wait().await.unwrap();
    assert!(has_files(&f, 2));
}
