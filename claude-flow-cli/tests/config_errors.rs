//! Bad configuration: exit 78 with a message naming the key, line or file.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use common::Fixture;
use predicates::str::contains;
use serde_json::json;

fn assert_78(f: &Fixture, needle: &str) {
    f.cli()
        .args(["config", "check"])
        .assert()
        .code(78)
        .stderr(contains(needle));
    // The same configuration stops `run` before anything happens.
    f.cli()
        .args(["run", "--once"])
        .assert()
        .code(78)
        .stderr(contains(needle));
    assert!(
        !f.path("state").exists(),
        "a bad configuration must not create state"
    );
}

#[test]
fn an_invalid_duration_names_the_key_and_the_value() {
    let f = Fixture::new();
    f.config(json!({"service": {"poll_interval": "five minutes"}}));
    assert_78(
        &f,
        r#"service.poll_interval: invalid duration "five minutes""#,
    );
}

#[test]
fn an_unknown_key_is_refused() {
    let f = Fixture::new();
    f.config(json!({"service": {"pol_interval": "5m"}}));
    assert_78(&f, "service.pol_interval: unknown key");
}

#[test]
fn a_missing_source_is_named() {
    let f = Fixture::new();
    std::fs::write(f.config_path(), r#"{"workflow": {"command": ["./wf.sh"]}}"#).unwrap();
    assert_78(&f, "source: required");
}

#[test]
fn a_syntax_error_names_the_file_and_line() {
    let f = Fixture::new();
    std::fs::write(f.config_path(), "{\n  \"source\": \"local\",\n  oops\n}\n").unwrap();
    assert_78(&f, &format!("{}: line 3", f.config_path().display()));
}

#[test]
fn a_missing_file_is_named() {
    let f = Fixture::new();
    std::fs::remove_file(f.config_path()).unwrap();
    assert_78(&f, &f.config_path().display().to_string());
}

#[test]
fn a_bad_environment_override_names_the_variable() {
    let f = Fixture::new();
    f.cli()
        .args(["config", "check"])
        .env("CLAUDE_FLOW_SERVICE__MAX_CONCURRENT", "lots")
        .assert()
        .code(78)
        .stderr(contains(
            "service.max_concurrent (from CLAUDE_FLOW_SERVICE__MAX_CONCURRENT)",
        ));
}

#[test]
fn a_missing_issue_directory_is_named() {
    let f = Fixture::new();
    f.config(json!({"local": {"dir": "nowhere"}}));
    assert_78(&f, "local.dir");
}

#[test]
fn check_and_show_accept_a_good_configuration_and_hide_secrets() {
    let f = Fixture::new();
    f.workflow("echo hi");
    f.config(json!({"github": {"token": "ghp_file_secret"}}));
    f.cli()
        .args(["config", "check"])
        .assert()
        .success()
        .stdout(contains("configuration OK"));
    let out = f
        .cli()
        .args(["config", "show"])
        .env("CLAUDE_FLOW_GITHUB__WEBHOOK_SECRET", "hook_env_secret")
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        !shown.contains("ghp_file_secret") && !shown.contains("hook_env_secret"),
        "{shown}"
    );
    let value: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(value["github"]["token"], "[redacted]");
    assert_eq!(value["service"]["poll_interval"], "1h");
    assert_eq!(
        value["service"]["state_dir"],
        f.path("state").to_str().unwrap()
    );
}

#[test]
fn usage_errors_exit_2() {
    let f = Fixture::new();
    f.cli().arg("frobnicate").assert().code(2);
    f.cli()
        .args(["show", "seven"])
        .assert()
        .code(2)
        .stderr(contains("owner/name#"));
    f.cli()
        .args(["show", "7"])
        .assert()
        .code(1)
        .stderr(contains("not known"));
}

#[test]
fn completions_are_printed_for_each_shell() {
    let f = Fixture::new();
    for shell in ["bash", "zsh", "fish"] {
        f.cli()
            .args(["completions", shell])
            .assert()
            .success()
            .stdout(contains("claude-flow"));
    }
}

#[test]
fn a_workflow_that_cannot_start_is_a_configuration_error_saying_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    f.config(json!({}));
    // Missing.
    assert_78(&f, "workflow.command: ");
    // Not executable.
    f.workflow("echo hi");
    let wf = f.path("wf.sh");
    std::fs::set_permissions(&wf, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_78(&f, &format!("chmod +x {}", wf.display()));
    // Saved with CRLF line endings.
    std::fs::write(&wf, "#!/usr/bin/env bash\r\necho hi\r\n").unwrap();
    std::fs::set_permissions(&wf, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_78(&f, "CRLF");
    // An interpreter that does not exist.
    std::fs::write(&wf, "#!/opt/nowhere/bash\necho hi\n").unwrap();
    assert_78(&f, "/opt/nowhere/bash");
    // A bare name not on PATH.
    f.config(json!({"workflow": {"command": ["claude-flow-no-such-workflow"]}}));
    assert_78(&f, "not found on PATH");
}

#[test]
fn a_misspelt_log_level_and_a_backoff_cap_below_its_base_are_refused() {
    let f = Fixture::new();
    f.workflow("echo hi");
    f.config(json!({"log": {"level": "inof"}}));
    assert_78(&f, "log.level: \"inof\" is not a level");
    f.config(json!({"log": {"level": "info,claude_flow_core=debug"}}));
    f.cli().args(["config", "check"]).assert().success();
    f.config(json!({"service": {"retry_backoff": "10m", "retry_backoff_max": "1m"}}));
    assert_78(&f, "service.retry_backoff_max");
}

#[test]
fn listening_beyond_loopback_without_an_api_token_is_refused() {
    let f = Fixture::new();
    f.workflow("echo hi");
    f.config(json!({"service": {"listen": "0.0.0.0:8787"}}));
    assert_78(&f, "service.listen: ");
    f.cli()
        .args(["status"])
        .assert()
        .code(78)
        .stderr(contains("service.api_token"));
    f.config(json!({"service": {"listen": "0.0.0.0:8787", "api_token_file": "api-token.txt"}}));
    std::fs::write(f.path("api-token.txt"), "from-a-file\n").unwrap();
    f.cli().args(["config", "check"]).assert().success();
}

#[test]
fn config_check_reads_the_api_token_file_and_config_show_hides_the_token() {
    let f = Fixture::new();
    f.workflow("echo hi");
    f.config(json!({"service": {"api_token_file": "missing-token"}}));
    f.cli()
        .args(["config", "check"])
        .assert()
        .code(78)
        .stderr(contains("service.api_token_file: cannot read"));
    f.config(json!({"service": {"api_token": "s3cr3t-api-t0ken"}}));
    let out = f.cli().args(["config", "show"]).output().unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains("s3cr3t-api-t0ken"), "{shown}");
    assert!(shown.contains(r#""api_token": "[redacted]""#), "{shown}");
}

#[test]
fn a_state_directory_that_cannot_be_created_names_the_key() {
    let f = Fixture::new();
    f.workflow("echo hi");
    std::fs::write(f.path("afile"), "not a directory").unwrap();
    f.config(json!({"service": {"state_dir": "afile/state"}}));
    assert_78(&f, "service.state_dir: ");
    f.cli()
        .args(["config", "check"])
        .assert()
        .code(78)
        .stderr(contains(format!(
            "{} is a file, not a directory",
            f.path("afile").display()
        )));
    // The same for the directories the service writes beside it.
    f.config(json!({"service": {"log_dir": "afile/logs"}}));
    assert_78(&f, "service.log_dir: ");
    f.config(json!({"service": {"workspace_dir": "afile"}}));
    assert_78(&f, "service.workspace_dir: ");
}

#[test]
fn a_directory_the_user_cannot_write_names_the_key_and_the_fix() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let f = Fixture::new();
    f.workflow("echo hi");
    std::fs::create_dir(f.path("open")).unwrap();
    std::fs::create_dir(f.path("closed")).unwrap();
    std::fs::set_permissions(f.path("open"), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(f.path("closed"), std::fs::Permissions::from_mode(0o555)).unwrap();
    f.config(json!({"service": {"state_dir": "open/state", "log_dir": "closed/logs"}}));
    let as_root = std::fs::metadata(f.path("config.json")).unwrap().uid() == 0;
    if as_root {
        // Root writes anywhere: the check is seen by the user it guards.
        for (rel, mode) in [("", 0o755), ("config.json", 0o644), ("issues", 0o755)] {
            std::fs::set_permissions(f.path(rel), std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    for args in [["config", "check"].as_slice(), ["run", "--once"].as_slice()] {
        let mut cmd = f.cli_process(args);
        if as_root {
            cmd.uid(65534).gid(65534);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {stderr}");
        assert!(
            stderr.contains("service.log_dir: ")
                && stderr.contains(&f.path("closed").display().to_string())
                && stderr.contains("not writable"),
            "{args:?}: {stderr}"
        );
    }
    assert!(!f.path("closed/logs").exists());
}
