//! Wiring from configuration to concrete parts: what both binaries share,
//! so that they only parse arguments and call this.

use std::sync::Arc;

use crate::config::{Config, SourceKind, StoreKind};
use crate::error::Error;
use crate::issue::RepoId;
use crate::issue_source::{GithubSource, IssueSource, LocalSource};
use crate::orchestrator::{Orchestrator, Settings};
use crate::runner::{SubprocessRunner, SubprocessSettings};
use crate::state::{FileStore, StateStore};

/// The subprocess runner's settings from `workflow.*` and `service.*`,
/// once the workflow program is known to start (found, executable, its
/// `#!` interpreter too): the same check `config check`, both binaries'
/// start and a reload make, so that a broken program is a configuration
/// error naming `workflow.command` rather than a failed attempt per issue.
pub fn subprocess_settings(config: &Config) -> Result<SubprocessSettings, Error> {
    let program = config.workflow.command.first().cloned().unwrap_or_default();
    crate::runner::check_program(&program)
        .map_err(|reason| crate::error::ConfigError::key("workflow.command", reason))?;
    let token = if config.workflow.pass_token {
        config.github_token()?
    } else {
        None
    };
    Ok(SubprocessSettings {
        command: config.workflow.command.clone(),
        workspace_dir: config.service.workspace_dir(),
        log_dir: config.service.log_dir(),
        timeout: config.workflow.timeout,
        kill_grace: config.workflow.kill_grace,
        env: config.workflow.env.clone(),
        token,
    })
}

/// The issue source `source` names.
pub fn issue_source(config: &Config) -> Result<Arc<dyn IssueSource>, Error> {
    match config.source {
        SourceKind::Local => {
            let dir = config.local.dir.clone().ok_or_else(|| {
                crate::error::ConfigError::key("local.dir", "required when source is \"local\"")
            })?;
            if !dir.is_dir() {
                return Err(crate::error::ConfigError::key(
                    "local.dir",
                    format!("{} is not a directory", dir.display()),
                )
                .into());
            }
            Ok(Arc::new(LocalSource::new(dir)?))
        }
        SourceKind::Github => Ok(Arc::new(GithubSource::from_config(config)?)),
    }
}

/// The repositories the configuration watches: `github.repos`, or the
/// local directory's `local/<dir name>`.
pub fn repositories(config: &Config) -> Result<Vec<RepoId>, Error> {
    match config.source {
        SourceKind::Github => Ok(config.github.repos.clone()),
        SourceKind::Local => {
            let dir = config.local.dir.clone().unwrap_or_default();
            Ok(vec![LocalSource::new(dir)?.repo().clone()])
        }
    }
}

/// Opens the store `store.kind` names for writing: the state directory's
/// journal (taking its lock: a second writer gets exit 75), or the
/// PostgreSQL database, which is reached at its first use (a daemon
/// started while the database is down keeps trying).
pub fn open_store(config: &Config) -> Result<Arc<dyn StateStore>, Error> {
    match config.store.kind {
        StoreKind::File => Ok(Arc::new(FileStore::open(&config.service.state_dir)?)),
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => {
            use std::os::unix::fs::DirBuilderExt;

            use crate::state::{PostgresSettings, PostgresStore};
            let url = config.postgres_url()?;
            // The records are in the database; logs, workspaces and the
            // API token still live in the state directory.
            let dir = &config.service.state_dir;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| crate::error::StoreError::Io {
                    path: dir.clone(),
                    source,
                })?;
            let settings = PostgresSettings::from_config(&config.store.postgres);
            Ok(Arc::new(PostgresStore::open_lazy(&url, settings)?))
        }
        #[cfg(not(feature = "postgres"))]
        StoreKind::Postgres => Err(crate::error::ConfigError::key(
            "store.kind",
            "this build has no PostgreSQL support (cargo feature \"postgres\" of claude-flow-core)",
        )
        .into()),
    }
}

/// Opens the state store for writing ([`open_store`]) and builds the
/// orchestrator the configuration describes.
pub fn orchestrator(config: &Config) -> Result<(Orchestrator, Arc<dyn StateStore>), Error> {
    let source = issue_source(config)?;
    let runner = Arc::new(SubprocessRunner::new(subprocess_settings(config)?));
    crate::service_dirs::prepare_directories(&config.service)?;
    let store = open_store(config)?;
    let orchestrator = Orchestrator::builder()
        .source(source)
        .runner(runner)
        .store(store.clone())
        .settings(Settings::from_config(&config.service))
        .build()?;
    Ok((orchestrator, store))
}
