//! A fake GitHub for the source's tests: wiremock with a catch-all that
//! fails the test on any request it did not expect, and builders that
//! shape answers from the recorded fixtures.

// Test helpers: a panic here is a failed test, as in the tests themselves.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use claude_flow_core::config::GithubConfig;
use claude_flow_core::{GithubSettings, GithubSource, Secret};
use serde_json::{Value, json};
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub const TOKEN: &str = "ghp_TestTokenThatMustNeverLeak0123456789";
pub const REPO: &str = "/repos/acme/widgets";
pub const OWN_LOGIN: &str = "claude-flow-svc";

pub fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/github")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Waits short enough for tests, long enough to tell waiting from not.
pub fn fast_settings() -> GithubSettings {
    GithubSettings {
        timeout: Duration::from_secs(10),
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        secondary_base: Duration::from_millis(300),
        secondary_max: Duration::from_secs(2),
        max_wait: Duration::from_secs(30),
        write_spacing: Duration::ZERO,
        ..GithubSettings::default()
    }
}

pub fn config(api_url: &str) -> GithubConfig {
    GithubConfig {
        api_url: api_url.to_owned(),
        repos: vec!["acme/widgets".parse().unwrap()],
        ..GithubConfig::default()
    }
}

pub struct Fake {
    pub server: MockServer,
}

impl Fake {
    /// A server that knows only `GET /user` and fails on anything else.
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        Mock::given(any())
            .respond_with(ResponseTemplate::new(500).set_body_string("unexpected request"))
            .with_priority(u8::MAX)
            .named("catch-all: a request the test did not expect")
            .expect(0)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/user"))
            .respond_with(ResponseTemplate::new(200).set_body_json(fixture("user.json")))
            .named("GET /user")
            .mount(&server)
            .await;
        Self { server }
    }

    pub fn source(&self) -> GithubSource {
        self.source_with(config(&self.server.uri()), fast_settings())
    }

    pub fn source_with(&self, config: GithubConfig, settings: GithubSettings) -> GithubSource {
        GithubSource::new(&config, Secret::new(TOKEN), settings).unwrap()
    }

    /// Requests received, as `METHOD /path`, without `GET /user`.
    pub async fn requests(&self) -> Vec<String> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| format!("{} {}", r.method, r.url.path()))
            .filter(|r| r != "GET /user")
            .collect()
    }

    pub async fn bodies(&self, method_and_path: &str) -> Vec<Value> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| format!("{} {}", r.method, r.url.path()) == method_and_path)
            .map(|r| serde_json::from_slice(&r.body).unwrap_or(Value::Null))
            .collect()
    }

    /// `GET /repos/acme/widgets/issues` answers `issues`.
    pub async fn list(&self, issues: Vec<Value>) {
        Mock::given(method("GET"))
            .and(path(format!("{REPO}/issues")))
            .respond_with(ResponseTemplate::new(200).set_body_json(Value::Array(issues)))
            .named("issue list")
            .mount(&self.server)
            .await;
    }

    /// The timeline of issue `n`: the fixture, ending with a labeling of
    /// the trigger by `actor`.
    pub async fn timeline(&self, n: u64, actor: &str, event_id: u64) {
        Mock::given(method("GET"))
            .and(path(format!("{REPO}/issues/{n}/timeline")))
            .respond_with(ResponseTemplate::new(200).set_body_json(timeline(actor, event_id)))
            .named(format!("timeline of #{n}"))
            .expect(1..)
            .mount(&self.server)
            .await;
    }

    pub async fn permission(&self, login: &str, permission: &str, role: &str) {
        let mut answer = fixture("collaborator-permission.json");
        answer["permission"] = json!(permission);
        answer["role_name"] = json!(role);
        answer["user"]["login"] = json!(login);
        Mock::given(method("GET"))
            .and(path(format!("{REPO}/collaborators/{login}/permission")))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer))
            .named(format!("permission of {login}"))
            .mount(&self.server)
            .await;
    }
}

/// Issue `n` of the fixture's shape with the given labels.
pub fn issue(n: u64, labels: &[&str], updated_at: &str) -> Value {
    let mut issue = fixture("issue.json");
    let label = issue["labels"][1].clone();
    issue["number"] = json!(n);
    issue["title"] = json!(format!("Issue number {n}"));
    issue["html_url"] = json!(format!("https://github.com/acme/widgets/issues/{n}"));
    issue["url"] = json!(format!(
        "https://api.github.com/repos/acme/widgets/issues/{n}"
    ));
    issue["updated_at"] = json!(updated_at);
    issue["labels"] = labels
        .iter()
        .map(|name| {
            let mut l = label.clone();
            l["name"] = json!(name);
            l
        })
        .collect();
    issue
}

/// A pull request, as the issues list includes them.
pub fn pull_request(n: u64) -> Value {
    let mut pr = issue(n, &["claude-flow"], "2025-03-11T10:00:00Z");
    pr["html_url"] = json!(format!("https://github.com/acme/widgets/pull/{n}"));
    pr["pull_request"] = json!({
        "url": format!("https://api.github.com/repos/acme/widgets/pulls/{n}"),
        "html_url": format!("https://github.com/acme/widgets/pull/{n}"),
        "diff_url": format!("https://github.com/acme/widgets/pull/{n}.diff"),
        "patch_url": format!("https://github.com/acme/widgets/pull/{n}.patch"),
        "merged_at": null
    });
    pr
}

/// The fixture's timeline with its last `labeled` event (of the trigger)
/// made by `actor`, with id `event_id`.
pub fn timeline(actor: &str, event_id: u64) -> Value {
    let mut events = fixture("timeline.json");
    let last = events.as_array_mut().unwrap().last_mut().unwrap();
    assert_eq!(last["event"], "labeled");
    last["id"] = json!(event_id);
    last["actor"]["login"] = json!(actor);
    let kind = if actor.ends_with("[bot]") {
        "Bot"
    } else {
        "User"
    };
    last["actor"]["type"] = json!(kind);
    events
}

/// The trigger the source reports for a fixture timeline.
pub fn trigger(event_id: u64) -> String {
    format!("labeled:{event_id}@2025-03-11T10:02:06Z")
}

/// Answers with each template in turn, the last one forever, and records
/// when each request arrived.
#[derive(Clone)]
pub struct Sequence {
    templates: Arc<Vec<ResponseTemplate>>,
    next: Arc<AtomicUsize>,
    pub times: Arc<Mutex<Vec<SystemTime>>>,
}

impl Sequence {
    pub fn new(templates: Vec<ResponseTemplate>) -> Self {
        Self {
            templates: Arc::new(templates),
            next: Arc::new(AtomicUsize::new(0)),
            times: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn times(&self) -> Vec<SystemTime> {
        self.times.lock().unwrap().clone()
    }
}

impl Respond for Sequence {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.times.lock().unwrap().push(SystemTime::now());
        let i = self.next.fetch_add(1, Ordering::SeqCst);
        self.templates[i.min(self.templates.len() - 1)].clone()
    }
}
