//! The service's HTTP side on `service.listen` (CONTRACT section 6).
//!
//! - `GET /` and the pages under it: the web console (see
//!   the `console` module), read-only.
//! - `GET /healthz`: 200 with what the service is doing ([`Health`]); 503
//!   with the same body and a `reason` while it is stopping, after
//!   [`FAILED_POLLS_UNHEALTHY`] polls failed in a row, or when no poll has
//!   ended for three poll intervals (at least [`STALE_FLOOR`]), which means
//!   the loop is stuck. A quota pause is not unhealthy: the service is
//!   doing what it was told. "Stopping" is unhealthy so that a load
//!   balancer or monitor stops sending work to a service on its way out.
//! - `GET /metrics`: Prometheus text, from the recorder [`install_metrics`]
//!   puts in place (404 without one).
//! - `GET /api/issues`: every record, as `claude-flow list --json` prints it.
//! - `GET /api/skipped`: the triggers the last successful poll ignored,
//!   with the reason, as `claude-flow list --skipped --json` prints them.
//! - `POST /api/issues/{owner}/{repo}/{n}/retry` and `.../cancel`: the
//!   orchestrator's [`retry`](Orchestrator::retry) and
//!   [`cancel`](Orchestrator::cancel); 200 with the issue's summary, 404 for
//!   an unknown issue, 409 when its state forbids it, 503 when the
//!   orchestrator is not running.
//! - `POST /api/resume`: the orchestrator's [`resume`](Orchestrator::resume),
//!   which ends a quota pause; 200 with the pause that was lifted
//!   ([`Resumed`](claude_flow_core::api::Resumed), `lifted_until` null when there was none), 503 when the
//!   orchestrator is not running.
//! - `POST /api/prune` (`?dry_run=true` to remove nothing): the
//!   orchestrator's [`prune`](Orchestrator::prune), which removes the
//!   workspaces and logs of issues settled longer ago than
//!   `service.retention`; 200 with what it freed
//!   ([`PruneReport`](claude_flow_core::retention::PruneReport)), 409 when
//!   the retention is `null`, 503 when the orchestrator is not running.
//! - `POST /webhook`: GitHub's webhook, when `github.webhook_secret` is set
//!   (404 otherwise). The `X-Hub-Signature-256` HMAC is checked over the raw
//!   body in constant time before anything else; a delivery without a
//!   valid one gets 401 and has no effect. An `issues` delivery for a
//!   watched repository that adds or removes the trigger label, or closes,
//!   reopens, deletes or transfers an issue carrying it, asks the
//!   orchestrator for a poll at once (202). The delivery itself is never
//!   trusted: the poll is the same as a scheduled one, with the same trust
//!   check, so a forged or replayed delivery can at most cause one cheap
//!   (conditional) poll, and duplicates cannot start anything twice since
//!   only the orchestrator's loop starts attempts. Other events and
//!   actions get 200 with the reason they were ignored, which GitHub shows
//!   in the hook's delivery log.
//!
//! Before any of that, every request passes [`guard`]'s checks, which
//! keep a web page the operator happens to visit from driving the API
//! through the operator's browser:
//!
//! - `Host` (or an absolute request URI's authority) must be a loopback
//!   name or address (`localhost`, `127.0.0.0/8`, `[::1]`, any port) or the
//!   address the connection came in on (the listen address; with a
//!   wildcard listen, the interface's): else 421. A DNS-rebound page
//!   reaches the service under its own host name, so this stops it. Not
//!   on `/webhook`: GitHub sends the public name, and the HMAC decides.
//! - Bodies: [`WEBHOOK_BODY_LIMIT`] on `/webhook`, [`BODY_LIMIT`] elsewhere
//!   (413 beyond, refused by the announced length before anything is
//!   read).
//! - Every `POST` (any method but `GET`/`HEAD`) under `/api/`: an `Origin`
//!   header, when present, must be the service's own (`http://` and the
//!   port the connection came in on, with a loopback host or the address
//!   itself), else 403, since a page elsewhere may still send a simple
//!   `POST` with no body; and `Authorization: Bearer <token>` must carry
//!   the API token ([`ApiToken`]), compared in constant time, else 401
//!   with a body saying where the token is.
//!
//! Reads (the console, `/healthz`, `/metrics`, `GET /api/issues`) need no token: a page
//! elsewhere cannot read their answers (no CORS headers are ever sent),
//! and the `Host` check stops rebinding. Webhooks carry their own
//! signature.

use std::io;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use std::net::{IpAddr, SocketAddr};

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use claude_flow_core::api::token::ApiToken;
use claude_flow_core::api::{ErrorBody, Health, NodeStatus};
use claude_flow_core::config::Config;
use claude_flow_core::issue_source::{WebhookEvent, parse_github_webhook};
use claude_flow_core::{
    Error, IssueKey, IssueRecord, IssueSummary, Orchestrator, RepoId, Role, Secret, StateStore,
    Status,
};
use hmac::{Hmac, KeyInit, Mac};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest request body accepted anywhere but `/webhook`. Nothing else
/// takes a body; a little is tolerated for clients that always send one
/// (`{}`).
pub const BODY_LIMIT: usize = 1024;

/// Largest body accepted on `/webhook`: GitHub's own cap on a payload (25
/// MB), so that every delivery of the events a hook may be set up for is
/// read and answered (a `push` can be large), not recorded by GitHub as a
/// failure. Only a request with a valid-looking signature header is read
/// at all, and a body is held only until its HMAC is checked.
pub const WEBHOOK_BODY_LIMIT: usize = 25 * 1024 * 1024;

/// Polls failing in a row that make `/healthz` answer 503.
pub const FAILED_POLLS_UNHEALTHY: u32 = 3;

/// The least time without a finished poll that makes `/healthz` answer 503,
/// whatever the poll interval: a poll can take tens of seconds (GitHub
/// timeouts and pagination), so short intervals would otherwise flap.
pub const STALE_FLOOR: Duration = Duration::from_secs(60);

/// How long a stopping server waits for requests in flight before it
/// drops their connections.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// What the webhook needs from the configuration.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `github.webhook_secret`.
    pub secret: Secret,
    /// `github.trigger_label`.
    pub trigger_label: String,
    /// `github.repos`: deliveries for other repositories are ignored.
    pub repos: Vec<RepoId>,
}

impl WebhookConfig {
    /// The webhook settings of a configuration; `None` (no `POST /webhook`)
    /// without a secret. An empty secret counts as none: anyone could sign
    /// with it.
    pub fn from_config(config: &Config) -> Option<Self> {
        let secret = config.github.webhook_secret.clone()?;
        if secret.expose().is_empty() {
            return None;
        }
        Some(Self {
            secret,
            trigger_label: config.github.trigger_label.clone(),
            repos: config.github.repos.clone(),
        })
    }
}

/// What the handlers share. Cheap to clone; clones share the webhook
/// settings, so [`set_webhook`](HttpState::set_webhook) on any of them
/// (a configuration reload) takes effect for the running server.
#[derive(Clone)]
pub struct HttpState {
    orchestrator: Arc<Orchestrator>,
    store: Arc<dyn StateStore>,
    webhook: Arc<RwLock<Option<Arc<WebhookConfig>>>>,
    api_token: Arc<RwLock<Option<Arc<ApiToken>>>>,
    metrics: Option<PrometheusHandle>,
    /// `service.log_dir`: where the console finds a running attempt's log.
    log_dir: Option<std::path::PathBuf>,
    /// Takes secrets out of the workflow output the console shows.
    redactor: claude_flow_core::redact::Redactor,
    /// Before the first poll, the health check counts from here.
    since: SystemTime,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("orchestrator", &self.orchestrator)
            .field("webhook", &self.webhook())
            .field("api_token", &self.api_token().map(|t| t.source().clone()))
            .field("metrics", &self.metrics.is_some())
            .finish_non_exhaustive()
    }
}

impl HttpState {
    /// The state for a service built from this orchestrator and the store
    /// it writes to; no webhook, no metrics and no API token until they
    /// are added. Without a token every `POST /api/...` is refused.
    pub fn new(orchestrator: Arc<Orchestrator>, store: Arc<dyn StateStore>) -> Self {
        Self {
            orchestrator,
            store,
            webhook: Arc::default(),
            api_token: Arc::default(),
            metrics: None,
            log_dir: None,
            redactor: claude_flow_core::redact::Redactor::default(),
            since: SystemTime::now(),
        }
    }

    /// Enables `POST /webhook` (with `Some`).
    pub fn with_webhook(self, webhook: Option<WebhookConfig>) -> Self {
        self.set_webhook(webhook);
        self
    }

    /// The token every `POST /api/...` must carry.
    pub fn with_api_token(self, token: ApiToken) -> Self {
        self.set_api_token(Some(token));
        self
    }

    /// Replaces the API token (a configuration reload); `None` refuses
    /// every `POST /api/...`.
    pub fn set_api_token(&self, token: Option<ApiToken>) {
        *self.api_token.write().unwrap_or_else(|e| e.into_inner()) = token.map(Arc::new);
    }

    fn api_token(&self) -> Option<Arc<ApiToken>> {
        self.api_token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves `GET /metrics` from this recorder's handle.
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Replaces the webhook settings (a configuration reload); `None`
    /// disables `POST /webhook`.
    pub fn set_webhook(&self, webhook: Option<WebhookConfig>) {
        *self.webhook.write().unwrap_or_else(|e| e.into_inner()) = webhook.map(Arc::new);
    }

    /// Where workflow logs go (`service.log_dir`), for the console to
    /// follow a running attempt's log, whose record does not name it yet.
    pub fn with_log_dir(mut self, log_dir: std::path::PathBuf) -> Self {
        self.log_dir = Some(log_dir);
        self
    }

    /// The secrets to take out of workflow output the console shows (the
    /// configuration's tokens; GitHub-shaped tokens are taken out anyway).
    pub fn with_redactor(mut self, redactor: claude_flow_core::redact::Redactor) -> Self {
        self.redactor = redactor;
        self
    }

    pub(crate) fn redactor(&self) -> &claude_flow_core::redact::Redactor {
        &self.redactor
    }

    pub(crate) fn log_dir(&self) -> Option<&std::path::Path> {
        self.log_dir.as_deref()
    }

    pub(crate) fn orchestrator(&self) -> &Arc<Orchestrator> {
        &self.orchestrator
    }

    pub(crate) fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    fn webhook(&self) -> Option<Arc<WebhookConfig>> {
        self.webhook
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Histogram buckets, in seconds. Attempts run from seconds to hours
/// (`workflow.timeout` defaults to 2h); polls take from milliseconds (a
/// 304) to a minute (pagination, retries).
const ATTEMPT_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
const POLL_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A Prometheus recorder builder for the service's metrics, with buckets
/// for its duration histograms and no HTTP listener of its own
/// (`GET /metrics` serves it): [`install_metrics`] installs it for the
/// process; a test may build a local recorder from it instead.
pub fn metrics_builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("claude_flow_attempt_duration_seconds".into()),
            ATTEMPT_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("claude_flow_poll_duration_seconds".into()),
            POLL_BUCKETS,
        )
}

/// Installs the process-wide metrics recorder and returns the handle to
/// give [`HttpState::with_metrics`] and [`metrics_upkeep`]. Fails if a
/// recorder is already installed (one per process).
pub fn install_metrics() -> Result<PrometheusHandle, BuildError> {
    let handle = metrics_builder()?.install_recorder()?;
    describe_metrics();
    Ok(handle)
}

/// `# HELP` lines for the metrics the orchestrator and the GitHub source
/// emit, for whoever reads the scrape.
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("claude_flow_workflows_running", "Workflows running now.");
    describe_counter!(
        "claude_flow_attempts_total",
        "Workflow attempts ended, by outcome."
    );
    describe_histogram!(
        "claude_flow_attempt_duration_seconds",
        Unit::Seconds,
        "How long workflow attempts ran."
    );
    describe_counter!(
        "claude_flow_polls_total",
        "Polls of the issue source, by result."
    );
    describe_histogram!(
        "claude_flow_poll_duration_seconds",
        Unit::Seconds,
        "How long polls of the issue source took."
    );
    describe_counter!(
        "claude_flow_github_requests_total",
        "Requests to GitHub's API, by HTTP status."
    );
    describe_gauge!(
        "claude_flow_github_rate_limit_remaining",
        "Requests left in GitHub's rate-limit window, as GitHub last said."
    );
}

/// Keeps the recorder's memory bounded between scrapes (histogram samples
/// pile up until drained) until `shutdown` fires. Spawn it next to the
/// server.
pub async fn metrics_upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => handle.run_upkeep(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// The routes above, over `state`.
pub fn router(state: HttpState) -> Router {
    crate::console::routes()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/issues", get(list_issues))
        .route("/api/skipped", get(list_skipped))
        .route("/api/issues/{owner}/{repo}/{number}/retry", post(retry))
        .route("/api/issues/{owner}/{repo}/{number}/cancel", post(cancel))
        .route("/api/resume", post(resume))
        .route("/api/prune", post(prune))
        .route(
            "/webhook",
            post(webhook).layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT)),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // Outermost, so that it sees every request, unknown paths too.
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Who is on each end of a connection, for [`guard`]: axum puts it in
/// each request's extensions when [`serve`] serves the router.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    /// The address the client connected to: the listen address, or with
    /// a wildcard listen, the interface's.
    pub local: Option<SocketAddr>,
    /// The client's address.
    pub peer: SocketAddr,
}

impl Connected<axum::serve::IncomingStream<'_, TcpListener>> for Connection {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Self {
            local: stream.io().local_addr().ok(),
            peer: *stream.remote_addr(),
        }
    }
}

/// The checks every request passes before its handler (see the module
/// documentation): `Host` (421), body size (413), and for actions under
/// `/api/`, `Origin` (403) and the token (401).
pub async fn guard(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let connection = request
        .extensions()
        .get::<ConnectInfo<Connection>>()
        .map(|c| c.0);
    let local = connection.and_then(|c| c.local);
    let peer = connection.map(|c| c.peer);
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let is_webhook = path == "/webhook";
    let refuse = |code: StatusCode, why: &str, message: String| {
        tracing::warn!(peer = ?peer, %method, path = %path, status = code.as_u16(), "HTTP request refused: {why}");
        failure(code, message)
    };

    if !is_webhook {
        match request_host(&request) {
            Ok(host) if host_is_allowed(host, local) => {}
            Ok(host) => {
                return refuse(
                    StatusCode::MISDIRECTED_REQUEST,
                    "foreign Host",
                    format!(
                        "this service does not answer to the Host {:?}: use a loopback address \
                         (127.0.0.1, [::1], localhost) or the address it listens on \
                         (a page reaching it under another name may be a DNS rebinding attack)",
                        host.unwrap_or_default()
                    ),
                );
            }
            Err(why) => {
                return refuse(StatusCode::MISDIRECTED_REQUEST, why, why.to_owned());
            }
        }
    }

    let limit = if is_webhook {
        WEBHOOK_BODY_LIMIT
    } else {
        BODY_LIMIT
    };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
            format!("request bodies here are limited to {limit} bytes"),
        );
    }

    if path.starts_with("/api/") && !matches!(method, Method::GET | Method::HEAD) {
        if let Some(origin) = request.headers().get(header::ORIGIN)
            && !origin.to_str().is_ok_and(|o| origin_is_own(o, local))
        {
            return refuse(
                StatusCode::FORBIDDEN,
                "foreign Origin",
                format!(
                    "the Origin {:?} is not this service's own: the API takes actions only from \
                     the service's own pages and from clients that send no Origin",
                    String::from_utf8_lossy(origin.as_bytes())
                ),
            );
        }
        let token = state.api_token();
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        let valid = match (&token, presented) {
            (Some(token), Some(presented)) => token.matches(presented.as_bytes()),
            _ => false,
        };
        if !valid {
            let mut response = refuse(
                StatusCode::UNAUTHORIZED,
                if presented.is_some() {
                    "wrong API token"
                } else {
                    "no API token"
                },
                unauthorized_message(token.as_deref()),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"claude-flow\""),
            );
            return response;
        }
    }
    next.run(request).await
}

/// The host a request names: an absolute URI's authority (which, by RFC
/// 9112, wins over `Host`), else the one `Host` header; `None` without
/// either (HTTP/1.0). Several `Host` headers are an error: which one a
/// proxy looked at is anyone's guess.
fn request_host(request: &Request) -> Result<Option<&str>, &'static str> {
    if let Some(authority) = request.uri().authority() {
        return Ok(Some(authority.as_str()));
    }
    let mut hosts = request.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => Ok(None),
        (Some(host), None) => host
            .to_str()
            .map(Some)
            .map_err(|_| "the Host header is not text"),
        (Some(_), Some(_)) => Err("more than one Host header"),
    }
}

/// Whether a request naming `host` is for this service, which a client
/// reached on `local`. No `Host` at all is allowed: every browser sends
/// one, so its absence is no rebinding.
fn host_is_allowed(host: Option<&str>, local: Option<SocketAddr>) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Some((name, _port)) = split_authority(host) else {
        return false;
    };
    is_loopback_name(name) || is_local_address(name, local)
}

/// Whether `origin` is one of the service's own: `http://`, a loopback
/// host or the address the connection came in on, and that port.
fn origin_is_own(origin: &str, local: Option<SocketAddr>) -> bool {
    let Some(local) = local else {
        return false;
    };
    let Some(authority) = origin
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
        .and_then(|_| origin.get(7..))
    else {
        return false;
    };
    let Some((name, port)) = split_authority(authority) else {
        return false;
    };
    port.unwrap_or(80) == local.port()
        && (is_loopback_name(name) || is_local_address(name, Some(local)))
}

/// `host[:port]` or `[v6][:port]` into the host (brackets removed) and
/// the port; `None` for anything else, such as user information, a path,
/// or characters no host name has.
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        v6.parse::<std::net::Ipv6Addr>().ok()?;
        (v6, port)
    } else {
        match authority.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
    };
    let plausible = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    plausible.then_some((name, port))
}

/// `localhost` or a loopback address (`127.0.0.0/8`, `::1`, and
/// `::ffff:127.x.x.x`).
fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Whether `name` is the address the client connected to.
fn is_local_address(name: &str, local: Option<SocketAddr>) -> bool {
    match (name.parse::<IpAddr>(), local) {
        (Ok(ip), Some(local)) => ip.to_canonical() == local.ip().to_canonical(),
        _ => false,
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// What a 401 says: how to send the token and where to find it, never
/// the token itself.
fn unauthorized_message(token: Option<&ApiToken>) -> String {
    let location = match token {
        Some(token) => format!("This service's token: {}.", token.source()),
        None => "This service has no API token, so it takes no actions over HTTP.".to_owned(),
    };
    format!(
        "missing or bad API token: send `Authorization: Bearer <token>`. {location} \
         `claude-flow retry`, `cancel` and `resume` find it themselves (service.api_token, \
         service.api_token_file, else <state_dir>/api-token, which only the service's user and \
         root can read)"
    )
}

/// Binds `service.listen`, with an error that names the key.
pub async fn bind(listen: &str) -> io::Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("service.listen: cannot listen on {listen}: {e}"),
        )
    })
}

/// Serves `router` on `listener` until `shutdown` fires, then lets
/// requests in flight finish for a few seconds before closing.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP API listening");
    }
    let stopped = shutdown.clone();
    let server = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<Connection>(),
    )
    .with_graceful_shutdown(async move { stopped.cancelled().await });
    tokio::select! {
        result = server => result,
        // A client that keeps a request open must not hold up the exit.
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_DRAIN).await;
        } => {
            tracing::warn!("HTTP requests still open after {}s; closing them", SHUTDOWN_DRAIN.as_secs());
            Ok(())
        }
    }
}

/// The health check's verdict on a status: `/healthz`'s body, and whether
/// it is healthy. `since`: when the service started (the first poll's
/// deadline counts from it).
pub fn health(
    status: &Status,
    poll_interval: Duration,
    since: SystemTime,
    now: SystemTime,
) -> Health {
    let stale_after = poll_interval.saturating_mul(3).max(STALE_FLOOR);
    let last_end = status.last_poll.as_ref().map_or(since, |p| p.at);
    let quiet = now.duration_since(last_end).unwrap_or_default();
    // A follower does not poll: the leader's polls are the leader's health.
    let follower = status.role == Some(Role::Follower);
    let reason = if status.stopping {
        Some("stopping: no new work; waiting for running workflows".to_owned())
    } else if let Some(why) = &status.standby {
        Some(why.clone())
    } else if let Some(why) = &status.workflow_unavailable {
        Some(format!("no workflow can start: {why}"))
    } else if follower {
        None
    } else if status.consecutive_poll_failures >= FAILED_POLLS_UNHEALTHY {
        let error = status
            .last_poll
            .as_ref()
            .and_then(|p| p.error.as_deref())
            .unwrap_or("unknown error");
        Some(format!(
            "the last {} polls failed; the last one: {error}",
            status.consecutive_poll_failures
        ))
    } else if quiet > stale_after {
        Some(format!(
            "no poll has ended for {} (poll interval {})",
            humantime::format_duration(Duration::from_secs(quiet.as_secs())),
            humantime::format_duration(poll_interval)
        ))
    } else {
        None
    };
    Health {
        status: if reason.is_some() {
            Health::UNAVAILABLE
        } else {
            Health::OK
        }
        .to_owned(),
        reason,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        last_poll: status.last_poll.clone(),
        consecutive_poll_failures: status.consecutive_poll_failures,
        running: status.running.clone(),
        running_count: status.running.len(),
        waiting: status.waiting,
        reports_owed: status.reports_owed,
        paused_until: status.paused_until,
        pause_reason: status.pause_reason.clone(),
        stopping: status.stopping,
        role: status.role,
        node: None,
        nodes: Vec::new(),
    }
}

/// How long `/healthz` waits for the database's list of daemons before
/// answering without it.
const NODES_WAIT: Duration = Duration::from_secs(2);

/// Every daemon sharing the store, with the attempts each runs; nothing
/// when the store is one daemon's, or does not answer in time.
pub(crate) async fn nodes(store: &dyn StateStore) -> Vec<NodeStatus> {
    tokio::time::timeout(NODES_WAIT, NodeStatus::list(store))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

async fn healthz(State(state): State<HttpState>) -> Response {
    let status = state.orchestrator.status();
    let settings = state.orchestrator.settings();
    let mut body = health(
        &status,
        settings.poll_interval,
        state.since,
        SystemTime::now(),
    );
    if status.role.is_some() {
        body.node = Some(settings.node);
        body.nodes = nodes(&*state.store).await;
    }
    let code = if body.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let Some(handle) = &state.metrics else {
        return failure(StatusCode::NOT_FOUND, "metrics are not enabled");
    };
    // Rendering drains what upkeep would; doing both is harmless.
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

async fn list_issues(State(state): State<HttpState>) -> Response {
    match state.store.list().await {
        Ok(mut records) => {
            records.sort_by(|a, b| a.key().cmp(b.key()));
            let summaries: Vec<IssueSummary> = records.iter().map(IssueRecord::summary).collect();
            axum::Json(summaries).into_response()
        }
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The triggers the last successful poll ignored, as the orchestrator
/// keeps them (and `claude-flow list --skipped --json` prints them).
async fn list_skipped(State(state): State<HttpState>) -> Response {
    axum::Json(state.orchestrator.status().skipped).into_response()
}

type IssuePath = Result<Path<(String, String, u64)>, PathRejection>;

async fn retry(State(state): State<HttpState>, path: IssuePath) -> Response {
    let key = match issue_key(path) {
        Ok(key) => key,
        Err(message) => return failure(StatusCode::BAD_REQUEST, message),
    };
    tracing::info!(issue = %key, "retry asked through the HTTP API");
    answer(state.orchestrator.retry(&key).await)
}

async fn cancel(State(state): State<HttpState>, path: IssuePath) -> Response {
    let key = match issue_key(path) {
        Ok(key) => key,
        Err(message) => return failure(StatusCode::BAD_REQUEST, message),
    };
    tracing::info!(issue = %key, "cancel asked through the HTTP API");
    answer(state.orchestrator.cancel(&key).await)
}

async fn resume(State(state): State<HttpState>) -> Response {
    tracing::info!("resume asked through the HTTP API");
    match state.orchestrator.resume().await {
        Ok(resumed) => axum::Json(resumed).into_response(),
        Err(e) => error_response(e),
    }
}

async fn prune(State(state): State<HttpState>, uri: axum::http::Uri) -> Response {
    let dry_run = match uri.query().unwrap_or("") {
        "" | "dry_run=false" => false,
        "dry_run" | "dry_run=true" => true,
        other => {
            return failure(
                StatusCode::BAD_REQUEST,
                format!("unknown query {other:?}: the only one is dry_run=true"),
            );
        }
    };
    tracing::info!(dry_run, "prune asked through the HTTP API");
    match state.orchestrator.prune(dry_run).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => error_response(e),
    }
}

fn issue_key(path: IssuePath) -> Result<IssueKey, String> {
    let Path((owner, repo, number)) = path.map_err(|e| e.body_text())?;
    let repo = RepoId::new(&owner, &repo).map_err(|e| e.to_string())?;
    Ok(IssueKey::new(repo, number))
}

fn answer(result: Result<IssueRecord, Error>) -> Response {
    match result {
        Ok(record) => axum::Json(record.summary()).into_response(),
        Err(e) => error_response(e),
    }
}

fn error_response(e: Error) -> Response {
    let code = match &e {
        Error::UnknownIssue(_) => StatusCode::NOT_FOUND,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::NotRunning(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    failure(code, e.to_string())
}

fn failure(code: StatusCode, message: impl Into<String>) -> Response {
    (
        code,
        axum::Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// What a webhook delivery led to, for GitHub's delivery log.
#[derive(Debug, Serialize)]
struct WebhookAnswer {
    /// `poll`, `pong` or `ignored`.
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    issue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl WebhookAnswer {
    fn ignored(reason: impl Into<String>) -> Response {
        let answer = Self {
            result: "ignored",
            issue: None,
            reason: Some(reason.into()),
        };
        tracing::debug!(
            reason = answer.reason.as_deref(),
            "webhook delivery ignored"
        );
        (StatusCode::OK, axum::Json(answer)).into_response()
    }
}

async fn webhook(State(state): State<HttpState>, request: Request) -> Response {
    let Some(config) = state.webhook() else {
        return failure(
            StatusCode::NOT_FOUND,
            "webhooks are not enabled: github.webhook_secret is not set",
        );
    };
    let headers = request.headers().clone();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let delivery = text("x-github-delivery").unwrap_or("-");
    // An unsigned delivery is refused before its body is read: up to
    // WEBHOOK_BODY_LIMIT bytes anyone could send.
    let body = if headers.contains_key("x-hub-signature-256") {
        match Bytes::from_request(request, &()).await {
            Ok(body) => body,
            Err(rejection) => return rejection.into_response(),
        }
    } else {
        Bytes::new()
    };
    // First, before anything looks at the body.
    if !signature_is_valid(
        config.secret.expose().as_bytes(),
        text("x-hub-signature-256"),
        &body,
    ) {
        tracing::warn!(
            delivery,
            signed = headers.contains_key("x-hub-signature-256"),
            "webhook delivery refused: missing or bad X-Hub-Signature-256 (is github.webhook_secret the hook's secret?)"
        );
        return failure(
            StatusCode::UNAUTHORIZED,
            "missing or bad X-Hub-Signature-256",
        );
    }
    let event = text("x-github-event").unwrap_or("");
    let change = match parse_github_webhook(event, &body) {
        Ok(WebhookEvent::Issue(change)) => change,
        Ok(WebhookEvent::Ping) => {
            tracing::info!(delivery, "webhook ping");
            let pong = WebhookAnswer {
                result: "pong",
                issue: None,
                reason: None,
            };
            return (StatusCode::OK, axum::Json(pong)).into_response();
        }
        Ok(_) => return WebhookAnswer::ignored(format!("event {event:?} is not acted on")),
        Err(e) => {
            tracing::warn!(delivery, error = %e, "webhook delivery not understood");
            return failure(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let repo = &change.key.repo;
    if !config
        .repos
        .iter()
        .any(|r| r.matches(repo.owner(), repo.name()))
    {
        return WebhookAnswer::ignored(format!("{repo} is not in github.repos"));
    }
    if !change.concerns(&config.trigger_label) {
        return WebhookAnswer::ignored(format!(
            "{} does not concern the trigger label {:?}",
            change.action, config.trigger_label
        ));
    }
    tracing::info!(delivery, issue = %change.key, action = %change.action, "webhook: polling now");
    state.orchestrator.poll_now();
    let answer = WebhookAnswer {
        result: "poll",
        issue: Some(change.key.to_string()),
        reason: None,
    };
    (StatusCode::ACCEPTED, axum::Json(answer)).into_response()
}

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`, compared in constant time.
fn signature_is_valid(secret: &[u8], header: Option<&str>, body: &[u8]) -> bool {
    let Some(signature) = header
        .and_then(|h| h.strip_prefix("sha256="))
        .and_then(|hex| hex::decode(hex.trim()).ok())
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use claude_flow_core::PollResult;

    #[test]
    fn githubs_test_vector_verifies() {
        let secret = b"It's a Secret to Everybody";
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signature_is_valid(secret, Some(good), b"Hello, World!"));
        assert!(!signature_is_valid(secret, Some(good), b"Hello, World?"));
        assert!(!signature_is_valid(
            b"another secret",
            Some(good),
            b"Hello, World!"
        ));
        assert!(!signature_is_valid(
            secret,
            Some(&good[..good.len() - 2]),
            b"Hello, World!"
        ));
        assert!(!signature_is_valid(
            secret,
            Some(&good[7..]),
            b"Hello, World!"
        ));
        assert!(!signature_is_valid(
            secret,
            Some("sha256=zz"),
            b"Hello, World!"
        ));
        assert!(!signature_is_valid(secret, None, b"Hello, World!"));
    }

    #[test]
    fn hosts_and_origins_are_the_services_own_or_refused() {
        let local: SocketAddr = "10.0.0.5:8787".parse().unwrap();
        assert!(host_is_allowed(None, None));
        assert!(host_is_allowed(Some("localhost"), None));
        assert!(host_is_allowed(Some("127.9.9.9:1"), None));
        assert!(host_is_allowed(Some("[::ffff:127.0.0.1]:1"), None));
        assert!(host_is_allowed(Some("10.0.0.5:80"), Some(local)));
        assert!(!host_is_allowed(Some("10.0.0.5"), None));
        assert!(!host_is_allowed(Some("10.0.0.6:8787"), Some(local)));
        assert!(!host_is_allowed(Some("evil.example"), Some(local)));
        for bad in [
            "[::1",
            "::1",
            "[::1]x",
            "localhost:",
            "localhost:x",
            "a b",
            "u@localhost",
        ] {
            assert!(!host_is_allowed(Some(bad), None), "{bad}");
        }

        assert!(origin_is_own("http://10.0.0.5:8787", Some(local)));
        assert!(origin_is_own("HTTP://localhost:8787", Some(local)));
        assert!(origin_is_own("http://[::1]:8787", Some(local)));
        assert!(!origin_is_own("http://localhost:8787", None));
        assert!(!origin_is_own("http://10.0.0.5", Some(local)));
        assert!(!origin_is_own("http://10.0.0.5:8787/", Some(local)));
        assert!(!origin_is_own("https://10.0.0.5:8787", Some(local)));
        assert!(!origin_is_own("http://10.0.0.6:8787", Some(local)));
        assert!(!origin_is_own("http:/", Some(local)));
        let on_80: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert!(origin_is_own("http://127.0.0.1", Some(on_80)));

        assert_eq!(bearer("Bearer  abc "), Some("abc"));
        assert_eq!(bearer("bEaReR abc"), Some("abc"));
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer  "), None);
        assert_eq!(bearer("Basic abc"), None);
    }

    fn poll(at: SystemTime, error: Option<&str>) -> Option<PollResult> {
        Some(PollResult {
            at,
            duration: Duration::from_millis(5),
            ready: error.is_none().then_some(0),
            error: error.map(str::to_owned),
        })
    }

    #[test]
    fn health_turns_bad_after_three_failed_polls_a_stall_or_a_stop() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let interval = Duration::from_secs(300);
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut status = Status::default();
        // Before the first poll, for a while.
        assert!(health(&status, interval, t0, at(60)).is_ok());
        let stalled = health(&status, interval, t0, at(901));
        assert!(!stalled.is_ok());
        assert!(
            stalled
                .reason
                .unwrap()
                .contains("no poll has ended for 15m 1s")
        );

        status.last_poll = poll(at(1000), Some("GET /repos/o/r/issues: HTTP 502"));
        status.consecutive_poll_failures = 2;
        assert!(health(&status, interval, t0, at(1001)).is_ok());
        status.consecutive_poll_failures = 3;
        let failing = health(&status, interval, t0, at(1001));
        assert_eq!(failing.status, "unavailable");
        assert!(failing.reason.unwrap().contains("the last 3 polls failed"));

        status.consecutive_poll_failures = 0;
        status.last_poll = poll(at(1000), None);
        assert!(health(&status, interval, t0, at(1899)).is_ok());
        assert!(!health(&status, interval, t0, at(1901)).is_ok());
        // Short intervals get the floor.
        assert!(health(&status, Duration::from_secs(1), t0, at(1059)).is_ok());

        status.stopping = true;
        let stopping = health(&status, interval, t0, at(1001));
        assert!(stopping.reason.unwrap().starts_with("stopping"));
    }
}
