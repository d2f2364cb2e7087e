//! The GitHub source against a fake GitHub: what it finds, whom it
//! trusts, and what it writes back.

// Helpers outside #[test] functions panic as failed assertions too.
#![allow(clippy::unwrap_used)]

mod support;

use claude_flow_core::config::{GithubConfig, Permission};
use claude_flow_core::{
    FailureReport, Issue, IssueSource, PrScope, Reports, StartReport, SuccessReport,
};
use serde_json::json;
use support::github::*;
use wiremock::matchers::{header, header_exists, method, path, query_param};
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

fn ready_issue(n: u64, event_id: u64) -> Issue {
    let mut issue = Issue::new(
        format!("acme/widgets#{n}").parse().unwrap(),
        format!("Issue number {n}"),
    );
    issue.labels = vec!["claude-flow".into()];
    issue.trigger = trigger(event_id);
    issue
}

async fn mount_writes(gh: &Fake, n: u64) {
    Mock::given(method("POST"))
        .and(path(format!("{REPO}/issues/{n}/labels")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .mount(&gh.server)
        .await;
    Mock::given(method("DELETE"))
        .and(path(format!(
            "{REPO}/issues/{n}/labels/claude-flow:in-progress"
        )))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .mount(&gh.server)
        .await;
    // Someone already removed the trigger: a 404 is no error.
    Mock::given(method("DELETE"))
        .and(path(format!("{REPO}/issues/{n}/labels/claude-flow")))
        .respond_with(
            ResponseTemplate::new(404).set_body_json(json!({"message": "Label does not exist"})),
        )
        .mount(&gh.server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/{n}/comments")))
        .and(query_param("since", "2025-03-11T10:02:06Z"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .mount(&gh.server)
        .await;
    let mut comment = fixture("comment.json");
    comment["id"] = json!(4242);
    Mock::given(method("POST"))
        .and(path(format!("{REPO}/issues/{n}/comments")))
        .respond_with(ResponseTemplate::new(201).set_body_json(&comment))
        .expect(1)
        .mount(&gh.server)
        .await;
    Mock::given(method("PATCH"))
        .and(path(format!("{REPO}/issues/comments/4242")))
        .respond_with(ResponseTemplate::new(200).set_body_json(&comment))
        .mount(&gh.server)
        .await;
}

fn start(failures: u32) -> StartReport {
    StartReport {
        attempt: failures + 1,
        failures,
        max_attempts: 3,
    }
}

#[tokio::test]
async fn a_successful_round_labels_the_issue_and_edits_one_comment() {
    let gh = Fake::start().await;
    mount_writes(&gh, 7).await;
    let source = gh.source();
    let issue = ready_issue(7, 1);
    let mut reports = Reports::default();

    source
        .report_started(&issue, start(0), &mut reports)
        .await
        .unwrap();
    source
        .report_started(&issue, start(1), &mut reports)
        .await
        .unwrap();
    let success = SuccessReport {
        pr_url: Some("https://github.com/acme/widgets/pull/88".into()),
        attempt: 2,
    };
    source
        .report_succeeded(&issue, &success, &mut reports)
        .await
        .unwrap();
    // Repeated after a crash: nothing more is sent.
    let sent = gh.requests().await;
    source
        .report_succeeded(&issue, &success, &mut reports)
        .await
        .unwrap();
    assert_eq!(gh.requests().await.len(), sent.len());

    assert_eq!(
        sent,
        [
            "POST /repos/acme/widgets/issues/7/labels",
            "GET /repos/acme/widgets/issues/7/comments",
            "POST /repos/acme/widgets/issues/7/comments",
            "PATCH /repos/acme/widgets/issues/comments/4242",
            "POST /repos/acme/widgets/issues/7/labels",
            "DELETE /repos/acme/widgets/issues/7/labels/claude-flow:in-progress",
            "DELETE /repos/acme/widgets/issues/7/labels/claude-flow",
            "PATCH /repos/acme/widgets/issues/comments/4242",
        ]
    );
    let labels = gh.bodies("POST /repos/acme/widgets/issues/7/labels").await;
    assert_eq!(labels[0], json!({"labels": ["claude-flow:in-progress"]}));
    assert_eq!(labels[1], json!({"labels": ["claude-flow:done"]}));
    let posted = gh
        .bodies("POST /repos/acme/widgets/issues/7/comments")
        .await;
    let text = posted[0]["body"].as_str().unwrap();
    assert!(
        text.contains("working on this issue (attempt 1 of 3)"),
        "{text}"
    );
    let edits = gh
        .bodies("PATCH /repos/acme/widgets/issues/comments/4242")
        .await;
    let text = edits[0]["body"].as_str().unwrap();
    assert!(text.contains("attempt 2 of 3"), "{text}");
    let text = edits[1]["body"].as_str().unwrap();
    assert!(
        text.contains("pull request https://github.com/acme/widgets/pull/88"),
        "{text}"
    );
    assert_eq!(
        reports.memo.get("github.comment_id").map(String::as_str),
        Some("4242")
    );
    gh.server.verify().await;
}

#[tokio::test]
async fn a_failed_round_says_why_with_the_log_redacted() {
    let gh = Fake::start().await;
    mount_writes(&gh, 8).await;
    let source = gh.source();
    let issue = ready_issue(8, 1);
    let mut reports = Reports::default();

    source
        .report_started(&issue, start(0), &mut reports)
        .await
        .unwrap();
    let failure = FailureReport {
        reason: "exit code 2".into(),
        log_tail: format!("cloning with {TOKEN}\nerror: tests failed"),
        attempts: 3,
    };
    source
        .report_failed(&issue, &failure, &mut reports)
        .await
        .unwrap();
    source
        .report_failed(&issue, &failure, &mut reports)
        .await
        .unwrap();

    assert_eq!(
        gh.requests().await[3..],
        [
            "POST /repos/acme/widgets/issues/8/labels",
            "DELETE /repos/acme/widgets/issues/8/labels/claude-flow:in-progress",
            "PATCH /repos/acme/widgets/issues/comments/4242",
        ]
    );
    let labels = gh.bodies("POST /repos/acme/widgets/issues/8/labels").await;
    assert_eq!(labels[1], json!({"labels": ["claude-flow:failed"]}));
    let edits = gh
        .bodies("PATCH /repos/acme/widgets/issues/comments/4242")
        .await;
    let text = edits[0]["body"].as_str().unwrap();
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
async fn comments_can_be_turned_off() {
    let gh = Fake::start().await;
    Mock::given(method("POST"))
        .and(path(format!("{REPO}/issues/9/labels")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .expect(2)
        .mount(&gh.server)
        .await;
    Mock::given(method("DELETE"))
        .and(path(format!(
            "{REPO}/issues/9/labels/claude-flow:in-progress"
        )))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&gh.server)
        .await;
    Mock::given(method("DELETE"))
        .and(path(format!("{REPO}/issues/9/labels/claude-flow")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .expect(1)
        .mount(&gh.server)
        .await;
    let config = GithubConfig {
        comment: false,
        ..config(&gh.server.uri())
    };
    let source = gh.source_with(config, fast_settings());
    let issue = ready_issue(9, 1);
    let mut reports = Reports::default();

    source
        .report_started(&issue, start(0), &mut reports)
        .await
        .unwrap();
    source
        .report_started(&issue, start(1), &mut reports)
        .await
        .unwrap();
    let success = SuccessReport {
        pr_url: None,
        attempt: 2,
    };
    source
        .report_succeeded(&issue, &success, &mut reports)
        .await
        .unwrap();
    gh.server.verify().await;
}

#[tokio::test]
async fn a_lost_comment_id_is_found_again_instead_of_posting_twice() {
    let gh = Fake::start().await;
    let issue = ready_issue(10, 1);
    let mut ours = fixture("comment.json");
    ours["id"] = json!(5151);
    ours["body"] = json!(format!(
        "<!-- claude-flow:status trigger={} -->\nworking",
        issue.trigger
    ));
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
        .report_started(&issue, start(1), &mut reports)
        .await
        .unwrap();

    assert_eq!(
        reports.memo.get("github.comment_id").map(String::as_str),
        Some("5151")
    );
    gh.server.verify().await;
}

#[tokio::test]
async fn removing_the_trigger_cancels_and_applying_it_again_starts_a_new_round() {
    let gh = Fake::start().await;
    let issue = ready_issue(11, 1);
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/11")))
        .respond_with(Sequence::new(vec![
            ResponseTemplate::new(200)
                .set_body_json(crate::issue(
                    11,
                    &["claude-flow", "claude-flow:in-progress"],
                    "2025-03-11T11:00:00Z",
                ))
                .insert_header("etag", "\"v1\""),
            ResponseTemplate::new(200)
                .set_body_json(crate::issue(
                    11,
                    &["claude-flow:in-progress"],
                    "2025-03-11T12:00:00Z",
                ))
                .insert_header("etag", "\"v2\""),
            ResponseTemplate::new(200).set_body_json(crate::issue(11, &[], "2025-03-11T12:00:01Z")),
        ]))
        .mount(&gh.server)
        .await;
    Mock::given(method("DELETE"))
        .and(path(format!(
            "{REPO}/issues/11/labels/claude-flow:in-progress"
        )))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .expect(1)
        .mount(&gh.server)
        .await;
    let source = gh.source();

    assert!(source.is_wanted(&issue).await.unwrap());
    assert!(!source.is_wanted(&issue).await.unwrap());
    assert!(!source.is_wanted(&issue).await.unwrap());
    // The second and third checks were conditional on the last ETag.
    let sent = gh.server.received_requests().await.unwrap();
    let checks: Vec<_> = sent
        .iter()
        .filter(|r| r.url.path() == "/repos/acme/widgets/issues/11")
        .collect();
    assert_eq!(checks[1].headers.get("if-none-match").unwrap(), "\"v1\"");
    assert_eq!(checks[2].headers.get("if-none-match").unwrap(), "\"v2\"");

    // Applied again: a new labeled event, hence a new trigger.
    gh.list(vec![crate::issue(
        11,
        &["claude-flow"],
        "2025-03-12T09:00:00Z",
    )])
    .await;
    gh.timeline(11, "alice-maintainer", 2).await;
    gh.permission("alice-maintainer", "write", "write").await;
    let again = source.poll().await.unwrap();
    assert_eq!(again[0].trigger, trigger(2));
    assert_ne!(again[0].trigger, issue.trigger);
    gh.server.verify().await;
}

#[tokio::test]
async fn closed_or_deleted_issues_are_not_wanted() {
    let gh = Fake::start().await;
    let mut closed = crate::issue(12, &["claude-flow"], "2025-03-11T11:00:00Z");
    closed["state"] = json!("closed");
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/12")))
        .respond_with(ResponseTemplate::new(200).set_body_json(closed))
        .mount(&gh.server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/13")))
        .respond_with(
            ResponseTemplate::new(410).set_body_json(json!({"message": "This issue was deleted"})),
        )
        .mount(&gh.server)
        .await;
    let source = gh.source();
    assert!(!source.is_wanted(&ready_issue(12, 1)).await.unwrap());
    assert!(!source.is_wanted(&ready_issue(13, 1)).await.unwrap());
    gh.server.verify().await;
}
