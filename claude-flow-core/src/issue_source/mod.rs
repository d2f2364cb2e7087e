//! Where issues come from and where progress is reported back.
//!
//! Implementations:
//! - [`GithubSource`]: open issues of GitHub repositories carrying the
//!   trigger label, applied by someone trusted (CONTRACT section 5).
//! - [`LocalSource`]: Markdown files in a directory (CONTRACT section 7).
//! - `MemorySource` (feature `test-util`): an in-process list for tests.
//! - `MockIssueSource` (feature `test-util`): a mockall mock.

mod github;
mod local;
#[cfg(any(test, feature = "test-util"))]
mod memory;

use async_trait::async_trait;

use crate::error::SourceError;
use crate::issue::Issue;
use crate::record::Reports;

pub use github::{
    API_VERSION as GITHUB_API_VERSION, GithubSettings, GithubSource, IssueChange, WebhookEvent,
    parse_webhook as parse_github_webhook,
};
pub use local::LocalSource;
#[cfg(any(test, feature = "test-util"))]
pub use memory::{MemorySource, Reported};

/// What a source is told when an attempt starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartReport {
    /// The attempt number (`CLAUDE_FLOW_ATTEMPT`).
    pub attempt: u32,
    /// Failed attempts of this round so far.
    pub failures: u32,
    /// The retry budget.
    pub max_attempts: u32,
}

/// What a source is told when a round succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuccessReport {
    /// The pull request, when the workflow printed one.
    pub pr_url: Option<String>,
    /// Which attempt succeeded.
    pub attempt: u32,
}

/// What a source is told when a round ends in failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureReport {
    /// Why the last attempt failed.
    pub reason: String,
    /// The last lines of the last attempt's log.
    pub log_tail: String,
    /// How many attempts were made this round.
    pub attempts: u32,
}

/// A source of issues: says which are ready for work, hears how they went.
///
/// Implementations must be idempotent in their reports: after a crash the
/// orchestrator repeats a report whose completion it had not recorded.
/// `memo` is persisted with the issue's record; a source may keep in it
/// whatever it needs to stay idempotent (such as a comment id).
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
#[async_trait]
pub trait IssueSource: Send + Sync {
    /// Every issue ready for work now. A complete answer or an error: a
    /// partial list would be taken as the truth.
    async fn poll(&self) -> Result<Vec<Issue>, SourceError>;

    /// Whether the issue is still wanted; `false` cancels a running attempt.
    async fn is_wanted(&self, issue: &Issue) -> Result<bool, SourceError>;

    /// An attempt is starting.
    async fn report_started(
        &self,
        issue: &Issue,
        start: StartReport,
        reports: &mut Reports,
    ) -> Result<(), SourceError>;

    /// The round succeeded, with the pull request when the workflow opened one.
    async fn report_succeeded(
        &self,
        issue: &Issue,
        success: &SuccessReport,
        reports: &mut Reports,
    ) -> Result<(), SourceError>;

    /// The round failed after its last attempt.
    async fn report_failed(
        &self,
        issue: &Issue,
        failure: &FailureReport,
        reports: &mut Reports,
    ) -> Result<(), SourceError>;
}
