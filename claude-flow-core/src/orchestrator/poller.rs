//! The poller: its own task, so that a slow or hanging source never holds
//! up the loop (its timers, HTTP answers, signals, watchdog pings). It
//! polls at once, then every `poll_interval` or when asked, and hands each
//! result to the loop through a channel of one: a result the loop has not
//! taken yet holds back the next poll.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Settings, Shared};
use crate::error::SourceError;
use crate::issue::Issue;
use crate::issue_source::SkippedTrigger;

/// One poll's result.
pub(super) struct Polled {
    pub(super) result: Result<Vec<Issue>, SourceError>,
    /// The triggers the poll ignored (empty when it failed).
    pub(super) skipped: Vec<SkippedTrigger>,
    pub(super) at: SystemTime,
    pub(super) duration: Duration,
}

/// The running poller; dropping it stops the task (a poll in flight is
/// abandoned).
pub(super) struct Poller {
    task: JoinHandle<()>,
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Poller {
    pub(super) fn spawn(
        shared: Arc<Shared>,
        mut settings: watch::Receiver<Settings>,
        poll_now: Arc<Notify>,
    ) -> (Self, mpsc::Receiver<Polled>) {
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            loop {
                let started = Instant::now();
                let source = shared.source();
                let result = source.poll().await;
                let skipped = if result.is_ok() {
                    source.skipped()
                } else {
                    Vec::new()
                };
                let polled = Polled {
                    result,
                    skipped,
                    at: SystemTime::now(),
                    duration: started.elapsed(),
                };
                if tx.send(polled).await.is_err() {
                    return;
                }
                loop {
                    let next = started + settings.borrow_and_update().poll_interval;
                    tokio::select! {
                        () = tokio::time::sleep_until(next) => break,
                        () = poll_now.notified() => break,
                        changed = settings.changed() => if changed.is_err() { return },
                    }
                }
            }
        });
        (Self { task }, rx)
    }
}
