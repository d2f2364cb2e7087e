//! The orchestrator: polls a source, runs workflow attempts with bounded
//! concurrency, retries with backoff, keeps every transition in the state
//! store before acting on it, and reports back to the source.
//!
//! One loop ([`engine`]) owns the records and makes every decision; it
//! never awaits the network. Around it, each on its own task:
//! - [`poller`]: polls the source and hands the results to the loop;
//! - [`attempt`]: one per running workflow, writing its own transitions
//!   (so that concurrent attempts' writes share the store's syncs);
//! - [`reporter`]: brings each issue at the source to the state its
//!   record says, paced and retried, off the workflow slots.
//!
//! [`schedule`] decides what starts next; [`pause`] how long a quota
//! pause lasts; [`prune`] removes the files of issues settled longer ago
//! than the retention, off the loop.

mod attempt;
mod engine;
mod leadership;
mod pause;
mod poller;
mod prune;
mod reporter;
mod schedule;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::ServiceConfig;
use crate::error::Error;
use crate::issue::IssueKey;
use crate::issue_source::IssueSource;
use crate::record::IssueRecord;
use crate::retention::{PruneReport, Retention};
use crate::runner::WorkflowRunner;
use crate::state::{Coordination, StateStore};

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
    /// The longest pause a quota marker can impose.
    pub max_pause: Duration,
    /// Interruptions in a row after which an attempt fails its round.
    pub max_interruptions: u32,
    /// This daemon's name among several sharing a store (`service.node`).
    pub node: String,
    /// Whose files to remove, and when (`service.retention`); `None`
    /// keeps everything.
    pub retention: Option<Retention>,
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
            max_pause: service.max_pause,
            max_interruptions: service.max_interruptions,
            node: service.node.clone(),
            retention: Retention::from_config(service),
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
    /// Issues cancelled (no longer eligible, or by an operator).
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
        Ok(Orchestrator {
            shared: Arc::new(Shared {
                source: RwLock::new(self.source.ok_or_else(|| missing("source"))?),
                runner: RwLock::new(self.runner.ok_or_else(|| missing("runner"))?),
                store: self.store.ok_or_else(|| missing("store"))?,
            }),
            settings,
            status,
            commands: Mutex::new(None),
            engine_running: AtomicBool::new(false),
            poll_now: Arc::new(Notify::new()),
            hurry: Arc::new(Notify::new()),
            hurry_worker: Arc::new(Notify::new()),
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
    /// The running loop's inbox: a fresh channel for each run of the loop
    /// (a daemon that leads again after losing leadership runs it anew).
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    engine_running: AtomicBool,
    poll_now: Arc<Notify>,
    hurry: Arc<Notify>,
    /// The worker's own (several daemons), beside the engine's.
    hurry_worker: Arc<Notify>,
}

/// What the orchestrator is doing: for health checks and status pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The last poll, once there was one.
    pub last_poll: Option<PollResult>,
    /// Polls that failed in a row (0 after a success).
    pub consecutive_poll_failures: u32,
    /// Running attempts, by issue.
    pub running: Vec<RunningAttempt>,
    /// Issues waiting for a slot or a retry.
    pub waiting: usize,
    /// Issues whose state is not shown at the source yet (reports queued
    /// or being retried).
    pub reports_owed: usize,
    /// No workflow starts before this (a quota pause).
    #[serde(with = "humantime_serde")]
    pub paused_until: Option<SystemTime>,
    /// Why the service is paused.
    pub pause_reason: Option<String>,
    /// Why the workflow cannot be started (nothing starts until it can).
    pub workflow_unavailable: Option<String>,
    /// Triggers the last successful poll ignored, with the reason.
    pub skipped: Vec<crate::issue_source::SkippedTrigger>,
    /// A graceful stop is under way.
    pub stopping: bool,
    /// Why this daemon cannot take part now, with a store several daemons
    /// share: the database cannot be reached.
    pub standby: Option<String>,
    /// With a store several daemons share: whether this daemon leads
    /// (polls and reports) or follows (runs workflows only). `None` with a
    /// store of one daemon's own.
    pub role: Option<Role>,
    /// Counts the scheduler loop's turns; the loop turns at least once a
    /// second, so a counter that stops moving means a hung loop (what a
    /// watchdog should catch).
    pub heartbeat: u64,
}

/// A daemon's part among several sharing a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Polls the sources, sends every report, expires lost leases, and
    /// runs workflows.
    Leader,
    /// Runs workflows.
    Follower,
}

/// One running attempt (CONTRACT section 6, `status --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningAttempt {
    /// `owner/name#n`.
    #[serde(with = "display")]
    pub issue: IssueKey,
    /// `CLAUDE_FLOW_ROUND`.
    pub round: u32,
    /// `CLAUDE_FLOW_ATTEMPT`.
    pub attempt: u32,
    /// When it started.
    #[serde(with = "humantime_serde")]
    pub started_at: SystemTime,
}

/// An issue key as `owner/name#n` in JSON.
pub(crate) mod display {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::issue::IssueKey;

    pub fn serialize<S: Serializer>(key: &IssueKey, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(key)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IssueKey, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
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
    Resume(oneshot::Sender<Result<crate::api::Resumed, Error>>),
    /// `true`: a dry run.
    Prune(bool, prune::Reply),
}

impl Command {
    /// Answers the command with "not running" (the loop has ended).
    fn refuse(self, why: &str) {
        let e = || Error::NotRunning(why.to_owned());
        match self {
            Self::Retry(_, reply) | Self::Cancel(_, reply) => {
                let _ = reply.send(Err(e()));
            }
            Self::Resume(reply) => {
                let _ = reply.send(Err(e()));
            }
            Self::Prune(_, reply) => {
                let _ = reply.send(Err(e()));
            }
        }
    }
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
        // At a follower, the leader polls: it is woken through the store.
        if let Some(coordination) = self.following_coordination()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(e) = coordination.wake_leader().await {
                    tracing::warn!(error = %e, "cannot ask the leader to poll now; it polls at its interval");
                }
            });
            return;
        }
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
        self.hurry_worker.notify_one();
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
        if self.following() {
            return crate::ops::retry(&*self.shared.store, key).await;
        }
        self.command(|reply| Command::Retry(key.clone(), reply))
            .await
    }

    /// Cancels an issue through the running loop: a running attempt is
    /// stopped (SIGTERM, then SIGKILL) and the issue settles as cancelled;
    /// the source is told (trigger and in-progress labels removed).
    pub async fn cancel(&self, key: &IssueKey) -> Result<IssueRecord, Error> {
        if let Some(coordination) = self.following_coordination() {
            return crate::ops::cancel_shared(&*self.shared.store, &*coordination, key).await;
        }
        self.command(|reply| Command::Cancel(key.clone(), reply))
            .await
    }

    /// Ends a quota pause now, through the running loop; says which pause
    /// it ended (none when the service was not paused).
    pub async fn resume(&self) -> Result<crate::api::Resumed, Error> {
        if self.following() {
            return crate::ops::resume_shared(&*self.shared.store).await;
        }
        self.command(Command::Resume).await
    }

    /// Removes, through the running loop, the workspaces and logs of
    /// issues settled longer ago than `service.retention` (as the service
    /// does by itself every hour), and says what it freed; `dry_run`
    /// removes nothing. Never touches a running or waiting issue's files.
    pub async fn prune(&self, dry_run: bool) -> Result<PruneReport, Error> {
        self.command(|reply| Command::Prune(dry_run, reply)).await
    }

    /// With a store several daemons share, while another daemon leads:
    /// operator commands go to the store, where the leader and the worker
    /// holding the issue see them.
    fn following(&self) -> bool {
        self.following_coordination().is_some()
    }

    fn following_coordination(&self) -> Option<Arc<dyn Coordination>> {
        if self.engine_running.load(Ordering::SeqCst) {
            return None;
        }
        self.shared
            .store
            .coordination()
            .filter(|_| self.status.borrow().role == Some(Role::Follower))
    }

    async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let not_running = || Error::NotRunning("the orchestrator is not running".into());
        let commands = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(not_running)?;
        let (reply, answer) = oneshot::channel();
        commands.send(make(reply)).map_err(|_| not_running())?;
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
        match self.shared.store.coordination() {
            None => self.run_engine_led(mode, shutdown).await,
            Some(coordination) => self.run_shared(mode, coordination, shutdown).await,
        }
    }

    /// With a store several daemons share: a worker claims and runs
    /// workflows for as long as this runs, while the engine runs only on
    /// the leader. A daemon that loses leadership goes on as a follower
    /// and tries for it again.
    async fn run_shared(
        &self,
        mode: Mode,
        coordination: Arc<dyn Coordination>,
        shutdown: CancellationToken,
    ) -> Result<Summary, Error> {
        let node = self.settings.borrow().node.clone();
        self.status.send_modify(|s| s.role = Some(Role::Follower));
        // The worker stops with the service (its grace runs beside the
        // engine's), or when a `run_once` is done.
        let worker_stop = shutdown.child_token();
        let worker = tokio::spawn(
            worker::Worker::new(
                Arc::clone(&self.shared),
                Arc::clone(&coordination),
                self.settings.subscribe(),
                self.status.clone(),
                Arc::clone(&self.hurry_worker),
            )
            .run(worker_stop.clone()),
        );
        let mut summary = Summary::default();
        let mut result = Ok(());
        loop {
            let acquired =
                leadership::acquire(Arc::clone(&coordination), &node, &self.status, &shutdown)
                    .await;
            let leadership = match acquired {
                Ok(Some(leadership)) => leadership,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            self.status.send_modify(|s| s.role = Some(Role::Leader));
            let guarded = leadership.guard(shutdown.clone(), Arc::clone(&self.hurry));
            let led = self.run_engine_led(mode, guarded).await;
            let ended = leadership.end().await;
            self.status.send_modify(|s| s.role = Some(Role::Follower));
            match (led, ended) {
                (Ok(s), Ok(())) => {
                    summary = s;
                    break;
                }
                (Err(e), _) if !matches!(&e, Error::Store(s) if s.is_retryable()) => {
                    result = Err(e);
                    break;
                }
                (Err(e), _) | (Ok(_), Err(e)) => {
                    tracing::warn!(error = %e, "no longer leading: running workflows as a follower, trying to lead again");
                }
            }
            if shutdown.is_cancelled() || mode == Mode::Once {
                break;
            }
        }
        worker_stop.cancel();
        if let Err(e) = worker.await {
            tracing::error!(error = %e, "the worker panicked");
        }
        result.map(|()| summary)
    }

    async fn run_engine_led(
        &self,
        mode: Mode,
        shutdown: CancellationToken,
    ) -> Result<Summary, Error> {
        if self
            .engine_running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(Error::Other("the orchestrator is already running".into()));
        }
        let (commands, inbox) = mpsc::unbounded_channel();
        *self.commands.lock().unwrap_or_else(|e| e.into_inner()) = Some(commands);
        // A fresh start, but what the worker says (several daemons) stays.
        self.status.send_modify(|s| {
            *s = Status {
                role: s.role,
                running: if s.role.is_some() {
                    std::mem::take(&mut s.running)
                } else {
                    Vec::new()
                },
                ..Status::default()
            };
        });
        let mut engine = engine::Engine::new(
            Arc::clone(&self.shared),
            mode,
            self.settings.subscribe(),
            self.status.clone(),
            inbox,
            Arc::clone(&self.poll_now),
            Arc::clone(&self.hurry),
        );
        let result = engine.run(shutdown).await;
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // Commands sent while the loop ended get their error, not a hang.
        let mut inbox = engine.into_inbox();
        inbox.close();
        while let Ok(command) = inbox.try_recv() {
            command.refuse("the orchestrator is stopping");
        }
        self.engine_running.store(false, Ordering::SeqCst);
        result
    }
}
