//! A fake GitHub for the source's tests: wiremock with a catch-all that
//! fails the test on any request it did not expect, and builders that
//! shape answers from the recorded fixtures.

// Test helpers: a panic here is a failed test, as in the tests themselves.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use claude_flow_core::config::GithubConfig;
use claude_flow_core::{GithubSettings, GithubSource, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub const TOKEN: &str = "ghp_TestTokenThatMustNeverLeak0123456789";
pub const REPO: &str = "/repos/acme/widgets";
pub const OWN_LOGIN: &str = "claude-flow-svc";

/// A recorded GitHub answer, read once per test binary.
pub fn fixture(name: &str) -> Value {
    static READ: Mutex<BTreeMap<String, Value>> = Mutex::new(BTreeMap::new());
    let mut read = READ
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    read.entry(name.to_owned())
        .or_insert_with(|| {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/github")
                .join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .clone()
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

/// What [`HeldTimelines`] saw.
#[derive(Default)]
pub struct HeldStats {
    /// Timeline requests being answered now.
    pub open: AtomicUsize,
    /// The most that were ever open at once.
    pub peak: AtomicUsize,
    /// Requests per `METHOD /path`.
    pub requests: Mutex<BTreeMap<String, usize>>,
    /// Requests the fake does not know.
    pub unexpected: Mutex<Vec<String>>,
}

/// A fake GitHub on a plain socket, for what wiremock cannot do (its
/// answers are chosen synchronously on one thread): the answers to
/// timeline requests are held until `hold_until` of them are open at
/// once, then every request is answered at once. A source that examines
/// issues one after another never gets its first timeline, and the test
/// fails on its own timeout instead of measuring wall-clock time.
///
/// It lists issues 1..=`count` (oldest first), each labeled by
/// `labeler(n)`, who has write permission.
pub struct HeldTimelines {
    pub uri: String,
    pub stats: Arc<HeldStats>,
}

impl HeldTimelines {
    pub async fn start(count: u64, hold_until: usize, labeler: fn(u64) -> String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let stats = Arc::new(HeldStats::default());
        let (gate, opened) = tokio::sync::watch::channel(false);
        let gate = Arc::new(gate);
        let list: Value = (1..=count)
            .map(|n| issue(n, &["claude-flow"], "2025-03-11T10:03:00Z"))
            .collect();
        let list = Arc::new(list.to_string());
        let shared = Arc::clone(&stats);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let stats = Arc::clone(&shared);
                let gate = Arc::clone(&gate);
                let mut opened = opened.clone();
                let list = Arc::clone(&list);
                tokio::spawn(async move {
                    let Some((mut socket, method, target)) = read_request_head(socket).await else {
                        return;
                    };
                    let path = target.split('?').next().unwrap_or_default().to_owned();
                    *stats
                        .requests
                        .lock()
                        .unwrap()
                        .entry(format!("{method} {path}"))
                        .or_default() += 1;
                    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                    let body = match (method.as_str(), segments.as_slice()) {
                        ("GET", ["user"]) => fixture("user.json").to_string(),
                        ("GET", ["repos", "acme", "widgets", "issues"]) => list.as_str().to_owned(),
                        ("GET", ["repos", "acme", "widgets", "issues", n, "timeline"]) => {
                            let n: u64 = n.parse().unwrap();
                            let now = stats.open.fetch_add(1, Ordering::SeqCst) + 1;
                            stats.peak.fetch_max(now, Ordering::SeqCst);
                            if now >= hold_until {
                                gate.send_replace(true);
                            }
                            let _ = opened.wait_for(|open| *open).await;
                            stats.open.fetch_sub(1, Ordering::SeqCst);
                            timeline(&labeler(n), 1000 + n).to_string()
                        }
                        (
                            "GET",
                            [
                                "repos",
                                "acme",
                                "widgets",
                                "collaborators",
                                login,
                                "permission",
                            ],
                        ) => {
                            let mut answer = fixture("collaborator-permission.json");
                            answer["user"]["login"] = json!(login);
                            answer["permission"] = json!("write");
                            answer["role_name"] = json!("write");
                            answer.to_string()
                        }
                        _ => {
                            stats
                                .unexpected
                                .lock()
                                .unwrap()
                                .push(format!("{method} {target}"));
                            let _ = socket
                                .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .await;
                            return;
                        }
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(body.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { uri, stats }
    }

    /// How many times `METHOD /path` was asked.
    pub fn count(&self, request: &str) -> usize {
        self.stats
            .requests
            .lock()
            .unwrap()
            .get(request)
            .copied()
            .unwrap_or(0)
    }
}

/// The request line of the first request on `socket` (GET requests have no
/// body to read).
async fn read_request_head(
    mut socket: tokio::net::TcpStream,
) -> Option<(tokio::net::TcpStream, String, String)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut line = text.lines().next()?.split(' ');
    let method = line.next()?.to_owned();
    let target = line.next()?.to_owned();
    Some((socket, method, target))
}
