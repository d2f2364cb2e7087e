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
use crate::issue::{Issue, IssueKey};
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
    /// The round (`CLAUDE_FLOW_ROUND`).
    pub round: u32,
    /// The attempt within the round (`CLAUDE_FLOW_ATTEMPT`).
    pub attempt: u32,
    /// Failed attempts of this round so far.
    pub failures: u32,
    /// The retry budget.
    pub max_attempts: u32,
    /// The issue's title or body changed after this round's text was
    /// approved (the round works on the approved text).
    pub edited_since_approval: bool,
}

/// What a source is told when a round succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuccessReport {
    /// The round.
    pub round: u32,
    /// The pull request, when the workflow printed one.
    pub pr_url: Option<String>,
    /// Which attempt of the round succeeded.
    pub attempt: u32,
    /// The text changed after approval (see [`StartReport`]).
    pub edited_since_approval: bool,
}

/// What a source is told when a round ends in failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureReport {
    /// The round.
    pub round: u32,
    /// Why the last attempt failed.
    pub reason: String,
    /// The last lines of the last attempt's log.
    pub log_tail: String,
    /// How many attempts were made this round.
    pub attempts: u32,
    /// The text changed after approval (see [`StartReport`]).
    pub edited_since_approval: bool,
}

/// What a source is told when a round is cancelled (by an operator, or
/// because the issue stopped being eligible).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelReport {
    /// The round.
    pub round: u32,
    /// Why, in words.
    pub reason: String,
    /// Whether an attempt of the round had started (and so was reported).
    pub started: bool,
}

/// What an issue should show at its source: the latest state of its
/// current round. A source brings the issue to this state; the reporter
/// sends only the latest one, so a superseded state is never sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// An attempt is running (or waiting to run again).
    Started(StartReport),
    /// The round succeeded.
    Succeeded(SuccessReport),
    /// The round failed after its last attempt.
    Failed(FailureReport),
    /// The round was cancelled.
    Cancelled(CancelReport),
}

impl Report {
    /// The round the report is about.
    pub fn round(&self) -> u32 {
        match self {
            Self::Started(r) => r.round,
            Self::Succeeded(r) => r.round,
            Self::Failed(r) => r.round,
            Self::Cancelled(r) => r.round,
        }
    }
}

/// A trigger the source saw and did not act on (CONTRACT section 5): the
/// label was applied by someone not trusted. Shown by `claude-flow list
/// --skipped`, the API and the console until the issue changes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SkippedTrigger {
    /// The issue, `owner/name#n` in JSON (as `list --json` has it).
    #[serde(with = "crate::orchestrator::display")]
    pub issue: IssueKey,
    /// Its title (attacker-controlled text: escape it when shown).
    pub title: String,
    /// Why it was skipped, e.g. "the label was applied by mallory, whose
    /// permission is read (write required)".
    pub reason: String,
}

/// A source of issues: says which are ready for work, and shows how they
/// are going.
///
/// Reports are made by a reconciler that runs beside the workflows, never
/// in their way: it calls [`report`](IssueSource::report) with the latest
/// state an issue should show, one call at a time per source, retries a
/// failed call later, and repeats after a restart a report whose
/// completion was not recorded. Implementations must therefore be
/// idempotent: reporting the same state twice shows it once. `reports.memo`
/// is persisted with the issue's record (for the round), so a source may
/// keep in it whatever it needs for that, such as a comment id.
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
#[async_trait]
pub trait IssueSource: Send + Sync {
    /// Every issue ready for work now. A complete answer or an error: a
    /// partial list would be taken as the truth, and an issue missing from
    /// it is no longer wanted (a running attempt is cancelled, a waiting
    /// one settles as cancelled).
    async fn poll(&self) -> Result<Vec<Issue>, SourceError>;

    /// The triggers the last successful [`poll`](IssueSource::poll) saw
    /// and ignored, with the reason; asked after each successful poll.
    /// Sources without a notion of trust have none.
    fn skipped(&self) -> Vec<SkippedTrigger> {
        Vec::new()
    }

    /// Brings the issue to show `report` (labels, a status comment, or
    /// whatever the source has).
    async fn report(
        &self,
        issue: &Issue,
        report: &Report,
        reports: &mut Reports,
    ) -> Result<(), SourceError>;
}
