//! The leader's side of several daemons sharing a store: the workers of
//! every daemon claim, run and finish attempts in the store, and the
//! leader follows those changes (through the store's change
//! notifications) to report them, count them, and act on quota exits. It
//! also asks workers to stop attempts (an operator's cancel, an issue no
//! longer eligible) and takes back the attempts whose leases ran out.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::super::Settings;
use super::super::attempt::{self, StopReason};
use super::super::reporter::Reporter;
use super::Engine;
use crate::error::Error;
use crate::issue::IssueKey;
use crate::record::{AttemptOutcome, IssueRecord, IssueStatus};
use crate::state::{Changes, Coordination, StopRequest};

/// After the store failed to say what changed: how long before asking
/// again (the leadership keeper notices a real outage).
const RETRY: Duration = Duration::from_secs(1);

/// Follows the store's changes on a task of its own, so that the loop
/// never waits on the notification connection. Returns once it listens
/// (or failed to, at the first try), so that nothing said after the
/// leader's first poll is missed.
pub(super) async fn spawn_changes(
    coordination: Arc<dyn Coordination>,
) -> (JoinHandle<()>, mpsc::Receiver<Changes>) {
    let (tx, rx) = mpsc::channel(16);
    let lease = coordination.lease();
    // The first look sets up the listener and asks for everything to be
    // read, which the loop's recovery has just done.
    if let Err(e) = tokio::time::timeout(lease / 4, coordination.changes(Duration::ZERO)).await {
        tracing::debug!(error = %e, "cannot listen for the store's changes yet");
    }
    let task = tokio::spawn(async move {
        loop {
            match coordination.changes(lease).await {
                Ok(changes) if changes.is_empty() => {}
                Ok(changes) => {
                    if tx.send(changes).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot follow the store's changes");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    });
    (task, rx)
}

impl Engine {
    /// Records changed in the store: each is taken in.
    pub(super) async fn on_changes(
        &mut self,
        changes: Changes,
        settings: &Settings,
        reporter: &Reporter,
    ) {
        if changes.poll {
            self.poll_now.notify_one();
        }
        let records = if changes.reload {
            // An operator's resume at another daemon lands here.
            match self.shared.store.load_service().await {
                Ok(service) if service != self.service => {
                    if service.paused_until.is_none() && self.service.paused_until.is_some() {
                        tracing::info!("the quota pause was ended by an operator");
                    }
                    self.service = service;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the service state"),
            }
            self.shared.store.load().await
        } else {
            let mut records = Vec::with_capacity(changes.issues.len());
            let mut failed = None;
            for key in &changes.issues {
                match self.shared.store.get(key).await {
                    Ok(Some(record)) => records.push(record),
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                }
            }
            failed.map_or(Ok(records), Err)
        };
        match records {
            Ok(records) => {
                self.reload_owed = false;
                for record in records {
                    self.follow(record, settings, reporter).await;
                }
            }
            // A change read from nowhere is not lost: everything is read
            // again at the next turn of the loop.
            Err(e) => {
                tracing::warn!(error = %e, "cannot read changed records; reading everything again");
                self.reload_owed = true;
            }
        }
        self.publish(reporter, |_| {});
    }

    /// Takes in a record as a worker (or an operator) left it: attempts
    /// that started or ended since the loop's copy, with the reports this
    /// leader made kept.
    async fn follow(&mut self, mut stored: IssueRecord, settings: &Settings, reporter: &Reporter) {
        let key = stored.key().clone();
        let memory = self.records.get(&key).cloned();
        let Some(memory) = memory else {
            self.note_running(&stored);
            self.set_record(stored);
            self.want_report(&key, reporter);
            return;
        };
        // The reports this leader made are newer than any worker's copy.
        let newer_reports = stored.take_leader_fields(&memory);
        if stored == memory {
            return;
        }
        let ended: Vec<_> = stored
            .attempts
            .iter()
            .filter(|a| {
                a.outcome.is_some()
                    && !memory
                        .attempts
                        .iter()
                        .any(|b| b.run_id == a.run_id && b.outcome.is_some())
            })
            .cloned()
            .collect();
        for attempt in &ended {
            self.attempt_ended(&key, attempt, settings).await;
        }
        if stored.status.is_settled() && !memory.status.is_settled() {
            self.count_settled(&key, stored.status);
        }
        self.note_running(&stored);
        if newer_reports && let Err(e) = self.shared.store.put_relaxed(&stored).await {
            tracing::warn!(issue = %key, error = %e, "cannot note what was reported; it is reported again");
        }
        self.set_record(stored);
        self.want_report(&key, reporter);
    }

    /// Keeps `remote` in step with whether the record has a running
    /// attempt.
    fn note_running(&mut self, record: &IssueRecord) {
        let key = record.key();
        match record.last_attempt() {
            Some(attempt) if record.status == IssueStatus::Running => {
                self.remote.insert(key.clone(), attempt.run_id.clone());
            }
            _ => {
                self.remote.remove(key);
            }
        }
    }

    /// Takes back every attempt whose lease ran out (its daemon died or
    /// lost the database): interrupted, queued again unless that happened
    /// `service.max_interruptions` times in a row.
    pub(super) async fn expire(&mut self, settings: &Settings, reporter: &Reporter) {
        let Some(coordination) = self.coordination.clone() else {
            return;
        };
        let lease = coordination.lease();
        self.next_expire = Instant::now() + lease / 3;
        let now = SystemTime::now();
        let given = settings.clone();
        let settle = move |record: &mut IssueRecord, stop: Option<StopRequest>| {
            // A stop that was asked for (an operator's cancel, an issue no
            // longer eligible) still settles the round as cancelled.
            let outcome = match stop {
                Some(_) => AttemptOutcome::Cancelled,
                None => AttemptOutcome::Interrupted,
            };
            if let Some(attempt) = record.attempts.last_mut()
                && attempt.outcome.is_none()
            {
                attempt.outcome = Some(outcome);
                attempt.finished_at = Some(now);
            }
            let span = tracing::info_span!("issue", issue = %record.key(), round = record.round);
            match stop {
                Some(request) => attempt::cancel_round(record, StopReason::from(request), now),
                None => span.in_scope(|| attempt::interrupted(record, &given)),
            }
        };
        match tokio::time::timeout(lease / 4, coordination.expire(&settle)).await {
            Ok(Ok(records)) => {
                for record in records {
                    tracing::warn!(issue = %record.key(), "the daemon running this attempt stopped renewing its lease: the attempt is interrupted");
                    self.follow(record, settings, reporter).await;
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot look for leases that ran out"),
            Err(_) => tracing::warn!("cannot look for leases that ran out: no answer"),
        }
    }

    /// Asks the daemon running `key`'s attempt to stop it.
    pub(super) async fn stop_remote(
        &self,
        key: &IssueKey,
        reason: StopRequest,
    ) -> Result<(), Error> {
        let (Some(coordination), Some(run_id)) = (&self.coordination, self.remote.get(key)) else {
            return Ok(());
        };
        coordination.request_stop(key, run_id, reason).await?;
        Ok(())
    }

    /// Asks for every running attempt of an issue the last poll did not
    /// find eligible to stop.
    pub(super) async fn stop_remote_unwanted(&self) {
        let unwanted: Vec<IssueKey> = self
            .remote
            .keys()
            .filter(|k| !self.eligible.contains(*k))
            .cloned()
            .collect();
        for key in unwanted {
            tracing::info!(issue = %key, "no longer eligible: asking its daemon to stop the running workflow");
            if let Err(e) = self.stop_remote(&key, StopRequest::Unwanted).await {
                tracing::warn!(issue = %key, error = %e, "cannot ask for the workflow to stop; asking again at the next poll");
            }
        }
    }
}
