//! What the state store keeps per issue: its status, every attempt with its
//! times and outcome, the pull request, and what was reported back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::issue::{Issue, IssueKey};
use crate::orchestrator::RunningAttempt;

/// Where an issue stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueStatus {
    /// Waiting for a free slot (new, resumed after an interruption, or
    /// waiting out a quota pause).
    Queued,
    /// A workflow attempt is running.
    Running,
    /// The last attempt failed; the next one waits until `next_retry_at`.
    Retrying,
    /// Settled: the workflow succeeded.
    Done,
    /// Settled: every attempt of the round failed.
    Failed,
    /// Settled: the source no longer wanted the issue while it ran.
    Cancelled,
}

impl IssueStatus {
    /// Every status, in the order of an issue's life.
    pub const ALL: [Self; 6] = [
        Self::Queued,
        Self::Running,
        Self::Retrying,
        Self::Done,
        Self::Failed,
        Self::Cancelled,
    ];

    /// Done, failed or cancelled: nothing more happens until a new round.
    pub fn is_settled(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    /// The lower-case name used in output and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::str::FromStr for IssueStatus {
    type Err = String;

    /// The name [`as_str`](IssueStatus::as_str) gives.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown status {s:?}; one of: {}", names.join(", "))
            })
    }
}

impl std::fmt::Display for IssueStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// Exit 0.
    Succeeded,
    /// Non-zero exit, killed by a signal, timed out, or could not start.
    Failed {
        /// Human-readable reason, e.g. `exit code 3` or `timed out after 2h`.
        reason: String,
    },
    /// Cancelled because the source no longer wanted the issue.
    Cancelled,
    /// Stopped by a service shutdown or crash; run again, not counted.
    Interrupted,
    /// Exit 75 with a `claude-flow: retry-after` line; not counted.
    QuotaExhausted {
        /// When starts may resume.
        #[serde(with = "humantime_serde")]
        until: SystemTime,
    },
}

impl AttemptOutcome {
    /// Whether this attempt uses up one of `max_attempts`.
    pub fn counts_as_failure(&self) -> bool {
        matches!(self, Self::Failed { .. })
    }
}

/// One run of the workflow for an issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1, 2, ... within its round (every start counts, an interrupted one
    /// too); `CLAUDE_FLOW_ATTEMPT` carries it. Logs are named by round and
    /// number, so they never overwrite each other.
    pub number: u32,
    /// The round this attempt belongs to.
    pub round: u32,
    /// Unique per attempt (`CLAUDE_FLOW_RUN_ID`).
    pub run_id: String,
    /// When it started.
    #[serde(with = "humantime_serde")]
    pub started_at: SystemTime,
    /// When it ended; `None` while running.
    #[serde(default, with = "humantime_serde")]
    pub finished_at: Option<SystemTime>,
    /// How it ended; `None` while running.
    #[serde(default)]
    pub outcome: Option<AttemptOutcome>,
    /// Exit code, when the workflow exited by itself.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Signal that ended the workflow, when one did.
    #[serde(default)]
    pub signal: Option<i32>,
    /// The attempt's log file.
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// The pull request URL found in this attempt's output.
    #[serde(default)]
    pub pr_url: Option<String>,
    /// The daemon that ran it (`service.node`), with a store several
    /// daemons share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Attempt {
    /// An attempt that starts now: number `number` of round `round`, with
    /// nothing known yet of how it ends.
    pub fn started(number: u32, round: u32, run_id: String, started_at: SystemTime) -> Self {
        Self {
            number,
            round,
            run_id,
            started_at,
            finished_at: None,
            outcome: None,
            exit_code: None,
            signal: None,
            log_path: None,
            pr_url: None,
            node: None,
        }
    }

    /// How long the attempt ran (so far, when still running).
    pub fn duration(&self) -> Duration {
        self.finished_at
            .unwrap_or_else(SystemTime::now)
            .duration_since(self.started_at)
            .unwrap_or_default()
    }
}

/// A state of a round as shown at the source: what the reporter last
/// delivered, compared with what the record says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shown {
    /// Working on attempt `attempt` of the round.
    Started {
        /// The attempt within the round.
        attempt: u32,
    },
    /// The round succeeded.
    Succeeded,
    /// The round failed.
    Failed,
    /// The round was cancelled.
    Cancelled,
}

/// What has been reported back to the source in the current round, so that
/// a restart does not report twice (or forget to report).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reports {
    /// The latest state of the round the source was brought to.
    #[serde(default)]
    pub shown: Option<Shown>,
    /// Whether the source was told that the issue's text changed after
    /// approval (with the last state shown).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edit_shown: bool,
    /// Whatever the source wants to remember about its reports (for
    /// example the id of its status comment). Opaque to everyone else.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub memo: BTreeMap<String, String>,
    /// Written by versions before rounds had their own attempt numbers;
    /// read so that a report they made is not made again.
    #[serde(default, skip_serializing, rename = "outcome_reported")]
    legacy_outcome_reported: bool,
}

impl Reports {
    /// What the source was last brought to show, also for records written
    /// by earlier versions.
    pub fn shown(&self, status: IssueStatus) -> Option<Shown> {
        if self.shown.is_some() || !self.legacy_outcome_reported {
            return self.shown;
        }
        match status {
            IssueStatus::Done => Some(Shown::Succeeded),
            IssueStatus::Failed => Some(Shown::Failed),
            _ => None,
        }
    }
}

/// Service-wide state kept beside the records: a quota pause survives a
/// restart, and its length grows with consecutive quota exits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// No workflow starts before this.
    #[serde(default, with = "humantime_serde")]
    pub paused_until: Option<SystemTime>,
    /// Why, in words.
    #[serde(default)]
    pub pause_reason: Option<String>,
    /// Quota exits in a row (any other outcome ends the streak).
    #[serde(default)]
    pub quota_exits: u32,
    /// The triggers the last successful poll ignored (kept so that `list
    /// --skipped` answers while the service is stopped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<crate::issue_source::SkippedTrigger>,
}

impl ServiceState {
    /// The end of the pause in force at `now`, as a service started now
    /// with `service.max_pause` = `max_pause` would see it: `None` when
    /// there is no pause or it is over, and an end further away than
    /// `max_pause` cut to that (the setting may have been lowered since
    /// the pause was recorded).
    pub fn pause_at(&self, now: SystemTime, max_pause: Duration) -> Option<SystemTime> {
        self.paused_until
            .filter(|t| *t > now)
            .map(|t| t.min(now + max_pause))
    }
}

/// Everything the service knows about one issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueRecord {
    /// The issue: its title and body as approved for this round (as the
    /// service first saw them with the trigger), its other fields as the
    /// source last described them.
    pub issue: Issue,
    /// The title or body changed at the source after this round's text
    /// was approved; the round goes on with the approved text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edited_since_approval: bool,
    /// Where it stands.
    pub status: IssueStatus,
    /// 1 for the first trigger, +1 each time the trigger is applied again
    /// (or `retry` is asked for) after the issue settled.
    pub round: u32,
    /// Every attempt, oldest first, across rounds.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// The pull request of the current round.
    #[serde(default)]
    pub pr_url: Option<String>,
    /// When the next attempt may start (status `retrying`).
    #[serde(default, with = "humantime_serde")]
    pub next_retry_at: Option<SystemTime>,
    /// The last failure, in words.
    #[serde(default)]
    pub last_error: Option<String>,
    /// What was reported back to the source this round.
    #[serde(default)]
    pub reports: Reports,
    /// Last change.
    #[serde(with = "humantime_serde")]
    pub updated_at: SystemTime,
    /// When retention (`service.retention`, `claude-flow prune`) removed
    /// this settled round's workspace and logs; cleared by a new round.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub pruned_at: Option<SystemTime>,
}

impl IssueRecord {
    /// A new record for an issue seen for the first time.
    pub fn new(issue: Issue) -> Self {
        Self {
            issue,
            edited_since_approval: false,
            status: IssueStatus::Queued,
            round: 1,
            attempts: Vec::new(),
            pr_url: None,
            next_retry_at: None,
            last_error: None,
            reports: Reports::default(),
            updated_at: SystemTime::now(),
            pruned_at: None,
        }
    }

    /// The issue's key.
    pub fn key(&self) -> &IssueKey {
        &self.issue.key
    }

    /// Attempts of the current round that used up the retry budget.
    pub fn failures_this_round(&self) -> u32 {
        let n = self
            .attempts
            .iter()
            .filter(|a| a.round == self.round)
            .filter(|a| {
                a.outcome
                    .as_ref()
                    .is_some_and(AttemptOutcome::counts_as_failure)
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The most recent attempt.
    pub fn last_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// Attempts of the current round, oldest first.
    pub fn attempts_this_round(&self) -> impl DoubleEndedIterator<Item = &Attempt> {
        self.attempts.iter().filter(move |a| a.round == self.round)
    }

    /// The number the next attempt gets: 1, 2, ... within the round.
    pub fn next_attempt_number(&self) -> u32 {
        u32::try_from(self.attempts_this_round().count())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// The attempt the record says is running: the last one, while the
    /// issue is `running` and that attempt has no outcome yet. A service
    /// that died leaves such a record behind until its next start, so this
    /// means "running" only while a service holds the state.
    pub fn running_attempt(&self) -> Option<RunningAttempt> {
        if self.status != IssueStatus::Running {
            return None;
        }
        self.last_attempt()
            .filter(|a| a.outcome.is_none())
            .map(|a| RunningAttempt {
                issue: self.key().clone(),
                round: a.round,
                attempt: a.number,
                started_at: a.started_at,
            })
    }

    /// How many of this round's last attempts in a row were interrupted
    /// by the service stopping.
    pub fn interruptions_in_a_row(&self) -> u32 {
        let n = self
            .attempts_this_round()
            .rev()
            .take_while(|a| a.outcome == Some(AttemptOutcome::Interrupted))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// What the source should show for this record now; `None` before
    /// the round's first attempt.
    pub fn wanted_shown(&self) -> Option<Shown> {
        match self.status {
            IssueStatus::Done => Some(Shown::Succeeded),
            IssueStatus::Failed => Some(Shown::Failed),
            IssueStatus::Cancelled => Some(Shown::Cancelled),
            IssueStatus::Queued | IssueStatus::Running | IssueStatus::Retrying => self
                .attempts_this_round()
                .last()
                .map(|a| Shown::Started { attempt: a.number }),
        }
    }

    /// Whether the source shows an older state than [`wanted_shown`](Self::wanted_shown).
    pub fn report_owed(&self) -> bool {
        let wanted = self.wanted_shown();
        wanted.is_some()
            && (wanted != self.reports.shown(self.status)
                || self.edited_since_approval != self.reports.edit_shown)
    }

    /// Takes what the source now says of the issue: a new title or body is
    /// not taken (this round works on the approved text) but noted; the
    /// rest (labels, URL) is. Returns whether the record changed.
    pub fn refresh(&mut self, mut current: Issue) -> bool {
        let edited = current.title != self.issue.title || current.body != self.issue.body;
        current.title.clone_from(&self.issue.title);
        current.body.clone_from(&self.issue.body);
        let changed = current != self.issue || edited != self.edited_since_approval;
        self.issue = current;
        self.edited_since_approval = edited;
        changed
    }

    /// With several daemons, the leader owns what the source was brought to
    /// show and what the source says of the issue (`reports`, `issue`,
    /// `edited_since_approval`), while the daemon running an attempt owns
    /// the rest. Takes the leader-owned part of `from` when both are of the
    /// same round; returns whether anything changed.
    pub fn take_leader_fields(&mut self, from: &IssueRecord) -> bool {
        if self.round != from.round
            || (self.reports == from.reports
                && self.issue == from.issue
                && self.edited_since_approval == from.edited_since_approval)
        {
            return false;
        }
        self.reports = from.reports.clone();
        self.issue = from.issue.clone();
        self.edited_since_approval = from.edited_since_approval;
        true
    }

    /// Whether this record has moved on past `other`: a later round, or
    /// more attempts in the same one. A write made from `other` would take
    /// that progress back.
    pub fn is_ahead_of(&self, other: &IssueRecord) -> bool {
        self.round > other.round
            || (self.round == other.round && self.attempts.len() > other.attempts.len())
    }

    /// Starts a new round: the issue is queued again with a fresh retry
    /// budget and nothing reported yet. History is kept.
    pub fn start_new_round(&mut self) {
        self.round += 1;
        self.edited_since_approval = false;
        self.status = IssueStatus::Queued;
        self.pr_url = None;
        self.next_retry_at = None;
        self.last_error = None;
        self.reports = Reports::default();
        self.updated_at = SystemTime::now();
        self.pruned_at = None;
    }
}

/// One line about an issue, as `claude-flow list --json` and the service's
/// `GET /api/issues` print it: the same fields and format in both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueSummary {
    /// `owner/name#n`.
    pub issue: String,
    /// `owner/name`.
    pub repo: String,
    /// The issue number.
    pub number: u64,
    /// The title, verbatim.
    pub title: String,
    /// Where it stands.
    pub status: IssueStatus,
    /// The current round.
    pub round: u32,
    /// Attempts of the current round.
    pub attempts: usize,
    /// The pull request of the current round.
    pub pr_url: Option<String>,
    /// When the next attempt may start, RFC 3339 to the second.
    #[serde(with = "rfc3339_seconds::option")]
    pub next_retry_at: Option<SystemTime>,
    /// When the running attempt started, RFC 3339 to the second; `null`
    /// when none runs.
    #[serde(default, with = "rfc3339_seconds::option")]
    pub started_at: Option<SystemTime>,
    /// The last failure, in words.
    pub last_error: Option<String>,
    /// Last change, RFC 3339 to the second.
    #[serde(with = "rfc3339_seconds")]
    pub updated_at: SystemTime,
}

impl IssueRecord {
    /// The record in one line: what listings show.
    pub fn summary(&self) -> IssueSummary {
        IssueSummary {
            issue: self.key().to_string(),
            repo: self.key().repo.to_string(),
            number: self.key().number,
            title: self.issue.title.clone(),
            status: self.status,
            round: self.round,
            attempts: self.attempts_this_round().count(),
            pr_url: self.pr_url.clone(),
            next_retry_at: self.next_retry_at,
            started_at: self.running_attempt().map(|a| a.started_at),
            last_error: self.last_error.clone(),
            updated_at: self.updated_at,
        }
    }
}

/// Times as people read them in listings: RFC 3339, whole seconds, UTC.
mod rfc3339_seconds {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_seconds(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use std::time::SystemTime;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SystemTime>, D::Error> {
            match Option::<String>::deserialize(d)? {
                Some(text) => humantime::parse_rfc3339_weak(&text)
                    .map(Some)
                    .map_err(serde::de::Error::custom),
                None => Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::IssueKey;

    #[test]
    fn statuses_parse_from_the_names_they_print_and_nothing_else() {
        for status in IssueStatus::ALL {
            assert_eq!(status.as_str().parse::<IssueStatus>(), Ok(status));
            let json = serde_json::to_value(status).unwrap();
            assert_eq!(json, status.as_str());
        }
        let err = "Done".parse::<IssueStatus>().unwrap_err();
        assert!(
            err.contains("queued, running, retrying, done, failed, cancelled"),
            "{err}"
        );
    }

    fn attempt(round: u32, number: u32, outcome: AttemptOutcome) -> Attempt {
        Attempt {
            number,
            round,
            run_id: format!("r{number}"),
            started_at: SystemTime::UNIX_EPOCH,
            finished_at: Some(SystemTime::UNIX_EPOCH),
            outcome: Some(outcome),
            exit_code: None,
            signal: None,
            log_path: None,
            pr_url: None,
            node: None,
        }
    }

    #[test]
    fn only_failures_of_the_current_round_use_up_attempts() {
        let key = IssueKey::new("o/r".parse().unwrap(), 1);
        let mut r = IssueRecord::new(Issue::new(key, "t"));
        let failed = || AttemptOutcome::Failed {
            reason: "exit code 1".into(),
        };
        r.attempts.push(attempt(1, 1, failed()));
        r.attempts.push(attempt(1, 2, AttemptOutcome::Interrupted));
        r.attempts.push(attempt(
            1,
            3,
            AttemptOutcome::QuotaExhausted {
                until: SystemTime::UNIX_EPOCH,
            },
        ));
        assert_eq!(r.failures_this_round(), 1);
        r.start_new_round();
        assert_eq!(r.failures_this_round(), 0);
        assert_eq!(r.next_attempt_number(), 1);
    }

    #[test]
    fn summaries_print_whole_seconds_and_read_back() {
        let key = IssueKey::new("o/r".parse().unwrap(), 7);
        let mut r = IssueRecord::new(Issue::new(key, "t"));
        r.attempts.push(attempt(1, 1, AttemptOutcome::Succeeded));
        r.start_new_round();
        r.updated_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_500);
        let json = serde_json::to_value(r.summary()).unwrap();
        assert_eq!(json["issue"], "o/r#7");
        assert_eq!(json["status"], "queued");
        assert_eq!(json["attempts"], 0);
        assert_eq!(json["updated_at"], "1970-01-01T00:00:01Z");
        assert_eq!(json["next_retry_at"], serde_json::Value::Null);
        let back: IssueSummary = serde_json::from_value(json).unwrap();
        assert_eq!(
            back.updated_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1)
        );
    }

    #[test]
    fn the_running_attempt_is_the_last_one_without_an_outcome() {
        let key = IssueKey::new("o/r".parse().unwrap(), 3);
        let mut r = IssueRecord::new(Issue::new(key, "t"));
        assert_eq!(r.running_attempt(), None);
        r.attempts.push(attempt(1, 1, AttemptOutcome::Succeeded));
        r.start_new_round();
        r.attempts.push(attempt(2, 1, AttemptOutcome::Interrupted));
        let mut running = attempt(2, 2, AttemptOutcome::Succeeded);
        running.outcome = None;
        r.attempts.push(running);
        assert_eq!(r.running_attempt(), None, "queued, not running");
        r.status = IssueStatus::Running;
        let now = r.running_attempt().unwrap();
        assert_eq!(
            (now.issue.to_string(), now.round, now.attempt),
            ("o/r#3".to_owned(), 2, 2)
        );
    }

    #[test]
    fn a_pause_is_in_force_until_its_end_and_at_most_max_pause_long() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        let paused = |until| ServiceState {
            paused_until: Some(until),
            pause_reason: Some("quota".into()),
            quota_exits: 1,
            ..ServiceState::default()
        };
        assert_eq!(ServiceState::default().pause_at(now, hour), None);
        assert_eq!(paused(now).pause_at(now, hour), None);
        assert_eq!(
            paused(now + Duration::from_secs(60)).pause_at(now, hour),
            Some(now + Duration::from_secs(60))
        );
        assert_eq!(
            paused(now + 10 * hour).pause_at(now, hour),
            Some(now + hour)
        );
    }

    #[test]
    fn records_survive_json_round_trips() {
        let key = IssueKey::new("o/r".parse().unwrap(), 7);
        let mut r = IssueRecord::new(Issue::new(key, "t"));
        r.attempts.push(attempt(1, 1, AttemptOutcome::Succeeded));
        r.next_retry_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(5));
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<IssueRecord>(&text).unwrap(), r);
    }
}
