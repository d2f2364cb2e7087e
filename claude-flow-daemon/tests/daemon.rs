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
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("issues")).unwrap();
    std::fs::write(root.join("issues/1-long.md"), "# Long\n").unwrap();
    let wf = root.join("wf.sh");
    std::fs::write(
        &wf,
        "#!/usr/bin/env bash\necho $$ > pid\nwhile [ ! -e ../../../../gate ]; do sleep 0.05; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&wf, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = serde_json::json!({
        "source": "local",
        "local": {"dir": "issues"},
        "workflow": {"command": ["./wf.sh"], "kill_grace": "1s"},
        "service": {"state_dir": "state", "poll_interval": "100ms", "shutdown_grace": shutdown_grace, "listen": ""}
    });
    std::fs::write(root.join("config.json"), config.to_string()).unwrap();
    Setup { _dir: dir, root }
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
    std::fs::read_to_string(root.join("state/workspaces/local__issues/issue-1/pid"))
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
