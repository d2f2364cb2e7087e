//! A fake GitHub that keeps state: labels come and go as the service
//! writes them, comments are created and edited, and an issue leaves the
//! list of labeled issues once its trigger label is removed, as on GitHub.
//! Every answer is shaped from the project's recorded fixtures
//! (`claude-flow-core/tests/fixtures/github`). It notes every list request
//! (when) and every request it did not expect.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// The one repository the daemons watch.
pub const REPO: &str = "acme/widgets";
/// The status labels of CONTRACT section 3, by default.
pub const TRIGGER: &str = "claude-flow";
pub const IN_PROGRESS: &str = "claude-flow:in-progress";
pub const DONE: &str = "claude-flow:done";
/// Who applied the trigger label (write permission).
const LABELER: &str = "alice-maintainer";
/// What the success report's status comment says (report.rs, `succeeded`).
const SUCCESS_TEXT: &str = "**claude-flow** finished";

fn fixture(name: &str) -> Value {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../claude-flow-core/tests/fixtures/github")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

#[derive(Debug)]
struct FakeIssue {
    labels: Vec<String>,
    /// Moves with every change, as GitHub's `updated_at` does.
    revision: u64,
}

#[derive(Debug)]
struct FakeComment {
    issue: u64,
    body: String,
}

#[derive(Debug, Default)]
struct State {
    issues: BTreeMap<u64, FakeIssue>,
    comments: BTreeMap<u64, FakeComment>,
    next_comment: u64,
    revision: u64,
    lists: Vec<SystemTime>,
    unexpected: Vec<String>,
}

/// The fake's server and what it holds.
pub struct FakeGithub {
    server: MockServer,
    state: Arc<Mutex<State>>,
}

/// An issue as the fake shows it now.
#[derive(Debug, Clone)]
pub struct IssueView {
    pub labels: Vec<String>,
    /// Bodies of the service's comments on the issue.
    pub comments: Vec<String>,
}

impl IssueView {
    /// Whether the issue carries `label`.
    pub fn has(&self, label: &str) -> bool {
        self.labels.iter().any(|l| l == label)
    }

    /// The comments that report success.
    pub fn success_comments(&self) -> usize {
        self.comments
            .iter()
            .filter(|c| c.contains(SUCCESS_TEXT))
            .count()
    }

    /// Settled as the success report leaves it: the comment, `done`, and
    /// neither the trigger nor `in_progress`.
    pub fn settled_done(&self) -> bool {
        self.has(DONE)
            && !self.has(TRIGGER)
            && !self.has(IN_PROGRESS)
            && self.success_comments() >= 1
    }
}

impl FakeGithub {
    /// Issues `1..=count` of [`REPO`], each carrying the trigger label
    /// applied by a maintainer with write permission.
    pub async fn start(count: u64) -> Self {
        let mut state = State {
            next_comment: 4_000_000,
            ..State::default()
        };
        for n in 1..=count {
            state.issues.insert(
                n,
                FakeIssue {
                    labels: vec![TRIGGER.to_owned()],
                    revision: 0,
                },
            );
        }
        let state = Arc::new(Mutex::new(state));
        // The fake records what it needs itself.
        let server = MockServer::builder()
            .disable_request_recording()
            .start()
            .await;
        Mock::given(any())
            .respond_with(Handler(state.clone()))
            .named("the stateful fake GitHub")
            .mount(&server)
            .await;
        Self { server, state }
    }

    /// The base URL, for `github.api_url`.
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Every issue as it is now, by number.
    pub fn issues(&self) -> BTreeMap<u64, IssueView> {
        let state = self.state();
        state
            .issues
            .iter()
            .map(|(n, issue)| {
                let comments = state
                    .comments
                    .values()
                    .filter(|c| c.issue == *n)
                    .map(|c| c.body.clone())
                    .collect();
                (
                    *n,
                    IssueView {
                        labels: issue.labels.clone(),
                        comments,
                    },
                )
            })
            .collect()
    }

    /// How many issues are settled done.
    pub fn settled_done(&self) -> usize {
        self.issues().values().filter(|i| i.settled_done()).count()
    }

    /// When each list request (`GET /repos/<o>/<r>/issues`) came.
    pub fn lists(&self) -> Vec<SystemTime> {
        self.state().lists.clone()
    }

    /// Requests the fake did not expect (answered 500).
    pub fn unexpected(&self) -> Vec<String> {
        self.state().unexpected.clone()
    }
}

struct Handler(Arc<Mutex<State>>);

impl Respond for Handler {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut state = lock(&self.0);
        match state.answer(request) {
            Some(answer) => answer,
            None => {
                let what = format!("{} {}", request.method, request.url);
                state.unexpected.push(what.clone());
                ResponseTemplate::new(500).set_body_string(format!("unexpected request: {what}"))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn json_answer(status: u16, body: Value) -> Option<ResponseTemplate> {
    Some(ResponseTemplate::new(status).set_body_json(body))
}

fn not_found() -> Option<ResponseTemplate> {
    json_answer(
        404,
        json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest"}),
    )
}

/// `%3A` and friends, as a path segment may carry them.
fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `updated_at` for a revision: any distinct value will do, the service
/// compares them for equality.
fn timestamp(revision: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_741_687_326 + revision);
    humantime::format_rfc3339_seconds(at).to_string()
}

impl State {
    fn touch(&mut self, n: u64) {
        self.revision += 1;
        let revision = self.revision;
        if let Some(issue) = self.issues.get_mut(&n) {
            issue.revision = revision;
        }
    }

    fn answer(&mut self, request: &Request) -> Option<ResponseTemplate> {
        let segments: Vec<String> = request.url.path_segments()?.map(decode).collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let method = request.method.as_str();
        if segments == ["user"] && method == "GET" {
            return json_answer(200, fixture("user.json"));
        }
        let (owner, name) = REPO.split_once('/')?;
        let ["repos", o, r, rest @ ..] = segments.as_slice() else {
            return None;
        };
        if (*o, *r) != (owner, name) {
            return None;
        }
        let number = |s: &str| s.parse::<u64>().ok();
        match (method, rest) {
            ("GET", ["issues"]) => {
                self.lists.push(SystemTime::now());
                Some(self.list(request))
            }
            ("GET", ["issues", n, "timeline"]) => {
                let n = number(n)?;
                if !self.issues.contains_key(&n) {
                    return not_found();
                }
                json_answer(200, timeline(n))
            }
            ("GET", ["collaborators", login, "permission"]) if *login == LABELER => {
                json_answer(200, fixture("collaborator-permission.json"))
            }
            ("GET", ["issues", n, "comments"]) => {
                let n = number(n)?;
                let comments: Vec<Value> = self
                    .comments
                    .iter()
                    .filter(|(_, c)| c.issue == n)
                    .map(|(id, c)| comment_json(*id, c))
                    .collect();
                json_answer(200, Value::Array(comments))
            }
            ("POST", ["issues", n, "comments"]) => {
                let n = number(n)?;
                let body = request.body_json::<Value>().ok()?["body"]
                    .as_str()?
                    .to_owned();
                if !self.issues.contains_key(&n) {
                    return not_found();
                }
                self.next_comment += 1;
                let id = self.next_comment;
                let comment = FakeComment { issue: n, body };
                let answer = comment_json(id, &comment);
                self.comments.insert(id, comment);
                self.touch(n);
                json_answer(201, answer)
            }
            ("PATCH", ["issues", "comments", id]) => {
                let id = number(id)?;
                let body = request.body_json::<Value>().ok()?["body"]
                    .as_str()?
                    .to_owned();
                let Some(comment) = self.comments.get_mut(&id) else {
                    return not_found();
                };
                comment.body = body;
                let (n, answer) = (comment.issue, comment_json(id, comment));
                self.touch(n);
                json_answer(200, answer)
            }
            ("POST", ["issues", n, "labels"]) => {
                let n = number(n)?;
                let wanted = request.body_json::<Value>().ok()?["labels"].clone();
                let issue = self.issues.get_mut(&n)?;
                for label in wanted.as_array()? {
                    let label = label.as_str()?.to_owned();
                    if !issue.labels.contains(&label) {
                        issue.labels.push(label);
                    }
                }
                let labels = labels_json(&issue.labels);
                self.touch(n);
                json_answer(200, labels)
            }
            ("DELETE", ["issues", n, "labels", label]) => {
                let n = number(n)?;
                let issue = self.issues.get_mut(&n)?;
                let before = issue.labels.len();
                issue.labels.retain(|l| l != label);
                if issue.labels.len() == before {
                    return json_answer(404, json!({"message": "Label does not exist"}));
                }
                let labels = labels_json(&issue.labels);
                self.touch(n);
                json_answer(200, labels)
            }
            _ => None,
        }
    }

    /// The open issues carrying the label the query asks for, oldest
    /// first, in one page.
    fn list(&self, request: &Request) -> ResponseTemplate {
        let label = request
            .url
            .query_pairs()
            .find(|(k, _)| k == "labels")
            .map(|(_, v)| v.into_owned());
        let issues: Vec<Value> = self
            .issues
            .iter()
            .filter(|(_, i)| label.as_ref().is_none_or(|l| i.labels.contains(l)))
            .map(|(n, i)| issue_json(*n, i))
            .collect();
        ResponseTemplate::new(200).set_body_json(Value::Array(issues))
    }
}

fn labels_json(names: &[String]) -> Value {
    // Keep the label's full shape; only its name changes.
    let template = fixture("issue.json")["labels"][1].clone();
    Value::Array(
        names
            .iter()
            .map(|name| {
                let mut label = template.clone();
                label["name"] = json!(name);
                label
            })
            .collect(),
    )
}

fn issue_json(n: u64, issue: &FakeIssue) -> Value {
    let mut value = fixture("issue.json");
    value["number"] = json!(n);
    value["id"] = json!(2_873_310_000_u64 + n);
    value["title"] = json!(format!("Widget problem number {n}"));
    value["html_url"] = json!(format!("https://github.com/{REPO}/issues/{n}"));
    value["url"] = json!(format!("https://api.github.com/repos/{REPO}/issues/{n}"));
    value["labels"] = labels_json(&issue.labels);
    value["updated_at"] = json!(timestamp(issue.revision));
    value
}

/// The recorded timeline, whose last event is the trigger's application
/// by the maintainer (an id of its own per issue).
fn timeline(n: u64) -> Value {
    let mut timeline = fixture("timeline.json");
    if let Some(last) = timeline.as_array_mut().and_then(|t| t.last_mut()) {
        last["id"] = json!(16_000_000 + n);
        last["actor"]["login"] = json!(LABELER);
    }
    timeline
}

fn comment_json(id: u64, comment: &FakeComment) -> Value {
    let mut value = fixture("comment.json");
    value["id"] = json!(id);
    value["body"] = json!(comment.body);
    value["html_url"] = json!(format!(
        "https://github.com/{REPO}/issues/{}#issuecomment-{id}",
        comment.issue
    ));
    value
}
