//! Retention in the service: the loop picks the settled issues whose files
//! are due ([`Retention::is_due`]) and hands them to a batch task, which
//! removes their directories off the async threads, one issue at a time,
//! and sends each result back; the loop writes the `pruned_at` mark (it
//! owns the records). A pass runs at start and then every
//! [`PRUNE_EVERY`], and whenever an operator asks (`Orchestrator::prune`).
//!
//! An issue handed to a batch is held: the loop keeps it out of the
//! schedule until its result is back, so a new round triggered meanwhile
//! starts only after its old files are gone, with a fresh workspace. A
//! running or waiting issue is never handed over: only settled ones are
//! due.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::issue::IssueKey;
use crate::retention::{Freed, PruneReport, Retention};

/// Between the service's own passes. Retention is counted in days, so an
/// hour late is nothing, and the pass costs one look at every record.
pub(super) const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What an operator's prune is answered with.
pub(super) type Reply = oneshot::Sender<Result<PruneReport, Error>>;

/// One issue's result, from a batch task to the loop.
pub(super) struct Pruned {
    batch: u64,
    /// The issue, held until this arrives.
    pub(super) key: IssueKey,
    /// The settled round whose files were removed.
    pub(super) round: u32,
    /// `None`: the batch stopped (the service is stopping) before this one.
    pub(super) freed: Option<Freed>,
    /// Nothing was removed.
    pub(super) dry_run: bool,
}

struct Batch {
    left: usize,
    report: PruneReport,
    reply: Option<Reply>,
}

/// The loop's side of pruning: when the next pass is due, which issues are
/// held, and the reports being gathered for operators.
pub(super) struct Pruner {
    next_pass: Instant,
    held: HashSet<IssueKey>,
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    results_tx: mpsc::UnboundedSender<Pruned>,
    results: mpsc::UnboundedReceiver<Pruned>,
    stop: CancellationToken,
}

impl Pruner {
    pub(super) fn new() -> Self {
        let (results_tx, results) = mpsc::unbounded_channel();
        Self {
            next_pass: Instant::now(),
            held: HashSet::new(),
            batches: HashMap::new(),
            next_batch: 0,
            results_tx,
            results,
            stop: CancellationToken::new(),
        }
    }

    /// Whether the service's own pass is due now; if so, the next one is
    /// counted from now.
    pub(super) fn pass_due(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next_pass {
            return false;
        }
        self.next_pass = now + PRUNE_EVERY;
        true
    }

    /// Whether `key` is held by a batch (out of the schedule).
    pub(super) fn holds(&self, key: &IssueKey) -> bool {
        self.held.contains(key)
    }

    /// Starts a batch over `targets` (issue and settled round), chosen by
    /// the loop. A dry run holds nothing and removes nothing. `reply`, when
    /// given, gets the report once every target is done.
    pub(super) fn start(
        &mut self,
        retention: &Retention,
        targets: Vec<(IssueKey, u32)>,
        dry_run: bool,
        reply: Option<Reply>,
    ) {
        let targets: Vec<_> = targets
            .into_iter()
            .filter(|(key, _)| !self.held.contains(key))
            .collect();
        let report = PruneReport {
            dry_run,
            ..PruneReport::default()
        };
        if targets.is_empty() {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(report));
            }
            return;
        }
        if !dry_run {
            self.held.extend(targets.iter().map(|(key, _)| key.clone()));
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        self.batches.insert(
            batch,
            Batch {
                left: targets.len(),
                report,
                reply,
            },
        );
        let (retention, results, stop) = (
            retention.clone(),
            self.results_tx.clone(),
            self.stop.clone(),
        );
        tokio::spawn(async move {
            for (key, round) in targets {
                let freed = if stop.is_cancelled() {
                    None
                } else {
                    let (retention, k) = (retention.clone(), key.clone());
                    let removed =
                        tokio::task::spawn_blocking(move || retention.prune_issue(&k, dry_run))
                            .await;
                    Some(removed.unwrap_or_else(|e| Freed {
                        found: true,
                        bytes: 0,
                        error: Some(format!("the removal panicked: {e}")),
                    }))
                };
                let pruned = Pruned {
                    batch,
                    key,
                    round,
                    freed,
                    dry_run,
                };
                if results.send(pruned).is_err() {
                    return;
                }
            }
        });
    }

    /// The next result of any batch.
    pub(super) async fn next(&mut self) -> Option<Pruned> {
        self.results.recv().await
    }

    /// Whether any batch is under way (results to wait for).
    pub(super) fn busy(&self) -> bool {
        !self.batches.is_empty()
    }

    /// Takes a result in: releases its issue, adds it to its batch's
    /// report, and answers the operator when the batch is complete.
    /// Returns whether the issue's record is to be marked pruned.
    pub(super) fn settle(&mut self, pruned: &Pruned) -> bool {
        if !pruned.dry_run {
            self.held.remove(&pruned.key);
        }
        let Some(batch) = self.batches.get_mut(&pruned.batch) else {
            return false;
        };
        batch.left -= 1;
        let mark = match &pruned.freed {
            Some(freed) if freed.found => {
                batch.report.add(&pruned.key, pruned.round, freed.clone());
                !pruned.dry_run && freed.error.is_none()
            }
            _ => false,
        };
        if batch.left == 0
            && let Some(done) = self.batches.remove(&pruned.batch)
            && let Some(reply) = done.reply
        {
            let _ = reply.send(Ok(done.report));
        }
        mark
    }

    /// Stops every batch between two issues (the service is stopping).
    pub(super) fn stop(&self) {
        self.stop.cancel();
    }
}
