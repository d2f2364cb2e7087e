//! Several real daemons (`claude-flow-daemon` binaries) on one PostgreSQL
//! database and one fake GitHub, running a shell workflow that notes in a
//! shared journal when it starts and ends: the harness of
//! `several_daemons.rs`.
//!
//! Tests wait on events (the journal, the fake GitHub's state, `/healthz`,
//! processes ending), each wait bounded by [`PATIENCE`], and collect what
//! they find wrong in [`Findings`], so that one run reports every broken
//! promise at once, with the tail of each daemon's log.

// Test helpers: a panic here is a failed test, as in the tests themselves.
#![allow(dead_code, clippy::unwrap_used)]

/// The fake GitHub.
pub mod github;
/// The workflow and its journal.
pub mod journal;
/// The database proxy for outages.
pub mod proxy;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claude_flow_core::state::{PostgresSettings, PostgresStore, TestDb};
use claude_flow_core::{AttemptOutcome, IssueRecord, IssueStatus, StateStore};
use serde_json::{Value, json};

use github::FakeGithub;
use journal::{Ns, Run, now_ns, ns_of, secs};

/// Generous: the machines are small and shared.
pub const PATIENCE: Duration = Duration::from_secs(180);
/// `store.postgres.lease`.
pub const LEASE: Duration = Duration::from_secs(4);
/// `service.poll_interval`.
pub const POLL: Duration = Duration::from_millis(500);
/// `workflow.kill_grace`.
pub const KILL_GRACE: Duration = Duration::from_secs(1);
/// `service.max_concurrent`, per daemon.
pub const SLOTS: usize = 4;
/// Issues on the fake GitHub.
pub const ISSUES: u64 = 30;
/// The token the daemons send; the fake does not check it.
const TOKEN: &str = "ghp_SeveralDaemonsTokenThatMustNeverLeak0";

/// The tests of this binary run one at a time: each starts three daemons
/// with a pool of connections each, and the machine has two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Holds the turn of the calling test until dropped.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// What a cluster is made of.
pub struct Setup {
    pub nodes: Vec<&'static str>,
    /// How long each workflow works.
    pub work: Duration,
    /// The URL the daemons connect to (the test database's, or a proxy's
    /// in front of it).
    pub daemon_url: String,
}

impl Setup {
    /// Nodes `a`, `b` and `c`, workflows of two seconds.
    pub fn three(db: &TestDb) -> Self {
        Self {
            nodes: vec!["a", "b", "c"],
            work: Duration::from_secs(2),
            daemon_url: db.url.expose().to_owned(),
        }
    }
}

/// One daemon process.
pub struct Daemon {
    pub node: String,
    pub listen: String,
    child: Option<Child>,
    log: PathBuf,
    /// When the test killed it.
    pub killed_at: Option<Ns>,
}

impl Daemon {
    fn spawn(root: &Path, node: &str, config: &Value) -> Self {
        let dir = root.join(node);
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = dir.join("daemon.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_claude-flow-daemon"));
        command
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("daemon.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        // Only the configuration file speaks: no override from the
        // environment the tests run in (it names the test server).
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("CLAUDE_FLOW_")
                || ["GITHUB_TOKEN", "GH_TOKEN", "NOTIFY_SOCKET"].contains(&text.as_ref())
            {
                command.env_remove(&name);
            }
        }
        Self {
            node: node.to_owned(),
            listen: config["service"]["listen"].as_str().unwrap().to_owned(),
            child: Some(command.spawn().unwrap()),
            log,
            killed_at: None,
        }
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn pid(&self) -> Option<nix::unistd::Pid> {
        let id = self.child.as_ref()?.id();
        Some(nix::unistd::Pid::from_raw(i32::try_from(id).unwrap()))
    }

    /// SIGKILL, and the time it was sent.
    pub fn kill(&mut self) -> Ns {
        let at = now_ns();
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.killed_at = Some(at);
        at
    }

    /// SIGTERM (a graceful stop), then waits up to `patience` for the
    /// exit. Whether it exited.
    async fn stop(&mut self, patience: Duration) -> bool {
        let Some(pid) = self.pid() else {
            return true;
        };
        if !self.alive() {
            return true;
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < patience {
            if !self.alive() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Daemons, their fake GitHub, their database and their journal.
pub struct Cluster {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub github: FakeGithub,
    pub journal: PathBuf,
    pub daemons: Vec<Daemon>,
    /// When the first daemon was started.
    pub began: Ns,
    /// The test database, directly (not through a proxy).
    store: PostgresStore,
    http: reqwest::Client,
}

impl Cluster {
    /// A fake GitHub with [`ISSUES`] labeled issues, and one daemon per
    /// node, each answering HTTP.
    pub async fn start(db: &TestDb, setup: Setup) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let journal = root.join("journal");
        let script = root.join("workflow.sh");
        std::fs::write(
            &script,
            journal::script(&journal, setup.work.as_secs_f64(), github::REPO),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let github = FakeGithub::start(ISSUES).await;
        let began = now_ns();
        let daemons = setup
            .nodes
            .iter()
            .map(|node| {
                let config = config(&root, node, &script, &github.uri(), &setup.daemon_url);
                Daemon::spawn(&root, node, &config)
            })
            .collect();
        let cluster = Self {
            _dir: dir,
            root,
            github,
            journal,
            daemons,
            began,
            store: PostgresStore::connect(&db.url, PostgresSettings::default())
                .await
                .unwrap(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        };
        for i in 0..cluster.daemons.len() {
            cluster
                .wait_for("every daemon answering /healthz", async |c| {
                    c.health(&c.daemons[i]).await
                })
                .await;
        }
        cluster
    }

    /// Every run of the workflow so far.
    pub fn runs(&self) -> Vec<Run> {
        journal::read(&self.journal)
    }

    /// The daemon of `node`.
    pub fn daemon(&mut self, node: &str) -> &mut Daemon {
        self.daemons.iter_mut().find(|d| d.node == node).unwrap()
    }

    /// `/healthz`'s status and body, if it answers.
    pub async fn health(&self, daemon: &Daemon) -> Option<(u16, Value)> {
        let response = self
            .http
            .get(format!("http://{}/healthz", daemon.listen))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.ok()?))
    }

    /// Each live daemon's `role` on `/healthz` (`leader` or `follower`).
    /// A body without `role` fails the test at once: nothing else tells
    /// which daemon leads.
    pub async fn roles(&self) -> BTreeMap<String, String> {
        let mut roles = BTreeMap::new();
        for d in self.daemons.iter().filter(|d| d.killed_at.is_none()) {
            if let Some((status, body)) = self.health(d).await {
                let Some(role) = body["role"].as_str() else {
                    panic!(
                        "GET /healthz of node {} has no \"role\" (leader or follower): {status} {body}",
                        d.node
                    );
                };
                if let Some(node) = body["node"].as_str() {
                    assert_eq!(node, d.node, "/healthz names another node: {body}");
                }
                roles.insert(d.node.clone(), role.to_owned());
            }
        }
        roles
    }

    /// The live daemon that says it leads, when exactly one does.
    pub async fn leader(&self) -> Option<String> {
        let roles = self.roles().await;
        let leaders: Vec<&String> = roles
            .iter()
            .filter(|(_, role)| *role == "leader")
            .map(|(node, _)| node)
            .collect();
        match leaders.as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        }
    }

    /// Waits until `probe` answers, polling every 50 ms; after
    /// [`PATIENCE`] the test fails, showing the daemons' logs.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        mut probe: impl AsyncFnMut(&Self) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(found) = probe(self).await {
                return found;
            }
            if start.elapsed() > PATIENCE {
                panic!(
                    "timed out after {PATIENCE:?} waiting for {what}\n{}",
                    self.state_of_things()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every issue on the fake GitHub is settled done: the
    /// reports are made too (which takes a while: the service spaces its
    /// writes to GitHub a second apart).
    pub async fn wait_all_reported(&self) -> Ns {
        self.wait_for("every issue settled done on GitHub", async |c| {
            (c.github.settled_done() == usize::try_from(ISSUES).unwrap()).then(now_ns)
        })
        .await
    }

    /// Waits until every issue is done in the database (its report may
    /// still be on its way).
    pub async fn wait_all_done(&self) -> Ns {
        self.wait_for("every issue done in the database", async |c| {
            let records = c.records().await;
            let done = records
                .values()
                .filter(|r| r.status == IssueStatus::Done)
                .count();
            (done == usize::try_from(ISSUES).unwrap()).then(now_ns)
        })
        .await
    }

    /// Waits until every process of `runs` has ended; when.
    pub async fn wait_processes_gone(&self, runs: &[Run]) -> Ns {
        self.wait_for("the killed daemon's workflows to end", async |_| {
            runs.iter()
                .all(|r| r.pids.iter().all(|p| journal::process_gone(*p)))
                .then(now_ns)
        })
        .await
    }

    /// Stops every live daemon gracefully (SIGTERM), so that the journal
    /// is final; one that does not stop within 30 s is a finding.
    pub async fn stop_all(&mut self, findings: &mut Findings) {
        for d in &mut self.daemons {
            if d.killed_at.is_some() {
                continue;
            }
            let stopped = d.stop(Duration::from_secs(30)).await;
            findings.check(stopped, || {
                format!("node {} did not stop within 30 s of SIGTERM", d.node)
            });
        }
    }

    /// Every issue's record, read from the database directly.
    pub async fn records(&self) -> BTreeMap<u64, IssueRecord> {
        self.store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.issue.key.number, r))
            .collect()
    }

    /// Seconds since the cluster began, for messages.
    pub fn at(&self, t: Ns) -> String {
        format!("{:.3}s", secs(t.saturating_sub(self.began)))
    }

    /// A run, for messages, its times relative to the cluster's start.
    pub fn describe(&self, run: &Run) -> String {
        let end = match run.end {
            Some((journal::Ending::Completed, t)) => format!("completed at {}", self.at(t)),
            Some((journal::Ending::Terminated, t)) => format!("terminated at {}", self.at(t)),
            None => "no end noted".to_owned(),
        };
        format!(
            "#{} on {} (run {}): started at {}, {end}",
            run.issue,
            run.node,
            run.run_id,
            self.at(run.start)
        )
    }

    /// The journal, the fake GitHub's issues and the daemons' logs.
    pub fn state_of_things(&self) -> String {
        let mut out = String::new();
        let runs = self.runs();
        let _ = writeln!(out, "journal ({} runs):", runs.len());
        for r in &runs {
            let _ = writeln!(out, "  {}", self.describe(r));
        }
        let _ = writeln!(
            out,
            "GitHub: {} of {ISSUES} settled done; {} list requests; unexpected: {:?}",
            self.github.settled_done(),
            self.github.lists().len(),
            self.github.unexpected()
        );
        for (n, issue) in self.github.issues() {
            if !issue.settled_done() {
                let _ = writeln!(
                    out,
                    "  #{n}: labels {:?}, {} comments",
                    issue.labels,
                    issue.comments.len()
                );
            }
        }
        for d in &self.daemons {
            let _ = writeln!(
                out,
                "---- node {} log (last lines) ----\n{}",
                d.node,
                d.log_tail(25)
            );
        }
        out
    }

    /// Panics with every finding (and the state of things) if there is any.
    pub fn conclude(&self, findings: Findings) {
        if !findings.0.is_empty() {
            let mut text = format!("{} broken promises:\n", findings.0.len());
            for f in &findings.0 {
                let _ = writeln!(text, "- {f}");
            }
            panic!("{text}\n{}", self.state_of_things());
        }
    }

    /// What holds whatever happened on the way: every issue done once in
    /// the database, with one attempt that succeeded, whose run completed;
    /// every run an attempt the database recorded (before it started: the
    /// claim records it); nothing run after an issue's success; no two
    /// runs of one issue at once; on GitHub one success comment each and
    /// the labels of success; no request the fake did not expect.
    ///
    /// `stopped`: per killed node, when its workflows were all gone (their
    /// runs note no end of their own). `reported`: whether every report
    /// was waited for (else GitHub is checked for what it got so far).
    pub async fn check_common(
        &self,
        runs: &[Run],
        stopped: &BTreeMap<String, Ns>,
        reported: bool,
        f: &mut Findings,
    ) -> BTreeMap<u64, IssueRecord> {
        let records = self.records().await;
        for n in 1..=ISSUES {
            let of_issue: Vec<&Run> = runs.iter().filter(|r| r.issue == n).collect();
            let Some(record) = records.get(&n) else {
                f.push(format!("#{n} has no record in the database"));
                continue;
            };
            f.check(record.status == IssueStatus::Done, || {
                format!(
                    "#{n} is {} in the database, not done",
                    record.status.as_str()
                )
            });
            let succeeded: Vec<&str> = record
                .attempts
                .iter()
                .filter(|a| a.outcome == Some(AttemptOutcome::Succeeded))
                .map(|a| a.run_id.as_str())
                .collect();
            f.check(succeeded.len() == 1, || {
                format!(
                    "#{n} has {} succeeded attempts in the database: {succeeded:?}",
                    succeeded.len()
                )
            });
            for r in &of_issue {
                f.check(record.attempts.iter().any(|a| a.run_id == r.run_id), || {
                    format!(
                        "a run the database does not record as an attempt (started what it could not record): {}",
                        self.describe(r)
                    )
                });
            }
            if let [winner] = succeeded.as_slice() {
                let run = of_issue.iter().find(|r| r.run_id == *winner);
                f.check(run.is_some_and(|r| r.completed()), || {
                    format!("#{n}: the attempt recorded as succeeded ({winner}) did not complete in the journal")
                });
                if let Some((_, done)) = run.and_then(|r| r.end) {
                    for later in of_issue.iter().filter(|r| r.start > done) {
                        f.push(format!(
                            "#{n} ran again after its recorded success: {}",
                            self.describe(later)
                        ));
                    }
                }
            }
            // No two runs of one issue at once: each ends before the next
            // starts. A run without an end of its own ended when its
            // killed node's processes were gone, else it never ended.
            for (i, a) in of_issue.iter().enumerate() {
                let end = a
                    .end
                    .map(|(_, t)| t)
                    .or_else(|| stopped.get(&a.node).copied());
                for b in &of_issue[i + 1..] {
                    if end.is_none_or(|e| e >= b.start) {
                        f.push(format!(
                            "two runs of #{n} at once:\n    {}\n    {}",
                            self.describe(a),
                            self.describe(b)
                        ));
                    }
                }
            }
        }
        self.check_github(reported, f);
        records
    }

    /// On GitHub: never more than one success comment per issue, and when
    /// `reported`, exactly one and the labels of success; no request the
    /// fake did not expect.
    pub fn check_github(&self, reported: bool, f: &mut Findings) {
        for (n, issue) in self.github.issues() {
            let comments = issue.success_comments();
            f.check(comments == 1 || !reported && comments == 0, || {
                format!("#{n} has {comments} success comments on GitHub (one expected)")
            });
            f.check(!reported || issue.settled_done(), || {
                format!(
                    "#{n} is not settled done on GitHub: labels {:?}",
                    issue.labels
                )
            });
        }
        let unexpected = self.github.unexpected();
        f.check(unexpected.is_empty(), || {
            format!("requests the fake GitHub did not expect: {unexpected:?}")
        });
    }

    /// Each issue completed exactly one run (scenarios without a database
    /// outage, where every completion can be recorded).
    pub fn check_one_completion_each(&self, runs: &[Run], f: &mut Findings) {
        for n in 1..=ISSUES {
            let completed = runs
                .iter()
                .filter(|r| r.issue == n && r.completed())
                .count();
            f.check(completed == 1, || {
                format!("#{n} completed {completed} runs (one expected)")
            });
        }
    }

    /// The runs `victim` had going when it was killed at `killed` ran
    /// again on another node, after the lease (well: after two thirds of
    /// it, the least a lease renewed every third can have left) and after
    /// the killed run's processes were all gone (`quiet`).
    pub fn check_reruns(
        &self,
        victim: &str,
        killed: Ns,
        quiet: Ns,
        runs: &[Run],
        f: &mut Findings,
    ) {
        // Killed, it finished nothing more: what it had not completed was
        // cut short (ending with no note, or with the `term` its guardian's
        // SIGTERM made the workflow write).
        let cut_short: Vec<&Run> = runs
            .iter()
            .filter(|r| r.node == victim && !r.completed())
            .collect();
        f.check(!cut_short.is_empty(), || {
            format!("node {victim} was killed while running nothing: the test did not test")
        });
        let grace = ns_of(KILL_GRACE + Duration::from_secs(2));
        f.check(quiet.saturating_sub(killed) <= grace, || {
            format!(
                "the workflows of node {victim} outlived it by {:.3}s (workflow.kill_grace is {KILL_GRACE:?})",
                secs(quiet - killed)
            )
        });
        for r in cut_short {
            let again: Vec<&Run> = runs
                .iter()
                .filter(|o| o.issue == r.issue && o.start > r.start && o.node != victim)
                .collect();
            let Some(first) = again.first() else {
                f.push(format!("never ran again elsewhere: {}", self.describe(r)));
                continue;
            };
            f.check(first.start > killed + ns_of(LEASE * 2 / 3), || {
                format!(
                    "ran again {:.3}s after its node was killed, before the lease ({LEASE:?}) ran out: {}",
                    secs(first.start - killed),
                    self.describe(first)
                )
            });
            f.check(first.start > quiet, || {
                format!(
                    "ran again before the killed run's processes were gone ({}): {}",
                    self.at(quiet),
                    self.describe(first)
                )
            });
        }
    }
}

/// The configuration of node `node`.
fn config(root: &Path, node: &str, script: &Path, github: &str, db_url: &str) -> Value {
    let dir = root.join(node);
    json!({
        "source": "github",
        "github": {"api_url": github, "repos": [github::REPO], "token": TOKEN},
        "workflow": {
            "command": [script, node],
            "kill_grace": humantime::format_duration(KILL_GRACE).to_string(),
            "timeout": "2m"
        },
        "service": {
            "node": node,
            "state_dir": dir.join("state"),
            "log_dir": dir.join("logs"),
            "listen": format!("127.0.0.1:{}", free_port()),
            "poll_interval": humantime::format_duration(POLL).to_string(),
            "max_concurrent": SLOTS,
            "retry_backoff": "1s",
            "retry_backoff_max": "2s",
            "shutdown_grace": "5s"
        },
        "store": {
            "kind": "postgres",
            "postgres": {"url": db_url, "lease": humantime::format_duration(LEASE).to_string()}
        },
        "log": {"level": "info"}
    })
}

/// `url` with its host and port replaced by `addr`.
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let user = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"));
    format!("{scheme}://{}{addr}/{path}", user.unwrap_or_default())
}

/// The server's address in `url`.
pub async fn server_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    tokio::net::lookup_host(host).await.unwrap().next().unwrap()
}

/// What a test found wrong, reported all at once.
#[derive(Debug, Default)]
pub struct Findings(Vec<String>);

impl Findings {
    /// Notes `what` unless `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    /// Notes `what`.
    pub fn push(&mut self, what: String) {
        self.0.push(what);
    }
}
