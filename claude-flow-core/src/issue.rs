//! The domain types every part of the orchestrator speaks: repositories,
//! issue keys and issues. Sources convert their wire formats into these at
//! their edge; nothing else in the crate sees a source's own types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A repository, `owner/name`. Local issues use `local/<dir name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoId {
    owner: String,
    name: String,
}

impl RepoId {
    /// Builds a repository id, refusing empty parts and parts with `/`,
    /// `#` or whitespace (they would make keys and paths ambiguous).
    pub fn new(owner: &str, name: &str) -> Result<Self, InvalidRepoId> {
        let ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && !s.contains(['/', '#', '\\'])
                && !s.chars().any(char::is_whitespace)
        };
        if ok(owner) && ok(name) {
            Ok(Self {
                owner: owner.to_owned(),
                name: name.to_owned(),
            })
        } else {
            Err(InvalidRepoId(format!("{owner}/{name}")))
        }
    }

    /// The owner (user or organisation).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The repository name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `owner__name`: the directory name used for this repository's
    /// workspaces and logs.
    pub fn dir_name(&self) -> String {
        format!("{}__{}", self.owner, self.name)
    }

    /// Whether `owner`/`name` name this repository; GitHub compares them
    /// without regard to case.
    pub fn matches(&self, owner: &str, name: &str) -> bool {
        self.owner.eq_ignore_ascii_case(owner) && self.name.eq_ignore_ascii_case(name)
    }
}

/// A string that is not `owner/name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid repository {0:?}: expected \"owner/name\"")]
pub struct InvalidRepoId(pub String);

impl FromStr for RepoId {
    type Err = InvalidRepoId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((owner, name)) => Self::new(owner, name).map_err(|_| InvalidRepoId(s.to_owned())),
            None => Err(InvalidRepoId(s.to_owned())),
        }
    }
}

impl TryFrom<String> for RepoId {
    type Error = InvalidRepoId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RepoId> for String {
    fn from(r: RepoId) -> Self {
        r.to_string()
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// Identifies an issue across sources and restarts: `owner/name#number`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IssueKey {
    /// The repository the issue belongs to.
    pub repo: RepoId,
    /// The issue number within the repository.
    pub number: u64,
}

impl IssueKey {
    /// Builds a key.
    pub fn new(repo: RepoId, number: u64) -> Self {
        Self { repo, number }
    }
}

impl fmt::Display for IssueKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.repo, self.number)
    }
}

impl FromStr for IssueKey {
    type Err = InvalidRepoId;

    /// Parses `owner/name#n`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (repo, number) = s
            .rsplit_once('#')
            .ok_or_else(|| InvalidRepoId(s.to_owned()))?;
        let number = number.parse().map_err(|_| InvalidRepoId(s.to_owned()))?;
        Ok(Self::new(repo.parse()?, number))
    }
}

/// Which pull request URLs in a workflow's output belong to an issue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrScope {
    /// Only pull requests of the issue's own repository (GitHub issues).
    #[default]
    SameRepository,
    /// A pull request of any repository (local issues have no repository
    /// of their own on a forge).
    AnyRepository,
}

/// An issue that a source found ready for work, in the source's own words
/// but in core types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    /// Where the issue lives.
    pub key: IssueKey,
    /// The title, verbatim.
    pub title: String,
    /// The body, verbatim (may be empty).
    #[serde(default)]
    pub body: String,
    /// Label names.
    #[serde(default)]
    pub labels: Vec<String>,
    /// The issue's web URL.
    #[serde(default)]
    pub html_url: String,
    /// Login of the issue's author, when the source knows it.
    #[serde(default)]
    pub author: Option<String>,
    /// Identifies this application of the trigger. A settled issue whose
    /// trigger changes (the label was applied again) starts a new round;
    /// sources without such a notion leave it empty.
    #[serde(default)]
    pub trigger: String,
    /// Which pull request URLs count as this issue's.
    #[serde(default)]
    pub pr_scope: PrScope,
}

impl Issue {
    /// A minimal issue; the remaining fields can be set directly.
    pub fn new(key: IssueKey, title: impl Into<String>) -> Self {
        Self {
            key,
            title: title.into(),
            body: String::new(),
            labels: Vec::new(),
            html_url: String::new(),
            author: None,
            trigger: String::new(),
            pr_scope: PrScope::default(),
        }
    }

    /// The branch a workflow works on: `claude-flow/issue-<n>`.
    pub fn branch(&self) -> String {
        format!("claude-flow/issue-{}", self.key.number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_parse_and_refuse_ambiguous_names() {
        let r: RepoId = "octo/hello-world".parse().unwrap();
        assert_eq!(r.owner(), "octo");
        assert_eq!(r.dir_name(), "octo__hello-world");
        assert!(r.matches("Octo", "Hello-World"));
        for bad in ["octo", "octo/", "/x", "a/b/c", "a b/c", "../x", "a/.."] {
            assert!(bad.parse::<RepoId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn issue_keys_round_trip_through_text() {
        let k: IssueKey = "octo/hello#42".parse().unwrap();
        assert_eq!(k.number, 42);
        assert_eq!(k.to_string(), "octo/hello#42");
        assert!("octo/hello#x".parse::<IssueKey>().is_err());
    }
}
