//! `claude-flow prune [--dry-run]`: removes the workspaces and logs of
//! issues settled longer ago than `service.retention`, as the service does
//! by itself every hour, and says what it freed. A running service is asked
//! (`POST /api/prune`), since it owns the records; otherwise the state
//! directory is opened (read-only for a dry run).

use std::time::SystemTime;

use claude_flow_core::config::{Config, StoreKind};
use claude_flow_core::retention::{self, Retention};
use claude_flow_core::{FileStore, StateStore};

use crate::commands::{Failure, api_failure, open_for_writing, operator_client};
use crate::out::{self, outln};

/// Runs the command.
pub(crate) async fn run(config: &Config, dry_run: bool, json: bool) -> Result<(), Failure> {
    let report = if let Some(pid) = crate::commands::owning_service(config) {
        let client = operator_client(config)?;
        client
            .prune(dry_run)
            .await
            .map_err(|e| api_failure(pid, e))?
    } else {
        let retention = Retention::from_config(&config.service)
            .ok_or_else(|| Failure::other(retention::KEEP_ALL))?;
        let store: Box<dyn StateStore> = if dry_run && config.store.kind == StoreKind::File {
            Box::new(
                FileStore::open_read_only(&config.service.state_dir)
                    .map_err(|e| crate::commands::state::state_dir_failure(config, e))?,
            )
        } else {
            Box::new(open_for_writing(config)?)
        };
        retention::prune_store(&*store, &retention, SystemTime::now(), dry_run).await?
    };
    if json {
        out::json(&serde_json::to_value(&report).unwrap_or_default())?;
    } else {
        outln!("{}", report.describe())?;
    }
    match report.issues.iter().find_map(|i| i.error.as_ref()) {
        Some(e) => Err(Failure::other(format!(
            "not everything could be removed ({e}); the next prune tries again"
        ))),
        None => Ok(()),
    }
}
