//! The GitHub source when GitHub misbehaves: server errors, malformed
//! answers, dropped connections, timeouts and rate limits.

// Helpers outside #[test] functions panic as failed assertions too.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use claude_flow_core::{IssueSource, Report, SourceError, StartReport};
use serde_json::json;
use support::github::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

fn list_ok() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!([]))
}

async fn mount_list(gh: &Fake, responses: Vec<ResponseTemplate>) -> Sequence {
    let seq = Sequence::new(responses);
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues")))
        .respond_with(seq.clone())
        .mount(&gh.server)
        .await;
    seq
}

#[tokio::test]
async fn server_errors_are_retried() {
    let gh = Fake::start().await;
    let seq = mount_list(
        &gh,
        vec![
            ResponseTemplate::new(502).set_body_string("<html>Bad Gateway</html>"),
            list_ok(),
        ],
    )
    .await;
    assert!(gh.source().poll().await.unwrap().is_empty());
    assert_eq!(seq.times().len(), 2);
    gh.server.verify().await;
}

#[tokio::test]
async fn a_malformed_answer_is_retried() {
    let gh = Fake::start().await;
    let seq = mount_list(
        &gh,
        vec![
            ResponseTemplate::new(200).set_body_string("[{\"number\": 1, \"tit"),
            list_ok(),
        ],
    )
    .await;
    assert!(gh.source().poll().await.unwrap().is_empty());
    assert_eq!(seq.times().len(), 2);
    gh.server.verify().await;
}

#[tokio::test]
async fn lasting_failures_end_in_an_error_that_names_the_request() {
    let gh = Fake::start().await;
    let seq = mount_list(
        &gh,
        vec![ResponseTemplate::new(503).set_body_json(json!({"message": "Service Unavailable"}))],
    )
    .await;
    let err = gh.source().poll().await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("GET /repos/acme/widgets/issues?"),
        "{text}"
    );
    assert!(
        text.contains("503") && text.contains("Service Unavailable"),
        "{text}"
    );
    assert!(!text.contains(TOKEN) && !format!("{err:?}").contains(TOKEN));
    // Bounded: the first try and three retries.
    assert_eq!(seq.times().len(), 4);
    gh.server.verify().await;
}

#[tokio::test]
async fn refusals_are_not_retried_and_quote_github() {
    let gh = Fake::start().await;
    let seq = mount_list(
        &gh,
        vec![ResponseTemplate::new(401).set_body_json(json!({
            "message": "Bad credentials",
            "documentation_url": "https://docs.github.com/rest",
            "status": "401"
        }))],
    )
    .await;
    let err = gh.source().poll().await.unwrap_err();
    match &err {
        SourceError::Rejected {
            what,
            status,
            message,
        } => {
            assert!(what.starts_with("GET /repos/acme/widgets/issues"), "{what}");
            assert_eq!(*status, Some(401));
            assert!(message.contains("Bad credentials"), "{message}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(!err.is_retryable());
    assert_eq!(seq.times().len(), 1);
    gh.server.verify().await;
}

#[tokio::test]
async fn retry_after_is_honoured_on_403_and_429() {
    for status in [403, 429] {
        let gh = Fake::start().await;
        let seq = mount_list(
            &gh,
            vec![
                ResponseTemplate::new(status)
                    .insert_header("retry-after", "1")
                    .set_body_json(json!({"message": "You have exceeded a secondary rate limit."})),
                list_ok(),
            ],
        )
        .await;
        assert!(gh.source().poll().await.unwrap().is_empty());
        let times = seq.times();
        assert_eq!(times.len(), 2);
        let gap = times[1].duration_since(times[0]).unwrap();
        assert!(
            gap >= Duration::from_secs(1),
            "{status}: retried after {gap:?}"
        );
        gh.server.verify().await;
    }
}

#[tokio::test]
async fn a_secondary_limit_without_retry_after_backs_off() {
    let gh = Fake::start().await;
    let limited = || {
        ResponseTemplate::new(403)
            .insert_header("x-ratelimit-remaining", "4000")
            .set_body_json(json!({"message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."}))
    };
    let seq = mount_list(&gh, vec![limited(), limited(), list_ok()]).await;
    assert!(gh.source().poll().await.unwrap().is_empty());
    let times = seq.times();
    assert_eq!(times.len(), 3);
    // fast_settings: 300 ms, then twice that.
    let first = times[1].duration_since(times[0]).unwrap();
    let second = times[2].duration_since(times[1]).unwrap();
    assert!(first >= Duration::from_millis(300), "{first:?}");
    assert!(second >= Duration::from_millis(600), "{second:?}");
    gh.server.verify().await;
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn nothing_is_sent_before_an_exhausted_limit_resets() {
    let gh = Fake::start().await;
    let reset = epoch_secs(SystemTime::now()) + 2;
    // The answer that uses up the quota is itself fine.
    let seq = mount_list(
        &gh,
        vec![
            list_ok()
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", reset.to_string().as_str()),
            list_ok(),
        ],
    )
    .await;
    let source = gh.source();
    source.poll().await.unwrap();
    source.poll().await.unwrap();
    let times = seq.times();
    assert_eq!(times.len(), 2);
    assert!(
        epoch_secs(times[1]) >= reset,
        "sent at {:?}, before the reset at {reset}",
        times[1]
    );
    gh.server.verify().await;
}

#[tokio::test]
async fn a_distant_reset_fails_fast_without_sending() {
    let gh = Fake::start().await;
    let reset = epoch_secs(SystemTime::now()) + 3600;
    let seq = mount_list(
        &gh,
        vec![
            ResponseTemplate::new(403)
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", reset.to_string().as_str())
                .set_body_json(json!({"message": "API rate limit exceeded for user ID 6605."})),
        ],
    )
    .await;
    let source = gh.source();
    for _ in 0..3 {
        match source.poll().await.unwrap_err() {
            SourceError::RateLimited { until, .. } => {
                assert!(epoch_secs(until) >= reset);
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
    }
    // One request learned of the limit; none was sent while it held.
    assert_eq!(seq.times().len(), 1);
    gh.server.verify().await;
}

#[tokio::test]
async fn slow_answers_time_out_and_are_retried() {
    let gh = Fake::start().await;
    let seq = mount_list(
        &gh,
        vec![list_ok().set_delay(Duration::from_secs(5)), list_ok()],
    )
    .await;
    let settings = claude_flow_core::GithubSettings {
        timeout: Duration::from_secs(1),
        ..fast_settings()
    };
    let source = gh.source_with(config(&gh.server.uri()), settings);
    assert!(source.poll().await.unwrap().is_empty());
    // On a loaded machine even a quick answer may miss a deadline once.
    assert!(seq.times().len() >= 2);
    gh.server.verify().await;
}

/// A proxy in front of the fake that drops the first `drop` connections
/// after reading their request, and forwards the others.
async fn dropping_proxy(target: std::net::SocketAddr, drop: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            accepted += 1;
            if accepted <= drop {
                let mut buf = [0u8; 4096];
                let _ = client.read(&mut buf).await;
                let _ = client.shutdown().await;
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_dropped_connection_is_retried() {
    let gh = Fake::start().await;
    let seq = mount_list(&gh, vec![list_ok()]).await;
    let via = dropping_proxy(*gh.server.address(), 1).await;
    let source = gh.source_with(config(&via), fast_settings());
    assert!(source.poll().await.unwrap().is_empty());
    assert_eq!(seq.times().len(), 1);
    gh.server.verify().await;
}

#[tokio::test]
async fn an_idempotent_write_is_retried_after_a_dropped_connection() {
    let gh = Fake::start().await;
    let via = dropping_proxy(*gh.server.address(), 1).await;
    let source = gh.source_with(config(&via), fast_settings());
    let mut issue = claude_flow_core::Issue::new("acme/widgets#3".parse().unwrap(), "t");
    issue.trigger = trigger(1);
    let mut reports = claude_flow_core::Reports::default();
    reports
        .memo
        .insert("github.labels_started".into(), "1".into());
    reports.memo.insert("github.comment_id".into(), "77".into());
    // The PATCH is idempotent: it goes through on the second connection.
    Mock::given(method("PATCH"))
        .and(path(format!("{REPO}/issues/comments/77")))
        .respond_with(ResponseTemplate::new(200).set_body_json(fixture("comment.json")))
        .expect(1)
        .mount(&gh.server)
        .await;
    let start = Report::Started(StartReport {
        edited_since_approval: false,
        round: 1,
        attempt: 2,
        failures: 1,
        max_attempts: 3,
    });
    source.report(&issue, &start, &mut reports).await.unwrap();
    gh.server.verify().await;
}

#[test]
fn the_token_never_shows_in_debug_output() {
    let source = claude_flow_core::GithubSource::new(
        &config("https://api.github.com"),
        claude_flow_core::Secret::new(TOKEN),
        fast_settings(),
    )
    .unwrap();
    let shown = format!("{source:?}");
    assert!(!shown.contains(TOKEN), "{shown}");
}

#[tokio::test]
async fn posting_a_comment_is_never_repeated_blindly() {
    let gh = Fake::start().await;
    let mut issue = claude_flow_core::Issue::new("acme/widgets#4".parse().unwrap(), "t");
    issue.trigger = trigger(1);
    // GitHub made the comment before the gateway failed; it shows up in
    // the list at the next look.
    let mut made = fixture("comment.json");
    made["id"] = json!(9999);
    made["body"] = json!(format!(
        "<!-- claude-flow:status trigger={} round=1 -->\nworking",
        issue.trigger
    ));
    Mock::given(method("GET"))
        .and(path(format!("{REPO}/issues/4/comments")))
        .respond_with(Sequence::new(vec![
            ResponseTemplate::new(200).set_body_json(json!([])),
            ResponseTemplate::new(200).set_body_json(json!([made])),
        ]))
        .expect(2)
        .mount(&gh.server)
        .await;
    // Posting again could leave two comments: the client does not.
    Mock::given(method("POST"))
        .and(path(format!("{REPO}/issues/4/comments")))
        .respond_with(ResponseTemplate::new(502).set_body_string("Bad Gateway"))
        .expect(1)
        .mount(&gh.server)
        .await;
    Mock::given(method("PATCH"))
        .and(path(format!("{REPO}/issues/comments/9999")))
        .respond_with(ResponseTemplate::new(200).set_body_json(&made))
        .expect(1)
        .mount(&gh.server)
        .await;
    let source = gh.source();
    let mut reports = claude_flow_core::Reports::default();
    reports
        .memo
        .insert("github.labels_started".into(), "1".into());
    let start = Report::Started(StartReport {
        edited_since_approval: false,
        round: 1,
        attempt: 1,
        failures: 0,
        max_attempts: 3,
    });
    let err = source
        .report(&issue, &start, &mut reports)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("POST /repos/acme/widgets/issues/4/comments: HTTP 502"),
        "{text}"
    );
    assert!(!reports.memo.contains_key("github.comment_id"));

    // The report's next try finds the comment by its marker and edits it.
    source.report(&issue, &start, &mut reports).await.unwrap();
    assert_eq!(
        reports.memo.get("github.comment_id").map(String::as_str),
        Some("9999")
    );
    gh.server.verify().await;
}
