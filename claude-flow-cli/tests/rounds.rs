//! Rounds and attempts: `list`, `show` and `logs` number attempts within
//! their round, as the workflow sees them (`CLAUDE_FLOW_ROUND`,
//! `CLAUDE_FLOW_ATTEMPT`) and as the logs are named.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use common::{Fixture, wait_for};

/// Fails the first attempt of every round and succeeds the second.
const SECOND_TIME_LUCKY: &str = r#"echo "round $CLAUDE_FLOW_ROUND attempt $CLAUDE_FLOW_ATTEMPT"
[ "$CLAUDE_FLOW_ATTEMPT" = 1 ] && exit 3
echo ok"#;

fn stdout(f: &Fixture, args: &[&str]) -> String {
    f.stdout(args)
}

/// Issue 1 after two rounds of two attempts each.
fn two_rounds() -> Fixture {
    let f = Fixture::new();
    f.issue(1, "Twice", "");
    f.workflow(SECOND_TIME_LUCKY);
    f.cli().args(["run", "--once"]).assert().success();
    f.cli()
        .args(["retry", "1"])
        .assert()
        .success()
        .stdout(predicates::str::contains("queued (round 2)"));
    f.cli().args(["run", "--once"]).assert().success();
    f
}

#[test]
fn list_show_and_logs_number_attempts_within_their_round() {
    let f = two_rounds();
    for round in 1..=2 {
        for attempt in 1..=2 {
            let log = std::fs::read_to_string(f.round_log(1, round, attempt)).unwrap();
            assert!(
                log.starts_with(&format!("round {round} attempt {attempt}\n")),
                "{log}"
            );
        }
    }

    let list = f.list();
    assert_eq!(
        (&list[0]["status"], &list[0]["round"], &list[0]["attempts"]),
        (&"done".into(), &2.into(), &2.into())
    );
    let table = stdout(&f, &["list"]);
    let mut lines = table.lines();
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header[..4],
        ["ISSUE", "STATUS", "ROUND", "ATTEMPTS"],
        "{table}"
    );
    let row: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[..4], ["local/issues#1", "done", "2", "2"], "{table}");

    let shown = stdout(&f, &["show", "1"]);
    let attempts: Vec<String> = shown
        .lines()
        .skip_while(|l| !l.starts_with("round "))
        // A failed attempt's log lines are quoted under it, indented.
        .filter(|l| !l.starts_with("    "))
        .map(|l| {
            let words: Vec<_> = l.split_whitespace().collect();
            match words[..] {
                ["round", ..] => l.to_owned(),
                // attempt, number, start, duration, outcome
                ["attempt", n, _, _, outcome, ..] => format!("attempt {n} {outcome}"),
                _ => panic!("unexpected line {l:?} in\n{shown}"),
            }
        })
        .collect();
    assert_eq!(
        attempts,
        [
            "round 1:",
            "attempt 1 failed",
            "attempt 2 succeeded",
            "round 2 (current):",
            "attempt 1 failed",
            "attempt 2 succeeded",
        ],
        "{shown}"
    );
    assert!(
        shown.contains(&f.round_log(1, 2, 2).display().to_string()),
        "{shown}"
    );

    // The latest attempt by default; --attempt within the current round
    // unless --round says another.
    assert_eq!(stdout(&f, &["logs", "1"]), "round 2 attempt 2\nok\n");
    assert_eq!(
        stdout(&f, &["logs", "1", "--attempt", "1"]),
        "round 2 attempt 1\n"
    );
    assert_eq!(
        stdout(&f, &["logs", "1", "--round", "1", "--attempt", "1"]),
        "round 1 attempt 1\n"
    );
    assert_eq!(
        stdout(&f, &["logs", "1", "--round", "1"]),
        "round 1 attempt 2\nok\n"
    );
    let out = f
        .cli()
        .args(["logs", "1", "--attempt", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("local/issues#1 has no attempt 3 in round 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn logs_follow_follows_the_running_attempt_of_a_later_round() {
    let f = Fixture::new();
    f.issue(1, "Again", "");
    // Round 1 ends at once; round 2 waits for the gate.
    f.workflow(
        r#"echo "round $CLAUDE_FLOW_ROUND"
[ "$CLAUDE_FLOW_ROUND" = 1 ] && exit 0
while [ ! -e ../../../../gate ]; do sleep 0.05; done
echo "last line""#,
    );
    f.cli().args(["run", "--once"]).assert().success();
    f.cli().args(["retry", "1"]).assert().success();
    let mut service = f.cli_process(&["run", "--once"]).spawn().unwrap();
    wait_for("round 2 to log its first line", || {
        std::fs::read_to_string(f.round_log(1, 2, 1)).is_ok_and(|l| l.contains("round 2"))
    });
    let mut follow = f
        .cli_process(&["logs", "1", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = follow.stdout.take().unwrap();
    let mut seen = Vec::new();
    common::read_until(&mut out, &mut seen, "round 2");
    std::fs::write(f.path("gate"), "").unwrap();
    assert!(service.wait().unwrap().success());
    {
        use std::io::Read;
        out.read_to_end(&mut seen).unwrap();
    }
    assert!(follow.wait().unwrap().success());
    // Round 1's attempt 1 ended long ago: following it would have stopped
    // before the last line.
    assert_eq!(String::from_utf8(seen).unwrap(), "round 2\nlast line\n");
}
