//! The state as the read commands see it: the state directory opened
//! without the lock (a running service may hold it), with errors that name
//! `service.state_dir`; or, with `store.kind: "postgres"`, the database
//! the daemons share.

use std::io::ErrorKind;

use std::sync::Arc;

use claude_flow_core::config::{Config, StoreKind};
use claude_flow_core::{
    ConfigError, Error, FileStore, IssueKey, IssueRecord, ServiceState, StateStore, StoreError,
};

use claude_flow_core::api::NodeStatus;

use super::Failure;

/// The state, read-only.
pub struct ReadState<'a> {
    config: &'a Config,
    store: Arc<dyn StateStore>,
}

impl std::fmt::Debug for ReadState<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadState")
            .field("store", &self.config.store.kind)
            .finish_non_exhaustive()
    }
}

impl<'a> ReadState<'a> {
    /// Opens the configured store for reading: `service.state_dir`'s
    /// journal, or the database.
    pub async fn open(config: &'a Config) -> Result<Self, Failure> {
        let store: Arc<dyn StateStore> = match config.store.kind {
            StoreKind::File => Arc::new(
                FileStore::open_read_only(&config.service.state_dir)
                    .map_err(|e| state_dir_failure(config, e))?,
            ),
            // Reads only, creating nothing: no schema upgrade under running
            // daemons (a schema other than this binary's is refused), no
            // state directory.
            StoreKind::Postgres => Arc::new(read_database(config).await?),
        };
        Ok(Self { config, store })
    }

    /// Every daemon sharing the store, with what each runs (nothing for a
    /// store of one daemon's own).
    pub async fn nodes(&self, records: &[IssueRecord]) -> Result<Vec<NodeStatus>, Failure> {
        let Some(coordination) = self.store.coordination() else {
            return Ok(Vec::new());
        };
        let nodes = coordination.nodes().await?;
        Ok(NodeStatus::of(nodes, records))
    }

    /// Every record, read afresh.
    pub async fn records(&self) -> Result<Vec<IssueRecord>, Failure> {
        self.store
            .load()
            .await
            .map_err(|e| state_dir_failure(self.config, e))
    }

    /// One record, read afresh.
    pub async fn record(&self, key: &IssueKey) -> Result<Option<IssueRecord>, Failure> {
        self.records().await?;
        self.store
            .get(key)
            .await
            .map_err(|e| state_dir_failure(self.config, e))
    }

    /// The service-wide state: the pause, the skipped triggers.
    pub async fn service(&self) -> Result<ServiceState, Failure> {
        self.store
            .load_service()
            .await
            .map_err(|e| state_dir_failure(self.config, e))
    }
}

/// The database of `store.postgres.url`, whose schema must be this
/// binary's (the CLI never migrates it).
pub(crate) async fn read_database(
    config: &Config,
) -> Result<claude_flow_core::state::PostgresStore, Failure> {
    use claude_flow_core::state::{PostgresSettings, PostgresStore};
    let url = config.postgres_url().map_err(Error::from)?;
    let settings = PostgresSettings::from_config(&config.store.postgres);
    Ok(PostgresStore::connect_current(&url, settings).await?)
}

/// A state directory that cannot be read, said in terms of the setting: a
/// path through a file, or one this user may not read, is a configuration
/// problem (exit 78); anything else (a corrupt file, a failing disk) is not.
pub(crate) fn state_dir_failure(config: &Config, e: StoreError) -> Failure {
    let StoreError::Io { path, source } = e else {
        return e.into();
    };
    let dir = config.service.state_dir.display();
    let hint = match source.kind() {
        ErrorKind::NotADirectory => Some("part of that path is a file, not a directory"),
        ErrorKind::PermissionDenied => Some(
            "run this command as the service's user or as root, or make the directory readable to you",
        ),
        _ => None,
    };
    match hint {
        Some(hint) => {
            let mut error = ConfigError::key(
                "service.state_dir",
                format!("{dir}: cannot use {}: {source} ({hint})", path.display()),
            );
            if let Some(file) = &config.file {
                error = error.in_file(file);
            }
            Error::from(error).into()
        }
        None => Failure::other(format!(
            "service.state_dir {dir}: cannot use {}: {source}",
            path.display()
        )),
    }
}
