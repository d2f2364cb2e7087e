//! End to end, with the real binaries on local issues:
//!
//! 1. `claude-flow run --once` settling 500 issues with a no-op workflow
//!    (`true`) at max_concurrent 8, against `xargs -P 8` spawning the same
//!    500 processes, and the same run on 5,000 issues (does throughput
//!    hold as the backlog grows?), interleaved in one run so that all
//!    three see the same machine load, each on a fresh directory;
//! 2. the daemon's resident memory after settling 1,000 issues, and after
//!    a workflow that prints 1 GiB;
//! 3. the CPU an idle daemon uses with 5,000 issues waiting: all retrying
//!    an hour from now, or all queued behind a quota pause; and with none,
//!    for comparison.
//!
//! Run: `cargo bench -p claude-flow-benches --bench end_to_end`
//! (it builds the release binaries first). Results: docs/BENCHMARKS.md.

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claude_flow_core::{FileStore, IssueRecord, IssueStatus, ServiceState, StateStore};
use serde_json::{Value, json};
use support::{cpu_time, ms, spread, start_daemon, status_field, terminate};

const SMALL: usize = 500;
const LARGE: usize = 5000;
const ROUNDS: usize = 5;
/// Idle measurements per case.
const IDLE_ROUNDS: usize = 3;
/// Wall time over which the idle daemon's CPU time is measured: one clock
/// tick (10 ms) in it is 0.05 % of a core.
const IDLE_WINDOW: Duration = Duration::from_secs(20);

fn main() {
    if !support::measuring("end_to_end") {
        return;
    }
    let bin = support::build_binaries();
    throughput(&bin);
    memory(&bin, 1000, "true", "1,000 issues, no-op workflow");
    memory(
        &bin,
        1,
        "head -c 1073741824 /dev/zero",
        "1 issue printing 1 GiB",
    );
    idle(&bin);
}

/// A run directory with `issues` local issues and a configuration whose
/// `service` section is the default below with `service` merged in.
fn setup(issues: usize, command: &[&str], service: &Value) -> tempfile::TempDir {
    let dir = support::run_dir();
    let root = dir.path();
    std::fs::create_dir(root.join("issues")).unwrap();
    for n in 1..=issues {
        std::fs::write(
            root.join(format!("issues/{n}-bench.md")),
            format!("# Bench {n}\n\nbody\n"),
        )
        .unwrap();
    }
    let mut config = json!({
        "source": "local",
        "local": {"dir": "issues"},
        "workflow": {"command": command},
        "service": {"state_dir": "state", "max_concurrent": 8, "max_attempts": 1, "poll_interval": "1h", "listen": ""},
        "log": {"level": "warn"}
    });
    for (key, value) in service.as_object().unwrap() {
        config["service"][key] = value.clone();
    }
    std::fs::write(root.join("config.json"), config.to_string()).unwrap();
    dir
}

fn shell(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

/// One `claude-flow run --once`.
struct Run {
    /// Wall time, from spawning it to its exit.
    wall: Duration,
    /// CPU time (user + system) of `claude-flow` itself, without its
    /// workflows: less sensitive than wall time to what else the machine
    /// runs.
    own_cpu: Duration,
    /// Kept until the end of the benchmark: deleting thousands of files
    /// between rounds makes ext4 skip recently freed inodes on the next
    /// round's creations, a cost a running service (which keeps its logs)
    /// never pays.
    dir: tempfile::TempDir,
}

fn time_claude_flow(bin: &Path, issues: usize) -> Run {
    let dir = setup(issues, &["true"], &json!({}));
    let start = Instant::now();
    let mut child = Command::new(bin.join("claude-flow"))
        .args(["run", "--once", "--config"])
        .arg(dir.path().join("config.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut summary = String::new();
    let mut errors = String::new();
    {
        use std::io::Read;
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut summary)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut errors)
            .unwrap();
    }
    // Exited but not reaped yet: its /proc entry still holds its times.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::wait::waitid(
        nix::sys::wait::Id::Pid(pid),
        nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
    )
    .unwrap();
    let wall = start.elapsed();
    let own_cpu = cpu_time(child.id());
    assert!(child.wait().unwrap().success(), "{errors}");
    assert!(summary.contains(&format!("{issues} done")), "{summary}");
    Run { wall, own_cpu, dir }
}

fn time_xargs(lines: usize) -> Duration {
    let input: String = (1..=lines).map(|n| format!("{n}\n")).collect();
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

fn throughput(bin: &Path) {
    let (mut xa, mut small, mut large, mut keep) = (vec![], vec![], vec![], vec![]);
    let (mut cpu_small, mut cpu_large) = (vec![], vec![]);
    println!(
        "## {SMALL} and {LARGE} issues, no-op workflow, max_concurrent 8 ({ROUNDS} rounds, interleaved; load average {})",
        support::load_average()
    );
    println!(
        "{:>5} | {:>10} | {:>15} | {:>16} | {:>14} | {:>15} | {:>19}",
        "round",
        "xargs 500",
        "claude-flow 500",
        "claude-flow 5000",
        "ratio cf/xargs",
        "tput 5000 / 500",
        "own CPU/issue 500, 5000"
    );
    for round in 0..ROUNDS {
        // Alternate the order, so that neither case always follows the
        // other's files.
        let (x, s_run, l_run) = if round % 2 == 0 {
            let x = time_xargs(SMALL);
            let s = time_claude_flow(bin, SMALL);
            (x, s, time_claude_flow(bin, LARGE))
        } else {
            let l = time_claude_flow(bin, LARGE);
            let s = time_claude_flow(bin, SMALL);
            (time_xargs(SMALL), s, l)
        };
        let (s, l) = (s_run.wall, l_run.wall);
        let per_issue = |r: &Run, n: usize| ms(r.own_cpu) / n as f64;
        println!(
            "{:>5} | {:>7.1} ms | {:>12.1} ms | {:>13.1} ms | {:>14.2} | {:>15.2} | {:>8.3}, {:.3} ms",
            round + 1,
            ms(x),
            ms(s),
            ms(l),
            s.as_secs_f64() / x.as_secs_f64(),
            scaling(s, l),
            per_issue(&s_run, SMALL),
            per_issue(&l_run, LARGE)
        );
        xa.push(x);
        small.push(s);
        large.push(l);
        cpu_small.push(per_issue(&s_run, SMALL));
        cpu_large.push(per_issue(&l_run, LARGE));
        keep.extend([s_run.dir, l_run.dir]);
    }
    let (x, s, l) = (spread(&xa), spread(&small), spread(&large));
    let per_round = |f: &dyn Fn(usize) -> f64| spread(&(0..ROUNDS).map(f).collect::<Vec<_>>());
    let ratio = per_round(&|i| small[i].as_secs_f64() / xa[i].as_secs_f64());
    let scale = per_round(&|i| scaling(small[i], large[i]));
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    println!("medians (min-max):");
    println!(
        "xargs -P 8 true, {SMALL}:       {:>8.1} ms ({:.1}-{:.1})  {:>6.0} processes/s",
        ms(x.median),
        ms(x.min),
        ms(x.max),
        rate(SMALL, x.median)
    );
    println!(
        "claude-flow run --once, {SMALL}: {:>8.1} ms ({:.1}-{:.1})  {:>6.0} issues/s ({:.0}-{:.0})",
        ms(s.median),
        ms(s.min),
        ms(s.max),
        rate(SMALL, s.median),
        rate(SMALL, s.max),
        rate(SMALL, s.min)
    );
    println!(
        "claude-flow run --once, {LARGE}: {:>8.1} ms ({:.1}-{:.1})  {:>6.0} issues/s ({:.0}-{:.0})",
        ms(l.median),
        ms(l.min),
        ms(l.max),
        rate(LARGE, l.median),
        rate(LARGE, l.max),
        rate(LARGE, l.min)
    );
    println!(
        "ratio claude-flow / xargs at {SMALL}: {:.2} of the medians; per round {:.2}-{:.2} (target <= 1.5)",
        s.median.as_secs_f64() / x.median.as_secs_f64(),
        ratio.min,
        ratio.max
    );
    println!(
        "throughput {LARGE} / throughput {SMALL}: {:.2} of the medians; per round {:.2}-{:.2} (target >= 0.8)",
        scaling(s.median, l.median),
        scale.min,
        scale.max
    );
    let (cs, cl) = (spread(&cpu_small), spread(&cpu_large));
    println!(
        "claude-flow's own CPU per issue: {SMALL}: {:.3} ms ({:.3}-{:.3}), {LARGE}: {:.3} ms ({:.3}-{:.3})",
        cs.median, cs.min, cs.max, cl.median, cl.min, cl.max
    );
    println!("load average at the end: {}", support::load_average());
}

/// Throughput at LARGE over throughput at SMALL.
fn scaling(small: Duration, large: Duration) -> f64 {
    (LARGE as f64 / large.as_secs_f64()) / (SMALL as f64 / small.as_secs_f64())
}

fn stop_daemon(mut daemon: Child) {
    terminate(&daemon);
    daemon.wait().unwrap();
}

/// Reads the daemon's state store (read-only, as `claude-flow list` does)
/// until `done` says it shows what the bench waits for.
fn wait_for_store(
    dir: &Path,
    what: &str,
    mut done: impl FnMut(&[IssueRecord], &ServiceState) -> bool,
) -> Duration {
    let start = Instant::now();
    let store_dir = dir.join("state");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    loop {
        let state = FileStore::open_read_only(&store_dir).ok().and_then(|s| {
            let records = rt.block_on(s.load()).ok()?;
            let service = rt.block_on(s.load_service()).ok()?;
            Some((records, service))
        });
        if let Some((records, service)) = state
            && done(&records, &service)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the daemon did not get to: {what}; its log: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn memory(bin: &Path, issues: usize, workflow: &str, what: &str) {
    let command = if workflow == "true" {
        vec!["true"]
    } else {
        shell(workflow)
    };
    let dir = setup(issues, &command, &json!({}));
    let daemon = start_daemon(bin, dir.path());
    let took = wait_for_store(dir.path(), "every issue settled", |records, _| {
        records.iter().filter(|r| r.status.is_settled()).count() == issues
    });
    let pid = daemon.id();
    println!("## daemon memory after settling {what}");
    println!(
        "VmRSS {}  VmHWM (peak) {}  settled in {:.1} s",
        status_field(pid, "VmRSS:"),
        status_field(pid, "VmHWM:"),
        took.as_secs_f64()
    );
    stop_daemon(daemon);
}

#[derive(Clone, Copy)]
enum Idle {
    /// No issues at all: the daemon's floor.
    Empty,
    /// Every issue failed once and retries in about an hour.
    Retrying,
    /// The first workflows reported their quota exhausted: a pause of an
    /// hour, every issue queued.
    Paused,
}

impl Idle {
    fn name(self) -> String {
        match self {
            Self::Empty => "no issues".into(),
            Self::Retrying => format!("{LARGE} issues retrying in ~1h"),
            Self::Paused => format!("{LARGE} issues queued, quota pause 1h"),
        }
    }
}

/// A daemon's CPU use over [`IDLE_WINDOW`] once it has nothing to do but
/// wait, in percent of one core: from its clock ticks, and from the
/// scheduler's nanoseconds; and its resident memory then.
fn idle_once(bin: &Path, case: Idle) -> (f64, f64, String) {
    let service = json!({"max_attempts": 3, "retry_backoff": "1h", "retry_backoff_max": "1h"});
    let dir = match case {
        Idle::Empty => setup(0, &["false"], &service),
        Idle::Retrying => setup(LARGE, &["false"], &service),
        Idle::Paused => setup(
            LARGE,
            &shell("echo 'claude-flow: retry-after 3600'; exit 75"),
            &service,
        ),
    };
    let daemon = start_daemon(bin, dir.path());
    match case {
        Idle::Empty => {
            // The daemon has opened its store (and polls right after).
            let lock = dir.path().join("state/lock");
            wait_for_store(dir.path(), "the store open", |_, _| lock.exists());
        }
        Idle::Retrying => {
            wait_for_store(dir.path(), "every issue retrying", |records, _| {
                records.len() == LARGE && records.iter().all(|r| r.status == IssueStatus::Retrying)
            });
        }
        Idle::Paused => {
            wait_for_store(
                dir.path(),
                "paused, every issue queued",
                |records, service| {
                    service.paused_until.is_some()
                        && records.len() == LARGE
                        && records.iter().all(|r| r.status == IssueStatus::Queued)
                },
            );
        }
    }
    // What follows a transition (reports, relaxed writes) is over by now.
    std::thread::sleep(Duration::from_secs(2));
    let pid = daemon.id();
    let before = cpu_time(pid);
    let before_ns = support::on_cpu(pid);
    let start = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let used = cpu_time(pid) - before;
    let used_ns = support::on_cpu_since(pid, &before_ns);
    let wall = start.elapsed();
    let rss = status_field(pid, "VmRSS:");
    stop_daemon(daemon);
    let percent = |d: Duration| 100.0 * d.as_secs_f64() / wall.as_secs_f64();
    (percent(used), percent(used_ns), rss)
}

fn idle(bin: &Path) {
    let cases = [Idle::Empty, Idle::Retrying, Idle::Paused];
    let mut ticks: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut exact: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    println!(
        "## idle daemon: CPU time over {} s of wall time, % of one core ({IDLE_ROUNDS} rounds, interleaved)",
        IDLE_WINDOW.as_secs()
    );
    println!(
        "utime+stime from /proc/<pid>/stat (clock ticks); on-CPU ns from /proc/<pid>/task/*/schedstat"
    );
    for round in 0..IDLE_ROUNDS {
        for (i, case) in cases.iter().enumerate() {
            let (t, e, rss) = idle_once(bin, *case);
            println!(
                "round {}: {:<36} ticks {t:>6.3} %  schedstat {e:>7.4} %  VmRSS {rss}",
                round + 1,
                case.name()
            );
            ticks[i].push(t);
            exact[i].push(e);
        }
    }
    for (i, case) in cases.iter().enumerate() {
        let (t, e) = (spread(&ticks[i]), spread(&exact[i]));
        println!(
            "{:<36} ticks: median {:.3} %, {:.3}-{:.3} %; schedstat: median {:.4} %, {:.4}-{:.4} % (target < 1 %)",
            case.name(),
            t.median,
            t.min,
            t.max,
            e.median,
            e.min,
            e.max
        );
    }
}
