//! Running one attempt of a workflow for an issue.
//!
//! Implementations:
//! - [`SubprocessRunner`]: the CONTRACT section 4 workflow executable.
//! - [`FnRunner`]: a Rust closure, for embedders whose work is not a process.
//! - `MockWorkflowRunner` (feature `test-util`): a mockall mock.

mod closure;
mod guardian;
mod output;
mod preflight;
mod process;
mod spawn;
mod subprocess;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::RunnerError;
use crate::issue::Issue;

pub use closure::FnRunner;
pub use output::{WorkflowOutput, log_tail, scan_output};
pub use preflight::check_program;
pub use subprocess::{SubprocessRunner, SubprocessSettings, attempt_log_path};
pub(crate) use subprocess::{log_dir_for, workspace_dir_for};

/// One attempt to run the workflow for an issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowJob {
    /// The issue.
    pub issue: Issue,
    /// `CLAUDE_FLOW_ROUND`: 1, 2, ...; a new round each time the issue is
    /// triggered again or retried by an operator after it settled.
    pub round: u32,
    /// `CLAUDE_FLOW_ATTEMPT`: 1, 2, ... within the round.
    pub attempt: u32,
    /// `CLAUDE_FLOW_RUN_ID`: unique per attempt.
    pub run_id: String,
}

/// How the workflow process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal (not by us).
    Signal(i32),
    /// It ran past its time limit and was stopped.
    TimedOut(Duration),
    /// The cancellation token fired and it was stopped.
    Cancelled,
}

/// What one attempt produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// How the workflow ended.
    pub exit: ExitKind,
    /// The pull request it printed, when it printed one.
    pub pr_url: Option<String>,
    /// Where its output went.
    pub log_path: Option<PathBuf>,
    /// How long it ran.
    pub duration: Duration,
    /// Set when it exited 75 after printing `claude-flow: retry-after`.
    pub retry_after: Option<SystemTime>,
}

impl RunOutcome {
    /// Exit code 0.
    pub fn succeeded(&self) -> bool {
        self.exit == ExitKind::Code(0)
    }
}

/// Runs workflow attempts.
///
/// `run` must return promptly once `cancel` fires, having stopped
/// everything the attempt started, and must not leave work running when it
/// returns.
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
#[async_trait]
pub trait WorkflowRunner: Send + Sync {
    /// Runs one attempt to completion, timeout or cancellation.
    async fn run(
        &self,
        job: &WorkflowJob,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, RunnerError>;

    /// Whether the workflow can be started at all (its program exists and
    /// is executable, its interpreter too). The orchestrator asks before
    /// starting attempts; while it fails, nothing starts and no attempt is
    /// used. The default says yes, for runners that always can.
    async fn preflight(&self) -> Result<(), RunnerError> {
        Ok(())
    }

    /// Stops anything still left of an attempt that a previous instance of
    /// the service started and did not see finish (it was killed). The
    /// default does nothing, for runners whose work dies with the process.
    async fn abandon(&self, run_id: &str) -> Result<(), RunnerError> {
        let _ = run_id;
        Ok(())
    }
}
