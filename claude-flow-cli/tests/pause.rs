//! Quota pauses end to end (CONTRACT section 4): a real workflow script
//! prints `claude-flow: retry-after 0` and exits 75; the service pauses for
//! at least `service.retry_backoff`, `claude-flow status` and `/healthz`
//! show it, also after a restart, and `claude-flow resume` ends it, through
//! the running service or in the state directory.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use std::time::{Duration, SystemTime};

use claude_flow_core::api::ApiClient;
use claude_flow_daemon::{Daemon, DaemonHandle};
use common::{Fixture, PATIENCE, time, wait_for};
use serde_json::{Value, json};

/// The pause every test here provokes: long enough that it cannot end by
/// itself while a test runs.
const BACKOFF: Duration = Duration::from_secs(3600);

/// The first run of the workflow reports its quota exhausted, later runs
/// succeed; every run appends its round and attempt to `<root>/ledger`.
const QUOTA_ONCE: &str = r#"root=../../../..
echo "round $CLAUDE_FLOW_ROUND attempt $CLAUDE_FLOW_ATTEMPT" >> $root/ledger
if [ "$(wc -l < $root/ledger)" -eq 1 ]; then
  echo "the agent's usage limit is reached"
  echo "claude-flow: retry-after 0"
  exit 75
fi
echo "done""#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fixture(listen: &str) -> Fixture {
    let f = Fixture::new();
    f.config(json!({"service": {
        "listen": listen,
        "retry_backoff": "1h",
        "retry_backoff_max": "1h",
    }}));
    f.issue(1, "Spend the quota", "");
    f.workflow(QUOTA_ONCE);
    f
}

fn ledger(f: &Fixture) -> Vec<String> {
    std::fs::read_to_string(f.path("ledger"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `t` cut to whole seconds, as `status --json` prints times.
fn seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn run(f: &Fixture, args: &[&str]) -> String {
    let out = f.cli().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "claude-flow {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A runtime for in-process services, beside the test's own thread, from
/// which the CLI binary runs.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts the service on `rt` and waits for its first poll.
fn start(rt: &tokio::runtime::Runtime, f: &Fixture) -> DaemonHandle {
    rt.block_on(async {
        let handle = Daemon::builder(f.config_path())
            .init_logging(false)
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let mut status = handle.orchestrator().subscribe_status();
        tokio::time::timeout(PATIENCE, status.wait_for(|s| s.last_poll.is_some()))
            .await
            .expect("the first poll")
            .unwrap();
        handle
    })
}

/// Stops the service and waits until its state directory is free.
fn stop(rt: &tokio::runtime::Runtime, handle: DaemonHandle) {
    handle.shutdown();
    rt.block_on(handle.wait()).unwrap();
    drop(handle);
}

fn health(rt: &tokio::runtime::Runtime, listen: &str) -> claude_flow_core::api::Health {
    rt.block_on(ApiClient::for_listen(listen).unwrap().health())
        .unwrap()
}

#[test]
fn a_quota_exit_pauses_the_service_across_a_restart_until_claude_flow_resume() {
    let listen = format!("127.0.0.1:{}", free_port());
    let f = fixture(&listen);
    let rt = runtime();
    let before = seconds(SystemTime::now());
    let handle = start(&rt, &f);
    rt.block_on(async {
        let mut status = handle.orchestrator().subscribe_status();
        tokio::time::timeout(PATIENCE, status.wait_for(|s| s.paused_until.is_some()))
            .await
            .expect("the quota exit to pause the service")
            .unwrap();
    });

    // status --json, from the running service.
    let status = f.status();
    assert_eq!(status["service"]["running"], true);
    let until = time(&status["paused_until"]);
    assert!(
        until >= before + BACKOFF,
        "paused until {status}, less than service.retry_backoff"
    );
    let reason = status["pause_reason"].as_str().unwrap();
    assert!(
        reason.contains("local/issues#1") && reason.contains("quota"),
        "{reason}"
    );
    assert_eq!(status["running"], json!([]));
    // /healthz says the same, to the nanosecond.
    let healthy = health(&rt, &listen);
    let exact = healthy.paused_until.unwrap();
    assert_eq!(seconds(exact), until);
    assert_eq!(healthy.pause_reason.as_deref(), Some(reason));
    let text = run(&f, &["status"]);
    assert!(
        text.contains(&format!(
            "paused:  until {}",
            humantime::format_rfc3339_seconds(until)
        )) && text.contains("`claude-flow resume` ends the pause"),
        "{text}"
    );

    // Stopped: the state directory still says so.
    stop(&rt, handle);
    let status = f.status();
    assert_eq!(status["service"]["running"], false);
    assert_eq!(time(&status["paused_until"]), until);
    assert_eq!(status["pause_reason"], reason);
    assert_eq!(status["running"], json!([]));

    // Restarted: the service is paused from its start, and says so.
    let handle = start(&rt, &f);
    let healthy = health(&rt, &listen);
    assert_eq!(healthy.paused_until, Some(exact));
    assert_eq!(healthy.pause_reason.as_deref(), Some(reason));
    assert_eq!(time(&f.status()["paused_until"]), until);
    assert_eq!(ledger(&f).len(), 1, "a workflow started while paused");

    // claude-flow resume, through the running service.
    let said = run(&f, &["resume"]);
    assert_eq!(
        said,
        format!(
            "the pause until {} was lifted\n",
            humantime::format_rfc3339_seconds(until)
        )
    );
    wait_for("the issue to run again", || ledger(&f).len() == 2);
    wait_for("the issue to be done", || f.show(1)["status"] == "done");
    assert_eq!(
        ledger(&f),
        ["round 1 attempt 1", "round 1 attempt 2"],
        "the quota exit is an attempt of the round, not a failure"
    );
    let status = f.status();
    assert_eq!(status["paused_until"], Value::Null);
    assert_eq!(status["pause_reason"], Value::Null);
    assert_eq!(health(&rt, &listen).paused_until, None);
    assert_eq!(run(&f, &["resume"]), "not paused\n");
    stop(&rt, handle);
}

#[test]
fn without_a_running_service_resume_clears_the_pause_in_the_state_directory() {
    // `claude-flow run` has no HTTP API: status reads the state directory.
    let f = fixture("");
    let before = seconds(SystemTime::now());
    let mut service = f.cli_process(&["run"]).spawn().unwrap();
    let mut status = Value::Null;
    wait_for("the quota exit to pause the service", || {
        status = f.status();
        !status["paused_until"].is_null()
    });
    let until = time(&status["paused_until"]);
    assert!(until >= before + BACKOFF, "{status}");
    assert!(
        status["pause_reason"]
            .as_str()
            .is_some_and(|r| r.contains("local/issues#1")),
        "{status}"
    );
    assert_eq!(status["service"]["running"], true);
    assert_eq!(status["running"], json!([]));
    // The service holds the state and has no API to ask.
    let out = f.cli().arg("resume").output().unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(service.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(service.wait().unwrap().success());
    let text = run(&f, &["status"]);
    assert!(text.contains("service: not running"), "{text}");
    assert!(text.contains("paused:  until"), "{text}");

    assert_eq!(
        run(&f, &["resume"]),
        format!(
            "the pause until {} was lifted\n",
            humantime::format_rfc3339_seconds(until)
        )
    );
    let status = f.status();
    assert_eq!(status["paused_until"], Value::Null);
    assert_eq!(status["pause_reason"], Value::Null);
    assert!(!run(&f, &["status"]).contains("paused:"));
    assert_eq!(run(&f, &["resume"]), "not paused\n");

    // Nothing holds the work back any more.
    let settled = run(&f, &["run", "--once"]);
    assert!(settled.contains("1 done"), "{settled}");
    assert_eq!(ledger(&f), ["round 1 attempt 1", "round 1 attempt 2"]);
}

#[test]
fn status_lists_each_running_attempt_with_its_round_and_start() {
    let listen = format!("127.0.0.1:{}", free_port());
    let f = fixture(&listen);
    f.issue(2, "Also long", "");
    f.workflow("echo $$ > started\nwhile :; do sleep 0.05; done");
    let rt = runtime();
    let before = seconds(SystemTime::now());
    let handle = start(&rt, &f);
    wait_for("both workflows to start", || {
        (1..=2).all(|n| f.workspace(n).join("started").exists())
    });
    rt.block_on(async {
        let mut status = handle.orchestrator().subscribe_status();
        tokio::time::timeout(PATIENCE, status.wait_for(|s| s.running.len() == 2))
            .await
            .expect("two running attempts")
            .unwrap();
    });
    let status = f.status();
    let running = status["running"].as_array().unwrap();
    let issues: Vec<_> = running
        .iter()
        .map(|r| r["issue"].as_str().unwrap())
        .collect();
    assert_eq!(issues, ["local/issues#1", "local/issues#2"], "{status}");
    for r in running {
        assert_eq!(
            (r["round"].as_u64(), r["attempt"].as_u64()),
            (Some(1), Some(1))
        );
        let started = time(&r["started_at"]);
        assert!(started >= before && started <= SystemTime::now(), "{r}");
    }
    assert_eq!(status["paused_until"], Value::Null);
    let text = run(&f, &["status"]);
    for n in 1..=2 {
        assert!(
            text.contains(&format!("local/issues#{n} round 1 attempt 1, running for ")),
            "{text}"
        );
    }
    handle.shutdown_now();
    rt.block_on(handle.wait()).unwrap();
    drop(handle);
    // The interrupted attempts are not running any more, whatever the
    // records said when the service stopped.
    assert_eq!(f.status()["running"], json!([]));
}

#[test]
fn without_an_api_status_reads_the_running_attempts_from_the_state_directory() {
    let f = fixture("");
    f.workflow("echo $$ > started\nwhile [ ! -e ../../../../gate ]; do sleep 0.05; done");
    let mut service = f.cli_process(&["run", "--once"]).spawn().unwrap();
    wait_for("the workflow to start", || {
        f.workspace(1).join("started").exists()
    });
    let status = f.status();
    assert_eq!(status["service"]["health"], Value::Null);
    let running = status["running"].as_array().unwrap();
    assert_eq!(running.len(), 1, "{status}");
    assert_eq!(running[0]["issue"], "local/issues#1");
    assert_eq!(
        (running[0]["round"].as_u64(), running[0]["attempt"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(time(&running[0]["started_at"]) <= SystemTime::now());
    let text = run(&f, &["status"]);
    assert!(
        text.contains("working: local/issues#1 round 1 attempt 1, running for "),
        "{text}"
    );
    std::fs::write(f.path("gate"), "").unwrap();
    assert!(service.wait().unwrap().success());
    assert_eq!(f.status()["running"], json!([]));
}
