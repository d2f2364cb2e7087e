//! The service killed outright, and two instances on one state directory.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use std::collections::BTreeMap;

use common::{Fixture, alive, read_pid, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

/// Blocks until `<root>/gate` exists, leaving pid files for itself and a
/// grandchild, then appends to `<root>/ledger` once it completes.
const GATED: &str = r#"root=../../../..
sleep 600 &
echo $! > grandchild-$CLAUDE_FLOW_ATTEMPT.pid
echo $$ > child-$CLAUDE_FLOW_ATTEMPT.pid
while [ ! -e $root/gate ]; do sleep 0.05; done
kill %1
echo "done $CLAUDE_FLOW_ISSUE_NUMBER" >> $root/ledger"#;

fn started(f: &Fixture, n: u64, attempt: u32) -> Option<i32> {
    let path = f.workspace(n).join(format!("child-{attempt}.pid"));
    std::fs::read_to_string(path)
        .ok()
        .filter(|s| s.ends_with('\n'))
        .and_then(|s| s.trim().parse().ok())
}

#[test]
fn after_sigkill_and_restart_every_issue_settles_exactly_once_and_nothing_is_left_running() {
    let f = Fixture::new();
    f.config(json!({"service": {"max_concurrent": 2}}));
    for n in 1..=4 {
        f.issue(n, &format!("Issue {n}"), "");
    }
    f.workflow(GATED);
    let mut service = f.cli_process(&["run", "--once"]).spawn().unwrap();
    wait_for("two workflows to start", || {
        (1..=4).filter(|n| started(&f, *n, 1).is_some()).count() == 2
    });
    kill(Pid::from_raw(service.id() as i32), Signal::SIGKILL).unwrap();
    service.wait().unwrap();

    let interrupted: Vec<u64> = (1..=4).filter(|n| started(&f, *n, 1).is_some()).collect();
    let mut leftovers = Vec::new();
    for n in &interrupted {
        let child = started(&f, *n, 1).unwrap();
        // The workflow dies with the service (parent-death signal).
        wait_for(&format!("workflow {child} to die with the service"), || {
            !alive(child)
        });
        leftovers.push(read_pid(&f.workspace(*n).join("grandchild-1.pid")));
    }

    std::fs::write(f.path("gate"), "").unwrap();
    f.cli()
        .args(["run", "--once"])
        .assert()
        .success()
        .stdout(predicates::str::contains("4 done"));

    for pid in leftovers {
        assert!(
            !alive(pid),
            "process {pid} of an interrupted attempt is still running"
        );
    }
    let ledger = std::fs::read_to_string(f.path("ledger")).unwrap();
    let mut completions: BTreeMap<String, usize> = BTreeMap::new();
    for line in ledger.lines() {
        *completions.entry(line.to_owned()).or_default() += 1;
    }
    let once_each: BTreeMap<String, usize> = (1..=4).map(|n| (format!("done {n}"), 1)).collect();
    assert_eq!(
        completions, once_each,
        "each issue must complete exactly once"
    );
    for record in f.list() {
        assert_eq!(record["status"], "done", "{record}");
    }
    for n in interrupted {
        let shown = f.show(n);
        let kinds: Vec<_> = shown["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["outcome"]["kind"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(kinds, ["interrupted", "succeeded"], "issue {n}");
    }
}

#[test]
fn a_second_instance_exits_75_naming_the_holder_and_a_graceful_stop_resumes_later() {
    let f = Fixture::new();
    f.config(json!({"service": {"shutdown_grace": "300ms"}, "workflow": {"kill_grace": "1s"}}));
    f.issue(1, "Long", "");
    f.workflow(GATED);
    let mut first = f.cli_process(&["run"]).spawn().unwrap();
    wait_for("the workflow to start", || started(&f, 1, 1).is_some());

    let out = f.cli().args(["run", "--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(75));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("locked") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );

    // Read commands work while the service holds the lock.
    assert_eq!(f.list()[0]["status"], "running");
    f.cli()
        .arg("status")
        .assert()
        .success()
        .stdout(predicates::str::contains(format!(
            "running (pid {})",
            first.id()
        )));

    kill(Pid::from_raw(first.id() as i32), Signal::SIGTERM).unwrap();
    assert!(first.wait().unwrap().success(), "a graceful stop exits 0");
    assert!(!alive(started(&f, 1, 1).unwrap()));
    assert_eq!(
        f.show(1)["status"],
        "queued",
        "the interrupted issue waits for the next start"
    );

    std::fs::write(f.path("gate"), "").unwrap();
    f.cli().args(["run", "--once"]).assert().success();
    assert_eq!(f.show(1)["status"], "done");
}

#[test]
fn a_second_sigint_stops_run_at_once_and_still_records_the_workflow() {
    use std::io::BufRead;
    let f = Fixture::new();
    f.config(json!({"service": {"shutdown_grace": "1h"}, "workflow": {"kill_grace": "1s"}}));
    f.issue(1, "Long", "");
    f.workflow(GATED);
    let mut run = f
        .cli_process(&["run"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the workflow to start", || started(&f, 1, 1).is_some());
    let workflow = started(&f, 1, 1).unwrap();
    let mut log = std::io::BufReader::new(run.stderr.take().unwrap()).lines();
    kill(Pid::from_raw(run.id() as i32), Signal::SIGINT).unwrap();
    // Two signals sent back to back may arrive as one.
    assert!(
        log.by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("stopping gracefully"))
    );
    kill(Pid::from_raw(run.id() as i32), Signal::SIGINT).unwrap();
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(0), "an operator's stop is a success");
    assert!(!alive(workflow));
    let shown = f.show(1);
    assert_eq!(shown["status"], "queued");
    assert_eq!(shown["attempts"][0]["outcome"]["kind"], "interrupted");
}

/// Starts three processes that leave the workflow's process group in
/// different ways, each writing its PID to `<name>.pid` once it is set up:
/// a new session, a new session that ignores SIGTERM, and a new process
/// group (job control).
const ESCAPING: &str = r#"setsid bash -c 'echo $$ > session.tmp; mv session.tmp session.pid; exec sleep 600' &
setsid bash -c 'trap "" TERM; echo $$ > stubborn.tmp; mv stubborn.tmp stubborn.pid; while :; do sleep 1; done' &
bash -c 'set -m; sleep 600 & echo $! > group.tmp; mv group.tmp group.pid; wait' &
wait"#;

/// Kills the listed processes if the test fails, so that a failure leaves
/// nothing behind. (Not after a success: the PIDs may belong to other
/// processes by then.)
struct Reaper(Vec<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for pid in &self.0 {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
    }
}

#[test]
fn after_sigkill_nothing_a_workflow_started_outlives_the_service_by_more_than_the_grace() {
    let f = Fixture::new();
    f.config(json!({"workflow": {"kill_grace": "1s"}}));
    f.issue(1, "Escapes", "");
    f.workflow(ESCAPING);
    let mut service = f.cli_process(&["run"]).spawn().unwrap();
    let names = ["session", "stubborn", "group"];
    let pid_file = |name: &str| f.workspace(1).join(format!("{name}.pid"));
    wait_for("the workflow's processes to start", || {
        names.iter().all(|name| pid_file(name).exists())
    });
    let escaped = Reaper(names.iter().map(|name| read_pid(&pid_file(name))).collect());
    for pid in &escaped.0 {
        assert!(alive(*pid), "process {pid} did not start");
    }

    kill(Pid::from_raw(service.id() as i32), Signal::SIGKILL).unwrap();
    service.wait().unwrap();

    // kill_grace (1 s) plus a margin for a loaded machine.
    let bound = std::time::Duration::from_secs(30);
    let start = std::time::Instant::now();
    for (name, pid) in names.iter().zip(&escaped.0) {
        while alive(*pid) {
            assert!(
                start.elapsed() < bound,
                "the {name} process ({pid}) outlived the service"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
