//! The GitHub source against a fake GitHub: what it finds, whom it
//! trusts, and what it writes back.

// Helpers outside #[test] functions panic as failed assertions too.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use claude_flow_core::config::{GithubConfig, Permission};
use claude_flow_core::{
    CancelReport, FailureReport, GithubSource, Issue, IssueSource, PrScope, Report, Reports,
    StartReport, SuccessReport,
};
use serde_json::{Value, json};
use support::github::*;
use wiremock::matchers::{body_json, header, header_exists, method, path, query_param};
use wiremock::{Mock, ResponseTemplate};

fn numbers(issues: &[Issue]) -> Vec<u64> {
    issues.iter().map(|i| i.key.number).collect()
}

#[tokio::test]
async fn poll_follows_every_page_and_ignores_pull_requests() {
    let gh = Fake::start().await;
    let uri = gh.server.uri();
    let at = "2025-03-11T10:02:07Z";
    // Page 1 is asked with the query the source builds; later pages only
    // through the links GitHub gives, which need not look alike.
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues")))
        .and(query_param("labels", "claude-flow"))
        .and(query_param("state", "open"))
        .and(query_param("per_page", "100"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .and(header("accept", "application/vnd.github+json"))
        .and(header("x-github-api-version", "2022-11-28"))
        .and(header_exists("user-agent"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([
                    issue(1, &["bug", "claude-flow"], at),
                    pull_request(2),
                    issue(3, &["claude-flow"], at)
                ]))
                .insert_header(
                    "link",
                    format!(
                        "<{uri}/repositories/99/issues?page=2>; rel=\"next\", <{uri}/repositories/99/issues?page=3>; rel=\"last\""
                    )
                    .as_str(),
                ),
        )
        .expect(1)
        .mount(&gh.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repositories/99/issues"))
        .and(query_param("page", "2"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([issue(4, &["claude-flow"], at)]))
                .insert_header(
                    "link",
                    format!(
                        "<{uri}/repositories/99/issues?page=1>; rel=\"prev\", <{uri}/repositories/99/issues?page=3>; rel=\"next\""
                    )
                    .as_str(),
                ),
        )
        .expect(1)
        .mount(&gh.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repositories/99/issues"))
        .and(query_param("page", "3"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([pull_request(5), issue(6, &["claude-flow"], at)]))
                .insert_header(
                    "link",
                    format!("<{uri}/repositories/99/issues?page=2>; rel=\"prev\"").as_str(),
                ),
        )
        .expect(1)
        .mount(&gh.server)
        .await;
    for n in [1, 3, 4, 6] {
        gh.timeline(n, "alice-maintainer", 700 + n).await;
    }
    // Asked once: the answer is cached.
    Mock::given(method("GET"))
        .and(path(format!(
            "{REPO}/collaborators/alice-maintainer/permission"
        )))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(fixture("collaborator-permission.json")),
        )
        .expect(1)
        .mount(&gh.server)
        .await;

    let issues = gh.source().poll().await.unwrap();

    assert_eq!(numbers(&issues), [1, 3, 4, 6]);
    let first = &issues[0];
    assert_eq!(first.key.to_string(), "acme/widgets#1");
    assert_eq!(first.title, "Issue number 1");
    assert!(first.body.starts_with("Exporting a sheet with 10 rows"));
    assert_eq!(first.labels, ["bug", "claude-flow"]);
    assert_eq!(first.html_url, "https://github.com/acme/widgets/issues/1");
    assert_eq!(first.author.as_deref(), Some("reporter-rita"));
    assert_eq!(first.trigger, trigger(701));
    assert_eq!(first.pr_scope, PrScope::SameRepository);
    gh.server.verify().await;
}

#[tokio::test]
async fn an_unchanged_repository_costs_one_conditional_request() {
    let gh = Fake::start().await;
    let at = "2025-03-11T10:02:07Z";
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues")))
        .and(header("if-none-match", "W/\"list-v1\""))
        .respond_with(ResponseTemplate::new(304).insert_header("etag", "W/\"list-v1\""))
        .with_priority(1)
        .expect(2)
        .named("conditional list")
        .mount(&gh.server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([issue(1, &["claude-flow"], at)]))
                .insert_header("etag", "W/\"list-v1\""),
        )
        .expect(1)
        .named("first list")
        .mount(&gh.server)
        .await;
    gh.timeline(1, "alice-maintainer", 801).await;
    gh.permission("alice-maintainer", "write", "write").await;
    let source = gh.source();

    let first = source.poll().await.unwrap();
    let before = gh.requests().await.len();
    let second = source.poll().await.unwrap();
    let third = source.poll().await.unwrap();

    assert_eq!(first, second);
    assert_eq!(second, third);
    let after = gh.requests().await;
    assert_eq!(after.len() - before, 2, "{after:?}");
    assert!(
        after[before..]
            .iter()
            .all(|r| r == "GET /repos/acme/widgets/issues")
    );
    gh.server.verify().await;
}

#[tokio::test]
async fn only_trusted_labelers_send_issues_to_the_agent() {
    let gh = Fake::start().await;
    let at = "2025-03-11T10:02:07Z";
    let labeled = |n| issue(n, &["claude-flow"], at);
    gh.list(vec![
        labeled(1),
        labeled(2),
        labeled(3),
        labeled(4),
        labeled(5),
        labeled(6),
    ])
    .await;
    gh.timeline(1, "mallory-drive-by", 901).await; // read permission
    gh.timeline(2, "renovate[bot]", 902).await; // a bot, with write access
    gh.timeline(3, "carol-contractor", 903).await; // listed in allowed_users
    gh.timeline(4, "alice-maintainer", 904).await; // maintain
    gh.timeline(5, OWN_LOGIN, 905).await; // the service's own account
    gh.timeline(6, "tom-triager", 906).await; // triage
    gh.permission("mallory-drive-by", "read", "read").await;
    gh.permission("alice-maintainer", "write", "maintain").await;
    gh.permission("tom-triager", "read", "triage").await;
    // Never asked: bots, the service and allowed users are decided without.
    for login in ["renovate[bot]", OWN_LOGIN, "carol-contractor"] {
        Mock::given(method("GET"))
            .and(path(format!("{REPO}/collaborators/{login}/permission")))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(fixture("collaborator-permission.json")),
            )
            .expect(0)
            .mount(&gh.server)
            .await;
    }
    let config = GithubConfig {
        allowed_users: vec!["Carol-Contractor".into()],
        ..config(&gh.server.uri())
    };
    let source = gh.source_with(config.clone(), fast_settings());

    assert_eq!(numbers(&source.poll().await.unwrap()), [3, 4]);
    // Untrusted issues are not examined again until they change.
    let before = gh.requests().await.len();
    assert_eq!(numbers(&source.poll().await.unwrap()), [3, 4]);
    assert_eq!(gh.requests().await.len() - before, 1);
    // What was ignored is told, with the reason (`list --skipped`).
    let skipped: Vec<_> = source
        .skipped()
        .into_iter()
        .map(|s| (s.issue.number, s.reason))
        .collect();
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    assert_eq!(skipped[0].0, 1);
    assert_eq!(
        skipped[0].1,
        "the label was applied by mallory-drive-by, whose permission is read (write required)"
    );
    assert_eq!(
        skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2, 5, 6]
    );

    // With `triage` required, the triager counts too.
    let triage = GithubConfig {
        trusted_permission: Permission::Triage,
        ..config
    };
    let source = gh.source_with(triage, fast_settings());
    assert_eq!(numbers(&source.poll().await.unwrap()), [3, 4, 6]);
    gh.server.verify().await;
}

#[tokio::test]
async fn a_changed_issue_is_examined_again() {
    let gh = Fake::start().await;
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues")))
        .respond_with(Sequence::new(vec![
            ResponseTemplate::new(200).set_body_json(json!([issue(
                1,
                &["claude-flow"],
                "2025-03-11T10:00:00Z"
            )])),
            ResponseTemplate::new(200).set_body_json(json!([issue(
                1,
                &["claude-flow"],
                "2025-03-12T08:00:00Z"
            )])),
        ]))
        .mount(&gh.server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/1/timeline")))
        .respond_with(Sequence::new(vec![
            ResponseTemplate::new(200).set_body_json(timeline("mallory-drive-by", 11)),
            ResponseTemplate::new(200).set_body_json(timeline("alice-maintainer", 12)),
        ]))
        .expect(2)
        .mount(&gh.server)
        .await;
    // Not a collaborator at all.
    Mock::given(method("GET"))
        .and(path(format!(
            "{REPO}/collaborators/mallory-drive-by/permission"
        )))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
        .mount(&gh.server)
        .await;
    gh.permission("alice-maintainer", "admin", "admin").await;
    let source = gh.source();

    assert!(source.poll().await.unwrap().is_empty());
    let issues = source.poll().await.unwrap();
    assert_eq!(numbers(&issues), [1]);
    assert_eq!(issues[0].trigger, trigger(12));
    gh.server.verify().await;
}

#[tokio::test]
async fn the_first_poll_of_a_busy_repository_examines_issues_several_at_a_time() {
    // Timelines are answered only once 8 are asked at once: a source
    // examining one issue after another would wait forever (the timeout
    // below ends the test), so no clock is read.
    const ISSUES: u64 = 300;
    let labeler = |n: u64| format!("maintainer-{}", n % 7);
    let gh = HeldTimelines::start(ISSUES, 8, labeler).await;
    let source = GithubSource::new(
        &config(&gh.uri),
        claude_flow_core::Secret::new(TOKEN),
        fast_settings(),
    )
    .unwrap();

    let issues = tokio::time::timeout(Duration::from_secs(30), source.poll())
        .await
        .expect("timelines were never asked 8 at a time")
        .unwrap();

    // Oldest first, as listed, whatever order the answers came in.
    let expected: Vec<u64> = (1..=ISSUES).collect();
    assert_eq!(numbers(&issues), expected);
    assert!(
        issues
            .iter()
            .all(|i| i.trigger == trigger(1000 + i.key.number))
    );
    // Bounded: never more than 8 at once.
    assert_eq!(gh.stats.peak.load(std::sync::atomic::Ordering::SeqCst), 8);
    for n in [1, 150, ISSUES] {
        assert_eq!(gh.count(&format!("GET {REPO}/issues/{n}/timeline")), 1);
    }
    // Issues examined at once that share a labeler ask once.
    for k in 0..7 {
        let login = labeler(k);
        assert_eq!(
            gh.count(&format!("GET {REPO}/collaborators/{login}/permission")),
            1,
            "{login}"
        );
    }
    assert!(gh.stats.unexpected.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_removed_trigger_or_a_closed_issue_leaves_the_poll_and_a_new_labeling_is_a_new_trigger() {
    let gh = Fake::start().await;
    let mut closed = issue(11, &["claude-flow"], "2025-03-11T13:00:00Z");
    closed["state"] = json!("closed");
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues")))
        .respond_with(Sequence::new(vec![
            ResponseTemplate::new(200).set_body_json(json!([issue(
                11,
                &["claude-flow", "claude-flow:in-progress"],
                "2025-03-11T11:00:00Z"
            )])),
            // The trigger was removed.
            ResponseTemplate::new(200).set_body_json(json!([])),
            // A listing that lags behind the label's removal.
            ResponseTemplate::new(200).set_body_json(json!([issue(
                11,
                &["claude-flow:in-progress"],
                "2025-03-11T12:00:00Z"
            )])),
            // Closed, the label still on.
            ResponseTemplate::new(200).set_body_json(json!([closed])),
            // Applied again.
            ResponseTemplate::new(200).set_body_json(json!([issue(
                11,
                &["claude-flow"],
                "2025-03-12T09:00:00Z"
            )])),
        ]))
        .mount(&gh.server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/11/timeline")))
        .respond_with(Sequence::new(vec![
            ResponseTemplate::new(200).set_body_json(timeline("alice-maintainer", 1)),
            ResponseTemplate::new(200).set_body_json(timeline("alice-maintainer", 2)),
        ]))
        .expect(2)
        .mount(&gh.server)
        .await;
    gh.permission("alice-maintainer", "write", "write").await;
    let source = gh.source();

    let first = source.poll().await.unwrap();
    assert_eq!(numbers(&first), [11]);
    assert_eq!(first[0].trigger, trigger(1));
    for _ in 0..3 {
        assert!(source.poll().await.unwrap().is_empty());
    }
    // Applied again: a new labeled event, hence a new trigger.
    let again = source.poll().await.unwrap();
    assert_eq!(numbers(&again), [11]);
    assert_eq!(again[0].trigger, trigger(2));
    gh.server.verify().await;
}

#[tokio::test]
async fn an_issue_deleted_or_moved_since_it_was_listed_is_left_out() {
    let gh = Fake::start().await;
    let at = "2025-03-11T10:02:07Z";
    gh.list(vec![
        issue(13, &["claude-flow"], at),
        issue(14, &["claude-flow"], at),
        issue(15, &["claude-flow"], at),
    ])
    .await;
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/13/timeline")))
        .respond_with(
            ResponseTemplate::new(410).set_body_json(json!({"message": "This issue was deleted"})),
        )
        .mount(&gh.server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/14/timeline")))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
        .mount(&gh.server)
        .await;
    gh.timeline(15, "alice-maintainer", 15).await;
    gh.permission("alice-maintainer", "write", "write").await;

    assert_eq!(numbers(&gh.source().poll().await.unwrap()), [15]);
    gh.server.verify().await;
}

// Reports.

const IN_PROGRESS: &str = "claude-flow:in-progress";
const DONE: &str = "claude-flow:done";
const FAILED: &str = "claude-flow:failed";

fn ready_issue(n: u64, event_id: u64) -> Issue {
    let mut issue = Issue::new(
        format!("acme/widgets#{n}").parse().unwrap(),
        format!("Issue number {n}"),
    );
    issue.labels = vec!["claude-flow".into()];
    issue.trigger = trigger(event_id);
    issue
}

fn started(round: u32, attempt: u32, failures: u32) -> Report {
    Report::Started(StartReport {
        edited_since_approval: false,
        round,
        attempt,
        failures,
        max_attempts: 3,
    })
}

fn succeeded(round: u32, attempt: u32) -> Report {
    Report::Succeeded(SuccessReport {
        edited_since_approval: false,
        round,
        pr_url: Some("https://github.com/acme/widgets/pull/88".into()),
        attempt,
    })
}

fn failed(round: u32, attempts: u32) -> Report {
    Report::Failed(FailureReport {
        edited_since_approval: false,
        round,
        reason: "exit code 2".into(),
        log_tail: format!("cloning with {TOKEN}\nerror: tests failed"),
        attempts,
    })
}

fn cancelled(round: u32, started: bool) -> Report {
    Report::Cancelled(CancelReport {
        round,
        reason: "cancelled by an operator".into(),
        started,
    })
}

/// A status comment by the service's own account.
fn own_comment(id: u64, body: &str) -> Value {
    let mut comment = fixture("comment.json");
    comment["id"] = json!(id);
    comment["body"] = json!(body);
    comment
}

/// Answers every write a report on issue `n` makes: labels added and
/// removed, the issue's comments since the trigger (`existing`), a new
/// comment (id `new_id`) and edits of any comment.
async fn mount_writes(gh: &Fake, n: u64, existing: Vec<Value>, new_id: u64) {
    Mock::given(method("POST"))
        .and(path(format!("{REPO}/issues/{n}/labels")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .named("add a label")
        .mount(&gh.server)
        .await;
    Mock::given(method("DELETE"))
        .and(wiremock::matchers::path_regex(format!(
            "^{REPO}/issues/{n}/labels/.+$"
        )))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .named("remove a label")
        .mount(&gh.server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/{n}/comments")))
        .and(query_param("since", "2025-03-11T10:02:06Z"))
        .respond_with(ResponseTemplate::new(200).set_body_json(Value::Array(existing)))
        .named("comments since the trigger")
        .mount(&gh.server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("{REPO}/issues/{n}/comments")))
        .respond_with(ResponseTemplate::new(201).set_body_json(own_comment(new_id, "posted")))
        .named("post a comment")
        .mount(&gh.server)
        .await;
    Mock::given(method("PATCH"))
        .and(wiremock::matchers::path_regex(format!(
            "^{REPO}/issues/comments/[0-9]+$"
        )))
        .respond_with(ResponseTemplate::new(200).set_body_json(own_comment(new_id, "edited")))
        .named("edit a comment")
        .mount(&gh.server)
        .await;
}

/// The writes (and comment lookups) GitHub received, in order and in
/// short: `+label`, `-label`, `find comment`, `post comment`, `edit
/// comment <id>`.
async fn writes(gh: &Fake) -> Vec<String> {
    gh.server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|r| {
            let path = r.url.path().strip_prefix(REPO)?;
            let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            Some(match (r.method.as_str(), parts.as_slice()) {
                ("POST", ["issues", _, "labels"]) => {
                    format!("+{}", body["labels"][0].as_str().unwrap())
                }
                ("DELETE", ["issues", _, "labels", label]) => format!("-{label}"),
                ("GET", ["issues", _, "comments"]) => "find comment".into(),
                ("POST", ["issues", _, "comments"]) => "post comment".into(),
                ("PATCH", ["issues", "comments", id]) => format!("edit comment {id}"),
                _ => format!("{} {path}", r.method),
            })
        })
        .collect()
}

/// The text of every comment written, posted or edited, in order.
async fn comment_texts(gh: &Fake) -> Vec<String> {
    gh.server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path().contains("comments") && r.method.as_str() != "GET")
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            body["body"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Reports `report` and returns the writes it made.
async fn report(
    gh: &Fake,
    source: &GithubSource,
    issue: &Issue,
    report: Report,
    reports: &mut Reports,
) -> Vec<String> {
    let before = writes(gh).await.len();
    source.report(issue, &report, reports).await.unwrap();
    writes(gh).await.split_off(before)
}

#[tokio::test]
async fn a_successful_round_edits_one_comment_and_sets_done_last() {
    let gh = Fake::start().await;
    mount_writes(&gh, 7, vec![], 4242).await;
    // Someone already removed the trigger: a 404 is no error.
    Mock::given(method("DELETE"))
        .and(path(format!("{REPO}/issues/7/labels/claude-flow")))
        .respond_with(
            ResponseTemplate::new(404).set_body_json(json!({"message": "Label does not exist"})),
        )
        .with_priority(1)
        .mount(&gh.server)
        .await;
    let source = gh.source();
    let issue = ready_issue(7, 1);
    let mut reports = Reports::default();

    let sent = report(&gh, &source, &issue, started(1, 1, 0), &mut reports).await;
    assert_eq!(
        sent,
        [
            format!("+{IN_PROGRESS}"),
            "find comment".into(),
            "post comment".into()
        ]
    );
    let sent = report(&gh, &source, &issue, started(1, 2, 1), &mut reports).await;
    assert_eq!(sent, ["edit comment 4242"]);
    // The same state again shows it once.
    let sent = report(&gh, &source, &issue, started(1, 2, 1), &mut reports).await;
    assert!(sent.is_empty(), "{sent:?}");

    let sent = report(&gh, &source, &issue, succeeded(1, 2), &mut reports).await;
    assert_eq!(
        sent,
        [
            "edit comment 4242".to_owned(),
            format!("-{IN_PROGRESS}"),
            "-claude-flow".into(),
            format!("+{DONE}"),
        ]
    );
    let sent = report(&gh, &source, &issue, succeeded(1, 2), &mut reports).await;
    assert!(sent.is_empty(), "{sent:?}");

    let texts = comment_texts(&gh).await;
    assert!(
        texts[0].starts_with(&format!(
            "<!-- claude-flow:status trigger={} round=1 -->\n",
            issue.trigger
        )),
        "{}",
        texts[0]
    );
    assert!(texts[0].contains("round 1, attempt 1"), "{}", texts[0]);
    assert!(
        texts[1].contains("round 1, attempt 2 (failed attempts so far: 1 of 3)"),
        "{}",
        texts[1]
    );
    assert!(
        texts[2].contains("pull request https://github.com/acme/widgets/pull/88"),
        "{}",
        texts[2]
    );
    assert_eq!(
        reports.memo.get("github.comment_id").map(String::as_str),
        Some("4242")
    );
    gh.server.verify().await;
}

#[tokio::test]
async fn a_failed_round_says_why_with_the_log_redacted_and_sets_failed_last() {
    let gh = Fake::start().await;
    mount_writes(&gh, 8, vec![], 4242).await;
    let source = gh.source();
    // Left by an earlier round (the service's state was lost since).
    let mut issue = ready_issue(8, 1);
    issue.labels.push(DONE.into());
    let mut reports = Reports::default();

    // The start report was superseded before it was sent: the failure
    // report alone does everything.
    let sent = report(&gh, &source, &issue, failed(1, 3), &mut reports).await;
    assert_eq!(
        sent,
        [
            "find comment".to_owned(),
            "post comment".into(),
            format!("-{IN_PROGRESS}"),
            format!("-{DONE}"),
            format!("+{FAILED}"),
        ]
    );
    let sent = report(&gh, &source, &issue, failed(1, 3), &mut reports).await;
    assert!(sent.is_empty(), "{sent:?}");

    let text = &comment_texts(&gh).await[0];
    assert!(
        text.contains("failed after 3 attempts: exit code 2"),
        "{text}"
    );
    assert!(text.contains("error: tests failed"), "{text}");
    assert!(text.contains("cloning with [redacted]"), "{text}");
    assert!(!text.contains(TOKEN));
    gh.server.verify().await;
}

#[tokio::test]
async fn a_start_removes_an_earlier_outcome_before_it_comments() {
    let gh = Fake::start().await;
    mount_writes(&gh, 6, vec![], 4242).await;
    let source = gh.source();
    let mut issue = ready_issue(6, 1);
    issue.labels.push(FAILED.into());
    let mut reports = Reports::default();

    let sent = report(&gh, &source, &issue, started(1, 1, 0), &mut reports).await;
    assert_eq!(
        sent,
        [
            format!("+{IN_PROGRESS}"),
            format!("-{FAILED}"),
            "find comment".into(),
            "post comment".into(),
        ]
    );
    // The issue as last listed still shows `failed`; it is not removed
    // twice.
    let sent = report(&gh, &source, &issue, succeeded(1, 1), &mut reports).await;
    assert_eq!(
        sent,
        [
            "edit comment 4242".to_owned(),
            format!("-{IN_PROGRESS}"),
            "-claude-flow".into(),
            format!("+{DONE}"),
        ]
    );
    gh.server.verify().await;
}

#[tokio::test]
async fn a_cancelled_round_says_so_then_drops_the_trigger_and_in_progress() {
    let gh = Fake::start().await;
    mount_writes(&gh, 9, vec![], 4242).await;
    let source = gh.source();
    let issue = ready_issue(9, 1);
    let mut reports = Reports::default();
    report(&gh, &source, &issue, started(1, 1, 0), &mut reports).await;

    let sent = report(&gh, &source, &issue, cancelled(1, true), &mut reports).await;
    assert_eq!(
        sent,
        [
            "edit comment 4242".to_owned(),
            "-claude-flow".into(),
            format!("-{IN_PROGRESS}"),
        ]
    );
    let sent = report(&gh, &source, &issue, cancelled(1, true), &mut reports).await;
    assert!(sent.is_empty(), "{sent:?}");
    let texts = comment_texts(&gh).await;
    let text = texts.last().unwrap();
    assert!(text.contains("cancelled round 1"), "{text}");
    assert!(text.contains("cancelled by an operator"), "{text}");

    // A round cancelled before it ran has no comment.
    let gh = Fake::start().await;
    mount_writes(&gh, 10, vec![], 4242).await;
    let source = gh.source();
    let sent = report(
        &gh,
        &source,
        &ready_issue(10, 1),
        cancelled(1, false),
        &mut Reports::default(),
    )
    .await;
    assert_eq!(sent, ["-claude-flow".to_owned(), format!("-{IN_PROGRESS}")]);
    gh.server.verify().await;
}

#[tokio::test]
async fn comments_can_be_turned_off() {
    let gh = Fake::start().await;
    for n in [21, 22, 23] {
        mount_writes(&gh, n, vec![], 4242).await;
    }
    let config = GithubConfig {
        comment: false,
        ..config(&gh.server.uri())
    };
    let source = gh.source_with(config, fast_settings());

    let issue = ready_issue(21, 1);
    let mut reports = Reports::default();
    let mut sent = report(&gh, &source, &issue, started(1, 1, 0), &mut reports).await;
    sent.extend(report(&gh, &source, &issue, started(1, 2, 1), &mut reports).await);
    sent.extend(report(&gh, &source, &issue, succeeded(1, 2), &mut reports).await);
    assert_eq!(
        sent,
        [
            format!("+{IN_PROGRESS}"),
            format!("-{IN_PROGRESS}"),
            "-claude-flow".into(),
            format!("+{DONE}"),
        ]
    );
    let sent = report(
        &gh,
        &source,
        &ready_issue(22, 1),
        failed(1, 3),
        &mut Reports::default(),
    )
    .await;
    assert_eq!(sent, [format!("-{IN_PROGRESS}"), format!("+{FAILED}")]);
    let sent = report(
        &gh,
        &source,
        &ready_issue(23, 1),
        cancelled(1, true),
        &mut Reports::default(),
    )
    .await;
    assert_eq!(sent, ["-claude-flow".to_owned(), format!("-{IN_PROGRESS}")]);
    gh.server.verify().await;
}

#[tokio::test]
async fn a_report_cut_short_is_finished_on_retry_without_a_second_comment() {
    let gh = Fake::start().await;
    let issue = ready_issue(30, 1);
    let ours = own_comment(
        4242,
        &format!(
            "<!-- claude-flow:status trigger={} round=1 -->\nworking",
            issue.trigger
        ),
    );
    mount_writes(&gh, 30, vec![ours], 4242).await;
    // Adding `done` fails through all of the client's tries, once.
    let bad = || ResponseTemplate::new(502).set_body_string("Bad Gateway");
    Mock::given(method("POST"))
        .and(path(format!("{REPO}/issues/30/labels")))
        .and(body_json(json!({"labels": [DONE]})))
        .respond_with(Sequence::new(vec![
            bad(),
            bad(),
            bad(),
            bad(),
            ResponseTemplate::new(200).set_body_json(json!([])),
        ]))
        .with_priority(1)
        .mount(&gh.server)
        .await;
    let source = gh.source();
    // As the start report left it.
    let mut persisted = Reports::default();
    for (k, v) in [
        ("github.labels_started", "1"),
        ("github.comment_id", "4242"),
        ("github.comment_shows", "started attempt=1 failures=0 max=3"),
    ] {
        persisted.memo.insert(k.into(), v.into());
    }
    let success = succeeded(1, 1);

    let mut reports = persisted.clone();
    let err = source
        .report(&issue, &success, &mut reports)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(!reports.memo.contains_key("github.outcome"));
    let done = format!("+{DONE}");
    let attempted = writes(&gh).await;
    assert_eq!(
        attempted,
        [
            "edit comment 4242".to_owned(),
            format!("-{IN_PROGRESS}"),
            "-claude-flow".into(),
            done.clone(),
            done.clone(),
            done.clone(),
            done.clone(),
        ]
    );

    // The reporter tries again with what the first try learnt: the comment
    // is final already, the rest is done again.
    let sent = report(&gh, &source, &issue, success.clone(), &mut reports).await;
    assert_eq!(
        sent,
        [
            format!("-{IN_PROGRESS}"),
            "-claude-flow".into(),
            done.clone()
        ]
    );
    assert_eq!(
        reports.memo.get("github.outcome").map(String::as_str),
        Some("succeeded")
    );

    // A crash lost that: the report is made again from the memo the
    // store kept, and completes without another comment.
    let sent = report(
        &gh,
        &source,
        &issue,
        success.clone(),
        &mut persisted.clone(),
    )
    .await;
    assert_eq!(
        sent,
        [
            "edit comment 4242".to_owned(),
            format!("-{IN_PROGRESS}"),
            "-claude-flow".into(),
            done.clone(),
        ]
    );
    // Even with the comment's id lost, the comment is found again.
    let sent = report(&gh, &source, &issue, success, &mut Reports::default()).await;
    assert_eq!(
        sent,
        [
            "find comment".to_owned(),
            "edit comment 4242".into(),
            format!("-{IN_PROGRESS}"),
            "-claude-flow".into(),
            done,
        ]
    );
    assert!(!writes(&gh).await.contains(&"post comment".to_owned()));
    gh.server.verify().await;
}

#[tokio::test]
async fn an_operator_retry_gets_a_new_comment_and_leaves_the_old_one() {
    let gh = Fake::start().await;
    // The same trigger for both rounds: the operator retried round 1.
    let issue = ready_issue(31, 1);
    let marker = |round: u32| {
        format!(
            "<!-- claude-flow:status trigger={} round={round} -->\n",
            issue.trigger
        )
    };
    let round_1 = own_comment(4242, &(marker(1) + "failed after 3 attempts"));
    let round_2 = own_comment(4343, &(marker(2) + "working"));
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/31/comments")))
        .respond_with(Sequence::new(vec![
            ResponseTemplate::new(200).set_body_json(json!([round_1])),
            ResponseTemplate::new(200).set_body_json(json!([round_1, round_2])),
        ]))
        .with_priority(1)
        .mount(&gh.server)
        .await;
    mount_writes(&gh, 31, vec![], 4343).await;
    Mock::given(method("PATCH"))
        .and(path(format!("{REPO}/issues/comments/4242")))
        .respond_with(ResponseTemplate::new(200).set_body_json(&round_1))
        .with_priority(1)
        .expect(0)
        .named("an edit of the earlier round's comment")
        .mount(&gh.server)
        .await;
    let source = gh.source();
    let mut reports = Reports::default();

    // The earlier round's `failed` (or `done`) may have come after the
    // issue was listed: both are removed.
    let sent = report(&gh, &source, &issue, started(2, 1, 0), &mut reports).await;
    assert_eq!(
        sent,
        [
            format!("+{IN_PROGRESS}"),
            format!("-{DONE}"),
            format!("-{FAILED}"),
            "find comment".into(),
            "post comment".into(),
        ]
    );
    assert!(comment_texts(&gh).await[0].starts_with(&marker(2)));

    // A crash lost the new comment's id: the round's marker finds it.
    let mut reports = Reports::default();
    reports
        .memo
        .insert("github.labels_started".into(), "1".into());
    let sent = report(&gh, &source, &issue, started(2, 2, 1), &mut reports).await;
    assert_eq!(sent, ["find comment", "edit comment 4343"]);
    let sent = report(&gh, &source, &issue, failed(2, 2), &mut reports).await;
    assert_eq!(
        sent,
        [
            "edit comment 4343".to_owned(),
            format!("-{IN_PROGRESS}"),
            format!("+{FAILED}"),
        ]
    );
    gh.server.verify().await;
}

#[tokio::test]
async fn a_lost_comment_id_is_found_again_instead_of_posting_twice() {
    let gh = Fake::start().await;
    let issue = ready_issue(10, 1);
    let ours = own_comment(
        5151,
        &format!(
            "<!-- claude-flow:status trigger={} round=1 -->\nworking",
            issue.trigger
        ),
    );
    // Only the service's own comments count, whatever they say.
    let mut someone_elses = ours.clone();
    someone_elses["id"] = json!(5150);
    someone_elses["user"]["login"] = json!("mallory-drive-by");
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/10/comments")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([someone_elses, ours])))
        .mount(&gh.server)
        .await;
    Mock::given(method("PATCH"))
        .and(path(format!("{REPO}/issues/comments/5151")))
        .respond_with(ResponseTemplate::new(200).set_body_json(&ours))
        .expect(1)
        .mount(&gh.server)
        .await;
    let source = gh.source();
    // The labels were set before the crash; the memo that says so survived.
    let mut reports = Reports::default();
    reports
        .memo
        .insert("github.labels_started".into(), "1".into());

    source
        .report(&issue, &started(1, 2, 1), &mut reports)
        .await
        .unwrap();

    assert_eq!(
        reports.memo.get("github.comment_id").map(String::as_str),
        Some("5151")
    );
    gh.server.verify().await;
}
