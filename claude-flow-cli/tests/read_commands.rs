//! The read commands as an operator uses them (CONTRACT section 6):
//! `status`, `list [--status S] [--skipped]`, `show`, `logs [--follow]
//! [--tail N]`, `--json` where it is honoured, quiet in a closed pipe, and
//! errors that name `service.state_dir`.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use common::{Fixture, free_port, read_until, start_service, wait_for};
use serde_json::{Value, json};

fn run(f: &Fixture, args: &[&str]) -> String {
    f.stdout(args)
}

/// The exit code and stderr of a command that must fail.
fn fail(f: &Fixture, args: &[&str]) -> (i32, String) {
    let out = f.cli().args(args).output().unwrap();
    assert!(!out.status.success(), "claude-flow {args:?} succeeded");
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The service for `f` in a runtime of its own, so that the test's own
/// thread can run the CLI beside it.
fn service_beside(f: &Fixture) -> (tokio::runtime::Runtime, claude_flow_daemon::DaemonHandle) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.block_on(start_service(f));
    (rt, handle)
}

#[test]
fn output_into_a_closed_pipe_ends_every_read_command_quietly() {
    let f = Fixture::new();
    f.config(json!({"service": {"max_attempts": 1}}));
    f.issue(1, "Say a lot, then fail", "");
    f.workflow("for i in $(seq 1 3000); do echo \"line $i of a long log\"; done\nexit 1");
    run(&f, &["run", "--once"]);
    let commands: &[&[&str]] = &[
        &["list"],
        &["list", "--json"],
        &["list", "--skipped"],
        &["status"],
        &["status", "--json"],
        &["show", "1"],
        &["show", "1", "--json"],
        &["logs", "1"],
        &["logs", "1", "--tail", "5"],
        &["config", "show"],
        &["completions", "bash"],
        &["--help"],
        // Without systemd here: the dry run notes that, then its plan.
        &["service", "status", "--dry-run"],
        &["service", "install", "--dry-run", "--daemon", "/bin/true"],
    ];
    for args in commands {
        // The reading end is closed before the command writes anything,
        // as `| head -0` does; every write then fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = f
            .cli_process(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0 | 141)) || out.status.signal() == Some(13),
            "claude-flow {args:?} into a closed pipe: {:?}, stderr: {stderr}",
            out.status
        );
        assert!(
            stderr.is_empty(),
            "claude-flow {args:?} into a closed pipe said: {stderr}"
        );
    }
}

#[test]
fn json_is_offered_and_accepted_only_by_status_list_and_show() {
    let f = Fixture::new();
    for command in ["status", "list", "show"] {
        let help = run(&f, &[command, "--help"]);
        assert!(help.contains("--json"), "{command} --help: {help}");
    }
    for command in ["logs", "retry", "cancel", "resume", "run"] {
        let help = run(&f, &[command, "--help"]);
        assert!(!help.contains("--json"), "{command} --help: {help}");
    }
    let (code, stderr) = fail(&f, &["logs", "1", "--json"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--json"), "{stderr}");
}

#[test]
fn cancel_help_says_that_it_kills_a_running_workflow() {
    let f = Fixture::new();
    let help = run(&f, &["cancel", "--help"]);
    assert!(help.contains("SIGTERM"), "{help}");
    assert!(help.contains("SIGKILL"), "{help}");
    assert!(help.contains("workflow.kill_grace"), "{help}");
}

#[test]
fn a_bad_status_filter_is_a_usage_error_naming_the_statuses() {
    let f = Fixture::new();
    let (code, stderr) = fail(&f, &["list", "--status", "finished"]);
    assert_eq!(code, 2, "{stderr}");
    for status in [
        "queued",
        "running",
        "retrying",
        "done",
        "failed",
        "cancelled",
    ] {
        assert!(stderr.contains(status), "{status} not named: {stderr}");
    }
}

#[test]
fn a_state_dir_that_cannot_be_read_is_named_as_service_state_dir() {
    let f = Fixture::new();
    std::fs::write(f.path("afile"), "not a directory").unwrap();
    f.config(json!({"service": {"state_dir": "afile/state"}}));
    for args in [
        &["list"][..],
        &["list", "--skipped"],
        &["status"],
        &["show", "1"],
        &["logs", "1"],
        &["retry", "1"],
        &["cancel", "1"],
        &["resume"],
        &["prune"],
        &["prune", "--dry-run"],
    ] {
        let (code, stderr) = fail(&f, args);
        assert_eq!(code, 78, "{args:?}: {stderr}");
        assert!(stderr.contains("service.state_dir"), "{args:?}: {stderr}");
        assert!(stderr.contains("afile"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn show_gives_each_failed_attempts_reason_and_the_last_lines_of_its_log() {
    let f = Fixture::new();
    f.config(json!({"service": {"max_attempts": 2}}));
    f.issue(1, "Build it", "");
    f.workflow(
        r#"for i in $(seq 1 50); do echo "compiling unit $i"; done
echo "error: cannot find libfoo (attempt $CLAUDE_FLOW_ATTEMPT)"
exit 3"#,
    );
    run(&f, &["run", "--once"]);
    let show = run(&f, &["show", "1"]);
    for attempt in [1, 2] {
        assert!(
            show.contains(&format!("error: cannot find libfoo (attempt {attempt})")),
            "{show}"
        );
    }
    assert!(show.contains("exit code 3"), "{show}");
    assert!(show.contains("compiling unit 50"), "{show}");
    // The last lines, not the whole log.
    assert!(!show.contains("compiling unit 1\n"), "{show}");
}

/// The workflow: issue 2 fails at once; the others print five steps, say
/// they started, and wait for `<root>/release`.
const WORKFLOW: &str = r#"root=../../../..
if [ "$CLAUDE_FLOW_ISSUE_NUMBER" = 2 ]; then
  echo "cannot build: missing libfoo"
  exit 1
fi
for i in 1 2 3 4 5; do echo "step $i"; done
touch $root/started
while [ ! -e $root/release ]; do sleep 0.05; done
echo "finished""#;

fn entry<'a>(list: &'a [Value], issue: &str) -> &'a Value {
    list.iter()
        .find(|e| e["issue"] == issue)
        .unwrap_or_else(|| panic!("{issue} not listed: {list:?}"))
}

#[test]
fn a_running_and_a_retrying_issue_as_status_list_and_logs_show_them() {
    let listen = format!("127.0.0.1:{}", free_port());
    let f = Fixture::new();
    f.config(json!({"service": {
        "listen": listen,
        "retry_backoff": "1h",
        "retry_backoff_max": "1h",
    }}));
    f.issue(1, "Run long", "");
    f.issue(2, "Fail soon", "");
    f.workflow(WORKFLOW);
    let (rt, handle) = service_beside(&f);
    wait_for("issue 1 to start", || f.path("started").exists());
    wait_for("issue 2 to wait for its retry", || {
        f.list()
            .iter()
            .any(|e| e["issue"] == "local/issues#2" && e["status"] == "retrying")
    });

    // list: the running attempt's start, the next retry.
    let json = f.list();
    let running = entry(&json, "local/issues#1");
    let retrying = entry(&json, "local/issues#2");
    let started_at = running["started_at"].as_str().unwrap().to_owned();
    let next_retry = retrying["next_retry_at"].as_str().unwrap().to_owned();
    let text = run(&f, &["list"]);
    let line = |issue: &str| {
        text.lines()
            .find(|l| l.starts_with(issue))
            .unwrap_or_else(|| panic!("{issue} not in {text}"))
            .to_owned()
    };
    assert!(line("local/issues#1").contains(&started_at), "{text}");
    assert!(line("local/issues#1").contains("running"), "{text}");
    assert!(line("local/issues#2").contains(&next_retry), "{text}");
    assert!(line("local/issues#2").contains("retrying"), "{text}");

    // list --status
    let only_running = run(&f, &["list", "--status", "running"]);
    assert!(only_running.contains("local/issues#1"), "{only_running}");
    assert!(!only_running.contains("local/issues#2"), "{only_running}");
    let filtered: Vec<Value> =
        serde_json::from_str(&run(&f, &["list", "--status", "retrying,failed", "--json"])).unwrap();
    assert_eq!(filtered.len(), 1, "{filtered:?}");
    assert_eq!(filtered[0]["issue"], "local/issues#2");

    // status: round, attempt, elapsed time, the last poll.
    let status = run(&f, &["status"]);
    assert!(
        status.contains("local/issues#1 round 1 attempt 1, running for"),
        "{status}"
    );
    assert!(status.contains("polled:"), "{status}");
    let status = f.status();
    assert_eq!(status["running"][0]["issue"], "local/issues#1");
    assert_eq!(status["running"][0]["round"], 1);
    assert_eq!(status["running"][0]["attempt"], 1);
    assert_eq!(status["running"][0]["started_at"], started_at.as_str());
    assert!(status["running"][0]["elapsed_seconds"].is_u64(), "{status}");
    assert!(status["paused_until"].is_null(), "{status}");
    assert!(status["pause_reason"].is_null(), "{status}");
    assert!(status["last_poll"]["at"].is_string(), "{status}");
    assert_eq!(status["last_poll"]["ok"], true, "{status}");

    // logs --tail, then --follow --tail until the attempt ends.
    assert_eq!(run(&f, &["logs", "1", "--tail", "2"]), "step 4\nstep 5\n");
    let mut follow = f
        .cli_process(&["logs", "1", "--follow", "--tail", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_until(&mut stdout, &mut seen, "step 5\n");
    std::fs::write(f.path("release"), "").unwrap();
    stdout.read_to_end(&mut seen).unwrap();
    assert!(follow.wait().unwrap().success());
    let seen = String::from_utf8(seen).unwrap();
    assert!(seen.starts_with("step 5\n"), "{seen}");
    assert!(seen.contains("finished\n"), "{seen}");
    assert!(!seen.contains("step 4"), "{seen}");

    // show: the failed attempt's reason and the end of its log.
    let show = run(&f, &["show", "2"]);
    assert!(show.contains("exit code 1"), "{show}");
    assert!(show.contains("cannot build: missing libfoo"), "{show}");

    handle.shutdown();
    rt.block_on(handle.wait()).unwrap();
}

#[test]
fn a_secret_the_workflow_prints_is_redacted_in_show_and_the_console() {
    const SECRET: &str = "plain-secret-value-4f1c2b";
    const SHAPED: &str = "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789";
    let listen = format!("127.0.0.1:{}", free_port());
    let f = Fixture::new();
    f.config(json!({
        "github": {"token": SECRET},
        "workflow": {"pass_token": true},
        "service": {"listen": listen, "max_attempts": 1},
    }));
    f.issue(1, "Leaky", "");
    f.issue(2, "Leaky, then long", "");
    // Issue 2 then prints a line long enough that the last 64 KiB of its
    // log start inside the token.
    f.workflow(&format!(
        "echo \"pushing with $GITHUB_TOKEN\"; echo \"found {SHAPED}\"; \
         if [ \"$CLAUDE_FLOW_ISSUE_NUMBER\" = 2 ]; then head -c 65500 /dev/zero | tr '\\0' x; echo; fi; \
         exit 1"
    ));
    let (rt, handle) = service_beside(&f);
    wait_for("both issues to fail", || {
        f.list().iter().filter(|e| e["status"] == "failed").count() == 2
    });
    let get = |path: &str, resume_at: Option<usize>| {
        rt.block_on(async {
            let mut request = reqwest::Client::new().get(format!("http://{listen}{path}"));
            if let Some(at) = resume_at {
                request = request.header("Last-Event-ID", at.to_string());
            }
            request.send().await.unwrap().text().await.unwrap()
        })
    };
    let log = |n: u64| {
        std::fs::read(f.path(&format!(
            "state/logs/local__issues/issue-{n}/round-1-attempt-1.log"
        )))
        .unwrap()
    };
    let show = run(&f, &["show", "1"]);
    assert!(show.contains("pushing with [redacted]"), "{show}");
    let page = get("/issues/local/issues/1", None);
    assert!(page.contains("pushing with [redacted]"), "{page}");
    let stream = get("/issues/local/issues/1/rounds/1/attempts/1/log", None);
    assert!(stream.contains("pushing with [redacted]"), "{stream}");
    // A browser resuming (Last-Event-ID) at an offset inside the token.
    let inside = log(1).windows(4).position(|w| w == b"ghp_").unwrap() + 1;
    let resumed = get(
        "/issues/local/issues/1/rounds/1/attempts/1/log",
        Some(inside),
    );
    // Tails that begin inside the token (the last 64 KiB of issue 2's log).
    let show_2 = run(&f, &["show", "2"]);
    let page_2 = get("/issues/local/issues/2", None);
    let stream_2 = get("/issues/local/issues/2/rounds/1/attempts/1/log", None);
    assert!(log(2).len() > 64 * 1024);
    for (what, text) in [
        ("show", &show),
        ("page", &page),
        ("log stream", &stream),
        ("resumed log stream", &resumed),
        ("show of a long log", &show_2),
        ("page of a long log", &page_2),
        ("log stream of a long log", &stream_2),
    ] {
        assert!(!text.contains(SECRET), "{what} shows the token: {text}");
        assert!(!text.contains(&SHAPED[8..]), "{what} shows a token: {text}");
    }
    handle.shutdown();
    rt.block_on(handle.wait()).unwrap();
}

#[test]
fn escape_sequences_in_titles_and_logs_do_not_reach_the_terminal() {
    let f = Fixture::new();
    f.config(json!({"service": {"max_attempts": 1}}));
    f.issue(1, "\u{1b}[31mRED\u{1b}[0m \u{1b}]0;pwned\u{7}", "");
    f.workflow("printf 'fatal \\033[2J\\033]0;owned\\007 done\\n'; exit 1");
    run(&f, &["run", "--once"]);
    for args in [&["list"][..], &["show", "1"]] {
        let out = run(&f, args);
        assert!(
            !out.contains('\u{1b}') && !out.contains('\u{7}'),
            "{args:?} passes control characters: {out:?}"
        );
        assert!(out.contains("\\u{1b}[31mRED"), "{args:?}: {out}");
    }
    let show = run(&f, &["show", "1"]);
    assert!(show.contains("fatal \\u{1b}[2J"), "{show}");
}
