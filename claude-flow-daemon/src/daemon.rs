//! The service's life cycle: build (configuration, lock, PID file), start
//! (the orchestrator on a task), reload, and stop.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use claude_flow_core::api::token::{self, ApiToken, TokenSource};
use claude_flow_core::logging::{self, LogHandle};
use claude_flow_core::{
    Config, Error, Orchestrator, Settings, StateStore, Status, SubprocessRunner, app,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::PidFile;
use crate::http::{self, HttpState, WebhookConfig};
use crate::notify::Notifier;

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
    /// instance fails with exit code 75), writes the PID file, and with an
    /// HTTP API, settles its token (generating `<state_dir>/api-token`
    /// unless the configuration sets one).
    pub fn build(self) -> Result<Daemon, Error> {
        let config = Config::load(&self.config_path)?;
        let log = if self.init_logging {
            logging::init(&config.log)
        } else {
            None
        };
        let (orchestrator, store) = app::orchestrator(&config)?;
        let pid_file = config
            .service
            .pid_file
            .as_deref()
            .map(PidFile::create)
            .transpose()?;
        // Only now, with the lock held: a second instance, refused above,
        // must not replace the running one's token.
        let api_token = if config.service.listen.is_empty() {
            None
        } else {
            Some(ApiToken::for_service(&config)?)
        };
        Ok(Daemon {
            orchestrator: Arc::new(orchestrator),
            store,
            pid_file,
            reloader: Reloader {
                path: self.config_path,
                current: config,
                log,
                api_token,
            },
        })
    }
}

/// A built service, ready to [`start`](Daemon::start).
pub struct Daemon {
    orchestrator: Arc<Orchestrator>,
    store: Arc<dyn StateStore>,
    pid_file: Option<PidFile>,
    reloader: Reloader,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("orchestrator", &self.orchestrator)
            .field("store", &self.store.guarantees())
            .field("pid_file", &self.pid_file)
            .field("reloader", &self.reloader)
            .finish()
    }
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

    /// Starts the service on the current runtime: the HTTP server on
    /// `service.listen` (when set), systemd notification (when
    /// `NOTIFY_SOCKET` is set), and the orchestrator.
    pub async fn start(self) -> Result<DaemonHandle, Error> {
        let config = &self.reloader.current;
        let shutdown = CancellationToken::new();
        let stopped = CancellationToken::new();
        let http = if config.service.listen.is_empty() {
            None
        } else {
            let listener = http::bind(&config.service.listen)
                .await
                .map_err(|e| Error::Other(e.to_string()))?;
            let store = Arc::clone(&self.store);
            let mut state = HttpState::new(Arc::clone(&self.orchestrator), store)
                .with_webhook(WebhookConfig::from_config(config))
                .with_log_dir(config.service.log_dir())
                .with_redactor(claude_flow_core::redact::Redactor::from_config(config));
            if let Some(token) = &self.reloader.api_token {
                state = state.with_api_token(token.clone());
            }
            if let Some(metrics) = metrics() {
                state = state.with_metrics(metrics.clone());
                tokio::spawn(http::metrics_upkeep(metrics, stopped.clone()));
            }
            let router = http::router(state.clone());
            let server = tokio::spawn(http::serve(listener, router, stopped.clone()));
            Some((state, server))
        };
        let notifier = Notifier::from_env().map(Arc::new);
        if let Some(notifier) = &notifier {
            notifier.status("starting: first poll");
            let stop_budget = config.service.shutdown_grace + config.workflow.kill_grace;
            tokio::spawn(tell_systemd(
                Arc::clone(notifier),
                self.orchestrator.subscribe_status(),
                stop_budget,
                stopped.clone(),
            ));
        }
        let orchestrator = Arc::clone(&self.orchestrator);
        let token = shutdown.clone();
        let pid_file = self.pid_file;
        let (http_state, server) = http.unzip();
        let task = tokio::spawn(async move {
            tracing::info!("claude-flow-daemon started");
            let result = orchestrator.run(token).await;
            // The HTTP server answers (503, "stopping") until workflows
            // are drained, then closes.
            stopped.cancel();
            if let Some(server) = server {
                let _ = server.await;
            }
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
        Ok(DaemonHandle {
            inner: Arc::new(Inner {
                shutdown,
                orchestrator: self.orchestrator,
                reloader: Mutex::new(self.reloader),
                http: http_state,
                notifier,
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

/// The process's metrics recorder: installed by the first service started
/// in this process and shared by any later one (tests start several).
fn metrics() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match http::install_metrics() {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "metrics are off: another recorder is installed");
                None
            }
        })
        .clone()
}

/// Keeps systemd informed from the orchestrator's status: READY once the
/// first poll is done, STATUS as it changes, WATCHDOG only while the
/// scheduler loop's heartbeat moves (so a hung loop is restarted), and
/// STOPPING with time enough to drain the running workflows.
async fn tell_systemd(
    notifier: Arc<Notifier>,
    mut status: tokio::sync::watch::Receiver<Status>,
    stop_budget: Duration,
    stopped: CancellationToken,
) {
    let mut ready = false;
    let mut stopping = false;
    let mut said = String::new();
    let mut last_beat = None;
    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
    loop {
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = status.borrow_and_update().clone();
                // A daemon standing by is up: it takes over when it must.
                if !ready
                    && (now.last_poll.is_some() || now.standby.is_some() || now.role.is_some())
                {
                    notifier.ready();
                    ready = true;
                }
                if now.stopping && !stopping {
                    notifier.stopping();
                    // Margin for the last state writes and the HTTP drain.
                    notifier.extend_timeout(stop_budget + Duration::from_secs(15));
                    stopping = true;
                }
                let text = describe(&now);
                if text != said {
                    notifier.status(&text);
                    said = text;
                }
            }
            _ = async {
                match watchdog.as_mut() {
                    Some(tick) => tick.tick().await,
                    None => std::future::pending().await,
                }
            } => {
                let beat = status.borrow().heartbeat;
                if last_beat != Some(beat) {
                    notifier.watchdog();
                    last_beat = Some(beat);
                }
            }
            () = stopped.cancelled() => return,
        }
    }
}

/// A one-line STATUS= for `systemctl status`. A quota pause comes first:
/// it is why nothing starts, and who reads the line wants to know why.
fn describe(s: &Status) -> String {
    if s.stopping {
        return format!("stopping: {} workflows still running", s.running.len());
    }
    if let Some(why) = &s.standby {
        return why.clone();
    }
    let poll = match &s.last_poll {
        None => "first poll".to_owned(),
        Some(p) => match &p.error {
            Some(e) => format!(
                "last poll failed ({} in a row): {e}",
                s.consecutive_poll_failures
            ),
            None => format!("{} ready at the last poll", p.ready.unwrap_or(0)),
        },
    };
    let paused = s
        .paused_until
        .map(|t| {
            format!(
                "paused until {} (workflow quota; claude-flow resume ends it); ",
                humantime::format_rfc3339_seconds(t)
            )
        })
        .unwrap_or_default();
    format!("{paused}{} workflows running; {poll}", s.running.len())
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
    http: Option<HttpState>,
    notifier: Option<Arc<Notifier>>,
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
    /// policy, labels, the workflow, the log level, the webhook secret and
    /// the API token (`service.api_token_file` is read again) take effect
    /// without touching running workflows. An invalid file is refused (logged,
    /// and returned) and the running configuration stays.
    pub fn reload(&self) -> Result<(), Error> {
        if let Some(notifier) = &self.inner.notifier {
            notifier.reloading();
        }
        let mut reloader = self
            .inner
            .reloader
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let result = reloader.reload(&self.inner.orchestrator);
        match &result {
            Ok(()) => {
                if let Some(http) = &self.inner.http {
                    http.set_webhook(WebhookConfig::from_config(&reloader.current));
                    http.set_api_token(reloader.api_token.clone());
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; keeping the running configuration")
            }
        }
        if let Some(notifier) = &self.inner.notifier {
            notifier.ready();
        }
        result
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
    /// The HTTP API's token; `None` without an HTTP API.
    api_token: Option<ApiToken>,
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
            claude_flow_core::service_dirs::prepare_directories(&new.service)?;
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
        let api_token = match &self.api_token {
            // No HTTP API: service.listen needs a restart anyway.
            None => None,
            Some(current) => Some(self.next_api_token(&new, current)?),
        };
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
        if api_token.is_some() {
            self.api_token = api_token;
        }
        Ok(())
    }

    /// The API token under the `new` configuration: the one it sets (its
    /// file read again, so that a rotated token takes effect), else the
    /// generated one, kept if it is already in use and made now if a
    /// configured one was.
    fn next_api_token(&self, new: &Config, current: &ApiToken) -> Result<ApiToken, Error> {
        if let Some(configured) = ApiToken::configured(new)? {
            if matches!(current.source(), TokenSource::Generated(_)) {
                // The state directory is the running one (a restart-only key).
                token::remove_generated(&self.current.service.state_dir);
            }
            return Ok(configured);
        }
        match current.source() {
            TokenSource::Generated(_) => Ok(current.clone()),
            _ => Ok(token::write_generated(&self.current.service.state_dir)?),
        }
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

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use claude_flow_core::PollResult;

    use super::*;

    #[test]
    fn the_status_line_leads_with_a_pause() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);
        let mut status = Status {
            last_poll: Some(PollResult {
                at,
                duration: Duration::from_millis(5),
                ready: Some(2),
                error: None,
            }),
            ..Status::default()
        };
        assert_eq!(
            describe(&status),
            "0 workflows running; 2 ready at the last poll"
        );
        status.paused_until = Some(at + Duration::from_secs(3600));
        status.pause_reason = Some("quota".into());
        assert_eq!(
            describe(&status),
            "paused until 1970-01-02T01:00:00Z (workflow quota; claude-flow resume ends it); \
             0 workflows running; 2 ready at the last poll"
        );
        status.stopping = true;
        assert_eq!(describe(&status), "stopping: 0 workflows still running");
    }
}
