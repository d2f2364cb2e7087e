//! `GET /metrics` after real work. The metrics recorder is global to the
//! process, so this file holds one test and no other test installs one.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod support;

use std::sync::Arc;
use std::time::Duration;

use claude_flow_core::config::GithubConfig;
use claude_flow_core::{
    GithubSettings, GithubSource, IssueSource, IssueStatus, MemorySource, Secret,
};
use claude_flow_daemon::http;
use support::{Behaviour, Counted, Options, Service, issue};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The value of the sample `name` (with its labels, as rendered).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn metrics_count_attempts_polls_and_github_requests() {
    let handle = http::install_metrics().unwrap();

    // Work: #1 succeeds, #2 fails three times (retries 10-40 ms apart).
    let source = Arc::new(Counted {
        inner: MemorySource::new([issue(1), issue(2)]),
        ..Counted::default()
    });
    let mut options = Options::new(source);
    options.behaviour = |n| {
        if n == 1 {
            Behaviour::Succeed
        } else {
            Behaviour::Fail
        }
    };
    let service = Service::start_with(options, |state| state.with_metrics(handle.clone())).await;
    service
        .wait_record("#1 done", 1, |r| r.status == IssueStatus::Done)
        .await;
    service
        .wait_record("#2 failed", 2, |r| r.status == IssueStatus::Failed)
        .await;

    // GitHub's requests are counted by the GitHub source's client.
    let github = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/user"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"login": "svc", "type": "User"}))
                .insert_header("x-ratelimit-remaining", "4998"),
        )
        .mount(&github)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/widgets/issues"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!([]))
                .insert_header("x-ratelimit-remaining", "4997"),
        )
        .mount(&github)
        .await;
    let config = GithubConfig {
        api_url: github.uri(),
        repos: vec!["acme/widgets".parse().unwrap()],
        ..GithubConfig::default()
    };
    let gh = GithubSource::new(&config, Secret::new("t"), GithubSettings::default()).unwrap();
    assert!(gh.poll().await.unwrap().is_empty());

    let response = service
        .http
        .get(service.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    println!("{text}");
    let value = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    assert_eq!(value("claude_flow_workflows_running"), 0.0);
    assert_eq!(
        value("claude_flow_attempts_total{outcome=\"succeeded\"}"),
        1.0
    );
    assert_eq!(value("claude_flow_attempts_total{outcome=\"failed\"}"), 3.0);
    assert_eq!(value("claude_flow_attempt_duration_seconds_count"), 4.0);
    // Instant attempts: all in the first bucket.
    assert_eq!(
        value("claude_flow_attempt_duration_seconds_bucket{le=\"1\"}"),
        4.0
    );
    assert_eq!(
        value("claude_flow_attempt_duration_seconds_bucket{le=\"+Inf\"}"),
        4.0
    );
    assert!(value("claude_flow_polls_total{result=\"ok\"}") >= 1.0);
    assert!(value("claude_flow_poll_duration_seconds_count") >= 1.0);
    assert!(value("claude_flow_poll_duration_seconds_bucket{le=\"+Inf\"}") >= 1.0);
    assert!(text.contains("# HELP claude_flow_attempts_total "));
    assert_eq!(
        value("claude_flow_github_requests_total{status=\"200\"}"),
        2.0
    );
    assert_eq!(value("claude_flow_github_rate_limit_remaining"), 4997.0);

    // A second recorder cannot be installed over the first.
    assert!(http::install_metrics().is_err());
    // Upkeep stops with its token.
    let stop = tokio_util::sync::CancellationToken::new();
    let upkeep = tokio::spawn(http::metrics_upkeep(handle.clone(), stop.clone()));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), upkeep)
        .await
        .unwrap()
        .unwrap();
}
