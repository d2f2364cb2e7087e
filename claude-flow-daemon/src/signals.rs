//! What signals mean to the service: SIGINT and SIGTERM stop it gracefully
//! (a second one stops it at once, still cancelling workflows); SIGHUP
//! reloads the configuration.

use tokio::signal::unix::{SignalKind, signal};

use crate::DaemonHandle;

/// Listens for signals on a task and turns them into calls on `handle`.
pub fn forward(handle: &DaemonHandle) -> std::io::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let handle = handle.clone();
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            tokio::select! {
                _ = int.recv() => stops += 1,
                _ = term.recv() => stops += 1,
                _ = hup.recv() => {
                    // A refused reload is logged by reload(); the service
                    // goes on with the configuration it has.
                    let _ = handle.reload();
                    continue;
                }
            }
            if stops == 1 {
                tracing::info!("stopping gracefully (signal again to stop at once)");
                handle.shutdown();
            } else {
                tracing::warn!("stopping at once: cancelling running workflows");
                handle.shutdown_now();
            }
        }
    });
    Ok(())
}
