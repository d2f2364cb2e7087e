//! The command line, as CONTRACT section 6 defines it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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

    /// Print JSON instead of text (read commands).
    #[arg(long, global = true)]
    pub json: bool,

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
    /// Summarize the state: issues by status, and whether a service runs.
    Status,
    /// List every known issue.
    List,
    /// Show one issue with all its attempts.
    Show(IssueArg),
    /// Print an issue's workflow log (the latest attempt by default).
    Logs {
        #[command(flatten)]
        issue: IssueArg,
        /// Which attempt.
        #[arg(long)]
        attempt: Option<u32>,
        /// Keep printing while the attempt runs.
        #[arg(long, short)]
        follow: bool,
    },
    /// Queue an issue again: a new round for a settled issue.
    Retry(IssueArg),
    /// Stop an issue from being started again until it is retried or re-triggered.
    Cancel(IssueArg),
    /// Check or print the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
