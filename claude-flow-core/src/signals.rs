//! Turning SIGINT and SIGTERM into a stop: the first asks for a graceful
//! one, the second for an immediate one.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT or SIGTERM; on the second,
/// `hurry` is called (for an orchestrator: [`Orchestrator::hurry`], which
/// cancels running workflows now instead of after the grace period).
///
/// [`Orchestrator::hurry`]: crate::Orchestrator::hurry
pub fn stop_on_signals(hurry: impl Fn() + Send + 'static) -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping gracefully (signal again to stop at once)");
        cancel.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("stopping at once: cancelling running workflows");
        hurry();
    });
    Ok(token)
}
