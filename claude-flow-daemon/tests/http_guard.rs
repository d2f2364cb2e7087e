//! What keeps a web page from driving the HTTP API (issue 9): the API
//! token, the `Host` check against DNS rebinding, the `Origin` check, and
//! body limits. Each request here is one a browser could send on behalf
//! of a page the operator visits.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod support;

use std::sync::Arc;

use claude_flow_core::{IssueStatus, MemorySource};
use support::{
    API_TOKEN, Behaviour, Counted, Options, REPO, SECRET, Service, TRIGGER, issue, issues_delivery,
    sign,
};

fn counted(issues: impl IntoIterator<Item = claude_flow_core::Issue>) -> Arc<Counted> {
    Arc::new(Counted {
        inner: MemorySource::new(issues),
        ..Counted::default()
    })
}

fn bearer() -> String {
    format!("Bearer {API_TOKEN}")
}

/// A service whose issue #1 runs until cancelled.
async fn running_one() -> Service {
    let mut options = Options::new(counted([issue(1)]));
    options.behaviour = |_| Behaviour::Hold;
    let service = Service::start(options).await;
    service
        .wait_status("#1 running", |s| s.running.len() == 1)
        .await;
    service
}

#[tokio::test]
async fn the_findings_cancel_from_a_web_page_is_refused() {
    let service = running_one().await;
    let port = service.addr.port();
    let cancel = "/api/issues/acme/widgets/1/cancel";
    // As the finding sent it: no credentials, a foreign Origin, a foreign
    // Host (a DNS-rebound name).
    let (code, body) = service
        .raw(
            &format!(
                "POST {cancel} HTTP/1.1\r\nHost: rebind.evil.example:{port}\r\nOrigin: http://rebind.evil.example:{port}\r\n"
            ),
            b"",
        )
        .await;
    assert_eq!(code, 421, "{body}");
    // A cross-site request from a page elsewhere: the Host is ours.
    let (code, body) = service
        .raw(
            &format!(
                "POST {cancel} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://evil.example\r\n"
            ),
            b"",
        )
        .await;
    assert_eq!(code, 403, "{body}");
    // Even carrying the token, a foreign page is refused.
    let (code, body) = service
        .post_with(
            cancel,
            &[
                ("authorization", &bearer()),
                ("origin", "https://evil.example"),
            ],
        )
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Origin"), "{body}");
    // No Origin (curl, scripts) and no token.
    let (code, body) = service.post_with(cancel, &[]).await;
    assert_eq!(code, 401, "{body}");
    let status = service.orchestrator.status();
    assert_eq!(status.running.len(), 1, "a refused cancel stopped #1");

    let (code, body) = service.post(cancel).await;
    assert_eq!(code, 200, "{body}");
    service
        .wait_record("#1 cancelled", 1, |r| r.status == IssueStatus::Cancelled)
        .await;
}

#[tokio::test]
async fn every_post_to_the_api_needs_the_bearer_token() {
    let service = running_one().await;
    let paths = [
        "/api/resume",
        "/api/issues/acme/widgets/1/retry",
        "/api/issues/acme/widgets/1/cancel",
        "/api/issues/acme/widgets/404/retry",
    ];
    let wrong = format!("Bearer {API_TOKEN}x");
    let short = format!("Bearer {}", &API_TOKEN[..API_TOKEN.len() - 1]);
    let lower = format!("bearer {}", API_TOKEN.to_uppercase());
    for path in paths {
        for headers in [
            &[][..],
            &[("authorization", "")],
            &[("authorization", "Bearer")],
            &[("authorization", "Bearer ")],
            &[("authorization", wrong.as_str())],
            &[("authorization", short.as_str())],
            &[("authorization", lower.as_str())],
            &[("authorization", API_TOKEN)],
            &[("authorization", &format!("Basic {API_TOKEN}"))],
            &[("x-api-token", API_TOKEN)],
        ] {
            let response = {
                let mut request = service.http.post(service.url(path));
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request.send().await.unwrap()
            };
            assert_eq!(response.status().as_u16(), 401, "{path} {headers:?}");
            let challenge = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            assert!(
                challenge.is_some_and(|c| c.starts_with("Bearer")),
                "{path}: no WWW-Authenticate: Bearer"
            );
            let body: serde_json::Value = response.json().await.unwrap();
            let error = body["error"].as_str().unwrap();
            // It says how to get the token, and never what it is.
            assert!(error.contains("Authorization: Bearer"), "{error}");
            assert!(error.contains("service.api_token"), "{error}");
            assert!(error.contains("api-token"), "{error}");
            assert!(!error.contains(API_TOKEN), "{error}");
        }
    }
    assert_eq!(service.orchestrator.status().running.len(), 1);
    // Reading needs no token.
    let (code, list) = service.get("/api/issues").await;
    assert_eq!(code, 200, "{list}");
    let (code, _) = service.get("/healthz").await;
    assert_eq!(code, 200);
    // With it, the API works; the scheme's case does not matter.
    let (code, body) = service
        .post_with(
            "/api/resume",
            &[("authorization", &format!("bearer {API_TOKEN}"))],
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = service.post("/api/issues/acme/widgets/404/retry").await;
    assert_eq!(code, 404, "{body}");
}

#[tokio::test]
async fn a_foreign_host_gets_421_on_every_path_but_the_webhook() {
    let mut options = Options::new(counted([]));
    options.webhook = true;
    let service = Service::start(options).await;
    let port = service.addr.port();
    let token = bearer();
    for host in [
        "rebind.evil.example".to_owned(),
        format!("rebind.evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        "localhost.:1".to_owned(),
        format!("10.1.2.3:{port}"),
        format!("[::2]:{port}"),
        String::new(),
        "127.0.0.1:8787@evil.example".to_owned(),
    ] {
        for (method, path) in [
            ("GET", "/healthz"),
            ("GET", "/metrics"),
            ("GET", "/api/issues"),
            ("POST", "/api/resume"),
            ("POST", "/api/issues/acme/widgets/1/retry"),
            ("GET", "/"),
            ("GET", "/no/such/path"),
        ] {
            let (code, body) = service
                .raw(
                    &format!(
                        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\n"
                    ),
                    b"",
                )
                .await;
            assert_eq!(code, 421, "{method} {path} with Host {host:?}: {body}");
            if host == "rebind.evil.example" {
                assert!(body.contains("Host"), "{body}");
            }
        }
    }
    // Two Host headers: which one counts is anyone's guess, so neither.
    let (code, _) = service
        .raw(
            &format!(
                "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: rebind.evil.example\r\n"
            ),
            b"",
        )
        .await;
    assert!(code == 421 || code == 400, "two Host headers: {code}");
    // An absolute URI names the host, whatever the Host header says.
    let (code, _) = service
        .raw(
            &format!("GET http://rebind.evil.example:{port}/healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"),
            b"",
        )
        .await;
    assert_eq!(code, 421);

    for host in [
        "localhost".to_owned(),
        "LocalHost:1".to_owned(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        "127.1.2.3:9999".to_owned(),
        format!("[::1]:{port}"),
        "[::1]".to_owned(),
    ] {
        let (code, body) = service
            .raw(&format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n"), b"")
            .await;
        assert_eq!(code, 200, "Host {host:?}: {body}");
    }

    // GitHub names the service by its public name.
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let (code, body) = service
        .raw(
            &format!(
                "POST /webhook HTTP/1.1\r\nHost: hooks.example.com\r\nX-GitHub-Event: ping\r\nX-Hub-Signature-256: {}\r\nContent-Type: application/json\r\n",
                sign(SECRET, ping)
            ),
            ping,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("pong"), "{body}");
    let (code, _) = service
        .raw(
            "POST /webhook HTTP/1.1\r\nHost: hooks.example.com\r\nX-GitHub-Event: ping\r\n",
            ping,
        )
        .await;
    assert_eq!(code, 401, "unsigned");
}

#[tokio::test]
async fn a_post_to_the_api_from_another_origin_gets_403() {
    let service = Service::start(Options::new(counted([]))).await;
    let port = service.addr.port();
    let token = bearer();
    for origin in [
        "https://evil.example".to_owned(),
        "http://evil.example".to_owned(),
        format!("http://rebind.evil.example:{port}"),
        "null".to_owned(),
        format!("http://127.0.0.1:{}", port.wrapping_add(1)),
        format!("http://localhost:{}", port.wrapping_add(1)),
        format!("https://127.0.0.1:{port}"),
        "http://127.0.0.1".to_owned(),
        format!("http://127.0.0.1:{port}.evil.example"),
        String::new(),
    ] {
        let (code, body) = service
            .post_with(
                "/api/resume",
                &[("authorization", &token), ("origin", &origin)],
            )
            .await;
        assert_eq!(code, 403, "Origin {origin:?}: {body}");
    }
    for origin in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
        format!("http://LOCALHOST:{port}"),
        format!("http://[::1]:{port}"),
    ] {
        let (code, body) = service
            .post_with(
                "/api/resume",
                &[("authorization", &token), ("origin", &origin)],
            )
            .await;
        assert_eq!(code, 200, "Origin {origin:?}: {body}");
    }
    // Reads are not actions: a page cannot read the answer anyway (no
    // CORS headers), and the Host check stops rebinding.
    let response = service
        .http
        .get(service.url("/api/issues"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn request_bodies_are_limited_on_every_endpoint() {
    let mut options = Options::new(counted([]));
    options.webhook = true;
    let service = Service::start(options).await;
    let port = service.addr.port();
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    let token = format!("Authorization: {}\r\n", bearer());
    // The API takes no body; a small one is tolerated.
    let (code, body) = service
        .raw(
            &format!("POST /api/resume HTTP/1.1\r\n{host}{token}"),
            b"{}",
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let big = vec![b'x'; 64 * 1024];
    for (method, path) in [
        ("POST", "/api/resume"),
        ("POST", "/api/issues/acme/widgets/1/cancel"),
        ("GET", "/api/issues"),
        ("GET", "/healthz"),
        ("GET", "/metrics"),
    ] {
        let (code, body) = service
            .raw(&format!("{method} {path} HTTP/1.1\r\n{host}{token}"), &big)
            .await;
        assert_eq!(code, 413, "{method} {path}: {body}");
    }
    // GitHub's payloads go up to 25 MB; a large delivery is still read,
    // checked and answered.
    let mut push = br#"{"ref":"refs/heads/main","padding":""#.to_vec();
    push.extend(std::iter::repeat_n(b'a', 3 * 1024 * 1024));
    push.extend(br#""}"#);
    let (code, answer) = service
        .deliver("push", &push, Some(sign(SECRET, &push)))
        .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["result"], "ignored");
    let labeled = issues_delivery("labeled", REPO, 1, TRIGGER);
    let (code, _) = service
        .deliver("issues", &labeled, Some(sign(SECRET, &labeled)))
        .await;
    assert_eq!(code, 202);
    // Beyond the limit, the announced length alone is enough to refuse.
    let limit = claude_flow_daemon::http::WEBHOOK_BODY_LIMIT;
    let (code, _) = service
        .announce(
            &format!("POST /webhook HTTP/1.1\r\n{host}X-GitHub-Event: issues\r\n"),
            limit + 1,
        )
        .await;
    assert_eq!(code, 413);
}
