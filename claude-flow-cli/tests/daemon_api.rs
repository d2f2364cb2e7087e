//! The CLI operating a running service through its HTTP API: a real
//! daemon (its library, in this process) and the real `claude-flow` binary.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use claude_flow_daemon::Daemon;
use common::{Fixture, wait_for};
use serde_json::json;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_cancel_go_through_the_running_service() {
    let f = Fixture::new();
    let listen = format!("127.0.0.1:{}", free_port());
    f.config(json!({"service": {"listen": listen}}));
    f.issue(1, "Long", "");
    f.workflow("echo $$ > wf.pid\nwhile :; do sleep 0.05; done");
    let handle = Daemon::builder(f.config_path())
        .init_logging(false)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let pid_file = f.workspace(1).join("wf.pid");
    let started = pid_file.clone();
    tokio::task::spawn_blocking(move || wait_for("the workflow to start", || started.exists()))
        .await
        .unwrap();

    let mut status = f.cli_process(&["status"]);
    let out = tokio::task::spawn_blocking(move || status.output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("running (pid {})", std::process::id())),
        "{text}"
    );
    assert!(text.contains("health:  ok"), "{text}");

    // The service wrote its API token for the CLI, readable by its user only.
    let token_file = f.path("state/api-token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim();
    assert!(
        token.len() >= 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "not a 128-bit hex token: {} characters",
        token.len()
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Without it, the API refuses.
    assert_eq!(
        common::post_without_token(&listen, "/api/issues/local/issues/1/cancel").await,
        401
    );

    let mut cancel = f.cli_process(&["cancel", "1"]);
    let out = tokio::task::spawn_blocking(move || cancel.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(token));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(token));
    let mut watch = handle.orchestrator().subscribe_status();
    tokio::time::timeout(common::PATIENCE, watch.wait_for(|s| s.running.is_empty()))
        .await
        .expect("the cancelled workflow did not stop")
        .unwrap();
    let mut list = f.cli_process(&["list", "--json"]);
    let list = tokio::task::spawn_blocking(move || list.output())
        .await
        .unwrap()
        .unwrap();
    let issues: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(issues[0]["status"], "cancelled");

    handle.shutdown();
    handle.wait().await.unwrap();
}
