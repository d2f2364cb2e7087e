#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod api;
pub mod app;
pub mod config;
mod error;
mod issue;
pub mod issue_source;
pub mod logging;
pub mod ops;
mod orchestrator;
mod record;
pub mod redact;
pub mod retention;
pub mod runner;
mod secret;
pub mod service_dirs;
pub mod service_unit;
pub mod signals;
#[cfg(test)]
mod small_fs;
pub mod state;

pub use config::Config;
pub use error::{ConfigError, Error, RunnerError, SourceError, StoreError};
pub use issue::{InvalidRepoId, Issue, IssueKey, PrScope, RepoId};
pub use issue_source::{
    CancelReport, FailureReport, GithubSettings, GithubSource, IssueSource, LocalSource, Report,
    SkippedTrigger, StartReport, SuccessReport,
};
pub use orchestrator::{
    Orchestrator, OrchestratorBuilder, PollResult, Role, RunningAttempt, Settings, Status, Summary,
};
pub use record::{
    Attempt, AttemptOutcome, IssueRecord, IssueStatus, IssueSummary, Reports, ServiceState, Shown,
};
pub use runner::{ExitKind, FnRunner, RunOutcome, SubprocessRunner, WorkflowJob, WorkflowRunner};
pub use secret::Secret;
pub use state::{FileStore, StateStore};

#[cfg(feature = "test-util")]
pub use issue_source::{MemorySource, MockIssueSource, Reported};
#[cfg(feature = "test-util")]
pub use runner::MockWorkflowRunner;
#[cfg(feature = "test-util")]
pub use state::{MemoryStore, MockStateStore};
