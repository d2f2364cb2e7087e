//! GitHub's JSON, as far as the source reads it.
//!
//! Invariant: these types never leave the `github` module. They are
//! converted into core types ([`Issue`](crate::Issue), [`Permission`]) at
//! its edge, so that nothing else depends on GitHub's wire format. Fields
//! GitHub may omit or send as `null` are `Option` or defaulted, and
//! unknown fields are ignored: GitHub adds fields often.

use serde::Deserialize;

use crate::config::Permission;

/// A user or bot, wherever GitHub embeds one.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct User {
    pub login: String,
    /// `User`, `Bot` or `Organization`.
    #[serde(rename = "type", default)]
    pub kind: String,
}

impl User {
    /// GitHub Apps act as `Bot` accounts named `<app>[bot]`.
    pub fn is_bot(&self) -> bool {
        self.kind.eq_ignore_ascii_case("bot") || self.login.ends_with("[bot]")
    }
}

/// A label as the issues API embeds it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Label {
    pub name: String,
}

/// An issue (or a pull request: the issues API lists both).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Issue {
    pub number: u64,
    pub title: String,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub labels: Vec<Label>,
    pub state: String,
    #[serde(default)]
    pub html_url: String,
    #[serde(default)]
    pub user: Option<User>,
    /// Changes with anything done to the issue, including label changes
    /// and comments.
    #[serde(default)]
    pub updated_at: String,
    /// Present only on pull requests.
    #[serde(default)]
    pub pull_request: Option<serde::de::IgnoredAny>,
}

impl Issue {
    pub fn has_label(&self, name: &str) -> bool {
        // GitHub's label names are unique without regard to case.
        self.labels
            .iter()
            .any(|l| l.name.eq_ignore_ascii_case(name))
    }
}

/// One item of an issue's timeline. The timeline mixes a dozen kinds of
/// items with different shapes (commits have no `id` or `actor`, review
/// threads no `event` time), so everything is optional.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TimelineEvent {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default)]
    pub actor: Option<User>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub label: Option<Label>,
}

/// An issue comment.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Comment {
    pub id: u64,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub user: Option<User>,
}

/// `GET /repos/{o}/{r}/collaborators/{user}/permission`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PermissionAnswer {
    /// `admin`, `write`, `read` or `none`: maintain shows as write and
    /// triage as read.
    pub permission: String,
    /// The real role; custom roles have their own names.
    #[serde(default)]
    pub role_name: Option<String>,
}

impl PermissionAnswer {
    pub fn level(&self) -> Permission {
        self.role_name
            .as_deref()
            .and_then(permission_named)
            .or_else(|| permission_named(&self.permission))
            .unwrap_or(Permission::None)
    }
}

/// GitHub's name for a permission level, if it is one.
pub(crate) fn permission_named(name: &str) -> Option<Permission> {
    Some(match name.to_ascii_lowercase().as_str() {
        "admin" => Permission::Admin,
        "maintain" => Permission::Maintain,
        "write" | "push" => Permission::Write,
        "triage" => Permission::Triage,
        "read" | "pull" => Permission::Read,
        "none" => Permission::None,
        _ => return None,
    })
}

/// `GET /user`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Me {
    pub login: String,
}

/// GitHub's error body.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_role_beats_the_legacy_permission() {
        let answer = |permission: &str, role: Option<&str>| PermissionAnswer {
            permission: permission.into(),
            role_name: role.map(Into::into),
        };
        assert_eq!(
            answer("write", Some("maintain")).level(),
            Permission::Maintain
        );
        assert_eq!(answer("read", Some("triage")).level(), Permission::Triage);
        assert_eq!(
            answer("write", Some("release-manager")).level(),
            Permission::Write
        );
        assert_eq!(answer("admin", None).level(), Permission::Admin);
        assert_eq!(answer("something-new", None).level(), Permission::None);
    }

    #[test]
    fn permissions_are_ordered_weakest_first() {
        use Permission::*;
        let ordered = [None, Read, Triage, Write, Maintain, Admin];
        assert!(ordered.windows(2).all(|w| w[0] < w[1]));
        assert!(Maintain >= Write && Triage < Write);
    }

    #[test]
    fn bots_are_recognised_by_type_or_name() {
        let user = |login: &str, kind: &str| User {
            login: login.into(),
            kind: kind.into(),
        };
        assert!(user("dependabot[bot]", "Bot").is_bot());
        assert!(user("renovate[bot]", "").is_bot());
        assert!(!user("octocat", "User").is_bot());
    }
}
