//! A small GitHub REST client: authentication, conditional requests,
//! pagination, rate limits and retries, and nothing GitHub-specific beyond
//! that. Requests and answers are JSON; the caller picks the types.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::rate_limit::{self, LimitHeaders, SecondaryBackoff};
use super::wire;
use crate::error::{ConfigError, Error, SourceError};
use crate::secret::Secret;

/// The `X-GitHub-Api-Version` every request asks for.
pub const API_VERSION: &str = "2022-11-28";

/// A safety stop for pagination: 1,000 pages of 100 items.
const MAX_PAGES: usize = 1000;

/// How the GitHub client paces itself. The defaults follow GitHub's
/// documented practice; tests shorten the waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubSettings {
    /// Whole-request timeout (connect, send, read the answer).
    pub timeout: Duration,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// Retries after a server error, timeout, dropped connection,
    /// malformed answer or rate limit, before the request fails.
    pub max_retries: u32,
    /// First wait before retrying a failed request; doubles each time.
    pub retry_base: Duration,
    /// Cap of that wait.
    pub retry_max: Duration,
    /// First wait after a secondary rate limit without `retry-after`
    /// (GitHub asks for at least a minute); doubles each time.
    pub secondary_base: Duration,
    /// Cap of that wait.
    pub secondary_max: Duration,
    /// The longest rate-limit wait the client sits through inside a call.
    /// A longer one fails the call with [`SourceError::RateLimited`]
    /// without sending anything, and so does every call until it passes.
    pub max_wait: Duration,
    /// Pause between mutating requests, which are also sent one at a time
    /// (GitHub: "at least one second between each request").
    pub write_spacing: Duration,
    /// How long a collaborator's permission is trusted before it is asked
    /// again.
    pub permission_ttl: Duration,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl Default for GithubSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_retries: 3,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            secondary_base: Duration::from_secs(60),
            secondary_max: Duration::from_secs(15 * 60),
            max_wait: Duration::from_secs(60),
            write_spacing: Duration::from_secs(1),
            permission_ttl: Duration::from_secs(10 * 60),
            user_agent: format!("claude-flow/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// What a successful request gave.
#[derive(Debug)]
pub(crate) enum Answer<T> {
    /// A body, with what is needed to ask again conditionally.
    Fresh {
        value: T,
        raw: Arc<[u8]>,
        etag: Option<String>,
        next: Option<Url>,
    },
    /// 304: the cached answer still holds.
    NotModified,
}

#[derive(Debug, Clone)]
struct CachedPage {
    etag: String,
    raw: Arc<[u8]>,
    next: Option<Url>,
}

#[derive(Debug, Default)]
struct LimitState {
    /// Nothing is sent before this.
    blocked_until: Option<SystemTime>,
    /// Consecutive secondary limits, for the backoff.
    strikes: u32,
}

/// The REST client. `Debug` shows no token: it lives only in a sensitive
/// header inside the HTTP client.
#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: Url,
    settings: GithubSettings,
    limit: Mutex<LimitState>,
    /// Held for the whole of a mutating request; holds when the last one
    /// ended.
    writes: tokio::sync::Mutex<Option<Instant>>,
    /// ETag and body of the last answer per URL, for conditional requests.
    cache: Mutex<HashMap<String, CachedPage>>,
}

/// The kind of failure a retry loop iteration ended with.
enum Failure {
    Retry(String),
    Fatal(SourceError),
}

impl Client {
    /// A client for `api_url` (`https://api.github.com`, a GitHub
    /// Enterprise `https://HOST/api/v3`, or a test server).
    ///
    /// A bad `api_url` or token is a [`ConfigError`]; a host without CA
    /// root certificates, which the configuration cannot fix, is not.
    pub fn new(api_url: &str, token: &Secret, settings: GithubSettings) -> Result<Self, Error> {
        let bad_url = |reason: String| Error::from(ConfigError::key("github.api_url", reason));
        let mut base =
            Url::parse(api_url).map_err(|e| bad_url(format!("{api_url:?} is not a URL ({e})")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad_url(format!("{api_url:?} is not an http(s) URL")));
        }
        // Endpoints are appended as path segments; a trailing slash would
        // leave an empty one.
        if base.path().ends_with('/') {
            let trimmed = base.path().trim_end_matches('/').to_owned();
            base.set_path(&trimmed);
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.github+json"),
        );
        headers.insert(
            "x-github-api-version",
            HeaderValue::from_static(API_VERSION),
        );
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                bad_url("the GitHub token contains characters not allowed in a header".to_owned())
            })?;
        auth.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, auth);
        let mut builder = reqwest::Client::builder();
        if base.scheme() == "http" {
            // A plain-http API (a test server, an Enterprise behind a
            // local proxy) needs no roots, and redirects are not followed:
            // a host without CA certificates must not stop it.
            builder = builder.tls_certs_only(Vec::new());
        }
        let http = builder
            .user_agent(settings.user_agent.clone())
            .default_headers(headers)
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            // Following a redirect to another host would carry the token
            // there; GitHub's API does not redirect where it matters.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| build_failure(api_url, &e))?;
        Ok(Self {
            http,
            base,
            settings,
            limit: Mutex::new(LimitState::default()),
            writes: tokio::sync::Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn settings(&self) -> &GithubSettings {
        &self.settings
    }

    /// `api_url` with `segments` appended, each percent-encoded.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// GET one resource.
    pub async fn get<T: DeserializeOwned>(&self, url: Url) -> Result<T, SourceError> {
        match self.execute(Method::GET, url, None, None, true).await? {
            Answer::Fresh { value, .. } => Ok(value),
            Answer::NotModified => Err(SourceError::Unavailable {
                what: "GET".into(),
                message: "unexpected 304 to an unconditional request".into(),
            }),
        }
    }

    /// Every item of a paginated list, following `Link: rel="next"` to the
    /// end. With `conditional`, each page is asked with its last ETag.
    pub async fn get_all<T: DeserializeOwned>(
        &self,
        first: Url,
        conditional: bool,
    ) -> Result<Vec<T>, SourceError> {
        let mut items = Vec::new();
        let mut next = Some(first);
        let mut pages = 0;
        while let Some(url) = next {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(SourceError::Rejected {
                    what: format!("GET {}", describe(&url)),
                    status: None,
                    message: format!("more than {MAX_PAGES} pages"),
                });
            }
            let (page, link): (Vec<T>, _) = self.get_page(url, conditional).await?;
            items.extend(page);
            next = link;
        }
        Ok(items)
    }

    async fn get_page<T: DeserializeOwned>(
        &self,
        url: Url,
        conditional: bool,
    ) -> Result<(T, Option<Url>), SourceError> {
        let key = url.as_str().to_owned();
        let cached = if conditional {
            lock(&self.cache).get(&key).cloned()
        } else {
            None
        };
        let etag = cached.as_ref().map(|c| c.etag.clone());
        let what = format!("GET {}", describe(&url));
        match self
            .execute::<T>(Method::GET, url, None, etag.as_deref(), true)
            .await?
        {
            Answer::Fresh {
                value,
                raw,
                etag,
                next,
            } => {
                if let (true, Some(etag)) = (conditional, etag) {
                    let page = CachedPage {
                        etag,
                        raw,
                        next: next.clone(),
                    };
                    lock(&self.cache).insert(key, page);
                }
                Ok((value, next))
            }
            Answer::NotModified => {
                let Some(cached) = cached else {
                    return Err(SourceError::Unavailable {
                        what,
                        message: "304 without a cached answer".into(),
                    });
                };
                let value = parse(&cached.raw).map_err(|message| SourceError::Rejected {
                    what,
                    status: Some(304),
                    message,
                })?;
                Ok((value, cached.next))
            }
        }
    }

    /// A mutating request. `idempotent`: whether sending it twice is
    /// harmless, so that it may be repeated after a timeout or a dropped
    /// connection (adding a label is; posting a comment is not).
    pub async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
        idempotent: bool,
    ) -> Result<T, SourceError> {
        match self.execute(method, url, body, None, idempotent).await? {
            Answer::Fresh { value, .. } => Ok(value),
            Answer::NotModified => Err(SourceError::Unavailable {
                what: "request".into(),
                message: "unexpected 304".into(),
            }),
        }
    }

    async fn execute<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
        etag: Option<&str>,
        idempotent: bool,
    ) -> Result<Answer<T>, SourceError> {
        let what = format!("{method} {}", describe(&url));
        let is_write = method != Method::GET && method != Method::HEAD;
        let mut failures = 0;
        loop {
            self.wait_for_quota(&what).await?;
            let write_guard = if is_write {
                let mut last = self.writes.lock().await;
                if let Some(wait) = last.and_then(|t| {
                    (t + self.settings.write_spacing).checked_duration_since(Instant::now())
                }) {
                    tokio::time::sleep(wait).await;
                }
                // The quota may have run out while this request queued.
                self.wait_for_quota(&what).await?;
                *last = Some(Instant::now());
                Some(last)
            } else {
                None
            };
            let outcome = self
                .attempt::<T>(&method, &url, body, etag, idempotent, &what)
                .await;
            if let Some(mut last) = write_guard {
                *last = Some(Instant::now());
            }
            let message = match outcome {
                Ok(answer) => return Ok(answer),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(message)) => message,
            };
            if failures >= self.settings.max_retries {
                return Err(self.give_up(what, message));
            }
            let wait = self.retry_wait(failures);
            failures += 1;
            tracing::debug!(request = %what, error = %message, retry_in = ?wait, "GitHub request failed; retrying");
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// After the last retry: a rate limit stays a rate limit, so the
    /// caller knows when to come back.
    fn give_up(&self, what: String, message: String) -> SourceError {
        let until = lock(&self.limit).blocked_until;
        match until {
            Some(until) if until > SystemTime::now() => SourceError::RateLimited { what, until },
            _ => SourceError::Unavailable {
                what,
                message: format!(
                    "{message} (gave up after {} tries)",
                    self.settings.max_retries + 1
                ),
            },
        }
    }

    /// One try. Rate-limited answers were not acted on by GitHub, so they
    /// are always retried (after the wait); anything else that may have
    /// reached GitHub is retried only when `idempotent`.
    async fn attempt<T: DeserializeOwned>(
        &self,
        method: &Method,
        url: &Url,
        body: Option<&serde_json::Value>,
        etag: Option<&str>,
        idempotent: bool,
        what: &str,
    ) -> Result<Answer<T>, Failure> {
        let mut request = self.http.request(method.clone(), url.clone());
        if let Some(etag) = etag {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let unavailable = |message: String| {
            Failure::Fatal(SourceError::Unavailable {
                what: what.to_owned(),
                message,
            })
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                let message = transport_error(&e);
                // A request that never connected cannot have been acted on.
                return Err(if idempotent || e.is_connect() {
                    Failure::Retry(message)
                } else {
                    unavailable(message)
                });
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let limits = LimitHeaders::from_headers(&headers);
        let now = SystemTime::now();
        if let Some(until) = rate_limit::exhausted_until(&limits, now) {
            let mut state = lock(&self.limit);
            state.blocked_until = state.blocked_until.max(Some(until));
        }
        tracing::debug!(request = %what, status = status.as_u16(), remaining = ?limits.remaining, "GitHub answered");
        metrics::counter!("claude_flow_github_requests_total", "status" => status.as_u16().to_string())
            .increment(1);
        if let Some(remaining) = limits.remaining {
            metrics::gauge!("claude_flow_github_rate_limit_remaining").set(remaining as f64);
        }
        let raw: Arc<[u8]> = match response.bytes().await {
            Ok(b) => Arc::from(&b[..]),
            Err(e) => {
                let message = format!("HTTP {status}: answer cut short: {}", transport_error(&e));
                return Err(if idempotent {
                    Failure::Retry(message)
                } else {
                    unavailable(message)
                });
            }
        };
        if status == StatusCode::NOT_MODIFIED {
            lock(&self.limit).strikes = 0;
            return Ok(Answer::NotModified);
        }
        if status.is_success() {
            lock(&self.limit).strikes = 0;
            return match parse::<T>(&raw) {
                Ok(value) => Ok(Answer::Fresh {
                    value,
                    etag: headers
                        .get(header::ETAG)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                    next: self.next_link(&headers, what).map_err(Failure::Fatal)?,
                    raw,
                }),
                Err(e) => {
                    let message = format!("HTTP {status}: malformed answer: {e}");
                    Err(if idempotent {
                        Failure::Retry(message)
                    } else {
                        unavailable(message)
                    })
                }
            };
        }
        let message = github_message(&raw);
        let described = format!("HTTP {status}: {message}");
        let code = status.as_u16();
        let limited = {
            let mut state = lock(&self.limit);
            let backoff = SecondaryBackoff {
                base: self.settings.secondary_base,
                max: self.settings.secondary_max,
            };
            let until =
                rate_limit::limited_until(code, &limits, &message, now, state.strikes, backoff);
            if let Some(until) = until {
                state.strikes = state.strikes.saturating_add(1);
                state.blocked_until = state.blocked_until.max(Some(until));
            }
            until
        };
        if let Some(until) = limited {
            tracing::warn!(request = %what, status = code, until = %humantime::format_rfc3339_seconds(until), "GitHub rate limit: sending nothing until then");
            return Err(Failure::Retry(described));
        }
        if status.is_server_error() {
            return Err(if idempotent {
                Failure::Retry(described)
            } else {
                unavailable(described)
            });
        }
        if code == 404 || code == 410 {
            return Err(Failure::Fatal(SourceError::NotFound {
                what: what.to_owned(),
            }));
        }
        Err(Failure::Fatal(SourceError::Rejected {
            what: what.to_owned(),
            status: Some(code),
            message: described,
        }))
    }

    /// Sleeps through a rate-limit pause, or fails at once when the pause
    /// is longer than `max_wait`: a request sent before then must fail, and
    /// requests sent while limited can get an integration banned.
    async fn wait_for_quota(&self, what: &str) -> Result<(), SourceError> {
        loop {
            let until = lock(&self.limit).blocked_until;
            let Some(until) = until else { return Ok(()) };
            let Ok(wait) = until.duration_since(SystemTime::now()) else {
                return Ok(());
            };
            if wait.is_zero() {
                return Ok(());
            }
            if wait > self.settings.max_wait {
                return Err(SourceError::RateLimited {
                    what: what.to_owned(),
                    until,
                });
            }
            tracing::info!(request = %what, wait = ?wait, "waiting for GitHub's rate limit to pass");
            tokio::time::sleep(wait).await;
        }
    }

    /// Exponential, with jitter in the upper half so that several
    /// instances do not retry in step.
    fn retry_wait(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX);
        let full = self
            .settings
            .retry_base
            .saturating_mul(factor)
            .min(self.settings.retry_max);
        let half = full / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// The `rel="next"` link, refused when it leaves the API's origin
    /// (the token would go with it).
    fn next_link(&self, headers: &HeaderMap, what: &str) -> Result<Option<Url>, SourceError> {
        let Some(link) = headers.get(header::LINK).and_then(|v| v.to_str().ok()) else {
            return Ok(None);
        };
        let Some(next) = next_link(link) else {
            return Ok(None);
        };
        let url = self.base.join(next).map_err(|e| SourceError::Rejected {
            what: what.to_owned(),
            status: None,
            message: format!("bad pagination link {next:?}: {e}"),
        })?;
        if url.origin() != self.base.origin() {
            return Err(SourceError::Rejected {
                what: what.to_owned(),
                status: None,
                message: format!(
                    "pagination link leaves {}: {url}",
                    self.base.origin().ascii_serialization()
                ),
            });
        }
        Ok(Some(url))
    }
}

/// The target of `rel="next"` in a `Link` header:
/// `<https://...&page=2>; rel="next", <https://...&page=5>; rel="last"`.
pub(crate) fn next_link(header: &str) -> Option<&str> {
    header.split(',').find_map(|part| {
        let mut pieces = part.split(';');
        let target = pieces.next()?.trim();
        let target = target.strip_prefix('<')?.strip_suffix('>')?;
        let is_next = pieces.any(|p| {
            let p = p.trim();
            p.strip_prefix("rel=")
                .map(|rel| {
                    rel.trim_matches('"')
                        .split_whitespace()
                        .any(|r| r == "next")
                })
                .unwrap_or(false)
        });
        is_next.then_some(target)
    })
}

fn parse<T: DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    // DELETE and some writes answer 204 with no body.
    let raw = if raw.iter().all(u8::is_ascii_whitespace) {
        b"null".as_slice()
    } else {
        raw
    };
    serde_json::from_slice(raw).map_err(|e| e.to_string())
}

/// GitHub's `message`, else the start of the body.
fn github_message(raw: &[u8]) -> String {
    if let Ok(body) = serde_json::from_slice::<wire::ErrorBody>(raw)
        && !body.message.is_empty()
    {
        return body.message;
    }
    let text = String::from_utf8_lossy(raw);
    let text = text.trim();
    if text.is_empty() {
        "(no message)".to_owned()
    } else {
        text.chars().take(200).collect()
    }
}

/// Path and query: what error messages name (the token is in a header,
/// never in the URL).
fn describe(url: &Url) -> String {
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    }
}

fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "connection dropped while reading the answer"
    } else {
        "connection failed"
    };
    // The URL is already in `what`; the source chain says why.
    let mut message = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why the HTTP client for `api_url` could not be built. reqwest only says
/// "builder error"; the usual cause on a minimal host is a missing
/// certificate store, which the operator fixes outside the configuration.
fn build_failure(api_url: &str, error: &reqwest::Error) -> Error {
    if rustls_native_certs::load_native_certs().certs.is_empty() {
        return Error::Other(format!(
            "cannot make https requests to {api_url}: {}",
            missing_roots_message()
        ));
    }
    let mut message = format!("cannot build the HTTP client for {api_url}: {error}");
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        message.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    Error::Other(message)
}

/// Where the platform's roots were looked for, and what to do about it.
fn missing_roots_message() -> String {
    let named: Vec<String> = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .filter_map(|name| {
            let value = std::env::var_os(name)?;
            Some(format!("{name} ({})", value.to_string_lossy()))
        })
        .collect();
    let place = if named.is_empty() {
        "/etc/ssl/certs".to_owned()
    } else {
        named.join(" or ")
    };
    format!(
        "no CA root certificates found in {place}: install the ca-certificates package \
         or set SSL_CERT_FILE to a file of PEM certificates"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_are_found_among_the_others() {
        let h = r#"<https://api.github.com/repositories/1/issues?page=2>; rel="next", <https://api.github.com/repositories/1/issues?page=5>; rel="last""#;
        assert_eq!(
            next_link(h),
            Some("https://api.github.com/repositories/1/issues?page=2")
        );
        let last_page =
            r#"<https://x/issues?page=1>; rel="first", <https://x/issues?page=4>; rel="prev""#;
        assert_eq!(next_link(last_page), None);
        assert_eq!(
            next_link(r#"<https://x/a?page=3>;rel=next"#),
            Some("https://x/a?page=3")
        );
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("garbage; rel=\"next\""), None);
    }

    #[test]
    fn errors_quote_githubs_message() {
        assert_eq!(
            github_message(br#"{"message":"Bad credentials","documentation_url":"https://docs.github.com/rest"}"#),
            "Bad credentials"
        );
        assert_eq!(github_message(b"<html>502</html>"), "<html>502</html>");
        assert_eq!(github_message(b""), "(no message)");
    }

    #[test]
    fn urls_keep_the_enterprise_prefix_and_encode_segments() {
        let token = Secret::new("t");
        let c = Client::new(
            "https://ghe.example/api/v3/",
            &token,
            GithubSettings::default(),
        )
        .unwrap();
        let url = c.url(&["repos", "o", "r", "issues", "1", "labels", "needs review"]);
        assert_eq!(
            url.as_str(),
            "https://ghe.example/api/v3/repos/o/r/issues/1/labels/needs%20review"
        );
        assert!(Client::new("ftp://x", &token, GithubSettings::default()).is_err());
    }

    #[test]
    fn the_client_never_shows_its_token() {
        let token = Secret::new("ghp_supersecret");
        let c = Client::new("https://api.github.com", &token, GithubSettings::default()).unwrap();
        assert!(!format!("{c:?}").contains("supersecret"));
    }
}
