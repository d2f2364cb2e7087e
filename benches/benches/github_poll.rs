//! What polling costs GitHub: requests and rate-limit points per poll of a
//! repository with 1,000 open issues, against a local fake that answers
//! conditional requests as GitHub does (a matching ETag gets a 304, which
//! GitHub does not count against the rate limit).
//!
//! Run: `cargo bench -p claude-flow-benches --bench github_poll`.
//! Results: docs/BENCHMARKS.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use claude_flow_core::config::GithubConfig;
use claude_flow_core::{GithubSettings, GithubSource, IssueSource, Secret};
use serde_json::{Value, json};
use wiremock::matchers::{any, method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const OPEN_ISSUES: u64 = 1000;
const IDLE_POLLS: u32 = 20;

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../claude-flow-core/tests/fixtures/github/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("fixture");
    serde_json::from_str(&text).expect("fixture JSON")
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    not_modified: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::SeqCst),
            self.not_modified.load(Ordering::SeqCst),
        )
    }
}

/// The label-filtered issue list: `labeled` of the 1,000 open issues
/// carry the trigger label, 100 to a page, with an ETag per page.
struct IssueList {
    pages: Vec<(String, Value)>,
    base: String,
    counters: Arc<Counters>,
}

impl Respond for IssueList {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.counters.requests.fetch_add(1, Ordering::SeqCst);
        let page: usize = request
            .url
            .query_pairs()
            .find(|(k, _)| k == "page")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1);
        let Some((etag, body)) = self.pages.get(page - 1) else {
            return ResponseTemplate::new(200).set_body_json(json!([]));
        };
        let matches = request
            .headers
            .get("if-none-match")
            .is_some_and(|v| v.as_bytes() == etag.as_bytes());
        let mut answer = if matches {
            self.counters.not_modified.fetch_add(1, Ordering::SeqCst);
            ResponseTemplate::new(304)
        } else {
            ResponseTemplate::new(200).set_body_json(body)
        };
        answer = answer.insert_header("etag", etag.as_str());
        if page < self.pages.len() {
            let link = format!(
                "<{}/repositories/1/issues?page={}>; rel=\"next\"",
                self.base,
                page + 1
            );
            answer = answer.insert_header("link", link.as_str());
        }
        answer
    }
}

struct Counted(Arc<Counters>, ResponseTemplate);

impl Respond for Counted {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.0.requests.fetch_add(1, Ordering::SeqCst);
        self.1.clone()
    }
}

struct Report {
    labeled: u64,
    first: (u64, u64),
    idle: (u64, u64),
    idle_time: Duration,
}

async fn scenario(labeled: u64) -> Report {
    let server = MockServer::start().await;
    let counters = Arc::new(Counters::default());
    let base = server.uri();
    let template = fixture("issue.json");
    let issues: Vec<Value> = (1..=labeled)
        .map(|n| {
            let mut issue = template.clone();
            issue["number"] = json!(n);
            issue
        })
        .collect();
    let pages = issues
        .chunks(100)
        .enumerate()
        .map(|(i, chunk)| (format!("W/\"page-{i}\""), Value::Array(chunk.to_vec())))
        .collect();
    let list = IssueList {
        pages,
        base: base.clone(),
        counters: Arc::clone(&counters),
    };
    Mock::given(method("GET"))
        .and(path_regex(r"^/(repos/acme/widgets|repositories/1)/issues$"))
        .respond_with(list)
        .mount(&server)
        .await;
    let ok = |body: Value| {
        Counted(
            Arc::clone(&counters),
            ResponseTemplate::new(200).set_body_json(body),
        )
    };
    Mock::given(method("GET"))
        .and(path_regex(r"^/repos/acme/widgets/issues/\d+/timeline$"))
        .respond_with(ok(fixture("timeline.json")))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex(
            r"^/repos/acme/widgets/collaborators/.+/permission$",
        ))
        .respond_with(ok(fixture("collaborator-permission.json")))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/user"))
        .respond_with(ok(fixture("user.json")))
        .mount(&server)
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500))
        .with_priority(u8::MAX)
        .expect(0)
        .mount(&server)
        .await;

    let config = GithubConfig {
        api_url: base,
        repos: vec!["acme/widgets".parse().expect("repo")],
        ..GithubConfig::default()
    };
    let source = GithubSource::new(
        &config,
        Secret::new("bench-token"),
        GithubSettings::default(),
    )
    .expect("source");
    let found = source.poll().await.expect("first poll");
    assert_eq!(found.len() as u64, labeled);
    let first = counters.snapshot();
    let started = Instant::now();
    for _ in 0..IDLE_POLLS {
        source.poll().await.expect("idle poll");
    }
    let idle_time = started.elapsed() / IDLE_POLLS;
    let (requests, not_modified) = counters.snapshot();
    Report {
        labeled,
        first,
        idle: (
            (requests - first.0) / u64::from(IDLE_POLLS),
            (not_modified - first.1) / u64::from(IDLE_POLLS),
        ),
        idle_time,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "GitHub polling cost, one repository with {OPEN_ISSUES} open issues (points: requests GitHub counts, i.e. all but 304s)"
    );
    println!(
        "{:>22} | {:>14} | {:>12} | {:>13} | {:>11} | {:>14}",
        "issues with trigger",
        "first: reqs",
        "first: pts",
        "idle: reqs",
        "idle: pts",
        "idle poll time"
    );
    for labeled in [3, 100, OPEN_ISSUES] {
        let r = runtime.block_on(scenario(labeled));
        println!(
            "{:>22} | {:>14} | {:>12} | {:>13} | {:>11} | {:>14?}",
            r.labeled,
            r.first.0,
            r.first.0 - r.first.1,
            r.idle.0,
            r.idle.0 - r.idle.1,
            r.idle_time
        );
    }
}
