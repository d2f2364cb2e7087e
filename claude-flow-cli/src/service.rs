//! `claude-flow service`: plans come from `claude_flow_core::service_unit`;
//! this prints them (`--dry-run`) or carries them out.

use std::path::{Path, PathBuf};

use claude_flow_core::Config;
use claude_flow_core::api::{ApiClient, Health};
use claude_flow_core::service_unit::{
    self, InstallOptions, Step, Systemd, UNIT_NAME, UnitState, Verb,
};

use crate::cli::{ServiceCommand, SystemdArgs};
use crate::commands::Failure;
use crate::out::outln;

/// Runs a `service` subcommand. Its work is blocking (files and
/// `systemctl`), so it runs off the async runtime.
pub async fn run(config: PathBuf, command: ServiceCommand) -> Result<(), Failure> {
    let asks_status = matches!(&command, ServiceCommand::Status(args) if !args.dry_run);
    let blocking_config = config.clone();
    let result = tokio::task::spawn_blocking(move || run_blocking(&blocking_config, command))
        .await
        .map_err(|e| Failure::other(format!("the service command failed: {e}")))?;
    // Under systemd's view, the daemon's own.
    if asks_status && let Some(health) = daemon_health(&config).await {
        outln!()?;
        outln!("claude-flow-daemon says:")?;
        crate::commands::print_health(&health)?;
    }
    result
}

fn run_blocking(config: &Path, command: ServiceCommand) -> Result<(), Failure> {
    match command {
        ServiceCommand::Install(args) => {
            let systemd = detect(&args.systemd)?;
            let daemon = match args.daemon {
                Some(path) => path,
                None => service_unit::daemon_beside_current_exe()?,
            };
            let steps = service_unit::install(
                &systemd,
                &InstallOptions {
                    daemon,
                    config: config.to_owned(),
                    unit_dir: args.unit_dir,
                    user: args.user,
                    state_dir: args.state_dir,
                    force: args.force,
                },
            )?;
            carry_out(&steps, args.systemd.dry_run)
        }
        ServiceCommand::Uninstall { systemd, unit_dir } => carry_out(
            &service_unit::uninstall(&detect(&systemd)?, &unit_dir),
            systemd.dry_run,
        ),
        ServiceCommand::Start(args) => control(&args, Verb::Start),
        ServiceCommand::Stop(args) => control(&args, Verb::Stop),
        ServiceCommand::Restart(args) => control(&args, Verb::Restart),
        ServiceCommand::Status(args) => status(&args),
    }
}

/// systemd's `systemctl`, or an error saying this machine lacks systemd.
/// A dry run only warns, so a plan can be previewed anywhere.
fn detect(args: &SystemdArgs) -> Result<Systemd, Failure> {
    match Systemd::detect(std::env::var_os("PATH"), &args.systemd_run_dir) {
        Err(e) if args.dry_run => {
            outln!("note: {e}")?;
            Ok(Systemd::assumed())
        }
        other => Ok(other?),
    }
}

fn carry_out(steps: &[Step], dry_run: bool) -> Result<(), Failure> {
    for step in steps {
        match step {
            Step::Note(note) => outln!("{note}")?,
            Step::WriteFile { contents, .. } if dry_run => {
                outln!("would {step}:")?;
                for line in contents.lines() {
                    outln!("    {line}")?;
                }
            }
            _ if dry_run => outln!("would {step}")?,
            _ => {
                outln!("{step}")?;
                step.run()?;
            }
        }
    }
    Ok(())
}

fn control(args: &SystemdArgs, verb: Verb) -> Result<(), Failure> {
    carry_out(&service_unit::control(&detect(args)?, verb), args.dry_run)
}

fn status(args: &SystemdArgs) -> Result<(), Failure> {
    let systemd = detect(args)?;
    if args.dry_run {
        return outln!(
            "would run {} status --no-pager {UNIT_NAME}",
            systemd.systemctl.display()
        );
    }
    let state = service_unit::status(&systemd)?;
    match state {
        UnitState::Active | UnitState::Inactive => Ok(()),
        UnitState::Unknown(code) => Err(Failure::other(format!(
            "systemctl cannot report on {UNIT_NAME} (exit {}); is it installed? \
             (`claude-flow service install`)",
            code.map_or_else(|| "by signal".to_owned(), |c| c.to_string())
        ))),
    }
}

/// The daemon's own view (`GET /healthz` on `service.listen`), printed
/// under systemd's. Quiet (`None`) when the configuration cannot be read,
/// HTTP is off, or the daemon does not answer: systemd's view stands alone.
async fn daemon_health(config: &Path) -> Option<Health> {
    let config = Config::load(config).ok()?;
    if config.service.listen.is_empty() {
        return None;
    }
    ApiClient::for_listen(&config.service.listen)
        .ok()?
        .health()
        .await
        .ok()
}
