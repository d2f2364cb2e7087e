//! The reporter: a reconciler in the manner of kube-rs's controller
//! runtime. Each record says what its issue should show at the source
//! ([`IssueRecord::wanted_shown`]); the loop hands the reporter that state
//! whenever it changes, and the reporter brings the issue there, one
//! report at a time per source (the source paces its own writes).
//!
//! - Only the latest state of an issue is kept: a start report still
//!   queued when the round ends is never sent.
//! - A report that fails is tried again later with a growing delay, never
//!   dropped; newer states of the same issue go first.
//! - Every report that goes through is handed back to the loop, which
//!   keeps it in the record; after a restart, records whose source shows
//!   an older state are handed to the reporter again.
//!
//! The reporter never holds up the loop or a workflow slot: the loop only
//! sends it messages.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::Shared;
use crate::issue::{Issue, IssueKey};
use crate::issue_source::Report;
use crate::record::{Reports, Shown};

/// The first wait before a failed report is tried again; it doubles up to
/// [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// What an issue should show, with what the source was last told.
#[derive(Debug, Clone)]
pub(super) struct Want {
    pub(super) issue: Issue,
    pub(super) report: Report,
    pub(super) shown: Shown,
    /// Whether the report notes that the text changed after approval.
    pub(super) edited: bool,
    pub(super) reports: Reports,
    /// For a failure report: the log whose last lines it quotes, read
    /// only when the report is made.
    pub(super) log_path: Option<PathBuf>,
}

/// A report that went through.
#[derive(Debug)]
pub(super) struct Delivered {
    pub(super) key: IssueKey,
    pub(super) round: u32,
    /// The round's reports, `shown` included.
    pub(super) reports: Reports,
}

/// The loop's side of the reporter. Dropping it stops the task.
pub(super) struct Reporter {
    wants: mpsc::UnboundedSender<Want>,
    /// States asked for and not tried yet (failed ones waiting for their
    /// retry are not counted): zero means that everything asked for so
    /// far was tried at least once.
    untried: Arc<watch::Sender<usize>>,
    changes: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reporter {
    pub(super) fn spawn(shared: Arc<Shared>) -> (Self, mpsc::UnboundedReceiver<Delivered>) {
        let (wants, inbox) = mpsc::unbounded_channel();
        let (delivered, outbox) = mpsc::unbounded_channel();
        let untried = Arc::new(watch::Sender::new(0));
        let worker = Worker {
            shared,
            inbox,
            delivered,
            untried: Arc::clone(&untried),
            entries: HashMap::new(),
            delivered_reports: HashMap::new(),
            fresh: VecDeque::new(),
            retries: BTreeSet::new(),
        };
        let task = tokio::spawn(worker.run());
        let changes = untried.subscribe();
        (
            Self {
                wants,
                untried,
                changes,
                task,
            },
            outbox,
        )
    }

    /// Asks for the issue to show `want`, replacing any older state.
    pub(super) fn want(&self, want: Want) {
        // Counted before the worker reads it, so that the loop never sees
        // zero while a state it asked for is still in the channel.
        self.untried.send_modify(|n| *n += 1);
        if self.wants.send(want).is_err() {
            self.untried.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    /// Whether every state asked for has been tried at least once.
    pub(super) fn all_tried(&self) -> bool {
        self.untried() == 0
    }

    /// States asked for and not tried yet.
    pub(super) fn untried(&self) -> usize {
        *self.untried.borrow()
    }

    /// Wakes when [`all_tried`](Self::all_tried) may have changed.
    pub(super) async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In `fresh`: not tried yet.
    Fresh,
    /// Being reported now.
    InFlight,
    /// In `retries`: failed, tried again at this time.
    Retry(Instant),
}

struct Entry {
    want: Want,
    /// Failed tries of this state.
    failures: u32,
    state: State,
}

struct Worker {
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<Want>,
    delivered: mpsc::UnboundedSender<Delivered>,
    untried: Arc<watch::Sender<usize>>,
    entries: HashMap<IssueKey, Entry>,
    /// What the last successful report of each issue left in its reports
    /// (round, reports): the loop may hand over an older copy before it
    /// has heard of that report, and a comment id must not be forgotten.
    delivered_reports: HashMap<IssueKey, (u32, Reports)>,
    /// Issues with an untried state, oldest first.
    fresh: VecDeque<IssueKey>,
    retries: BTreeSet<(Instant, IssueKey)>,
}

impl Worker {
    async fn run(mut self) {
        loop {
            while let Ok(want) = self.inbox.try_recv() {
                self.take(want);
            }
            let (key, was_fresh) = match self.fresh.pop_front() {
                Some(key) => (key, true),
                None => {
                    let due = self.retries.first().map(|(t, _)| *t);
                    tokio::select! {
                        want = self.inbox.recv() => match want {
                            Some(want) => { self.take(want); continue; }
                            None => return,
                        },
                        () = sleep_until(due) => match self.retries.pop_first() {
                            Some((_, key)) => (key, false),
                            None => continue,
                        }
                    }
                }
            };
            self.deliver(key, was_fresh).await;
        }
    }

    fn tried(&self) {
        self.untried.send_modify(|n| *n = n.saturating_sub(1));
    }

    fn take(&mut self, mut want: Want) {
        let key = want.issue.key.clone();
        let Some(entry) = self.entries.get_mut(&key) else {
            if let Some((round, reports)) = self.delivered_reports.get(&key)
                && *round == want.report.round()
            {
                want.reports = reports.clone();
            }
            self.entries.insert(
                key.clone(),
                Entry {
                    want,
                    failures: 0,
                    state: State::Fresh,
                },
            );
            self.fresh.push_back(key);
            return;
        };
        // The worker's reports are the newest of the round: the loop's
        // copy may not have heard of the last report yet.
        if entry.want.report.round() == want.report.round() {
            want.reports = entry.want.reports.clone();
        }
        entry.want = want;
        entry.failures = 0;
        match entry.state {
            // Two untried states of one issue: only the newer is sent.
            State::Fresh => self.tried(),
            State::InFlight => {}
            State::Retry(at) => {
                self.retries.remove(&(at, key.clone()));
                entry.state = State::Fresh;
                self.fresh.push_back(key);
            }
        }
    }

    async fn deliver(&mut self, key: IssueKey, was_fresh: bool) {
        self.try_report(key).await;
        // Counted only now, after the loop was told of a success, so that
        // a loop that sees zero has every delivery in its channel.
        if was_fresh {
            self.tried();
        }
    }

    async fn try_report(&mut self, key: IssueKey) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        entry.state = State::InFlight;
        let want = entry.want.clone();
        let mut report = want.report.clone();
        if let (Report::Failed(failure), Some(path)) = (&mut report, &want.log_path) {
            let path = path.clone();
            failure.log_tail =
                tokio::task::spawn_blocking(move || crate::runner::log_tail(&path, 20))
                    .await
                    .unwrap_or_default();
        }
        let mut reports = want.reports.clone();
        let source = self.shared.source();
        let span = tracing::info_span!("report", issue = %key, round = report.round());
        let result = source
            .report(&want.issue, &report, &mut reports)
            .instrument(span)
            .await;
        // Newer states may have arrived meanwhile.
        while let Ok(newer) = self.inbox.try_recv() {
            self.take(newer);
        }
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let same_round = entry.want.report.round() == want.report.round();
        let superseded = entry.want.report != want.report
            || entry.want.shown != want.shown
            || entry.want.edited != want.edited;
        let ok = result.is_ok();
        metrics::counter!("claude_flow_reports_total", "result" => if ok { "ok" } else { "error" })
            .increment(1);
        match result {
            Ok(()) => {
                reports.shown = Some(want.shown);
                reports.edit_shown = want.edited;
                self.delivered_reports
                    .insert(key.clone(), (want.report.round(), reports.clone()));
                let _ = self.delivered.send(Delivered {
                    key: key.clone(),
                    round: want.report.round(),
                    reports: reports.clone(),
                });
            }
            Err(e) if !superseded => {
                entry.failures += 1;
                let delay = FIRST_RETRY_DELAY
                    .saturating_mul(2u32.saturating_pow(entry.failures - 1))
                    .min(MAX_RETRY_DELAY);
                tracing::warn!(issue = %key, error = %e, retry_in = %humantime::format_duration(delay), "cannot report to the source; trying again later");
                // Keep what this try learnt (a comment id, say).
                entry.want.reports = reports;
                let at = Instant::now() + delay;
                entry.state = State::Retry(at);
                self.retries.insert((at, key));
                return;
            }
            Err(e) => {
                tracing::warn!(issue = %key, error = %e, "cannot report to the source; a newer state is next");
            }
        }
        if !superseded {
            self.entries.remove(&key);
            return;
        }
        if same_round {
            entry.want.reports = reports;
        }
        entry.state = State::Fresh;
        self.fresh.push_back(key);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
