//! With a store that several daemons share ([`Coordination`]), one daemon
//! at a time runs the engine: the leader. The others stand by, trying for
//! leadership every quarter of the lease, and take over within the lease
//! when the leader dies or loses the database.
//!
//! Fencing: the leader confirms its leadership every quarter of the lease,
//! each try bounded by a quarter too. When a confirmation fails, the engine
//! stops every workflow at once (SIGTERM, `workflow.kill_grace`, SIGKILL),
//! which ends by half a lease plus the kill grace after the last
//! confirmation, before the database ends the old session (one lease of
//! silence, `idle_session_timeout`) and lets another daemon lead. The
//! configuration keeps `workflow.kill_grace` within half the lease. A new
//! leader that finds attempts recorded as running waits one lease before
//! it recovers them, so that a previous leader that died has had its
//! workflows ended by its guardian.
//!
//! Claims by every daemon (each running workflows under a lease of its
//! own) build on the same [`Coordination`]; until the engine uses them,
//! the leader runs every workflow.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Status;
use crate::error::{Error, StoreError};
use crate::record::IssueStatus;
use crate::state::{Coordination, StateStore};

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
    store: &dyn StateStore,
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
            Ok(false) => ("standing by: another daemon leads".to_owned(), true),
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
        if let Err(e) = coordination.heartbeat(node).await {
            tracing::debug!(error = %e, "heartbeat failed");
        }
        // The heartbeat moves every second, as the engine's does, so that
        // the systemd watchdog leaves a waiting daemon alone.
        let next = tokio::time::Instant::now() + period;
        while tokio::time::Instant::now() < next {
            status.send_modify(|s| {
                s.standby = Some(why.clone());
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
        "leading: this daemon polls, reports and runs workflows"
    );
    let running = store
        .load()
        .await?
        .iter()
        .any(|r| r.status == IssueStatus::Running);
    if running {
        tracing::info!(
            wait = %humantime::format_duration(lease),
            "attempts are recorded as running: waiting one lease for whoever ran them to have stopped"
        );
        let until = tokio::time::Instant::now() + lease;
        while tokio::time::Instant::now() < until {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(period.min(until - tokio::time::Instant::now())) => {}
            }
            if !try_lead(&*coordination, node, period).await {
                return Err(lost().into());
            }
        }
    }
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
                "lost leadership (the database is unreachable or ended the session): stopping every workflow"
            );
            lost.cancel();
            return;
        }
        if let Err(e) = coordination.heartbeat(&node).await {
            tracing::debug!(error = %e, "heartbeat failed");
        }
    }
}

fn lost() -> StoreError {
    StoreError::Database {
        what: "keep leadership".into(),
        message: "lost the database; every workflow was stopped, and another daemon takes over"
            .into(),
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
