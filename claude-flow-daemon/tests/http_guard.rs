//! What keeps a web page from driving the HTTP API (issue 9): the API
//! token. Each request here is one a browser could send on behalf of a
//! page the operator visits.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod support;

use std::sync::Arc;

use claude_flow_core::MemorySource;
use support::{API_TOKEN, Behaviour, Counted, Options, Service, issue};

fn counted(issues: impl IntoIterator<Item = claude_flow_core::Issue>) -> Arc<Counted> {
    Arc::new(Counted {
        inner: MemorySource::new(issues),
        ..Counted::default()
    })
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
