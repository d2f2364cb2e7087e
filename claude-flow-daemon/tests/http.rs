//! The service's HTTP API in-process: health, the issue API, the webhook.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use claude_flow_core::{IssueStatus, MemorySource, MockIssueSource, SourceError};
use serde_json::Value;
use support::{
    Behaviour, Counted, Options, PATIENCE, REPO, SECRET, Service, TRIGGER, issue, issues_delivery,
    key, sign,
};

fn counted(issues: impl IntoIterator<Item = claude_flow_core::Issue>) -> Arc<Counted> {
    Arc::new(Counted {
        inner: MemorySource::new(issues),
        ..Counted::default()
    })
}

#[tokio::test]
async fn healthz_reports_the_last_poll_and_what_runs() {
    let source = counted([issue(1)]);
    let mut options = Options::new(source);
    options.behaviour = |_| Behaviour::Hold;
    let mut service = Service::start(options).await;
    service
        .wait_status("a running workflow", |s| s.running.len() == 1)
        .await;
    let (code, body) = service.get("/healthz").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    let running = &body["running"][0];
    assert_eq!(running["issue"], "acme/widgets#1");
    assert_eq!(
        (running["round"].as_u64(), running["attempt"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(humantime::parse_rfc3339(running["started_at"].as_str().unwrap()).is_ok());
    assert_eq!(body["running"].as_array().unwrap().len(), 1);
    assert_eq!(body["running_count"], 1);
    assert_eq!(body["last_poll"]["ready"], 1);
    assert_eq!(body["last_poll"]["error"], Value::Null);
    assert!(humantime::parse_rfc3339(body["last_poll"]["at"].as_str().unwrap()).is_ok());
    assert_eq!(body["paused_until"], Value::Null);
    assert_eq!(body["pause_reason"], Value::Null);
    assert_eq!(body["stopping"], false);
    assert!(body.get("reason").is_none());
    service.orchestrator.cancel(&key(1)).await.unwrap();
    service.stop_engine().await;
    service.stop_server().await;
}

#[tokio::test]
async fn a_recorded_pause_is_shown_at_start_and_post_api_resume_ends_it() {
    use claude_flow_core::{ServiceState, StateStore};
    // What a service paused for a quota exit left behind when it stopped.
    let until = SystemTime::now() + Duration::from_secs(3600);
    let store = Arc::new(claude_flow_core::MemoryStore::new());
    let paused = ServiceState {
        paused_until: Some(until),
        pause_reason: Some("the workflow for acme/widgets#1 reported its quota exhausted".into()),
        quota_exits: 2,
        ..ServiceState::default()
    };
    store.put_service(&paused).await.unwrap();
    let mut options = Options::new(counted([issue(1)]));
    options.store = store.clone();
    let mut service = Service::start(options).await;
    service
        .wait_status("the first poll", |s| s.last_poll.is_some())
        .await;

    let (code, body) = service.get("/healthz").await;
    assert_eq!(code, 200, "a pause is not unhealthy: {body}");
    assert_eq!(time(&body["paused_until"]), until);
    assert_eq!(body["pause_reason"], paused.pause_reason.clone().unwrap());
    assert!(service.starts.borrow().is_empty(), "started while paused");

    let (code, body) = service.post("/api/resume").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(time(&body["lifted_until"]), until);
    assert_eq!(body["pause_reason"], paused.pause_reason.clone().unwrap());
    service.wait_starts(1).await;
    let (_, health) = service.get("/healthz").await;
    assert_eq!(health["paused_until"], Value::Null);
    assert_eq!(health["pause_reason"], Value::Null);
    assert_eq!(store.load_service().await.unwrap(), ServiceState::default());

    let (code, body) = service.post("/api/resume").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["lifted_until"], Value::Null);

    // Without the orchestrator's loop nothing can take the command.
    service.stop_engine().await;
    let (code, body) = service.post("/api/resume").await;
    assert_eq!(code, 503, "{body}");
    service.stop_server().await;
}

/// An RFC 3339 time from a JSON body.
fn time(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}"))).unwrap()
}

#[tokio::test]
async fn healthz_is_503_after_three_failed_polls() {
    let mut source = MockIssueSource::new();
    source.expect_poll().returning(|| {
        Err(SourceError::Unavailable {
            what: "GET /repos/acme/widgets/issues".into(),
            message: "HTTP 502".into(),
        })
    });
    let mut options = Options::new(Arc::new(source));
    options.settings.poll_interval = Duration::from_millis(10);
    let service = Service::start(options).await;
    service
        .wait_status("three failed polls", |s| s.consecutive_poll_failures >= 3)
        .await;
    let (code, body) = service.get("/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "unavailable");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("polls failed"), "{reason}");
    assert!(reason.contains("HTTP 502"), "{reason}");
    assert!(body["consecutive_poll_failures"].as_u64().unwrap() >= 3);
    assert_eq!(body["last_poll"]["ready"], Value::Null);
}

#[tokio::test]
async fn healthz_is_503_while_stopping() {
    let mut options = Options::new(counted([issue(1)]));
    options.behaviour = |_| Behaviour::Hold;
    let mut service = Service::start(options).await;
    service
        .wait_status("a running workflow", |s| s.running.len() == 1)
        .await;
    service.engine_stop().cancel();
    service.wait_status("stopping", |s| s.stopping).await;
    let (code, body) = service.get("/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body["reason"].as_str().unwrap().starts_with("stopping"));
    assert_eq!(body["stopping"], true);
    // The loop still takes commands while it drains.
    service.orchestrator.cancel(&key(1)).await.unwrap();
    service.stop_engine().await;
}

#[tokio::test]
async fn the_api_lists_retries_and_cancels_issues() {
    let mut options = Options::new(counted([issue(1), issue(2)]));
    // #1 runs until cancelled; #2 succeeds at once.
    options.behaviour = |n| {
        if n == 1 {
            Behaviour::Hold
        } else {
            Behaviour::Succeed
        }
    };
    let mut service = Service::start(options).await;
    service
        .wait_record("#2 done", 2, |r| r.status == IssueStatus::Done)
        .await;
    service
        .wait_status("#1 running", |s| {
            s.running
                .iter()
                .map(|r| r.issue.clone())
                .collect::<Vec<_>>()
                == vec![key(1)]
        })
        .await;

    let (code, list) = service.get("/api/issues").await;
    assert_eq!(code, 200);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["issue"], "acme/widgets#1");
    assert_eq!(list[0]["status"], "running");
    assert_eq!(list[1]["issue"], "acme/widgets#2");
    assert_eq!(list[1]["repo"], REPO);
    assert_eq!(list[1]["number"], 2);
    assert_eq!(list[1]["title"], "issue 2");
    assert_eq!(list[1]["status"], "done");
    assert_eq!(list[1]["round"], 1);
    assert_eq!(list[1]["attempts"], 1);
    for field in ["pr_url", "next_retry_at", "last_error", "updated_at"] {
        assert!(list[1].get(field).is_some(), "{field} missing");
    }

    let api = "/api/issues/acme/widgets";
    let (code, body) = service.post(&format!("{api}/1/retry")).await;
    assert_eq!(code, 409, "retrying a running issue: {body}");
    assert!(body["error"].as_str().unwrap().contains("running"));
    let (code, body) = service.post(&format!("{api}/2/cancel")).await;
    assert_eq!(code, 409, "cancelling a done issue: {body}");
    let (code, body) = service.post(&format!("{api}/3/retry")).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        body["error"],
        "acme/widgets#3 is not known to the state store"
    );
    let (code, _) = service.post(&format!("{api}/x/retry")).await;
    assert_eq!(code, 400);
    let (code, _) = service.get(&format!("{api}/2/retry")).await;
    assert_eq!(code, 405);

    let (code, body) = service.post(&format!("{api}/2/retry")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["round"].as_u64()),
        (Some("queued"), Some(2))
    );
    let starts = service.wait_starts(3).await;
    assert_eq!(starts.iter().filter(|(n, _)| *n == 2).count(), 2);
    service
        .wait_record("#2 done again", 2, |r| {
            r.status == IssueStatus::Done && r.round == 2
        })
        .await;

    let (code, body) = service.post(&format!("{api}/1/cancel")).await;
    assert_eq!(code, 200, "{body}");
    service
        .wait_record("#1 cancelled", 1, |r| r.status == IssueStatus::Cancelled)
        .await;

    service.stop_engine().await;
    let (code, body) = service.post(&format!("{api}/2/retry")).await;
    assert_eq!(code, 503, "{body}");
    service.stop_server().await;
}

#[tokio::test]
async fn webhook_is_404_without_a_secret() {
    let service = Service::start(Options::new(counted([]))).await;
    let body = issues_delivery("labeled", REPO, 1, TRIGGER);
    let (code, _) = service
        .deliver("issues", &body, Some(sign(SECRET, &body)))
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn a_webhook_without_a_valid_signature_does_nothing() {
    let source = counted([]);
    let mut options = Options::new(source.clone());
    options.webhook = true;
    let service = Service::start(options).await;
    service
        .wait_status("the first poll", |s| s.last_poll.is_some())
        .await;
    source.inner.push(issue(5));
    let body = issues_delivery("labeled", REPO, 5, TRIGGER);
    let other_body = issues_delivery("labeled", REPO, 6, TRIGGER);
    for signature in [
        None,
        Some(String::new()),
        Some("sha256=".into()),
        Some("sha1=0123".into()),
        Some(sign("another secret", &body)),
        Some(sign(SECRET, &other_body)),
        Some(sign(SECRET, &body).to_uppercase()),
    ] {
        let (code, answer) = service.deliver("issues", &body, signature.clone()).await;
        assert_eq!(code, 401, "{signature:?}: {answer}");
        assert_eq!(answer["error"], "missing or bad X-Hub-Signature-256");
    }
    // Nothing was parsed, so nothing could be asked of the orchestrator:
    // a window long enough to see a poll that should not happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(source.polls_done(), 1, "a refused delivery caused a poll");
    assert!(service.starts.borrow().is_empty());
}

#[tokio::test]
async fn signed_deliveries_are_answered_by_what_they_are() {
    let mut options = Options::new(counted([]));
    options.webhook = true;
    let service = Service::start(options).await;
    let signed = |body: &[u8]| Some(sign(SECRET, body));

    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let (code, answer) = service.deliver("ping", ping, signed(ping)).await;
    assert_eq!((code, answer["result"].as_str()), (200, Some("pong")));

    let push = br#"{"ref":"refs/heads/main"}"#;
    let (code, answer) = service.deliver("push", push, signed(push)).await;
    assert_eq!((code, answer["result"].as_str()), (200, Some("ignored")));

    let other_label = issues_delivery("labeled", REPO, 1, "bug");
    let (code, answer) = service
        .deliver("issues", &other_label, signed(&other_label))
        .await;
    assert_eq!(
        (code, answer["result"].as_str()),
        (200, Some("ignored")),
        "{answer}"
    );

    let other_repo = issues_delivery("labeled", "acme/gadgets", 1, TRIGGER);
    let (code, answer) = service
        .deliver("issues", &other_repo, signed(&other_repo))
        .await;
    assert_eq!(
        (code, answer["result"].as_str()),
        (200, Some("ignored")),
        "{answer}"
    );
    assert!(answer["reason"].as_str().unwrap().contains("acme/gadgets"));

    let garbled = br#"{"action":"labeled"}"#;
    let (code, _) = service.deliver("issues", garbled, signed(garbled)).await;
    assert_eq!(code, 400);

    // Owner and name match without regard to case, as on GitHub.
    let closed = issues_delivery("closed", "ACME/Widgets", 1, TRIGGER);
    let (code, answer) = service.deliver("issues", &closed, signed(&closed)).await;
    assert_eq!(
        (code, answer["result"].as_str()),
        (202, Some("poll")),
        "{answer}"
    );
    // Body limits: tests/http_guard.rs.
}

#[tokio::test]
async fn a_labeled_delivery_starts_the_workflow_at_once() {
    let source = counted([]);
    let mut options = Options::new(source.clone());
    // Polling alone would take an hour.
    options.settings.poll_interval = Duration::from_secs(3600);
    options.webhook = true;
    let service = Service::start(options).await;
    service
        .wait_status("the first poll", |s| s.last_poll.is_some())
        .await;
    source.inner.push(issue(7));
    let body = issues_delivery("labeled", REPO, 7, TRIGGER);
    let signature = sign(SECRET, &body);
    let sent = Instant::now();
    let (code, answer) = service.deliver("issues", &body, Some(signature)).await;
    assert_eq!(code, 202, "{answer}");
    assert_eq!(answer["issue"], "acme/widgets#7");
    let starts = service.wait_starts(1).await;
    let latency = starts[0].1.duration_since(sent);
    println!("webhook to start: {latency:?}");
    assert!(latency < Duration::from_secs(10), "took {latency:?}");
}

#[tokio::test]
async fn duplicate_deliveries_racing_a_poll_start_one_attempt() {
    let source = counted([]);
    let mut options = Options::new(source.clone());
    options.webhook = true;
    let service = Service::start(options).await;
    service
        .wait_status("the first poll", |s| s.last_poll.is_some())
        .await;
    source.inner.push(issue(9));
    let body = issues_delivery("labeled", REPO, 9, TRIGGER);
    let signature = sign(SECRET, &body);
    // GitHub redelivers with the same delivery id; send the same delivery
    // three times at once, and a poll of our own at the same time.
    let (a, b, c) = tokio::join!(
        service.deliver("issues", &body, Some(signature.clone())),
        service.deliver("issues", &body, Some(signature.clone())),
        async {
            service.orchestrator.poll_now();
            service
                .deliver("issues", &body, Some(signature.clone()))
                .await
        },
    );
    assert_eq!((a.0, b.0, c.0), (202, 202, 202));
    // A poll that starts after every delivery was answered sees all of
    // them; once it has ended and the loop has taken a command after it,
    // whatever those deliveries could start has started.
    let after = Instant::now();
    service.orchestrator.poll_now();
    let waited = Instant::now();
    while !source.polled_since(after) {
        assert!(waited.elapsed() < PATIENCE, "no poll after the deliveries");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (code, _) = service.post("/api/issues/acme/widgets/404/retry").await;
    assert_eq!(code, 404);
    service
        .wait_record("#9 done", 9, |r| r.status == IssueStatus::Done)
        .await;
    assert_eq!(service.starts.borrow().len(), 1, "one attempt, not more");
    let record = {
        use claude_flow_core::StateStore;
        service.store.get(&key(9)).await.unwrap().unwrap()
    };
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.round, 1);
}

#[tokio::test]
async fn the_clis_api_client_reads_what_the_server_writes() {
    use claude_flow_core::api::{ApiClient, ApiError};
    let mut options = Options::new(counted([issue(1)]));
    options.behaviour = |_| Behaviour::Hold;
    let mut service = Service::start(options).await;
    service
        .wait_status("a running workflow", |s| s.running.len() == 1)
        .await;
    let client = ApiClient::for_listen(service.base.trim_start_matches("http://"))
        .unwrap()
        .with_token(claude_flow_core::Secret::new(support::API_TOKEN));
    let health = client.health().await.unwrap();
    assert!(health.is_ok());
    let running: Vec<_> = health
        .running
        .iter()
        .map(|r| (r.issue.to_string(), r.round, r.attempt))
        .collect();
    assert_eq!(running, [("acme/widgets#1".to_owned(), 1, 1)]);
    assert_eq!(health.last_poll.unwrap().ready, Some(1));
    let issues = client.issues().await.unwrap();
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].status, IssueStatus::Running);
    match client.retry(&key(1)).await {
        Err(ApiError::Status {
            status: 409,
            message,
            ..
        }) => assert_eq!(message, "acme/widgets#1 is running now"),
        other => panic!("expected a 409, got {other:?}"),
    }
    assert!(matches!(
        client.retry(&key(2)).await,
        Err(ApiError::Status { status: 404, .. })
    ));
    let cancelled = client.cancel(&key(1)).await.unwrap();
    assert_eq!(cancelled.issue, "acme/widgets#1");
    service
        .wait_record("#1 cancelled", 1, |r| r.status == IssueStatus::Cancelled)
        .await;
    let resumed = client.resume().await.unwrap();
    assert_eq!(resumed.lifted_until, None);
    assert_eq!(resumed.describe(), "not paused");
    service.stop_engine().await;
    service.stop_server().await;
    assert!(matches!(
        client.health().await,
        Err(ApiError::Unreachable { .. })
    ));
}
