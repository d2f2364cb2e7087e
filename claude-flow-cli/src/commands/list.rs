//! `claude-flow list [--status S] [--skipped]`: the known issues, or the
//! triggers the service ignored.

use claude_flow_core::IssueRecord;
use claude_flow_core::config::Config;
use serde_json::json;

use super::state::ReadState;
use super::{Failure, rfc3339};
use crate::cli::ListArgs;
use crate::out::{self, outln};

/// `claude-flow list`.
pub async fn list(config: &Config, args: &ListArgs) -> Result<(), Failure> {
    let state = ReadState::open(config).await?;
    if args.skipped {
        return skipped(&state, args.json.json).await;
    }
    let wanted = &args.status;
    let records = state.records().await?;
    // The same numbers as `GET /api/issues`.
    let summaries: Vec<_> = records
        .iter()
        .filter(|r| wanted.is_empty() || wanted.contains(&r.status))
        .map(IssueRecord::summary)
        .collect();
    if args.json.json {
        return out::json(&json!(summaries));
    }
    if summaries.is_empty() {
        return if wanted.is_empty() {
            outln!("no issues yet")
        } else {
            outln!("no issues with that status")
        };
    }
    let width = summaries
        .iter()
        .map(|s| s.issue.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let time = |t: Option<std::time::SystemTime>| t.map_or_else(|| "-".to_owned(), rfc3339);
    outln!(
        "{:<width$}  {:<9}  {:>5}  {:>8}  {:<20}  {:<20}  {:<40}  TITLE",
        "ISSUE",
        "STATUS",
        "ROUND",
        "ATTEMPTS",
        "STARTED",
        "NEXT RETRY",
        "PULL REQUEST"
    )?;
    for s in &summaries {
        outln!(
            "{:<width$}  {:<9}  {:>5}  {:>8}  {:<20}  {:<20}  {:<40}  {}",
            s.issue,
            s.status.as_str(),
            s.round,
            s.attempts,
            time(s.started_at),
            time(s.next_retry_at),
            s.pr_url.as_deref().unwrap_or("-"),
            one_line(&s.title)
        )?;
    }
    Ok(())
}

/// `list --skipped`: what the service's last successful poll ignored, as
/// it saved it (so this answers while the service is stopped too).
async fn skipped(state: &ReadState<'_>, json: bool) -> Result<(), Failure> {
    let skipped = state.service().await?.skipped;
    if json {
        return out::json(&serde_json::to_value(&skipped).unwrap_or_default());
    }
    if skipped.is_empty() {
        return outln!("no skipped triggers");
    }
    for s in &skipped {
        outln!("{}  {}", s.issue, one_line(&s.title))?;
        outln!("    skipped: {}", s.reason)?;
    }
    Ok(())
}

/// Text from an issue (attacker-controlled), on one line and harmless to
/// a terminal: line breaks become spaces, other control characters
/// (escape sequences that recolour, retitle or rewrite the screen) are
/// shown as `\u{..}`.
pub(super) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\r' | '\n' | '\t' => " ".to_owned(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// A line of workflow output for a terminal: control characters other
/// than tab shown as `\u{..}`, as in [`one_line`].
pub(super) fn terminal_safe(line: &str) -> String {
    line.chars()
        .map(|c| match c {
            '\t' => "\t".to_owned(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}
