//! Runs the real `examples/workflows/claude-code.sh` with real git against a
//! local bare repository, and stub `claude`, `npx` and `gh` executables that
//! record what they were given. Nothing touches the network or the user's
//! git configuration: HOME, GIT_CONFIG_GLOBAL and the rest of the
//! environment are the test's own.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/workflows/claude-code.sh"
);
const REPO: &str = "acme/widgets";
const ISSUE_URL: &str = "https://github.com/acme/widgets/issues/7";
const BRANCH: &str = "claude-flow/issue-7";
const PR_URL: &str = "https://github.com/acme/widgets/pull/42";
const TITLE: &str = "Make the widget spin";
const BODY: &str = "The widget should spin.\n\nIt does not.\n";

/// The stub agent. `STUB_CLAUDE_MODE` picks its behaviour; every call
/// records its arguments (NUL-separated), stdin, environment and cwd.
const CLAUDE_STUB: &str = r#"#!/usr/bin/env bash
set -u
if [ "${1:-}" = --version ]; then echo "9.9.9 (Claude Code stub)"; exit 0; fi
d=$STUB_DIR
n=$(( $(cat "$d/claude.count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$d/claude.count"
printf '%s\0' "$@" > "$d/claude.$n.args"
cat > "$d/claude.$n.stdin"
env > "$d/claude.$n.env"
pwd > "$d/claude.$n.cwd"
case "$STUB_CLAUDE_MODE" in
edit) printf 'change from call %s\n' "$n" >> agent-change.txt; echo "Implemented it." ;;
noop) echo "Nothing to change." ;;
fail-after-edit) printf 'partial work\n' > partial.txt; echo "something broke" >&2; exit 1 ;;
limit) printf '%s\n' "$STUB_LIMIT_MESSAGE"; exit 1 ;;
limit-after-edit) printf 'partial work\n' > partial.txt; printf '%s\n' "$STUB_LIMIT_MESSAGE"; exit 1 ;;
other-branch) git checkout -q -b agent-side && printf 'side\n' > side.txt && git add side.txt &&
  git -c user.name=Agent -c user.email=agent@example.invalid commit -q -m "agent's own commit" || exit 98 ;;
someone-pushes) printf 'change from call %s\n' "$n" >> agent-change.txt
  t=$(mktemp -d) && git clone -q "$STUB_REMOTE" "$t/c" && git -C "$t/c" checkout -q "$STUB_BRANCH" &&
  printf 'review\n' > "$t/c/reviewer.txt" && git -C "$t/c" add reviewer.txt &&
  git -C "$t/c" -c user.name=Reviewer -c user.email=reviewer@example.invalid commit -q -m "reviewer's fix" &&
  git -C "$t/c" push -q origin "$STUB_BRANCH" || exit 98 ;;
hang-after-edit) printf 'partial work\n' > partial.txt; echo "stub agent ready"; exec sleep 600 ;;
*) echo "claude stub: unknown mode $STUB_CLAUDE_MODE" >&2; exit 99 ;;
esac
"#;

/// Stands in for `npx --yes claude-flow@alpha ...`.
const NPX_STUB: &str = r#"#!/usr/bin/env bash
set -u
for a in "$@"; do [ "$a" = --version ] && { echo "v0.0.0-stub"; exit 0; }; done
d=$STUB_DIR
n=$(( $(cat "$d/npx.count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$d/npx.count"
printf '%s\0' "$@" > "$d/npx.$n.args"
cat > "$d/npx.$n.stdin"
env > "$d/npx.$n.env"
printf 'swarm change\n' >> swarm-change.txt
echo "swarm finished"
"#;

/// Answers `gh pr list` with the PR once `gh pr create` has been called.
const GH_STUB: &str = r#"#!/usr/bin/env bash
set -u
d=$STUB_DIR
n=$(( $(cat "$d/gh.count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$d/gh.count"
printf '%s\0' "$@" > "$d/gh.$n.args"
env > "$d/gh.$n.env"
case "${1:-} ${2:-}" in
"pr list") cat "$d/gh.pr-url" 2>/dev/null; exit 0 ;;
"pr create")
  c=$(( $(cat "$d/gh.create.count" 2>/dev/null || echo 0) + 1 ))
  echo "$c" > "$d/gh.create.count"
  printf '%s\0' "$@" > "$d/gh.create.$c.args"
  echo "https://github.com/acme/widgets/pull/42" > "$d/gh.pr-url"
  echo "https://github.com/acme/widgets/pull/42" ;;
*) echo "gh stub: unexpected call: $*" >&2; exit 97 ;;
esac
"#;

struct Fixture {
    dir: TempDir,
    runs: std::cell::Cell<u32>,
}

struct Run {
    status: ExitStatus,
    output: String,
}

impl Fixture {
    fn new() -> Self {
        Self::with_default_branch("main")
    }

    /// A bare "GitHub" repository whose default branch is `default_branch`,
    /// with one more branch beside it so the default has to be chosen.
    fn with_default_branch(default_branch: &'static str) -> Self {
        let fx = Fixture {
            dir: TempDir::new().unwrap(),
            runs: std::cell::Cell::new(0),
        };
        for d in ["home", "bin", "stub", "ws", "seed"] {
            fs::create_dir_all(fx.path(d)).unwrap();
        }
        fs::write(fx.path("home/gitconfig"), "").unwrap();
        write_exec(&fx.path("bin/claude"), CLAUDE_STUB);
        write_exec(&fx.path("bin/npx"), NPX_STUB);
        write_exec(&fx.path("bin/gh"), GH_STUB);
        fs::write(fx.path("body.md"), BODY).unwrap();
        fs::write(fx.path("issue.json"), "{}").unwrap();

        fx.git(
            &["init", "-q", "--bare", "-b", default_branch, "remote.git"],
            &fx.root(),
        );
        let seed = fx.path("seed");
        fx.git(&["init", "-q", "-b", default_branch], &seed);
        fs::write(seed.join("README.md"), "widgets\n").unwrap();
        fx.git(&["add", "."], &seed);
        fx.git(&["commit", "-q", "-m", "initial"], &seed);
        fx.git(&["checkout", "-q", "-b", "aaa-other"], &seed);
        fs::write(seed.join("other.txt"), "other\n").unwrap();
        fx.git(&["add", "."], &seed);
        fx.git(&["commit", "-q", "-m", "other branch"], &seed);
        fx.git(&["checkout", "-q", default_branch], &seed);
        let remote = fx.remote();
        fx.git(&["push", "-q", remote.to_str().unwrap(), "--all"], &seed);
        fx
    }

    fn root(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn remote(&self) -> PathBuf {
        self.path("remote.git")
    }
    fn clone_dir(&self) -> PathBuf {
        self.path("ws/repo")
    }

    /// The environment every process here gets, and nothing else.
    fn base_env(&self) -> Vec<(String, OsString)> {
        let mut path = OsString::from(self.path("bin"));
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        vec![
            ("PATH".into(), path),
            ("HOME".into(), self.path("home").into()),
            (
                "GIT_CONFIG_GLOBAL".into(),
                self.path("home/gitconfig").into(),
            ),
            ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
            ("TZ".into(), "UTC".into()),
            ("STUB_DIR".into(), self.path("stub").into()),
            ("STUB_REMOTE".into(), self.remote().into()),
            ("STUB_BRANCH".into(), BRANCH.into()),
        ]
    }

    /// git as the test itself uses it (to set up and inspect), with an
    /// identity of its own so the script's default identity stays untested
    /// by accident.
    fn git(&self, args: &[&str], cwd: &Path) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(cwd)
            .env_clear()
            .envs(self.base_env())
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn remote_git(&self, args: &[&str]) -> String {
        let remote = self.remote();
        let mut full = vec!["--git-dir", remote.to_str().unwrap()];
        full.extend_from_slice(args);
        self.git(&full, &self.root())
    }

    fn remote_has_branch(&self) -> bool {
        Command::new("git")
            .args(["--git-dir", self.remote().to_str().unwrap()])
            .args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("refs/heads/{BRANCH}"))
            .env_clear()
            .envs(self.base_env())
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Attempt `attempt` of round 1, unless `vars` set `CLAUDE_FLOW_ROUND`.
    fn command(&self, attempt: u32, vars: &[(&str, &str)]) -> Command {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let mut cmd = Command::new(SCRIPT);
        cmd.current_dir(self.path("ws"))
            .env_clear()
            .envs(self.base_env())
            .env("CLAUDE_FLOW_REPO", REPO)
            .env("CLAUDE_FLOW_ISSUE_NUMBER", "7")
            .env("CLAUDE_FLOW_ISSUE_TITLE", TITLE)
            .env("CLAUDE_FLOW_ISSUE_URL", ISSUE_URL)
            .env("CLAUDE_FLOW_ISSUE_BODY_FILE", self.path("body.md"))
            .env("CLAUDE_FLOW_ISSUE_JSON_FILE", self.path("issue.json"))
            .env("CLAUDE_FLOW_BRANCH", BRANCH)
            .env("CLAUDE_FLOW_ROUND", "1")
            .env("CLAUDE_FLOW_ATTEMPT", attempt.to_string())
            .env("CLAUDE_FLOW_WORKSPACE", self.path("ws"))
            .env("CLAUDE_FLOW_RUN_ID", format!("run-{n}"))
            .env("CLAUDE_FLOW_CLONE_URL", self.remote())
            .stdin(Stdio::null());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs one attempt to completion, with stdout and stderr in one file
    /// as the service's attempt log has them.
    fn run(&self, attempt: u32, vars: &[(&str, &str)]) -> Run {
        let mut cmd = self.command(attempt, vars);
        let log_path = self.path(&format!("attempt-{}.log", self.runs.get()));
        let log = fs::File::create(&log_path).unwrap();
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        let status = cmd.status().unwrap();
        let output = String::from_utf8_lossy(&fs::read(&log_path).unwrap()).into_owned();
        Run { status, output }
    }

    fn count(&self, name: &str) -> u32 {
        match fs::read_to_string(self.path(&format!("stub/{name}.count"))) {
            Ok(s) => s.trim().parse().unwrap(),
            Err(_) => 0,
        }
    }

    fn record(&self, name: &str) -> Vec<u8> {
        fs::read(self.path(&format!("stub/{name}"))).unwrap()
    }

    fn args(&self, name: &str) -> Vec<String> {
        let raw = self.record(name);
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect()
    }
}

fn write_exec(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every `http(s)://HOST/OWNER/REPO/pull/DIGITS` in the output, in order.
fn pr_urls(output: &str) -> Vec<&str> {
    output
        .split_whitespace()
        .filter(|tok| {
            let rest = tok
                .strip_prefix("https://")
                .or_else(|| tok.strip_prefix("http://"));
            let Some(rest) = rest else { return false };
            let parts: Vec<&str> = rest.split('/').collect();
            parts.len() == 5
                && parts[..3].iter().all(|p| !p.is_empty())
                && parts[3] == "pull"
                && !parts[4].is_empty()
                && parts[4].bytes().all(|b| b.is_ascii_digit())
        })
        .collect()
}

fn assert_success_with_pr(run: &Run) {
    assert!(
        run.status.success(),
        "exit {:?}\n{}",
        run.status,
        run.output
    );
    assert_eq!(pr_urls(&run.output).last(), Some(&PR_URL), "{}", run.output);
    assert_eq!(run.output.lines().last(), Some(PR_URL), "{}", run.output);
}

fn assert_failed(run: &Run) {
    assert!(!run.status.success(), "unexpected success\n{}", run.output);
    assert_ne!(run.status.code(), Some(75), "{}", run.output);
}

fn files_named(dir: &Path, name: &str, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let ty = entry.file_type().unwrap();
        if entry.file_name() == name {
            found.push(entry.path());
        }
        if ty.is_dir() {
            files_named(&entry.path(), name, found);
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ`.
fn parse_rfc3339_utc(s: &str) -> i64 {
    assert_eq!(s.len(), 20, "not RFC 3339 UTC: {s}");
    let b = s.as_bytes();
    assert!(
        b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b'Z',
        "not RFC 3339 UTC: {s}"
    );
    let num = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    days * 86400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19)
}

fn retry_after_value(run: &Run) -> &str {
    let line = run
        .output
        .lines()
        .rfind(|l| l.starts_with("claude-flow: retry-after "))
        .unwrap_or_else(|| panic!("no retry-after line\n{}", run.output));
    line.trim_start_matches("claude-flow: retry-after ")
}

// a. -----------------------------------------------------------------------

#[test]
fn first_run_opens_one_pull_request() {
    let fx = Fixture::new();
    let token = "ghp_test_secret_token_0123456789";
    let run = fx.run(
        1,
        &[
            ("STUB_CLAUDE_MODE", "edit"),
            ("CLAUDE_FLOW_AGENT_MODEL", "claude-test-model"),
            ("CLAUDE_FLOW_AGENT_MAX_TURNS", "12"),
            ("GH_TOKEN", token),
        ],
    );
    assert_success_with_pr(&run);
    assert!(
        run.output.contains("9.9.9 (Claude Code stub)"),
        "version not printed\n{}",
        run.output
    );
    assert!(run.output.contains("attempt 1"), "{}", run.output);
    assert_eq!(fx.count("gh.create"), 1);
    assert_eq!(fx.count("claude"), 1);

    // The branch is on the remote, starts at the default branch's head and
    // carries the issue reference.
    let message = fx.remote_git(&["log", "-1", "--format=%B", BRANCH]);
    assert!(message.contains("Fixes #7"), "{message}");
    assert_eq!(message.lines().next(), Some(TITLE));
    assert_eq!(
        fx.remote_git(&["rev-parse", &format!("{BRANCH}^")]),
        fx.remote_git(&["rev-parse", "main"])
    );
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:agent-change.txt")]),
        "change from call 1\n"
    );

    // The agent ran in the clone with the configured flags and the prompt
    // on stdin.
    let cwd = String::from_utf8(fx.record("claude.1.cwd")).unwrap();
    assert_eq!(Path::new(cwd.trim()), fx.clone_dir());
    let args = fx.args("claude.1.args");
    for pair in [["--model", "claude-test-model"], ["--max-turns", "12"]] {
        assert!(
            args.windows(2).any(|w| w == pair),
            "{pair:?} not in {args:?}"
        );
    }
    assert!(args.iter().any(|a| a == "-p"), "{args:?}");
    let stdin = fx.record("claude.1.stdin");
    assert!(contains(&stdin, TITLE.as_bytes()) && contains(&stdin, BODY.as_bytes()));

    // The pull request targets the default branch and links the issue.
    let create = fx.args("gh.create.1.args");
    for expected in [
        "--base=main",
        &format!("--head={BRANCH}"),
        &format!("--title={TITLE}"),
    ] {
        assert!(
            create.iter().any(|a| a == expected),
            "{expected} not in {create:?}"
        );
    }
    let body_file = create
        .iter()
        .find_map(|a| a.strip_prefix("--body-file="))
        .expect("no --body-file");
    let body = fs::read_to_string(body_file).unwrap();
    assert!(
        body.contains("Fixes #7") && body.contains(ISSUE_URL),
        "{body}"
    );

    // The token reaches gh but neither the agent nor the log.
    let gh_env = String::from_utf8(fx.record("gh.1.env")).unwrap();
    assert!(gh_env.contains(token));
    let agent_env = String::from_utf8(fx.record("claude.1.env")).unwrap();
    assert!(!agent_env.contains(token), "the agent saw the token");
    assert!(!run.output.contains(token), "the token was logged");
}

// b. -----------------------------------------------------------------------

#[test]
fn usage_limit_with_epoch_asks_to_retry_at_that_time() {
    let fx = Fixture::new();
    let run = fx.run(
        1,
        &[
            ("STUB_CLAUDE_MODE", "limit"),
            (
                "STUB_LIMIT_MESSAGE",
                "Claude AI usage limit reached|4102444800",
            ),
        ],
    );
    assert_eq!(run.status.code(), Some(75), "{}", run.output);
    assert_eq!(retry_after_value(&run), "2100-01-01T00:00:00Z");
    assert_eq!(fx.count("gh.create"), 0);
    assert!(pr_urls(&run.output).is_empty());
}

#[test]
fn usage_limit_without_a_readable_time_falls_back_to_an_hour() {
    let fx = Fixture::new();
    let run = fx.run(
        1,
        &[
            ("STUB_CLAUDE_MODE", "limit"),
            (
                "STUB_LIMIT_MESSAGE",
                "Claude usage limit reached. Please come back later.",
            ),
        ],
    );
    assert_eq!(run.status.code(), Some(75), "{}", run.output);
    assert_eq!(retry_after_value(&run), "3600");
}

#[test]
fn usage_limit_clock_times_become_their_next_occurrence() {
    let fx = Fixture::new();
    // (message, acceptable UTC times of day): Paris is UTC+1 or UTC+2.
    let mut cases: Vec<(&str, &[&str])> = vec![
        ("You've hit your limit · resets 3pm (UTC)", &["15:00:00"]),
        ("5-hour limit reached ∙ resets 5:30pm", &["17:30:00"]),
        (
            "Claude usage limit reached. Your limit will reset at 14:00.",
            &["14:00:00"],
        ),
    ];
    // The script only trusts zones the system knows; without tzdata this
    // case would be read in TZ=UTC instead.
    if Path::new("/usr/share/zoneinfo/Europe/Paris").exists() {
        cases.push((
            "usage limit reached. Your limit will reset at 5pm (Europe/Paris)",
            &["15:00:00", "16:00:00"],
        ));
    }
    for (message, times) in cases {
        let before = now_secs();
        let run = fx.run(
            1,
            &[
                ("STUB_CLAUDE_MODE", "limit"),
                ("STUB_LIMIT_MESSAGE", message),
            ],
        );
        let after = now_secs();
        assert_eq!(run.status.code(), Some(75), "{message}\n{}", run.output);
        let value = retry_after_value(&run);
        let at = parse_rfc3339_utc(value);
        assert!(times.contains(&&value[11..19]), "{message}: got {value}");
        assert!(
            at > before && at <= after + 86_400,
            "{message}: {value} is not the next occurrence"
        );
    }
}

#[test]
fn usage_limit_after_partial_work_pushes_it_first() {
    let fx = Fixture::new();
    let run = fx.run(
        1,
        &[
            ("STUB_CLAUDE_MODE", "limit-after-edit"),
            (
                "STUB_LIMIT_MESSAGE",
                "Claude AI usage limit reached|4102444800",
            ),
        ],
    );
    assert_eq!(run.status.code(), Some(75), "{}", run.output);
    assert_eq!(
        run.output.lines().last(),
        Some("claude-flow: retry-after 2100-01-01T00:00:00Z")
    );
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:partial.txt")]),
        "partial work\n"
    );
    assert_eq!(fx.count("gh.create"), 0);
}

// c. -----------------------------------------------------------------------

#[test]
fn failing_agent_keeps_its_partial_work_on_the_remote() {
    let fx = Fixture::new();
    let run = fx.run(1, &[("STUB_CLAUDE_MODE", "fail-after-edit")]);
    assert_failed(&run);
    assert!(
        run.output.contains("agent failed with status 1"),
        "{}",
        run.output
    );
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:partial.txt")]),
        "partial work\n"
    );
    let subject = fx.remote_git(&["log", "-1", "--format=%s", BRANCH]);
    assert!(subject.starts_with("WIP: "), "{subject}");
    assert_eq!(fx.count("gh.create"), 0);
    assert!(pr_urls(&run.output).is_empty());
}

#[test]
fn agent_past_its_budget_is_stopped_and_its_work_kept() {
    let fx = Fixture::new();
    // The budget is generous so that even a slow machine gets the stub to
    // write its file first; the stub then hangs until timeout(1) stops it.
    let run = fx.run(
        1,
        &[
            ("STUB_CLAUDE_MODE", "hang-after-edit"),
            ("CLAUDE_FLOW_AGENT_TIMEOUT", "5s"),
            ("CLAUDE_FLOW_AGENT_KILL_AFTER", "5s"),
        ],
    );
    assert_failed(&run);
    assert!(
        run.output.contains("agent timed out after 5s"),
        "{}",
        run.output
    );
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:partial.txt")]),
        "partial work\n"
    );
}

// d. -----------------------------------------------------------------------

#[test]
fn later_attempts_reuse_the_clone_the_branch_and_the_pull_request() {
    let fx = Fixture::with_default_branch("trunk");

    let first = fx.run(1, &[("STUB_CLAUDE_MODE", "fail-after-edit")]);
    assert_failed(&first);
    let wip = fx.remote_git(&["rev-parse", BRANCH]);
    let sentinel = fx.clone_dir().join(".git/test-sentinel");
    fs::write(&sentinel, "").unwrap();

    // Upstream moves on meanwhile; the retry must still build on the WIP.
    let seed = fx.path("seed");
    fs::write(seed.join("upstream.txt"), "new\n").unwrap();
    fx.git(&["add", "."], &seed);
    fx.git(&["commit", "-q", "-m", "upstream change"], &seed);
    fx.git(
        &["push", "-q", fx.remote().to_str().unwrap(), "trunk"],
        &seed,
    );

    let second = fx.run(2, &[("STUB_CLAUDE_MODE", "edit")]);
    assert_success_with_pr(&second);
    assert!(
        second.output.contains("reusing the clone"),
        "{}",
        second.output
    );
    assert_eq!(fx.count("gh.create"), 1);
    assert!(
        fx.args("gh.create.1.args")
            .iter()
            .any(|a| a == "--base=trunk")
    );
    let head = fx.remote_git(&["rev-parse", BRANCH]);
    fx.remote_git(&["merge-base", "--is-ancestor", wip.trim(), head.trim()]);
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:partial.txt")]),
        "partial work\n"
    );
    let prompt = fx.record("claude.2.stdin");
    assert!(
        contains(&prompt, b"attempt 2"),
        "the retry's prompt does not say so"
    );

    // A restart after success: nothing to redo, the same PR is reported.
    let third = fx.run(3, &[("STUB_CLAUDE_MODE", "edit")]);
    assert_success_with_pr(&third);
    assert_eq!(fx.count("claude"), 2, "the finished agent ran again");
    assert_eq!(fx.count("gh.create"), 1);

    // A new round (attempt 1 again) runs the agent and updates the open PR.
    let fourth = fx.run(
        1,
        &[("STUB_CLAUDE_MODE", "edit"), ("CLAUDE_FLOW_ROUND", "2")],
    );
    assert_success_with_pr(&fourth);
    assert_eq!(fx.count("claude"), 3);
    assert_eq!(fx.count("gh.create"), 1);
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:agent-change.txt")]),
        "change from call 2\nchange from call 3\n"
    );
    assert!(sentinel.exists(), "the clone was replaced");
}

#[test]
fn a_new_round_runs_the_agent_again_even_where_the_last_round_finished() {
    let fx = Fixture::new();
    assert_success_with_pr(&fx.run(1, &[("STUB_CLAUDE_MODE", "edit")]));
    assert_eq!(fx.count("claude"), 1);
    let round2 = [("STUB_CLAUDE_MODE", "edit"), ("CLAUDE_FLOW_ROUND", "2")];

    // The issue is triggered again. Round 2's first attempt fails before
    // the agent runs (the remote cannot be reached), so the branch is still
    // at the commit where round 1's agent finished.
    let missing = fx.path("nowhere.git");
    let mut unreachable = round2.to_vec();
    unreachable.push(("CLAUDE_FLOW_CLONE_URL", missing.to_str().unwrap()));
    let first = fx.run(1, &unreachable);
    assert_eq!(first.status.code(), Some(3), "{}", first.output);
    assert_eq!(fx.count("claude"), 1);

    // Round 2's second attempt has work to do: round 1's finish is not its.
    let second = fx.run(2, &round2);
    assert_success_with_pr(&second);
    assert!(
        !second.output.contains("already finished"),
        "{}",
        second.output
    );
    assert_eq!(fx.count("claude"), 2, "round 2 did not run the agent");
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:agent-change.txt")]),
        "change from call 1\nchange from call 2\n"
    );
    let prompt = fx.record("claude.2.stdin");
    assert!(contains(&prompt, b"attempt 2 of this round"));
    let message = fx.remote_git(&["log", "-1", "--format=%B", BRANCH]);
    assert!(message.contains("round 2, attempt 2"), "{message}");

    // Within round 2, a restart after its agent finished still skips it.
    let third = fx.run(3, &round2);
    assert_success_with_pr(&third);
    assert!(
        third
            .output
            .contains("the agent already finished in an earlier attempt of round 2"),
        "{}",
        third.output
    );
    assert_eq!(fx.count("claude"), 2);
    assert_eq!(fx.count("gh.create"), 1);

    // A new round's first attempt tells the agent where it stands.
    assert_success_with_pr(&fx.run(
        1,
        &[("STUB_CLAUDE_MODE", "edit"), ("CLAUDE_FLOW_ROUND", "3")],
    ));
    let prompt = fx.record("claude.3.stdin");
    assert!(contains(&prompt, b"handed to you again (round 3)"));
}

#[test]
fn fresh_workspace_continues_the_branch_already_on_the_remote() {
    let fx = Fixture::new();
    assert_failed(&fx.run(1, &[("STUB_CLAUDE_MODE", "fail-after-edit")]));
    let wip = fx.remote_git(&["rev-parse", BRANCH]);
    // The service's workspace is gone (new machine, cleaned state dir).
    fs::remove_dir_all(fx.path("ws")).unwrap();
    fs::create_dir(fx.path("ws")).unwrap();

    let run = fx.run(2, &[("STUB_CLAUDE_MODE", "edit")]);
    assert_success_with_pr(&run);
    assert!(
        run.output
            .contains(&format!("continuing from origin/{BRANCH}")),
        "{}",
        run.output
    );
    // Built on top of the WIP, not merged with it after the fact.
    assert_eq!(fx.remote_git(&["rev-parse", &format!("{BRANCH}^")]), wip);
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:partial.txt")]),
        "partial work\n"
    );
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:agent-change.txt")]),
        "change from call 2\n"
    );
}

#[test]
fn work_left_uncommitted_by_a_killed_attempt_is_recovered() {
    let fx = Fixture::new();
    assert_failed(&fx.run(1, &[("STUB_CLAUDE_MODE", "fail-after-edit")]));
    // What SIGKILL in the middle of the agent leaves behind.
    let clone = fx.clone_dir();
    fs::write(clone.join("killed.txt"), "unsaved\n").unwrap();
    fs::write(clone.join(".git/index.lock"), "").unwrap();

    let run = fx.run(2, &[("STUB_CLAUDE_MODE", "edit")]);
    assert_success_with_pr(&run);
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:killed.txt")]),
        "unsaved\n"
    );
    let subjects = fx.remote_git(&["log", "--format=%s", BRANCH]);
    assert!(
        subjects.contains("recovered from an interrupted attempt"),
        "{subjects}"
    );
}

#[test]
fn someone_pushing_to_the_branch_during_the_run_is_merged_not_overwritten() {
    let fx = Fixture::new();
    assert_failed(&fx.run(1, &[("STUB_CLAUDE_MODE", "fail-after-edit")]));
    let run = fx.run(2, &[("STUB_CLAUDE_MODE", "someone-pushes")]);
    assert_success_with_pr(&run);
    assert!(
        run.output.contains("moved during this attempt"),
        "{}",
        run.output
    );
    for (file, text) in [
        ("reviewer.txt", "review\n"),
        ("partial.txt", "partial work\n"),
        ("agent-change.txt", "change from call 2\n"),
    ] {
        assert_eq!(fx.remote_git(&["show", &format!("{BRANCH}:{file}")]), text);
    }
}

#[test]
fn agent_commits_on_another_branch_still_land_on_the_issue_branch() {
    let fx = Fixture::new();
    let run = fx.run(1, &[("STUB_CLAUDE_MODE", "other-branch")]);
    assert_success_with_pr(&run);
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:side.txt")]),
        "side\n"
    );
    assert_eq!(
        fx.remote_git(&["rev-parse", &format!("{BRANCH}^")]),
        fx.remote_git(&["rev-parse", "main"])
    );
}

#[test]
fn new_round_after_the_branch_was_merged_and_deleted_starts_afresh() {
    let fx = Fixture::new();
    assert_success_with_pr(&fx.run(1, &[("STUB_CLAUDE_MODE", "edit")]));
    let old = fx.remote_git(&["rev-parse", BRANCH]);
    // The pull request is merged and GitHub deletes its branch.
    fx.remote_git(&["branch", "-D", BRANCH]);
    fs::remove_file(fx.path("stub/gh.pr-url")).unwrap();

    let run = fx.run(
        1,
        &[("STUB_CLAUDE_MODE", "edit"), ("CLAUDE_FLOW_ROUND", "2")],
    );
    assert_success_with_pr(&run);
    assert_eq!(fx.count("gh.create"), 2);
    assert_eq!(
        fx.remote_git(&["rev-parse", &format!("{BRANCH}^")]),
        fx.remote_git(&["rev-parse", "main"])
    );
    let backups = fx.git(
        &[
            "branch",
            "--list",
            "claude-flow-backup/*",
            "--format=%(objectname)",
        ],
        &fx.clone_dir(),
    );
    assert_eq!(backups, old, "the old branch was not kept");
}

// e. -----------------------------------------------------------------------

// The tab is there because commit and PR titles are made one-line, while
// the prompt must keep the title exactly as written.
const NASTY_TITLE: &str =
    "#1 Fix \"quotes\" & 'single'\t$(touch pwned) `touch pwned` ; rm -rf \"$HOME/keep\" #";
const NASTY_BODY: &str = "Body $(touch pwned) and `touch pwned`\r\n; rm -rf \"$HOME/keep\"; echo 'a' \"b\" $HOME ${PATH}\r\n\\n %s %n last line without newline";

fn nasty_fixture() -> Fixture {
    let fx = Fixture::new();
    fs::write(fx.path("body.md"), NASTY_BODY).unwrap();
    fs::create_dir_all(fx.path("home/keep")).unwrap();
    fs::write(fx.path("home/keep/sentinel"), "").unwrap();
    fx
}

fn assert_nothing_executed(fx: &Fixture) {
    let mut found = Vec::new();
    files_named(&fx.root(), "pwned", &mut found);
    assert!(found.is_empty(), "issue text was executed: {found:?}");
    assert!(
        fx.path("home/keep/sentinel").exists(),
        "issue text was executed: rm ran"
    );
}

#[test]
fn issue_text_reaches_the_agent_verbatim_and_is_never_executed() {
    let fx = nasty_fixture();
    let run = fx.run(
        1,
        &[
            ("STUB_CLAUDE_MODE", "edit"),
            ("CLAUDE_FLOW_ISSUE_TITLE", NASTY_TITLE),
        ],
    );
    assert_success_with_pr(&run);
    let stdin = fx.record("claude.1.stdin");
    assert!(contains(&stdin, NASTY_TITLE.as_bytes()), "title altered");
    assert!(contains(&stdin, NASTY_BODY.as_bytes()), "body altered");
    let one_line = NASTY_TITLE.replace('\t', " ");
    assert_eq!(
        fx.remote_git(&["log", "-1", "--format=%s", BRANCH])
            .trim_end(),
        one_line
    );
    let create = fx.args("gh.create.1.args");
    assert!(
        create.iter().any(|a| *a == format!("--title={one_line}")),
        "{create:?}"
    );
    assert_nothing_executed(&fx);
}

#[test]
fn claude_flow_variant_gets_the_prompt_as_one_argument() {
    let fx = nasty_fixture();
    let run = fx.run(
        1,
        &[
            ("CLAUDE_FLOW_AGENT", "claude-flow"),
            ("CLAUDE_FLOW_ISSUE_TITLE", NASTY_TITLE),
        ],
    );
    assert_success_with_pr(&run);
    assert!(
        run.output.contains("v0.0.0-stub"),
        "version not printed\n{}",
        run.output
    );
    assert_eq!(fx.count("npx"), 1);
    assert_eq!(fx.count("claude"), 0);
    let args = fx.args("npx.1.args");
    assert_eq!(args.len(), 6, "{args:?}");
    assert_eq!(&args[..3], ["--yes", "claude-flow@alpha", "swarm"]);
    assert_eq!(&args[4..], ["--claude", "--non-interactive"]);
    assert!(
        args[3].contains(NASTY_TITLE) && args[3].contains(NASTY_BODY),
        "prompt altered"
    );
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:swarm-change.txt")]),
        "swarm change\n"
    );
    assert_nothing_executed(&fx);
}

// f. -----------------------------------------------------------------------

#[test]
fn agent_that_changes_nothing_fails_clearly() {
    let fx = Fixture::new();
    let run = fx.run(1, &[("STUB_CLAUDE_MODE", "noop")]);
    assert_failed(&run);
    assert!(
        run.output.contains("agent made no changes"),
        "{}",
        run.output
    );
    assert!(!fx.remote_has_branch());
    assert_eq!(fx.count("gh.create"), 0);
    assert!(pr_urls(&run.output).is_empty());
}

// g. -----------------------------------------------------------------------

#[test]
fn rejected_push_fails_with_gits_message_and_keeps_the_work() {
    let fx = Fixture::new();
    let hook = fx.path("remote.git/hooks/pre-receive");
    write_exec(
        &hook,
        "#!/bin/sh\necho 'push refused by test policy' >&2\nexit 1\n",
    );

    let run = fx.run(1, &[("STUB_CLAUDE_MODE", "edit")]);
    assert_failed(&run);
    assert!(
        run.output.contains("push refused by test policy"),
        "{}",
        run.output
    );
    assert!(
        run.output.contains("pre-receive hook declined"),
        "{}",
        run.output
    );
    assert!(
        run.output.contains(fx.clone_dir().to_str().unwrap()),
        "work location not given"
    );
    assert!(!fx.remote_has_branch());
    assert_eq!(fx.count("gh.create"), 0);
    let clone = fx.clone_dir();
    let local = fx.git(&["log", "-1", "--format=%B", BRANCH], &clone);
    assert!(local.contains("Fixes #7"), "{local}");

    // Once the remote accepts pushes again, the next attempt delivers the
    // same commit without running the agent again.
    fs::remove_file(&hook).unwrap();
    let retry = fx.run(2, &[("STUB_CLAUDE_MODE", "noop")]);
    assert_success_with_pr(&retry);
    assert_eq!(fx.count("claude"), 1);
    assert_eq!(
        fx.remote_git(&["rev-parse", BRANCH]),
        fx.git(&["rev-parse", BRANCH], &clone)
    );
}

// Cancellation ---------------------------------------------------------------

#[test]
fn sigterm_to_the_process_group_keeps_the_agents_work() {
    let fx = Fixture::new();
    let mut cmd = fx.command(1, &[("STUB_CLAUDE_MODE", "hang-after-edit")]);
    let (reader, writer) = std::io::pipe().unwrap();
    cmd.stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .process_group(0);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);

    // Wait for the agent to be mid-run, as the service would when the
    // trigger label is removed; EOF first means the script ended early.
    let mut reader = BufReader::new(reader);
    let mut output = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).unwrap();
        output.push_str(&line);
        assert!(n > 0, "the agent never started\n{output}");
        if line.contains("stub agent ready") {
            break;
        }
    }
    let kill = Command::new("kill")
        .args(["-TERM", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(kill.success());
    reader.read_to_string(&mut output).unwrap();
    let status = child.wait().unwrap();

    assert_eq!(status.code(), Some(143), "{output}");
    assert!(output.contains("received SIGTERM"), "{output}");
    let clone = fx.clone_dir();
    let subject = fx.git(&["log", "-1", "--format=%s", BRANCH], &clone);
    assert!(
        subject.starts_with("WIP: ") && subject.contains("interrupted"),
        "{subject}"
    );
    assert_eq!(
        fx.git(&["show", &format!("{BRANCH}:partial.txt")], &clone),
        "partial work\n"
    );

    // The next attempt builds on the interrupted work.
    let next = fx.run(2, &[("STUB_CLAUDE_MODE", "edit")]);
    assert_success_with_pr(&next);
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:partial.txt")]),
        "partial work\n"
    );
    assert_eq!(
        fx.remote_git(&["show", &format!("{BRANCH}:agent-change.txt")]),
        "change from call 2\n"
    );
}
