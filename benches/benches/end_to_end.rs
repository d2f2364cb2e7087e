//! End to end: the real `claude-flow` binary settling 500 local issues with
//! a no-op workflow (`true`) at max_concurrent 8, against `xargs -P 8`
//! spawning the same 500 processes, interleaved in one run so both see the
//! same machine load; then the daemon's resident memory after settling
//! 1,000 issues, and after a workflow that prints 1 GiB.
//!
//! Run: `cargo bench -p claude-flow-benches --bench end_to_end`
//! (it builds the release binaries first). Results: docs/BENCHMARKS.md.

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use claude_flow_core::{FileStore, StateStore};

const ISSUES: usize = 500;
const ROUNDS: usize = 5;

fn main() {
    // `cargo bench` passes --bench; `cargo test` runs benches with no
    // arguments only when asked, so be quick then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let bin = build_binaries();
    if quick {
        println!("end_to_end: pass --bench (cargo bench) to measure");
        return;
    }
    throughput(&bin);
    memory(&bin, 1000, "true", "1,000 issues, no-op workflow");
    memory(
        &bin,
        1,
        "head -c 1073741824 /dev/zero",
        "1 issue printing 1 GiB",
    );
}

fn build_binaries() -> PathBuf {
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
        .unwrap();
    assert!(status.success(), "building the binaries failed");
    // target/release/deps/end_to_end-<hash> → target/release
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_owned()
}

/// Runs live under `target/bench-e2e/`, not the system's temporary
/// directory: on ext4 without a journal (as here), creating files next to
/// thousands just deleted (a test run's temporary directories) is several
/// times slower, because the allocator skips recently freed inodes, and
/// that would be measured instead of claude-flow.
fn setup(issues: usize, workflow: &str) -> tempfile::TempDir {
    let exe = std::env::current_exe().unwrap();
    let base = exe.ancestors().nth(3).unwrap().join("bench-e2e");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("issues")).unwrap();
    for n in 1..=issues {
        std::fs::write(
            root.join(format!("issues/{n}-bench.md")),
            format!("# Bench {n}\n\nbody\n"),
        )
        .unwrap();
    }
    let command: Vec<&str> = if workflow == "true" {
        vec!["true"]
    } else {
        vec!["sh", "-c", workflow]
    };
    let config = serde_json::json!({
        "source": "local",
        "local": {"dir": "issues"},
        "workflow": {"command": command},
        "service": {"state_dir": "state", "max_concurrent": 8, "max_attempts": 1, "poll_interval": "1h", "listen": ""},
        "log": {"level": "warn"}
    });
    std::fs::write(root.join("config.json"), config.to_string()).unwrap();
    dir
}

/// Returns the run's directory too: deleting thousands of files between
/// rounds makes ext4 skip recently freed inodes on the next round's
/// creations, a cost a running service (which keeps its logs) never pays.
fn time_claude_flow(bin: &Path) -> (Duration, tempfile::TempDir) {
    let dir = setup(ISSUES, "true");
    let start = Instant::now();
    let out = Command::new(bin.join("claude-flow"))
        .args(["run", "--once", "--config"])
        .arg(dir.path().join("config.json"))
        .output()
        .unwrap();
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains(&format!("{ISSUES} done")), "{summary}");
    (took, dir)
}

fn time_xargs() -> Duration {
    let input: String = (1..=ISSUES).map(|n| format!("{n}\n")).collect();
    let start = Instant::now();
    let mut child = Command::new("xargs")
        .args(["-P", "8", "-n", "1", "true"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    assert!(child.wait().unwrap().success());
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn throughput(bin: &Path) {
    let (mut cf, mut xa, mut keep) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        xa.push(time_xargs());
        let (took, dir) = time_claude_flow(bin);
        cf.push(took);
        keep.push(dir);
    }
    let (cf, xa) = (median(cf), median(xa));
    println!(
        "## {ISSUES} issues, no-op workflow, max_concurrent 8 (median of {ROUNDS}, interleaved)"
    );
    println!(
        "claude-flow run --once: {:>8.1} ms  {:>7.0} issues/s",
        ms(cf),
        ISSUES as f64 / cf.as_secs_f64()
    );
    println!(
        "xargs -P 8 true:        {:>8.1} ms  {:>7.0} processes/s",
        ms(xa),
        ISSUES as f64 / xa.as_secs_f64()
    );
    println!(
        "ratio claude-flow / xargs: {:.2}",
        cf.as_secs_f64() / xa.as_secs_f64()
    );
}

fn memory(bin: &Path, issues: usize, workflow: &str, what: &str) {
    let dir = setup(issues, workflow);
    let mut daemon = Command::new(bin.join("claude-flow-daemon"))
        .arg("--config")
        .arg(dir.path().join("config.json"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let store_dir = dir.path().join("state");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    loop {
        let settled = FileStore::open_read_only(&store_dir)
            .ok()
            .and_then(|s| rt.block_on(s.load()).ok())
            .map(|all| all.iter().filter(|r| r.status.is_settled()).count())
            .unwrap_or(0);
        if settled == issues {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the daemon did not settle {issues} issues"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    println!("## daemon memory after settling {what}");
    println!(
        "VmRSS {}  VmHWM (peak) {}  settled in {:.1} s",
        field("VmRSS:"),
        field("VmHWM:"),
        start.elapsed().as_secs_f64()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    daemon.wait().unwrap();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
