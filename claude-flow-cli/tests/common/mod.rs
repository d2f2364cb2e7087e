//! A temporary claude-flow installation for tests: local issues, a workflow
//! script, a config and a state directory, driven through the real binary.
#![allow(dead_code)] // each test file uses a different part

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Generous: the machines are small and shared.
pub const PATIENCE: Duration = Duration::from_secs(90);

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Fixture {
    /// An empty installation with a default config (local source).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical tempdir");
        std::fs::create_dir(root.join("issues")).expect("issues dir");
        let fixture = Self { _dir: dir, root };
        fixture.config(json!({}));
        fixture
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Writes `issues/<n>-issue.md`.
    pub fn issue(&self, n: u64, title: &str, body: &str) -> PathBuf {
        let path = self.path(&format!("issues/{n}-issue.md"));
        std::fs::write(&path, format!("# {title}\n\n{body}")).expect("write issue");
        path
    }

    /// Writes the workflow script `wf.sh` (bash).
    pub fn workflow(&self, body: &str) {
        let path = self.path("wf.sh");
        std::fs::write(&path, format!("#!/usr/bin/env bash\nset -u\n{body}\n"))
            .expect("write workflow");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// Writes `config.json`: the defaults below with `overrides` merged in.
    pub fn config(&self, overrides: Value) {
        let mut config = json!({
            "source": "local",
            "local": {"dir": "issues"},
            "workflow": {"command": ["./wf.sh"], "timeout": "2m", "kill_grace": "2s"},
            "service": {
                "state_dir": "state",
                "max_concurrent": 2,
                "max_attempts": 3,
                "retry_backoff": "100ms",
                "retry_backoff_max": "1s",
                "poll_interval": "1h",
                "listen": ""
            },
            "log": {"level": "info"}
        });
        merge(&mut config, overrides);
        std::fs::write(self.path("config.json"), config.to_string()).expect("write config");
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("config.json")
    }

    /// `claude-flow --config <this config>`, with no CLAUDE_FLOW_* or token
    /// variables inherited from the machine.
    pub fn cli(&self) -> assert_cmd::Command {
        assert_cmd::Command::from_std(self.cli_process(&[]))
    }

    /// The same as a std Command, for processes the test must signal.
    pub fn cli_process(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("claude-flow"));
        clean_env(&mut cmd);
        cmd.arg("--config")
            .arg(self.config_path())
            .args(args)
            .current_dir(&self.root)
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// The standard output of `claude-flow <args>`, which must succeed.
    pub fn stdout(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).output().expect("claude-flow");
        assert!(
            out.status.success(),
            "claude-flow {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// `claude-flow list --json`.
    pub fn list(&self) -> Vec<Value> {
        let out = self.cli().args(["list", "--json"]).output().expect("list");
        assert!(
            out.status.success(),
            "list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("list --json is JSON")
    }

    /// `claude-flow show <n> --json`.
    pub fn show(&self, n: u64) -> Value {
        let out = self
            .cli()
            .args(["show", &n.to_string(), "--json"])
            .output()
            .expect("show");
        assert!(
            out.status.success(),
            "show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("show --json is JSON")
    }

    pub fn workspace(&self, n: u64) -> PathBuf {
        self.path(&format!("state/workspaces/local__issues/issue-{n}"))
    }

    /// The log of attempt `attempt` of round 1 of issue `n`.
    pub fn log(&self, n: u64, attempt: u32) -> PathBuf {
        self.round_log(n, 1, attempt)
    }

    /// The log of attempt `attempt` (within the round) of round `round`.
    pub fn round_log(&self, n: u64, round: u32, attempt: u32) -> PathBuf {
        self.path(&format!(
            "state/logs/local__issues/issue-{n}/round-{round}-attempt-{attempt}.log"
        ))
    }

    /// `claude-flow status --json`.
    pub fn status(&self) -> Value {
        let out = self
            .cli()
            .args(["status", "--json"])
            .output()
            .expect("status");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }
}

fn clean_env(cmd: &mut std::process::Command) {
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("CLAUDE_FLOW_")
            || n == "GITHUB_TOKEN"
            || n == "GH_TOKEN"
            || n == "RUST_LOG"
        {
            cmd.env_remove(&name);
        }
    }
}

pub fn merge(base: &mut Value, overrides: Value) {
    match (base, overrides) {
        (Value::Object(base), Value::Object(over)) => {
            for (k, v) in over {
                merge(base.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Waits until `cond` holds, checking often; panics after `PATIENCE`.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

pub fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid")
}

/// Parses an RFC 3339 time from `show --json`.
pub fn time(v: &Value) -> std::time::SystemTime {
    humantime::parse_rfc3339(v.as_str().expect("a time")).expect("RFC 3339")
}

/// A TCP port free at the time of asking, for `service.listen`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("local address")
        .port()
}

/// Starts the service for `f`'s config in this runtime and waits for its
/// first poll.
pub async fn start_service(f: &Fixture) -> claude_flow_daemon::DaemonHandle {
    let handle = claude_flow_daemon::Daemon::builder(f.config_path())
        .init_logging(false)
        .build()
        .expect("the service's configuration")
        .start()
        .await
        .expect("the service starts");
    let mut status = handle.orchestrator().subscribe_status();
    tokio::time::timeout(PATIENCE, status.wait_for(|s| s.last_poll.is_some()))
        .await
        .expect("the first poll")
        .expect("the status channel");
    handle
}

/// Reads `out` into `seen` until `seen` holds `text`; panics if `out` ends
/// first.
pub fn read_until(out: &mut impl std::io::Read, seen: &mut Vec<u8>, text: &str) {
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(seen).contains(text) {
        let n = out.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "the output ended before {text:?}: {}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

/// The HTTP status of `POST http://<listen><path>` without the API token.
pub async fn post_without_token(listen: &str, path: &str) -> u16 {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client")
        .post(format!("http://{listen}{path}"))
        .send()
        .await
        .expect("the service answers")
        .status()
        .as_u16()
}
