//! The GitHub source (CONTRACT sections 3 and 5): open issues carrying the
//! trigger label, applied by someone trusted; progress reported with labels
//! and one status comment per round.
//!
//! - `client`: the REST client (auth, ETags, pagination, rate limits,
//!   retries).
//! - `wire`: GitHub's JSON. Invariant: it never leaves this module; issues
//!   and permissions are converted to core types here.
//! - `trust`: who applied the trigger label and whether that counts.
//! - `report`: the status comment's text.
//! - `rate_limit`: reading GitHub's limits and deciding how long to wait.
//! - `webhook`: webhook deliveries, converted to [`WebhookEvent`].
//!
//! Cost of a poll: one conditional request per page of labeled open issues
//! per repository, which is a free 304 when nothing changed. An issue's
//! timeline (and, at most once per [`GithubSettings::permission_ttl`], the
//! labeler's permission) is read only when the issue has changed since it
//! was last examined; [`EXAMINE_CONCURRENCY`] issues are examined at once,
//! so that the first poll of a repository with hundreds of labeled issues
//! does not take hundreds of round trips one after another.
//!
//! Reports (CONTRACT section 5) write in an order chosen for whoever
//! watches the issue: a settled round's `done` or `failed` label is its
//! last write, so the status comment is final by the time it appears.
//! Every write is idempotent (labels; the comment is edited in place and
//! found again by its marker), so a report that failed halfway is simply
//! made again; the memo records only what is complete.

mod client;
mod rate_limit;
mod report;
mod trust;
mod webhook;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use reqwest::{Method, Url};
use serde_json::json;

use crate::config::{Config, GithubConfig, Permission};
use crate::error::{ConfigError, Error, SourceError};
use crate::issue::{Issue, IssueKey, PrScope, RepoId};
use crate::issue_source::{
    CancelReport, FailureReport, IssueSource, Report, SkippedTrigger, StartReport, SuccessReport,
};
use crate::record::Reports;
use crate::secret::Secret;

pub use client::{API_VERSION, GithubSettings};
pub use webhook::{IssueChange, WebhookEvent, parse_webhook};

// `Reports::memo` keys. The memo is kept with the issue's record for the
// round (the orchestrator resets it when a new round starts), so that a
// report repeated after a crash does not act twice. A key is written only
// once the writes it stands for have all gone through: a report that
// failed halfway is made again from where the memo says. The names are
// those earlier versions wrote, so that their records still read right.

/// The start labels of this round are set.
const MEMO_LABELS_STARTED: &str = "github.labels_started";
/// The id of this round's status comment.
const MEMO_COMMENT_ID: &str = "github.comment_id";
/// What the status comment shows: `started attempt=… failures=… max=…`,
/// `succeeded`, `failed` or `cancelled`.
const MEMO_COMMENT_SHOWS: &str = "github.comment_shows";
/// The settled report that was made completely: `succeeded`, `failed` or
/// `cancelled`.
const MEMO_OUTCOME: &str = "github.outcome";

/// How many issues a poll examines at once (timeline and permission
/// requests). GitHub allows up to 100 concurrent requests per token; a few
/// are plenty, and leave room for the reporter's writes.
const EXAMINE_CONCURRENCY: usize = 8;

/// Issues of GitHub repositories.
#[derive(Debug)]
pub struct GithubSource {
    client: client::Client,
    config: GithubConfig,
    token: Secret,
    /// The login the token belongs to; `Some("")` when the token cannot
    /// say (GitHub App installation tokens).
    own_login: tokio::sync::OnceCell<String>,
    /// Per issue: the decision made when it was last examined.
    verdicts: Mutex<HashMap<IssueKey, Verdict>>,
    /// Per repository and login: the permission, and when it was read.
    /// Each entry has its own async lock, held while it is asked, so that
    /// issues examined at once that share a labeler ask only once.
    permissions: Mutex<HashMap<(RepoId, String), Arc<PermissionSlot>>>,
}

/// One cached permission: empty until asked.
type PermissionSlot = tokio::sync::Mutex<Option<(Permission, Instant)>>;

#[derive(Debug, Clone)]
struct Verdict {
    /// The issue's `updated_at` when examined: any change (a new label, a
    /// comment) moves it, and only then is the issue examined again.
    updated_at: String,
    /// `Ok(trigger)` when trusted, else why not.
    trigger: Result<String, String>,
    /// The title, to show a skipped trigger.
    title: String,
}

impl GithubSource {
    /// The source `config` describes, with the token from `github.token`,
    /// `github.token_file` or `GITHUB_TOKEN`, and default pacing.
    pub fn from_config(config: &Config) -> Result<Self, Error> {
        let token = config.github_token()?.ok_or_else(|| {
            ConfigError::key(
                "github.token",
                "required for source \"github\": set github.token, github.token_file or GITHUB_TOKEN",
            )
        })?;
        Self::new(&config.github, token, GithubSettings::default())
    }

    /// A source for `config` authenticating with `token`.
    pub fn new(
        config: &GithubConfig,
        token: Secret,
        settings: GithubSettings,
    ) -> Result<Self, Error> {
        if config.repos.is_empty() {
            return Err(ConfigError::key(
                "github.repos",
                "required when source is \"github\" (a list of \"owner/name\")",
            )
            .into());
        }
        let client = client::Client::new(&config.api_url, &token, settings)?;
        Ok(Self {
            client,
            config: config.clone(),
            token,
            own_login: tokio::sync::OnceCell::new(),
            verdicts: Mutex::new(HashMap::new()),
            permissions: Mutex::new(HashMap::new()),
        })
    }

    fn repo_url(&self, repo: &RepoId, rest: &[&str]) -> Url {
        let mut segments = vec!["repos", repo.owner(), repo.name()];
        segments.extend_from_slice(rest);
        self.client.url(&segments)
    }

    fn issue_url(&self, key: &IssueKey, rest: &[&str]) -> Url {
        let number = key.number.to_string();
        let mut segments = vec!["issues", number.as_str()];
        segments.extend_from_slice(rest);
        self.repo_url(&key.repo, &segments)
    }

    /// The service's own login, asked once.
    async fn own_login(&self) -> Result<&str, SourceError> {
        let login = self
            .own_login
            .get_or_try_init(|| async {
                match self.client.get::<wire::Me>(self.client.url(&["user"])).await {
                    Ok(me) => Ok(me.login),
                    // Installation tokens may not read /user; they act as a
                    // bot account, which is never trusted unless listed.
                    Err(SourceError::Rejected {
                        status: Some(403), ..
                    }) => {
                        tracing::info!("the GitHub token cannot read GET /user; assuming an app installation token");
                        Ok(String::new())
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(login)
    }

    /// The trigger of a listed issue when its labeler is trusted.
    async fn trusted_trigger(
        &self,
        key: &IssueKey,
        issue: &wire::Issue,
        own_login: &str,
    ) -> Result<Option<String>, SourceError> {
        if let Some(v) = lock(&self.verdicts).get(key)
            && !issue.updated_at.is_empty()
            && v.updated_at == issue.updated_at
        {
            return Ok(v.trigger.clone().ok());
        }
        let url = self.issue_url(key, &["timeline"]);
        let url = with_query(url, &[("per_page", "100")]);
        let events: Vec<wire::TimelineEvent> = match self.client.get_all(url, false).await {
            Ok(events) => events,
            // Deleted or transferred since it was listed.
            Err(SourceError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let label = &self.config.trigger_label;
        let decision = match trust::latest_labeling(&events, label) {
            None => Err(format!("no labeled event for {label:?} in its timeline")),
            Some(labeling) => {
                let required = self.config.trusted_permission;
                match trust::decide_without_permission(
                    &labeling,
                    &self.config.allowed_users,
                    own_login,
                    required,
                ) {
                    Some(decision) => decision.map(|()| labeling.trigger()),
                    None => {
                        let actor = labeling.actor.clone().unwrap_or_default();
                        let has = self.permission(&key.repo, &actor).await?;
                        if has >= required {
                            Ok(labeling.trigger())
                        } else {
                            Err(format!(
                                "the label was applied by {actor}, whose permission is {} ({} required)",
                                permission_name(has),
                                permission_name(required)
                            ))
                        }
                    }
                }
            }
        };
        if let Err(reason) = &decision {
            tracing::info!(issue = %key, %reason, "untrusted trigger: ignored until the issue changes");
        }
        lock(&self.verdicts).insert(
            key.clone(),
            Verdict {
                updated_at: issue.updated_at.clone(),
                trigger: decision.clone(),
                title: issue.title.clone(),
            },
        );
        Ok(decision.ok())
    }

    async fn permission(&self, repo: &RepoId, login: &str) -> Result<Permission, SourceError> {
        let cache_key = (repo.clone(), login.to_ascii_lowercase());
        let ttl = self.client.settings().permission_ttl;
        let slot = Arc::clone(lock(&self.permissions).entry(cache_key).or_default());
        // Whoever finds the slot empty (or stale) asks while the others
        // wait, and they then find the fresh answer.
        let mut cached = slot.lock().await;
        if let Some((p, at)) = *cached
            && at.elapsed() < ttl
        {
            return Ok(p);
        }
        let url = self.repo_url(repo, &["collaborators", login, "permission"]);
        let level = match self.client.get::<wire::PermissionAnswer>(url).await {
            Ok(answer) => answer.level(),
            // Not a collaborator (or no such user any more).
            Err(SourceError::NotFound { .. }) => Permission::None,
            Err(e) => return Err(e),
        };
        *cached = Some((level, Instant::now()));
        Ok(level)
    }

    fn to_core(repo: &RepoId, issue: wire::Issue, trigger: String) -> Issue {
        Issue {
            key: IssueKey::new(repo.clone(), issue.number),
            title: issue.title,
            body: issue.body.unwrap_or_default(),
            labels: issue.labels.into_iter().map(|l| l.name).collect(),
            html_url: issue.html_url,
            author: issue.user.map(|u| u.login),
            trigger,
            pr_scope: PrScope::SameRepository,
        }
    }

    async fn add_label(&self, issue: &Issue, label: &str) -> Result<(), SourceError> {
        let url = self.issue_url(&issue.key, &["labels"]);
        let body = json!({ "labels": [label] });
        self.client
            .send::<serde::de::IgnoredAny>(Method::POST, url, Some(&body), true)
            .await?;
        Ok(())
    }

    /// Removes a label; one that is already gone is no error.
    async fn remove_label(&self, issue: &Issue, label: &str) -> Result<(), SourceError> {
        let url = self.issue_url(&issue.key, &["labels", label]);
        match self
            .client
            .send::<serde::de::IgnoredAny>(Method::DELETE, url, None, true)
            .await
        {
            Ok(_) | Err(SourceError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Brings the round's status comment to `body`, unless it already
    /// shows `shows` (a repeated report writes nothing). Remembers what it
    /// shows only once the write went through.
    async fn status_comment(
        &self,
        issue: &Issue,
        round: u32,
        reports: &mut Reports,
        shows: &str,
        body: String,
    ) -> Result<(), SourceError> {
        if reports.memo.get(MEMO_COMMENT_SHOWS).map(String::as_str) == Some(shows) {
            return Ok(());
        }
        self.write_comment(issue, round, reports, body).await?;
        reports
            .memo
            .insert(MEMO_COMMENT_SHOWS.into(), shows.to_owned());
        Ok(())
    }

    /// Writes the round's status comment: edits it when it exists, else
    /// posts it and remembers its id.
    async fn write_comment(
        &self,
        issue: &Issue,
        round: u32,
        reports: &mut Reports,
        body: String,
    ) -> Result<(), SourceError> {
        let payload = json!({ "body": body });
        let known = match reports
            .memo
            .get(MEMO_COMMENT_ID)
            .and_then(|id| id.parse().ok())
        {
            Some(id) => Some(id),
            None => self.find_status_comment(issue, round).await?,
        };
        if let Some(id) = known {
            let url = self.repo_url(&issue.key.repo, &["issues", "comments", &id.to_string()]);
            match self
                .client
                .send::<serde::de::IgnoredAny>(Method::PATCH, url, Some(&payload), true)
                .await
            {
                Ok(_) => {
                    reports.memo.insert(MEMO_COMMENT_ID.into(), id.to_string());
                    return Ok(());
                }
                // Someone deleted it: post a new one.
                Err(SourceError::NotFound { .. }) => {
                    reports.memo.remove(MEMO_COMMENT_ID);
                }
                Err(e) => return Err(e),
            }
        }
        let url = self.issue_url(&issue.key, &["comments"]);
        // Not idempotent: GitHub may have made the comment before an error
        // reached us, so the client does not repeat it. The next try of the
        // report finds it by its marker instead.
        let comment: wire::Comment = self
            .client
            .send(Method::POST, url, Some(&payload), false)
            .await?;
        reports
            .memo
            .insert(MEMO_COMMENT_ID.into(), comment.id.to_string());
        Ok(())
    }

    /// This round's status comment, when its id is not known (a new round,
    /// or a crash lost it): the one by the service's own account that
    /// starts with the round's marker. An earlier round's comment has
    /// another marker, also when an operator's retry kept the trigger.
    async fn find_status_comment(
        &self,
        issue: &Issue,
        round: u32,
    ) -> Result<Option<u64>, SourceError> {
        let own = self.own_login().await?.to_owned();
        let mut url = self.issue_url(&issue.key, &["comments"]);
        let mut query = vec![("per_page", "100")];
        // Comments older than the trigger cannot belong to this round.
        if let Some((_, since)) = issue.trigger.split_once('@') {
            query.push(("since", since));
        }
        url = with_query(url, &query);
        let comments: Vec<wire::Comment> = self.client.get_all(url, false).await?;
        let marker = report::marker(&issue.trigger, round);
        Ok(comments
            .into_iter()
            .filter(|c| {
                c.user
                    .as_ref()
                    .is_some_and(|u| !own.is_empty() && u.login.eq_ignore_ascii_case(&own))
            })
            .find(|c| c.body.as_deref().is_some_and(|b| b.starts_with(&marker)))
            .map(|c| c.id))
    }

    /// Whether `label` (`done` or `failed`) may be left on the issue by an
    /// earlier round: not when this round's start report already removed
    /// it; else when the issue shows it, or when there was an earlier
    /// round (its report may have come after the issue was last listed).
    /// Removing a label that is not there costs a write and is no error.
    fn may_carry(issue: &Issue, round: u32, reports: &Reports, label: &str) -> bool {
        !reports.memo.contains_key(MEMO_LABELS_STARTED)
            && (round > 1 || issue.labels.iter().any(|l| l.eq_ignore_ascii_case(label)))
    }
}

#[async_trait]
impl IssueSource for GithubSource {
    async fn poll(&self) -> Result<Vec<Issue>, SourceError> {
        let own_login = self.own_login().await?.to_owned();
        let mut ready = Vec::new();
        for repo in &self.config.repos {
            let url = with_query(
                self.repo_url(repo, &["issues"]),
                &[
                    ("state", "open"),
                    ("labels", &self.config.trigger_label),
                    // Oldest first, so that the oldest request is served first.
                    ("sort", "created"),
                    ("direction", "asc"),
                    ("per_page", "100"),
                ],
            );
            let listed: Vec<wire::Issue> = self.client.get_all(url, true).await?;
            let mut seen = HashSet::new();
            let mut candidates = Vec::new();
            for issue in listed {
                let key = IssueKey::new(repo.clone(), issue.number);
                if issue.pull_request.is_some() {
                    tracing::debug!(issue = %key, "a pull request with the trigger label: ignored");
                    continue;
                }
                if issue.state != "open" || !issue.has_label(&self.config.trigger_label) {
                    continue;
                }
                seen.insert(key.clone());
                candidates.push((key, issue));
            }
            // Several at once (most are answered from the verdicts without
            // a request); `buffered` keeps the listing's order, oldest first.
            let own_login = own_login.as_str();
            let examined: Vec<_> = futures::stream::iter(candidates)
                .map(|(key, issue)| async move {
                    let trigger = self.trusted_trigger(&key, &issue, own_login).await?;
                    Ok::<_, SourceError>(trigger.map(|t| Self::to_core(repo, issue, t)))
                })
                .buffered(EXAMINE_CONCURRENCY)
                .try_collect()
                .await?;
            ready.extend(examined.into_iter().flatten());
            lock(&self.verdicts).retain(|k, _| &k.repo != repo || seen.contains(k));
        }
        Ok(ready)
    }

    fn skipped(&self) -> Vec<SkippedTrigger> {
        let mut skipped: Vec<_> = lock(&self.verdicts)
            .iter()
            .filter_map(|(key, v)| {
                v.trigger.as_ref().err().map(|reason| SkippedTrigger {
                    issue: key.clone(),
                    title: v.title.clone(),
                    reason: reason.clone(),
                })
            })
            .collect();
        skipped.sort_by(|a, b| a.issue.cmp(&b.issue));
        skipped
    }

    async fn report(
        &self,
        issue: &Issue,
        report: &Report,
        reports: &mut Reports,
    ) -> Result<(), SourceError> {
        match report {
            Report::Started(r) => self.report_started(issue, *r, reports).await,
            Report::Succeeded(r) => self.report_succeeded(issue, r, reports).await,
            Report::Failed(r) => self.report_failed(issue, r, reports).await,
            Report::Cancelled(r) => self.report_cancelled(issue, r, reports).await,
        }
    }
}

impl GithubSource {
    /// Start of an attempt: `in_progress` on (and an earlier round's
    /// outcome label off) once per round, then the status comment.
    async fn report_started(
        &self,
        issue: &Issue,
        start: StartReport,
        reports: &mut Reports,
    ) -> Result<(), SourceError> {
        if let Some(outcome) = reports.memo.get(MEMO_OUTCOME) {
            // The orchestrator never sends a start after the round
            // settled; showing "working" under a final label would lie.
            tracing::debug!(issue = %issue.key, %outcome, "a start report after the round settled: ignored");
            return Ok(());
        }
        let labels = &self.config.labels;
        if !reports.memo.contains_key(MEMO_LABELS_STARTED) {
            self.add_label(issue, &labels.in_progress).await?;
            for stale in [&labels.done, &labels.failed] {
                if Self::may_carry(issue, start.round, reports, stale) {
                    self.remove_label(issue, stale).await?;
                }
            }
            reports.memo.insert(MEMO_LABELS_STARTED.into(), "1".into());
        }
        if self.config.comment {
            let shows = format!(
                "started attempt={} failures={} max={}",
                start.attempt, start.failures, start.max_attempts
            );
            let body = report::started(&issue.trigger, &start);
            self.status_comment(issue, start.round, reports, &shows, body)
                .await?;
        }
        Ok(())
    }

    /// Success: the comment with the pull request, `in_progress` and the
    /// trigger off (and a `failed` label of an earlier round), `done` last.
    async fn report_succeeded(
        &self,
        issue: &Issue,
        success: &SuccessReport,
        reports: &mut Reports,
    ) -> Result<(), SourceError> {
        const OUTCOME: &str = "succeeded";
        if reports.memo.get(MEMO_OUTCOME).map(String::as_str) == Some(OUTCOME) {
            return Ok(());
        }
        if self.config.comment {
            let body = report::succeeded(&issue.trigger, success);
            self.status_comment(issue, success.round, reports, OUTCOME, body)
                .await?;
        }
        let labels = &self.config.labels;
        self.remove_label(issue, &labels.in_progress).await?;
        self.remove_label(issue, &self.config.trigger_label).await?;
        if Self::may_carry(issue, success.round, reports, &labels.failed) {
            self.remove_label(issue, &labels.failed).await?;
        }
        self.add_label(issue, &labels.done).await?;
        reports.memo.insert(MEMO_OUTCOME.into(), OUTCOME.into());
        Ok(())
    }

    /// Final failure: the comment with the reason and the log's last
    /// lines, `in_progress` off (and a `done` label of an earlier round),
    /// `failed` last. The trigger stays.
    async fn report_failed(
        &self,
        issue: &Issue,
        failure: &FailureReport,
        reports: &mut Reports,
    ) -> Result<(), SourceError> {
        const OUTCOME: &str = "failed";
        if reports.memo.get(MEMO_OUTCOME).map(String::as_str) == Some(OUTCOME) {
            return Ok(());
        }
        if self.config.comment {
            let body = report::failed(&issue.trigger, failure, &self.token);
            self.status_comment(issue, failure.round, reports, OUTCOME, body)
                .await?;
        }
        let labels = &self.config.labels;
        self.remove_label(issue, &labels.in_progress).await?;
        if Self::may_carry(issue, failure.round, reports, &labels.done) {
            self.remove_label(issue, &labels.done).await?;
        }
        self.add_label(issue, &labels.failed).await?;
        reports.memo.insert(MEMO_OUTCOME.into(), OUTCOME.into());
        Ok(())
    }

    /// Cancelled: the comment says so and why (only when the round ran:
    /// one that never started has no comment), then the trigger and
    /// `in_progress` come off.
    async fn report_cancelled(
        &self,
        issue: &Issue,
        cancel: &CancelReport,
        reports: &mut Reports,
    ) -> Result<(), SourceError> {
        const OUTCOME: &str = "cancelled";
        if reports.memo.get(MEMO_OUTCOME).map(String::as_str) == Some(OUTCOME) {
            return Ok(());
        }
        if self.config.comment && cancel.started {
            let body = report::cancelled(&issue.trigger, cancel, &self.token);
            self.status_comment(issue, cancel.round, reports, OUTCOME, body)
                .await?;
        }
        self.remove_label(issue, &self.config.trigger_label).await?;
        self.remove_label(issue, &self.config.labels.in_progress)
            .await?;
        reports.memo.insert(MEMO_OUTCOME.into(), OUTCOME.into());
        Ok(())
    }
}

fn with_query(mut url: Url, pairs: &[(&str, &str)]) -> Url {
    url.query_pairs_mut().extend_pairs(pairs);
    url
}

fn permission_name(p: Permission) -> &'static str {
    match p {
        Permission::None => "none",
        Permission::Read => "read",
        Permission::Triage => "triage",
        Permission::Write => "write",
        Permission::Maintain => "maintain",
        Permission::Admin => "admin",
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
