//! The loop: owns every record, makes every decision, awaits nothing but
//! the local state store. Each turn handles one event (a poll's result, an
//! attempt's end, a report that went through, an operator's command, a
//! timer) at a cost that does not grow with the backlog: waiting issues
//! live in a [`Schedule`], and the loop wakes for the earliest deadline
//! only while something could start.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::attempt::{self, StopReason};
use super::pause::{self, human};
use super::poller::{Polled, Poller};
use super::prune::{self, Pruned, Pruner};
use super::reporter::{Delivered, Reporter, Want};
use super::schedule::{Schedule, Wait};
use super::{Command, Mode, PollResult, RunningAttempt, Settings, Shared, Status, Summary};
use crate::error::{Error, StoreError};
use crate::issue::{Issue, IssueKey};
use crate::issue_source::{CancelReport, FailureReport, Report, StartReport, SuccessReport};
use crate::record::{Attempt, AttemptOutcome, IssueRecord, IssueStatus, ServiceState, Shown};
use crate::retention::Retention;
use crate::state::{Coordination, StateStore};

mod follow;

/// The longest the loop sleeps, so that its heartbeat moves (the systemd
/// watchdog's proof of life). One wake a second costs nothing measurable.
const HEARTBEAT: Duration = Duration::from_secs(1);

struct Running {
    cancel: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
    round: u32,
    attempt: u32,
    started_at: SystemTime,
}

impl Running {
    fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.cancel.cancel();
    }
}

type AttemptDone = (IssueKey, Result<attempt::Finished, Error>);

pub(super) struct Engine {
    shared: Arc<Shared>,
    mode: Mode,
    settings: watch::Receiver<Settings>,
    status: watch::Sender<Status>,
    inbox: mpsc::UnboundedReceiver<Command>,
    poll_now: Arc<Notify>,
    hurry: Arc<Notify>,
    records: HashMap<IssueKey, IssueRecord>,
    schedule: Schedule,
    running: HashMap<IssueKey, Running>,
    /// Keys the source said were ready at the last successful poll.
    eligible: HashSet<IssueKey>,
    /// Nothing starts before the first poll has said what is eligible.
    polled: bool,
    /// `run_once`: the issues found at the first poll that are still owed work.
    once_set: Option<HashSet<IssueKey>>,
    attempts: JoinSet<AttemptDone>,
    service: ServiceState,
    /// When the quota pause in force began (not kept across restarts:
    /// nothing that ran before a restart is still running after it).
    pause_began: Option<SystemTime>,
    /// The workflow cannot be started (why), and when to look again.
    workflow_unavailable: Option<(String, SystemTime)>,
    summary: Summary,
    /// The first fatal error; the loop stops as if shut down.
    failure: Option<Error>,
    /// Retention's passes, and the settled issues they hold.
    pruner: Pruner,
    /// With a store several daemons share: this engine runs on the leader,
    /// starts nothing itself (every daemon's worker claims), and follows
    /// what the workers do through the store.
    coordination: Option<Arc<dyn Coordination>>,
    /// Attempts running on any daemon (several daemons), by issue: the run.
    remote: HashMap<IssueKey, String>,
    /// The next look for leases that ran out (several daemons).
    next_expire: Instant,
    /// Changed records could not be read (several daemons): read every
    /// record again.
    reload_owed: bool,
}

impl Engine {
    pub(super) fn new(
        shared: Arc<Shared>,
        mode: Mode,
        settings: watch::Receiver<Settings>,
        status: watch::Sender<Status>,
        inbox: mpsc::UnboundedReceiver<Command>,
        poll_now: Arc<Notify>,
        hurry: Arc<Notify>,
    ) -> Self {
        Self {
            mode,
            settings,
            status,
            inbox,
            poll_now,
            hurry,
            records: HashMap::new(),
            schedule: Schedule::default(),
            running: HashMap::new(),
            eligible: HashSet::new(),
            polled: false,
            once_set: None,
            attempts: JoinSet::new(),
            service: ServiceState::default(),
            pause_began: None,
            workflow_unavailable: None,
            summary: Summary::default(),
            failure: None,
            pruner: Pruner::new(),
            coordination: shared.store.coordination(),
            remote: HashMap::new(),
            next_expire: Instant::now(),
            reload_owed: false,
            shared,
        }
    }

    pub(super) fn into_inbox(self) -> mpsc::UnboundedReceiver<Command> {
        self.inbox
    }

    pub(super) async fn run(&mut self, shutdown: CancellationToken) -> Result<Summary, Error> {
        let (mut reporter, mut delivered) = Reporter::spawn(Arc::clone(&self.shared));
        // With several daemons, listen before reading everything: what
        // changes between the two is heard, not lost.
        let (changes_task, mut changes) = match &self.coordination {
            Some(coordination) => {
                let (task, changes) = follow::spawn_changes(Arc::clone(coordination)).await;
                (Some(task), changes)
            }
            None => (None, tokio::sync::mpsc::channel(1).1),
        };
        if let Err(e) = self.recover(&reporter).await {
            if let Some(task) = changes_task {
                task.abort();
            }
            if let Some(coordination) = &self.coordination {
                coordination.stop_changes().await;
            }
            return Err(e);
        }
        let (poller, mut polls) = Poller::spawn(
            Arc::clone(&self.shared),
            self.settings.clone(),
            Arc::clone(&self.poll_now),
        );
        let mut grace_deadline: Option<Instant> = None;
        loop {
            let settings = self.settings.borrow_and_update().clone();
            let stopping = grace_deadline.is_some();
            if !stopping && self.failure.is_none() {
                self.dispatch(&settings, &reporter).await;
                if self.mode == Mode::Forever
                    && let Some(retention) = &settings.retention
                    && self.pruner.pass_due()
                {
                    self.prune(retention, false, None);
                }
            }
            if self.once_finished(&reporter) {
                break;
            }
            if let Some(deadline) = grace_deadline {
                let now = Instant::now();
                if now >= deadline {
                    for running in self.running.values() {
                        running.stop(StopReason::Shutdown);
                    }
                }
                // Reports still owed may use what is left of the grace;
                // after a restart they are made anyway.
                // A stopped batch ends after the issue it is removing,
                // and its marks are worth waiting for.
                let idle = self.attempts.is_empty() && (!self.pruner.busy() || now >= deadline);
                if idle && (reporter.all_tried() || now >= deadline) {
                    break;
                }
            }
            self.publish(&reporter, |s| s.heartbeat = s.heartbeat.wrapping_add(1));
            let wake = self.next_wake(&settings, grace_deadline);
            let watch_reports = self.mode == Mode::Once || stopping;
            tokio::select! {
                Some(joined) = self.attempts.join_next(), if !self.attempts.is_empty() => {
                    match joined {
                        Ok((key, result)) => self.finished(key, result, &settings, &reporter).await,
                        Err(e) => self.fail(Error::Other(format!("an attempt task panicked: {e}"))),
                    }
                }
                Some(polled) = polls.recv(), if !stopping => self.on_poll(polled, &reporter).await,
                Some(done) = delivered.recv() => self.delivered(done).await,
                Some(changed) = changes.recv() => self.on_changes(changed, &settings, &reporter).await,
                Some(pruned) = self.pruner.next() => self.pruned(pruned).await,
                () = reporter.changed(), if watch_reports => {}
                () = tokio::time::sleep_until(wake) => {}
                () = shutdown.cancelled(), if !stopping => {
                    tracing::info!(running = self.running.len(), grace = %humantime::format_duration(settings.shutdown_grace), "shutting down: no new work; waiting for running workflows");
                    grace_deadline = Some(Instant::now() + settings.shutdown_grace);
                    self.pruner.stop();
                    self.publish(&reporter, |s| s.stopping = true);
                }
                Ok(()) = self.settings.changed() => {}
                Some(command) = self.inbox.recv() => self.command(command, &reporter).await,
                () = self.hurry.notified(), if stopping => grace_deadline = Some(Instant::now()),
            }
            if self.failure.is_some() && grace_deadline.is_none() {
                grace_deadline = Some(Instant::now());
            }
        }
        drop(poller);
        if let Some(task) = changes_task {
            task.abort();
            if let Some(coordination) = &self.coordination {
                coordination.stop_changes().await;
            }
        }
        // Reports that went through just now are remembered, so that a
        // restart does not repeat them.
        while let Ok(done) = delivered.try_recv() {
            self.delivered(done).await;
        }
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(self.summary),
        }
    }

    /// Loads every record and the service state. Attempts that were
    /// running when the previous instance died are interrupted (not
    /// failed) and what is left of them is killed; reports the source
    /// never got are queued again.
    async fn recover(&mut self, reporter: &Reporter) -> Result<(), Error> {
        let settings = self.settings.borrow().clone();
        let now = SystemTime::now();
        self.service = self.shared.store.load_service().await?;
        let skipped = self.service.skipped.clone();
        self.status.send_modify(|s| s.skipped = skipped);
        let paused = self.service.pause_at(now, settings.max_pause);
        if paused != self.service.paused_until {
            // Saved cut, so that restarts cannot push a long pause out
            // again and again from their own start.
            self.service.paused_until = paused;
            if paused.is_none() {
                self.service.pause_reason = None;
            }
            self.shared.store.put_service(&self.service).await?;
        }
        if let Some(until) = paused {
            tracing::warn!(
                until = %humantime::format_rfc3339_seconds(until),
                reason = self.service.pause_reason.as_deref().unwrap_or("unknown"),
                "paused: no workflow starts until then (claude-flow resume ends it)"
            );
        }
        for mut record in self.shared.store.load().await? {
            if record.status == IssueStatus::Running && self.coordination.is_some() {
                // Claimed by a daemon that renews its lease, or expired
                // by this leader once the lease ran out.
                if let Some(attempt) = record.last_attempt() {
                    self.remote
                        .insert(record.key().clone(), attempt.run_id.clone());
                }
            } else if record.status == IssueStatus::Running {
                if let Some(attempt) = record.attempts.last_mut()
                    && attempt.outcome.is_none()
                {
                    if let Err(e) = self.shared.runner().abandon(&attempt.run_id).await {
                        tracing::warn!(issue = %record.issue.key, error = %e, "cannot clean up an interrupted attempt");
                    }
                    attempt.outcome = Some(AttemptOutcome::Interrupted);
                    attempt.finished_at = Some(now);
                }
                let span =
                    tracing::info_span!("issue", issue = %record.key(), round = record.round);
                span.in_scope(|| attempt::interrupted(&mut record, &settings));
                self.shared.store.put(&record).await?;
            }
            let key = record.key().clone();
            self.set_record(record);
            self.want_report(&key, reporter);
        }
        self.publish(reporter, |_| {});
        Ok(())
    }

    /// A poll's result: new issues and rounds are recorded, and issues no
    /// longer eligible are cancelled, running or waiting.
    async fn on_poll(&mut self, polled: Polled, reporter: &Reporter) {
        let ok = polled.result.is_ok();
        metrics::histogram!("claude_flow_poll_duration_seconds")
            .record(polled.duration.as_secs_f64());
        metrics::counter!("claude_flow_polls_total", "result" => if ok { "ok" } else { "error" })
            .increment(1);
        let result = PollResult {
            at: polled.at,
            duration: polled.duration,
            ready: polled.result.as_ref().ok().map(Vec::len),
            error: polled.result.as_ref().err().map(ToString::to_string),
        };
        self.status.send_modify(|s| {
            s.last_poll = Some(result);
            s.consecutive_poll_failures = if ok {
                0
            } else {
                s.consecutive_poll_failures + 1
            };
        });
        let issues = match polled.result {
            Ok(issues) => issues,
            Err(e) if self.mode == Mode::Once && self.once_set.is_none() => {
                self.fail(e.into());
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "poll failed; trying again at the next interval");
                return;
            }
        };
        tracing::debug!(ready = issues.len(), "polled");
        if polled.skipped != self.service.skipped {
            self.status
                .send_modify(|s| s.skipped.clone_from(&polled.skipped));
            self.service.skipped = polled.skipped;
            self.save_service().await;
        }
        self.eligible = issues.iter().map(|i| i.key.clone()).collect();
        // `run_once` works on what its first poll found; later polls only
        // say what stopped being eligible.
        let admit = self.once_set.is_none();
        if let Err(e) = self.apply_poll(issues, admit, reporter).await {
            self.fail(e.into());
            return;
        }
        if self.mode == Mode::Once && self.once_set.is_none() {
            let owed = self
                .eligible
                .iter()
                .filter(|k| self.records.get(*k).is_some_and(|r| !r.status.is_settled()))
                .cloned()
                .collect();
            self.once_set = Some(owed);
        }
        self.polled = true;
        for (key, running) in &self.running {
            if !self.eligible.contains(key) {
                tracing::info!(issue = %key, "no longer eligible: cancelling the running workflow");
                running.stop(StopReason::Unwanted);
            }
        }
        self.stop_remote_unwanted().await;
        let unwanted: Vec<IssueKey> = self
            .schedule
            .keys()
            .filter(|k| !self.eligible.contains(*k))
            .cloned()
            .collect();
        for key in unwanted {
            self.cancel_waiting(&key, attempt::UNWANTED, reporter).await;
        }
        self.publish(reporter, |_| {});
    }

    async fn apply_poll(
        &mut self,
        issues: Vec<Issue>,
        admit: bool,
        reporter: &Reporter,
    ) -> Result<(), StoreError> {
        let mut changed = Vec::new();
        for issue in issues {
            let key = issue.key.clone();
            match self.records.get_mut(&key) {
                None if admit => {
                    tracing::info!(issue = %key, title = %issue.title, "new issue");
                    changed.push(IssueRecord::new(issue));
                }
                None => {}
                Some(record)
                    if record.status.is_settled()
                        && admit
                        && record.issue.trigger != issue.trigger =>
                {
                    // Applying the trigger again approves the current text.
                    tracing::info!(issue = %key, round = record.round + 1, "triggered again: new round");
                    record.issue = issue;
                    record.start_new_round();
                    changed.push(record.clone());
                }
                Some(record) if !record.status.is_settled() => {
                    let was_edited = record.edited_since_approval;
                    if record.refresh(issue) {
                        if record.edited_since_approval && !was_edited {
                            tracing::warn!(issue = %key, "the title or body changed after approval: this round goes on with the approved text (apply the trigger label again to approve the new text)");
                        }
                        changed.push(record.clone());
                    }
                }
                Some(_) => {}
            }
        }
        // A running attempt's record is written by its task; the loop's
        // copy is merged into the outcome when the attempt ends.
        let durable: Vec<IssueRecord> = changed
            .iter()
            .filter(|r| !self.running.contains_key(r.key()))
            .cloned()
            .collect();
        put_all(&self.shared.store, &durable).await?;
        for record in changed {
            let key = record.key().clone();
            self.set_record(record);
            self.want_report(&key, reporter);
        }
        Ok(())
    }

    /// Settles a waiting issue as cancelled and tells the source.
    async fn cancel_waiting(&mut self, key: &IssueKey, reason: &str, reporter: &Reporter) {
        let Some(record) = self.records.get(key) else {
            return;
        };
        let mut record = record.clone();
        tracing::info!(issue = %key, reason, "cancelled while waiting");
        record.status = IssueStatus::Cancelled;
        record.next_retry_at = None;
        record.last_error = Some(reason.to_owned());
        record.updated_at = SystemTime::now();
        if let Err(e) = self.shared.store.put(&record).await {
            self.fail(e.into());
            return;
        }
        self.summary.cancelled += 1;
        if let Some(owed) = &mut self.once_set {
            owed.remove(key);
        }
        self.set_record(record);
        self.want_report(key, reporter);
    }

    /// Starts attempts while slots are free, longest-ready first.
    async fn dispatch(&mut self, settings: &Settings, reporter: &Reporter) {
        if self.coordination.is_some() {
            // Every daemon's worker claims; the leader keeps the pause's
            // bookkeeping and takes back the attempts of lost leases.
            self.paused(settings, reporter).await;
            if Instant::now() >= self.next_expire {
                self.expire(settings, reporter).await;
            }
            if self.reload_owed {
                self.on_changes(crate::state::Changes::reload(), settings, reporter)
                    .await;
            }
            return;
        }
        if !self.polled || self.paused(settings, reporter).await {
            return;
        }
        let now = SystemTime::now();
        self.schedule.promote_due(now);
        if self.running.len() >= settings.max_concurrent as usize || self.schedule.ready_len() == 0
        {
            return;
        }
        if self
            .workflow_unavailable
            .as_ref()
            .is_some_and(|(_, retry_at)| now < *retry_at)
        {
            return;
        }
        // Checked before each batch of starts, so that a missing program
        // costs no attempt and says nothing on the issues.
        match self.shared.runner().preflight().await {
            Ok(()) => {
                if self.workflow_unavailable.take().is_some() {
                    tracing::info!("the workflow can be started again");
                    self.publish(reporter, |_| {});
                }
            }
            Err(e) => {
                self.unavailable(e.to_string(), settings, reporter);
                return;
            }
        }
        while self.running.len() < settings.max_concurrent as usize {
            let Some(key) = self.schedule.pop_ready() else {
                break;
            };
            // An attempt that ended after the last poll said its issue was
            // gone is not started again.
            if !self.eligible.contains(&key) {
                self.cancel_waiting(&key, attempt::UNWANTED, reporter).await;
                continue;
            }
            self.start(key, settings, reporter);
        }
    }

    /// The workflow cannot be started: nothing starts (and no attempt is
    /// used) until it is checked again after `retry_backoff`.
    fn unavailable(&mut self, reason: String, settings: &Settings, reporter: &Reporter) {
        let retry_at = SystemTime::now() + settings.retry_backoff;
        if self.workflow_unavailable.as_ref().map(|(r, _)| r) != Some(&reason) {
            tracing::error!(%reason, retry_in = %human(settings.retry_backoff), "the workflow cannot be started: no workflow starts until it can (no attempt is used)");
        }
        self.workflow_unavailable = Some((reason, retry_at));
        self.publish(reporter, |_| {});
    }

    /// Whether a quota pause holds starts back; ends one that is over, and
    /// cuts one that a lowered `max_pause` makes too long.
    async fn paused(&mut self, settings: &Settings, reporter: &Reporter) -> bool {
        let Some(until) = self.service.paused_until else {
            return false;
        };
        match self.service.pause_at(SystemTime::now(), settings.max_pause) {
            Some(cut) if cut < until => {
                tracing::info!(until = %humantime::format_rfc3339_seconds(cut), "the quota pause is cut to service.max_pause");
                self.service.paused_until = Some(cut);
                self.save_service().await;
                self.publish(reporter, |_| {});
                true
            }
            Some(_) => true,
            None => {
                tracing::info!("the quota pause is over: starting workflows again");
                self.service.paused_until = None;
                self.service.pause_reason = None;
                self.save_service().await;
                self.publish(reporter, |_| {});
                false
            }
        }
    }

    fn start(&mut self, key: IssueKey, settings: &Settings, reporter: &Reporter) {
        let Some(record) = self.records.get_mut(&key) else {
            return;
        };
        let now = SystemTime::now();
        attempt::begin(record, now);
        let number = record.last_attempt().map_or(1, |a| a.number);
        let running = Running {
            cancel: CancellationToken::new(),
            reason: Arc::new(OnceLock::new()),
            round: record.round,
            attempt: number,
            started_at: now,
        };
        let span =
            tracing::info_span!("issue", issue = %key, round = record.round, attempt = number);
        let task = attempt::run(
            Arc::clone(&self.shared),
            settings.clone(),
            record.clone(),
            running.cancel.clone(),
            Arc::clone(&running.reason),
        );
        self.running.insert(key.clone(), running);
        self.schedule.set(&key, None);
        self.want_report(&key, reporter);
        self.publish(reporter, |_| {});
        self.attempts
            .spawn(async move { (key, task.await) }.instrument(span));
    }

    async fn finished(
        &mut self,
        key: IssueKey,
        result: Result<attempt::Finished, Error>,
        settings: &Settings,
        reporter: &Reporter,
    ) {
        let stopped_by = self
            .running
            .remove(&key)
            .and_then(|r| r.reason.get().copied());
        let mut record = match result {
            Ok(finished) => {
                if let Some(reason) = finished.unstartable {
                    self.unavailable(reason, settings, reporter);
                }
                finished.record
            }
            Err(e) => {
                self.fail(e);
                return;
            }
        };
        // Reports that went through and polls that came in while the
        // attempt ran are newer than the attempt's copy.
        if let Some(current) = self.records.get(&key)
            && current.round == record.round
            && (current.reports != record.reports
                || current.issue != record.issue
                || current.edited_since_approval != record.edited_since_approval)
        {
            record.reports = current.reports.clone();
            record.issue = current.issue.clone();
            record.edited_since_approval = current.edited_since_approval;
            if let Err(e) = self.shared.store.put(&record).await {
                self.fail(e.into());
            }
        }
        // An operator's cancel that arrived as the workflow ended on its own
        // still settles the round: it must not run again.
        if stopped_by == Some(StopReason::Operator) && !record.status.is_settled() {
            attempt::cancel_round(&mut record, StopReason::Operator, SystemTime::now());
            if let Err(e) = self.shared.store.put(&record).await {
                self.fail(e.into());
                return;
            }
        }
        if let Some(attempt) = record.last_attempt().cloned() {
            self.attempt_ended(&key, &attempt, settings).await;
        }
        self.count_settled(&key, record.status);
        self.set_record(record);
        self.want_report(&key, reporter);
        self.publish(reporter, |_| {});
    }

    /// Counts an attempt that ended (metrics, the summary) and acts on a
    /// quota exit.
    async fn attempt_ended(&mut self, key: &IssueKey, attempt: &Attempt, settings: &Settings) {
        let label = match &attempt.outcome {
            Some(AttemptOutcome::Succeeded) => "succeeded",
            Some(AttemptOutcome::Failed { .. }) => "failed",
            Some(AttemptOutcome::Cancelled) => "cancelled",
            Some(AttemptOutcome::Interrupted) => "interrupted",
            Some(AttemptOutcome::QuotaExhausted { .. }) => "quota_exhausted",
            None => "unknown",
        };
        metrics::counter!("claude_flow_attempts_total", "outcome" => label).increment(1);
        metrics::histogram!("claude_flow_attempt_duration_seconds")
            .record(attempt.duration().as_secs_f64());
        match attempt.outcome {
            // The summary counts what this daemon's stop interrupted; with
            // several daemons, the leader follows others' attempts too.
            Some(AttemptOutcome::Interrupted) if self.coordination.is_none() => {
                self.summary.interrupted += 1;
            }
            Some(AttemptOutcome::QuotaExhausted { until }) => {
                self.quota_exit(key, until, attempt.started_at, settings)
                    .await;
            }
            Some(AttemptOutcome::Succeeded | AttemptOutcome::Failed { .. })
                if self.service.quota_exits > 0 =>
            {
                self.service.quota_exits = 0;
                self.save_service().await;
            }
            _ => {}
        }
    }

    /// Counts an issue that settled, and takes it off `run_once`'s list.
    fn count_settled(&mut self, key: &IssueKey, status: IssueStatus) {
        match status {
            IssueStatus::Done => self.summary.done += 1,
            IssueStatus::Failed => self.summary.failed += 1,
            IssueStatus::Cancelled => self.summary.cancelled += 1,
            _ => {}
        }
        if status.is_settled()
            && let Some(owed) = &mut self.once_set
        {
            owed.remove(key);
        }
    }

    /// A workflow said its agent's quota is exhausted: nothing starts
    /// until the pause (bounded by the settings) is over.
    /// Workflows that were already running when the pause began ran into
    /// the same exhausted quota: their exits join that pause rather than
    /// count as more exits in a row.
    async fn quota_exit(
        &mut self,
        key: &IssueKey,
        asked: SystemTime,
        started: SystemTime,
        settings: &Settings,
    ) {
        let now = SystemTime::now();
        let same_exhaustion = self.pause_began.is_some_and(|began| started < began);
        if !same_exhaustion || self.service.quota_exits == 0 {
            self.service.quota_exits = self.service.quota_exits.saturating_add(1);
            self.pause_began = Some(now);
        }
        let until = pause::pause_end(settings, self.service.quota_exits, asked, now);
        let until = self.service.paused_until.map_or(until, |t| t.max(until));
        let length = human(until.duration_since(now).unwrap_or_default());
        let reason = format!(
            "the workflow for {key} reported its quota exhausted (claude-flow: retry-after {}); \
             quota exit {} in a row: paused for {length}",
            humantime::format_rfc3339_seconds(asked),
            self.service.quota_exits
        );
        tracing::warn!(until = %humantime::format_rfc3339_seconds(until), %reason, "paused: no workflow starts until then (claude-flow resume ends it)");
        self.service.paused_until = Some(until);
        self.service.pause_reason = Some(reason);
        self.save_service().await;
    }

    async fn save_service(&mut self) {
        if let Err(e) = self.shared.store.put_service(&self.service).await {
            self.fail(e.into());
        }
    }

    /// A report went through: the record remembers it (unless the issue
    /// has moved on to another round meanwhile).
    async fn delivered(&mut self, done: Delivered) {
        let Some(record) = self.records.get_mut(&done.key) else {
            return;
        };
        if record.round != done.round || record.reports == done.reports {
            return;
        }
        record.reports = done.reports;
        if self.running.contains_key(&done.key) {
            // Its task owns the stored record; merged when it ends.
            return;
        }
        let record = record.clone();
        // Losing this note in a crash only repeats an idempotent report.
        if let Err(e) = self.shared.store.put_relaxed(&record).await {
            self.fail(e.into());
        }
    }

    /// Hands the reporter what the issue should show, if the source does
    /// not show it yet.
    fn want_report(&self, key: &IssueKey, reporter: &Reporter) {
        let Some(record) = self.records.get(key) else {
            return;
        };
        if !record.report_owed() {
            return;
        }
        let Some(shown) = record.wanted_shown() else {
            return;
        };
        let settings = self.settings.borrow();
        let round = record.round;
        let report = match shown {
            Shown::Started { attempt } => Report::Started(StartReport {
                round,
                attempt,
                failures: record.failures_this_round(),
                max_attempts: settings.max_attempts,
                edited_since_approval: record.edited_since_approval,
            }),
            Shown::Succeeded => Report::Succeeded(SuccessReport {
                round,
                pr_url: record.pr_url.clone(),
                attempt: record.last_attempt().map_or(0, |a| a.number),
                edited_since_approval: record.edited_since_approval,
            }),
            Shown::Failed => Report::Failed(FailureReport {
                round,
                reason: record.last_error.clone().unwrap_or_default(),
                log_tail: String::new(),
                attempts: record
                    .attempts_this_round()
                    .count()
                    .try_into()
                    .unwrap_or(u32::MAX),
                edited_since_approval: record.edited_since_approval,
            }),
            Shown::Cancelled => Report::Cancelled(CancelReport {
                round,
                reason: record
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "cancelled".into()),
                started: record.attempts_this_round().next().is_some(),
            }),
        };
        reporter.want(Want {
            issue: record.issue.clone(),
            report,
            shown,
            edited: record.edited_since_approval,
            reports: record.reports.clone(),
            log_path: record.last_attempt().and_then(|a| a.log_path.clone()),
        });
    }

    /// Stores a record in memory and keeps the schedule in step with it.
    fn set_record(&mut self, record: IssueRecord) {
        let key = record.key().clone();
        let wait = match record.status {
            IssueStatus::Queued => Some(Wait::Ready(record.updated_at)),
            IssueStatus::Retrying => {
                Some(Wait::Due(record.next_retry_at.unwrap_or(record.updated_at)))
            }
            _ => None,
        };
        if !self.running.contains_key(&key) && !self.pruner.holds(&key) {
            self.schedule.set(&key, wait);
        }
        self.records.insert(key, record);
    }

    /// Publishes the status after a change (and the gauges with it).
    fn publish(&self, reporter: &Reporter, change: impl FnOnce(&mut Status)) {
        let mut running: Vec<RunningAttempt> = self
            .running
            .iter()
            .map(|(key, r)| RunningAttempt {
                issue: key.clone(),
                round: r.round,
                attempt: r.attempt,
                started_at: r.started_at,
            })
            .collect();
        running.sort_by(|a, b| a.issue.cmp(&b.issue));
        // With several daemons, this daemon's worker says what runs here.
        let own = self.coordination.is_none();
        if own {
            metrics::gauge!("claude_flow_workflows_running").set(running.len() as f64);
        }
        let waiting = self.schedule.len();
        let reports_owed = reporter.untried();
        self.status.send_modify(|s| {
            if own {
                s.running = running;
            }
            s.waiting = waiting;
            s.reports_owed = reports_owed;
            s.paused_until = self.service.paused_until;
            s.pause_reason = self.service.pause_reason.clone();
            s.workflow_unavailable = self.workflow_unavailable.as_ref().map(|(r, _)| r.clone());
            change(s);
        });
    }

    /// An operator's retry, cancel or resume, made through the loop so
    /// that it cannot race the loop's own changes.
    async fn command(&mut self, command: Command, reporter: &Reporter) {
        let store = Arc::clone(&self.shared.store);
        match command {
            Command::Retry(key, reply) => {
                // Several daemons: the store says whether it runs (this
                // loop may not have heard of its end yet).
                let result = if self.running.contains_key(&key) {
                    Err(Error::Conflict(format!("{key} is running now")))
                } else if self.records.contains_key(&key) && !self.eligible.contains(&key) {
                    // Queued, it would never start: only issues the source
                    // offers are started.
                    Err(Error::Conflict(format!(
                        "{key} is not ready at its source (on GitHub: apply the trigger label \
                         again, which starts a new round by itself)"
                    )))
                } else {
                    crate::ops::retry(&*store, &key).await
                };
                if let Ok(record) = &result {
                    tracing::info!(issue = %key, round = record.round, "retried by an operator");
                    self.set_record(record.clone());
                }
                let _ = reply.send(result);
            }
            Command::Cancel(key, reply) => {
                let result = match (self.running.get(&key), self.records.get(&key)) {
                    (Some(running), Some(record)) => {
                        tracing::info!(issue = %key, "cancelled by an operator: stopping the running workflow");
                        running.stop(StopReason::Operator);
                        Ok(record.clone())
                    }
                    // Several daemons: the store says whether it runs (and
                    // where), whatever this loop has heard so far.
                    _ if let Some(coordination) = &self.coordination => {
                        crate::ops::cancel_shared(&*store, &**coordination, &key).await
                    }
                    _ => crate::ops::cancel(&*store, &key).await,
                };
                if let Ok(record) = &result
                    && !self.running.contains_key(&key)
                    && record.status != IssueStatus::Running
                {
                    self.summary.cancelled += 1;
                    if let Some(owed) = &mut self.once_set {
                        owed.remove(&key);
                    }
                    self.set_record(record.clone());
                    self.want_report(&key, reporter);
                }
                let _ = reply.send(result);
            }
            Command::Prune(dry_run, reply) => {
                let retention = self.settings.borrow().retention.clone();
                match retention {
                    Some(retention) => self.prune(&retention, dry_run, Some(reply)),
                    None => {
                        let _ = reply.send(Err(Error::Conflict(crate::retention::KEEP_ALL.into())));
                    }
                }
            }
            Command::Resume(reply) => {
                let mut next = self.service.clone();
                let lifted = crate::api::Resumed {
                    lifted_until: next.paused_until.take(),
                    pause_reason: next.pause_reason.take(),
                };
                next.quota_exits = 0;
                // Taken into memory only once durable: a pause that comes
                // back after a restart must not differ from what runs now.
                let result = match store.put_service(&next).await {
                    Ok(()) => {
                        self.service = next;
                        Ok(lifted)
                    }
                    Err(e) => {
                        self.fail(Error::from(StoreError::Failed(e.to_string())));
                        Err(Error::from(e))
                    }
                };
                if let Ok(crate::api::Resumed {
                    lifted_until: Some(until),
                    ..
                }) = &result
                {
                    tracing::info!(until = %humantime::format_rfc3339_seconds(*until), "the quota pause was ended by an operator");
                }
                let _ = reply.send(result);
            }
        }
        self.publish(reporter, |_| {});
    }

    /// Hands the settled issues whose files are due to a prune batch.
    fn prune(&mut self, retention: &Retention, dry_run: bool, reply: Option<prune::Reply>) {
        let now = SystemTime::now();
        let mut due: Vec<(IssueKey, u32)> = self
            .records
            .values()
            .filter(|r| {
                !self.running.contains_key(r.key())
                    && !self.remote.contains_key(r.key())
                    && retention.is_due(r, now)
            })
            .map(|r| (r.key().clone(), r.round))
            .collect();
        due.sort();
        self.pruner.start(retention, due, dry_run, reply);
    }

    /// A prune batch is done with one issue: the record is marked (while
    /// it is still the settled round whose files went), and an issue that
    /// was triggered again meanwhile goes back to the schedule.
    async fn pruned(&mut self, pruned: Pruned) {
        let mark = self.pruner.settle(&pruned);
        if let Some(freed) = pruned.freed.as_ref().filter(|f| f.found && !pruned.dry_run) {
            let bytes = crate::retention::human_bytes(freed.bytes);
            match &freed.error {
                None => {
                    tracing::info!(issue = %pruned.key, round = pruned.round, freed = %bytes, "retention: removed the workspace and logs")
                }
                Some(e) => {
                    tracing::warn!(issue = %pruned.key, freed = %bytes, error = %e, "retention: could not remove everything; trying again at the next pass")
                }
            }
        }
        let Some(record) = self.records.get(&pruned.key) else {
            return;
        };
        let mut record = record.clone();
        if mark
            && record.status.is_settled()
            && record.round == pruned.round
            && !self.running.contains_key(&pruned.key)
            && !self.remote.contains_key(&pruned.key)
        {
            record.pruned_at = Some(SystemTime::now());
            if let Err(e) = self.shared.store.put(&record).await {
                self.fail(e.into());
                return;
            }
        }
        self.set_record(record);
    }

    fn fail(&mut self, e: Error) {
        tracing::error!(error = %e, "stopping: cannot go on safely");
        if self.failure.is_none() {
            self.failure = Some(e);
        }
    }

    fn once_finished(&self, reporter: &Reporter) -> bool {
        self.once_set
            .as_ref()
            .is_some_and(|owed| owed.is_empty() && self.attempts.is_empty() && reporter.all_tried())
    }

    /// The next time the loop must look without an event: a retry falling
    /// due while a slot is free, the end of a pause, the grace deadline;
    /// at the latest the next heartbeat.
    fn next_wake(&self, settings: &Settings, grace_deadline: Option<Instant>) -> Instant {
        let now = Instant::now();
        let now_sys = SystemTime::now();
        let until = |t: SystemTime| now + t.duration_since(now_sys).unwrap_or_default();
        let mut wake = now + HEARTBEAT;
        if self.coordination.is_some() {
            wake = wake.min(self.next_expire.max(now));
        }
        if let Some(deadline) = grace_deadline {
            if deadline > now {
                wake = wake.min(deadline);
            }
        } else if let Some(paused) = self.service.paused_until {
            wake = wake.min(until(paused));
        } else if self.coordination.is_none()
            && self.polled
            && self.running.len() < settings.max_concurrent as usize
        {
            // (With several daemons the workers claim: the schedule here
            // only counts what waits, and wakes nothing.)
            // Something could start: a retry falling due, or ready issues
            // held back by a workflow that cannot be started.
            let next = if self.schedule.ready_len() > 0 {
                Some(now_sys)
            } else {
                self.schedule.next_due()
            };
            if let Some(mut at) = next {
                if let Some((_, retry_at)) = &self.workflow_unavailable {
                    at = at.max(*retry_at);
                }
                wake = wake.min(until(at));
            }
        }
        wake
    }
}

/// Writes in flight at once from one poll: enough for the file store's
/// group commit to share its syncs, few enough that a poll of thousands
/// does not hold thousands of boxed writes (and their memory) at once.
const PUTS_IN_FLIGHT: usize = 16;

async fn put_all(store: &Arc<dyn StateStore>, records: &[IssueRecord]) -> Result<(), StoreError> {
    let mut puts = JoinSet::new();
    for record in records {
        if puts.len() >= PUTS_IN_FLIGHT
            && let Some(done) = puts.join_next().await
        {
            done.map_err(|e| StoreError::Failed(format!("a state write panicked: {e}")))??;
        }
        let store = Arc::clone(store);
        let record = record.clone();
        puts.spawn(async move { store.put(&record).await });
    }
    while let Some(done) = puts.join_next().await {
        done.map_err(|e| StoreError::Failed(format!("a state write panicked: {e}")))??;
    }
    Ok(())
}
