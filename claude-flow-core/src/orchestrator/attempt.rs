//! One attempt, from its durable start to its durable outcome: the task
//! the loop spawns per running workflow. It reports nothing to the source
//! (that is the reporter's job), so the workflow's slot is free the moment
//! its process has ended and its outcome is durable.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::{Settings, Shared};
use crate::error::{Error, RunnerError};
use crate::record::{Attempt, AttemptOutcome, IssueRecord, IssueStatus};
use crate::runner::{ExitKind, RunOutcome, WorkflowJob};

/// Why the loop stopped an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopReason {
    /// The issue is no longer eligible at its source.
    Unwanted,
    /// An operator cancelled it.
    Operator,
    /// The service is stopping.
    Shutdown,
    /// This daemon's claim on the attempt is lost or about to run out
    /// (several daemons): another daemon may run the issue soon.
    LeaseLost,
}

impl From<crate::state::StopRequest> for StopReason {
    fn from(request: crate::state::StopRequest) -> Self {
        match request {
            crate::state::StopRequest::Operator => Self::Operator,
            crate::state::StopRequest::Unwanted => Self::Unwanted,
        }
    }
}

impl StopReason {
    pub(super) fn cancel_reason(self) -> &'static str {
        match self {
            Self::Operator => "cancelled by an operator",
            Self::Unwanted | Self::Shutdown | Self::LeaseLost => UNWANTED,
        }
    }
}

/// Why a round is cancelled when its issue stops being eligible.
pub(super) const UNWANTED: &str = "the issue is no longer eligible at its source (the trigger label was removed, the issue was closed or deleted, or the label was applied again by someone not trusted)";

/// Starts a new attempt in `record` (in memory): status `running`.
pub(super) fn begin(record: &mut IssueRecord, now: SystemTime) {
    let number = record.next_attempt_number();
    record
        .attempts
        .push(Attempt::started(number, record.round, new_run_id(), now));
    record.status = IssueStatus::Running;
    record.next_retry_at = None;
    record.updated_at = now;
}

/// The job of the attempt `attempt` of `record`, as the runner takes it.
pub(super) fn job(record: &IssueRecord, attempt: &Attempt) -> WorkflowJob {
    WorkflowJob {
        issue: record.issue.clone(),
        round: record.round,
        attempt: attempt.number,
        run_id: attempt.run_id.clone(),
    }
}

/// Settles the round as cancelled, for `reason` (a stop that was asked
/// for must not let the issue run again, however the workflow ended).
pub(super) fn cancel_round(record: &mut IssueRecord, reason: StopReason, now: SystemTime) {
    record.status = IssueStatus::Cancelled;
    record.next_retry_at = None;
    record.last_error = Some(reason.cancel_reason().to_owned());
    record.updated_at = now;
}

/// How an attempt task ended.
pub(super) struct Finished {
    /// The record as the attempt left it, durable.
    pub(super) record: IssueRecord,
    /// Set when the workflow could not be started at all: the attempt was
    /// taken back (no attempt used) and the issue is queued again.
    pub(super) unstartable: Option<String>,
}

/// Runs the attempt that [`begin`] added: durable before the workflow
/// starts (a crash from there on is an interrupted attempt, never a lost
/// one), its outcome durable before the loop hears of it.
pub(super) async fn run(
    shared: Arc<Shared>,
    settings: Settings,
    mut record: IssueRecord,
    cancel: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
) -> Result<Finished, Error> {
    let Some(attempt) = record.attempts.last().cloned() else {
        return Err(Error::Other("attempt task without an attempt".into()));
    };
    shared.store.put(&record).await?;
    tracing::info!("workflow starting");
    let job = job(&record, &attempt);
    let result = shared.runner().run(&job, cancel).await;
    if let Err(e) = &result
        && e.never_started()
    {
        // Not an attempt: the program is missing or cannot be executed,
        // which no retry of this issue can fix; the loop holds all starts
        // until the program is back.
        tracing::error!(error = %e, "the workflow cannot be started; no attempt is used");
        record.attempts.pop();
        record.status = IssueStatus::Queued;
        record.updated_at = SystemTime::now();
        shared.store.put(&record).await?;
        return Ok(Finished {
            record,
            unstartable: Some(e.to_string()),
        });
    }
    apply_outcome(&mut record, &settings, result, reason.get().copied());
    shared.store.put(&record).await?;
    Ok(Finished {
        record,
        unstartable: None,
    })
}

pub(super) fn apply_outcome(
    record: &mut IssueRecord,
    settings: &Settings,
    result: Result<RunOutcome, RunnerError>,
    stop_reason: Option<StopReason>,
) {
    let now = SystemTime::now();
    let Some(attempt) = record.attempts.last_mut() else {
        return;
    };
    attempt.finished_at = Some(now);
    let outcome = match result {
        Ok(run) => {
            attempt.log_path = run.log_path.clone();
            attempt.pr_url = run.pr_url.clone();
            match run.exit {
                ExitKind::Code(code) => attempt.exit_code = Some(code),
                ExitKind::Signal(signal) => attempt.signal = Some(signal),
                _ => {}
            }
            classify(&run, stop_reason)
        }
        Err(e) => AttemptOutcome::Failed {
            reason: e.to_string(),
        },
    };
    attempt.outcome = Some(outcome.clone());
    let pr_url = attempt.pr_url.clone();
    record.updated_at = now;
    match outcome {
        AttemptOutcome::Succeeded => {
            tracing::info!(
                pr_url = pr_url.as_deref().unwrap_or("none"),
                "workflow succeeded"
            );
            record.status = IssueStatus::Done;
            record.pr_url = pr_url;
            record.last_error = None;
        }
        AttemptOutcome::Failed { reason } => {
            let failures = record.failures_this_round();
            if failures >= settings.max_attempts {
                tracing::warn!(%reason, failures, "workflow failed; no attempts left");
                record.status = IssueStatus::Failed;
            } else {
                let wait = settings.backoff(failures);
                tracing::warn!(%reason, failures, retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())), "workflow failed; will retry");
                record.status = IssueStatus::Retrying;
                record.next_retry_at = Some(now + wait);
            }
            record.last_error = Some(reason);
        }
        AttemptOutcome::Cancelled => {
            let reason = stop_reason.unwrap_or(StopReason::Unwanted).cancel_reason();
            tracing::info!(reason, "workflow cancelled");
            record.status = IssueStatus::Cancelled;
            record.last_error = Some(reason.to_owned());
        }
        AttemptOutcome::Interrupted => interrupted(record, settings),
        AttemptOutcome::QuotaExhausted { .. } => {
            record.status = IssueStatus::Queued;
        }
    }
}

/// Settles a record whose last attempt was interrupted by the service
/// stopping: queued to run again, unless that happened
/// `max_interruptions` times in a row (a workflow that brings the service
/// down, or is killed with it, must not do so forever).
pub(super) fn interrupted(record: &mut IssueRecord, settings: &Settings) {
    let times = record.interruptions_in_a_row();
    if times >= settings.max_interruptions {
        let reason = format!(
            "the attempt was interrupted {times} times in a row by the service stopping \
             (a crash, a kill or running out of memory; the workflow may be what brings it \
             down); service.max_interruptions is {}",
            settings.max_interruptions
        );
        tracing::warn!(%reason, "not running the workflow again");
        record.status = IssueStatus::Failed;
        record.last_error = Some(reason);
    } else {
        tracing::info!(
            times,
            "workflow interrupted by the service stopping; it runs again"
        );
        record.status = IssueStatus::Queued;
    }
    record.next_retry_at = None;
    record.updated_at = SystemTime::now();
}

fn classify(run: &RunOutcome, stop_reason: Option<StopReason>) -> AttemptOutcome {
    match run.exit {
        ExitKind::Code(0) => AttemptOutcome::Succeeded,
        // CONTRACT section 4: the marker counts with exit 75 only; a failing
        // workflow that merely echoes an agent's marker is a failure.
        ExitKind::Code(75) if run.retry_after.is_some() => AttemptOutcome::QuotaExhausted {
            until: run.retry_after.unwrap_or(SystemTime::UNIX_EPOCH),
        },
        ExitKind::Code(code) => AttemptOutcome::Failed {
            reason: format!("exit code {code}"),
        },
        ExitKind::Signal(signal) => AttemptOutcome::Failed {
            reason: format!("killed by signal {}", signal_name(signal)),
        },
        ExitKind::TimedOut(limit) => AttemptOutcome::Failed {
            reason: format!("timed out after {}", humantime::format_duration(limit)),
        },
        ExitKind::Cancelled => match stop_reason {
            Some(StopReason::Unwanted | StopReason::Operator) => AttemptOutcome::Cancelled,
            // A runner that reports a cancellation we did not ask for is
            // treated like a shutdown: run it again.
            Some(StopReason::Shutdown | StopReason::LeaseLost) | None => {
                AttemptOutcome::Interrupted
            }
        },
    }
}

fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| signal.to_string())
}

fn new_run_id() -> String {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{millis:x}-{:08x}", rand::rng().random::<u32>())
}
