#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion
//! deploy/claude-flow.service checked by systemd's own tools:
//! `systemd-analyze verify`, and `systemd-analyze security`, whose exposure
//! score must stay at or below the one recorded in docs/operations.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const UNIT: &str = "claude-flow.service";
/// How docs/operations.md records the score; the number follows.
const SCORE_MARKER: &str = "Recorded exposure score: **";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether `systemd-analyze` is (or could be made) available. Installs the
/// `systemd` package when it is missing and apt-get can; .ci/run installs
/// it beforehand, so CI never skips.
fn systemd_analyze() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let present = || {
            Command::new("systemd-analyze")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if present() {
            return true;
        }
        eprintln!("systemd-analyze is missing; installing the systemd package");
        let _ = Command::new("sh")
            .args([
                "-c",
                "export DEBIAN_FRONTEND=noninteractive; \
                 apt-get install -y -qq systemd >/dev/null 2>&1 || \
                 { apt-get update -qq && apt-get install -y -qq systemd; }",
            ])
            .status();
        present()
    })
}

/// The deployed unit with ExecStart pointing at the daemon this test built,
/// so verify can check that the binary exists. Returns the temp dir (keep
/// it alive) and the unit's path.
fn unit_copy() -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(repo_root().join("deploy").join(UNIT)).unwrap();
    let daemon = env!("CARGO_BIN_EXE_claude-flow-daemon");
    let exec = "ExecStart=/usr/local/bin/claude-flow-daemon ";
    assert!(text.contains(exec), "the unit's ExecStart changed: {text}");
    let text = text.replace(exec, &format!("ExecStart={daemon} "));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(UNIT);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn analyze(args: &[&str], unit: &Path) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .unwrap()
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !systemd_analyze() {
        eprintln!("SKIPPED: systemd-analyze is not installed and could not be installed");
        return;
    }
    let (_dir, unit) = unit_copy();
    let out = analyze(&["verify", "--man=no"], &unit);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed:\n{stderr}");
    // Warnings about the unit (unknown keys, bad values) go to stderr
    // without failing verify; none are allowed.
    let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains(UNIT)).collect();
    assert!(
        about_unit.is_empty(),
        "verify warns:\n{}",
        about_unit.join("\n")
    );
}

#[test]
fn the_security_exposure_stays_at_or_below_the_recorded_score() {
    if !systemd_analyze() {
        eprintln!("SKIPPED: systemd-analyze is not installed and could not be installed");
        return;
    }
    let docs = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    let recorded: f64 = docs
        .split_once(SCORE_MARKER)
        .and_then(|(_, rest)| rest.split_once("**"))
        .map(|(score, _)| score.parse().unwrap())
        .expect("docs/operations.md records the score as `Recorded exposure score: **N.N**`");

    let (_dir, unit) = unit_copy();
    // --offline: judge the file alone, without a running systemd (CI runs
    // in containers).
    let out = analyze(&["security", "--offline=true", "--no-pager"], &unit);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no score in:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    assert!(
        score <= recorded,
        "the unit's exposure rose to {score} (recorded: {recorded}); what changed:\n{}",
        stdout
            .lines()
            .filter(|l| l.contains('✗'))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
