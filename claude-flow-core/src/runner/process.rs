//! Process-tree control for workflows: each workflow leads its own process
//! group, dies with the service (parent-death signal), is stopped group
//! by group with a grace period, and can be found again after a crash by
//! its `CLAUDE_FLOW_RUN_ID` in `/proc`.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::spawn::{self, Child, Exit, SpawnSpec};

/// Starts `program` (already resolved) in `cwd` with exactly `env`, its
/// output to `output` and standard input from `/dev/null`, leading a new
/// process group and receiving SIGKILL when the service dies, including
/// by SIGKILL. Without fork where the kernel allows it.
pub(crate) fn start(
    program: &Path,
    args: &[String],
    env: &[(OsString, OsString)],
    cwd: &Path,
    output: &File,
) -> io::Result<Child> {
    let spec = SpawnSpec {
        program,
        args,
        env,
        cwd,
        output: output.as_fd(),
    };
    match spawn::spawn(&spec) {
        Err(e) if clone_refused(&e) => {
            tracing::debug!(error = %e, "clone refused; starting workflows with fork");
            spawn::spawn_forked(&spec)
        }
        started => started,
    }
}

fn clone_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EPERM | nix::libc::ENOSYS | nix::libc::EINVAL)
    )
}

/// Ends the workflow's process group: SIGTERM to all of it, then
/// `grace` for every process in it to exit, also after the leader is gone,
/// then SIGKILL to whatever is left. Returns how the leader ended.
///
/// Called when the leader has exited on its own (what it left behind gets
/// the same grace) and to stop it on timeout or cancel.
pub(crate) async fn end_group(leader: &mut Child, grace: Duration) -> io::Result<Exit> {
    let pgid = leader.id();
    let deadline = Instant::now() + grace;
    // The leader is not reaped yet, so the group's ID is still ours. SIGCONT
    // lets stopped members act on the SIGTERM.
    signal_group(pgid, Signal::SIGTERM);
    signal_group(pgid, Signal::SIGCONT);
    if tokio::time::timeout_at(deadline, leader.exited())
        .await
        .is_err()
    {
        signal_group(pgid, Signal::SIGKILL);
    }
    let exit = leader.wait().await?;
    // From here the group's ID stays reserved only while a member is left,
    // so it is only probed, and SIGKILL follows a probe that found the
    // group within one pause: for the ID to name another group by then,
    // the group would have to empty and the kernel's cyclic PID allocation
    // wrap around within that pause.
    let mut pause = Duration::from_millis(1);
    while group_running(pgid) {
        let now = Instant::now();
        if now >= deadline {
            signal_group(pgid, Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(exit)
}

/// Whether a process of the group is still running. A group of zombies
/// is finished: they wait for whoever adopted them to reap them, which some
/// init processes do only every few seconds.
fn group_running(pgid: u32) -> bool {
    let Ok(raw) = i32::try_from(pgid) else {
        return false;
    };
    // The common case, no process left at all, costs one system call.
    // EPERM: a member runs as another user (a setuid program), but exists.
    if let Err(Errno::ESRCH) = killpg(Pid::from_raw(raw), None) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|entry| {
        std::fs::read_to_string(entry.path().join("stat"))
            .is_ok_and(|stat| running_in_group(&stat, pgid))
    })
}

/// Whether a `/proc/<pid>/stat` line is of a live (not zombie) process of
/// group `pgid`.
fn running_in_group(stat: &str, pgid: u32) -> bool {
    // The fields after the parenthesised command name: state, ppid, pgrp.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next().unwrap_or("Z");
    let pgrp = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
    pgrp == Some(pgid) && !state.starts_with(['Z', 'X'])
}

/// Finds `program` as `execvp` would (a name without `/` is searched on
/// `PATH`), so that a missing or non-executable workflow is reported as
/// such.
pub(crate) fn resolve_program(program: &str) -> io::Result<PathBuf> {
    let executable = is_executable;
    if program.contains('/') {
        let path = PathBuf::from(program);
        return match std::fs::metadata(&path) {
            Err(e) => Err(e),
            Ok(_) if executable(&path) => Ok(path),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "not an executable file",
            )),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            }
            .join(program)
        })
        .find(|candidate| executable(candidate))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not found on PATH"))
}

/// Whether `path` is a file someone may execute.
pub(crate) fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Sends `signal` to every process of the group; a group that is already
/// gone is not an error.
pub(crate) fn signal_group(pgid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pgid) else { return };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, %signal, error = %e, "cannot signal workflow process group"),
    }
}

/// Kills every process whose environment holds `CLAUDE_FLOW_RUN_ID=<run_id>`:
/// what is left of an attempt whose service died, including processes that
/// left the workflow's process group. Returns how many were signalled.
pub(crate) fn kill_by_run_id(run_id: &str) -> usize {
    let needle = format!("CLAUDE_FLOW_RUN_ID={run_id}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(me) {
            continue;
        }
        // Unreadable entries belong to other users or vanished processes.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
            && nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}

/// Kills the group when dropped unless disarmed, so that a dropped attempt
/// (its task aborted) leaves nothing running.
pub(crate) struct GroupGuard {
    pgid: Option<u32>,
}

impl GroupGuard {
    pub(crate) fn new(pgid: u32) -> Self {
        Self { pgid: Some(pgid) }
    }

    pub(crate) fn disarm(mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            signal_group(pgid, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use nix::libc;

    use super::*;

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with(['Z', 'X']))
        })
    }

    /// Starts `sleep` from a thread that then exits, as a killed service's
    /// threads do, and checks that the workflow dies with it.
    fn dies_with_its_spawner(forked: bool) {
        let sleep = resolve_program("sleep").unwrap();
        let log = tempfile::tempfile().unwrap();
        let pid = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
                let args = ["600".to_owned()];
                let spec = SpawnSpec {
                    program: &sleep,
                    args: &args,
                    env: &env,
                    cwd: Path::new("/"),
                    output: log.as_fd(),
                };
                let workflow = if forked {
                    spawn::spawn_forked(&spec).unwrap()
                } else {
                    spawn::spawn(&spec).unwrap()
                };
                let pid = workflow.id();
                // Leak it: a killed service does not clean up either.
                std::mem::forget(workflow);
                pid
            })
        })
        .join()
        .unwrap();
        let start = std::time::Instant::now();
        while alive(pid) {
            assert!(
                start.elapsed().as_secs() < 60,
                "the workflow outlived its parent thread"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_cloned_workflow_dies_with_its_parent() {
        dies_with_its_spawner(false);
    }

    #[test]
    fn a_forked_workflow_dies_with_its_parent() {
        dies_with_its_spawner(true);
    }

    /// Runs `program args` with `spawn` or `spawn_forked` from a thread of
    /// its own with `blocked` blocked, and returns its output.
    fn output_of(forked: bool, blocked: i32, program: &str, args: &[&str]) -> String {
        let program = resolve_program(program).unwrap();
        let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
        let log = tempfile::NamedTempFile::new().unwrap();
        let output = log.reopen().unwrap();
        std::thread::spawn(move || {
            #[allow(unsafe_code)]
            // SAFETY: a plain-data set initialised by sigemptyset, and a
            // change to this thread's mask only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, blocked);
                assert_eq!(
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                    0
                );
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let spec = SpawnSpec {
                    program: &program,
                    args: &args,
                    env: &[],
                    cwd: Path::new("/"),
                    output: output.as_fd(),
                };
                let mut child = if forked {
                    spawn::spawn_forked(&spec).unwrap()
                } else {
                    spawn::spawn(&spec).unwrap()
                };
                assert_eq!(child.wait().await.unwrap(), Exit::Code(0));
            });
        })
        .join()
        .unwrap();
        std::fs::read_to_string(log.path()).unwrap()
    }

    /// Both ways of starting a workflow, while the service holds a
    /// descriptor without close-on-exec and has a real-time signal blocked
    /// and another ignored. (`tests/workflow_inheritance.rs` checks the
    /// same through the runner, in a process of its own.)
    #[test]
    fn neither_spawn_passes_on_descriptors_or_signal_state() {
        let extra = nix::unistd::dup(std::io::stderr()).unwrap();
        let (blocked, ignored) = (libc::SIGRTMIN() + 5, libc::SIGRTMIN() + 6);
        #[allow(unsafe_code)]
        // SAFETY: SIG_IGN installs no handler; no other test uses this
        // real-time signal.
        unsafe {
            libc::signal(ignored, libc::SIG_IGN);
        }
        for forked in [false, true] {
            // The shell's descriptors, listed by a child; `exit` keeps the
            // shell from replacing itself with `ls`.
            let fds = output_of(forked, blocked, "sh", &["-c", "ls /proc/$$/fd; exit 0"]);
            assert_eq!(
                fds.lines().collect::<Vec<_>>(),
                ["0", "1", "2"],
                "forked: {forked}"
            );
            // `cat` reads its own state, which it leaves as it found it.
            let status = output_of(forked, blocked, "cat", &["/proc/self/status"]);
            for field in ["SigBlk:", "SigIgn:"] {
                assert!(
                    status
                        .lines()
                        .any(|l| l.starts_with(field) && l.ends_with("0000000000000000")),
                    "forked: {forked}\n{status}"
                );
            }
        }
        drop(extra);
    }

    #[tokio::test]
    async fn exit_codes_signals_and_exec_errors_are_reported() {
        let sh = resolve_program("sh").unwrap();
        let log = tempfile::tempfile().unwrap();
        let env: Vec<(OsString, OsString)> = vec![("X".into(), "from env".into())];
        let run = |script: &str| {
            let args = ["-c".to_owned(), script.to_owned()];
            start(&sh, &args, &env, Path::new("/"), &log)
        };
        let mut w = run("exit 3").unwrap();
        assert_eq!(w.wait().await.unwrap(), Exit::Code(3));
        let mut w = run("kill -USR1 $$").unwrap();
        assert_eq!(
            w.wait().await.unwrap(),
            Exit::Signal(Signal::SIGUSR1 as i32)
        );
        let mut w =
            run("[ \"$X\" = 'from env' ] && [ -z \"$HOME\" ] && [ \"$(pwd)\" = / ]").unwrap();
        assert_eq!(
            w.wait().await.unwrap(),
            Exit::Code(0),
            "env or cwd not as given"
        );
        let missing = start(
            Path::new("/nonexistent/wf"),
            &[],
            &env,
            Path::new("/"),
            &log,
        )
        .unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn stat_lines_tell_live_members_of_a_group() {
        let line = |state: &str, pgrp: u32| format!("42 (a (b) c) {state} 1 {pgrp} 1 0 -1");
        assert!(running_in_group(&line("S", 7), 7));
        assert!(!running_in_group(&line("S", 8), 7));
        assert!(!running_in_group(&line("Z", 7), 7));
        assert!(!running_in_group("garbage", 7));
    }

    #[test]
    fn programs_are_resolved_like_execvp() {
        assert!(resolve_program("sh").unwrap().is_absolute());
        let missing = resolve_program("claude-flow-no-such-program").unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("not-executable.sh");
        std::fs::write(&plain, "echo hi").unwrap();
        let err = resolve_program(plain.to_str().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}
