//! `claude-flow run --once` end to end: the real binary, real workflow
//! scripts, temporary directories.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use std::time::Duration;

use common::{Fixture, alive, read_pid, time, wait_for};
use serde_json::json;

#[test]
fn a_successful_workflow_gets_the_contract_environment_and_its_last_pr_url_is_recorded() {
    let f = Fixture::new();
    f.issue(7, "Fix the login", "The login fails.\n");
    f.workflow(
        r#"env > env.out
pwd > pwd.out
if read -r line; then echo "stdin: open"; else echo "stdin: closed"; fi
cp "$CLAUDE_FLOW_ISSUE_JSON_FILE" issue.json
echo "see https://github.com/acme/app/issues/1 for context"
echo "opened https://github.com/acme/app/pull/1"
echo "moved to https://github.com/acme/app/pull/2" >&2
echo "done""#,
    );
    f.cli()
        .args(["run", "--once"])
        .env("GITHUB_TOKEN", "ghp_never_in_the_workflow")
        .env("CLAUDE_FLOW_GITHUB__TOKEN", "ghp_also_never")
        .assert()
        .success()
        .stdout(predicates::str::contains("1 done"));

    let list = f.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["issue"], "local/issues#7");
    assert_eq!(list[0]["status"], "done");
    assert_eq!(list[0]["pr_url"], "https://github.com/acme/app/pull/2");

    let ws = f.workspace(7);
    let env = std::fs::read_to_string(ws.join("env.out")).unwrap();
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} not in the workflow's environment"))
            .to_owned()
    };
    assert_eq!(var("CLAUDE_FLOW_REPO"), "local/issues");
    assert_eq!(var("CLAUDE_FLOW_ISSUE_NUMBER"), "7");
    assert_eq!(var("CLAUDE_FLOW_ISSUE_TITLE"), "Fix the login");
    assert_eq!(var("CLAUDE_FLOW_BRANCH"), "claude-flow/issue-7");
    assert_eq!(var("CLAUDE_FLOW_ATTEMPT"), "1");
    assert_eq!(var("CLAUDE_FLOW_WORKSPACE"), ws.to_str().unwrap());
    assert!(var("CLAUDE_FLOW_ISSUE_URL").ends_with("7-issue.md"));
    assert!(!var("CLAUDE_FLOW_RUN_ID").is_empty());
    assert_eq!(
        std::fs::read_to_string(var("CLAUDE_FLOW_ISSUE_BODY_FILE")).unwrap(),
        "The login fails.\n"
    );
    assert!(!env.contains("ghp_"), "a token reached the workflow");
    assert!(!env.contains("CLAUDE_FLOW_GITHUB__TOKEN"));
    assert_eq!(
        std::fs::read_to_string(ws.join("pwd.out")).unwrap().trim(),
        ws.to_str().unwrap()
    );
    let issue: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.join("issue.json")).unwrap()).unwrap();
    for key in ["number", "title", "body", "labels", "html_url", "author"] {
        assert!(issue.get(key).is_some(), "issue JSON lacks {key}: {issue}");
    }
    assert_eq!(issue["number"], 7);

    let log = std::fs::read_to_string(f.log(7, 1)).unwrap();
    assert!(log.contains("stdin: closed"), "{log}");
    assert!(
        log.contains("pull/1") && log.contains("pull/2") && log.contains("done"),
        "{log}"
    );
}

#[test]
fn a_failing_workflow_is_retried_with_backoff_and_then_marked_failed() {
    let f = Fixture::new();
    f.config(json!({"service": {"max_attempts": 3, "retry_backoff": "400ms", "retry_backoff_max": "10s"}}));
    f.issue(1, "Always fails", "");
    f.workflow(r#"echo "attempt $CLAUDE_FLOW_ATTEMPT failing"; exit 3"#);
    f.cli()
        .args(["run", "--once"])
        .assert()
        .success()
        .stdout(predicates::str::contains("1 failed"));

    let shown = f.show(1);
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["last_error"], "exit code 3");
    let attempts = shown["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{shown}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["number"], i + 1);
        assert_eq!(a["exit_code"], 3);
        assert_eq!(a["outcome"]["kind"], "failed");
        let log = std::fs::read_to_string(f.log(1, u32::try_from(i + 1).unwrap())).unwrap();
        assert_eq!(log.trim(), format!("attempt {} failing", i + 1));
    }
    // Retry k waits at least half of 400ms × 2^(k−1).
    for (k, pair) in attempts.windows(2).enumerate() {
        let gap = time(&pair[1]["started_at"])
            .duration_since(time(&pair[0]["finished_at"]))
            .unwrap();
        let at_least = Duration::from_millis(200 << k);
        assert!(
            gap >= at_least,
            "retry {} came after {gap:?}, before {at_least:?}",
            k + 1
        );
    }
}

#[test]
fn a_timeout_kills_the_whole_process_tree() {
    let f = Fixture::new();
    f.config(
        json!({"workflow": {"timeout": "1s", "kill_grace": "1s"}, "service": {"max_attempts": 1}}),
    );
    f.issue(3, "Hangs", "");
    // The grandchild ignores SIGTERM, so only the group-wide SIGKILL after
    // the grace period ends it.
    f.workflow(
        r#"bash -c 'trap "" TERM; echo $$ > grandchild.pid; while :; do sleep 1; done' &
echo $$ > child.pid
wait"#,
    );
    f.cli().args(["run", "--once"]).assert().success();
    let shown = f.show(3);
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["last_error"], "timed out after 1s");
    let ws = f.workspace(3);
    for name in ["child.pid", "grandchild.pid"] {
        let pid = read_pid(&ws.join(name));
        wait_for(&format!("{name} ({pid}) to die"), || !alive(pid));
    }
}

#[test]
fn hostile_issue_text_reaches_the_workflow_byte_for_byte_and_runs_nothing() {
    let f = Fixture::new();
    let title = r#"$(touch pwned-title) `touch pwned-tick` "quoted" 'single' ; rm -rf / \ $HOME"#;
    let mut body = String::from("$(touch pwned-body)\r\n`touch pwned-body2`\r\n'\"; exit 1\r\n");
    while body.len() < 1 << 20 {
        body.push_str("line with $(echo x) and `echo y` and \\n and CRLF\r\n");
    }
    std::fs::write(
        f.path("issues/9-hostile.md"),
        format!("# {title}\n\n{body}"),
    )
    .unwrap();
    f.workflow(
        r#"printf '%s' "$CLAUDE_FLOW_ISSUE_TITLE" > title.out
cp "$CLAUDE_FLOW_ISSUE_BODY_FILE" body.out"#,
    );
    f.cli().args(["run", "--once"]).assert().success();
    let ws = f.workspace(9);
    assert_eq!(
        std::fs::read_to_string(ws.join("title.out")).unwrap(),
        title
    );
    assert!(
        std::fs::read(ws.join("body.out")).unwrap() == body.as_bytes(),
        "the body changed on its way"
    );
    let pwned: Vec<_> = walk(&f.root)
        .into_iter()
        .filter(|p| p.contains("pwned"))
        .collect();
    assert!(pwned.is_empty(), "issue text was executed: {pwned:?}");
    assert_eq!(f.list()[0]["title"], title);
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn settled_issues_are_not_run_again_and_retry_starts_a_new_round() {
    let f = Fixture::new();
    f.issue(1, "Once", "");
    f.workflow("echo run >> ../../../../runs.log");
    f.cli().args(["run", "--once"]).assert().success();
    f.cli()
        .args(["run", "--once"])
        .assert()
        .success()
        .stdout(predicates::str::contains("settled 0 issues"));
    assert_eq!(
        std::fs::read_to_string(f.path("runs.log"))
            .unwrap()
            .lines()
            .count(),
        1
    );

    f.cli()
        .args(["retry", "1"])
        .assert()
        .success()
        .stdout(predicates::str::contains("queued (round 2)"));
    f.cli().args(["run", "--once"]).assert().success();
    assert_eq!(
        std::fs::read_to_string(f.path("runs.log"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    let shown = f.show(1);
    assert_eq!(
        (shown["status"].as_str(), shown["round"].as_u64()),
        (Some("done"), Some(2))
    );
}

#[test]
fn a_quota_exhausted_workflow_pauses_without_using_up_attempts() {
    let f = Fixture::new();
    f.config(json!({"service": {"max_attempts": 1}}));
    f.issue(1, "Quota", "");
    f.workflow(
        r#"if [ "$CLAUDE_FLOW_ATTEMPT" = 1 ]; then echo "claude-flow: retry-after 1"; exit 75; fi
echo "https://example.com/o/r/pull/5""#,
    );
    f.cli().args(["run", "--once"]).assert().success();
    let shown = f.show(1);
    assert_eq!(shown["status"], "done", "{shown}");
    let attempts = shown["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["outcome"]["kind"], "quota_exhausted");
    let until = time(&attempts[0]["outcome"]["until"]);
    assert!(
        time(&attempts[1]["started_at"]) >= until,
        "started before the quota reset"
    );
}

#[test]
fn an_issue_removed_while_its_workflow_runs_is_cancelled() {
    let f = Fixture::new();
    f.config(json!({"service": {"poll_interval": "200ms"}}));
    let file = f.issue(4, "Changed my mind", "");
    f.workflow("echo $$ > wf.pid\nwhile :; do sleep 0.1; done");
    let mut child = f.cli_process(&["run", "--once"]).spawn().unwrap();
    let pid_file = f.workspace(4).join("wf.pid");
    wait_for("the workflow to start", || {
        pid_file.exists() && std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))
    });
    std::fs::remove_file(file).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(f.show(4)["status"], "cancelled");
    assert!(!alive(read_pid(&pid_file)));
}

#[test]
fn logs_follow_streams_a_running_attempt_until_it_ends() {
    let f = Fixture::new();
    f.issue(5, "Chatty", "");
    f.workflow(
        r#"echo "first line"
while [ ! -e ../../../../gate ]; do sleep 0.05; done
echo "last line""#,
    );
    let mut service = f.cli_process(&["run", "--once"]).spawn().unwrap();
    wait_for("the first line to be logged", || {
        std::fs::read_to_string(f.log(5, 1)).is_ok_and(|l| l.contains("first line"))
    });
    let mut follow = f
        .cli_process(&["logs", "5", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = follow.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    // The follower prints what is there before the attempt ends...
    while !String::from_utf8_lossy(&seen).contains("first line") {
        use std::io::Read;
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "logs --follow ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    // ...then the rest, and ends by itself once the attempt is over.
    std::fs::write(f.path("gate"), "").unwrap();
    assert!(service.wait().unwrap().success());
    {
        use std::io::Read;
        out.read_to_end(&mut seen).unwrap();
    }
    assert!(follow.wait().unwrap().success());
    assert_eq!(String::from_utf8(seen).unwrap(), "first line\nlast line\n");
}
