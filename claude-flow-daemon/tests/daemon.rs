//! The daemon binary: runs until SIGTERM, stops gracefully, refuses a
//! second instance.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claude_flow_core::{FileStore, IssueStatus, StateStore};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const PATIENCE: Duration = Duration::from_secs(90);

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn setup(shutdown_grace: &str) -> Setup {
    setup_with(1, serde_json::json!({"shutdown_grace": shutdown_grace}))
}

/// `issues` gated issues (each workflow waits for `<root>/gate`), with
/// `service` merged into the service section.
fn setup_with(issues: u64, service: serde_json::Value) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("issues")).unwrap();
    for n in 1..=issues {
        std::fs::write(root.join(format!("issues/{n}-long.md")), "# Long\n").unwrap();
    }
    let wf = root.join("wf.sh");
    std::fs::write(
        &wf,
        "#!/usr/bin/env bash\necho $$ > pid\nwhile [ ! -e ../../../../gate ]; do sleep 0.05; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&wf, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = serde_json::json!({
        "source": "local",
        "local": {"dir": "issues"},
        "workflow": {"command": ["./wf.sh"], "kill_grace": "1s"},
        "service": {"state_dir": "state", "poll_interval": "100ms", "listen": ""}
    });
    for (k, v) in service.as_object().unwrap() {
        config["service"][k] = v.clone();
    }
    std::fs::write(root.join("config.json"), config.to_string()).unwrap();
    Setup { _dir: dir, root }
}

/// Whether issue `n`'s workflow has written its PID: the file exists,
/// empty, a moment before that (`echo $$ > pid`).
fn started(root: &Path, n: u64) -> bool {
    workflow_pid_of(root, n).is_some()
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

fn daemon(root: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_claude-flow-daemon"))
        .arg("--config")
        .arg(root.join("config.json"))
        .env_remove("CLAUDE_FLOW_CONFIG")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn workflow_pid(root: &Path) -> Option<i32> {
    workflow_pid_of(root, 1)
}

fn workflow_pid_of(root: &Path, n: u64) -> Option<i32> {
    std::fs::read_to_string(root.join(format!("state/workspaces/local__issues/issue-{n}/pid")))
        .ok()
        .filter(|s| s.ends_with('\n'))
        .and_then(|s| s.trim().parse().ok())
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with(['Z', 'X']))
    })
}

fn status(root: &Path) -> Option<IssueStatus> {
    let store = FileStore::open_read_only(root.join("state")).ok()?;
    let rt = tokio::runtime::Builder::new_current_thread().build().ok()?;
    rt.block_on(store.load()).ok()?.first().map(|r| r.status)
}

#[test]
fn sigterm_stops_gracefully_and_the_interrupted_issue_resumes_after_a_restart() {
    let s = setup("300ms");
    let mut first = daemon(&s.root);
    wait_for("the workflow to start", || workflow_pid(&s.root).is_some());
    let workflow = workflow_pid(&s.root).unwrap();

    let second = daemon(&s.root).wait_with_output().unwrap();
    assert_eq!(
        second.status.code(),
        Some(75),
        "a second instance must exit 75"
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");

    let asked = Instant::now();
    kill(Pid::from_raw(first.id() as i32), Signal::SIGTERM).unwrap();
    let exit = first.wait().unwrap();
    assert!(exit.success(), "graceful stop must exit 0: {exit:?}");
    // Grace (300ms) plus kill grace (1s), with room for a loaded machine.
    assert!(asked.elapsed() < Duration::from_secs(30));
    assert!(!alive(workflow), "the workflow outlived the daemon");
    assert_eq!(status(&s.root), Some(IssueStatus::Queued));

    std::fs::write(s.root.join("gate"), "").unwrap();
    let mut again = daemon(&s.root);
    wait_for("the issue to be done after the restart", || {
        status(&s.root) == Some(IssueStatus::Done)
    });
    kill(Pid::from_raw(again.id() as i32), Signal::SIGTERM).unwrap();
    assert!(again.wait().unwrap().success());
}

#[test]
fn a_bad_configuration_exits_78_naming_the_key() {
    let s = setup("five minutes");
    let out = daemon(&s.root).wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("service.shutdown_grace: invalid duration")
    );
}

#[test]
fn listening_beyond_loopback_without_an_api_token_exits_78() {
    let s = setup_with(0, serde_json::json!({"listen": "0.0.0.0:0"}));
    let mut d = daemon(&s.root);
    let start = Instant::now();
    while d.try_wait().unwrap().is_none() {
        if start.elapsed() > PATIENCE {
            d.kill().unwrap();
            let _ = d.wait();
            panic!("the daemon started, listening on 0.0.0.0 without an API token");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = d.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service.listen: ") && err.contains("service.api_token"),
        "{err}"
    );
    assert!(!s.root.join("state").exists(), "nothing started");
}

#[test]
fn sighup_applies_a_new_max_concurrent_without_dropping_running_workflows() {
    let s = setup_with(3, serde_json::json!({"max_concurrent": 1}));
    let mut d = daemon(&s.root);
    wait_for("one workflow to start", || {
        (1..=3).filter(|n| started(&s.root, *n)).count() == 1
    });
    let first = (1..=3).find(|n| started(&s.root, *n)).unwrap();
    let first_pid = workflow_pid_of(&s.root, first).unwrap();

    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.root.join("config.json")).unwrap())
            .unwrap();
    config["service"]["max_concurrent"] = serde_json::json!(3);
    std::fs::write(s.root.join("config.json"), config.to_string()).unwrap();
    signal(&d, Signal::SIGHUP);
    wait_for("all three workflows to run", || {
        (1..=3).all(|n| started(&s.root, n))
    });
    assert!(alive(first_pid), "the reload dropped a running workflow");

    std::fs::write(s.root.join("gate"), "").unwrap();
    wait_for("every issue to be done", || {
        let store = FileStore::open_read_only(s.root.join("state")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let all = rt.block_on(store.load()).unwrap();
        all.len() == 3 && all.iter().all(|r| r.status == IssueStatus::Done)
    });
    signal(&d, Signal::SIGTERM);
    assert!(d.wait().unwrap().success());
}

#[test]
fn sighup_with_an_invalid_file_keeps_the_running_configuration() {
    let s = setup_with(1, serde_json::json!({}));
    let d = daemon(&s.root);
    wait_for("the workflow to start", || started(&s.root, 1));
    std::fs::write(
        s.root.join("config.json"),
        r#"{"source": "local", "service": {"max_concurrent": "many"}}"#,
    )
    .unwrap();
    signal(&d, Signal::SIGHUP);
    // Still serving: the running workflow completes under the old configuration.
    std::fs::write(s.root.join("gate"), "").unwrap();
    wait_for("the issue to be done", || {
        status(&s.root) == Some(IssueStatus::Done)
    });
    signal(&d, Signal::SIGTERM);
    let out = d.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("configuration reload refused"), "{log}");
    assert!(log.contains("service.max_concurrent"), "{log}");
}

#[test]
fn the_pid_file_exists_while_the_daemon_runs() {
    let s = setup_with(
        1,
        serde_json::json!({"pid_file": "run/daemon.pid", "shutdown_grace": "200ms"}),
    );
    let pid_file = s.root.join("run/daemon.pid");
    let mut d = daemon(&s.root);
    wait_for("the workflow to start", || started(&s.root, 1));
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        d.id().to_string()
    );
    signal(&d, Signal::SIGTERM);
    assert!(d.wait().unwrap().success());
    assert!(!pid_file.exists(), "the PID file outlived the daemon");
}

#[test]
fn a_second_sigterm_stops_at_once_and_still_cancels_the_workflow() {
    use std::io::BufRead;
    let s = setup_with(1, serde_json::json!({"shutdown_grace": "1h"}));
    let mut d = daemon(&s.root);
    wait_for("the workflow to start", || workflow_pid(&s.root).is_some());
    let workflow = workflow_pid(&s.root).unwrap();
    let mut log = std::io::BufReader::new(d.stderr.take().unwrap()).lines();
    signal(&d, Signal::SIGTERM);
    // Two signals sent back to back may arrive as one; the second must
    // follow the daemon's word that the first began a graceful stop.
    let began = log
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line.contains("stopping gracefully"));
    assert!(began, "the daemon never said it was stopping");
    signal(&d, Signal::SIGTERM);
    let exit = d.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!alive(workflow));
    let store = FileStore::open_read_only(s.root.join("state")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let record = rt.block_on(store.load()).unwrap().remove(0);
    assert_eq!(
        record.attempts[0].outcome,
        Some(claude_flow_core::AttemptOutcome::Interrupted)
    );
}

/// Reads datagrams from a socket standing in for systemd's until one holds
/// `wanted`; returns everything read.
fn read_until(sock: &std::os::unix::net::UnixDatagram, wanted: &str, seen: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {wanted} from the daemon ({e}); got {seen:?}"));
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        let found = message
            .lines()
            .any(|l| l == wanted || l.starts_with(wanted));
        seen.push(message);
        if found {
            return;
        }
    }
}

#[test]
fn the_daemon_speaks_the_systemd_notify_protocol() {
    let s = setup_with(1, serde_json::json!({"shutdown_grace": "200ms"}));
    let path = s.root.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let d = Command::new(env!("CARGO_BIN_EXE_claude-flow-daemon"))
        .arg("--config")
        .arg(s.root.join("config.json"))
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .env_remove("CLAUDE_FLOW_CONFIG")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    read_until(&sock, "READY=1", &mut seen);
    // Pings follow the scheduler loop's heartbeat.
    read_until(&sock, "WATCHDOG=1", &mut seen);
    read_until(&sock, "WATCHDOG=1", &mut seen);
    assert!(seen.iter().any(|m| m.starts_with("STATUS=")), "{seen:?}");

    signal(&d, Signal::SIGHUP);
    read_until(&sock, "RELOADING=1", &mut seen);
    read_until(&sock, "READY=1", &mut seen);

    signal(&d, Signal::SIGTERM);
    read_until(&sock, "STOPPING=1", &mut seen);
    read_until(&sock, "EXTEND_TIMEOUT_USEC=", &mut seen);
    let mut d = d;
    assert!(d.wait().unwrap().success());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// POSTs to the daemon's API, with `token` as the bearer if given; the
/// status of the answer.
fn post(listen: &str, path: &str, token: Option<&str>) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut request = client.post(format!("http://{listen}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap().status().as_u16()
    })
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[test]
fn the_api_token_is_in_no_log_line_and_no_state_file() {
    for configured in [false, true] {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut service = serde_json::json!({"listen": listen});
        if configured {
            service["api_token_file"] = "api.token".into();
        }
        let s = setup_with(1, service);
        std::fs::write(s.root.join("api.token"), "configured-api-token-7f3a9c0e\n").unwrap();
        // Everything the daemon can say, as text.
        let path = s.root.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["log"] = serde_json::json!({"level": "trace"});
        std::fs::write(&path, config.to_string()).unwrap();
        // A generated token of an earlier start, which a configured one
        // makes obsolete.
        std::fs::create_dir(s.root.join("state")).unwrap();
        std::fs::write(s.root.join("state/api-token"), "stale\n").unwrap();

        let d = Command::new(env!("CARGO_BIN_EXE_claude-flow-daemon"))
            .arg("--config")
            .arg(&path)
            .env_remove("CLAUDE_FLOW_CONFIG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the workflow to start", || started(&s.root, 1));
        let token_file = s.root.join("state/api-token");
        let token = if configured {
            assert!(!token_file.exists(), "the stale generated token stayed");
            "configured-api-token-7f3a9c0e".to_owned()
        } else {
            std::fs::read_to_string(&token_file)
                .unwrap()
                .trim()
                .to_owned()
        };
        assert_ne!(token, "stale");

        assert_eq!(post(&listen, "/api/resume", None), 401);
        assert_eq!(post(&listen, "/api/resume", Some("not-the-token")), 401);
        assert_eq!(post(&listen, "/api/resume", Some(&token)), 200);
        assert_eq!(
            post(&listen, "/api/issues/local/issues/1/cancel", Some(&token)),
            200
        );
        wait_for("the cancel to be recorded", || {
            status(&s.root) == Some(IssueStatus::Cancelled)
        });
        // A reload reads the token again.
        signal(&d, Signal::SIGHUP);
        signal(&d, Signal::SIGTERM);
        let out = d.wait_with_output().unwrap();
        assert!(out.status.success(), "{:?}", out.status);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("HTTP request refused"), "{log}");
        assert!(log.contains("cancel asked through the HTTP API"), "{log}");
        assert!(!log.contains(&token), "the token is in the log");

        for file in files(&s.root.join("state")) {
            if file == token_file {
                continue;
            }
            let bytes = std::fs::read(&file).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(&token), "the token is in {}", file.display());
        }
    }
}
