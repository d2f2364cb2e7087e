//! The home page: what runs, what waits, what settled lately, which
//! triggers were ignored, and the timeline of attempts.

use std::time::SystemTime;

use claude_flow_core::api::NodeStatus;
use claude_flow_core::{IssueRecord, IssueStatus, RunningAttempt, Settings, Status};
use maud::{Markup, html};

use super::layout::{
    action_button, elapsed, issue_link, outcome_text, page, span, status_badge, until, when,
};
use super::timeline;

/// Settled issues shown, newest first.
const RECENT: usize = 20;

/// The home page over the orchestrator's status and every record; with
/// several daemons, `nodes` says what each runs.
pub(super) fn render(
    status: &Status,
    settings: &Settings,
    records: &[IssueRecord],
    nodes: &[NodeStatus],
    now: SystemTime,
) -> Markup {
    // With several daemons, what every daemon runs, by node.
    let running: Vec<(Option<&str>, &RunningAttempt)> = if nodes.is_empty() {
        status.running.iter().map(|r| (None, r)).collect()
    } else {
        nodes
            .iter()
            .flat_map(|n| n.running.iter().map(move |r| (Some(n.node.as_str()), r)))
            .collect()
    };
    let capacity = if nodes.is_empty() {
        format!("{} of {}", running.len(), settings.max_concurrent)
    } else {
        format!("{} on {} daemons", running.len(), nodes.len())
    };
    let title_of = |key| {
        records
            .iter()
            .find(|r| r.key() == key)
            .map_or("", |r| r.issue.title.as_str())
    };
    let mut waiting: Vec<&IssueRecord> = records
        .iter()
        .filter(|r| matches!(r.status, IssueStatus::Queued | IssueStatus::Retrying))
        .collect();
    waiting.sort_by_key(|r| (r.next_retry_at, r.updated_at));
    let mut settled: Vec<&IssueRecord> = records.iter().filter(|r| r.status.is_settled()).collect();
    settled.sort_by_key(|r| std::cmp::Reverse(r.updated_at));
    let body = html! {
        (service_state(status, now))
        section #running {
            h2 { "Running " span.count { (capacity) } }
            @if running.is_empty() {
                p.empty { "Nothing runs now." }
            } @else {
                table {
                    thead { tr { th { "issue" } th { "title" } @if !nodes.is_empty() { th { "node" } } th { "round" } th { "attempt" } th { "running for" } th {} } }
                    tbody {
                        @for (node, run) in &running {
                            tr.running {
                                td { (issue_link(&run.issue)) }
                                td.title { (title_of(&run.issue)) }
                                @if let Some(node) = node { td.node { (node) } }
                                td.num { (run.round) }
                                td.num { (run.attempt) " of " (settings.max_attempts) }
                                td { (elapsed(run.started_at, now)) }
                                td { (action_button("Cancel", &super::layout::action_href(&run.issue, "cancel"))) }
                            }
                        }
                    }
                }
            }
        }
        @if !nodes.is_empty() {
            section #daemons {
                h2 { "Daemons " span.count { (nodes.len()) } }
                table {
                    thead { tr { th { "node" } th { "running" } th { "last heartbeat" } th { "up since" } } }
                    tbody {
                        @for n in nodes {
                            tr {
                                td.node {
                                    (n.node)
                                    @if n.node == settings.node { " (this daemon)" }
                                }
                                td.num { (n.running.len()) }
                                td { (elapsed(n.heartbeat_at, now)) " ago" }
                                td { (when(n.started_at, now)) }
                            }
                        }
                    }
                }
            }
        }
        section #waiting {
            h2 { "Waiting " span.count { (waiting.len()) } }
            @if waiting.is_empty() {
                p.empty { "Nothing waits." }
            } @else {
                table {
                    thead { tr { th { "issue" } th { "title" } th { "status" } th { "next" } th { "last error" } th {} } }
                    tbody {
                        @for r in &waiting {
                            tr {
                                td { (issue_link(r.key())) }
                                td.title { (r.issue.title) }
                                td { (status_badge(r.status)) }
                                td { (next_start(r, status, now)) }
                                td.reason { (r.last_error.as_deref().unwrap_or("")) }
                                td { (action_button("Cancel", &super::layout::action_href(r.key(), "cancel"))) }
                            }
                        }
                    }
                }
            }
        }
        section #timeline {
            h2 { "Timeline" }
            (timeline::render(records, status, settings.max_concurrent, now))
        }
        section #settled {
            h2 { "Settled lately" }
            @if settled.is_empty() {
                p.empty { "Nothing has settled yet." }
            } @else {
                table {
                    thead { tr { th { "issue" } th { "title" } th { "status" } th { "when" } th { "result" } } }
                    tbody {
                        @for r in settled.iter().take(RECENT) {
                            tr class=(r.status.as_str()) {
                                td { (issue_link(r.key())) }
                                td.title { (r.issue.title) }
                                td { (status_badge(r.status)) }
                                td { (when(r.updated_at, now)) }
                                td.reason { (result(r, now)) }
                            }
                        }
                    }
                }
            }
        }
        section #skipped {
            h2 { "Skipped triggers " span.count { (status.skipped.len()) } }
            @if status.skipped.is_empty() {
                p.empty { "The last poll ignored no trigger." }
            } @else {
                table {
                    thead { tr { th { "issue" } th { "title" } th { "why it was ignored" } } }
                    tbody {
                        @for s in &status.skipped {
                            tr {
                                td { (s.issue) }
                                td.title { (s.title) }
                                td.reason { (s.reason) }
                            }
                        }
                    }
                }
            }
        }
    };
    page("Service", true, body)
}

/// The banner: a pause (with the button that lifts it), a workflow that
/// cannot start, a failing poll, a stop under way; else the last poll.
fn service_state(status: &Status, now: SystemTime) -> Markup {
    let paused = status.paused_until.filter(|t| *t > now);
    let poll = status.last_poll.as_ref();
    html! {
        @if let Some(t) = paused {
            p.banner.paused {
                "Paused " (until(t, now)) " (until " (when(t, now)) "): "
                (status.pause_reason.as_deref().unwrap_or("no reason recorded"))
                " " (action_button("Resume now", "/api/resume"))
            }
        }
        @if let Some(why) = &status.workflow_unavailable {
            p.banner.failed { "No workflow can start: " (why) }
        }
        @if status.stopping {
            p.banner.paused { "Stopping: no new work; waiting for running workflows." }
        }
        p.poll {
            @match poll {
                None => "No poll has ended yet.",
                Some(p) => {
                    "Last poll " (when(p.at, now)) " (" (span(now.duration_since(p.at).unwrap_or_default())) " ago): "
                    @match (&p.error, p.ready) {
                        (Some(e), _) => span.failed { "failed: " (e) },
                        (None, Some(n)) => { (n) " issue(s) ready" },
                        (None, None) => "ok",
                    }
                    @if status.consecutive_poll_failures > 1 {
                        " (" (status.consecutive_poll_failures) " failures in a row)"
                    }
                }
            }
        }
    }
}

/// When a waiting issue can start, and what holds it.
fn next_start(r: &IssueRecord, status: &Status, now: SystemTime) -> Markup {
    let paused = status.paused_until.filter(|t| *t > now);
    html! {
        @if let Some(t) = r.next_retry_at.filter(|_| r.status == IssueStatus::Retrying) {
            "retry " (until(t, now)) " (" (when(t, now)) ")"
        } @else if let Some(t) = paused {
            "after the pause, " (until(t, now))
        } @else if status.workflow_unavailable.is_some() {
            "when the workflow can start"
        } @else {
            "at the next free slot"
        }
    }
}

/// A settled issue's pull request link, or why it did not get there.
fn result(r: &IssueRecord, now: SystemTime) -> Markup {
    html! {
        @if let Some(url) = &r.pr_url {
            (super::layout::pr_link(url))
        } @else if let Some(attempt) = r.last_attempt() {
            (outcome_text(attempt, now))
        } @else if let Some(e) = &r.last_error {
            (e)
        }
    }
}
