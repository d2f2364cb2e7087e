//! Who sent an issue to the agent, and whether they may.
//!
//! Anyone can open an issue on a public repository, and anyone who can
//! triage can label it; only the most recent application of the trigger
//! label counts, and only when it was made by someone trusted.

use crate::config::Permission;

use super::wire::TimelineEvent;

/// The most recent application of the trigger label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Labeling {
    /// The event's id: identifies this application of the label.
    pub event_id: Option<u64>,
    /// Who applied it (`None`: a deleted account, shown without actor).
    pub actor: Option<String>,
    /// Whether that account is a bot.
    pub actor_is_bot: bool,
    /// When, as GitHub wrote it.
    pub created_at: String,
}

impl Labeling {
    /// The issue's `trigger`: a new application of the label has a new
    /// event, hence a new trigger, hence a new round. The time rides
    /// along so that the round's status comment can be searched from it.
    pub fn trigger(&self) -> String {
        match self.event_id {
            Some(id) => format!("labeled:{id}@{}", self.created_at),
            None => format!("labeled@{}", self.created_at),
        }
    }
}

/// The last `labeled` event for `label` in a timeline (oldest first, as
/// GitHub sends it), skipping the items of other kinds.
pub(crate) fn latest_labeling(events: &[TimelineEvent], label: &str) -> Option<Labeling> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event.as_deref() == Some("labeled"))
        .filter(|(_, e)| {
            e.label
                .as_ref()
                .is_some_and(|l| l.name.eq_ignore_ascii_case(label))
        })
        // RFC 3339 in UTC sorts as text; the position breaks ties.
        .max_by(|(i, a), (j, b)| a.created_at.cmp(&b.created_at).then(i.cmp(j)))
        .map(|(_, e)| Labeling {
            event_id: e.id,
            actor: e.actor.as_ref().map(|a| a.login.clone()),
            actor_is_bot: e.actor.as_ref().is_some_and(super::wire::User::is_bot),
            created_at: e.created_at.clone().unwrap_or_default(),
        })
}

/// The trust rules that need no request. `None`: the permission decides.
pub(crate) fn decide_without_permission(
    labeling: &Labeling,
    allowed_users: &[String],
    own_login: &str,
    required: Permission,
) -> Option<Result<(), String>> {
    let Some(actor) = labeling.actor.as_deref() else {
        return Some(Err("the label was applied by a deleted account".into()));
    };
    if allowed_users.iter().any(|u| u.eq_ignore_ascii_case(actor)) {
        return Some(Ok(()));
    }
    // The service never applies the trigger label itself, so a labeling
    // by its own account came from something else holding the token,
    // such as a workflow given the token: letting that trigger work would
    // let the agent send itself issues.
    if actor.eq_ignore_ascii_case(own_login) {
        return Some(Err(format!(
            "the label was applied by the service's own account {actor} (list it in github.allowed_users to allow this)"
        )));
    }
    if labeling.actor_is_bot {
        return Some(Err(format!(
            "the label was applied by the bot {actor} (bots are trusted only when listed in github.allowed_users)"
        )));
    }
    if required == Permission::None {
        return Some(Ok(()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue_source::github::wire::{Label, User};

    fn event(
        id: u64,
        kind: &str,
        label: Option<&str>,
        actor: Option<&str>,
        at: &str,
    ) -> TimelineEvent {
        TimelineEvent {
            id: Some(id),
            event: Some(kind.into()),
            actor: actor.map(|a| User {
                login: a.into(),
                kind: if a.ends_with("[bot]") { "Bot" } else { "User" }.into(),
            }),
            created_at: Some(at.into()),
            label: label.map(|l| Label { name: l.into() }),
        }
    }

    #[test]
    fn the_latest_labeling_of_the_trigger_counts() {
        let events = vec![
            event(
                1,
                "labeled",
                Some("claude-flow"),
                Some("mallory"),
                "2025-01-01T00:00:00Z",
            ),
            event(
                2,
                "unlabeled",
                Some("claude-flow"),
                Some("alice"),
                "2025-01-02T00:00:00Z",
            ),
            event(
                3,
                "labeled",
                Some("bug"),
                Some("bob"),
                "2025-01-04T00:00:00Z",
            ),
            event(
                4,
                "labeled",
                Some("Claude-Flow"),
                Some("alice"),
                "2025-01-03T00:00:00Z",
            ),
            TimelineEvent {
                id: None,
                event: Some("committed".into()),
                actor: None,
                created_at: None,
                label: None,
            },
        ];
        let l = latest_labeling(&events, "claude-flow").unwrap();
        assert_eq!(l.actor.as_deref(), Some("alice"));
        assert_eq!(l.trigger(), "labeled:4@2025-01-03T00:00:00Z");
        assert_eq!(latest_labeling(&events, "other"), None);
    }

    #[test]
    fn allowed_users_bots_and_the_service_itself() {
        let labeling = |actor: Option<&str>, bot| Labeling {
            event_id: Some(1),
            actor: actor.map(Into::into),
            actor_is_bot: bot,
            created_at: String::new(),
        };
        let allowed = vec!["Renovate[bot]".to_owned(), "carol".to_owned()];
        let decide = |l: &Labeling, p| decide_without_permission(l, &allowed, "cf-bot", p);
        assert_eq!(
            decide(&labeling(Some("renovate[bot]"), true), Permission::Write),
            Some(Ok(()))
        );
        assert!(matches!(
            decide(&labeling(Some("dependabot[bot]"), true), Permission::None),
            Some(Err(_))
        ));
        assert!(matches!(
            decide(&labeling(Some("CF-BOT"), false), Permission::None),
            Some(Err(_))
        ));
        assert!(matches!(
            decide(&labeling(None, false), Permission::None),
            Some(Err(_))
        ));
        assert_eq!(
            decide(&labeling(Some("dave"), false), Permission::None),
            Some(Ok(()))
        );
        assert_eq!(
            decide(&labeling(Some("dave"), false), Permission::Write),
            None
        );
    }
}
