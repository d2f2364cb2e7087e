//! GitHub's webhook deliveries, converted at this edge into
//! [`WebhookEvent`] so that the receiver never sees GitHub's JSON.
//!
//! Verifying the delivery's signature is the receiver's job and comes
//! first: nothing here may be given a body that was not verified.

use serde::Deserialize;

use super::wire;
use crate::error::SourceError;
use crate::issue::{IssueKey, RepoId};

/// A webhook delivery, in core terms.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WebhookEvent {
    /// GitHub checking that the hook works (`ping`).
    Ping,
    /// Something happened to an issue (`issues`).
    Issue(IssueChange),
    /// Any other event, by its `X-GitHub-Event` name.
    Other(String),
}

/// What an `issues` delivery says happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueChange {
    /// The issue.
    pub key: IssueKey,
    /// GitHub's action: `labeled`, `unlabeled`, `closed`, `reopened`, ...
    pub action: String,
    /// The label added or removed (`labeled`, `unlabeled`).
    pub label: Option<String>,
    /// The issue's labels after the change.
    pub labels: Vec<String>,
}

impl IssueChange {
    /// Whether the change can make the issue start or stop being eligible
    /// under `trigger_label`: the trigger added or removed, or an issue
    /// carrying it closed, reopened, deleted or moved away. Whether it is
    /// eligible is not decided here: only a poll, with its trust check,
    /// decides that.
    pub fn concerns(&self, trigger_label: &str) -> bool {
        // GitHub's label names are unique without regard to case.
        let is_trigger = |l: &str| l.eq_ignore_ascii_case(trigger_label);
        match self.action.as_str() {
            "labeled" | "unlabeled" => self.label.as_deref().is_some_and(is_trigger),
            // An edit does not reach a round's workflow (it works on the
            // approved text), but its status comment says so: poll now.
            "closed" | "reopened" | "deleted" | "transferred" | "edited" => {
                self.labels.iter().any(|l| is_trigger(l))
            }
            _ => false,
        }
    }
}

#[derive(Debug, Deserialize)]
struct IssuesPayload {
    action: String,
    issue: wire::Issue,
    #[serde(default)]
    label: Option<wire::Label>,
    repository: Repository,
}

#[derive(Debug, Deserialize)]
struct Repository {
    full_name: String,
}

/// Reads a delivery's body given its `X-GitHub-Event` header. Events other
/// than `issues` and `ping` are not parsed at all.
pub fn parse_webhook(event: &str, body: &[u8]) -> Result<WebhookEvent, SourceError> {
    let rejected = |message: String| SourceError::Rejected {
        what: format!("webhook delivery ({event})"),
        status: None,
        message,
    };
    match event {
        "ping" => Ok(WebhookEvent::Ping),
        "issues" => {
            let payload: IssuesPayload =
                serde_json::from_slice(body).map_err(|e| rejected(e.to_string()))?;
            let repo: RepoId = payload
                .repository
                .full_name
                .parse()
                .map_err(|e: crate::issue::InvalidRepoId| rejected(e.to_string()))?;
            Ok(WebhookEvent::Issue(IssueChange {
                key: IssueKey::new(repo, payload.issue.number),
                action: payload.action,
                label: payload.label.map(|l| l.name),
                labels: payload.issue.labels.into_iter().map(|l| l.name).collect(),
            }))
        }
        other => Ok(WebhookEvent::Other(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn delivery(action: &str, label: Option<&str>, labels: &[&str]) -> Vec<u8> {
        let mut body = json!({
            "action": action,
            "issue": {
                "number": 7, "title": "t", "state": "open",
                "labels": labels.iter().map(|l| json!({"name": l})).collect::<Vec<_>>(),
            },
            "repository": {"full_name": "acme/widgets", "name": "widgets"},
            "sender": {"login": "alice", "type": "User"},
        });
        if let Some(l) = label {
            body["label"] = json!({"name": l, "color": "fff"});
        }
        serde_json::to_vec(&body).unwrap()
    }

    fn change(action: &str, label: Option<&str>, labels: &[&str]) -> IssueChange {
        match parse_webhook("issues", &delivery(action, label, labels)).unwrap() {
            WebhookEvent::Issue(c) => c,
            other => panic!("not an issue change: {other:?}"),
        }
    }

    #[test]
    fn trigger_label_changes_and_closing_concern_the_service() {
        let c = change("labeled", Some("Claude-Flow"), &["claude-flow"]);
        assert_eq!(c.key.to_string(), "acme/widgets#7");
        assert!(c.concerns("claude-flow"));
        assert!(change("unlabeled", Some("claude-flow"), &[]).concerns("claude-flow"));
        assert!(!change("labeled", Some("bug"), &["bug", "claude-flow"]).concerns("claude-flow"));
        assert!(change("closed", None, &["claude-flow"]).concerns("claude-flow"));
        assert!(!change("closed", None, &["bug"]).concerns("claude-flow"));
        // An edit of a triggered issue is polled (the round keeps its
        // approved text; the status comment notes the edit).
        assert!(change("edited", None, &["claude-flow"]).concerns("claude-flow"));
        assert!(!change("edited", None, &["bug"]).concerns("claude-flow"));
    }

    #[test]
    fn other_events_are_not_parsed_and_bad_bodies_are_errors() {
        assert_eq!(parse_webhook("ping", b"{}").unwrap(), WebhookEvent::Ping);
        assert_eq!(
            parse_webhook("push", b"not json").unwrap(),
            WebhookEvent::Other("push".into())
        );
        assert!(parse_webhook("issues", b"{\"action\":1}").is_err());
    }
}
