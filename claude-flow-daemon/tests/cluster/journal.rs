//! The workflow every daemon runs, and what it writes.
//!
//! The script appends one line to a journal shared by all daemons when it
//! starts, when it ends by itself and when it is told to stop (SIGTERM):
//! `<event> <issue> <node> <epoch ns> <run id> <shell pid> <sleeper pid>`.
//! Lines are short and appended with `O_APPEND`, so writers on several
//! daemons never mix their bytes. Times are the wall clock, as the test's
//! own `SystemTime::now()` reads it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Nanoseconds since the epoch.
pub type Ns = u128;

/// `at` in nanoseconds since the epoch.
pub fn ns(at: SystemTime) -> Ns {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Now, in nanoseconds since the epoch.
pub fn now_ns() -> Ns {
    ns(SystemTime::now())
}

/// A duration in nanoseconds.
pub fn ns_of(d: Duration) -> Ns {
    d.as_nanos()
}

/// Seconds, for messages.
pub fn secs(ns: Ns) -> f64 {
    // Precision to the microsecond is plenty for a message.
    (ns / 1_000) as f64 / 1e6
}

/// The workflow: takes the node's name as its argument, works for
/// `seconds`, prints a pull request of the issue's own repository and
/// exits 0. On SIGTERM it notes `term`, stops its sleeper and exits 143.
/// `sleep` runs in the background and the shell waits for it, so that the
/// shell handles SIGTERM at once instead of after the sleep. The time is
/// bash's own clock (`EPOCHREALTIME`, microseconds): no `date` process that
/// a SIGTERM to the workflow's processes could kill mid-line.
pub fn script(journal: &Path, seconds: f64, repo: &str) -> String {
    format!(
        r#"#!/bin/bash
node="$1"
journal='{journal}'
child=
note() {{
    echo "$1 $CLAUDE_FLOW_ISSUE_NUMBER $node ${{EPOCHREALTIME/./}}000 $CLAUDE_FLOW_RUN_ID $$ ${{child:-0}}" >> "$journal"
}}
trap 'note term; [ -n "$child" ] && kill "$child" 2>/dev/null; exit 143' TERM
sleep {seconds} &
child=$!
note start
wait "$child"
note end
echo "opened https://github.com/{repo}/pull/$((1000 + CLAUDE_FLOW_ISSUE_NUMBER))"
exit 0
"#,
        journal = journal.display()
    )
}

/// How a run ended, as far as the journal says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The workflow finished its work and exited 0.
    Completed,
    /// It was told to stop (SIGTERM) and did.
    Terminated,
}

/// One run of the workflow.
#[derive(Debug, Clone)]
pub struct Run {
    pub issue: u64,
    pub node: String,
    pub run_id: String,
    /// The shell's and its sleeper's process ids.
    pub pids: [u32; 2],
    pub start: Ns,
    pub end: Option<(Ending, Ns)>,
}

impl Run {
    /// Whether the workflow finished its work by itself.
    pub fn completed(&self) -> bool {
        matches!(self.end, Some((Ending::Completed, _)))
    }
}

/// Every run in the journal, in order of start.
pub fn read(path: &Path) -> Vec<Run> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Keyed by run id and shell pid: unique per run even if a product bug
    // gave two runs one run id.
    let mut runs: BTreeMap<(String, u32), Run> = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [event, issue, node, at, run_id, pid, child] = fields.as_slice() else {
            panic!("a journal line not of the workflow's shape: {line:?}");
        };
        let (Ok(issue), Ok(at), Ok(pid), Ok(child)) = (
            issue.parse::<u64>(),
            at.parse::<Ns>(),
            pid.parse::<u32>(),
            child.parse::<u32>(),
        ) else {
            panic!("a journal line with bad numbers: {line:?}");
        };
        let run = runs
            .entry(((*run_id).to_owned(), pid))
            .or_insert_with(|| Run {
                issue,
                node: (*node).to_owned(),
                run_id: (*run_id).to_owned(),
                pids: [pid, child],
                start: at,
                end: None,
            });
        match *event {
            "start" => {
                run.start = at;
                run.pids = [pid, child];
            }
            "end" => run.end = Some((Ending::Completed, at)),
            "term" => {
                // A term after the end (the service stopping a workflow
                // that is exiting anyway) does not change how it ended.
                if run.end.is_none() {
                    run.end = Some((Ending::Terminated, at));
                }
            }
            other => panic!("unknown journal event {other:?} in {line:?}"),
        }
    }
    let mut runs: Vec<Run> = runs.into_values().collect();
    runs.sort_by_key(|r| r.start);
    runs
}

/// Whether a process is gone (or a zombie, which runs nothing).
pub fn process_gone(pid: u32) -> bool {
    if pid == 0 {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}
