//! The service's HTTP API as both sides see it: the JSON bodies, which the
//! daemon serves and the CLI reads, and [`ApiClient`], with which
//! `claude-flow status`, `retry`, `cancel` and `resume` talk to a running
//! service.
//!
//! Endpoints (CONTRACT section 6): `GET /healthz` ([`Health`], 200 or 503),
//! `GET /metrics`, `GET /api/issues` (a list of [`IssueSummary`]),
//! `GET /api/skipped` (the triggers the service ignored, a list of
//! [`SkippedTrigger`]),
//! `POST /api/issues/<owner>/<repo>/<n>/retry|cancel` (an [`IssueSummary`]),
//! `POST /api/resume` ([`Resumed`]), `POST /api/prune[?dry_run=true]`
//! ([`PruneReport`]), `POST /webhook`. Errors come as
//! [`ErrorBody`]. The `POST`s need the API's [`token`].

pub mod token;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::issue::IssueKey;
use crate::issue_source::SkippedTrigger;
use crate::orchestrator::{PollResult, Role, RunningAttempt};
use crate::record::IssueSummary;
use crate::retention::PruneReport;
use crate::secret::Secret;

/// `GET /healthz`: whether the service is healthy, and what it is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` (HTTP 200) or `unavailable` (HTTP 503, with a `reason`).
    pub status: String,
    /// Why the service is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The service's version.
    pub version: String,
    /// The last poll, once there was one.
    pub last_poll: Option<PollResult>,
    /// Polls that failed in a row.
    #[serde(default)]
    pub consecutive_poll_failures: u32,
    /// Running attempts: issue (`owner/name#n`), round, attempt, start.
    pub running: Vec<RunningAttempt>,
    /// How many workflows run.
    pub running_count: usize,
    /// Issues waiting for a slot or a retry.
    #[serde(default)]
    pub waiting: usize,
    /// Issues whose latest state is not shown on the source yet.
    #[serde(default)]
    pub reports_owed: usize,
    /// No workflow starts before this (a quota pause).
    #[serde(default, with = "humantime_serde")]
    pub paused_until: Option<SystemTime>,
    /// Why the service is paused.
    #[serde(default)]
    pub pause_reason: Option<String>,
    /// A graceful stop is under way.
    pub stopping: bool,
    /// With a store several daemons share: this daemon's part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// With a store several daemons share: this daemon's `service.node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// With a store several daemons share: every daemon, with its last
    /// heartbeat and the attempts it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
}

/// One daemon among several sharing a store, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its `service.node`.
    pub node: String,
    /// When it first registered.
    #[serde(with = "humantime_serde")]
    pub started_at: SystemTime,
    /// Its last sign of life.
    #[serde(with = "humantime_serde")]
    pub heartbeat_at: SystemTime,
    /// The attempts it runs.
    pub running: Vec<RunningAttempt>,
}

impl NodeStatus {
    /// Every daemon as `store` lists them, with what each runs: one read
    /// per running attempt, not of every record.
    pub async fn list(
        store: &dyn crate::state::StateStore,
    ) -> Result<Vec<Self>, crate::error::StoreError> {
        let Some(coordination) = store.coordination() else {
            return Ok(Vec::new());
        };
        let nodes = coordination.nodes().await?;
        let mut running = Vec::new();
        for key in nodes.iter().flat_map(|n| &n.running) {
            if let Some(record) = store.get(key).await? {
                running.push(record);
            }
        }
        Ok(Self::of(nodes, &running))
    }

    /// Every daemon as the store lists them, with what each runs (found
    /// in `records`).
    pub fn of(
        nodes: Vec<crate::state::NodeInfo>,
        records: &[crate::record::IssueRecord],
    ) -> Vec<Self> {
        nodes
            .into_iter()
            .map(|n| Self {
                running: n
                    .running
                    .iter()
                    .filter_map(|key| records.iter().find(|r| r.key() == key))
                    .filter_map(|r| {
                        let attempt = r.last_attempt()?;
                        Some(RunningAttempt {
                            issue: r.key().clone(),
                            round: r.round,
                            attempt: attempt.number,
                            started_at: attempt.started_at,
                        })
                    })
                    .collect(),
                node: n.node,
                started_at: n.started_at,
                heartbeat_at: n.heartbeat_at,
            })
            .collect()
    }
}

impl Health {
    /// What [`Health::status`] says when all is well.
    pub const OK: &str = "ok";
    /// What [`Health::status`] says otherwise.
    pub const UNAVAILABLE: &str = "unavailable";

    /// Whether the service said it is healthy.
    pub fn is_ok(&self) -> bool {
        self.status == Self::OK
    }
}

/// `POST /api/resume`: the quota pause that was lifted, if there was one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// When the lifted pause would have ended; `null` when the service was
    /// not paused.
    #[serde(default, with = "humantime_serde")]
    pub lifted_until: Option<SystemTime>,
    /// Why the service was paused.
    #[serde(default)]
    pub pause_reason: Option<String>,
}

impl Resumed {
    /// What an operator is told: `the pause until <time> was lifted` or
    /// `not paused`.
    pub fn describe(&self) -> String {
        match self.lifted_until {
            Some(until) => format!(
                "the pause until {} was lifted",
                humantime::format_rfc3339_seconds(until)
            ),
            None => "not paused".to_owned(),
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

/// A failed call to the service's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// `service.listen` names no address a client can connect to.
    #[error("service.listen: {listen:?} is not an address the HTTP API can be reached at")]
    BadAddress {
        /// The configured value.
        listen: String,
    },
    /// Nothing answered (refused, timed out, reset).
    #[error("cannot reach the service's HTTP API at {url}: {message}")]
    Unreachable {
        /// What was asked.
        url: String,
        /// Why it failed.
        message: String,
    },
    /// The service answered with an error status.
    #[error("{message} (HTTP {status} from {url})")]
    Status {
        /// What was asked.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The service's own message.
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("{url}: unexpected answer: {message}")]
    Invalid {
        /// What was asked.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// The API's token cannot be read ([`token::ApiToken::for_client`]):
    /// typically the service's 0600 file, read by another user.
    #[error(
        "cannot read the HTTP API's token {}{}: {reason}. Run this command as the service's user or as root, or {}",
        path.display(),
        if *generated { "" } else { " (service.api_token_file)" },
        if *generated {
            "set service.api_token_file (for the service and this command) to a file you can read"
        } else {
            "make service.api_token_file readable to you"
        }
    )]
    Token {
        /// The file.
        path: PathBuf,
        /// Whether it is the file the service generates (else the one
        /// `service.api_token_file` names).
        generated: bool,
        /// Why it cannot be read.
        reason: String,
    },
}

/// A client of a running service's HTTP API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: reqwest::Url,
    http: reqwest::Client,
    /// Sent with every `POST` (the reads need none).
    token: Option<Secret>,
}

impl ApiClient {
    /// A client for a service listening on `listen` (`service.listen`). A
    /// wildcard address (`0.0.0.0`, `[::]`) is reached over loopback.
    pub fn for_listen(listen: &str) -> Result<Self, ApiError> {
        let bad = || ApiError::BadAddress {
            listen: listen.to_owned(),
        };
        let authority = match listen.parse::<SocketAddr>() {
            Ok(mut addr) => {
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr.ip() {
                        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                    });
                }
                addr.to_string()
            }
            // A host name, such as `localhost:8787`.
            Err(_) => listen.to_owned(),
        };
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad());
        }
        let base = reqwest::Url::parse(&format!("http://{authority}/")).map_err(|_| bad())?;
        let http = reqwest::Client::builder()
            // The service is local or on the operator's network: a proxy
            // from the environment would only be in the way.
            .no_proxy()
            // Plain http on loopback or the operator's network: loading the
            // platform's CA roots would only make a host without them
            // (a minimal image) unable to reach its own service.
            .tls_certs_only(Vec::new())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ApiError::Unreachable {
                url: base.to_string(),
                message: e.to_string(),
            })?;
        Ok(Self {
            base,
            http,
            token: None,
        })
    }

    /// Sends `token` as `Authorization: Bearer` with each `POST` (retry,
    /// cancel, resume); see [`token::ApiToken::for_client`].
    pub fn with_token(mut self, token: Secret) -> Self {
        self.token = Some(token);
        self
    }

    /// The API's base URL, `http://<listen>/`.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// `GET /healthz`: the service's view of itself, healthy (200) or not (503).
    pub async fn health(&self) -> Result<Health, ApiError> {
        let url = self.url(&["healthz"]);
        let response = self.send(self.http.get(url.clone()), &url).await?;
        let status = response.status();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return read_json(response, &url).await;
        }
        expect_success(response, &url).await
    }

    /// `GET /api/issues`: every issue the service knows.
    pub async fn issues(&self) -> Result<Vec<IssueSummary>, ApiError> {
        let url = self.url(&["api", "issues"]);
        let response = self.send(self.http.get(url.clone()), &url).await?;
        expect_success(response, &url).await
    }

    /// `GET /api/skipped`: the triggers the service's last successful poll
    /// ignored, with the reason.
    pub async fn skipped(&self) -> Result<Vec<SkippedTrigger>, ApiError> {
        let url = self.url(&["api", "skipped"]);
        let response = self.send(self.http.get(url.clone()), &url).await?;
        expect_success(response, &url).await
    }

    /// `POST /api/issues/<owner>/<repo>/<n>/retry`.
    pub async fn retry(&self, key: &IssueKey) -> Result<IssueSummary, ApiError> {
        self.issue_command(key, "retry").await
    }

    /// `POST /api/issues/<owner>/<repo>/<n>/cancel`.
    pub async fn cancel(&self, key: &IssueKey) -> Result<IssueSummary, ApiError> {
        self.issue_command(key, "cancel").await
    }

    /// `POST /api/resume`: ends the service's quota pause, if it has one.
    pub async fn resume(&self) -> Result<Resumed, ApiError> {
        let url = self.url(&["api", "resume"]);
        let response = self.send(self.post(&url), &url).await?;
        expect_success(response, &url).await
    }

    /// `POST /api/prune`: removes the files of issues settled longer ago
    /// than the service's `service.retention`; `dry_run` only says what
    /// that would free.
    pub async fn prune(&self, dry_run: bool) -> Result<PruneReport, ApiError> {
        let mut url = self.url(&["api", "prune"]);
        if dry_run {
            url.set_query(Some("dry_run=true"));
        }
        let response = self.send(self.post(&url), &url).await?;
        expect_success(response, &url).await
    }

    async fn issue_command(&self, key: &IssueKey, verb: &str) -> Result<IssueSummary, ApiError> {
        let number = key.number.to_string();
        let url = self.url(&[
            "api",
            "issues",
            key.repo.owner(),
            key.repo.name(),
            &number,
            verb,
        ]);
        let response = self.send(self.post(&url), &url).await?;
        expect_success(response, &url).await
    }

    /// A `POST` with the token, when there is one. reqwest marks the
    /// header sensitive, so it is not shown in its debug output either.
    fn post(&self, url: &reqwest::Url) -> reqwest::RequestBuilder {
        let request = self.http.post(url.clone());
        match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    /// The base URL with these path segments, each percent-encoded.
    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.clear().extend(segments);
        }
        url
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &reqwest::Url,
    ) -> Result<reqwest::Response, ApiError> {
        request.send().await.map_err(|e| ApiError::Unreachable {
            url: url.to_string(),
            message: error_chain(&e),
        })
    }
}

async fn expect_success<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    url: &reqwest::Url,
) -> Result<T, ApiError> {
    let status = response.status();
    if status.is_success() {
        return read_json(response, url).await;
    }
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| b.error)
        .unwrap_or_else(|_| {
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                text.chars().take(500).collect()
            }
        });
    Err(ApiError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        message,
    })
}

async fn read_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    url: &reqwest::Url,
) -> Result<T, ApiError> {
    let bytes = response.bytes().await.map_err(|e| ApiError::Unreachable {
        url: url.to_string(),
        message: error_chain(&e),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::Invalid {
        url: url.to_string(),
        message: e.to_string(),
    })
}

/// What went wrong, in short: reqwest's own message repeats the URL, and
/// its deepest cause ("Connection refused") is what a person needs.
fn error_chain(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_owned();
    }
    let mut deepest: &dyn std::error::Error = e;
    while let Some(cause) = deepest.source() {
        deepest = cause;
    }
    deepest.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_reached_over_loopback() {
        let url = |l: &str| ApiClient::for_listen(l).map(|c| c.base_url().to_owned());
        assert_eq!(url("127.0.0.1:8787").unwrap(), "http://127.0.0.1:8787/");
        assert_eq!(url("0.0.0.0:80").unwrap(), "http://127.0.0.1/");
        assert_eq!(url("[::]:9000").unwrap(), "http://[::1]:9000/");
        assert_eq!(url("localhost:8787").unwrap(), "http://localhost:8787/");
        assert!(matches!(url(""), Err(ApiError::BadAddress { .. })));
        assert!(matches!(url("a/b"), Err(ApiError::BadAddress { .. })));
    }

    #[test]
    fn resume_answers_say_what_was_lifted() {
        let lifted = Resumed {
            lifted_until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400)),
            pause_reason: Some("quota".into()),
        };
        assert_eq!(
            lifted.describe(),
            "the pause until 1970-01-02T00:00:00Z was lifted"
        );
        let json = serde_json::to_value(&lifted).unwrap();
        assert_eq!(json["lifted_until"], "1970-01-02T00:00:00Z");
        assert_eq!(serde_json::from_value::<Resumed>(json).unwrap(), lifted);
        let none: Resumed = serde_json::from_str(r#"{"lifted_until": null}"#).unwrap();
        assert_eq!(none.describe(), "not paused");
    }

    #[test]
    fn issue_paths_are_percent_encoded() {
        let client = ApiClient::for_listen("127.0.0.1:1").unwrap();
        let key: IssueKey = "local/my%dir?#3".parse().unwrap();
        let number = key.number.to_string();
        let url = client.url(&["api", "issues", key.repo.owner(), key.repo.name(), &number]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:1/api/issues/local/my%25dir%3F/3"
        );
    }
}
