//! Retention (`service.retention`, `claude-flow prune`): the workspace and
//! logs of an issue settled longer ago than the retention are removed; its
//! record stays, marked with [`IssueRecord::pruned_at`].
//!
//! What is removed is derived from the configured directories and the
//! issue's key alone (`<dir>/<owner>__<repo>/issue-<n>`, see
//! [`workspace_dir_for`](crate::runner)), never from paths kept in a record.
//! The log directory holds every attempt's log, issue body and issue JSON
//! file, all rounds. Symbolic links inside are removed, never followed:
//! a workflow that links its workspace to elsewhere loses the link only.
//!
//! Only settled issues are candidates ([`Retention::is_due`]); the service
//! decides in its loop, which owns the records, so that nothing is removed
//! from under a running or waiting issue (see `orchestrator::prune`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::ServiceConfig;
use crate::error::StoreError;
use crate::issue::IssueKey;
use crate::record::IssueRecord;
use crate::runner::{log_dir_for, workspace_dir_for};
use crate::state::StateStore;

/// Why nothing is pruned when `service.retention` is `null`.
pub const KEEP_ALL: &str = "service.retention is null, which keeps every workspace and log: \
     nothing is pruned (set it to a duration such as \"30d\")";

/// What retention removes, and after how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Issues settled longer ago than this lose their files.
    pub after: Duration,
    /// `service.workspace_dir` (effective).
    pub workspace_dir: PathBuf,
    /// `service.log_dir` (effective).
    pub log_dir: PathBuf,
}

impl Retention {
    /// The retention a `service` section asks for; `None` keeps everything.
    pub fn from_config(service: &ServiceConfig) -> Option<Self> {
        service.retention.map(|after| Self {
            after,
            workspace_dir: service.workspace_dir(),
            log_dir: service.log_dir(),
        })
    }

    /// The directories retention removes for `key`: its workspace and its
    /// log directory.
    pub fn issue_dirs(&self, key: &IssueKey) -> [PathBuf; 2] {
        [
            workspace_dir_for(&self.workspace_dir, key),
            log_dir_for(&self.log_dir, key),
        ]
    }

    /// Whether `record`'s files are due for removal at `now`: settled
    /// (done, failed, cancelled) longer ago than the retention, and not
    /// pruned since. A running or waiting issue never is.
    pub fn is_due(&self, record: &IssueRecord, now: SystemTime) -> bool {
        record.status.is_settled()
            && record.pruned_at.is_none()
            && now
                .duration_since(record.updated_at)
                .is_ok_and(|age| age >= self.after)
    }

    /// Removes (or, `dry_run`, only measures) `key`'s directories. Blocking:
    /// run it off the async threads.
    pub fn prune_issue(&self, key: &IssueKey, dry_run: bool) -> Freed {
        let mut freed = Freed::default();
        for dir in self.issue_dirs(key) {
            let before = match size_of(&dir) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(e) => {
                    freed.note_error(&dir, &e);
                    continue;
                }
            };
            freed.found = true;
            if dry_run {
                freed.bytes += before;
                continue;
            }
            // std's remove_dir_all removes symbolic links without following
            // them, also one racing the removal.
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => freed.bytes += before,
                Err(e) if e.kind() == io::ErrorKind::NotFound => freed.bytes += before,
                Err(e) => {
                    let left = size_of(&dir).ok().flatten().unwrap_or(0);
                    freed.bytes += before.saturating_sub(left);
                    freed.note_error(&dir, &e);
                }
            }
        }
        freed
    }
}

/// What pruning one issue found and freed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Freed {
    /// Whether any of its directories existed.
    pub found: bool,
    /// Bytes of the files removed (or, in a dry run, that would be).
    pub bytes: u64,
    /// What could not be measured or removed.
    pub error: Option<String>,
}

impl Freed {
    fn note_error(&mut self, dir: &Path, e: &io::Error) {
        let message = format!("{}: {e}", dir.display());
        self.error = Some(match self.error.take() {
            Some(earlier) => format!("{earlier}; {message}"),
            None => message,
        });
    }
}

/// One issue in a [`PruneReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunedIssue {
    /// `owner/name#n`.
    pub issue: String,
    /// The settled round whose files went.
    pub round: u32,
    /// Bytes freed (or, in a dry run, that would be).
    pub bytes: u64,
    /// What could not be removed; the record is then not marked pruned,
    /// so that the next pass tries again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a prune did: `claude-flow prune` prints it, `POST /api/prune`
/// answers with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Nothing was removed; the figures say what would have been.
    pub dry_run: bool,
    /// Each issue whose files were (or would be) removed, by key.
    pub issues: Vec<PrunedIssue>,
    /// The sum of their bytes.
    pub bytes: u64,
}

impl PruneReport {
    /// Adds one issue's result.
    pub fn add(&mut self, key: &IssueKey, round: u32, freed: Freed) {
        self.bytes += freed.bytes;
        self.issues.push(PrunedIssue {
            issue: key.to_string(),
            round,
            bytes: freed.bytes,
            error: freed.error,
        });
    }

    /// The report as lines for a person: one per issue, then the total.
    pub fn describe(&self) -> String {
        let verb = if self.dry_run { "would free" } else { "freed" };
        let mut out = String::new();
        for i in &self.issues {
            out.push_str(&format!(
                "{}: {verb} {} (round {})",
                i.issue,
                human_bytes(i.bytes),
                i.round
            ));
            if let Some(e) = &i.error {
                out.push_str(&format!("; not all removed: {e}"));
            }
            out.push('\n');
        }
        let n = self.issues.len();
        out.push_str(&format!(
            "{verb} {} in total, {n} issue{}{}",
            human_bytes(self.bytes),
            if n == 1 { "" } else { "s" },
            if self.dry_run {
                " (dry run: nothing removed)"
            } else {
                ""
            }
        ));
        out
    }
}

/// Prunes every due record of `store`, marking each pruned one through the
/// store: for `claude-flow prune` while no service runs (a running service
/// does the same in its loop, `Orchestrator::prune`).
pub async fn prune_store(
    store: &dyn StateStore,
    retention: &Retention,
    now: SystemTime,
    dry_run: bool,
) -> Result<PruneReport, StoreError> {
    let mut report = PruneReport {
        dry_run,
        ..PruneReport::default()
    };
    let mut due: Vec<IssueRecord> = store
        .load()
        .await?
        .into_iter()
        .filter(|r| retention.is_due(r, now))
        .collect();
    due.sort_by(|a, b| a.key().cmp(b.key()));
    for mut record in due {
        let key = record.key().clone();
        let freed = {
            let (retention, k) = (retention.clone(), key.clone());
            tokio::task::spawn_blocking(move || retention.prune_issue(&k, dry_run))
                .await
                .map_err(|e| StoreError::Failed(format!("pruning {key} panicked: {e}")))?
        };
        if !freed.found {
            continue;
        }
        if !dry_run && freed.error.is_none() {
            record.pruned_at = Some(SystemTime::now());
            store.put(&record).await?;
        }
        report.add(&key, record.round, freed);
    }
    Ok(report)
}

/// Bytes as people read them: `512 B`, `1.5 KiB`, `10.8 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The bytes of every file under `path`, symbolic links counted as
/// themselves and never followed; `None` when `path` does not exist.
/// Entries that vanish meanwhile count as nothing.
fn size_of(path: &Path) -> io::Result<Option<u64>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut total = meta.len();
    if !meta.is_dir() {
        return Ok(Some(total));
    }
    total = 0;
    let mut dirs = vec![path.to_owned()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            // DirEntry::metadata does not follow symbolic links.
            if meta.is_dir() {
                dirs.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::issue::Issue;
    use crate::record::IssueStatus;
    use crate::state::MemoryStore;

    const DAY: Duration = Duration::from_secs(86_400);

    fn key(n: u64) -> IssueKey {
        IssueKey::new("acme/app".parse().unwrap(), n)
    }

    fn record(n: u64, status: IssueStatus, age: Duration) -> IssueRecord {
        let mut r = IssueRecord::new(Issue::new(key(n), format!("issue {n}")));
        r.status = status;
        r.updated_at = SystemTime::now() - age;
        r
    }

    struct Dirs {
        _root: tempfile::TempDir,
        retention: Retention,
    }

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let retention = Retention {
            after: 30 * DAY,
            workspace_dir: root.path().join("workspaces"),
            log_dir: root.path().join("logs"),
        };
        Dirs {
            _root: root,
            retention,
        }
    }

    /// A workspace and logs as the runner leaves them, `bytes` of files in all.
    fn leave_files(r: &Retention, n: u64) -> u64 {
        let [ws, logs] = r.issue_dirs(&key(n));
        std::fs::create_dir_all(ws.join(".git/objects")).unwrap();
        std::fs::write(ws.join(".git/objects/pack"), vec![0u8; 5000]).unwrap();
        std::fs::write(ws.join("README.md"), "hello").unwrap();
        std::fs::create_dir_all(&logs).unwrap();
        for name in [
            "round-1-attempt-1.log",
            "round-1-attempt-1.body",
            "round-1-attempt-1.issue.json",
        ] {
            std::fs::write(logs.join(name), vec![b'x'; 100]).unwrap();
        }
        5000 + 5 + 300
    }

    #[test]
    fn only_issues_settled_longer_ago_than_the_retention_are_due() {
        let d = dirs();
        let now = SystemTime::now();
        let due = |status, age| d.retention.is_due(&record(1, status, age), now);
        for status in [
            IssueStatus::Done,
            IssueStatus::Failed,
            IssueStatus::Cancelled,
        ] {
            assert!(due(status, 31 * DAY), "{status}");
            assert!(!due(status, 29 * DAY), "{status}");
        }
        for status in [
            IssueStatus::Queued,
            IssueStatus::Running,
            IssueStatus::Retrying,
        ] {
            assert!(!due(status, 365 * DAY), "{status}");
        }
        let mut pruned = record(1, IssueStatus::Done, 31 * DAY);
        pruned.pruned_at = Some(now);
        assert!(!d.retention.is_due(&pruned, now));
        // A new round clears the mark: its files are new.
        pruned.start_new_round();
        assert_eq!(pruned.pruned_at, None);
    }

    #[test]
    fn pruning_removes_the_workspace_and_logs_and_counts_their_bytes() {
        let d = dirs();
        let bytes = leave_files(&d.retention, 1);
        let other = leave_files(&d.retention, 2);

        let dry = d.retention.prune_issue(&key(1), true);
        assert_eq!((dry.found, dry.bytes, dry.error), (true, bytes, None));
        assert!(d.retention.issue_dirs(&key(1)).iter().all(|p| p.exists()));

        let freed = d.retention.prune_issue(&key(1), false);
        assert_eq!((freed.found, freed.bytes, freed.error), (true, bytes, None));
        assert!(d.retention.issue_dirs(&key(1)).iter().all(|p| !p.exists()));
        // Another issue's files are untouched.
        assert!(d.retention.issue_dirs(&key(2)).iter().all(|p| p.exists()));
        assert_eq!(d.retention.prune_issue(&key(2), true).bytes, other);

        let again = d.retention.prune_issue(&key(1), false);
        assert_eq!((again.found, again.bytes), (false, 0));
    }

    #[test]
    fn symbolic_links_are_removed_not_followed() {
        let d = dirs();
        leave_files(&d.retention, 1);
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), "keep me").unwrap();
        let [ws, _] = d.retention.issue_dirs(&key(1));
        symlink(outside.path(), ws.join("link-to-dir")).unwrap();
        symlink(outside.path().join("precious"), ws.join("link-to-file")).unwrap();

        let freed = d.retention.prune_issue(&key(1), false);
        assert_eq!(freed.error, None);
        assert!(!ws.exists());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("precious")).unwrap(),
            "keep me"
        );
    }

    #[tokio::test]
    async fn prune_store_marks_what_it_pruned_and_keeps_every_record() {
        let d = dirs();
        let store = MemoryStore::new();
        let old_done = record(1, IssueStatus::Done, 40 * DAY);
        let recent = record(2, IssueStatus::Failed, DAY);
        let old_waiting = record(3, IssueStatus::Retrying, 40 * DAY);
        let old_without_files = record(4, IssueStatus::Cancelled, 40 * DAY);
        for (r, files) in [
            (&old_done, true),
            (&recent, true),
            (&old_waiting, true),
            (&old_without_files, false),
        ] {
            store.put(r).await.unwrap();
            if files {
                leave_files(&d.retention, r.key().number);
            }
        }
        let now = SystemTime::now();

        let dry = prune_store(&store, &d.retention, now, true).await.unwrap();
        assert_eq!(dry.issues.len(), 1, "{dry:?}");
        assert_eq!(dry.issues[0].issue, "acme/app#1");
        assert!(d.retention.issue_dirs(&key(1)).iter().all(|p| p.exists()));
        assert_eq!(store.get(&key(1)).await.unwrap().unwrap().pruned_at, None);

        let report = prune_store(&store, &d.retention, now, false).await.unwrap();
        assert_eq!(report.issues, dry.issues);
        assert_eq!(report.bytes, dry.bytes);
        assert!(report.bytes > 5000);
        assert!(d.retention.issue_dirs(&key(1)).iter().all(|p| !p.exists()));
        for n in [2, 3] {
            assert!(d.retention.issue_dirs(&key(n)).iter().all(|p| p.exists()));
        }
        let records = store.load().await.unwrap();
        assert_eq!(records.len(), 4);
        let pruned = store.get(&key(1)).await.unwrap().unwrap();
        assert!(pruned.pruned_at.is_some());
        assert_eq!(pruned.status, IssueStatus::Done);
        assert_eq!(store.get(&key(4)).await.unwrap().unwrap().pruned_at, None);

        let again = prune_store(&store, &d.retention, now, false).await.unwrap();
        assert!(again.issues.is_empty());
        assert_eq!(again.describe(), "freed 0 B in total, 0 issues");
    }

    #[test]
    fn reports_read_as_people_count_bytes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(11_324_621), "10.8 MiB");
        let mut report = PruneReport {
            dry_run: true,
            ..PruneReport::default()
        };
        report.add(
            &key(7),
            2,
            Freed {
                found: true,
                bytes: 2048,
                error: None,
            },
        );
        assert_eq!(
            report.describe(),
            "acme/app#7: would free 2.0 KiB (round 2)\n\
             would free 2.0 KiB in total, 1 issue (dry run: nothing removed)"
        );
    }

    #[test]
    fn old_records_without_the_mark_still_load() {
        let mut json = serde_json::to_value(record(1, IssueStatus::Done, DAY)).unwrap();
        json.as_object_mut().unwrap().remove("pruned_at");
        let r: IssueRecord = serde_json::from_value(json).unwrap();
        assert_eq!(r.pruned_at, None);
    }
}
