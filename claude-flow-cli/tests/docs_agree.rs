#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion
//! The configurations the docs show are the files the project ships, and
//! both are valid: a newcomer copies from the docs.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The JSON block that follows `intro` in `doc`.
fn block_after(doc: &str, intro: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let at = text
        .find(intro)
        .unwrap_or_else(|| panic!("{doc} no longer says {intro:?}"));
    let rest = &text[at..];
    let start = rest.find("```json\n").unwrap() + "```json\n".len();
    let end = start + rest[start..].find("```").unwrap();
    serde_json::from_str(&rest[start..end])
        .unwrap_or_else(|e| panic!("{doc}: the block after {intro:?} is not JSON: {e}"))
}

fn file(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join(rel)).unwrap()).unwrap()
}

#[test]
fn configuration_md_shows_the_shipped_configurations() {
    assert_eq!(
        block_after(
            "docs/configuration.md",
            "The demo (`examples/demo/config.json`)"
        ),
        file("examples/demo/config.json")
    );
    assert_eq!(
        block_after(
            "docs/configuration.md",
            "A GitHub installation (`deploy/config.example.json`)"
        ),
        file("deploy/config.example.json")
    );
}

#[test]
fn the_shipped_demo_configuration_passes_config_check() {
    assert_cmd::Command::cargo_bin("claude-flow")
        .unwrap()
        .env_remove("CLAUDE_FLOW_CONFIG")
        .arg("--config")
        .arg(repo().join("examples/demo/config.json"))
        .args(["config", "check"])
        .assert()
        .success();
}

/// The first ```sh block after `heading` in `doc`.
fn sh_block_after(doc: &str, heading: &str) -> String {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let at = text
        .find(heading)
        .unwrap_or_else(|| panic!("{doc} no longer has {heading:?}"));
    let rest = &text[at..];
    let start = rest.find("```sh\n").unwrap() + "```sh\n".len();
    let end = start + rest[start..].find("```").unwrap();
    rest[start..end].to_owned()
}

#[test]
fn the_documented_local_try_of_claude_code_opens_a_pull_request() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A stand-in for a logged-in Claude Code: it writes a file.
    std::fs::create_dir(dir.join("agent")).unwrap();
    let claude = dir.join("agent/claude");
    std::fs::write(
        &claude,
        "#!/bin/sh\n[ \"${1:-}\" = --version ] && { echo stub; exit 0; }\ncat >/dev/null\necho hello > README.md\n",
    )
    .unwrap();
    std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755)).unwrap();
    let setup = sh_block_after(
        "docs/operations.md",
        "## Trying the Claude Code workflow locally",
    )
    .replace(
        "CF=$HOME/src/claude-flow",
        &format!("CF={}", repo().display()),
    );
    let path = format!(
        "{}:{}",
        dir.join("agent").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("bash")
        .args(["-euc", &setup])
        .current_dir(dir)
        .env("PATH", &path)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the documented set-up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let try_dir = dir.join("try");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("claude-flow"))
            .env_remove("CLAUDE_FLOW_CONFIG")
            .arg("--config")
            .arg(try_dir.join("config.json"))
            .args(args)
            .current_dir(&try_dir)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&["run", "--once"]);
    let list: Value = serde_json::from_str(&cli(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["status"], "done", "{list}");
    assert_eq!(
        list[0]["pr_url"], "https://github.com/local/issues/pull/1",
        "{list}"
    );
    let log = std::process::Command::new("git")
        .args([
            "-C",
            "remote.git",
            "log",
            "--oneline",
            "claude-flow/issue-1",
        ])
        .current_dir(&try_dir)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&log.stdout).contains("Add a README"),
        "the agent's commit is on the branch"
    );
}
