//! An in-process service for the HTTP tests: an orchestrator over an
//! in-memory source and store, a runner that records every start, and the
//! HTTP server on 127.0.0.1:0.

// Test helpers: a panic here is a failed test, as in the tests themselves.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use claude_flow_core::api::token::{ApiToken, TokenSource};
use claude_flow_core::{
    Error, ExitKind, FnRunner, Issue, IssueKey, IssueSource, MemorySource, MemoryStore,
    Orchestrator, RepoId, Report, Reports, RunOutcome, Secret, Settings, SourceError, Status,
    Summary, WorkflowJob,
};
use claude_flow_daemon::http::{self, HttpState, WebhookConfig};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Generous: the machines are small and shared.
pub const PATIENCE: Duration = Duration::from_secs(60);
pub const SECRET: &str = "It's a Secret to Everybody";
pub const REPO: &str = "acme/widgets";
pub const TRIGGER: &str = "claude-flow";
/// The API token the test service expects.
pub const API_TOKEN: &str = "test-api-token-0123456789abcdef";

pub fn key(n: u64) -> IssueKey {
    IssueKey::new(REPO.parse().unwrap(), n)
}

pub fn issue(n: u64) -> Issue {
    Issue::new(key(n), format!("issue {n}"))
}

pub fn settings() -> Settings {
    Settings {
        poll_interval: Duration::from_secs(3600),
        max_concurrent: 4,
        max_attempts: 3,
        retry_backoff: Duration::from_millis(10),
        retry_backoff_max: Duration::from_millis(40),
        shutdown_grace: Duration::from_secs(3600),
        ..Settings::default()
    }
}

/// What the runner does with an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Exits 0 at once.
    Succeed,
    /// Exits 1 at once.
    Fail,
    /// Runs until cancelled.
    Hold,
}

/// A [`MemorySource`] that notes when each poll started.
#[derive(Debug, Default)]
pub struct Counted {
    pub inner: MemorySource,
    pub poll_starts: Mutex<Vec<Instant>>,
    pub polls_done: AtomicUsize,
}

impl Counted {
    pub fn polls_done(&self) -> usize {
        self.polls_done.load(Ordering::SeqCst)
    }

    /// Whether a poll that started after `t` has ended (polls run one at
    /// a time, from the one loop).
    pub fn polled_since(&self, t: Instant) -> bool {
        let starts = self.poll_starts.lock().unwrap();
        let done = self.polls_done();
        starts.iter().take(done).any(|s| *s > t)
    }
}

#[async_trait]
impl IssueSource for Counted {
    async fn poll(&self) -> Result<Vec<Issue>, SourceError> {
        self.poll_starts.lock().unwrap().push(Instant::now());
        let result = self.inner.poll().await;
        self.polls_done.fetch_add(1, Ordering::SeqCst);
        result
    }
    async fn report(
        &self,
        issue: &Issue,
        report: &Report,
        reports: &mut Reports,
    ) -> Result<(), SourceError> {
        self.inner.report(issue, report, reports).await
    }
}

pub struct Service {
    pub base: String,
    /// Where the server listens.
    pub addr: std::net::SocketAddr,
    pub http: reqwest::Client,
    pub orchestrator: Arc<Orchestrator>,
    pub store: Arc<MemoryStore>,
    /// Every attempt's start: issue number and when.
    pub starts: watch::Receiver<Vec<(u64, Instant)>>,
    pub state: HttpState,
    engine_stop: CancellationToken,
    server_stop: CancellationToken,
    engine: Option<JoinHandle<Result<Summary, Error>>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

pub struct Options {
    pub source: Arc<dyn IssueSource>,
    pub settings: Settings,
    pub behaviour: fn(u64) -> Behaviour,
    pub webhook: bool,
    /// Start the orchestrator's loop (else only the server runs).
    pub run: bool,
    /// The store the service starts with (empty by default): what a
    /// restarted service finds.
    pub store: Arc<MemoryStore>,
}

impl Options {
    pub fn new(source: Arc<dyn IssueSource>) -> Self {
        Self {
            source,
            settings: settings(),
            behaviour: |_| Behaviour::Succeed,
            webhook: false,
            run: true,
            store: Arc::new(MemoryStore::new()),
        }
    }
}

impl Service {
    pub async fn start(options: Options) -> Self {
        Self::start_with(options, |state| state).await
    }

    /// Starts with the HTTP state as `adjust` makes it.
    pub async fn start_with(options: Options, adjust: impl FnOnce(HttpState) -> HttpState) -> Self {
        let (started, starts) = watch::channel(Vec::new());
        let behaviour = options.behaviour;
        let runner = FnRunner::new(move |job: WorkflowJob, cancel: CancellationToken| {
            let n = job.issue.key.number;
            started.send_modify(|s| s.push((n, Instant::now())));
            async move {
                let exit = match behaviour(n) {
                    Behaviour::Succeed => ExitKind::Code(0),
                    Behaviour::Fail => ExitKind::Code(1),
                    Behaviour::Hold => {
                        cancel.cancelled().await;
                        ExitKind::Cancelled
                    }
                };
                Ok(RunOutcome {
                    exit,
                    pr_url: None,
                    log_path: None,
                    duration: Duration::ZERO,
                    retry_after: None,
                })
            }
        });
        let store = options.store;
        let orchestrator = Arc::new(
            Orchestrator::builder()
                .source(options.source)
                .runner(Arc::new(runner))
                .store(store.clone())
                .settings(options.settings)
                .build()
                .unwrap(),
        );
        let webhook = options.webhook.then(|| WebhookConfig {
            secret: Secret::new(SECRET),
            trigger_label: TRIGGER.into(),
            repos: vec![REPO.parse::<RepoId>().unwrap()],
        });
        let token = ApiToken::new(
            Secret::new(API_TOKEN),
            TokenSource::Generated("/var/lib/claude-flow/api-token".into()),
        );
        let state = adjust(
            HttpState::new(orchestrator.clone(), store.clone())
                .with_webhook(webhook)
                .with_api_token(token),
        );
        Self::with_state(orchestrator, store, starts, state, options.run).await
    }

    pub async fn with_state(
        orchestrator: Arc<Orchestrator>,
        store: Arc<MemoryStore>,
        starts: watch::Receiver<Vec<(u64, Instant)>>,
        state: HttpState,
        run: bool,
    ) -> Self {
        let listener = http::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = format!("http://{addr}");
        let server_stop = CancellationToken::new();
        let server = tokio::spawn(http::serve(
            listener,
            http::router(state.clone()),
            server_stop.clone(),
        ));
        let engine_stop = CancellationToken::new();
        let engine = run.then(|| {
            let o = orchestrator.clone();
            let stop = engine_stop.clone();
            tokio::spawn(async move { o.run(stop).await })
        });
        Self {
            base,
            addr,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            orchestrator,
            store,
            starts,
            state,
            engine_stop,
            server_stop,
            engine,
            server: Some(server),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    /// Posts with the API token, as an operator's client does.
    pub async fn post(&self, path: &str) -> (u16, serde_json::Value) {
        self.post_with(path, &[("authorization", &format!("Bearer {API_TOKEN}"))])
            .await
    }

    /// Posts with these headers only.
    pub async fn post_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, serde_json::Value) {
        let mut request = self.http.post(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    /// Sends `head` (the request line and headers, each ending in CRLF)
    /// and `body` over a new connection, byte for byte as given (so the
    /// `Host` header is the test's, or absent), and returns the status
    /// and the body of the answer.
    pub async fn raw(&self, head: &str, body: &[u8]) -> (u16, String) {
        self.exchange(head, body.len(), body).await
    }

    /// Sends `head` announcing a body of `length` bytes, but no body: a
    /// server that refuses by the announced length answers at once.
    pub async fn announce(&self, head: &str, length: usize) -> (u16, String) {
        self.exchange(head, length, b"").await
    }

    async fn exchange(&self, head: &str, length: usize, body: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let request = format!("{head}Connection: close\r\nContent-Length: {length}\r\n\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        // A server refusing a large body may answer and close before it
        // has all of it: the answer is what counts.
        let _ = stream.write_all(&bytes).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Posts a webhook delivery; `signature`: `None` for none, else the
    /// header's value.
    pub async fn deliver(
        &self,
        event: &str,
        body: &[u8],
        signature: Option<String>,
    ) -> (u16, serde_json::Value) {
        let mut request = self
            .http
            .post(self.url("/webhook"))
            .header("x-github-event", event)
            .header("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(s) = signature {
            request = request.header("x-hub-signature-256", s);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    /// Waits until the status satisfies `cond`.
    pub async fn wait_status(&self, what: &str, cond: impl FnMut(&Status) -> bool) {
        let mut rx = self.orchestrator.subscribe_status();
        tokio::time::timeout(PATIENCE, rx.wait_for(cond))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap();
    }

    /// Waits until `n` attempts have started.
    pub async fn wait_starts(&self, n: usize) -> Vec<(u64, Instant)> {
        let mut rx = self.starts.clone();
        tokio::time::timeout(PATIENCE, rx.wait_for(|s| s.len() >= n))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {n} attempts to start"))
            .unwrap()
            .clone()
    }

    /// Waits until the record of issue `n` satisfies `cond`.
    pub async fn wait_record(
        &self,
        what: &str,
        n: u64,
        mut cond: impl FnMut(&claude_flow_core::IssueRecord) -> bool,
    ) {
        use claude_flow_core::StateStore;
        let start = Instant::now();
        loop {
            if let Some(r) = self.store.get(&key(n)).await.unwrap()
                && cond(&r)
            {
                return;
            }
            assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the orchestrator's loop and waits for it.
    pub async fn stop_engine(&mut self) -> Summary {
        self.engine_stop.cancel();
        match self.engine.take() {
            Some(engine) => tokio::time::timeout(PATIENCE, engine)
                .await
                .expect("the orchestrator stops")
                .unwrap()
                .unwrap(),
            None => Summary::default(),
        }
    }

    pub fn engine_stop(&self) -> CancellationToken {
        self.engine_stop.clone()
    }

    /// Stops the server and checks that it stopped cleanly.
    pub async fn stop_server(&mut self) {
        self.server_stop.cancel();
        if let Some(server) = self.server.take() {
            tokio::time::timeout(PATIENCE, server)
                .await
                .expect("the server stops")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.engine_stop.cancel();
        self.server_stop.cancel();
    }
}

/// `sha256=<hex>` of `body` under `secret`, as GitHub signs.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// An `issues` delivery as GitHub sends it (the parts that matter, and
/// some that do not).
pub fn issues_delivery(action: &str, repo: &str, n: u64, label: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "action": action,
        "issue": {
            "number": n,
            "title": format!("issue {n}"),
            "state": "open",
            "labels": [{"name": label}],
            "user": {"login": "alice", "type": "User"},
        },
        "label": {"name": label, "color": "ededed"},
        "repository": {"full_name": repo, "name": repo.split('/').nth(1).unwrap()},
        "sender": {"login": "alice", "type": "User"},
    }))
    .unwrap()
}
