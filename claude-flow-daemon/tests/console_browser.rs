//! The web console in a real browser (headless Chromium through
//! chromedriver), over a real service: the daemon's library with local
//! issues, the file store and a workflow script. See `browser/mod.rs` for
//! when these tests skip.
//!
//! `CLAUDE_FLOW_SCREENSHOT=docs/console.png` (relative to the workspace)
//! saves the home page as the browser shows it.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod browser;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use claude_flow_daemon::{Daemon, DaemonHandle};
use serde_json::{Value, json};

const HOSTILE: &str =
    "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> Fix & escape";

/// Issue 1 writes a line every 0.3 s until `$STOP_FILE` exists; issue 4
/// succeeds with a pull request; the others print a trace and fail.
const WORKFLOW: &str = r#"#!/usr/bin/env bash
set -u
case "$CLAUDE_FLOW_ISSUE_NUMBER" in
1)
  i=0
  while [ ! -e "$STOP_FILE" ]; do
    i=$((i + 1)); echo "step $i: frobnicating the widget pipeline"; sleep 0.3
  done ;;
4)
  echo "docs updated"; echo "opened https://github.com/acme/widgets/pull/42" ;;
*)
  for i in $(seq 1 40); do echo "trace line $i"; sleep 0.02; done
  echo "fatal: the login test timed out"
  exit 3 ;;
esac
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    base: String,
    handle: DaemonHandle,
    http: reqwest::Client,
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let issues = root.join("issues");
        std::fs::create_dir(&issues).unwrap();
        for (n, title) in [
            (1, "Add a frobnicator to the widget pipeline"),
            (2, "Fix the flaky login test"),
            (3, HOSTILE),
            (4, "Document the retry policy"),
        ] {
            std::fs::write(
                issues.join(format!("{n}-issue.md")),
                format!("# {title}\n\nBody.\n"),
            )
            .unwrap();
        }
        let workflow = root.join("wf.sh");
        std::fs::write(&workflow, WORKFLOW).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&workflow, std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = browser::free_port();
        let config = json!({
            "source": "local",
            "local": {"dir": "issues"},
            "workflow": {
                "command": ["./wf.sh"],
                "kill_grace": "1s",
                "env": {"STOP_FILE": root.join("stop")},
            },
            "service": {
                "state_dir": "state",
                "poll_interval": "200ms",
                "listen": format!("127.0.0.1:{port}"),
                "max_concurrent": 3,
                "max_attempts": 2,
                "retry_backoff": "1s",
                "retry_backoff_max": "2s",
                "shutdown_grace": "1s",
            },
        });
        std::fs::write(root.join("config.json"), config.to_string()).unwrap();
        let handle = Daemon::builder(root.join("config.json"))
            .init_logging(false)
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        Self {
            _dir: dir,
            base: format!("http://127.0.0.1:{port}"),
            root,
            handle,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Each issue's status, by number.
    async fn statuses(&self) -> Vec<(u64, String)> {
        let Ok(response) = self.http.get(self.url("/api/issues")).send().await else {
            return Vec::new();
        };
        let list: Vec<Value> = response.json().await.unwrap_or_default();
        list.iter()
            .map(|s| {
                (
                    s["number"].as_u64().unwrap(),
                    s["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    async fn wait_statuses(&self, want: &[(u64, &str)]) {
        let start = Instant::now();
        loop {
            let now = self.statuses().await;
            if want
                .iter()
                .all(|(n, s)| now.iter().any(|(m, t)| m == n && t == s))
            {
                return;
            }
            assert!(
                start.elapsed() < browser::PATIENCE,
                "timed out waiting for {want:?}: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        std::fs::write(self.root.join("stop"), "").unwrap();
        self.handle.shutdown();
        tokio::time::timeout(browser::PATIENCE, self.handle.wait())
            .await
            .expect("the service stops")
            .unwrap();
    }
}

/// The highest `step N` in a log's text.
fn last_step(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("step ")?.split(':').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_running_and_failed_issues_live_and_safely() {
    let Some(browser) =
        browser::start("the_console_shows_running_and_failed_issues_live_and_safely").await
    else {
        return;
    };
    let service = Fixture::start().await;
    service
        .wait_statuses(&[(1, "running"), (2, "failed"), (3, "failed"), (4, "done")])
        .await;

    // The home page: the running issue, the failed ones with their reason,
    // and the hostile title as text, its script never run.
    browser.client.goto(&service.url("/")).await.unwrap();
    let running = browser.text("#running").await;
    assert!(running.contains("local/issues#1"), "{running}");
    assert!(
        running.contains("Add a frobnicator to the widget pipeline"),
        "{running}"
    );
    let settled = browser.text("#settled").await;
    assert!(settled.contains("Fix the flaky login test"), "{settled}");
    assert!(settled.contains("failed: exit code 3"), "{settled}");
    assert!(
        settled.contains("https://github.com/acme/widgets/pull/42"),
        "{settled}"
    );
    assert!(
        settled.contains(HOSTILE),
        "the hostile title shows as text: {settled}"
    );
    assert_eq!(
        browser.eval("return window.pwned === undefined").await,
        json!(true)
    );
    assert_eq!(
        browser.eval("return document.title").await,
        json!("Service · claude-flow")
    );
    // Elapsed times count up in the page.
    let elapsed = browser.text("#running .elapsed").await;
    browser
        .wait_text("the elapsed time to count", "#running .elapsed", |t| {
            t != elapsed
        })
        .await;
    if let Ok(path) = std::env::var("CLAUDE_FLOW_SCREENSHOT") {
        screenshot(&browser, &path).await;
    }

    // The failed issue's page: every attempt, and its log's last lines.
    browser
        .client
        .goto(&service.url("/issues/local/issues/2"))
        .await
        .unwrap();
    let attempts = browser.text("#attempts").await;
    assert_eq!(
        attempts.matches("failed: exit code 3").count(),
        2,
        "{attempts}"
    );
    let tail = browser.text("details.tail pre").await;
    assert!(
        tail.ends_with("trace line 40\nfatal: the login test timed out"),
        "{tail}"
    );

    // The running issue's log grows while the page stays.
    browser
        .client
        .goto(&service.url("/issues/local/issues/1"))
        .await
        .unwrap();
    let first = browser
        .wait_text("the live log", "#live-log", |t| last_step(t) > 0)
        .await;
    browser
        .eval("window.sameDocument = true; return null")
        .await;
    browser
        .wait_text("the live log to advance", "#live-log", |t| {
            last_step(t) >= last_step(&first) + 3
        })
        .await;
    assert_eq!(
        browser.eval("return window.sameDocument === true").await,
        json!(true)
    );

    // Actions: refused in the page without the token, done with it.
    browser.click("button[data-post$='/cancel']").await;
    let said = browser.text("#action-result").await;
    assert!(said.contains("enter the API token"), "{said}");
    assert_eq!(
        service
            .statuses()
            .await
            .iter()
            .find(|s| s.0 == 1)
            .unwrap()
            .1,
        "running"
    );
    let token = std::fs::read_to_string(service.root.join("state/api-token")).unwrap();
    browser
        .find("#token-input")
        .await
        .send_keys(token.trim())
        .await
        .unwrap();
    browser.click("#token button[type=submit]").await;
    browser
        .wait_text("the token to be taken", "#token-state", |t| {
            t == "actions enabled"
        })
        .await;
    browser.click("button[data-post$='/cancel']").await;
    service.wait_statuses(&[(1, "cancelled")]).await;

    browser.close().await;
    service.stop().await;
}

/// Saves the page as shown; `path` relative to the workspace's root.
async fn screenshot(browser: &browser::Browser, path: &str) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let png = browser.client.screenshot().await.unwrap();
    std::fs::write(workspace.join(path), png).unwrap();
    eprintln!("console screenshot saved to {path}");
}
