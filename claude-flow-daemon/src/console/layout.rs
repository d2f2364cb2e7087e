//! The page shell every console page shares, and how times, durations
//! and outcomes are written.

use std::time::{Duration, SystemTime};

use claude_flow_core::{Attempt, AttemptOutcome, IssueKey, IssueStatus};
use maud::{DOCTYPE, Markup, html};

/// A whole page: `title` in the tab and the heading, `body` below the
/// navigation. `refresh`: the page reloads itself every few seconds (the
/// script skips it while the operator types).
pub(super) fn page(title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · claude-flow" }
                link rel="stylesheet" href=(super::CSS_PATH);
                script src=(super::JS_PATH) defer {}
            }
            body data-refresh=[refresh.then_some("10")] data-now=(epoch(SystemTime::now())) {
                header {
                    nav {
                        a.brand href="/" { "claude-flow" }
                        span.version { "v" (env!("CARGO_PKG_VERSION")) }
                    }
                    form #token autocomplete="off" {
                        label for="token-input" { "API token" }
                        input #token-input type="password" placeholder="needed for actions";
                        button type="submit" { "Use" }
                        button #token-forget type="button" hidden { "Forget" }
                        span #token-state {}
                    }
                    output #action-result {}
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The console's path of an issue's page.
pub(super) fn issue_href(key: &IssueKey) -> String {
    format!(
        "/issues/{}/{}/{}",
        key.repo.owner(),
        key.repo.name(),
        key.number
    )
}

/// The API's path of an action on an issue (`retry`, `cancel`): the
/// console's pages mirror the API's paths.
pub(super) fn action_href(key: &IssueKey, action: &str) -> String {
    format!("/api{}/{action}", issue_href(key))
}

/// A button the script turns into an authorised `POST` to `path`.
pub(super) fn action_button(label: &str, path: &str) -> Markup {
    html! {
        button.action type="button" data-post=(path) { (label) }
    }
}

/// A link to an issue's page, showing its key.
pub(super) fn issue_link(key: &IssueKey) -> Markup {
    html! { a href=(issue_href(key)) { (key) } }
}

/// `2026-12-02 11:13:28Z`.
pub(super) fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
}

/// `11:13:28` for today (in UTC), the full timestamp otherwise; the full
/// one is always in the tooltip.
pub(super) fn when(t: SystemTime, now: SystemTime) -> Markup {
    let full = timestamp(t);
    let shown = if full.get(..10) == timestamp(now).get(..10) {
        full.get(11..).unwrap_or(&full).to_owned()
    } else {
        full.clone()
    };
    html! { time datetime=(full) title=(full) { (shown) } }
}

/// A duration in whole seconds, e.g. `3m 12s`.
pub(super) fn span(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Time since `t`, which the script keeps counting (`data-since`, epoch
/// seconds; the page's `data-now` is the service's clock, so that a
/// browser whose clock is off still counts right).
pub(super) fn elapsed(t: SystemTime, now: SystemTime) -> Markup {
    html! {
        span.elapsed data-since=(epoch(t)) { (span(now.duration_since(t).unwrap_or_default())) }
    }
}

/// Seconds since 1970, for the script.
fn epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `in 3m 12s` or `due` for a time still to come.
pub(super) fn until(t: SystemTime, now: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(d) if d.as_secs() > 0 => format!("in {}", span(d)),
        _ => "due".to_owned(),
    }
}

/// A status as a coloured badge.
pub(super) fn status_badge(status: IssueStatus) -> Markup {
    html! { span class={ "badge " (status.as_str()) } { (status.as_str()) } }
}

/// One word for how an attempt ended (`running` while it runs), which is
/// also its CSS class.
pub(super) fn outcome_class(attempt: &Attempt) -> &'static str {
    match &attempt.outcome {
        None => "running",
        Some(AttemptOutcome::Succeeded) => "done",
        Some(AttemptOutcome::Failed { .. }) => "failed",
        Some(AttemptOutcome::Cancelled) => "cancelled",
        Some(AttemptOutcome::Interrupted) => "interrupted",
        Some(AttemptOutcome::QuotaExhausted { .. }) => "quota",
    }
}

/// How an attempt ended, in words: the failure's reason, the quota's end.
pub(super) fn outcome_text(attempt: &Attempt, now: SystemTime) -> String {
    match &attempt.outcome {
        None => "running".to_owned(),
        Some(AttemptOutcome::Succeeded) => "succeeded".to_owned(),
        Some(AttemptOutcome::Failed { reason }) => format!("failed: {reason}"),
        Some(AttemptOutcome::Cancelled) => "cancelled".to_owned(),
        Some(AttemptOutcome::Interrupted) => "interrupted (run again, not counted)".to_owned(),
        Some(AttemptOutcome::QuotaExhausted { until: t }) => {
            format!(
                "quota exhausted: paused until {}",
                timestamp(*t).get(11..).unwrap_or("")
            ) + if *t > now { "" } else { " (over)" }
        }
    }
}

/// A pull request's link; only web addresses become links (the URL comes
/// from a workflow's output), anything else shows as text.
pub(super) fn pr_link(url: &str) -> Markup {
    let web = url.starts_with("https://") || url.starts_with("http://");
    html! {
        @if web { a.pr href=(url) rel="noreferrer" { (url) } } @else { (url) }
    }
}
