//! Local issues (CONTRACT section 7): `<dir>/*.md`, one issue per file.
//! `42-fix-login.md` is issue 42 of repository `local/<dir name>`; its
//! title is the first `# ` line and its body the rest. Needs no network:
//! it serves the demo and the tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{IssueSource, Report};
use crate::error::SourceError;
use crate::issue::{Issue, IssueKey, PrScope, RepoId};
use crate::record::Reports;

/// Issues read from Markdown files in a directory. A file is wanted while
/// it exists; the orchestrator's state says whether it is settled.
#[derive(Debug, Clone)]
pub struct LocalSource {
    dir: PathBuf,
    repo: RepoId,
}

impl LocalSource {
    /// A source over `dir`; its repository is `local/<dir name>`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, SourceError> {
        let dir: PathBuf = dir.into();
        let absolute = std::path::absolute(&dir).map_err(|source| SourceError::Io {
            path: dir.clone(),
            source,
        })?;
        // The directory's name, made fit for an `owner/name` id (and for
        // the `local__<name>` directories of workspaces and logs).
        let name: String = absolute
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "issues".into())
            .chars()
            .map(|c| {
                if c.is_whitespace() || matches!(c, '/' | '#' | '\\') {
                    '-'
                } else {
                    c
                }
            })
            .collect();
        let repo = RepoId::new("local", &name).map_err(|e| SourceError::Rejected {
            what: format!("local.dir {}", dir.display()),
            status: None,
            message: e.to_string(),
        })?;
        Ok(Self {
            dir: absolute,
            repo,
        })
    }

    /// The repository id of these issues: `local/<dir name>`.
    pub fn repo(&self) -> &RepoId {
        &self.repo
    }

    /// Reads every issue file now in the directory.
    fn scan(&self) -> Result<BTreeMap<u64, PathBuf>, SourceError> {
        let io = |source| SourceError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut found: BTreeMap<u64, PathBuf> = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_none_or(|e| e != "md") {
                continue;
            }
            let Some(number) = issue_number(&path) else {
                tracing::warn!(file = %path.display(), "ignoring an issue file whose name does not start with a number (expected e.g. 42-fix-login.md)");
                continue;
            };
            if let Some(previous) = found.get(&number) {
                tracing::warn!(
                    number,
                    kept = %previous.display(),
                    ignored = %path.display(),
                    "two issue files have the same number"
                );
                continue;
            }
            found.insert(number, path);
        }
        Ok(found)
    }

    fn read_issue(&self, number: u64, path: &Path) -> Result<Issue, SourceError> {
        let bytes = std::fs::read(path).map_err(|source| SourceError::Io {
            path: path.to_owned(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| SourceError::Rejected {
            what: path.display().to_string(),
            status: None,
            message: "not UTF-8 text".into(),
        })?;
        let (title, body) = split_title(&text);
        let title = title.map(str::to_owned).unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let mut issue = Issue::new(IssueKey::new(self.repo.clone(), number), title);
        issue.body = body;
        issue.html_url = format!("file://{}", path.display());
        issue.pr_scope = PrScope::AnyRepository;
        Ok(issue)
    }
}

/// `42-fix-login.md` → 42; `42.md` → 42.
fn issue_number(path: &Path) -> Option<u64> {
    let stem = path.file_stem()?.to_str()?;
    let digits: &str = &stem[..stem
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(stem.len())];
    let rest = &stem[digits.len()..];
    if digits.is_empty() || !(rest.is_empty() || rest.starts_with(['-', '_', '.', ' '])) {
        return None;
    }
    digits.parse().ok()
}

/// The first `# ` line is the title; the body is everything else, minus
/// the blank lines that separate it from the title.
fn split_title(text: &str) -> (Option<&str>, String) {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if let Some(title) = line.strip_prefix("# ") {
            let title = title.trim_end_matches(['\n', '\r']).trim();
            let before = &text[..offset];
            let mut after = &text[offset + line.len()..];
            while let Some(rest) = after
                .strip_prefix('\n')
                .or_else(|| after.strip_prefix("\r\n"))
            {
                after = rest;
            }
            return (Some(title), format!("{before}{after}"));
        }
        offset += line.len();
    }
    (None, text.to_owned())
}

#[async_trait]
impl IssueSource for LocalSource {
    async fn poll(&self) -> Result<Vec<Issue>, SourceError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut issues = Vec::new();
            for (number, path) in this.scan()? {
                match this.read_issue(number, &path) {
                    Ok(issue) => issues.push(issue),
                    // One unreadable file must not hide the others.
                    Err(e) => tracing::warn!(error = %e, "skipping an unreadable issue file"),
                }
            }
            Ok(issues)
        })
        .await
        .map_err(|e| SourceError::Unavailable {
            what: format!("reading {}", self.dir.display()),
            message: e.to_string(),
        })?
    }

    /// Local issues have nowhere to show progress but the log.
    async fn report(
        &self,
        issue: &Issue,
        report: &Report,
        _reports: &mut Reports,
    ) -> Result<(), SourceError> {
        match report {
            Report::Started(r) => {
                tracing::info!(issue = %issue.key, round = r.round, attempt = r.attempt, "workflow started")
            }
            Report::Succeeded(r) => {
                tracing::info!(issue = %issue.key, pr_url = r.pr_url.as_deref().unwrap_or("none"), "issue done")
            }
            Report::Failed(r) => {
                tracing::warn!(issue = %issue.key, attempts = r.attempts, reason = %r.reason, "issue failed")
            }
            Report::Cancelled(r) => {
                tracing::info!(issue = %issue.key, reason = %r.reason, "issue cancelled")
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_come_from_file_names() {
        assert_eq!(issue_number(Path::new("42-fix-login.md")), Some(42));
        assert_eq!(issue_number(Path::new("7.md")), Some(7));
        assert_eq!(issue_number(Path::new("fix.md")), None);
        assert_eq!(issue_number(Path::new("42fix.md")), None);
    }

    #[test]
    fn the_first_heading_is_the_title_and_the_rest_the_body() {
        assert_eq!(
            split_title("# Fix login\n\nIt fails.\n"),
            (Some("Fix login"), "It fails.\n".to_owned())
        );
        assert_eq!(
            split_title("<!-- x -->\r\n# T\r\nbody\r\n"),
            (Some("T"), "<!-- x -->\r\nbody\r\n".to_owned())
        );
        assert_eq!(split_title("no title"), (None, "no title".to_owned()));
    }

    #[test]
    fn a_directory_name_with_spaces_makes_a_valid_repository() {
        let dir = tempfile::tempdir().unwrap();
        let issues = dir.path().join("my issues");
        std::fs::create_dir(&issues).unwrap();
        assert_eq!(
            LocalSource::new(&issues).unwrap().repo().to_string(),
            "local/my-issues"
        );
    }

    #[tokio::test]
    async fn polls_every_numbered_markdown_file() {
        let dir = tempfile::tempdir().unwrap();
        let issues = dir.path().join("demo");
        std::fs::create_dir(&issues).unwrap();
        std::fs::write(issues.join("2-b.md"), "# Second\nbody two").unwrap();
        std::fs::write(issues.join("10-a.md"), "# Tenth\n").unwrap();
        std::fs::write(issues.join("notes.txt"), "ignored").unwrap();
        std::fs::write(issues.join("readme.md"), "# no number").unwrap();
        let source = LocalSource::new(&issues).unwrap();
        let found = source.poll().await.unwrap();
        let summary: Vec<_> = found
            .iter()
            .map(|i| (i.key.to_string(), i.title.as_str(), i.body.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("local/demo#2".to_owned(), "Second", "body two"),
                ("local/demo#10".to_owned(), "Tenth", "")
            ]
        );
        let numbers = |issues: Vec<Issue>| issues.iter().map(|i| i.key.number).collect::<Vec<_>>();
        std::fs::rename(issues.join("2-b.md"), issues.join("2-renamed.md")).unwrap();
        assert_eq!(
            numbers(source.poll().await.unwrap()),
            [2, 10],
            "a renamed file is the same issue"
        );
        std::fs::remove_file(issues.join("2-renamed.md")).unwrap();
        assert_eq!(numbers(source.poll().await.unwrap()), [10]);
    }
}
