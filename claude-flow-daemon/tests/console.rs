//! The web console over plain HTTP (no browser): what the pages say, that
//! attacker-controlled text is escaped, and that the console is read-only
//! without the API token. `console_browser.rs` runs it in Chromium.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod support;

use std::sync::Arc;

use claude_flow_core::{Issue, IssueStatus, MemorySource};
use support::{Behaviour, Options, Service, key};

const HOSTILE: &str = "<script>window.pwned = 1</script><img src=x onerror=alert(1)> & \"quotes\"";

/// Issue 1 runs (until cancelled), issue 2 fails every attempt, and
/// issue 3, with a hostile title, fails too.
async fn service() -> Service {
    let source = Arc::new(MemorySource::new([
        Issue::new(key(1), "Add the frobnicator"),
        Issue::new(key(2), "Fix the widget"),
        Issue::new(key(3), HOSTILE),
    ]));
    let mut options = Options::new(source);
    options.behaviour = |n| match n {
        1 => Behaviour::Hold,
        _ => Behaviour::Fail,
    };
    let service = Service::start(options).await;
    for n in [2, 3] {
        service
            .wait_record("a failed issue", n, |r| r.status == IssueStatus::Failed)
            .await;
    }
    service
        .wait_status("issue 1 running", |s| s.running.len() == 1)
        .await;
    service
}

async fn page(service: &Service, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let response = service.http.get(service.url(path)).send().await.unwrap();
    let code = response.status().as_u16();
    let headers = response.headers().clone();
    (code, headers, response.text().await.unwrap())
}

#[tokio::test]
async fn the_home_page_shows_what_runs_and_what_failed() {
    let service = service().await;
    let (code, headers, body) = page(&service, "/").await;
    assert_eq!(code, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let running = section(&body, "running");
    assert!(running.contains("acme/widgets#1"), "{running}");
    assert!(running.contains("Add the frobnicator"), "{running}");
    let settled = section(&body, "settled");
    assert!(settled.contains("acme/widgets#2"), "{settled}");
    assert!(settled.contains("failed: exit code 1"), "{settled}");
    // The timeline has a bar per attempt: one running, six failed.
    let timeline = section(&body, "timeline");
    assert_eq!(timeline.matches("class=\"bar running\"").count(), 1);
    assert_eq!(timeline.matches("class=\"bar failed\"").count(), 6);
}

#[tokio::test]
async fn a_hostile_title_is_text_everywhere() {
    let service = service().await;
    let escaped = "&lt;script&gt;window.pwned = 1&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt; &amp; &quot;quotes&quot;";
    for path in ["/", "/issues/acme/widgets/3"] {
        let (code, headers, body) = page(&service, path).await;
        assert_eq!(code, 200, "{path}");
        assert!(!body.contains("<script>window"), "{path}: {body}");
        assert!(!body.contains("<img src=x"), "{path}: {body}");
        assert!(body.contains(escaped), "{path}: {body}");
        // Even a missed escape could run nothing: no inline script.
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
    }
}

#[tokio::test]
async fn an_issue_page_lists_its_attempts_and_the_log_stream_is_there() {
    let service = service().await;
    let (code, _, body) = page(&service, "/issues/acme/widgets/2").await;
    assert_eq!(code, 200);
    let attempts = section(&body, "attempts");
    assert_eq!(
        attempts.matches("failed: exit code 1").count(),
        3,
        "{attempts}"
    );
    let (code, _, body) = page(&service, "/issues/acme/widgets/1").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("data-src=\"/issues/acme/widgets/1/rounds/1/attempts/1/log\""),
        "{body}"
    );
    let (code, _, body) = page(&service, "/issues/acme/widgets/99").await;
    assert_eq!(code, 404);
    assert!(body.contains("acme/widgets#99 is not known"), "{body}");
}

#[tokio::test]
async fn without_the_token_the_buttons_do_nothing() {
    let service = service().await;
    let (_, _, body) = page(&service, "/").await;
    assert!(body.contains("data-post=\"/api/issues/acme/widgets/1/cancel\""));
    let origin = format!("http://{}", service.addr);
    // What the page's script sends when no token was entered, and with a
    // wrong one: refused, and nothing changes.
    for auth in [None, Some("Bearer not-the-token")] {
        for path in [
            "/api/issues/acme/widgets/1/cancel",
            "/api/issues/acme/widgets/2/retry",
            "/api/resume",
        ] {
            let mut headers = vec![("origin", origin.as_str())];
            if let Some(auth) = auth {
                headers.push(("authorization", auth));
            }
            let (code, _) = service.post_with(path, &headers).await;
            assert_eq!(code, 401, "{path} with {auth:?}");
        }
    }
    assert_eq!(service.orchestrator.status().running.len(), 1);
    // With the token, the page's own request goes through the guard.
    let (code, body) = service
        .post_with(
            "/api/issues/acme/widgets/1/cancel",
            &[
                ("origin", origin.as_str()),
                ("authorization", &format!("Bearer {}", support::API_TOKEN)),
            ],
        )
        .await;
    assert_eq!(code, 200, "{body}");
}

/// The HTML of `<section id="{id}">`.
fn section<'a>(body: &'a str, id: &str) -> &'a str {
    let start = body
        .find(&format!("<section id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no section {id} in {body}"));
    let rest = &body[start..];
    &rest[..rest.find("</section>").unwrap()]
}

#[tokio::test]
async fn the_running_attempts_log_streams_as_it_grows_and_ends_with_the_attempt() {
    let logs = tempfile::tempdir().unwrap();
    let dir = logs.path().to_owned();
    let source = Arc::new(MemorySource::new([Issue::new(key(1), "Talks")]));
    let mut options = Options::new(source);
    options.behaviour = |_| Behaviour::Hold;
    let service = Service::start_with(options, |state| state.with_log_dir(dir)).await;
    service
        .wait_status("issue 1 running", |s| s.running.len() == 1)
        .await;
    // Where the subprocess runner would write it; this runner writes none.
    let log = claude_flow_core::runner::attempt_log_path(logs.path(), &key(1), 1, 1);
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::fs::write(&log, "line 1\n").unwrap();

    let mut events = service
        .http
        .get(service.url("/issues/acme/widgets/1/rounds/1/attempts/1/log"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut seen = String::new();
    let mut read_until = async |what: &str| {
        while !seen.contains(what) {
            let chunk = tokio::time::timeout(support::PATIENCE, events.chunk())
                .await
                .unwrap_or_else(|_| panic!("no {what:?} in {seen:?}"))
                .unwrap()
                .unwrap_or_else(|| panic!("the stream ended before {what:?}: {seen:?}"));
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    read_until("data: line 1\n").await;
    // A line written now arrives on the open stream, with its offset as id.
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut file, b"line 2\r\n").unwrap();
    read_until("data: line 2\n").await;
    read_until("id: 15\n").await;
    service.orchestrator.cancel(&key(1)).await.unwrap();
    read_until("event: end\n").await;
}

/// A source that ignored a trigger, as the GitHub source does for an
/// untrusted labeller.
struct Skipping(MemorySource);

#[async_trait::async_trait]
impl claude_flow_core::IssueSource for Skipping {
    async fn poll(&self) -> Result<Vec<Issue>, claude_flow_core::SourceError> {
        self.0.poll().await
    }
    async fn report(
        &self,
        issue: &Issue,
        report: &claude_flow_core::Report,
        reports: &mut claude_flow_core::Reports,
    ) -> Result<(), claude_flow_core::SourceError> {
        self.0.report(issue, report, reports).await
    }
    fn skipped(&self) -> Vec<claude_flow_core::issue_source::SkippedTrigger> {
        vec![claude_flow_core::issue_source::SkippedTrigger {
            issue: key(7),
            title: HOSTILE.into(),
            reason: "the label was applied by mallory, whose permission is read (write required)"
                .into(),
        }]
    }
}

#[tokio::test]
async fn skipped_triggers_show_with_their_reason() {
    let service = Service::start(Options::new(Arc::new(Skipping(MemorySource::default())))).await;
    service
        .wait_status("a poll", |s| !s.skipped.is_empty())
        .await;
    let (_, _, body) = page(&service, "/").await;
    let skipped = section(&body, "skipped");
    assert!(skipped.contains("acme/widgets#7"), "{skipped}");
    assert!(
        skipped.contains("applied by mallory, whose permission is read (write required)"),
        "{skipped}"
    );
    assert!(skipped.contains("&lt;script&gt;window.pwned"), "{skipped}");
    assert!(!skipped.contains("<script>"), "{skipped}");
}
