//! Process-tree control for workflows: each workflow leads its own process
//! group, dies with the service (parent-death signal), and can be found
//! again after a crash by its `CLAUDE_FLOW_RUN_ID` in `/proc`.

use std::io;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Makes the command's process lead a new process group and receive
/// SIGKILL when the thread that spawned it dies (including by SIGKILL of
/// the whole service).
pub(crate) fn configure(cmd: &mut tokio::process::Command) {
    cmd.process_group(0);
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls (prctl, getppid) and builds an
    // io::Error from a raw errno, which does not allocate.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            // The parent may have died between fork and prctl; then the
            // signal will never come, so do not start at all.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
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
