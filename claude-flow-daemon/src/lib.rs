//! The claude-flow service as a library: its life cycle ([`Daemon`],
//! [`DaemonHandle`]), signals, PID file, systemd notification and HTTP
//! server, so that tests and embedders start it in-process and the
//! `claude-flow-daemon` binary stays a few lines.
//!
//! ```no_run
//! # async fn demo() -> Result<(), claude_flow_core::Error> {
//! let handle = claude_flow_daemon::Daemon::builder("/etc/claude-flow/config.json")
//!     .build()?
//!     .start()
//!     .await?;
//! claude_flow_daemon::signals::forward(&handle)
//!     .map_err(|e| claude_flow_core::Error::Other(e.to_string()))?;
//! handle.wait().await
//! # }
//! ```
#![deny(missing_docs)]

mod console;
mod daemon;
pub mod http;
pub mod notify;
mod pid_file;
pub mod signals;

pub use daemon::{Daemon, DaemonBuilder, DaemonHandle};
pub use pid_file::PidFile;
