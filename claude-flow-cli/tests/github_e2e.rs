//! `claude-flow run --once` against a fake GitHub (wiremock, fed with the
//! project's recorded-shape fixtures) and a real workflow script: from a
//! labeled issue to the done label and a status comment with the PR.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use std::path::PathBuf;

use common::Fixture;
use serde_json::{Value, json};
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOKEN: &str = "ghp_EndToEndTokenThatMustNeverLeak000000";
const REPO: &str = "/repos/acme/widgets";

fn fixture(name: &str) -> Value {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../claude-flow-core/tests/fixtures/github")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

async fn answer(server: &MockServer, verb: &str, at: &str, status: u16, body: Value) {
    Mock::given(method(verb))
        .and(path(at))
        .respond_with(ResponseTemplate::new(status).set_body_json(body))
        .named(format!("{verb} {at}"))
        .mount(server)
        .await;
}

/// A fake GitHub on which issue 7 of acme/widgets carries the trigger,
/// applied by a maintainer with write permission.
async fn fake_github() -> MockServer {
    fake_github_labeled_by("alice-maintainer", "write").await
}

/// The same, with the trigger applied by `login`, whose permission on the
/// repository is `permission`.
async fn fake_github_labeled_by(login: &str, permission: &str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500).set_body_string("unexpected request"))
        .with_priority(u8::MAX)
        .named("catch-all: a request the test did not expect")
        .expect(0)
        .mount(&server)
        .await;
    let mut issue = fixture("issue.json");
    issue["number"] = json!(7);
    issue["title"] = json!("Make the widget spin");
    issue["html_url"] = json!("https://github.com/acme/widgets/issues/7");
    // Keep the label's full shape; only its name changes.
    let mut label = issue["labels"][0].clone();
    label["name"] = json!("claude-flow");
    issue["labels"] = json!([label]);
    let mut timeline = fixture("timeline.json");
    let last = timeline.as_array_mut().unwrap().last_mut().unwrap();
    last["actor"]["login"] = json!(login);
    let mut collaborator = fixture("collaborator-permission.json");
    collaborator["permission"] = json!(permission);
    collaborator["role_name"] = json!(permission);
    collaborator["user"]["login"] = json!(login);
    answer(&server, "GET", "/user", 200, fixture("user.json")).await;
    answer(
        &server,
        "GET",
        &format!("{REPO}/issues"),
        200,
        json!([issue]),
    )
    .await;
    answer(
        &server,
        "GET",
        &format!("{REPO}/issues/7/timeline"),
        200,
        timeline,
    )
    .await;
    answer(
        &server,
        "GET",
        &format!("{REPO}/collaborators/{login}/permission"),
        200,
        collaborator,
    )
    .await;
    answer(
        &server,
        "GET",
        &format!("{REPO}/issues/7/comments"),
        200,
        json!([]),
    )
    .await;
    answer(
        &server,
        "POST",
        &format!("{REPO}/issues/7/labels"),
        200,
        json!([]),
    )
    .await;
    for name in ["claude-flow", "claude-flow:in-progress"] {
        answer(
            &server,
            "DELETE",
            &format!("{REPO}/issues/7/labels/{name}"),
            200,
            json!([]),
        )
        .await;
    }
    answer(
        &server,
        "POST",
        &format!("{REPO}/issues/7/comments"),
        201,
        fixture("comment.json"),
    )
    .await;
    answer(
        &server,
        "PATCH",
        &format!("{REPO}/issues/comments/3300099"),
        200,
        fixture("comment.json"),
    )
    .await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labeled_issue_ends_with_the_done_label_and_a_comment_giving_the_pr() {
    let server = fake_github().await;
    let f = Fixture::new();
    f.config(json!({
        "source": "github",
        "github": {"api_url": server.uri(), "repos": ["acme/widgets"]},
        "workflow": {"pass_token": false}
    }));
    // The own repository's PR, then another repository's, which must not count.
    f.workflow(
        r#"echo "working on $CLAUDE_FLOW_REPO#$CLAUDE_FLOW_ISSUE_NUMBER"
echo "opened https://github.com/acme/widgets/pull/42"
echo "upstream fix: https://github.com/other/library/pull/9""#,
    );
    let mut cli = f.cli_process(&["run", "--once"]);
    cli.env("CLAUDE_FLOW_GITHUB__TOKEN", TOKEN);
    let out = tokio::task::spawn_blocking(move || cli.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run --once failed: {stderr}");
    assert!(
        !stderr.contains(TOKEN),
        "the token reached the service's log"
    );

    let list = f.list();
    assert_eq!(list[0]["issue"], "acme/widgets#7");
    assert_eq!(list[0]["status"], "done");
    assert_eq!(list[0]["pr_url"], "https://github.com/acme/widgets/pull/42");

    let requests = server.received_requests().await.unwrap();
    let writes: Vec<(String, String, Value)> = requests
        .iter()
        .filter(|r| r.method.as_str() != "GET")
        .map(|r| {
            (
                r.method.to_string(),
                r.url.path().to_owned(),
                serde_json::from_slice(&r.body).unwrap_or(Value::Null),
            )
        })
        .collect();
    let shape: Vec<(&str, &str)> = writes
        .iter()
        .map(|(m, p, _)| (m.as_str(), p.as_str()))
        .collect();
    // The start report may be skipped when the round settles before it
    // is sent (only the latest state is reported); the success report
    // then posts the comment itself.
    let (start, settled) = shape.split_at(shape.len() - 4);
    assert!(
        start.is_empty()
            || start
                == [
                    ("POST", "/repos/acme/widgets/issues/7/labels"),
                    ("POST", "/repos/acme/widgets/issues/7/comments"),
                ],
        "start writes: {shape:?}"
    );
    let comment = if start.is_empty() {
        ("POST", "/repos/acme/widgets/issues/7/comments")
    } else {
        ("PATCH", "/repos/acme/widgets/issues/comments/3300099")
    };
    assert_eq!(
        settled,
        [
            comment,
            (
                "DELETE",
                "/repos/acme/widgets/issues/7/labels/claude-flow:in-progress"
            ),
            ("DELETE", "/repos/acme/widgets/issues/7/labels/claude-flow"),
            // done last, so whatever keys on it finds the comment final
            ("POST", "/repos/acme/widgets/issues/7/labels"),
        ],
        "labels and comment, in order"
    );
    if !start.is_empty() {
        assert_eq!(writes[0].2, json!({"labels": ["claude-flow:in-progress"]}));
    }
    assert_eq!(
        writes[writes.len() - 1].2,
        json!({"labels": ["claude-flow:done"]})
    );
    let final_comment = writes[writes.len() - 4].2["body"].as_str().unwrap();
    assert!(
        final_comment.contains("https://github.com/acme/widgets/pull/42"),
        "{final_comment}"
    );
    assert!(!final_comment.contains("other/library"), "{final_comment}");
    for r in &requests {
        assert_eq!(
            r.headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned()),
            Some(format!("Bearer {TOKEN}"))
        );
    }

    // Nothing the service wrote holds the token.
    let state = std::fs::read_to_string(f.path("state/state.jsonl")).unwrap();
    assert!(!state.contains(TOKEN));
    let log =
        std::fs::read_to_string(f.path("state/logs/acme__widgets/issue-7/round-1-attempt-1.log"))
            .unwrap();
    assert!(log.contains("working on acme/widgets#7"), "{log}");
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_reaches_no_log_file_comment_output_or_workflow() {
    let server = fake_github().await;
    let f = Fixture::new();
    f.config(json!({
        "source": "github",
        "github": {"api_url": server.uri(), "repos": ["acme/widgets"]},
        "workflow": {"pass_token": false},
        "service": {"max_attempts": 1},
        "log": {"level": "trace"}
    }));
    // The workflow shows everything it was given, then fails, so that the
    // failure comment quotes its log.
    f.workflow(
        r#"env > "$CLAUDE_FLOW_WORKSPACE/env.txt"
cat "$CLAUDE_FLOW_ISSUE_JSON_FILE"
env
exit 1"#,
    );
    let mut cli = f.cli_process(&["run", "--once"]);
    cli.env("CLAUDE_FLOW_GITHUB__TOKEN", TOKEN);
    let out = tokio::task::spawn_blocking(move || cli.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run --once failed: {stderr}");
    assert!(
        f.path("state/workspaces/acme__widgets/issue-7/env.txt")
            .is_file(),
        "the workflow did not run"
    );
    let mut leaks = Vec::new();
    for (what, text) in [
        ("stdout", String::from_utf8_lossy(&out.stdout).into_owned()),
        ("stderr (trace log)", stderr.into_owned()),
    ] {
        if text.contains(TOKEN) {
            leaks.push(what.to_owned());
        }
    }
    // Everything the service and its workflow wrote: state, logs, issue
    // files, the workflow's view of its environment.
    for file in files_under(&f.path("")) {
        let bytes = std::fs::read(&file).unwrap();
        if String::from_utf8_lossy(&bytes).contains(TOKEN) {
            leaks.push(file.display().to_string());
        }
    }
    // Everything sent to GitHub but the Authorization header.
    let requests = server.received_requests().await.unwrap();
    assert!(
        requests.iter().any(|r| r.method.as_str() == "PATCH"
            || r.url.path().ends_with("/comments") && r.method.as_str() == "POST"),
        "no status comment was written"
    );
    for r in &requests {
        if String::from_utf8_lossy(&r.body).contains(TOKEN) || r.url.as_str().contains(TOKEN) {
            leaks.push(format!("{} {}", r.method, r.url.path()));
        }
    }
    // `config show` and a configuration error name the key, not the value.
    let show = f
        .cli()
        .args(["config", "show"])
        .env("CLAUDE_FLOW_GITHUB__TOKEN", TOKEN)
        .output()
        .unwrap();
    if String::from_utf8_lossy(&show.stdout).contains(TOKEN)
        || String::from_utf8_lossy(&show.stderr).contains(TOKEN)
    {
        leaks.push("config show".into());
    }
    let bad = f
        .cli()
        .args(["config", "check"])
        .env("CLAUDE_FLOW_GITHUB__TOKEN", TOKEN)
        .env("CLAUDE_FLOW_SERVICE__MAX_CONCURRENT", "many")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    if String::from_utf8_lossy(&bad.stderr).contains(TOKEN) {
        leaks.push("a configuration error".into());
    }
    assert!(leaks.is_empty(), "the token leaked into: {leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_from_someone_without_write_permission_is_listed_as_skipped() {
    let server = fake_github_labeled_by("mallory", "read").await;
    let listen = format!("127.0.0.1:{}", common::free_port());
    let f = Fixture::new();
    f.config(json!({
        "source": "github",
        "github": {"api_url": server.uri(), "repos": ["acme/widgets"], "token": TOKEN},
        "workflow": {"pass_token": false},
        "service": {"listen": listen}
    }));
    f.workflow("echo never run");
    let daemon = common::start_service(&f).await;
    let mut status = daemon.orchestrator().subscribe_status();
    tokio::time::timeout(common::PATIENCE, status.wait_for(|s| !s.skipped.is_empty()))
        .await
        .expect("the skipped trigger")
        .unwrap();
    let reason = "the label was applied by mallory, whose permission is read (write required)";

    // The API, while the service runs.
    let skipped = claude_flow_core::api::ApiClient::for_listen(&listen)
        .unwrap()
        .skipped()
        .await
        .unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].issue.to_string(), "acme/widgets#7");
    assert_eq!(skipped[0].reason, reason);

    // The CLI, while the service runs and after it stopped.
    // The service runs on this runtime: the CLI is waited for beside it.
    let list = |args: &[&str]| tokio::task::block_in_place(|| f.stdout(args));
    let text = list(&["list", "--skipped"]);
    assert!(text.contains("acme/widgets#7"), "{text}");
    assert!(text.contains("Make the widget spin"), "{text}");
    assert!(text.contains(reason), "{text}");
    daemon.shutdown();
    daemon.wait().await.unwrap();
    let json: Value = serde_json::from_str(&list(&["list", "--skipped", "--json"])).unwrap();
    assert_eq!(
        json,
        json!([{"issue": "acme/widgets#7", "title": "Make the widget spin", "reason": reason}])
    );
    // The issue list itself has none: nothing was started.
    assert_eq!(list(&["list"]).trim(), "no issues yet");
}
