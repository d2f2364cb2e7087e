//! What an operator asks of the state directly, with no service involved:
//! naming an issue, retrying it, cancelling it, ending a quota pause. The
//! CLI and the service's HTTP API share these. With a store several
//! daemons share, [`cancel_shared`] and [`resume_shared`] work from any
//! host, daemons running or not: the leader follows the store's changes,
//! and the daemon running an attempt sees a stop request.

use std::time::SystemTime;

use crate::api::Resumed;
use crate::error::Error;
use crate::issue::{IssueKey, RepoId};
use crate::record::{IssueRecord, IssueStatus, ServiceState};
use crate::state::{Coordination, StateStore, StopRequest};

/// Parses an issue argument: `<n>` when exactly one repository is
/// configured, else `owner/name#<n>`.
pub fn parse_issue_arg(arg: &str, repos: &[RepoId]) -> Result<IssueKey, String> {
    if let Ok(number) = arg.parse::<u64>() {
        return match repos {
            [repo] => Ok(IssueKey::new(repo.clone(), number)),
            [] => Err("no repository is configured; name the issue as owner/name#<n>".into()),
            _ => Err(format!(
                "{} repositories are configured; name the issue as owner/name#{number}",
                repos.len()
            )),
        };
    }
    arg.parse::<IssueKey>()
        .map_err(|_| format!("{arg:?} is not an issue: expected <n> or owner/name#<n>"))
}

/// Queues a settled issue for a new round with a fresh retry budget, or a
/// waiting one for an attempt as soon as possible.
pub async fn retry(store: &dyn StateStore, key: &IssueKey) -> Result<IssueRecord, Error> {
    let mut record = known(store, key).await?;
    match record.status {
        IssueStatus::Running => {
            return Err(Error::Conflict(format!("{key} is running now")));
        }
        status if status.is_settled() => record.start_new_round(),
        _ => {
            record.status = IssueStatus::Queued;
            record.next_retry_at = None;
            record.updated_at = SystemTime::now();
        }
    }
    store.put(&record).await?;
    Ok(record)
}

/// Marks an issue that is not running as cancelled, so that it is not
/// started again until it is triggered again or retried.
pub async fn cancel(store: &dyn StateStore, key: &IssueKey) -> Result<IssueRecord, Error> {
    let mut record = known(store, key).await?;
    match record.status {
        IssueStatus::Running => {
            return Err(Error::Conflict(format!(
                "{key} is running; cancel it through the running service"
            )));
        }
        status if status.is_settled() => {
            return Err(Error::Conflict(format!("{key} is already {status}")));
        }
        _ => {
            record.status = IssueStatus::Cancelled;
            record.next_retry_at = None;
            // The cancel report on the issue gives this reason.
            record.last_error = Some("cancelled by an operator".into());
            record.updated_at = SystemTime::now();
        }
    }
    store.put(&record).await?;
    Ok(record)
}

/// Ends a quota pause (CONTRACT section 4) in the state store of a
/// service that is not running: no pause, and the count of quota exits in
/// a row starts again from 0, so the next pause is the shortest one.
/// Returns the state as it was, to say what was lifted. A running service
/// keeps its pause in memory; end it with
/// [`Orchestrator::resume`](crate::Orchestrator::resume) instead.
pub async fn resume(store: &dyn StateStore) -> Result<ServiceState, Error> {
    let before = store.load_service().await?;
    store.put_service(&ServiceState::default()).await?;
    Ok(before)
}

/// Cancels an issue in a store several daemons share (at a follower, or
/// from the CLI on any host): a running attempt is asked to stop (its daemon stops
/// the workflow and settles the round as cancelled); a waiting one is
/// settled now.
pub async fn cancel_shared(
    store: &dyn StateStore,
    coordination: &dyn Coordination,
    key: &IssueKey,
) -> Result<IssueRecord, Error> {
    for _ in 0..3 {
        let record = store
            .get(key)
            .await?
            .ok_or_else(|| Error::UnknownIssue(key.clone()))?;
        if record.status == IssueStatus::Running {
            let run_id = record
                .last_attempt()
                .map(|a| a.run_id.clone())
                .unwrap_or_default();
            if coordination
                .request_stop(key, &run_id, StopRequest::Operator)
                .await?
            {
                tracing::info!(issue = %key, "cancelled by an operator: asked its daemon to stop the running workflow");
                return Ok(record);
            }
            // It ended meanwhile: look again.
            continue;
        }
        let cancelled = crate::ops::cancel(store, key).await?;
        // A claim that came first keeps the record running (the store
        // never takes a claim back): stop it instead. Whatever else is
        // stored now is the answer (an attempt that ended meanwhile).
        match store.get(key).await? {
            Some(now) if now.status == IssueStatus::Running => continue,
            Some(now) => return Ok(now),
            None => return Ok(cancelled),
        }
    }
    Err(Error::Conflict(format!(
        "{key} keeps changing under the cancel (starting and ending); try again"
    )))
}

/// Ends a quota pause in a store several daemons share, for every daemon
/// (the leader reads the service state again when it changes).
pub async fn resume_shared(store: &dyn StateStore) -> Result<Resumed, Error> {
    let before = store.load_service().await?;
    let after = ServiceState {
        paused_until: None,
        pause_reason: None,
        quota_exits: 0,
        ..before.clone()
    };
    store.put_service(&after).await?;
    let lifted = Resumed {
        lifted_until: before
            .paused_until
            .filter(|until| *until > SystemTime::now()),
        pause_reason: before.pause_reason,
    };
    if let Some(until) = lifted.lifted_until {
        tracing::info!(until = %humantime::format_rfc3339_seconds(until), "the quota pause was ended by an operator");
    }
    Ok(lifted)
}

async fn known(store: &dyn StateStore, key: &IssueKey) -> Result<IssueRecord, Error> {
    store
        .get(key)
        .await?
        .ok_or_else(|| Error::UnknownIssue(key.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::Issue;
    use crate::state::MemoryStore;

    #[test]
    fn bare_numbers_need_exactly_one_repository() {
        let one: Vec<RepoId> = vec!["o/r".parse().unwrap()];
        assert_eq!(parse_issue_arg("7", &one).unwrap().to_string(), "o/r#7");
        let two: Vec<RepoId> = vec!["o/r".parse().unwrap(), "o/s".parse().unwrap()];
        assert!(
            parse_issue_arg("7", &two)
                .unwrap_err()
                .contains("owner/name#7")
        );
        assert_eq!(parse_issue_arg("o/s#9", &two).unwrap().to_string(), "o/s#9");
        assert!(parse_issue_arg("seven", &one).is_err());
    }

    #[tokio::test]
    async fn retry_starts_a_new_round_for_a_settled_issue() {
        let key: IssueKey = "o/r#1".parse().unwrap();
        let mut record = IssueRecord::new(Issue::new(key.clone(), "t"));
        record.status = IssueStatus::Failed;
        let store = MemoryStore::with_records([record]);
        let after = retry(&store, &key).await.unwrap();
        assert_eq!((after.status, after.round), (IssueStatus::Queued, 2));
        assert_eq!(store.get(&key).await.unwrap(), Some(after));
        let missing: IssueKey = "o/r#2".parse().unwrap();
        assert!(matches!(
            retry(&store, &missing).await,
            Err(Error::UnknownIssue(k)) if k == missing
        ));
        assert!(cancel(&store, &key).await.is_ok());
        assert!(matches!(
            cancel(&store, &key).await,
            Err(Error::Conflict(_))
        ));
    }

    #[tokio::test]
    async fn resume_clears_the_pause_and_the_streak_and_says_what_it_was() {
        let store = MemoryStore::new();
        let paused = ServiceState {
            paused_until: Some(SystemTime::now() + std::time::Duration::from_secs(3600)),
            pause_reason: Some("quota".into()),
            quota_exits: 2,
            ..ServiceState::default()
        };
        store.put_service(&paused).await.unwrap();
        assert_eq!(resume(&store).await.unwrap(), paused);
        assert_eq!(store.load_service().await.unwrap(), ServiceState::default());
        assert_eq!(resume(&store).await.unwrap(), ServiceState::default());
    }
}
