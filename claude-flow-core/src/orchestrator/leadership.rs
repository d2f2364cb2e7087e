//! With a store that several daemons share ([`Coordination`]), one daemon
//! at a time runs the engine: the leader, which polls the sources, sends
//! every report and expires lost leases. Every daemon, leader or not, runs
//! workflows through its worker (`worker.rs`). The followers try for
//! leadership every quarter of the lease, and take over within the lease
//! when the leader dies or loses the database.
//!
//! The leader confirms its leadership every quarter of the lease, each try
//! bounded by a quarter too. When a confirmation fails, its engine stops
//! at once (no more polls or reports from it), before the database ends
//! the old session (one lease of silence, `idle_session_timeout`) and lets
//! another daemon lead. Its workflows are not the leader's to stop: they
//! run under their own leases.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Status;
use crate::error::{Error, StoreError};
use crate::state::Coordination;

/// This daemon's leadership, kept alive by a task until dropped.
pub(super) struct Leadership {
    coordination: Arc<dyn Coordination>,
    lost: CancellationToken,
    keeper: JoinHandle<()>,
    /// The engine's shutdown made by [`guard`](Self::guard).
    stop: CancellationToken,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Tries once, bounded by `period`: `Ok(leading)`, or why the store could
/// not say.
async fn ask(
    coordination: &dyn Coordination,
    node: &str,
    period: Duration,
) -> Result<bool, String> {
    match tokio::time::timeout(period, coordination.lead(node)).await {
        Ok(Ok(leading)) => Ok(leading),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(period)
        )),
    }
}

/// Tries once, bounded by `period`; a store that cannot say means no.
async fn try_lead(coordination: &dyn Coordination, node: &str, period: Duration) -> bool {
    ask(coordination, node, period).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot reach the store to confirm leadership");
        false
    })
}

/// Waits until this daemon leads. `None` when `shutdown` fired first.
pub(super) async fn acquire(
    coordination: Arc<dyn Coordination>,
    node: &str,
    status: &watch::Sender<Status>,
    shutdown: &CancellationToken,
) -> Result<Option<Leadership>, Error> {
    let lease = coordination.lease();
    let period = lease / 4;
    let mut said = String::new();
    loop {
        let (why, reachable) = match ask(&*coordination, node, period).await {
            Ok(true) => break,
            Ok(false) => ("following: another daemon leads".to_owned(), true),
            Err(e) => (format!("waiting for the database: {e}"), false),
        };
        if why != said {
            if reachable {
                tracing::info!(node, "{why}");
            } else {
                tracing::warn!(node, "{why}");
            }
            said.clone_from(&why);
        }
        // The heartbeat moves every second, as the engine's does, so that
        // the systemd watchdog leaves a following daemon alone.
        let next = tokio::time::Instant::now() + period;
        while tokio::time::Instant::now() < next {
            status.send_modify(|s| {
                s.standby = (!reachable).then(|| why.clone());
                s.heartbeat = s.heartbeat.wrapping_add(1);
            });
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(Duration::from_secs(1).min(next - tokio::time::Instant::now())) => {}
            }
        }
    }
    status.send_modify(|s| s.standby = None);
    tracing::info!(
        node,
        "leading: this daemon polls and reports, and runs workflows"
    );
    let lost = CancellationToken::new();
    let keeper = tokio::spawn(keep(
        Arc::clone(&coordination),
        node.to_owned(),
        period,
        lost.clone(),
    ));
    Ok(Some(Leadership {
        coordination,
        lost,
        keeper,
        stop: CancellationToken::new(),
    }))
}

async fn keep(
    coordination: Arc<dyn Coordination>,
    node: String,
    period: Duration,
    lost: CancellationToken,
) {
    loop {
        tokio::time::sleep(period).await;
        if !try_lead(&*coordination, &node, period).await {
            tracing::error!(
                "lost leadership (the database is unreachable or ended the session): no more polls or reports from this daemon"
            );
            lost.cancel();
            return;
        }
    }
}

fn lost() -> StoreError {
    StoreError::Database {
        what: "keep leadership".into(),
        message: "lost the database; another daemon takes over polling and reporting".into(),
        retryable: true,
    }
}

impl Leadership {
    /// The engine's own shutdown: `outer`, or at once (workflows stopped
    /// without the grace) when leadership is lost.
    pub(super) fn guard(&self, outer: CancellationToken, hurry: Arc<Notify>) -> CancellationToken {
        let stop = self.stop.clone();
        let lost = self.lost.clone();
        let inner = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = outer.cancelled() => {}
                () = lost.cancelled() => hurry.notify_one(),
                () = inner.cancelled() => return,
            }
            inner.cancel();
        });
        stop
    }

    /// Ends leadership: `Err` when it was lost while the engine ran,
    /// else it is handed over at once.
    pub(super) async fn end(self) -> Result<(), Error> {
        self.keeper.abort();
        // Ends the guard's task too.
        self.stop.cancel();
        if self.lost.is_cancelled() {
            return Err(lost().into());
        }
        if let Err(e) = self.coordination.resign().await {
            tracing::warn!(error = %e, "cannot hand leadership over; another daemon takes it within the lease");
        }
        Ok(())
    }
}
