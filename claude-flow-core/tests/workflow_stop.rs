//! Stopping a workflow (CONTRACT section 4): SIGTERM to its whole process
//! group, and `workflow.kill_grace` for every process in it to finish,
//! also after the leader is gone; SIGKILL only for what is left then.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use claude_flow_core::runner::SubprocessSettings;
use claude_flow_core::{
    ExitKind, Issue, IssueKey, RepoId, RunOutcome, SubprocessRunner, WorkflowJob, WorkflowRunner,
};
use tokio_util::sync::CancellationToken;

/// Generous: the machines are small and shared.
const PATIENCE: Duration = Duration::from_secs(90);

/// A child that needs a moment to clean up after SIGTERM: it writes
/// `cleaned` a second after the signal, then exits. `ready` says its trap
/// is set.
const CAREFUL_CHILD: &str = r#"bash -c 'trap "sleep 1; echo done > cleaned; exit 0" TERM
echo $$ > child.pid; touch ready; while :; do sleep 0.1; done' &"#;

struct Setup {
    _dir: tempfile::TempDir,
    runner: SubprocessRunner,
    job: WorkflowJob,
}

impl Setup {
    fn new(script: &str, kill_grace: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runner = SubprocessRunner::new(SubprocessSettings {
            command: vec!["bash".into(), "-c".into(), script.into()],
            workspace_dir: dir.path().join("workspaces"),
            log_dir: dir.path().join("logs"),
            timeout: Duration::from_secs(3600),
            kill_grace,
            env: BTreeMap::new(),
            token: None,
        });
        let job = WorkflowJob {
            issue: Issue::new(IssueKey::new(RepoId::new("o", "r").unwrap(), 1), "stop"),
            round: 1,
            attempt: 1,
            run_id: format!("stop-test-{}", std::process::id()),
        };
        Self {
            _dir: dir,
            runner,
            job,
        }
    }

    fn workspace(&self) -> PathBuf {
        self.runner.workspace(&self.job.issue)
    }

    /// Runs the workflow, cancelling it once `<workspace>/ready` exists.
    async fn run_and_cancel_when_ready(&self) -> RunOutcome {
        let cancel = CancellationToken::new();
        let ready = self.workspace().join("ready");
        let trigger = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                wait_for_async("the workflow to be ready", || ready.exists()).await;
                cancel.cancel();
            })
        };
        let outcome = self.runner.run(&self.job, cancel).await.unwrap();
        trigger.abort();
        outcome
    }

    fn log(&self, outcome: &RunOutcome) -> String {
        std::fs::read_to_string(outcome.log_path.as_ref().unwrap()).unwrap_or_default()
    }
}

async fn wait_for_async(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_cancel_the_group_gets_the_grace_even_after_the_leader_is_gone() {
    // The leader (this bash) dies of the SIGTERM at once.
    let s = Setup::new(
        &format!("{CAREFUL_CHILD}\nwait"),
        // Far more than the child needs: only a broken runner cuts it short.
        Duration::from_secs(60),
    );
    let outcome = s.run_and_cancel_when_ready().await;
    assert_eq!(outcome.exit, ExitKind::Cancelled, "{}", s.log(&outcome));
    // The runner returns once the group is empty, so the child's cleanup
    // is complete by now.
    assert!(
        s.workspace().join("cleaned").exists(),
        "the child was cut short: {}",
        s.log(&outcome)
    );
    assert!(!alive(read_pid(&s.workspace().join("child.pid"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_workflow_leaves_in_its_group_gets_the_same_grace() {
    // The leader exits on its own, with its child still running.
    let s = Setup::new(
        &format!("{CAREFUL_CHILD}\nwhile [ ! -e ready ]; do sleep 0.05; done\nexit 0"),
        Duration::from_secs(60),
    );
    let outcome = s
        .runner
        .run(&s.job, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(outcome.exit, ExitKind::Code(0), "{}", s.log(&outcome));
    assert!(
        s.workspace().join("cleaned").exists(),
        "the child was cut short: {}",
        s.log(&outcome)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
    // The child notes the SIGTERM and carries on; only SIGKILL ends it.
    let s = Setup::new(
        r#"bash -c 'trap "echo term > term-seen" TERM
echo $$ > child.pid; touch ready; while :; do sleep 0.1; done' &
wait"#,
        // Ample time for the trap to note the signal.
        Duration::from_secs(3),
    );
    let outcome = s.run_and_cancel_when_ready().await;
    assert_eq!(outcome.exit, ExitKind::Cancelled, "{}", s.log(&outcome));
    let child = read_pid(&s.workspace().join("child.pid"));
    wait_for_async(&format!("the child ({child}) to be killed"), || {
        !alive(child)
    })
    .await;
    assert!(
        s.workspace().join("term-seen").exists(),
        "the child got SIGKILL without SIGTERM first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_left_the_group_is_ended_when_the_runner_is_dropped() {
    // A grandchild in a session of its own: no group signal reaches it,
    // and it ignores SIGTERM.
    let s = Setup::new(
        r#"setsid bash -c 'trap "" TERM; echo $$ > escaped.tmp; mv escaped.tmp escaped.pid
while :; do sleep 0.1; done' &
while [ ! -e escaped.pid ]; do sleep 0.05; done"#,
        Duration::from_secs(1),
    );
    let outcome = s
        .runner
        .run(&s.job, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(outcome.exit, ExitKind::Code(0), "{}", s.log(&outcome));
    let escaped = read_pid(&s.workspace().join("escaped.pid"));
    assert!(alive(escaped), "the escaped process is not running");
    let _cleanup = KillIfFailed(escaped);
    // The runner's guardian ends it (SIGTERM, then SIGKILL after the
    // grace) once the runner is gone.
    let Setup {
        runner, _dir: dir, ..
    } = s;
    drop(runner);
    wait_for_async(&format!("process {escaped} to end"), || !alive(escaped)).await;
    drop(dir);
}

/// SIGKILLs a process if the test fails, so that a failure leaves nothing
/// running. (Not after a success: the PID may belong to another process
/// by then.)
struct KillIfFailed(i32);

impl Drop for KillIfFailed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
