//! The command line, as CONTRACT section 6 defines it.

use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};
use claude_flow_core::{IssueStatus, service_unit};

/// Turn labeled issues into pull requests: run, operate and inspect claude-flow.
#[derive(Debug, Parser)]
#[command(name = "claude-flow", version, propagate_version = true)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        long,
        global = true,
        env = "CLAUDE_FLOW_CONFIG",
        default_value = claude_flow_core::config::DEFAULT_CONFIG_PATH
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the orchestrator in the foreground.
    Run {
        /// Poll once, settle every issue found, then exit.
        #[arg(long)]
        once: bool,
    },
    /// Summarize the state: the service, a quota pause, running attempts, issue counts.
    ///
    /// With a running service, its own view (`GET /healthz`); else the
    /// state directory's. `--json` has `paused_until`, `pause_reason`,
    /// `running` (issue, round, attempt, started_at, elapsed_seconds) and
    /// `last_poll` at the top level.
    Status(JsonArg),
    /// List the known issues: status, round, the round's attempts, when the
    /// running attempt started and when the next retry is due.
    List(ListArgs),
    /// Show one issue with all its attempts, by round, and the last lines of
    /// each failed attempt's log.
    Show {
        #[command(flatten)]
        issue: IssueArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Print an issue's workflow log (the latest attempt by default).
    Logs {
        #[command(flatten)]
        issue: IssueArg,
        /// Which round [default: the current one with --attempt, else the
        /// latest attempt's].
        #[arg(long)]
        round: Option<u32>,
        /// Which attempt, numbered within its round as `show` lists them
        /// (CLAUDE_FLOW_ATTEMPT) [default: the round's latest].
        #[arg(long)]
        attempt: Option<u32>,
        /// Keep printing while the attempt runs.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines (then, with --follow, what follows).
        #[arg(long, short = 'n', value_name = "N")]
        tail: Option<usize>,
    },
    /// Queue an issue again: a new round for a settled issue.
    Retry(IssueArg),
    /// Cancel an issue: it is not started again until it is retried or its
    /// trigger is applied again.
    ///
    /// A running workflow is killed: its process group gets SIGTERM, then
    /// SIGKILL once workflow.kill_grace has passed, and the issue settles as
    /// cancelled. With a running service this goes through its HTTP API
    /// (which needs the API token), else to the state directory.
    Cancel(IssueArg),
    /// End a quota pause now, so that workflows start again.
    ///
    /// Asks the running service (`POST /api/resume`) when one runs, else
    /// clears the pause in the state directory. Prints the pause it lifted,
    /// or `not paused`.
    Resume,
    /// Remove the workspaces and logs of issues settled longer ago than
    /// service.retention, and say what that freed.
    ///
    /// The service does this by itself, at start and every hour; records
    /// stay (`show` says when the files went). Asks the running service
    /// (`POST /api/prune`) when one runs, else works in the state
    /// directory. Never touches a running or waiting issue's files.
    Prune {
        /// Say what would be freed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Check or print the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The state store: the PostgreSQL schema, copying a file store in.
    #[command(subcommand)]
    Store(crate::store::StoreCommand),
    /// Install and control the systemd service.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `--json`, on the commands that honour it (the read commands and
/// `prune`).
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `list` options.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only issues with this status (several: comma-separated or repeated).
    #[arg(long, value_name = "S", value_delimiter = ',', value_parser = status_parser())]
    pub status: Vec<IssueStatus>,
    /// The triggers the service ignored instead, with the reason (e.g. a
    /// label applied by someone without write permission).
    #[arg(long, conflicts_with = "status")]
    pub skipped: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `list --status`: one of [`IssueStatus::ALL`], by name; anything else
/// is a usage error listing them.
fn status_parser() -> impl TypedValueParser<Value = IssueStatus> {
    clap::builder::PossibleValuesParser::new(IssueStatus::ALL.map(IssueStatus::as_str))
        .try_map(|s| s.parse::<IssueStatus>())
}

/// An issue argument.
#[derive(Debug, Args)]
pub struct IssueArg {
    /// `<n>` when one repository is configured, else `owner/name#<n>`.
    pub issue: String,
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration; exit 78 naming the bad key.
    Check,
    /// Print the effective configuration, secrets redacted.
    Show,
}

/// `service` subcommands: the systemd unit and `systemctl`.
#[derive(Debug, Clone, Subcommand)]
pub enum ServiceCommand {
    /// Write the unit (for this --config), create the user and the
    /// configuration and state directories if absent, then daemon-reload and
    /// enable --now.
    Install(InstallArgs),
    /// Stop and disable the service and remove its unit; the state, the
    /// configuration and the user stay.
    Uninstall {
        #[command(flatten)]
        systemd: SystemdArgs,
        /// The directory holding the unit.
        #[arg(long, value_name = "DIR", default_value = service_unit::DEFAULT_UNIT_DIR)]
        unit_dir: PathBuf,
    },
    /// `systemctl start claude-flow.service`.
    Start(SystemdArgs),
    /// `systemctl stop claude-flow.service`: a graceful stop.
    Stop(SystemdArgs),
    /// `systemctl restart claude-flow.service`.
    Restart(SystemdArgs),
    /// systemd's view of the service, then the daemon's own.
    Status(SystemdArgs),
}

/// Options every `service` subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct SystemdArgs {
    /// Print what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The directory that exists when systemd is the init system (tests
    /// point it elsewhere).
    #[arg(long, hide = true, value_name = "DIR", default_value = service_unit::SYSTEMD_RUN_DIR)]
    pub systemd_run_dir: PathBuf,
}

/// `service install` options.
#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub systemd: SystemdArgs,
    /// Where to write claude-flow.service.
    #[arg(long, value_name = "DIR", default_value = service_unit::DEFAULT_UNIT_DIR)]
    pub unit_dir: PathBuf,
    /// The daemon binary [default: claude-flow-daemon beside this program].
    #[arg(long, value_name = "PATH")]
    pub daemon: Option<PathBuf>,
    /// The user the service runs as; created as a system user if missing
    /// (as root).
    #[arg(long, value_name = "NAME", default_value = service_unit::DEFAULT_USER)]
    pub user: String,
    /// The state directory to create while the configuration file does
    /// not exist yet [default: /var/lib/claude-flow]; otherwise the
    /// configuration's service.state_dir is used.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Install even when the service could not use some of its paths
    /// (under /home or /tmp, which the unit hides, or not readable or
    /// writable by its user); they are listed as warnings.
    #[arg(long)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
