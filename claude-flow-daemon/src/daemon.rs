//! The service's life cycle: build (configuration, lock, PID file), start
//! (the orchestrator on a task), reload, and stop.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use claude_flow_core::logging::{self, LogHandle};
use claude_flow_core::{Config, Error, Orchestrator, Settings, SubprocessRunner, app};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::PidFile;

/// Builds a [`Daemon`].
#[derive(Debug)]
pub struct DaemonBuilder {
    config_path: PathBuf,
    init_logging: bool,
}

impl DaemonBuilder {
    /// Whether to install the global log subscriber from `log.*` (default
    /// true). An embedder with its own subscriber turns this off.
    pub fn init_logging(mut self, yes: bool) -> Self {
        self.init_logging = yes;
        self
    }

    /// Loads the configuration, takes the state directory's lock (a second
    /// instance fails with exit code 75) and writes the PID file.
    pub fn build(self) -> Result<Daemon, Error> {
        let config = Config::load(&self.config_path)?;
        let log = if self.init_logging {
            logging::init(&config.log)
        } else {
            None
        };
        let (orchestrator, _store) = app::orchestrator(&config)?;
        let pid_file = config
            .service
            .pid_file
            .as_deref()
            .map(PidFile::create)
            .transpose()?;
        Ok(Daemon {
            orchestrator: Arc::new(orchestrator),
            pid_file,
            reloader: Reloader {
                path: self.config_path,
                current: config,
                log,
            },
        })
    }
}

/// A built service, ready to [`start`](Daemon::start).
#[derive(Debug)]
pub struct Daemon {
    orchestrator: Arc<Orchestrator>,
    pid_file: Option<PidFile>,
    reloader: Reloader,
}

impl Daemon {
    /// A builder for the service configured by `config_path`.
    pub fn builder(config_path: impl Into<PathBuf>) -> DaemonBuilder {
        DaemonBuilder {
            config_path: config_path.into(),
            init_logging: true,
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &Config {
        &self.reloader.current
    }

    /// Starts the orchestrator on a task of the current runtime.
    pub fn start(self) -> DaemonHandle {
        let shutdown = CancellationToken::new();
        let orchestrator = Arc::clone(&self.orchestrator);
        let token = shutdown.clone();
        let pid_file = self.pid_file;
        let task = tokio::spawn(async move {
            tracing::info!("claude-flow-daemon started");
            let result = orchestrator.run(token).await;
            // Removed only once nothing runs any more.
            drop(pid_file);
            match &result {
                Ok(summary) => tracing::info!(
                    interrupted = summary.interrupted,
                    "claude-flow-daemon stopped"
                ),
                Err(e) => tracing::error!(error = %e, "claude-flow-daemon stopped on an error"),
            }
            result.map(|_| ())
        });
        DaemonHandle {
            inner: Arc::new(Inner {
                shutdown,
                orchestrator: self.orchestrator,
                reloader: Mutex::new(self.reloader),
                task: Mutex::new(Some(task)),
            }),
        }
    }
}

/// Controls a started service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DaemonHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shutdown: CancellationToken,
    orchestrator: Arc<Orchestrator>,
    reloader: Mutex<Reloader>,
    task: Mutex<Option<JoinHandle<Result<(), Error>>>>,
}

impl DaemonHandle {
    /// Stops gracefully: no new work; running workflows get
    /// `service.shutdown_grace` to finish, then are cancelled and recorded
    /// as interrupted (they run again after a restart).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Stops at once: running workflows are cancelled now (SIGTERM, then
    /// SIGKILL after `workflow.kill_grace`) and recorded as interrupted.
    pub fn shutdown_now(&self) {
        self.inner.orchestrator.hurry();
        self.inner.shutdown.cancel();
    }

    /// Re-reads the configuration file. Poll interval, concurrency, retry
    /// policy, labels, the workflow and the log level take effect without
    /// touching running workflows. An invalid file is refused (logged,
    /// and returned) and the running configuration stays.
    pub fn reload(&self) -> Result<(), Error> {
        let mut reloader = self
            .inner
            .reloader
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        reloader.reload(&self.inner.orchestrator).inspect_err(|e| {
            tracing::error!(error = %e, "configuration reload refused; keeping the running configuration");
        })
    }

    /// The orchestrator, for status, retry and cancel.
    pub fn orchestrator(&self) -> &Arc<Orchestrator> {
        &self.inner.orchestrator
    }

    /// The configuration now in force.
    pub fn config(&self) -> Config {
        self.inner
            .reloader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .clone()
    }

    /// Waits until the service has stopped.
    pub async fn wait(&self) -> Result<(), Error> {
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match task {
            Some(task) => task
                .await
                .map_err(|e| Error::Other(format!("the service task failed: {e}")))?,
            None => Err(Error::Other(
                "the service is already being waited for".into(),
            )),
        }
    }
}

/// Applies a changed configuration file to a running service.
#[derive(Debug)]
struct Reloader {
    path: PathBuf,
    current: Config,
    log: Option<LogHandle>,
}

impl Reloader {
    fn reload(&mut self, orchestrator: &Orchestrator) -> Result<(), Error> {
        let new = Config::load(&self.path)?;
        // Everything is built before anything is applied, so a reload
        // takes effect whole or not at all.
        let source = if new.source != self.current.source
            || new.github != self.current.github
            || new.local != self.current.local
        {
            Some(app::issue_source(&new)?)
        } else {
            None
        };
        let runner = if new.workflow != self.current.workflow || new.service != self.current.service
        {
            Some(Arc::new(SubprocessRunner::new(app::subprocess_settings(
                &new,
            )?)))
        } else {
            None
        };
        if let Some(log) = &self.log {
            log.set_level(&new.log.level)
                .map_err(|reason| claude_flow_core::ConfigError::key("log.level", reason))?;
        }
        orchestrator.update_settings(Settings::from_config(&new.service));
        if let Some(source) = source {
            orchestrator.set_source(source);
        }
        if let Some(runner) = runner {
            orchestrator.set_runner(runner);
        }
        for key in restart_only_changes(&self.current, &new) {
            tracing::warn!(key, "this key changed; it takes effect at the next start");
        }
        tracing::info!(config = %self.path.display(), "configuration reloaded");
        self.current = new;
        Ok(())
    }
}

/// Keys a running service cannot change: it holds their resources.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.service.state_dir != new.service.state_dir {
        keys.push("service.state_dir");
    }
    if old.service.listen != new.service.listen {
        keys.push("service.listen");
    }
    if old.service.pid_file != new.service.pid_file {
        keys.push("service.pid_file");
    }
    if old.log.format != new.log.format {
        keys.push("log.format");
    }
    keys
}

impl Daemon {
    /// The PID file, when `service.pid_file` is set.
    pub fn pid_file(&self) -> Option<&Path> {
        self.pid_file.as_ref().map(PidFile::path)
    }
}
