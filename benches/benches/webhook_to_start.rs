//! Webhook to start: the real `claude-flow-daemon` (release build) with
//! the GitHub source against a fake GitHub in this process. The first
//! poll finds no labeled issue; then the fake lists one, labeled by a
//! user with write permission, and the bench sends the signed `issues`
//! `labeled` delivery GitHub would send, and measures from sending it to
//! the workflow's start (the workflow's first act is to write the time).
//!
//! Several fresh daemons, several fresh issues each: the first issue of a
//! daemon includes the labeler's permission lookup, later ones find it
//! cached. Twice: with GitHub's writes (labels, comments) answered at
//! once, and with every write taking 2 s, to show that the reports the
//! service makes do not hold up the next start.
//!
//! Run: `cargo bench -p claude-flow-benches --bench webhook_to_start`
//! (it builds the release binaries first). Results: docs/BENCHMARKS.md.

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use support::{ms, spread, terminate};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const SECRET: &str = "bench webhook secret";
const TRIGGER: &str = "claude-flow";
const LABELER: &str = "alice-maintainer";
const DAEMONS: usize = 5;
const ISSUES_PER_DAEMON: u64 = 4;
/// Between one issue's start and the next delivery: the first issue's
/// reports are still being written (one write a second) when the next
/// delivery comes.
const BETWEEN: Duration = Duration::from_millis(500);
const SLOW_WRITE: Duration = Duration::from_secs(2);
/// The workflow's first act: write the time it started.
const WORKFLOW: &str = "date +%s%N > \"$BENCH_OUT/$CLAUDE_FLOW_ISSUE_NUMBER\"";

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../claude-flow-core/tests/fixtures/github/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Issue `n` as GitHub lists it, carrying the trigger label.
fn issue(n: u64) -> Value {
    let mut issue = fixture("issue.json");
    let mut label = issue["labels"][0].clone();
    label["name"] = json!(TRIGGER);
    issue["number"] = json!(n);
    issue["title"] = json!(format!("Bench issue {n}"));
    issue["labels"] = json!([label]);
    issue["html_url"] = json!(format!("https://github.com/acme/widgets/issues/{n}"));
    issue["url"] = json!(format!(
        "https://api.github.com/repos/acme/widgets/issues/{n}"
    ));
    issue["updated_at"] = json!(format!("2025-03-11T10:{:02}:{:02}Z", n / 60 % 60, n % 60));
    issue
}

/// The timeline of issue `n`: the recorded one, whose last event is the
/// trigger's labeling, by [`LABELER`].
fn timeline(n: u64) -> Value {
    let mut events = fixture("timeline.json");
    let last = events.as_array_mut().unwrap().last_mut().unwrap();
    assert_eq!(last["event"], "labeled");
    assert_eq!(last["label"]["name"], TRIGGER);
    last["id"] = json!(90_000_000 + n);
    last["actor"]["login"] = json!(LABELER);
    events
}

fn delivery(n: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "action": "labeled",
        "issue": issue(n),
        "label": {"name": TRIGGER, "color": "5319e7"},
        "repository": {"id": 1, "name": "widgets", "full_name": "acme/widgets", "private": false},
        "sender": {"login": LABELER, "type": "User"},
    }))
    .unwrap()
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Default)]
struct FakeState {
    /// The issues listed as open and labeled.
    listed: Vec<Value>,
    /// Changes with `listed`: the list's ETag.
    version: u64,
    /// Every request: when it arrived, and `METHOD /path`.
    log: Vec<(SystemTime, String)>,
    unexpected: Vec<String>,
}

/// A fake GitHub answering what the GitHub source asks: the issue list
/// (with ETags, so that an unchanged list is a 304), timelines,
/// permissions, `GET /user`, and the writes of its reports.
#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
    write_delay: Duration,
}

impl Fake {
    fn label(&self, n: u64) {
        let mut state = self.state.lock().unwrap();
        state.listed.push(issue(n));
        state.version += 1;
    }

    /// When `what` (`METHOD /path`) was first asked at or after `since`.
    fn asked(&self, what: &str, since: SystemTime) -> Option<SystemTime> {
        let state = self.state.lock().unwrap();
        state
            .log
            .iter()
            .find(|(t, r)| *t >= since && r == what)
            .map(|(t, _)| *t)
    }

    fn writes(&self) -> usize {
        let state = self.state.lock().unwrap();
        state
            .log
            .iter()
            .filter(|(_, r)| !r.starts_with("GET "))
            .count()
    }
}

impl Respond for Fake {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let method = request.method.to_string();
        let path = request.url.path().to_owned();
        let mut state = self.state.lock().unwrap();
        state
            .log
            .push((SystemTime::now(), format!("{method} {path}")));
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let ok = |body: Value| ResponseTemplate::new(200).set_body_json(body);
        let write = |status: u16, body: Value| {
            ResponseTemplate::new(status)
                .set_body_json(body)
                .set_delay(self.write_delay)
        };
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["user"]) => ok(fixture("user.json")),
            ("GET", ["repos", "acme", "widgets", "issues"]) => {
                let etag = format!("W/\"list-{}\"", state.version);
                let unchanged = request
                    .headers
                    .get("if-none-match")
                    .is_some_and(|v| v.as_bytes() == etag.as_bytes());
                let answer = if unchanged {
                    ResponseTemplate::new(304)
                } else {
                    ok(Value::Array(state.listed.clone()))
                };
                answer.insert_header("etag", etag.as_str())
            }
            ("GET", ["repos", "acme", "widgets", "issues", n, "timeline"]) => {
                ok(timeline(n.parse().unwrap()))
            }
            ("GET", ["repos", "acme", "widgets", "issues", n]) => ok(issue(n.parse().unwrap())),
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
                answer["permission"] = json!("write");
                answer["role_name"] = json!("write");
                answer["user"]["login"] = json!(login);
                ok(answer)
            }
            ("GET", ["repos", "acme", "widgets", "issues", _, "comments"]) => ok(json!([])),
            ("POST", ["repos", "acme", "widgets", "issues", _, "labels"])
            | ("DELETE", ["repos", "acme", "widgets", "issues", _, "labels", _]) => {
                write(200, json!([]))
            }
            ("POST", ["repos", "acme", "widgets", "issues", n, "comments"]) => {
                let mut comment = fixture("comment.json");
                comment["id"] = json!(n.parse::<u64>().unwrap() * 1000);
                write(201, comment)
            }
            ("PATCH", ["repos", "acme", "widgets", "issues", "comments", id]) => {
                let mut comment = fixture("comment.json");
                comment["id"] = json!(id.parse::<u64>().unwrap());
                write(200, comment)
            }
            _ => {
                state.unexpected.push(format!("{method} {path}"));
                ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"}))
            }
        }
    }
}

struct Daemon {
    child: Child,
    port: u16,
    out: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(bin: &Path, api_url: &str) -> Self {
        let dir = support::run_dir();
        let out = dir.path().join("started");
        std::fs::create_dir(&out).unwrap();
        // A free port: taken, read and given back.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = json!({
            "source": "github",
            "github": {
                "api_url": api_url,
                "token": "bench-token",
                "repos": ["acme/widgets"],
                "webhook_secret": SECRET,
            },
            "workflow": {
                "command": ["sh", "-c", WORKFLOW],
                "env": {"BENCH_OUT": out},
            },
            "service": {
                "state_dir": "state",
                "poll_interval": "1h",
                "listen": format!("127.0.0.1:{port}"),
                "shutdown_grace": "1s",
            },
            // The default level; JSON for the timestamps.
            "log": {"level": "info", "format": "json"},
        });
        let path = dir.path().join("config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new(bin.join("claude-flow-daemon"))
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child,
            port,
            out,
            dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Waits until `/healthz` shows that the first poll has ended.
    async fn first_poll(&self, http: &reqwest::Client) {
        let start = Instant::now();
        loop {
            let health: Option<Value> = match http.get(self.url("/healthz")).send().await {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            if let Some(h) = health
                && !h["last_poll"].is_null()
            {
                assert_eq!(h["last_poll"]["ready"], 0, "{h}");
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no first poll: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// When the workflow for issue `n` started, by its own clock reading.
    async fn started(&self, n: u64) -> SystemTime {
        let file = self.out.join(n.to_string());
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Ok(nanos) = text.trim().parse::<u64>()
            {
                return UNIX_EPOCH + Duration::from_nanos(nanos);
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "issue {n} never started: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn stop(mut self) {
        terminate(&self.child);
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(15) {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One measurement: milliseconds from sending the delivery to each step.
struct Sample {
    n: u64,
    sent: SystemTime,
    cold: bool,
    answered: f64,
    list: Option<f64>,
    timeline: Option<f64>,
    permission: Option<f64>,
    /// The daemon's log: the loop has the poll's result ("new issue").
    admitted: Option<f64>,
    /// The daemon's log: the start is durable, the spawn comes next
    /// ("workflow starting").
    spawning: Option<f64>,
    start: f64,
    /// The same workflow command spawned by the bench itself right after:
    /// what starting a process costs on the machine at that moment.
    baseline: f64,
    /// A line appended and `fdatasync`ed beside the daemon's state, right
    /// after: what one durable write costs at that moment.
    sync: f64,
}

async fn one_daemon(bin: &Path, http: &reqwest::Client, write_delay: Duration) -> Vec<Sample> {
    let server = MockServer::start().await;
    let fake = Fake {
        state: Arc::default(),
        write_delay,
    };
    Mock::given(any())
        .respond_with(fake.clone())
        .mount(&server)
        .await;
    let daemon = Daemon::start(bin, &server.uri());
    daemon.first_poll(http).await;
    let mut samples: Vec<Sample> = Vec::new();
    for i in 0..ISSUES_PER_DAEMON {
        let n = 100 + i;
        fake.label(n);
        let body = delivery(n);
        let signature = sign(&body);
        let sent = SystemTime::now();
        let response = http
            .post(daemon.url("/webhook"))
            .header("x-github-event", "issues")
            .header("x-github-delivery", format!("bench-delivery-{n}"))
            .header("x-hub-signature-256", signature)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let answered = sent.elapsed().unwrap();
        assert_eq!(
            response.status().as_u16(),
            202,
            "{:?}",
            response.text().await
        );
        let started = daemon.started(n).await;
        let after = |t: SystemTime| ms(t.duration_since(sent).unwrap_or_default());
        let issue_path = format!("/repos/acme/widgets/issues/{n}");
        let baseline = baseline_spawn(&daemon.out, n);
        let sync = baseline_sync(daemon.dir.path());
        samples.push(Sample {
            n,
            sent,
            admitted: None,
            spawning: None,
            baseline,
            sync,
            cold: i == 0,
            answered: ms(answered),
            list: fake
                .asked("GET /repos/acme/widgets/issues", sent)
                .map(after),
            timeline: fake
                .asked(&format!("GET {issue_path}/timeline"), sent)
                .map(after),
            permission: fake
                .asked(
                    &format!("GET /repos/acme/widgets/collaborators/{LABELER}/permission"),
                    sent,
                )
                .map(after),
            start: after(started),
        });
        tokio::time::sleep(BETWEEN).await;
    }
    let log = daemon.log();
    for (i, s) in samples.iter_mut().enumerate() {
        let logged = |message: &str| {
            let issue = format!("acme/widgets#{}\"", s.n);
            log.lines()
                .filter(|l| l.contains(message) && l.contains(&issue))
                .find_map(|l| {
                    let line: Value = serde_json::from_str(l).ok()?;
                    humantime::parse_rfc3339_weak(line["timestamp"].as_str()?).ok()
                })
                .map(|t| ms(t.duration_since(s.sent).unwrap_or_default()))
        };
        s.admitted = logged("new issue");
        s.spawning = logged("workflow starting");
        let step = |t: Option<f64>| t.map_or("-".into(), |t| format!("{t:.1}"));
        println!(
            "  writes {:>4} ms, issue {}: answered {:.1}, list {}, timeline {}, permission {}, admitted {}, spawning {}, started {:.1} ms; baseline spawn {:.1} ms, sync {:.1} ms",
            write_delay.as_millis(),
            i + 1,
            s.answered,
            step(s.list),
            step(s.timeline),
            step(s.permission),
            step(s.admitted),
            step(s.spawning),
            s.start,
            s.baseline,
            s.sync
        );
    }
    let writes = fake.writes();
    daemon.stop();
    let unexpected = std::mem::take(&mut fake.state.lock().unwrap().unexpected);
    assert!(
        unexpected.is_empty(),
        "requests the fake does not know: {unexpected:?}"
    );
    assert!(writes > 0, "the service wrote nothing back to GitHub");
    samples
}

fn report(name: &str, samples: &[Sample]) {
    let line = |what: &str, values: Vec<f64>| {
        if values.is_empty() {
            return;
        }
        let s = spread(&values);
        println!(
            "  {what:<34} min {:>7.1} ms  median {:>7.1} ms  max {:>7.1} ms  (n = {})",
            s.min,
            s.median,
            s.max,
            values.len()
        );
    };
    println!("## {name}: signed `issues` `labeled` delivery -> workflow started");
    line(
        "all issues: start",
        samples.iter().map(|s| s.start).collect(),
    );
    line(
        "first issue of a daemon: start",
        samples.iter().filter(|s| s.cold).map(|s| s.start).collect(),
    );
    line(
        "later issues: start",
        samples
            .iter()
            .filter(|s| !s.cold)
            .map(|s| s.start)
            .collect(),
    );
    println!("  steps, ms after sending (all issues):");
    line(
        "webhook answered (202)",
        samples.iter().map(|s| s.answered).collect(),
    );
    line(
        "issue list asked",
        samples.iter().filter_map(|s| s.list).collect(),
    );
    line(
        "timeline asked",
        samples.iter().filter_map(|s| s.timeline).collect(),
    );
    line(
        "permission asked (first issues)",
        samples.iter().filter_map(|s| s.permission).collect(),
    );
    line(
        "loop has the poll (\"new issue\")",
        samples.iter().filter_map(|s| s.admitted).collect(),
    );
    line(
        "start durable (\"workflow starting\")",
        samples.iter().filter_map(|s| s.spawning).collect(),
    );
    line(
        "spawning -> workflow running",
        samples
            .iter()
            .filter_map(|s| s.spawning.map(|t| s.start - t))
            .collect(),
    );
    line(
        "baseline: the bench spawns the same",
        samples.iter().map(|s| s.baseline).collect(),
    );
    line(
        "baseline: append + fdatasync",
        samples.iter().map(|s| s.sync).collect(),
    );
}

/// Milliseconds to append a record-sized line to a file beside the
/// daemon's state and `fdatasync` it, as the state store does.
fn baseline_sync(dir: &Path) -> f64 {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("sync-baseline"))
        .unwrap();
    let line = [b'x'; 1024];
    let start = Instant::now();
    file.write_all(&line).unwrap();
    file.sync_data().unwrap();
    ms(start.elapsed())
}

/// Milliseconds from the bench spawning the workflow's command itself to
/// that command's clock reading.
fn baseline_spawn(out: &Path, n: u64) -> f64 {
    let sent = SystemTime::now();
    let status = Command::new("sh")
        .args(["-c", WORKFLOW])
        .env("BENCH_OUT", out)
        .env("CLAUDE_FLOW_ISSUE_NUMBER", format!("baseline-{n}"))
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(out.join(format!("baseline-{n}"))).unwrap();
    let started = UNIX_EPOCH + Duration::from_nanos(text.trim().parse().unwrap());
    ms(started.duration_since(sent).unwrap_or_default())
}

fn main() {
    if !support::measuring("webhook_to_start") {
        return;
    }
    let bin = support::build_binaries();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let http = runtime.block_on(async { reqwest::Client::new() });
    let (mut fast, mut slow) = (Vec::new(), Vec::new());
    let load_before = support::load_average();
    for _ in 0..DAEMONS {
        fast.extend(runtime.block_on(one_daemon(&bin, &http, Duration::ZERO)));
        slow.extend(runtime.block_on(one_daemon(&bin, &http, SLOW_WRITE)));
    }
    println!(
        "load average before {load_before}, after {}",
        support::load_average()
    );
    println!(
        "{DAEMONS} fresh daemons x {ISSUES_PER_DAEMON} issues each, {} ms between a start and the next delivery; goal < 250 ms",
        BETWEEN.as_millis()
    );
    report("writes answered at once", &fast);
    report(
        &format!("every write takes {} s", SLOW_WRITE.as_secs()),
        &slow,
    );
}
