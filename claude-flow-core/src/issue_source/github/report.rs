//! The status comment's text.
//!
//! One comment per round, edited in place. Its first line is a hidden
//! marker naming the round's trigger and the round's number, so that the
//! comment can be found again after a crash that lost its id, and so that
//! an operator's retry (a new round under the same trigger) gets a comment
//! of its own instead of editing the last round's.

use crate::issue_source::{CancelReport, FailureReport, StartReport, SuccessReport};
use crate::secret::Secret;

/// GitHub refuses comments over 65,536 characters; the log tail is cut
/// well below that.
const MAX_TAIL_CHARS: usize = 20_000;

/// The hidden first line of a round's status comment. It ends with
/// ` -->`, so that `round=1` never matches as a prefix of `round=10`.
pub(crate) fn marker(trigger: &str, round: u32) -> String {
    format!("<!-- claude-flow:status trigger={trigger} round={round} -->")
}

/// What a comment says when the issue's text changed after approval.
pub(crate) const EDITED_NOTE: &str = "The title or body of this issue changed after the trigger label was applied; this round works on the text as it was then. Remove the trigger label and apply it again to approve the new text.";

fn note_edit(mut text: String, edited: bool) -> String {
    if edited {
        text.push_str("\n\n");
        text.push_str(EDITED_NOTE);
    }
    text
}

/// Attempt numbers as the CLI shows them (`CLAUDE_FLOW_ROUND`,
/// `CLAUDE_FLOW_ATTEMPT`), and the failures counted against
/// `service.max_attempts` (an interrupted attempt is numbered but does
/// not count).
pub(crate) fn started(trigger: &str, start: &StartReport) -> String {
    let mut text = format!(
        "{}\n**claude-flow** is working on this issue: round {}, attempt {} (failed attempts so far: {} of {}).",
        marker(trigger, start.round),
        start.round,
        start.attempt,
        start.failures,
        start.max_attempts
    );
    if start.failures > 0 {
        text.push_str(" Trying again.");
    }
    note_edit(text, start.edited_since_approval)
}

pub(crate) fn succeeded(trigger: &str, success: &SuccessReport) -> String {
    let marker = marker(trigger, success.round);
    let text = match &success.pr_url {
        Some(url) => format!("{marker}\n**claude-flow** finished: pull request {url}"),
        None => format!("{marker}\n**claude-flow** finished without opening a pull request."),
    };
    note_edit(text, success.edited_since_approval)
}

pub(crate) fn cancelled(trigger: &str, cancel: &CancelReport, token: &Secret) -> String {
    format!(
        "{}\n**claude-flow** cancelled round {} and stopped working on this issue: {}\n\nApply the trigger label again to start a new round.",
        marker(trigger, cancel.round),
        cancel.round,
        redact(&cancel.reason, token).trim()
    )
}

pub(crate) fn failed(trigger: &str, failure: &FailureReport, token: &Secret) -> String {
    let s = if failure.attempts == 1 { "" } else { "s" };
    let reason = redact(&failure.reason, token);
    let mut text = format!(
        "{}\n**claude-flow** failed after {} attempt{s}: {}",
        marker(trigger, failure.round),
        failure.attempts,
        reason.trim()
    );
    let tail = redact(&failure.log_tail, token);
    let tail = tail.trim_end();
    if !tail.is_empty() {
        let tail = last_chars(tail, MAX_TAIL_CHARS);
        let fence = fence_for(tail);
        text.push_str(&format!(
            "\n\n<details><summary>Last lines of the log</summary>\n\n{fence}text\n{tail}\n{fence}\n</details>"
        ));
    }
    text.push_str("\n\nRemove the trigger label and apply it again to start a new round.");
    note_edit(text, failure.edited_since_approval)
}

/// The token, and anything else shaped like a GitHub token (a workflow
/// may print one it got elsewhere).
pub(crate) fn redact(text: &str, token: &Secret) -> String {
    crate::redact::Redactor::new([token.clone()]).redact(text)
}

/// A code fence longer than any run of backticks in `text`, so that the
/// log cannot end the block early and inject Markdown.
fn fence_for(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    "`".repeat(longest.max(2) + 1)
}

fn last_chars(text: &str, max: usize) -> &str {
    let count = text.chars().count();
    if count <= max {
        return text;
    }
    let skip = count - max;
    let start = text.char_indices().nth(skip).map_or(0, |(i, _)| i);
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_comments_redact_tokens_and_fence_the_log() {
        let token = Secret::new("s3cr3t-token-value");
        let failure = FailureReport {
            edited_since_approval: false,
            round: 2,
            reason: "exit code 1".into(),
            log_tail:
                "using s3cr3t-token-value\nfound ghp_abcdefghijklmnopqrstuvwxyz0123\n````\nend"
                    .into(),
            attempts: 3,
        };
        let text = failed("labeled:1", &failure, &token);
        assert!(text.starts_with("<!-- claude-flow:status trigger=labeled:1 round=2 -->\n"));
        assert!(text.contains("failed after 3 attempts: exit code 1"));
        assert!(!text.contains("s3cr3t"));
        assert!(!text.contains("ghp_abc"));
        assert!(text.contains("using [redacted]"));
        assert!(text.contains("`````text\n"));
    }

    #[test]
    fn start_comments_use_the_clis_numbers() {
        // Attempt 3 of round 2, after one failure and one interruption.
        let start = StartReport {
            edited_since_approval: false,
            round: 2,
            attempt: 3,
            failures: 1,
            max_attempts: 3,
        };
        let text = started("labeled:9", &start);
        assert!(
            text.starts_with("<!-- claude-flow:status trigger=labeled:9 round=2 -->\n"),
            "{text}"
        );
        assert!(text.contains("round 2, attempt 3"), "{text}");
        assert!(text.contains("failed attempts so far: 1 of 3"), "{text}");
        assert!(text.contains("Trying again."), "{text}");
    }

    #[test]
    fn markers_of_different_rounds_are_not_prefixes_of_each_other() {
        assert!(!marker("t", 10).starts_with(&marker("t", 1)));
        assert!(!marker("t", 1).starts_with(&marker("t", 10)));
    }

    #[test]
    fn cancel_comments_say_why_without_secrets() {
        let token = Secret::new("s3cr3t-token-value");
        let cancel = CancelReport {
            round: 4,
            reason: "cancelled by an operator (s3cr3t-token-value)".into(),
            started: true,
        };
        let text = cancelled("labeled:9", &cancel, &token);
        assert!(text.contains("cancelled round 4"), "{text}");
        assert!(text.contains("cancelled by an operator"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn comments_say_when_the_text_changed_after_approval() {
        let mut start = StartReport {
            edited_since_approval: false,
            round: 2,
            attempt: 1,
            failures: 0,
            max_attempts: 3,
        };
        assert!(!started("labeled:9", &start).contains("changed after"));
        start.edited_since_approval = true;
        let text = started("labeled:9", &start);
        assert!(text.ends_with(EDITED_NOTE), "{text}");
        let success = SuccessReport {
            edited_since_approval: true,
            round: 2,
            pr_url: None,
            attempt: 1,
        };
        assert!(succeeded("labeled:9", &success).ends_with(EDITED_NOTE));
    }

    #[test]
    fn long_tails_keep_their_end() {
        let long = "x".repeat(30_000) + "THE END";
        let cut = last_chars(&long, 100);
        assert!(cut.ends_with("THE END") && cut.chars().count() == 100);
    }
}
