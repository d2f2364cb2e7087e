//! `claude-flow show <n>`: one issue, every attempt by round, and why each
//! failed attempt failed.

use claude_flow_core::AttemptOutcome;
use claude_flow_core::config::Config;
use claude_flow_core::runner::log_tail;

use super::list::{one_line, terminal_safe};
use super::{Failure, human, record, rfc3339};
use crate::cli::IssueArg;
use crate::out::{self, outln};

/// How much of a failed attempt's log `show` quotes: enough for the usual
/// error message and its context, as the failure comment does.
const FAILED_LOG_LINES: usize = 10;

/// `claude-flow show <n> [--json]`.
pub async fn show(config: &Config, arg: &IssueArg, json: bool) -> Result<(), Failure> {
    let r = record(config, arg).await?;
    let redactor = claude_flow_core::redact::Redactor::from_config(config);
    if json {
        return out::json(&serde_json::to_value(&r).unwrap_or_default());
    }
    outln!("{}  {}", r.key(), one_line(&r.issue.title))?;
    outln!("status:     {} (round {})", r.status, r.round)?;
    if !r.issue.html_url.is_empty() {
        outln!("url:        {}", r.issue.html_url)?;
    }
    outln!("pr:         {}", r.pr_url.as_deref().unwrap_or("-"))?;
    if r.edited_since_approval {
        outln!(
            "text:       changed at the source after approval; this round works on the \
             approved text (apply the trigger label again to approve the new one)"
        )?;
    }
    if let Some(t) = r.pruned_at {
        outln!(
            "files:      workspace and logs removed {} (service.retention)",
            rfc3339(t)
        )?;
    }
    if let Some(t) = r.next_retry_at {
        outln!("next retry: {}", rfc3339(t))?;
    }
    if let Some(e) = &r.last_error {
        outln!("last error: {e}")?;
    }
    if r.attempts.is_empty() {
        outln!("attempts:   none yet")?;
    }
    // Attempts are numbered within their round (CLAUDE_FLOW_ATTEMPT), so
    // they are listed under it.
    let mut round = None;
    for a in &r.attempts {
        if round != Some(a.round) {
            round = Some(a.round);
            let current = if a.round == r.round { " (current)" } else { "" };
            outln!("round {}{current}:", a.round)?;
        }
        let outcome = match &a.outcome {
            None => "running".to_owned(),
            Some(AttemptOutcome::Succeeded) => "succeeded".to_owned(),
            Some(AttemptOutcome::Failed { reason }) => format!("failed ({reason})"),
            Some(AttemptOutcome::Cancelled) => "cancelled".to_owned(),
            Some(AttemptOutcome::Interrupted) => "interrupted".to_owned(),
            Some(AttemptOutcome::QuotaExhausted { until }) => {
                format!("quota_exhausted (until {})", rfc3339(*until))
            }
        };
        outln!(
            "  attempt {:<3} {}  {:>8}  {}{}{}",
            a.number,
            rfc3339(a.started_at),
            human(a.duration()),
            outcome,
            a.node
                .as_ref()
                .map(|n| format!("  on {}", super::list::one_line(n)))
                .unwrap_or_default(),
            a.log_path
                .as_ref()
                .map(|p| format!("  log: {}", p.display()))
                .unwrap_or_default()
        )?;
        if let (Some(AttemptOutcome::Failed { .. }), Some(path)) = (&a.outcome, &a.log_path) {
            let tail = redactor.redact(&log_tail(path, FAILED_LOG_LINES));
            if !tail.is_empty() {
                outln!("    last lines of its log:")?;
                for line in tail.lines() {
                    outln!("    | {}", terminal_safe(line))?;
                }
            }
        }
    }
    Ok(())
}
