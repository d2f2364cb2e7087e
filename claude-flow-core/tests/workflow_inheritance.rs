//! What a workflow inherits from the service (CONTRACT section 4): its
//! standard streams and environment, and nothing else of the service's
//! state: no other open descriptor, no blocked or ignored signal.
//!
//! The test changes process-wide signal dispositions, so it has this test
//! binary to itself.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use claude_flow_core::runner::SubprocessSettings;
use claude_flow_core::{
    ExitKind, Issue, IssueKey, RepoId, SubprocessRunner, WorkflowJob, WorkflowRunner,
};
use nix::libc;
use tokio_util::sync::CancellationToken;

/// Signals the test blocks and ignores: ordinary ones and real-time ones
/// (SIGRTMIN is a function in glibc, so these are computed).
fn blocked() -> [i32; 2] {
    [libc::SIGUSR1, libc::SIGRTMIN() + 1]
}

fn ignored() -> [i32; 3] {
    [libc::SIGUSR2, libc::SIGRTMIN() + 2, libc::SIGRTMAX()]
}

/// Blocks `blocked()` in this thread and ignores `ignored()` in the
/// process, as a service or the program that started it may.
#[allow(unsafe_code)]
fn disturb_signals() {
    // SAFETY: sigset_t is plain data that sigemptyset initialises;
    // pthread_sigmask only changes this thread's mask; SIG_IGN installs no
    // handler, so no code of ours can run in a signal context.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in blocked() {
            libc::sigaddset(&mut set, signal);
        }
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            0
        );
        for signal in ignored() {
            assert_ne!(libc::signal(signal, libc::SIG_IGN), libc::SIG_ERR);
        }
    }
}

/// The bits of a `/proc/<pid>/status` signal mask line.
fn mask(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in\n{status}"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

fn bits(signals: &[i32]) -> u64 {
    signals
        .iter()
        .map(|s| 1u64 << (s - 1))
        .fold(0, |a, b| a | b)
}

#[test]
fn the_workflow_gets_only_its_standard_streams_and_default_signals() {
    let dir = tempfile::tempdir().unwrap();
    // A descriptor the service inherited or opened without CLOEXEC.
    let extra = nix::unistd::dup(std::io::stderr()).unwrap();
    disturb_signals();
    // The check below is only meaningful if this process really is in the
    // state a careless spawn would pass on.
    let own = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert_eq!(mask(&own, "SigBlk") & bits(&blocked()), bits(&blocked()));
    assert_eq!(mask(&own, "SigIgn") & bits(&ignored()), bits(&ignored()));

    // A current-thread runtime spawns from this thread, with its mask.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The shell's descriptors, listed by a child (`exit` keeps the shell
    // from replacing itself with `ls`, whose own would then count).
    let fds = rt.block_on(run(dir.path(), &["sh", "-c", "ls /proc/$$/fd; exit 0"]));
    // `cat` reads its own state, which it leaves as it found it. (A shell
    // blocks every signal at times, for itself.)
    let status = rt.block_on(run(dir.path(), &["cat", "/proc/self/status"]));
    drop(extra);

    let mut fds: Vec<u32> = fds.lines().filter_map(|l| l.trim().parse().ok()).collect();
    fds.sort_unstable();
    assert_eq!(fds, [0, 1, 2], "the workflow's descriptors");
    assert_eq!(mask(&status, "SigBlk"), 0, "blocked signals:\n{status}");
    assert_eq!(mask(&status, "SigIgn"), 0, "ignored signals:\n{status}");
}

/// Runs `command` as a workflow to completion and returns its output.
async fn run(dir: &Path, command: &[&str]) -> String {
    let runner = SubprocessRunner::new(SubprocessSettings {
        command: command.iter().map(|&c| c.to_owned()).collect(),
        workspace_dir: dir.join("workspaces"),
        log_dir: dir.join("logs"),
        timeout: Duration::from_secs(600),
        kill_grace: Duration::from_secs(5),
        env: BTreeMap::new(),
        token: None,
    });
    let job = WorkflowJob {
        issue: Issue::new(IssueKey::new(RepoId::new("o", "r").unwrap(), 1), "probe"),
        round: 1,
        attempt: 1,
        run_id: "inheritance-probe".into(),
    };
    let outcome = runner.run(&job, CancellationToken::new()).await.unwrap();
    let log = std::fs::read_to_string(outcome.log_path.unwrap()).unwrap();
    assert_eq!(outcome.exit, ExitKind::Code(0), "{command:?}: {log}");
    log
}
