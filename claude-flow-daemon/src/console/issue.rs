//! An issue's page: its state, every round and attempt, the running
//! attempt's log as it grows, and the last lines of failed ones.

use std::time::SystemTime;

use claude_flow_core::{Attempt, AttemptOutcome, IssueRecord, IssueStatus};
use maud::{Markup, html};

use super::layout::{
    action_button, action_href, elapsed, issue_href, outcome_class, outcome_text, page, pr_link,
    span, status_badge, until, when,
};

/// Lines shown of a failed attempt's log.
pub(super) const TAIL_LINES: usize = 20;

/// Failed attempts whose log's end is shown (newest first).
pub(super) const TAILS_SHOWN: usize = 5;

/// The failed attempts whose logs' last lines the page shows.
pub(super) fn failed_with_logs(record: &IssueRecord) -> impl Iterator<Item = &Attempt> {
    record
        .attempts
        .iter()
        .rev()
        .filter(|a| {
            matches!(a.outcome, Some(AttemptOutcome::Failed { .. })) && a.log_path.is_some()
        })
        .take(TAILS_SHOWN)
}

/// A failed attempt's log's last lines, as [`failed_with_logs`] lists them.
#[derive(Debug)]
pub(super) struct Tail {
    pub round: u32,
    pub number: u32,
    pub text: String,
}

/// The page of `record`; `tails`: the end of each failed attempt's log.
pub(super) fn render(record: &IssueRecord, tails: &[Tail], now: SystemTime) -> Markup {
    let key = record.key();
    let running = record.attempts.iter().rev().find(|a| a.outcome.is_none());
    let running = running.filter(|_| record.status == IssueStatus::Running);
    let mut rounds: Vec<u32> = record.attempts.iter().map(|a| a.round).collect();
    rounds.dedup();
    rounds.reverse();
    let body = html! {
        p.issue-title { (record.issue.title) }
        dl.facts {
            dt { "status" } dd { (status_badge(record.status)) }
            dt { "round" } dd { (record.round) }
            @if let Some(url) = &record.pr_url {
                dt { "pull request" } dd { (pr_link(url)) }
            }
            @if let Some(t) = record.next_retry_at.filter(|_| record.status == IssueStatus::Retrying) {
                dt { "next retry" } dd { (until(t, now)) " (" (when(t, now)) ")" }
            }
            @if let Some(e) = &record.last_error {
                dt { "last error" } dd.reason { (e) }
            }
            @if record.issue.html_url.starts_with("https://") {
                dt { "at the source" } dd { a href=(record.issue.html_url) rel="noreferrer" { (record.issue.html_url) } }
            }
            dt { "updated" } dd { (when(record.updated_at, now)) }
        }
        p.actions {
            @if record.status != IssueStatus::Running {
                (action_button("Retry", &action_href(key, "retry")))
            }
            @if !record.status.is_settled() {
                (action_button("Cancel", &action_href(key, "cancel")))
            }
        }
        @if let Some(attempt) = running {
            section #live {
                h2 { "Round " (attempt.round) ", attempt " (attempt.number) ": running for " (elapsed(attempt.started_at, now)) }
                pre #live-log.log data-src=(log_href(record, attempt)) {}
                p #live-state.note { "connecting to the log…" }
            }
        }
        section #attempts {
            h2 { "Attempts" }
            @if rounds.is_empty() {
                p.empty { "No attempt yet." }
            }
            @for round in &rounds {
                h3 { "Round " (round) }
                table {
                    thead { tr { th { "attempt" } th { "started" } th { "ended" } th { "duration" } th { "exit" } th { "outcome" } } }
                    tbody {
                        @for a in record.attempts.iter().filter(|a| a.round == *round) {
                            tr class=(outcome_class(a)) {
                                td.num { (a.number) }
                                td { (when(a.started_at, now)) }
                                td { @if let Some(t) = a.finished_at { (when(t, now)) } }
                                td { (span(a.duration())) }
                                td { (exit(a)) }
                                td.reason {
                                    (outcome_text(a, now))
                                    @if let Some(url) = &a.pr_url { " " (pr_link(url)) }
                                }
                            }
                        }
                    }
                }
            }
        }
        @for (i, tail) in tails.iter().enumerate() {
            details.tail open[i == 0] {
                summary { "Last lines of round " (tail.round) ", attempt " (tail.number) " (failed)" }
                pre.log { (tail.text) }
            }
        }
    };
    page(&key.to_string(), false, body)
}

/// Where the page reads `attempt`'s log as it grows.
fn log_href(record: &IssueRecord, attempt: &Attempt) -> String {
    format!(
        "{}/rounds/{}/attempts/{}/log",
        issue_href(record.key()),
        attempt.round,
        attempt.number
    )
}

/// `1`, `signal 9`, or nothing.
fn exit(a: &Attempt) -> String {
    match (a.exit_code, a.signal) {
        (Some(code), _) => code.to_string(),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => String::new(),
    }
}
