//! The guardian: a small process that outlives the service just long
//! enough to stop everything its workflows started (CONTRACT section 4: no
//! process a workflow started outlives the service by more than
//! `workflow.kill_grace`, also when the service is killed with SIGKILL).
//!
//! The parent-death signal reaches only the workflow itself. A grandchild
//! that called `setsid` or left the process group in another way has no
//! tie to the service: without systemd's cgroup nothing ends it. So each
//! runner, at its first workflow, forks a guardian, which blocks reading a
//! pipe whose only write end the runner holds (close-on-exec, so no
//! workflow inherits it). When the service dies, or drops the runner, the
//! kernel closes that end; the guardian wakes, sends SIGTERM (and SIGCONT)
//! to every process whose environment holds this runner's
//! `CLAUDE_FLOW_INSTANCE`, waits until none is left or `kill_grace` has
//! passed, SIGKILLs what remains, and exits.
//!
//! The guardian is forked from a multi-threaded process and never execs
//! (a library has no helper binary it could rely on), so between `fork`
//! and its exit it only makes system calls on memory prepared before the
//! fork: no allocation, no locks, no panics. It is forked twice, so that
//! it is not the service's child (no zombie when it exits while the
//! service lives), starts a session of its own (the terminal's Ctrl-C and
//! the service's process group do not reach it), blocks every signal
//! (only SIGKILL ends it early), and keeps no descriptor of the service
//! but the pipe (not the state directory's lock, not a listening socket,
//! not the service's stdout).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::libc;

/// The environment variable that marks every process a runner's workflows
/// start; its value is unique to the runner.
pub(crate) const INSTANCE_VAR: &str = "CLAUDE_FLOW_INSTANCE";

/// A new value for [`INSTANCE_VAR`].
pub(crate) fn new_instance() -> String {
    format!("{:x}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// A running guardian; dropping this wakes it.
#[derive(Debug)]
pub(crate) struct Guardian {
    /// The pipe's write end: the guardian waits for the end of file.
    pipe: OwnedFd,
}

impl Guardian {
    /// Forks a guardian for the processes marked with `instance`, giving
    /// them `grace` between SIGTERM and SIGKILL.
    pub(crate) fn start(instance: &str, grace: Duration) -> io::Result<Self> {
        // Everything the guardian touches is prepared here.
        let mut work = Work {
            needle: format!("{INSTANCE_VAR}={instance}").into_bytes(),
            dents: vec![0u8; 16 * 1024],
            chunk: vec![0u8; 16 * 1024],
            grace_ns: i64::try_from(grace.as_nanos()).unwrap_or(i64::MAX),
        };
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let read_fd = read.as_raw_fd();
        // SAFETY: the child of this fork (and its own child, the guardian)
        // only makes system calls on memory prepared above and never
        // returns into Rust code that could allocate, lock or unwind: it
        // ends in _exit.
        let first = unsafe { libc::fork() };
        if first < 0 {
            return Err(io::Error::last_os_error());
        }
        if first == 0 {
            // SAFETY: see above; the second fork happens in a process with
            // a single thread.
            unsafe {
                match libc::fork() {
                    0 => guardian_main(read_fd, &mut work),
                    -1 => libc::_exit(1),
                    _ => libc::_exit(0),
                }
            }
        }
        drop(read);
        // Reap the intermediate process, which exits at once; the guardian
        // is adopted by init (or the nearest subreaper).
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(first), None)
            .map_err(io::Error::from)?;
        if status != nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(first), 0) {
            return Err(io::Error::other("could not fork the guardian"));
        }
        Ok(Self { pipe: write })
    }

    /// Whether the guardian still waits (it may have been killed).
    pub(crate) fn is_alive(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.pipe.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own, without waiting.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        // POLLERR on a pipe's write end: no reader is left.
        ready >= 0 && poll.revents & libc::POLLERR == 0
    }
}

/// What the guardian works with, allocated before the fork.
struct Work {
    /// `CLAUDE_FLOW_INSTANCE=<value>`, a whole environment entry.
    needle: Vec<u8>,
    /// For getdents64 on /proc.
    dents: Vec<u8>,
    /// For reading /proc/<pid>/environ.
    chunk: Vec<u8>,
    grace_ns: i64,
}

/// The guardian process. System calls only; never returns.
fn guardian_main(pipe: RawFd, work: &mut Work) -> ! {
    const PIPE: RawFd = 3;
    // SAFETY: plain system calls on this process's own state, and on
    // buffers in `work` and on this stack.
    unsafe {
        libc::setsid();
        // What `ps -o comm` and `top` show, instead of the service's name.
        libc::prctl(libc::PR_SET_NAME, c"cf-guardian".as_ptr());
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        libc::chdir(c"/".as_ptr());
        // Keep only the pipe (as 3), with /dev/null as 0, 1 and 2.
        if pipe != PIPE && libc::dup2(pipe, PIPE) < 0 {
            libc::_exit(1);
        }
        close_from(PIPE + 1);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        // Wait for the end of file: every write end is closed.
        let mut byte = 0u8;
        loop {
            let n = libc::read(PIPE, std::ptr::from_mut(&mut byte).cast(), 1);
            if n == 0 {
                break;
            }
            if n < 0 && nix::errno::Errno::last() != nix::errno::Errno::EINTR {
                // Unable to wait, it cannot tell a dead service from a live
                // one, and stopping live work is worse: exit, and the
                // runner starts another guardian with its next workflow.
                libc::_exit(1);
            }
        }
        sweep(work);
        libc::_exit(0)
    }
}

/// Closes every descriptor from `first` on. System calls only.
fn close_from(first: RawFd) {
    let Ok(first) = u32::try_from(first) else {
        return;
    };
    // SAFETY: close_range(2) and close(2) on this process's own table.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) == 0 {
            return;
        }
        // Before Linux 5.9: each descriptor up to the limit in turn.
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) < 0 {
            return;
        }
        let last = RawFd::try_from(limit.rlim_cur).unwrap_or(RawFd::MAX);
        let first = RawFd::try_from(first).unwrap_or(RawFd::MAX);
        for fd in first..last {
            libc::close(fd);
        }
    }
}

/// SIGTERM and SIGCONT to every marked process, `grace` for all of them
/// to exit, then SIGKILL until none is left. System calls only.
fn sweep(work: &mut Work) {
    if scan(work, &[libc::SIGTERM, libc::SIGCONT]) == 0 {
        return;
    }
    let deadline = now_ns().saturating_add(work.grace_ns);
    loop {
        let left = deadline.saturating_sub(now_ns());
        if left <= 0 {
            break;
        }
        sleep_ns(left.min(50_000_000));
        if scan(work, &[]) == 0 {
            return;
        }
    }
    // A process may fork while it is being killed: repeat until a pass
    // finds nothing (bounded, in case processes keep appearing).
    for _ in 0..1000 {
        if scan(work, &[libc::SIGKILL]) == 0 {
            return;
        }
        sleep_ns(10_000_000);
    }
}

/// Sends `signals` to every live process marked with the needle; returns
/// how many there were. System calls only.
fn scan(work: &mut Work, signals: &[libc::c_int]) -> usize {
    let Work {
        needle,
        dents,
        chunk,
        ..
    } = work;
    // SAFETY: getpid(2), open(2) and close(2); getdents64(2) writes at
    // most `dents.len()` bytes into `dents`.
    let me = unsafe { libc::getpid() };
    let dir = unsafe {
        libc::open(
            c"/proc".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return 0;
    }
    let mut found = 0;
    loop {
        let n =
            unsafe { libc::syscall(libc::SYS_getdents64, dir, dents.as_mut_ptr(), dents.len()) };
        let Ok(n) = usize::try_from(n) else { break };
        if n == 0 {
            break;
        }
        for pid in pids(dents.get(..n).unwrap_or_default()) {
            if pid != me && is_marked(pid, needle, chunk) {
                found += 1;
                for &signal in signals {
                    // SAFETY: kill(2) with plain integers.
                    unsafe { libc::kill(pid, signal) };
                }
            }
        }
    }
    unsafe { libc::close(dir) };
    found
}

/// The numeric names in a getdents64 buffer: the PIDs.
fn pids(buf: &[u8]) -> impl Iterator<Item = libc::pid_t> + '_ {
    // struct linux_dirent64: d_ino (8 bytes), d_off (8), d_reclen (2),
    // d_type (1), then the NUL-terminated name.
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        loop {
            let record = buf.get(offset..)?;
            let len = usize::from(u16::from_ne_bytes([*record.get(16)?, *record.get(17)?]));
            if len == 0 {
                return None;
            }
            offset += len;
            let name = record.get(19..len.min(record.len()))?;
            let name = name.split(|b| *b == 0).next().unwrap_or_default();
            if let Some(pid) = parse_pid(name) {
                return Some(pid);
            }
        }
    })
}

fn parse_pid(name: &[u8]) -> Option<libc::pid_t> {
    if name.is_empty() {
        return None;
    }
    name.iter().try_fold(0 as libc::pid_t, |pid, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        pid.checked_mul(10)?
            .checked_add(libc::pid_t::from(b - b'0'))
    })
}

/// Whether `/proc/<pid>/environ` holds the needle as a whole entry. A
/// zombie's reads empty, so it counts as gone. System calls only.
fn is_marked(pid: libc::pid_t, needle: &[u8], chunk: &mut [u8]) -> bool {
    let mut path = [0u8; 32];
    if !environ_path(pid, &mut path) {
        return false;
    }
    // SAFETY: open(2) of a NUL-terminated path on this stack; read(2) into
    // a buffer we own, at most its length; close(2) of what we opened.
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            // Another user's process, or gone.
            return false;
        }
        let mut entry = EntryMatch::new(needle);
        loop {
            let n = libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len());
            let Ok(n) = usize::try_from(n) else { break };
            if n == 0 {
                break;
            }
            entry.feed(chunk.get(..n).unwrap_or_default());
        }
        libc::close(fd);
        entry.finish()
    }
}

/// Writes `/proc/<pid>/environ` and a NUL into `path`.
fn environ_path(pid: libc::pid_t, path: &mut [u8; 32]) -> bool {
    let mut digits = [0u8; 12];
    let mut n = pid;
    let mut len = 0;
    loop {
        let Some(slot) = digits.get_mut(len) else {
            return false;
        };
        *slot = b'0' + u8::try_from(n % 10).unwrap_or(0);
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut at = 0;
    let mut push = |b: u8| {
        if let Some(slot) = path.get_mut(at) {
            *slot = b;
            at += 1;
        }
    };
    b"/proc/".iter().for_each(|&b| push(b));
    digits.iter().take(len).rev().for_each(|&b| push(b));
    b"/environ\0".iter().for_each(|&b| push(b));
    at == 6 + len + 9
}

/// Matches a whole NUL-separated entry against a needle, fed in pieces.
struct EntryMatch<'a> {
    needle: &'a [u8],
    pos: usize,
    mismatch: bool,
    found: bool,
}

impl<'a> EntryMatch<'a> {
    fn new(needle: &'a [u8]) -> Self {
        Self {
            needle,
            pos: 0,
            mismatch: false,
            found: false,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == 0 {
                self.found |= self.complete();
                self.pos = 0;
                self.mismatch = false;
            } else if !self.mismatch {
                if self.needle.get(self.pos) == Some(&b) {
                    self.pos += 1;
                } else {
                    self.mismatch = true;
                }
            }
        }
    }

    fn complete(&self) -> bool {
        !self.mismatch && self.pos == self.needle.len()
    }

    /// At the end of the input (the last entry may lack its NUL).
    fn finish(&self) -> bool {
        self.found || self.complete()
    }
}

fn now_ns() -> i64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes to a struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec)
}

fn sleep_ns(ns: i64) {
    let pause = libc::timespec {
        tv_sec: ns / 1_000_000_000,
        tv_nsec: ns % 1_000_000_000,
    };
    // SAFETY: nanosleep(2) reads a struct we own; an early wake-up only
    // shortens one pause.
    unsafe { libc::nanosleep(&pause, std::ptr::null_mut()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(environ: &[&[u8]]) -> bool {
        let mut m = EntryMatch::new(b"CLAUDE_FLOW_INSTANCE=abc");
        for piece in environ {
            m.feed(piece);
        }
        m.finish()
    }

    #[test]
    fn only_a_whole_entry_marks_a_process() {
        assert!(marked(&[b"A=1\0CLAUDE_FLOW_INSTANCE=abc\0B=2\0"]));
        assert!(marked(&[b"CLAUDE_FLOW_INSTANCE=abc"]));
        assert!(marked(&[b"A=1\0CLAUDE_FLOW_", b"INSTANCE=a", b"bc\0"]));
        assert!(!marked(&[b"CLAUDE_FLOW_INSTANCE=abcd\0"]));
        assert!(!marked(&[b"X_CLAUDE_FLOW_INSTANCE=abc\0"]));
        assert!(!marked(&[b"CLAUDE_FLOW_INSTANCE=ab\0c\0"]));
        assert!(!marked(&[b""]));
    }

    #[test]
    fn pids_and_paths_are_read_without_allocating() {
        assert_eq!(parse_pid(b"1234"), Some(1234));
        assert_eq!(parse_pid(b"self"), None);
        assert_eq!(parse_pid(b""), None);
        assert_eq!(parse_pid(b"99999999999"), None);
        let mut path = [0u8; 32];
        assert!(environ_path(4_194_304, &mut path));
        assert!(path.starts_with(b"/proc/4194304/environ\0"));
    }

    #[test]
    fn the_proc_listing_yields_pids() {
        let mut dents = vec![0u8; 16 * 1024];
        let mut chunk = vec![0u8; 4096];
        // Our own environment does not carry a fresh marker, so nothing is
        // signalled; but the listing must see processes at all.
        let mut work = Work {
            needle: format!("{INSTANCE_VAR}={}", new_instance()).into_bytes(),
            dents: std::mem::take(&mut dents),
            chunk: std::mem::take(&mut chunk),
            grace_ns: 0,
        };
        assert_eq!(scan(&mut work, &[]), 0);
        let dir = std::fs::File::open("/proc").unwrap();
        // SAFETY: getdents64 into a buffer we own, at most its length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                work.dents.as_mut_ptr(),
                work.dents.len(),
            )
        };
        let listed: Vec<_> = pids(&work.dents[..usize::try_from(n).unwrap()]).collect();
        assert!(listed.contains(&1), "{listed:?}");
    }
}
