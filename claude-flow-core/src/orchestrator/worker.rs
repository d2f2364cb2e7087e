//! With a store that several daemons share, every daemon is a worker: it
//! claims ready issues from the store (up to `service.max_concurrent` at a
//! time), runs their workflows here under a lease, and writes each
//! outcome while the lease still holds. The leader's engine decides what
//! is ready and reports; the workers only run.
//!
//! Leases (fencing): every third of the lease the worker renews the
//! leases of all its attempts in one statement, bounded by a sixth of the
//! lease. An attempt whose lease could not be renewed is stopped (SIGTERM,
//! `workflow.kill_grace`, SIGKILL) once half its lease is gone, so its
//! processes have ended before the lease does (the configuration keeps
//! the kill grace under half the lease); a claim the store says is lost
//! is stopped at once. Either way its outcome is not written: the leader
//! finds the lease run out and records the attempt interrupted.
//!
//! Idle, the worker waits on the store's wake-up (`LISTEN`), the next
//! retry falling due, or a full lease, whichever comes first: no polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::attempt::{self, StopReason};
use super::{RunningAttempt, Settings, Shared, Status};
use crate::error::{Error, StoreError};
use crate::record::{IssueRecord, IssueStatus};
use crate::state::{Claim, Coordination, StopRequest};

/// After a failed claim, a failed renewal or an unreachable store: how
/// long before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// A claimed attempt running here.
struct Held {
    /// The claim as last renewed (the end of its lease in this host's
    /// clock, conservatively).
    claim: Arc<Mutex<Claim>>,
    cancel: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
    started_at: SystemTime,
    /// Stops the attempt when its lease is half gone without renewal.
    fence: tokio::task::JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.fence.abort();
    }
}

impl Held {
    fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.cancel.cancel();
    }
}

fn lease_until(claim: &Mutex<Claim>) -> SystemTime {
    claim.lock().unwrap_or_else(|e| e.into_inner()).lease_until
}

/// Stops the attempt once half its lease is gone without a renewal, so
/// that its processes have ended (`workflow.kill_grace` is under half the
/// lease) before another daemon may claim the issue. On a task of its own,
/// so that nothing the worker waits for can delay it.
async fn fence(
    claim: Arc<Mutex<Claim>>,
    cancel: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
    lease: Duration,
) {
    loop {
        let until = lease_until(&claim);
        let stop_at = until.checked_sub(lease / 2).unwrap_or(until);
        let wait = stop_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        if lease_until(&claim) == until {
            if !cancel.is_cancelled() {
                tracing::error!(
                    "cannot renew this attempt's lease (the database is unreachable): stopping the workflow before the lease ends"
                );
            }
            let _ = reason.set(StopReason::LeaseLost);
            cancel.cancel();
            return;
        }
    }
}

/// How an attempt task ended.
enum Ended {
    /// Its outcome is in the store.
    Written,
    /// The workflow could not be started (why); the issue is queued again.
    Unstartable(String),
    /// The lease ran out before the outcome could be written: the leader
    /// records it interrupted.
    Lost,
}

pub(super) struct Worker {
    shared: Arc<Shared>,
    coordination: Arc<dyn Coordination>,
    settings: watch::Receiver<Settings>,
    status: watch::Sender<Status>,
    hurry: Arc<Notify>,
    held: HashMap<String, Held>,
    attempts: JoinSet<(String, Result<Ended, Error>)>,
    /// Woken by the store (`LISTEN`) when work may have arrived, or a stop
    /// was asked for.
    woken: Arc<Notify>,
    /// No claim before this (the store failed, the workflow cannot start,
    /// a quota pause).
    hold_until: Instant,
    /// The next renewal (and node heartbeat).
    renew_at: Instant,
    /// When the next waiting issue falls due, as the store last said.
    next_ready: Option<SystemTime>,
    /// The last look found nothing to claim; look again when woken.
    idle: bool,
    /// When the worker last looked for work to claim.
    looked_at: Instant,
    /// `hold_until` is a quota pause's end: a change of the service state
    /// (an operator's resume) is worth a look before then.
    held_by_pause: bool,
}

impl Worker {
    pub(super) fn new(
        shared: Arc<Shared>,
        coordination: Arc<dyn Coordination>,
        settings: watch::Receiver<Settings>,
        status: watch::Sender<Status>,
        hurry: Arc<Notify>,
    ) -> Self {
        let now = Instant::now();
        Self {
            shared,
            coordination,
            settings,
            status,
            hurry,
            held: HashMap::new(),
            attempts: JoinSet::new(),
            woken: Arc::new(Notify::new()),
            hold_until: now,
            renew_at: now,
            next_ready: None,
            idle: false,
            looked_at: now,
            held_by_pause: false,
        }
    }

    /// Claims and runs until `stop`; then lets the running workflows end
    /// within `service.shutdown_grace` (or at once when hurried), stops
    /// the rest, and writes their outcomes (interrupted: they run again).
    pub(super) async fn run(mut self, stop: CancellationToken) {
        let lease = self.coordination.lease();
        let listener = tokio::spawn(listen(
            Arc::clone(&self.coordination),
            Arc::clone(&self.woken),
            lease,
        ));
        let mut grace: Option<Instant> = None;
        loop {
            let settings = self.settings.borrow_and_update().clone();
            let now = Instant::now();
            if now >= self.renew_at {
                self.renew(lease, &settings).await;
            }
            if let Some(deadline) = grace {
                if Instant::now() >= deadline {
                    for held in self.held.values() {
                        held.stop(StopReason::Shutdown);
                    }
                }
                if self.attempts.is_empty() {
                    break;
                }
            } else if !self.idle && Instant::now() >= self.hold_until {
                self.claim(&settings, lease).await;
            }
            let wake = self.next_wake(&settings, grace);
            tokio::select! {
                Some(joined) = self.attempts.join_next(), if !self.attempts.is_empty() => {
                    match joined {
                        Ok((run_id, ended)) => self.ended(&run_id, ended, &settings),
                        Err(e) => tracing::error!(error = %e, "an attempt task panicked"),
                    }
                    self.idle = false;
                }
                () = self.woken.notified() => {
                    self.idle = false;
                    if self.held_by_pause {
                        self.hold_until = Instant::now();
                    }
                    // A stop may have been asked for: look now.
                    if !self.held.is_empty() {
                        self.renew_at = Instant::now();
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    // A retry fell due, or a lease passed without a look
                    // (a wake-up missed): look again.
                    let due = self.next_ready.is_some_and(|t| t <= SystemTime::now());
                    if due || self.looked_at + lease <= Instant::now() {
                        self.idle = false;
                    }
                }
                () = stop.cancelled(), if grace.is_none() => {
                    tracing::info!(running = self.held.len(), grace = %humantime::format_duration(settings.shutdown_grace), "shutting down: claiming nothing more; waiting for running workflows");
                    grace = Some(Instant::now() + settings.shutdown_grace);
                }
                () = self.hurry.notified(), if grace.is_some() => grace = Some(Instant::now()),
                Ok(()) = self.settings.changed() => {}
            }
        }
        listener.abort();
    }

    /// Claims as many ready issues as there are free slots, unless a
    /// quota pause or a workflow that cannot start holds every start.
    async fn claim(&mut self, settings: &Settings, lease: Duration) {
        let free = (settings.max_concurrent as usize).saturating_sub(self.held.len());
        if free == 0 {
            return;
        }
        let bounded = lease / 4;
        match tokio::time::timeout(bounded, self.shared.store.load_service()).await {
            Ok(Ok(service)) => {
                self.held_by_pause = false;
                if let Some(until) = service.pause_at(SystemTime::now(), settings.max_pause) {
                    let wait = until.duration_since(SystemTime::now()).unwrap_or_default();
                    self.hold_until = Instant::now() + wait;
                    self.held_by_pause = true;
                    return;
                }
            }
            Ok(Err(e)) => return self.store_failed("read the service state", &e.to_string()),
            Err(_) => return self.store_failed("read the service state", "no answer"),
        }
        match self.shared.runner().preflight().await {
            Ok(()) => self.publish(|s| s.workflow_unavailable = None),
            Err(e) => {
                let why = e.to_string();
                tracing::error!(reason = %why, "the workflow cannot be started: claiming nothing until it can");
                self.publish(|s| s.workflow_unavailable = Some(why));
                self.hold_until = Instant::now() + settings.retry_backoff;
                return;
            }
        }
        self.looked_at = Instant::now();
        let now = SystemTime::now();
        let node = settings.node.clone();
        let begin = move |record: &mut IssueRecord| {
            attempt::begin(record, now);
            if let Some(attempt) = record.attempts.last_mut() {
                attempt.node = Some(node.clone());
            }
        };
        let claimed = tokio::time::timeout(
            bounded,
            self.coordination.claim(&settings.node, free, now, &begin),
        )
        .await;
        let claims = match claimed {
            Ok(Ok(claims)) => claims,
            Ok(Err(e)) => return self.store_failed("claim ready issues", &e.to_string()),
            Err(_) => return self.store_failed("claim ready issues", "no answer"),
        };
        if claims.len() < free {
            self.idle = true;
            self.next_ready =
                match tokio::time::timeout(lease / 6, self.coordination.next_ready()).await {
                    Ok(Ok(next)) => next,
                    _ => None,
                };
        }
        for claim in claims {
            self.start(claim, settings);
        }
    }

    fn store_failed(&mut self, what: &str, why: &str) {
        tracing::warn!(error = %why, "cannot {what}; starting nothing until the store answers");
        self.hold_until = Instant::now() + RETRY;
    }

    fn start(&mut self, claim: Claim, settings: &Settings) {
        let record = claim.record.clone();
        let key = record.key().clone();
        let Some(attempt) = record.last_attempt().cloned() else {
            return;
        };
        let run_id = claim.run_id.clone();
        let span = tracing::info_span!("issue", issue = %key, round = record.round, attempt = attempt.number);
        let claim = Arc::new(Mutex::new(claim));
        let cancel = CancellationToken::new();
        let reason = Arc::new(OnceLock::new());
        let held = Held {
            fence: tokio::spawn(fence(
                Arc::clone(&claim),
                cancel.clone(),
                Arc::clone(&reason),
                self.coordination.lease(),
            )),
            claim,
            cancel,
            reason,
            started_at: attempt.started_at,
        };
        let task = run_claimed(
            Arc::clone(&self.shared),
            Arc::clone(&self.coordination),
            settings.clone(),
            record,
            Arc::clone(&held.claim),
            held.cancel.clone(),
            Arc::clone(&held.reason),
        );
        self.held.insert(run_id.clone(), held);
        self.publish(|_| {});
        self.attempts
            .spawn(async move { (run_id, task.await) }.instrument(span));
    }

    fn ended(&mut self, run_id: &str, ended: Result<Ended, Error>, settings: &Settings) {
        self.held.remove(run_id);
        match ended {
            Ok(Ended::Written) => {}
            Ok(Ended::Unstartable(why)) => {
                self.publish(|s| s.workflow_unavailable = Some(why));
                self.hold_until = Instant::now() + settings.retry_backoff;
            }
            Ok(Ended::Lost) => {}
            Err(e) => tracing::error!(error = %e, "an attempt ended in error"),
        }
        self.publish(|_| {});
    }

    /// Renews every lease held (and says this daemon is alive); stops
    /// the attempts whose claims are lost, and takes stop requests.
    async fn renew(&mut self, lease: Duration, settings: &Settings) {
        self.renew_at = Instant::now() + lease / 3;
        self.renew_leases(lease).await;
        match tokio::time::timeout(lease / 6, self.coordination.heartbeat(&settings.node)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat failed"),
            Err(_) => tracing::debug!("heartbeat failed: no answer"),
        }
    }

    async fn renew_leases(&mut self, lease: Duration) {
        if self.held.is_empty() {
            return;
        }
        let claims: Vec<Claim> = self
            .held
            .values()
            .map(|h| h.claim.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        let renewed = match tokio::time::timeout(lease / 6, self.coordination.renew(&claims)).await
        {
            Ok(Ok(renewed)) => renewed,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot renew the leases of running attempts");
                self.renew_at = Instant::now() + RETRY.min(lease / 6);
                return;
            }
            Err(_) => {
                tracing::warn!("cannot renew the leases of running attempts: no answer");
                self.renew_at = Instant::now() + RETRY.min(lease / 6);
                return;
            }
        };
        for (run_id, held) in &self.held {
            match renewed.iter().find(|c| c.run_id == *run_id) {
                Some(claim) => {
                    if let Some(request) = claim.stop {
                        let reason = StopReason::from(request);
                        if held.reason.get().is_none() {
                            tracing::info!(
                                run_id,
                                reason = reason.cancel_reason(),
                                "asked to stop the running workflow"
                            );
                        }
                        held.stop(reason);
                    }
                    *held.claim.lock().unwrap_or_else(|e| e.into_inner()) = claim.clone();
                }
                None => {
                    if !held.cancel.is_cancelled() {
                        tracing::error!(
                            run_id,
                            "the claim on this attempt was lost (its lease ran out): stopping the workflow; it runs again"
                        );
                    }
                    held.stop(StopReason::LeaseLost);
                }
            }
        }
    }

    fn next_wake(&self, settings: &Settings, grace: Option<Instant>) -> Instant {
        let now = Instant::now();
        let now_sys = SystemTime::now();
        let until = |t: SystemTime| now + t.duration_since(now_sys).unwrap_or_default();
        // The heartbeat (and renewals) every third of the lease; the fence
        // tasks stop attempts whose leases run out by themselves.
        let mut wake = self.renew_at;
        if let Some(deadline) = grace {
            // Once past, the workflows have been told to stop: their ends
            // wake the loop.
            if deadline > now {
                wake = wake.min(deadline);
            }
        } else if self.held.len() < settings.max_concurrent as usize {
            if self.hold_until > now {
                wake = wake.min(self.hold_until);
            } else if let Some(next) = self.next_ready {
                wake = wake.min(until(next));
            }
        }
        wake
    }

    fn publish(&self, change: impl FnOnce(&mut Status)) {
        let mut running: Vec<RunningAttempt> = self
            .held
            .values()
            .map(|h| {
                let claim = h.claim.lock().unwrap_or_else(|e| e.into_inner());
                RunningAttempt {
                    issue: claim.record.key().clone(),
                    round: claim.record.round,
                    attempt: claim.record.last_attempt().map_or(0, |a| a.number),
                    started_at: h.started_at,
                }
            })
            .collect();
        running.sort_by(|a, b| a.issue.cmp(&b.issue));
        metrics::gauge!("claude_flow_workflows_running").set(running.len() as f64);
        self.status.send_modify(|s| {
            s.running = running;
            change(s);
        });
    }
}

/// Wakes the worker whenever the store says work may have arrived.
async fn listen(coordination: Arc<dyn Coordination>, woken: Arc<Notify>, lease: Duration) {
    loop {
        match coordination.wait_for_work(lease).await {
            Ok(true) => woken.notify_one(),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %e, "cannot listen for work");
                tokio::time::sleep(RETRY).await;
                woken.notify_one();
            }
        }
    }
}

/// Runs a claimed attempt (its record is already durable, running) and
/// writes its outcome while the claim holds.
async fn run_claimed(
    shared: Arc<Shared>,
    coordination: Arc<dyn Coordination>,
    settings: Settings,
    mut record: IssueRecord,
    claim: Arc<Mutex<Claim>>,
    cancel: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
) -> Result<Ended, Error> {
    let Some(attempt) = record.attempts.last().cloned() else {
        return Err(Error::Other("a claim without an attempt".into()));
    };
    tracing::info!(node = %settings.node, "workflow starting");
    let job = attempt::job(&record, &attempt);
    let result = shared.runner().run(&job, cancel).await;
    let unstartable = match &result {
        Err(e) if e.never_started() => {
            tracing::error!(error = %e, "the workflow cannot be started; no attempt is used");
            record.attempts.pop();
            record.status = IssueStatus::Queued;
            record.updated_at = SystemTime::now();
            Some(e.to_string())
        }
        _ => {
            attempt::apply_outcome(&mut record, &settings, result, reason.get().copied());
            // An operator's cancel that arrived as the workflow ended on
            // its own still settles the round: it must not run again.
            if reason.get() == Some(&StopReason::Operator) && !record.status.is_settled() {
                attempt::cancel_round(&mut record, StopReason::Operator, SystemTime::now());
            }
            None
        }
    };
    if reason.get() == Some(&StopReason::LeaseLost) {
        return Ok(lost(&shared, &attempt.run_id).await);
    }
    // A stop asked for that this daemon had not seen yet (the workflow
    // ended on its own first) still settles the round as cancelled.
    let now = SystemTime::now();
    let stopped = move |record: &mut IssueRecord, stop: Option<StopRequest>| {
        if let Some(request) = stop
            && !record.status.is_settled()
        {
            attempt::cancel_round(record, request.into(), now);
        }
    };
    // The outcome is written while the claim holds; a store that does not
    // answer is tried again until the lease is over.
    loop {
        let current = claim.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let lease = coordination.lease();
        match tokio::time::timeout(lease / 4, coordination.finish(&current, &record, &stopped))
            .await
        {
            Ok(Ok(())) => {
                return Ok(match unstartable {
                    Some(why) => Ended::Unstartable(why),
                    None => Ended::Written,
                });
            }
            Ok(Err(StoreError::LeaseLost { .. })) => {
                tracing::error!(
                    "the claim ran out before the outcome was written: the attempt counts as interrupted and runs again"
                );
                return Ok(lost(&shared, &attempt.run_id).await);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the attempt's outcome yet"),
            Err(_) => tracing::warn!("cannot write the attempt's outcome yet: no answer"),
        }
        if SystemTime::now() >= current.lease_until {
            tracing::error!(
                "the claim ran out before the outcome could be written: the attempt counts as interrupted and runs again"
            );
            return Ok(lost(&shared, &attempt.run_id).await);
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// The claim is lost: processes that left the workflow's group (setsid,
/// daemons) must not outlive it either, since another daemon may run the
/// issue now.
async fn lost(shared: &Shared, run_id: &str) -> Ended {
    if let Err(e) = shared.runner().abandon(run_id).await {
        tracing::warn!(error = %e, "cannot end what is left of the workflow");
    }
    Ended::Lost
}
