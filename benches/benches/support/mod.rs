//! What the benchmarks that run the real binaries share: building and
//! starting them, a place for their runs, the daemon's CPU time and
//! memory, the database's transaction count, and a summary of several
//! measurements.

// Each bench target uses part of this.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Whether to measure: `cargo bench` passes `--bench`; without it (a
/// `cargo test` of the benches) only say how to.
pub fn measuring(name: &str) -> bool {
    let measuring = std::env::args().any(|a| a == "--bench");
    if !measuring {
        println!("{name}: pass --bench (cargo bench) to measure");
    }
    measuring
}

/// Builds the release binaries and returns the folder holding them; or,
/// when `CLAUDE_FLOW_BENCH_BIN` names a folder, uses the binaries there
/// (an older build, to compare with).
pub fn build_binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLAUDE_FLOW_BENCH_BIN") {
        let dir = PathBuf::from(dir);
        println!("binaries from CLAUDE_FLOW_BENCH_BIN: {}", dir.display());
        return dir;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "claude-flow-cli",
            "-p",
            "claude-flow-daemon",
        ])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the binaries failed");
    // target/release/deps/<bench>-<hash> → target/release
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/release")
        .to_owned()
}

/// A fresh directory for one run, under `target/bench-e2e/`, not the
/// system's temporary directory: on ext4 without a journal (as here),
/// creating files next to thousands just deleted (a test run's temporary
/// directories) is several times slower, because the allocator skips
/// recently freed inodes, and that would be measured instead of
/// claude-flow.
pub fn run_dir() -> tempfile::TempDir {
    let exe = std::env::current_exe().expect("own path");
    let base = exe.ancestors().nth(3).expect("target/").join("bench-e2e");
    std::fs::create_dir_all(&base).expect("target/bench-e2e");
    tempfile::tempdir_in(base).expect("a run directory")
}

/// CPU time a process has used so far, user and system, all threads:
/// fields 14 and 15 of `/proc/<pid>/stat`, in clock ticks.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("(comm)") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (the state).
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .expect("sysconf")
        .expect("_SC_CLK_TCK");
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// Nanoseconds each thread of a process has spent on a CPU (the first
/// field of `/proc/<pid>/task/<tid>/schedstat`), by thread id.
pub fn on_cpu(pid: u32) -> HashMap<u32, u64> {
    let mut threads = HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/<pid>/task") {
        let entry = entry.expect("a thread");
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A thread may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = stat.split(' ').next().and_then(|v| v.parse().ok()) {
            threads.insert(tid, ns);
        }
    }
    threads
}

/// On-CPU time of a process's threads since `before` ([`on_cpu`]).
/// Threads that ended in between are missing, so this can only
/// undercount; the clock ticks of [`cpu_time`] count them.
pub fn on_cpu_since(pid: u32, before: &HashMap<u32, u64>) -> Duration {
    let ns: u64 = on_cpu(pid)
        .iter()
        .map(|(tid, ns)| ns - before.get(tid).copied().unwrap_or(0))
        .sum();
    Duration::from_nanos(ns)
}

/// The load average over 1, 5 and 15 minutes.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A field of `/proc/<pid>/status`, e.g. `VmRSS:`, as written there.
pub fn status_field(pid: u32, name: &str) -> String {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// Minimum, median and maximum of some measurements.
#[derive(Debug, Clone, Copy)]
pub struct Spread<T> {
    pub min: T,
    pub median: T,
    pub max: T,
}

pub fn spread<T: Copy + PartialOrd>(values: &[T]) -> Spread<T> {
    assert!(!values.is_empty(), "no measurements");
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    Spread {
        min: v[0],
        median: v[v.len() / 2],
        max: v[v.len() - 1],
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sends SIGTERM to a process.
pub fn terminate(child: &std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
}

/// Starts the daemon on a run directory; its log goes to `daemon.log`
/// there.
pub fn start_daemon(bin: &Path, dir: &Path) -> std::process::Child {
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    Command::new(bin.join("claude-flow-daemon"))
        .arg("--config")
        .arg(dir.join("config.json"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Transactions the database `name` has committed or rolled back, as the
/// server's statistics say now (a fresh snapshot, not the one this
/// connection's transaction last took).
pub async fn transactions(conn: &mut sqlx::PgConnection, name: &str) -> i64 {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query_scalar::<_, i64>(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}
