//! Starting a workflow without forking the service.
//!
//! A plain `fork` copies the service's page tables and makes every page
//! copy-on-write, which perf showed to be most of the cost of a short
//! workflow; `posix_spawn` avoids that but cannot arm the parent-death
//! signal. So the child is made the way `posix_spawn` makes it, with
//! `clone(CLONE_VM | CLONE_VFORK)` on a small stack of its own: the calling
//! thread is suspended until the child has exec'd, and the child, sharing
//! the service's memory, only makes system calls (no allocation, no locks)
//! before `execve`: default signal handling, a new process group, the
//! parent-death signal, its standard streams, its working directory, and
//! close-on-exec for every other descriptor. Where clone is refused (some
//! sandboxes' seccomp filters), [`spawn_forked`] does the same after a
//! `fork`.
//!
//! What the workflow must not inherit (CONTRACT section 4): descriptors
//! other than 0, 1 and 2 (the service may have inherited some without
//! `O_CLOEXEC`, or a library may have opened them so), blocked signals (the
//! mask survives `execve`) and ignored ones (so does `SIG_IGN`), real-time
//! signals included.
//!
//! The exit is awaited through a pidfd, which also means the process
//! group can be signalled after the workflow exited but before it is
//! reaped, when its ID cannot have been reused.
//!
//! This module and `guardian.rs` are the crate's uses of `unsafe`; each
//! block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use nix::errno::Errno;
use nix::libc;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// What to start.
pub(crate) struct SpawnSpec<'a> {
    /// An absolute or relative path; no `PATH` search happens here.
    pub program: &'a Path,
    /// Arguments after the program.
    pub args: &'a [String],
    /// The whole environment.
    pub env: &'a [(OsString, OsString)],
    /// The working directory.
    pub cwd: &'a Path,
    /// Standard output and error (standard input is `/dev/null`).
    pub output: BorrowedFd<'a>,
}

/// How a workflow process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
}

/// A started workflow: its PID (also its process group) and a pidfd.
#[derive(Debug)]
pub(crate) struct Child {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
}

impl Child {
    /// Tracks `pid`, a child of this process that nobody has reaped.
    fn track(pid: Pid) -> io::Result<Self> {
        let pidfd = pidfd_open(pid)?;
        // SAFETY: an OwnedFd stays open, with the same number, for as long
        // as the AsyncFd that owns it.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }?;
        Ok(Self {
            pid,
            pidfd,
            reaped: false,
        })
    }

    pub(crate) fn id(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// Waits until the process has exited, without reaping it: until it is
    /// reaped, its PID and so its process group ID cannot be reused.
    pub(crate) async fn exited(&self) -> io::Result<()> {
        if self.reaped {
            return Ok(());
        }
        // A pidfd becomes readable when its process exits.
        let _ready = self.pidfd.readable().await?;
        Ok(())
    }

    /// Waits until the process exits, then reaps it.
    pub(crate) async fn wait(&mut self) -> io::Result<Exit> {
        self.exited().await?;
        let status = nix::sys::wait::waitid(
            Id::PIDFd(self.pidfd.get_ref().as_fd()),
            WaitPidFlag::WEXITED,
        )
        .map_err(io::Error::from)?;
        self.reaped = true;
        match status {
            WaitStatus::Exited(_, code) => Ok(Exit::Code(code)),
            WaitStatus::Signaled(_, signal, _) => Ok(Exit::Signal(signal as i32)),
            other => Err(io::Error::other(format!(
                "unexpected wait status {other:?}"
            ))),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // Dropped while running (its attempt was abandoned): kill and
            // reap it, so it leaves no zombie behind.
            let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitid(
                Id::PIDFd(self.pidfd.get_ref().as_fd()),
                WaitPidFlag::WEXITED,
            );
        }
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in an argument or the environment",
        )
    })
}

fn env_entry(name: &OsStr, value: &OsStr) -> io::Result<CString> {
    let mut bytes = Vec::with_capacity(name.len() + value.len() + 1);
    bytes.extend_from_slice(name.as_bytes());
    bytes.push(b'=');
    bytes.extend_from_slice(value.as_bytes());
    cstring(&bytes)
}

/// Starts `spec` in a new process group, with SIGKILL as its parent-death
/// signal. Fails if it could not be exec'd, with the child's errno.
pub(crate) fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Child> {
    // Everything the child touches is prepared here: it must not allocate.
    let program = cstring(spec.program.as_os_str().as_bytes())?;
    let mut argv = vec![program.clone()];
    for arg in spec.args {
        argv.push(cstring(arg.as_bytes())?);
    }
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| env_entry(k, v))
        .collect::<io::Result<_>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let cwd = cstring(spec.cwd.as_os_str().as_bytes())?;
    let devnull = std::fs::File::open("/dev/null")?;
    let (err_read, err_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let parent = nix::unistd::getpid();
    let (stdin_fd, output_fd, err_fd) = (
        devnull.as_raw_fd(),
        spec.output.as_raw_fd(),
        err_write.as_raw_fd(),
    );
    let mut stack = vec![0u8; 64 * 1024];

    // No signal handler of the service may run in the child, on memory it
    // shares with the service: block everything around the clone, and let
    // the child restore defaults before unblocking.
    let mut saved = SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut saved),
    )
    .map_err(io::Error::from)?;
    let child_main = Box::new(move || -> isize {
        let fail = |errno: Errno| -> isize {
            let code = (errno as i32).to_ne_bytes();
            // SAFETY: a write(2) of a stack buffer to a pipe we own.
            unsafe {
                libc::write(err_fd, code.as_ptr().cast(), code.len());
                libc::_exit(127)
            }
        };
        default_signal_dispositions();
        if let Err(e) = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)) {
            return fail(e);
        }
        if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
            return fail(e);
        }
        // The service may have died before the signal was armed.
        if nix::unistd::getppid() != parent {
            return fail(Errno::ESRCH);
        }
        for (from, to) in [(stdin_fd, 0), (output_fd, 1), (output_fd, 2)] {
            if let Err(e) = dup_to(from, to) {
                return fail(e);
            }
        }
        // Only now: the descriptors duplicated above may be among them.
        if let Err(e) = close_on_exec_above_stdio() {
            return fail(e);
        }
        // SAFETY: chdir(2) and sigprocmask(2) with pointers to memory that
        // outlives the child's use of it.
        unsafe {
            if libc::chdir(cwd.as_ptr()) < 0 {
                return fail(Errno::last());
            }
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
        }
        fail(Errno::last())
    });
    // SAFETY: CLONE_VM | CLONE_VFORK suspends this thread until the child
    // execs or exits, so everything the child borrows stays alive; the
    // child only makes system calls on prepared data (see above), on its
    // own stack, and never returns into this function's frame. Without
    // CLONE_FILES and CLONE_SIGHAND it changes its own copies of the
    // descriptor table and the signal dispositions, not the service's.
    let cloned = unsafe {
        nix::sched::clone(
            child_main,
            &mut stack,
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
    let pid = cloned.map_err(io::Error::from)?;
    drop(err_write);
    let mut code = [0u8; 4];
    let exec_failed = nix::unistd::read(&err_read, &mut code).map_err(io::Error::from)? == 4;
    if exec_failed {
        // Reap the failed child; it has exited already.
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(code)));
    }
    track_or_kill(pid)
}

/// The same as [`spawn`] with `fork`, for where clone is refused.
pub(crate) fn spawn_forked(spec: &SpawnSpec<'_>) -> io::Result<Child> {
    let mut cmd = std::process::Command::new(spec.program);
    cmd.args(spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(spec.cwd)
        .stdin(Stdio::null())
        .stdout(spec.output.try_clone_to_owned()?)
        .stderr(spec.output.try_clone_to_owned()?)
        .process_group(0);
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child of a possibly
    // multi-threaded process, before exec, and only makes system calls
    // (prctl, getppid, rt_sigaction, close_range or fcntl, sigprocmask)
    // and builds io::Errors from raw errnos, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            let os_error = |e: Errno| io::Error::from_raw_os_error(e as i32);
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(os_error)?;
            // The parent may have died between fork and prctl; then the
            // signal will never come, so do not start at all.
            if nix::unistd::getppid() != parent {
                return Err(os_error(Errno::ESRCH));
            }
            default_signal_dispositions();
            close_on_exec_above_stdio().map_err(os_error)?;
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // The std handle is dropped without waiting (which std never does on
    // drop): from here on the pidfd tracks and reaps the process.
    track_or_kill(Pid::from_raw(
        i32::try_from(child.id()).map_err(|_| io::Error::other("PID out of range"))?,
    ))
}

fn track_or_kill(pid: Pid) -> io::Result<Child> {
    Child::track(pid).inspect_err(|_| {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
    })
}

/// `_NSIG` on Linux: signals are numbered 1 to 64.
const SIGNALS: libc::c_int = 64;

/// Sets every signal's disposition to the default, in the child before
/// `execve`: handlers are reset by `execve` anyway, but `SIG_IGN` is
/// inherited. System calls only.
fn default_signal_dispositions() {
    // The kernel's `struct sigaction` with every field zero is `SIG_DFL`
    // with no flags and an empty mask; 32 bytes cover it on 64-bit
    // architectures, and its signal set is 8 bytes (64 signals).
    let default = [0u64; 4];
    for signal in 1..=SIGNALS {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction(2) reads a struct from memory we own and
        // writes no old action. The raw call (not glibc's sigaction) also
        // reaches signals 32 and 33, which glibc reserves for itself but a
        // parent may have set to SIG_IGN all the same.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                default.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }
}

/// `dup2(from, to)`, clearing close-on-exec when the two are the same
/// descriptor (where dup2 does nothing). System calls only.
fn dup_to(from: RawFd, to: RawFd) -> Result<(), Errno> {
    // SAFETY: dup2(2) and fcntl(2) on descriptors the service keeps open
    // until the child has exec'd (clone waits for that; after a fork the
    // child has its own copies).
    let done = unsafe {
        if from == to {
            libc::fcntl(to, libc::F_SETFD, 0)
        } else {
            libc::dup2(from, to)
        }
    };
    if done < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Marks every descriptor above 2 close-on-exec, in the child before
/// `execve`. System calls only.
fn close_on_exec_above_stdio() -> Result<(), Errno> {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets a flag in
    // the child's own descriptor table.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if done == 0 {
        return Ok(());
    }
    // Before Linux 5.11: each descriptor up to the limit in turn.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes to a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return Err(Errno::last());
    }
    let last = RawFd::try_from(limit.rlim_cur).unwrap_or(RawFd::MAX);
    for fd in 3..last {
        // SAFETY: fcntl(2) on a number that may not be open (EBADF then).
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes plain integers and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
