//! The web console on `service.listen` (CONTRACT section 6, `GET /`): for
//! the operator who would rather look than read.
//!
//! - `GET /`: what runs, what waits, what settled lately, skipped
//!   triggers, and a timeline of attempts ([`home`], [`timeline`]).
//! - `GET /issues/{owner}/{repo}/{n}`: an issue's rounds and attempts, the
//!   end of failed attempts' logs, and the running attempt's log as it
//!   grows ([`issue`]), read from `.../log` ([`live`], server-sent events).
//! - `GET /console/console.js` and `.../console.css`: the only other
//!   resources; nothing is loaded from elsewhere, so it works offline.
//!
//! Reading needs no token, like `GET /api/issues`: a page elsewhere cannot
//! read the answers (no CORS headers) and the `Host` check stops DNS
//! rebinding. The retry, cancel and resume buttons `POST` to the API with
//! the token the operator typed into the page (kept in the tab's
//! `sessionStorage`), which the API checks as for any client.
//!
//! Issue titles, reasons and logs are attacker-controlled: every value
//! goes through maud's escaping, and the Content-Security-Policy allows
//! scripts only from the console's own file, so even a missed escape
//! could run nothing.

mod home;
mod issue;
mod layout;
mod live;
mod timeline;

use std::time::SystemTime;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use claude_flow_core::runner::{attempt_log_path, log_tail};
use claude_flow_core::{IssueKey, IssueRecord, RepoId};
use maud::{Markup, html};

use crate::http::HttpState;

const CSS_PATH: &str = "/console/console.css";
const JS_PATH: &str = "/console/console.js";

/// No resource from anywhere but the service, no inline script or style,
/// no framing, no form posts.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's routes.
pub(crate) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(home))
        .route("/issues/{owner}/{repo}/{number}", get(issue_page))
        .route(
            "/issues/{owner}/{repo}/{number}/rounds/{round}/attempts/{attempt}/log",
            get(log_events),
        )
        .route(JS_PATH, get(script))
        .route(CSS_PATH, get(style))
}

async fn home(State(state): State<HttpState>) -> Response {
    let status = state.orchestrator().status();
    let settings = state.orchestrator().settings();
    let nodes = crate::http::nodes(&**state.store()).await;
    match state.store().list().await {
        Ok(records) => html_page(
            StatusCode::OK,
            home::render(&status, &settings, &records, &nodes, SystemTime::now()),
        ),
        Err(e) => error_page(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

type IssuePath = Result<Path<(String, String, u64)>, PathRejection>;

/// The record an issue page is about, or the page saying why not.
async fn record(state: &HttpState, path: IssuePath) -> Result<IssueRecord, Response> {
    let key = path
        .map_err(|e| e.body_text())
        .and_then(|Path((owner, repo, n))| {
            RepoId::new(&owner, &repo)
                .map(|repo| IssueKey::new(repo, n))
                .map_err(|e| e.to_string())
        })
        .map_err(|e| error_page(StatusCode::BAD_REQUEST, &e))?;
    match state.store().get(&key).await {
        Ok(Some(record)) => Ok(record),
        Ok(None) => Err(error_page(
            StatusCode::NOT_FOUND,
            &format!("{key} is not known to this service"),
        )),
        Err(e) => Err(error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            &e.to_string(),
        )),
    }
}

async fn issue_page(State(state): State<HttpState>, path: IssuePath) -> Response {
    let record = match record(&state, path).await {
        Ok(record) => record,
        Err(page) => return page,
    };
    let wanted: Vec<_> = issue::failed_with_logs(&record)
        .filter_map(|a| Some((a.round, a.number, a.log_path.clone()?)))
        .collect();
    // Log files may be large and on a slow disk: off the async threads.
    let redactor = state.redactor().clone();
    let tails = tokio::task::spawn_blocking(move || {
        wanted
            .into_iter()
            .map(|(round, number, path)| issue::Tail {
                round,
                number,
                text: redactor.redact(&log_tail(&path, issue::TAIL_LINES)),
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    html_page(
        StatusCode::OK,
        issue::render(&record, &tails, SystemTime::now()),
    )
}

type AttemptPath = Result<Path<(String, String, u64, u32, u32)>, PathRejection>;

async fn log_events(
    State(state): State<HttpState>,
    path: AttemptPath,
    headers: HeaderMap,
) -> Response {
    let (issue, round, number) = match path {
        Ok(Path((owner, repo, n, round, number))) => (Ok(Path((owner, repo, n))), round, number),
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let record = match record(&state, issue).await {
        Ok(record) => record,
        Err(page) => return page,
    };
    let Some(attempt) = record
        .attempts
        .iter()
        .find(|a| a.round == round && a.number == number)
    else {
        return error_page(StatusCode::NOT_FOUND, "no such attempt");
    };
    let path = attempt.log_path.clone().or_else(|| {
        let running = attempt.outcome.is_none();
        let dir = state.log_dir().filter(|_| running)?;
        Some(attempt_log_path(dir, record.key(), round, number))
    });
    let Some(path) = path else {
        return error_page(StatusCode::NOT_FOUND, "this attempt has no log");
    };
    let resume_at = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let ended = attempt
        .outcome
        .as_ref()
        .map(|_| layout::outcome_text(attempt, SystemTime::now()));
    let follow = live::Follow {
        orchestrator: state.orchestrator().clone(),
        key: record.key().clone(),
        round,
        attempt: number,
        path,
        resume_at,
        ended,
        redactor: state.redactor().clone(),
    };
    live::stream(follow).into_response()
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("console.js"))
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("console.css"))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// A page with the console's security headers.
fn html_page(code: StatusCode, markup: Markup) -> Response {
    let mut response = (code, markup.into_string()).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn error_page(code: StatusCode, message: &str) -> Response {
    let body = html! {
        p.banner.failed { (message) }
        p { a href="/" { "Back to the service" } }
    };
    html_page(code, layout::page(&code.to_string(), false, body))
}
