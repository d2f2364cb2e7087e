//! An in-process [`IssueSource`] for tests and embedders: a list of issues
//! the program edits, and a log of every report.

use std::sync::Mutex;

use async_trait::async_trait;

use super::{CancelReport, FailureReport, IssueSource, Report, StartReport, SuccessReport};
use crate::error::SourceError;
use crate::issue::{Issue, IssueKey};
use crate::record::Reports;

/// A report a [`MemorySource`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    /// An attempt started.
    Started(IssueKey, StartReport),
    /// The round succeeded.
    Succeeded(IssueKey, SuccessReport),
    /// The round failed.
    Failed(IssueKey, FailureReport),
    /// The round was cancelled.
    Cancelled(IssueKey, CancelReport),
}

/// An [`IssueSource`] backed by a list in memory: `poll` returns the
/// issues currently in it.
#[derive(Debug, Default)]
pub struct MemorySource {
    issues: Mutex<Vec<Issue>>,
    reports: Mutex<Vec<Reported>>,
}

impl MemorySource {
    /// A source holding these issues.
    pub fn new(issues: impl IntoIterator<Item = Issue>) -> Self {
        Self {
            issues: Mutex::new(issues.into_iter().collect()),
            reports: Mutex::default(),
        }
    }

    /// Adds an issue, or replaces the one with the same key.
    pub fn push(&self, issue: Issue) {
        let mut issues = self.issues.lock().unwrap_or_else(|e| e.into_inner());
        issues.retain(|i| i.key != issue.key);
        issues.push(issue);
    }

    /// Removes an issue; a running attempt for it is cancelled.
    pub fn remove(&self, key: &IssueKey) {
        let mut issues = self.issues.lock().unwrap_or_else(|e| e.into_inner());
        issues.retain(|i| &i.key != key);
    }

    /// Every report received so far, in order.
    pub fn reports(&self) -> Vec<Reported> {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record(&self, r: Reported) {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r);
    }
}

#[async_trait]
impl IssueSource for MemorySource {
    async fn poll(&self) -> Result<Vec<Issue>, SourceError> {
        Ok(self
            .issues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }

    async fn report(
        &self,
        issue: &Issue,
        report: &Report,
        _reports: &mut Reports,
    ) -> Result<(), SourceError> {
        let key = issue.key.clone();
        self.record(match report {
            Report::Started(r) => Reported::Started(key, *r),
            Report::Succeeded(r) => Reported::Succeeded(key, r.clone()),
            Report::Failed(r) => Reported::Failed(key, r.clone()),
            Report::Cancelled(r) => Reported::Cancelled(key, r.clone()),
        });
        Ok(())
    }
}
