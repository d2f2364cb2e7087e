#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion
//! `claude-flow service`, against a fake `systemctl` that records its
//! arguments, with the unit, configuration and state in temp directories:
//! nothing here touches /etc or the machine's systemd.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::Fixture;
use predicates::prelude::*;

/// A fixture plus a `bin/` holding only a fake `systemctl`, and a
/// directory standing in for /run/systemd/system.
struct Machine {
    fx: Fixture,
}

impl Machine {
    fn new() -> Self {
        let machine = Self { fx: Fixture::new() };
        machine.systemctl(0, "");
        std::fs::create_dir(machine.fx.path("run-systemd")).unwrap();
        machine
    }

    /// (Re)writes the fake: it appends its arguments to `calls.log`, prints
    /// `say` and exits with `code`. Only shell built-ins, since PATH holds
    /// nothing else.
    fn systemctl(&self, code: i32, say: &str) {
        let bin = self.fx.path("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let script = bin.join("systemctl");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\nprintf '%s' '{say}'\nexit {code}\n",
                self.fx.path("calls.log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The systemctl calls so far, one per line.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.fx.path("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `claude-flow --config <fixture> service <args>` with PATH = the
    /// fake's bin only (the real systemctl must not be found) and the
    /// stand-in for /run/systemd/system.
    fn service(&self, args: &[&str]) -> assert_cmd::Command {
        self.service_with(&self.fx.config_path(), args)
    }

    /// The same with another configuration file.
    fn service_with(&self, config: &Path, args: &[&str]) -> assert_cmd::Command {
        let mut cmd = assert_cmd::Command::cargo_bin("claude-flow").unwrap();
        cmd.env_remove("CLAUDE_FLOW_CONFIG")
            .env("PATH", self.fx.path("bin"))
            .current_dir(&self.fx.root)
            .arg("--config")
            .arg(config)
            .arg("service")
            .arg(args[0])
            .arg("--systemd-run-dir")
            .arg(self.fx.path("run-systemd"));
        if args[0] == "install" {
            // The fixture lives under /tmp, which the unit hides: these
            // tests are about other things (see
            // `install_refuses_paths_the_service_could_not_use`).
            cmd.arg("--force");
        }
        cmd.args(&args[1..]);
        cmd
    }

    fn unit_dir(&self) -> PathBuf {
        self.fx.path("units")
    }

    fn unit(&self) -> String {
        std::fs::read_to_string(self.unit_dir().join("claude-flow.service")).unwrap()
    }

    /// An executable standing in for the daemon binary.
    fn fake_daemon(&self) -> PathBuf {
        let path = self.fx.path("opt/claude-flow-daemon");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

fn whoami() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn line<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find(|l| l.starts_with(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in\n{unit}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn install_writes_the_unit_then_reloads_and_enables() {
    let m = Machine::new();
    // Through a symlink: the unit must name the real file.
    let daemon = m.fake_daemon();
    let link = m.fx.path("claude-flow-daemon-link");
    std::os::unix::fs::symlink(&daemon, &link).unwrap();
    let me = whoami();
    m.service(&["install", "--unit-dir"])
        .arg(m.unit_dir())
        .arg("--daemon")
        .arg(&link)
        .args(["--user", &me])
        .assert()
        .success()
        .stdout(predicate::str::contains("run "));

    let unit = m.unit();
    assert_eq!(
        line(&unit, "ExecStart"),
        format!(
            "ExecStart={} --config {}",
            daemon.canonicalize().unwrap().display(),
            m.fx.config_path().display()
        )
    );
    assert_eq!(line(&unit, "User"), format!("User={me}"));
    assert_eq!(
        line(&unit, "ReadWritePaths"),
        format!("ReadWritePaths={}", m.fx.path("state").display())
    );
    assert_eq!(line(&unit, "Type"), "Type=notify");
    assert_eq!(mode(&m.unit_dir().join("claude-flow.service")), 0o644);
    // The state directory did not exist: created private.
    assert_eq!(mode(&m.fx.path("state")), 0o700);
    assert_eq!(
        m.calls(),
        ["daemon-reload", "enable --now claude-flow.service"]
    );
}

#[test]
fn install_finds_the_daemon_beside_claude_flow() {
    let m = Machine::new();
    // A copy of claude-flow in a folder of its own, with a daemon beside it.
    let real = assert_cmd::cargo::cargo_bin("claude-flow");
    let dir = tempfile::tempdir_in(real.parent().unwrap()).unwrap();
    let cli = dir.path().join("claude-flow");
    if std::fs::hard_link(&real, &cli).is_err() {
        std::fs::copy(&real, &cli).unwrap();
    }
    let daemon = dir.path().join("claude-flow-daemon");
    std::fs::write(&daemon, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&daemon, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut cmd = assert_cmd::Command::new(&cli);
    cmd.env_remove("CLAUDE_FLOW_CONFIG")
        .env("PATH", m.fx.path("bin"))
        .arg("--config")
        .arg(m.fx.config_path())
        .args([
            "service",
            "install",
            "--force",
            "--user",
            &whoami(),
            "--unit-dir",
        ])
        .arg(m.unit_dir())
        .arg("--systemd-run-dir")
        .arg(m.fx.path("run-systemd"))
        .assert()
        .success();
    assert!(
        line(&m.unit(), "ExecStart").starts_with(&format!(
            "ExecStart={} --config ",
            daemon.canonicalize().unwrap().display()
        )),
        "{}",
        m.unit()
    );
}

#[test]
fn install_before_the_config_exists_creates_the_directories_and_waits() {
    let m = Machine::new();
    let config = m.fx.path("etc/claude-flow/config.json");
    let state = m.fx.path("var/lib/claude-flow");
    m.service_with(&config, &["install", "--unit-dir"])
        .arg(m.unit_dir())
        .arg("--daemon")
        .arg(m.fake_daemon())
        .args(["--user", &whoami(), "--state-dir"])
        .arg(&state)
        .assert()
        .success()
        .stdout(predicate::str::contains("does not exist yet"));
    assert_eq!(mode(config.parent().unwrap()), 0o750);
    assert_eq!(mode(&state), 0o700);
    assert!(
        line(&m.unit(), "ExecStart").ends_with(&format!("--config {}", config.display())),
        "{}",
        m.unit()
    );
    // Not started: it would fail without its configuration.
    assert_eq!(m.calls(), ["daemon-reload", "enable claude-flow.service"]);
}

#[test]
fn install_dry_run_changes_nothing() {
    let m = Machine::new();
    m.service(&["install", "--dry-run", "--unit-dir"])
        .arg(m.unit_dir())
        .arg("--daemon")
        .arg(m.fake_daemon())
        .args(["--user", &whoami()])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("would write")
                .and(predicate::str::contains("ExecStart="))
                .and(predicate::str::contains("would run"))
                .and(predicate::str::contains("daemon-reload")),
        );
    assert!(!m.unit_dir().exists());
    assert!(!m.fx.path("state").exists());
    assert!(m.calls().is_empty());
}

#[test]
fn install_of_a_missing_user_is_planned_or_refused() {
    let m = Machine::new();
    let user = "claude-flow-test-no-such-user";
    // Dry run only: as root this would really create the user.
    let assert = m
        .service(&["install", "--dry-run", "--unit-dir"])
        .arg(m.unit_dir())
        .arg("--daemon")
        .arg(m.fake_daemon())
        .args(["--user", user])
        .assert();
    if nix::unistd::geteuid().is_root() {
        assert.success().stdout(predicate::str::contains(format!(
            "would create system user {user}: useradd --system"
        )));
    } else {
        assert
            .code(1)
            .stderr(predicate::str::contains("only root can create it"));
    }
}

#[test]
fn install_with_a_missing_daemon_or_a_bad_config_fails_clearly() {
    let m = Machine::new();
    m.service(&["install", "--unit-dir"])
        .arg(m.unit_dir())
        .args([
            "--daemon",
            "/nonexistent/claude-flow-daemon",
            "--user",
            &whoami(),
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("pass --daemon PATH"));
    m.fx.config(serde_json::json!({"service": {"poll_intervall": "5m"}}));
    m.service(&["install", "--unit-dir"])
        .arg(m.unit_dir())
        .arg("--daemon")
        .arg(m.fake_daemon())
        .args(["--user", &whoami()])
        .assert()
        .code(78)
        .stderr(predicate::str::contains("service.poll_intervall"));
    assert!(m.calls().is_empty());
    assert!(!m.unit_dir().exists());
}

#[test]
fn uninstall_stops_disables_removes_and_reloads() {
    let m = Machine::new();
    m.service(&["install", "--unit-dir"])
        .arg(m.unit_dir())
        .arg("--daemon")
        .arg(m.fake_daemon())
        .args(["--user", &whoami()])
        .assert()
        .success();
    std::fs::remove_file(m.fx.path("calls.log")).unwrap();

    m.service(&["uninstall", "--unit-dir"])
        .arg(m.unit_dir())
        .assert()
        .success()
        .stdout(predicate::str::contains("kept: the state directory"));
    assert!(!m.unit_dir().join("claude-flow.service").exists());
    assert_eq!(
        m.calls(),
        [
            "stop claude-flow.service",
            "disable claude-flow.service",
            "daemon-reload"
        ]
    );
    // The state stays.
    assert!(m.fx.path("state").is_dir());
}

#[test]
fn uninstall_carries_on_when_the_unit_is_not_loaded() {
    let m = Machine::new();
    m.systemctl(5, "Unit claude-flow.service not loaded.");
    // daemon-reload fails too with this fake; everything before it ran.
    m.service(&["uninstall", "--unit-dir"])
        .arg(m.unit_dir())
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "daemon-reload` exited with status 5",
        ));
    assert_eq!(
        m.calls(),
        [
            "stop claude-flow.service",
            "disable claude-flow.service",
            "daemon-reload"
        ]
    );
}

#[test]
fn start_stop_restart_wrap_systemctl() {
    let m = Machine::new();
    for verb in ["start", "stop", "restart"] {
        m.service(&[verb]).assert().success();
    }
    assert_eq!(
        m.calls(),
        [
            "start claude-flow.service",
            "stop claude-flow.service",
            "restart claude-flow.service"
        ]
    );
}

#[test]
fn a_failing_systemctl_fails_the_command_naming_it() {
    let m = Machine::new();
    m.systemctl(1, "Job for claude-flow.service failed.");
    m.service(&["start"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains(
            "Job for claude-flow.service failed.",
        ))
        .stderr(predicate::str::contains(
            "start claude-flow.service` exited with status 1",
        ));
}

#[test]
fn status_prints_systemctls_view() {
    let m = Machine::new();
    m.systemctl(0, "Active: active (running)");
    m.service(&["status"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Active: active (running)"));
    // LSB status 3: installed but not running; still a report.
    m.systemctl(3, "Active: inactive (dead)");
    m.service(&["status"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Active: inactive (dead)"));
    // 4: no such unit.
    m.systemctl(4, "Unit claude-flow.service could not be found.");
    m.service(&["status"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("claude-flow service install"));
    assert_eq!(m.calls(), ["status --no-pager claude-flow.service"; 3]);
}

#[test]
fn without_systemctl_every_command_fails_clearly() {
    let m = Machine::new();
    std::fs::remove_file(m.fx.path("bin/systemctl")).unwrap();
    for args in [
        &["install", "--daemon", "/bin/sh"][..],
        &["uninstall"],
        &["start"],
        &["stop"],
        &["restart"],
        &["status"],
    ] {
        m.service(args)
            .assert()
            .code(1)
            .stderr(predicate::str::contains(
                "`systemctl` was not found on PATH",
            ));
    }
}

#[test]
fn without_systemd_running_the_command_fails_clearly() {
    let m = Machine::new();
    std::fs::remove_dir(m.fx.path("run-systemd")).unwrap();
    m.service(&["start"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("not this machine's init system"));
    assert!(m.calls().is_empty());
}

#[test]
fn status_adds_the_running_daemons_own_view() {
    let m = Machine::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    m.fx.config(serde_json::json!({"service": {"listen": format!("127.0.0.1:{port}")}}));
    m.fx.workflow("exit 0");
    // A real service, in this process, for the CLI to ask.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.block_on(async {
        let handle = claude_flow_daemon::Daemon::builder(m.fx.config_path())
            .init_logging(false)
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let mut status = handle.orchestrator().subscribe_status();
        status.wait_for(|s| s.last_poll.is_some()).await.unwrap();
        handle
    });
    m.systemctl(0, "Active: active (running)");
    m.service(&["status"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Active: active (running)"))
        .stdout(predicate::str::contains("claude-flow-daemon says:"))
        .stdout(predicate::str::contains("health:  ok"));
    handle.shutdown();
    rt.block_on(handle.wait()).unwrap();
}

#[test]
fn install_refuses_paths_the_service_could_not_use() {
    let m = Machine::new();
    let me = whoami();
    m.fx.config(serde_json::json!({
        "github": {"token_file": "/root/claude-flow-test-token"},
    }));
    let mut cmd = assert_cmd::Command::cargo_bin("claude-flow").unwrap();
    cmd.env_remove("CLAUDE_FLOW_CONFIG")
        .env("PATH", m.fx.path("bin"))
        .arg("--config")
        .arg(m.fx.config_path())
        .args(["service", "install", "--systemd-run-dir"])
        .arg(m.fx.path("run-systemd"))
        .arg("--unit-dir")
        .arg(m.unit_dir())
        .arg("--daemon")
        .arg(m.fake_daemon())
        .args(["--user", &me]);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Every path, each with the setting that hides it.
    for expected in [
        format!(
            "the configuration file {} is under /tmp, which the unit replaces with an empty private one (PrivateTmp=yes)",
            m.fx.config_path().display()
        ),
        format!("service.state_dir {} is under /tmp", m.fx.path("state").display()),
        format!("local.dir {} is under /tmp", m.fx.path("issues").display()),
        format!("workflow.command {} is under /tmp", m.fx.path("wf.sh").display()),
        "github.token_file /root/claude-flow-test-token is under /root, which the unit hides (ProtectHome=yes)".to_owned(),
        "pass --force to install anyway".to_owned(),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
    assert!(!m.unit_dir().join("claude-flow.service").exists());
    assert!(!m.fx.path("state").exists(), "nothing is created");
    assert!(m.calls().is_empty());

    // --force installs, and still says what will not work.
    cmd.arg("--force")
        .assert()
        .success()
        .stdout(predicate::str::contains("warning: service.state_dir"));
    assert!(m.unit_dir().join("claude-flow.service").exists());
}
