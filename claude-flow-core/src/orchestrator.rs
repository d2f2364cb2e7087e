//! The orchestrator: polls a source, runs workflow attempts with bounded
//! concurrency, retries with backoff, and keeps every transition in the
//! state store before acting on it.
//!
//! One scheduler loop owns the records and makes every decision (what to
//! start, when to poll, when to stop); each running attempt is a task that
//! writes its own transitions, so that concurrent attempts' writes reach
//! the store together and share its syncs.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ServiceConfig;
use crate::error::{Error, StoreError};
use crate::issue::{Issue, IssueKey};
use crate::issue_source::{FailureReport, IssueSource, StartReport, SuccessReport};
use crate::record::{Attempt, AttemptOutcome, IssueRecord, IssueStatus, Reports};
use crate::runner::{ExitKind, RunOutcome, WorkflowJob, WorkflowRunner};
use crate::state::StateStore;

/// The orchestrator's tunables; they can change while it runs
/// ([`Orchestrator::update_settings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Between polls of the source.
    pub poll_interval: Duration,
    /// Attempts running at once.
    pub max_concurrent: u32,
    /// Failed attempts per round before the issue is marked failed.
    pub max_attempts: u32,
    /// Before retry k: `retry_backoff × 2^(k−1)`, capped at `retry_backoff_max`.
    pub retry_backoff: Duration,
    /// The backoff's cap.
    pub retry_backoff_max: Duration,
    /// How long a graceful stop waits for running attempts.
    pub shutdown_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self::from_config(&ServiceConfig::default())
    }
}

impl Settings {
    /// The settings of a `service` configuration section.
    pub fn from_config(service: &ServiceConfig) -> Self {
        Self {
            poll_interval: service.poll_interval,
            max_concurrent: service.max_concurrent,
            max_attempts: service.max_attempts,
            retry_backoff: service.retry_backoff,
            retry_backoff_max: service.retry_backoff_max,
            shutdown_grace: service.shutdown_grace,
        }
    }

    /// The wait before retry `k` (k = failed attempts so far, from 1): the
    /// capped exponential delay, of which at least half is always waited
    /// and the rest is random jitter, so that retries of many issues that
    /// failed together spread out.
    pub fn backoff(&self, k: u32) -> Duration {
        let factor = 2u32.saturating_pow(k.saturating_sub(1));
        let full = self
            .retry_backoff
            .saturating_mul(factor)
            .min(self.retry_backoff_max);
        let half = full / 2;
        let jitter = full - half;
        half + jitter.mul_f64(rand::rng().random_range(0.0..=1.0))
    }
}

/// How an orchestrator run ended, counting the issues it settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Issues whose workflow succeeded.
    pub done: usize,
    /// Issues that failed after their last attempt.
    pub failed: usize,
    /// Issues cancelled because the source stopped wanting them.
    pub cancelled: usize,
    /// Attempts interrupted by the shutdown (they run again after a restart).
    pub interrupted: usize,
}

/// Builds an [`Orchestrator`].
#[derive(Default)]
pub struct OrchestratorBuilder {
    source: Option<Arc<dyn IssueSource>>,
    runner: Option<Arc<dyn WorkflowRunner>>,
    store: Option<Arc<dyn StateStore>>,
    settings: Settings,
}

impl std::fmt::Debug for OrchestratorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrchestratorBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl OrchestratorBuilder {
    /// Where issues come from (required).
    pub fn source(mut self, source: Arc<dyn IssueSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// What runs the workflow (required).
    pub fn runner(mut self, runner: Arc<dyn WorkflowRunner>) -> Self {
        self.runner = Some(runner);
        self
    }

    /// Where records are kept (required).
    pub fn store(mut self, store: Arc<dyn StateStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Tunables; defaults to CONTRACT section 3's defaults.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// The orchestrator, or an error naming the missing part.
    pub fn build(self) -> Result<Orchestrator, Error> {
        let missing = |what: &str| Error::Other(format!("OrchestratorBuilder: no {what} given"));
        let (settings, _) = watch::channel(self.settings);
        let (status, _) = watch::channel(Status::default());
        let (commands, inbox) = mpsc::unbounded_channel();
        Ok(Orchestrator {
            shared: Arc::new(Shared {
                source: RwLock::new(self.source.ok_or_else(|| missing("source"))?),
                runner: RwLock::new(self.runner.ok_or_else(|| missing("runner"))?),
                store: self.store.ok_or_else(|| missing("store"))?,
            }),
            settings,
            status,
            commands,
            inbox: Mutex::new(Some(inbox)),
            engine_running: AtomicBool::new(false),
            poll_now: Arc::new(Notify::new()),
            hurry: Arc::new(Notify::new()),
        })
    }
}

struct Shared {
    /// Swappable so that a configuration reload (new labels, say) takes
    /// effect for new work while running attempts keep the one they had.
    source: RwLock<Arc<dyn IssueSource>>,
    runner: RwLock<Arc<dyn WorkflowRunner>>,
    store: Arc<dyn StateStore>,
}

impl Shared {
    fn source(&self) -> Arc<dyn IssueSource> {
        Arc::clone(&self.source.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn runner(&self) -> Arc<dyn WorkflowRunner> {
        Arc::clone(&self.runner.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Turns ready issues into workflow attempts. Build it with
/// [`Orchestrator::builder`], then call [`run`](Orchestrator::run) (until
/// shutdown) or [`run_once`](Orchestrator::run_once).
pub struct Orchestrator {
    shared: Arc<Shared>,
    settings: watch::Sender<Settings>,
    status: watch::Sender<Status>,
    commands: mpsc::UnboundedSender<Command>,
    /// Taken by the running loop and put back when it ends.
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    engine_running: AtomicBool,
    poll_now: Arc<Notify>,
    hurry: Arc<Notify>,
}

/// What the orchestrator is doing: for health checks and status pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The last poll, once there was one.
    pub last_poll: Option<PollResult>,
    /// Polls that failed in a row (0 after a success).
    pub consecutive_poll_failures: u32,
    /// Issues with a running attempt.
    pub running: Vec<IssueKey>,
    /// No workflow starts before this (a quota pause).
    #[serde(with = "humantime_serde")]
    pub paused_until: Option<SystemTime>,
    /// A graceful stop is under way.
    pub stopping: bool,
    /// Counts the scheduler loop's turns; the loop turns at least once a
    /// second, so a counter that stops moving means a hung loop (what a
    /// watchdog should catch).
    pub heartbeat: u64,
}

/// How a poll went (also as `/healthz` reports it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollResult {
    /// When it ended.
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    /// How long it took.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Issues found ready, when it succeeded.
    pub ready: Option<usize>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

enum Command {
    Retry(IssueKey, oneshot::Sender<Result<IssueRecord, Error>>),
    Cancel(IssueKey, oneshot::Sender<Result<IssueRecord, Error>>),
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("settings", &*self.settings.borrow())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forever,
    Once,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Unwanted,
    Shutdown,
}

struct Running {
    cancel: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
}

impl Running {
    fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.cancel.cancel();
    }
}

/// What a finished task hands back to the loop.
enum TaskDone {
    /// An attempt, with the record as it left it.
    Attempt(Box<Result<IssueRecord, Error>>),
    /// A repeated outcome report for `round`: the updated reports when it
    /// went through. Only these are merged, so a report cannot overwrite
    /// a newer round that started meanwhile.
    Report {
        round: u32,
        reports: Option<Reports>,
    },
}

type TaskResult = (IssueKey, TaskDone);

impl Orchestrator {
    /// A builder.
    pub fn builder() -> OrchestratorBuilder {
        OrchestratorBuilder::default()
    }

    /// Replaces the settings; a running loop picks them up at once. Running
    /// attempts are not affected.
    pub fn update_settings(&self, settings: Settings) {
        self.settings.send_replace(settings);
    }

    /// The current settings.
    pub fn settings(&self) -> Settings {
        self.settings.borrow().clone()
    }

    /// Asks a running loop to poll now instead of at the next interval.
    pub fn poll_now(&self) {
        self.poll_now.notify_one();
    }

    /// Replaces the source for new work (a configuration reload); running
    /// attempts report to the source they started with.
    pub fn set_source(&self, source: Arc<dyn IssueSource>) {
        *self
            .shared
            .source
            .write()
            .unwrap_or_else(|e| e.into_inner()) = source;
    }

    /// Replaces the runner for new attempts (a configuration reload);
    /// running attempts finish with the runner they started with.
    pub fn set_runner(&self, runner: Arc<dyn WorkflowRunner>) {
        *self
            .shared
            .runner
            .write()
            .unwrap_or_else(|e| e.into_inner()) = runner;
    }

    /// Ends a graceful stop's wait at once: running attempts are cancelled
    /// now (SIGTERM, then SIGKILL after the runner's grace) and recorded as
    /// interrupted. Called before a stop, it makes the next stop skip its
    /// wait.
    pub fn hurry(&self) {
        self.hurry.notify_one();
    }

    /// What the orchestrator is doing now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Follows the status as it changes.
    pub fn subscribe_status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Queues an issue again, through the running loop: a new round for a
    /// settled issue, an attempt as soon as possible for a waiting one.
    pub async fn retry(&self, key: &IssueKey) -> Result<IssueRecord, Error> {
        self.command(|reply| Command::Retry(key.clone(), reply))
            .await
    }

    /// Cancels an issue through the running loop: a running attempt is
    /// stopped (SIGTERM, then SIGKILL) and the issue settles as cancelled.
    pub async fn cancel(&self, key: &IssueKey) -> Result<IssueRecord, Error> {
        self.command(|reply| Command::Cancel(key.clone(), reply))
            .await
    }

    async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<IssueRecord, Error>>) -> Command,
    ) -> Result<IssueRecord, Error> {
        let not_running = || Error::NotRunning("the orchestrator is not running".into());
        if !self.engine_running.load(Ordering::SeqCst) {
            return Err(not_running());
        }
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).map_err(|_| not_running())?;
        answer.await.map_err(|_| not_running())?
    }

    /// Polls every `poll_interval` and runs what is ready until `shutdown`
    /// fires; then stops gracefully (see [`Settings::shutdown_grace`]).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<Summary, Error> {
        self.run_engine(Mode::Forever, shutdown).await
    }

    /// Polls once, then works until every issue found eligible is settled
    /// (done, failed after its last attempt, or cancelled), waiting out
    /// retry backoff. Stops early, gracefully, if `shutdown` fires.
    pub async fn run_once(&self, shutdown: CancellationToken) -> Result<Summary, Error> {
        self.run_engine(Mode::Once, shutdown).await
    }

    async fn run_engine(&self, mode: Mode, shutdown: CancellationToken) -> Result<Summary, Error> {
        let inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::Other("the orchestrator is already running".into()))?;
        self.engine_running.store(true, Ordering::SeqCst);
        self.status.send_replace(Status::default());
        let mut engine = self.engine(mode, inbox);
        let result = engine.run(shutdown).await;
        self.engine_running.store(false, Ordering::SeqCst);
        // Commands sent while the loop ended get their error, not a hang.
        let mut inbox = engine.inbox;
        inbox.close();
        while let Ok(command) = inbox.try_recv() {
            let (Command::Retry(_, reply) | Command::Cancel(_, reply)) = command;
            let _ = reply.send(Err(Error::NotRunning(
                "the orchestrator is stopping".into(),
            )));
        }
        *self.inbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(inbox);
        result
    }

    fn engine(&self, mode: Mode, inbox: mpsc::UnboundedReceiver<Command>) -> Engine {
        Engine {
            status: self.status.clone(),
            inbox,
            shared: Arc::clone(&self.shared),
            settings: self.settings.subscribe(),
            poll_now: Arc::clone(&self.poll_now),
            hurry: Arc::clone(&self.hurry),
            mode,
            records: HashMap::new(),
            waiting: HashSet::new(),
            reporting: HashSet::new(),
            running: HashMap::new(),
            eligible: HashSet::new(),
            once_set: None,
            tasks: JoinSet::new(),
            paused_until: None,
            summary: Summary::default(),
            failure: None,
        }
    }
}

/// The longest the scheduler loop sleeps, so that its heartbeat moves.
const HEARTBEAT: Duration = Duration::from_secs(1);

struct Engine {
    status: watch::Sender<Status>,
    inbox: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
    settings: watch::Receiver<Settings>,
    poll_now: Arc<Notify>,
    hurry: Arc<Notify>,
    mode: Mode,
    records: HashMap<IssueKey, IssueRecord>,
    /// Keys of records that are queued or retrying: the only ones dispatch
    /// and the wake-up timer look at, so that a loop turn does not cost a
    /// scan of every settled issue ever seen.
    waiting: HashSet<IssueKey>,
    /// Settled issues whose outcome report is being repeated.
    reporting: HashSet<IssueKey>,
    running: HashMap<IssueKey, Running>,
    /// Keys the source said were ready at the last poll.
    eligible: HashSet<IssueKey>,
    /// `run_once`: the issues found at the one poll that are still owed work.
    once_set: Option<HashSet<IssueKey>>,
    tasks: JoinSet<TaskResult>,
    paused_until: Option<SystemTime>,
    summary: Summary,
    /// The first fatal error; the loop stops as if shut down.
    failure: Option<Error>,
}

impl Engine {
    async fn run(&mut self, shutdown: CancellationToken) -> Result<Summary, Error> {
        self.recover().await?;
        let mut next_poll = Instant::now();
        let mut grace_deadline: Option<Instant> = None;
        loop {
            let stopping = grace_deadline.is_some();
            let settings = self.settings.borrow_and_update().clone();
            if !stopping && Instant::now() >= next_poll {
                self.tick().await?;
                next_poll = Instant::now() + settings.poll_interval;
            }
            if !stopping {
                self.dispatch(&settings);
            }
            if self.once_finished() || (stopping && self.tasks.is_empty()) {
                break;
            }
            if let Some(deadline) = grace_deadline
                && Instant::now() >= deadline
            {
                for running in self.running.values() {
                    running.stop(StopReason::Shutdown);
                }
            }
            self.status
                .send_modify(|s| s.heartbeat = s.heartbeat.wrapping_add(1));
            let wake = self
                .next_wake(next_poll, grace_deadline)
                .min(Instant::now() + HEARTBEAT);
            tokio::select! {
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.finished(joined).await;
                }
                () = tokio::time::sleep_until(wake) => {}
                () = shutdown.cancelled(), if !stopping => {
                    tracing::info!(running = self.running.len(), grace = %humantime::format_duration(settings.shutdown_grace), "shutting down: no new work; waiting for running workflows");
                    grace_deadline = Some(Instant::now() + settings.shutdown_grace);
                    self.status.send_modify(|s| s.stopping = true);
                }
                Ok(()) = self.settings.changed() => {}
                () = self.poll_now.notified(), if !stopping => next_poll = Instant::now(),
                Some(command) = self.inbox.recv() => self.command(command).await,
                () = self.hurry.notified(), if stopping => grace_deadline = Some(Instant::now()),
            }
            if self.failure.is_some() && grace_deadline.is_none() {
                grace_deadline = Some(Instant::now());
            }
        }
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(self.summary),
        }
    }

    /// Loads every record; attempts that were running when the previous
    /// instance died are interrupted (not failed) and what is left of them
    /// is killed; outcomes that were never reported are reported now.
    async fn recover(&mut self) -> Result<(), Error> {
        let now = SystemTime::now();
        for mut record in self.shared.store.load().await? {
            if record.status == IssueStatus::Running {
                if let Some(attempt) = record.attempts.last_mut()
                    && attempt.outcome.is_none()
                {
                    if let Err(e) = self.shared.runner().abandon(&attempt.run_id).await {
                        tracing::warn!(issue = %record.issue.key, error = %e, "cannot clean up an interrupted attempt");
                    }
                    attempt.outcome = Some(AttemptOutcome::Interrupted);
                    attempt.finished_at = Some(now);
                }
                tracing::info!(issue = %record.issue.key, "resuming an attempt interrupted by a restart");
                record.status = IssueStatus::Queued;
                record.updated_at = now;
                self.shared.store.put(&record).await?;
            }
            if let Some(Attempt {
                outcome: Some(AttemptOutcome::QuotaExhausted { until }),
                ..
            }) = record.last_attempt()
                && *until > now
            {
                self.paused_until = self.paused_until.max(Some(*until));
            }
            self.set_record(record);
        }
        self.retry_reports();
        Ok(())
    }

    /// A poll (forever), or a check of the issues still owed work (once).
    async fn tick(&mut self) -> Result<(), Error> {
        if self.mode == Mode::Once && self.once_set.is_some() {
            return self.check_wanted().await;
        }
        let started = Instant::now();
        let polled = self.shared.source().poll().await;
        let duration = started.elapsed();
        metrics::histogram!("claude_flow_poll_duration_seconds").record(duration.as_secs_f64());
        let result = PollResult {
            at: SystemTime::now(),
            duration,
            ready: polled.as_ref().ok().map(Vec::len),
            error: polled.as_ref().err().map(ToString::to_string),
        };
        let ok = polled.is_ok();
        metrics::counter!("claude_flow_polls_total", "result" => if ok { "ok" } else { "error" })
            .increment(1);
        self.status.send_modify(|s| {
            s.last_poll = Some(result);
            s.consecutive_poll_failures = if ok {
                0
            } else {
                s.consecutive_poll_failures + 1
            };
        });
        let issues = match polled {
            Ok(issues) => issues,
            Err(e) if self.mode == Mode::Once => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "poll failed; trying again at the next interval");
                return Ok(());
            }
        };
        tracing::debug!(ready = issues.len(), "polled");
        self.apply_poll(issues).await?;
        if self.mode == Mode::Forever {
            self.retry_reports();
        }
        if self.mode == Mode::Once {
            let owed = self
                .eligible
                .iter()
                .filter(|k| self.records.get(*k).is_some_and(|r| !r.status.is_settled()))
                .cloned()
                .collect();
            // Every owed issue was just found ready: nothing to re-check.
            self.once_set = Some(owed);
            return Ok(());
        }
        self.check_wanted().await
    }

    async fn apply_poll(&mut self, issues: Vec<Issue>) -> Result<(), Error> {
        self.eligible = issues.iter().map(|i| i.key.clone()).collect();
        let mut changed = Vec::new();
        for issue in issues {
            let key = issue.key.clone();
            if self.running.contains_key(&key) {
                continue;
            }
            match self.records.get_mut(&key) {
                None => {
                    tracing::info!(issue = %key, title = %issue.title, "new issue");
                    let record = IssueRecord::new(issue);
                    changed.push(record.clone());
                    self.set_record(record);
                }
                Some(record) if record.status.is_settled() => {
                    if record.issue.trigger != issue.trigger {
                        tracing::info!(issue = %key, round = record.round + 1, "triggered again: new round");
                        record.issue = issue;
                        record.start_new_round();
                        changed.push(record.clone());
                    }
                }
                Some(record) => {
                    if record.issue != issue {
                        record.issue = issue;
                        record.updated_at = SystemTime::now();
                        changed.push(record.clone());
                    }
                }
            }
        }
        for record in &changed {
            self.note(record.key());
        }
        put_all(&self.shared.store, changed).await?;
        Ok(())
    }

    /// Cancels running attempts whose issue is no longer wanted; under
    /// `run_once`, also drops waiting issues that are no longer wanted.
    async fn check_wanted(&mut self) -> Result<(), Error> {
        let mut keys: Vec<IssueKey> = self.running.keys().cloned().collect();
        if let Some(owed) = &self.once_set {
            keys.extend(
                owed.iter()
                    .filter(|k| !self.running.contains_key(*k))
                    .cloned(),
            );
        }
        for key in keys {
            let Some(record) = self.records.get(&key) else {
                continue;
            };
            match self.shared.source().is_wanted(&record.issue).await {
                Ok(true) => {}
                Ok(false) => {
                    if let Some(running) = self.running.get(&key) {
                        tracing::info!(issue = %key, "no longer wanted: cancelling the running workflow");
                        running.stop(StopReason::Unwanted);
                    } else if let Some(owed) = &mut self.once_set {
                        tracing::info!(issue = %key, "no longer wanted: not retrying");
                        owed.remove(&key);
                    }
                }
                Err(e) => {
                    tracing::warn!(issue = %key, error = %e, "cannot check whether the issue is still wanted")
                }
            }
        }
        Ok(())
    }

    /// Starts attempts while slots are free, oldest-due first.
    fn dispatch(&mut self, settings: &Settings) {
        let now = SystemTime::now();
        if self.paused_until.is_some_and(|t| t > now) {
            return;
        }
        self.paused_until = None;
        let free = (settings.max_concurrent as usize).saturating_sub(self.running.len());
        if free == 0 {
            return;
        }
        let mut due: Vec<(SystemTime, IssueKey)> = self
            .waiting
            .iter()
            .filter_map(|k| self.records.get(k))
            .filter(|r| self.eligible.contains(r.key()) && !self.running.contains_key(r.key()))
            .filter(|r| self.once_set.as_ref().is_none_or(|s| s.contains(r.key())))
            .filter_map(|r| match r.status {
                IssueStatus::Queued => Some((r.updated_at, r.key().clone())),
                IssueStatus::Retrying => r
                    .next_retry_at
                    .filter(|t| *t <= now)
                    .map(|t| (t, r.key().clone())),
                _ => None,
            })
            .collect();
        due.sort();
        for (_, key) in due.into_iter().take(free) {
            self.start(key, settings);
        }
    }

    fn start(&mut self, key: IssueKey, settings: &Settings) {
        let Some(record) = self.records.get_mut(&key) else {
            return;
        };
        let now = SystemTime::now();
        let number = record.next_attempt_number();
        record.attempts.push(Attempt {
            number,
            round: record.round,
            run_id: new_run_id(),
            started_at: now,
            finished_at: None,
            outcome: None,
            exit_code: None,
            signal: None,
            log_path: None,
            pr_url: None,
        });
        record.status = IssueStatus::Running;
        record.next_retry_at = None;
        record.updated_at = now;
        let running = Running {
            cancel: CancellationToken::new(),
            reason: Arc::new(OnceLock::new()),
        };
        let span = tracing::info_span!("issue", issue = %key, attempt = number);
        let task = attempt_task(
            Arc::clone(&self.shared),
            settings.clone(),
            record.clone(),
            running.cancel.clone(),
            Arc::clone(&running.reason),
        );
        self.running.insert(key.clone(), running);
        self.waiting.remove(&key);
        self.publish_running();
        self.tasks
            .spawn(async move { (key, TaskDone::Attempt(Box::new(task.await))) }.instrument(span));
    }

    async fn finished(&mut self, joined: Result<TaskResult, tokio::task::JoinError>) {
        let (key, done) = match joined {
            Ok(done) => done,
            Err(e) => {
                self.fail(Error::Other(format!("an attempt task panicked: {e}")));
                return;
            }
        };
        let result = match done {
            TaskDone::Report { round, reports } => {
                self.reporting.remove(&key);
                self.merge_reports(&key, round, reports).await;
                return;
            }
            TaskDone::Attempt(result) => *result,
        };
        self.running.remove(&key);
        self.publish_running();
        let record = match result {
            Ok(record) => record,
            Err(e) => {
                self.fail(e);
                return;
            }
        };
        if let Some(attempt) = record.last_attempt() {
            let outcome = match &attempt.outcome {
                Some(AttemptOutcome::Succeeded) => "succeeded",
                Some(AttemptOutcome::Failed { .. }) => "failed",
                Some(AttemptOutcome::Cancelled) => "cancelled",
                Some(AttemptOutcome::Interrupted) => "interrupted",
                Some(AttemptOutcome::QuotaExhausted { .. }) => "quota_exhausted",
                None => "unknown",
            };
            metrics::counter!("claude_flow_attempts_total", "outcome" => outcome).increment(1);
            metrics::histogram!("claude_flow_attempt_duration_seconds")
                .record(attempt.duration().as_secs_f64());
        }
        match record.status {
            IssueStatus::Done => self.summary.done += 1,
            IssueStatus::Failed => self.summary.failed += 1,
            IssueStatus::Cancelled => self.summary.cancelled += 1,
            _ => {}
        }
        match record.last_attempt().and_then(|a| a.outcome.as_ref()) {
            Some(AttemptOutcome::Interrupted) => self.summary.interrupted += 1,
            Some(AttemptOutcome::QuotaExhausted { until }) => {
                tracing::warn!(until = %humantime::format_rfc3339_seconds(*until), "the workflow's quota is exhausted: no workflow starts until then");
                self.paused_until = self.paused_until.max(Some(*until));
                self.publish_running();
            }
            _ => {}
        }
        if record.status.is_settled()
            && let Some(owed) = &mut self.once_set
        {
            owed.remove(&key);
        }
        self.set_record(record);
    }

    /// Takes a repeated report's result into the record, unless the issue
    /// has moved on to another round meanwhile.
    async fn merge_reports(&mut self, key: &IssueKey, round: u32, reports: Option<Reports>) {
        let Some(reports) = reports else { return };
        let Some(record) = self.records.get_mut(key) else {
            return;
        };
        if record.round != round
            || !matches!(record.status, IssueStatus::Done | IssueStatus::Failed)
        {
            return;
        }
        record.reports = reports;
        let record = record.clone();
        // Losing this note in a crash only repeats the report.
        if let Err(e) = self.shared.store.put_relaxed(&record).await {
            self.fail(e.into());
        }
    }

    /// Stores a record in memory and keeps `waiting` in step with it.
    fn set_record(&mut self, record: IssueRecord) {
        let key = record.key().clone();
        self.records.insert(key.clone(), record);
        self.note(&key);
    }

    /// Brings `waiting` in step with the record of `key` after a change.
    fn note(&mut self, key: &IssueKey) {
        let waits = self
            .records
            .get(key)
            .is_some_and(|r| matches!(r.status, IssueStatus::Queued | IssueStatus::Retrying));
        if waits {
            self.waiting.insert(key.clone());
        } else {
            self.waiting.remove(key);
        }
    }

    /// Publishes who is running (status and gauge) after a change.
    fn publish_running(&self) {
        let mut running: Vec<IssueKey> = self.running.keys().cloned().collect();
        running.sort();
        metrics::gauge!("claude_flow_workflows_running").set(running.len() as f64);
        let paused_until = self.paused_until;
        self.status.send_modify(|s| {
            s.running = running;
            s.paused_until = paused_until;
        });
    }

    /// An operator's retry or cancel, made through the loop so that it
    /// cannot race the loop's own changes to the record.
    async fn command(&mut self, command: Command) {
        let store = Arc::clone(&self.shared.store);
        let (key, reply, result) = match command {
            Command::Retry(key, reply) => {
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
                (key, reply, result)
            }
            Command::Cancel(key, reply) => {
                let result = match (self.running.get(&key), self.records.get(&key)) {
                    (Some(running), Some(record)) => {
                        tracing::info!(issue = %key, "cancelled by an operator: stopping the running workflow");
                        running.stop(StopReason::Unwanted);
                        Ok(record.clone())
                    }
                    _ => crate::ops::cancel(&*store, &key).await,
                };
                (key, reply, result)
            }
        };
        if let Ok(record) = &result
            && !self.running.contains_key(&key)
        {
            self.set_record(record.clone());
        }
        let _ = reply.send(result);
    }

    /// Repeats the outcome report of every settled round whose report did
    /// not go through (the source was down, or the service died first).
    fn retry_reports(&mut self) {
        let owed: Vec<IssueRecord> = self
            .records
            .values()
            .filter(|r| matches!(r.status, IssueStatus::Done | IssueStatus::Failed))
            .filter(|r| !r.reports.outcome_reported && !self.reporting.contains(r.key()))
            .cloned()
            .collect();
        for mut record in owed {
            let key = record.key().clone();
            self.reporting.insert(key.clone());
            let shared = Arc::clone(&self.shared);
            let settings = self.settings.borrow().clone();
            let span = tracing::info_span!("issue", issue = %key);
            self.tasks.spawn(
                async move {
                    let round = record.round;
                    let reports = report_outcome(&shared, &settings, &mut record)
                        .await
                        .then_some(record.reports);
                    (key, TaskDone::Report { round, reports })
                }
                .instrument(span),
            );
        }
    }

    fn fail(&mut self, e: Error) {
        tracing::error!(error = %e, "stopping: cannot go on safely");
        if self.failure.is_none() {
            self.failure = Some(e);
        }
    }

    fn once_finished(&self) -> bool {
        self.once_set
            .as_ref()
            .is_some_and(|owed| owed.is_empty() && self.tasks.is_empty())
    }

    fn next_wake(&self, next_poll: Instant, grace_deadline: Option<Instant>) -> Instant {
        let now_sys = SystemTime::now();
        let now = Instant::now();
        let until = |t: SystemTime| now + t.duration_since(now_sys).unwrap_or_default();
        let mut wake = next_poll;
        if let Some(deadline) = grace_deadline {
            // Past the deadline every attempt has been told to stop; wait
            // for their tasks, not for a timer.
            wake = if deadline > now {
                deadline
            } else {
                now + Duration::from_secs(3600)
            };
        } else if let Some(paused) = self.paused_until {
            wake = wake.min(until(paused));
        } else {
            for record in self.waiting.iter().filter_map(|k| self.records.get(k)) {
                if record.status == IssueStatus::Retrying
                    && let Some(t) = record.next_retry_at
                {
                    wake = wake.min(until(t));
                }
            }
        }
        wake
    }
}

/// One attempt, from its durable start to its durable outcome and report.
async fn attempt_task(
    shared: Arc<Shared>,
    settings: Settings,
    mut record: IssueRecord,
    cancel: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
) -> Result<IssueRecord, Error> {
    let Some(attempt) = record.attempts.last().cloned() else {
        return Err(Error::Other("attempt task without an attempt".into()));
    };
    let failures = record.failures_this_round();
    if record.reports.started_attempt != Some(attempt.number) {
        let start = StartReport {
            attempt: attempt.number,
            failures,
            max_attempts: settings.max_attempts,
        };
        match shared
            .source()
            .report_started(&record.issue, start, &mut record.reports)
            .await
        {
            Ok(()) => record.reports.started_attempt = Some(attempt.number),
            Err(e) => tracing::warn!(error = %e, "cannot report the start to the source"),
        }
    }
    // Durable before the workflow starts (a crash from here on is seen as
    // an interrupted attempt, never as a lost one), and after the start
    // report, so that what the source noted in `reports.memo` (such as its
    // status comment's id) survives a crash during the attempt.
    shared.store.put(&record).await?;
    tracing::info!("workflow starting");
    let job = WorkflowJob {
        issue: record.issue.clone(),
        attempt: attempt.number,
        run_id: attempt.run_id.clone(),
    };
    let result = shared.runner().run(&job, cancel).await;
    let stop_reason = reason.get().copied();
    apply_outcome(&mut record, &settings, result, stop_reason);
    shared.store.put(&record).await?;
    if matches!(record.status, IssueStatus::Done | IssueStatus::Failed)
        && report_outcome(&shared, &settings, &mut record).await
    {
        // Losing this note in a crash only repeats the report, which
        // sources make idempotent; no need to wait for the sync.
        shared.store.put_relaxed(&record).await?;
    }
    Ok(record)
}

fn apply_outcome(
    record: &mut IssueRecord,
    settings: &Settings,
    result: Result<RunOutcome, crate::error::RunnerError>,
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
            tracing::info!("workflow cancelled: the issue is no longer wanted");
            record.status = IssueStatus::Cancelled;
        }
        AttemptOutcome::Interrupted => {
            tracing::info!("workflow interrupted by the shutdown; it runs again after a restart");
            record.status = IssueStatus::Queued;
        }
        AttemptOutcome::QuotaExhausted { .. } => {
            record.status = IssueStatus::Queued;
        }
    }
}

fn classify(run: &RunOutcome, stop_reason: Option<StopReason>) -> AttemptOutcome {
    match run.exit {
        ExitKind::Code(0) => AttemptOutcome::Succeeded,
        ExitKind::Code(_) if run.retry_after.is_some() => AttemptOutcome::QuotaExhausted {
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
            Some(StopReason::Unwanted) => AttemptOutcome::Cancelled,
            // A runner that reports a cancellation we did not ask for is
            // treated like a shutdown: run it again.
            Some(StopReason::Shutdown) | None => AttemptOutcome::Interrupted,
        },
    }
}

fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| signal.to_string())
}

/// Reports a settled round to the source. Returns whether it went
/// through, in which case `record.reports` says so; a failed report is
/// repeated at a later poll.
async fn report_outcome(shared: &Shared, settings: &Settings, record: &mut IssueRecord) -> bool {
    let result = match record.status {
        IssueStatus::Done => {
            let success = SuccessReport {
                pr_url: record.pr_url.clone(),
                attempt: record.last_attempt().map_or(0, |a| a.number),
            };
            shared
                .source()
                .report_succeeded(&record.issue, &success, &mut record.reports)
                .await
        }
        IssueStatus::Failed => {
            let last = record.last_attempt();
            let failure = FailureReport {
                reason: record.last_error.clone().unwrap_or_default(),
                log_tail: last
                    .and_then(|a| a.log_path.as_deref())
                    .map(|p| log_tail(p, 20))
                    .unwrap_or_default(),
                attempts: record.failures_this_round().min(settings.max_attempts),
            };
            shared
                .source()
                .report_failed(&record.issue, &failure, &mut record.reports)
                .await
        }
        _ => return false,
    };
    match result {
        Ok(()) => {
            record.reports.outcome_reported = true;
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot report the outcome to the source; trying again at the next poll");
            false
        }
    }
}

/// The last `lines` lines of a log, reading at most its last 64 KiB.
pub(crate) fn log_tail(path: &std::path::Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn put_all(store: &Arc<dyn StateStore>, records: Vec<IssueRecord>) -> Result<(), StoreError> {
    let mut puts = JoinSet::new();
    for record in records {
        let store = Arc::clone(store);
        puts.spawn(async move { store.put(&record).await });
    }
    while let Some(done) = puts.join_next().await {
        done.map_err(|e| StoreError::Failed(format!("a state write panicked: {e}")))??;
    }
    Ok(())
}

fn new_run_id() -> String {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{millis:x}-{:08x}", rand::rng().random::<u32>())
}
