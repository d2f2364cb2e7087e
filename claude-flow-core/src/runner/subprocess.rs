//! The workflow executable of CONTRACT section 4, run as a child process.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::guardian::{self, Guardian};
use super::output::{WorkflowOutput, scan_output};
use super::process::{self, GroupGuard};
use super::spawn::{Child, Exit};
use super::{ExitKind, RunOutcome, WorkflowJob, WorkflowRunner};
use crate::error::RunnerError;
use crate::issue::{Issue, IssueKey};
use crate::secret::Secret;

/// Exit code with which a workflow asks to be retried later (`EX_TEMPFAIL`).
pub const EXIT_RETRY_LATER: i32 = 75;

/// How to run workflows.
#[derive(Debug, Clone)]
pub struct SubprocessSettings {
    /// Program and arguments; run without a shell.
    pub command: Vec<String>,
    /// Workspaces live in `<workspace_dir>/<owner>__<repo>/issue-<n>`.
    pub workspace_dir: PathBuf,
    /// Logs go to `<log_dir>/<owner>__<repo>/issue-<n>/round-<r>-attempt-<k>.log`.
    pub log_dir: PathBuf,
    /// Per attempt.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL when stopping a workflow.
    pub kill_grace: Duration,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Exported as `GITHUB_TOKEN` and `GH_TOKEN` when set (`workflow.pass_token`).
    pub token: Option<Secret>,
}

/// Runs each attempt as a child process in its own process group, with the
/// issue in its environment and its output in the attempt's log file.
///
/// With its first workflow the runner forks a small guardian process
/// (`cf-guardian`), which ends whatever the workflows started, including
/// processes that left their process group, within `kill_grace` once this
/// process exits (however it exits) or drops the runner.
#[derive(Debug)]
pub struct SubprocessRunner {
    settings: SubprocessSettings,
    /// `command[0]` as found on `PATH` the last time, so that a spawn costs
    /// one `stat` instead of one per `PATH` entry.
    resolved: Mutex<Option<PathBuf>>,
    /// `CLAUDE_FLOW_INSTANCE` in every workflow's environment: how the
    /// guardian finds what they started.
    instance: String,
    /// Started with the first workflow (and again if it was killed); it
    /// stops what the workflows started when the service dies or drops
    /// this runner.
    guardian: Mutex<Option<Guardian>>,
}

impl SubprocessRunner {
    /// A runner with these settings.
    pub fn new(settings: SubprocessSettings) -> Self {
        Self {
            settings,
            resolved: Mutex::new(None),
            instance: guardian::new_instance(),
            guardian: Mutex::new(None),
        }
    }

    /// Makes sure a guardian watches this runner's workflows. Without one
    /// (fork failed) workflows still die with the service, but what they
    /// started outside their process group may not.
    fn guard(&self) {
        let mut guardian = self.guardian.lock().unwrap_or_else(|e| e.into_inner());
        if guardian.as_ref().is_some_and(Guardian::is_alive) {
            return;
        }
        match Guardian::start(&self.instance, self.settings.kill_grace) {
            Ok(started) => *guardian = Some(started),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot start the guardian; processes that workflows start outside \
                 their process group may outlive the service"
            ),
        }
    }

    /// The workflow program: the cached path while it is still an
    /// executable file, else a fresh `PATH` search.
    fn program(&self, program: &str) -> std::io::Result<PathBuf> {
        let mut cached = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = cached.as_ref()
            && process::is_executable(path)
        {
            return Ok(path.clone());
        }
        let path = process::resolve_program(program)?;
        *cached = Some(path.clone());
        Ok(path)
    }

    /// The settings.
    pub fn settings(&self) -> &SubprocessSettings {
        &self.settings
    }

    /// The issue's workspace directory (kept across attempts).
    pub fn workspace(&self, issue: &Issue) -> PathBuf {
        workspace_dir_for(&self.settings.workspace_dir, &issue.key)
    }

    /// The directory of the issue's attempt logs.
    pub fn log_dir(&self, issue: &Issue) -> PathBuf {
        log_dir_for(&self.settings.log_dir, &issue.key)
    }

    fn prepare(&self, job: &WorkflowJob) -> Result<Prepared, RunnerError> {
        let issue = &job.issue;
        let workspace = self.workspace(issue);
        fs::create_dir_all(&workspace).map_err(io_err(&workspace))?;
        let logs = self.log_dir(issue);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&logs)
            .map_err(io_err(&logs))?;
        let stem = format!("round-{}-attempt-{}", job.round, job.attempt);
        let body_file = logs.join(format!("{stem}.body"));
        write_private(&body_file, issue.body.as_bytes())?;
        let json_file = logs.join(format!("{stem}.issue.json"));
        let json = serde_json::json!({
            "repo": issue.key.repo.to_string(),
            "number": issue.key.number,
            "title": issue.title,
            "body": issue.body,
            "labels": issue.labels,
            "html_url": issue.html_url,
            "author": issue.author,
        });
        write_private(&json_file, json.to_string().as_bytes())?;
        let log_path = logs.join(format!("{stem}.log"));
        let log = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        Ok(Prepared {
            workspace,
            body_file,
            json_file,
            log_path,
            log,
        })
    }

    /// The workflow's environment: the service's own, without its settings
    /// (which may hold the token, through CLAUDE_FLOW_GITHUB__TOKEN), tokens
    /// and systemd's notification variables (only the service speaks to
    /// systemd), plus `workflow.env`, the token when passed, and the
    /// contract's variables, which win.
    fn environment(&self, job: &WorkflowJob, p: &Prepared) -> Vec<(OsString, OsString)> {
        let s = &self.settings;
        let issue = &job.issue;
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
            .filter(|(name, _)| {
                let n = name.to_string_lossy();
                !(n.starts_with("CLAUDE_FLOW_")
                    || matches!(
                        n.as_ref(),
                        "GITHUB_TOKEN"
                            | "GH_TOKEN"
                            | "NOTIFY_SOCKET"
                            | "WATCHDOG_USEC"
                            | "WATCHDOG_PID"
                    ))
            })
            .collect();
        let mut set = |k: &str, v: OsString| {
            env.insert(k.into(), v);
        };
        for (k, v) in &s.env {
            set(k, v.into());
        }
        if let Some(token) = &s.token {
            set("GITHUB_TOKEN", token.expose().into());
            set("GH_TOKEN", token.expose().into());
        }
        set("CLAUDE_FLOW_REPO", issue.key.repo.to_string().into());
        set(
            "CLAUDE_FLOW_ISSUE_NUMBER",
            issue.key.number.to_string().into(),
        );
        set("CLAUDE_FLOW_ISSUE_TITLE", issue.title.clone().into());
        set("CLAUDE_FLOW_ISSUE_URL", issue.html_url.clone().into());
        set("CLAUDE_FLOW_ISSUE_BODY_FILE", p.body_file.clone().into());
        set("CLAUDE_FLOW_ISSUE_JSON_FILE", p.json_file.clone().into());
        set("CLAUDE_FLOW_BRANCH", issue.branch().into());
        set("CLAUDE_FLOW_ROUND", job.round.to_string().into());
        set("CLAUDE_FLOW_ATTEMPT", job.attempt.to_string().into());
        set("CLAUDE_FLOW_WORKSPACE", p.workspace.clone().into());
        set("CLAUDE_FLOW_RUN_ID", job.run_id.clone().into());
        set(guardian::INSTANCE_VAR, self.instance.clone().into());
        env.into_iter().collect()
    }

    fn start(&self, job: &WorkflowJob, p: &Prepared) -> Result<Child, RunnerError> {
        let (program, args) = self
            .settings
            .command
            .split_first()
            .ok_or_else(|| RunnerError::Other("workflow.command is empty".into()))?;
        let spawn_error = |source| RunnerError::Spawn {
            program: program.clone(),
            source,
        };
        let resolved = self.program(program).map_err(spawn_error)?;
        self.guard();
        let env = self.environment(job, p);
        process::start(&resolved, args, &env, &p.workspace, &p.log).map_err(spawn_error)
    }
}

/// Logs up to this size are scanned on the async thread; reading them
/// takes microseconds, less than handing them to a blocking thread.
const SCAN_INLINE_MAX: u64 = 256 * 1024;

/// Finds the PR URL and retry-after line in an attempt's log.
async fn scan_log(path: &Path, issue: &Issue) -> Result<WorkflowOutput, RunnerError> {
    let len = fs::metadata(path).map_err(io_err(path))?.len();
    if len == 0 {
        return Ok(WorkflowOutput::default());
    }
    let scan = {
        let (path, issue) = (path.to_owned(), issue.clone());
        move || {
            File::open(&path).and_then(|f| {
                scan_output(
                    f,
                    Some(len),
                    &issue.key.repo,
                    issue.pr_scope,
                    SystemTime::now(),
                )
            })
        }
    };
    let scanned = if len <= SCAN_INLINE_MAX {
        scan()
    } else {
        tokio::task::spawn_blocking(scan)
            .await
            .map_err(|e| RunnerError::Other(format!("scanning the log: {e}")))?
    };
    scanned.map_err(io_err(path))
}

/// `<workspace_dir>/<owner>__<repo>/issue-<n>`: made only of the key's
/// parts, which `RepoId` keeps free of `/` and `..`.
pub(crate) fn workspace_dir_for(workspace_dir: &Path, key: &IssueKey) -> PathBuf {
    workspace_dir
        .join(key.repo.dir_name())
        .join(format!("issue-{}", key.number))
}

/// `<log_dir>/<owner>__<repo>/issue-<n>`: every attempt's log, body and
/// JSON file of the issue, all rounds.
pub(crate) fn log_dir_for(log_dir: &Path, key: &IssueKey) -> PathBuf {
    workspace_dir_for(log_dir, key)
}

/// Where this runner writes an attempt's log (CONTRACT section 4):
/// `<log_dir>/<owner>__<repo>/issue-<n>/round-<r>-attempt-<k>.log`. A
/// running attempt's record has no `log_path` yet; readers of its log
/// find it here.
pub fn attempt_log_path(log_dir: &Path, key: &IssueKey, round: u32, attempt: u32) -> PathBuf {
    log_dir_for(log_dir, key).join(format!("round-{round}-attempt-{attempt}.log"))
}

struct Prepared {
    workspace: PathBuf,
    body_file: PathBuf,
    json_file: PathBuf,
    log_path: PathBuf,
    log: File,
}

#[async_trait]
impl WorkflowRunner for SubprocessRunner {
    async fn preflight(&self) -> Result<(), RunnerError> {
        let program = self.settings.command.first().cloned().unwrap_or_default();
        super::preflight::check_program(&program)
            .map(drop)
            .map_err(|reason| RunnerError::Unavailable { program, reason })
    }

    async fn run(
        &self,
        job: &WorkflowJob,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, RunnerError> {
        let started = Instant::now();
        let prepared = self.prepare(job)?;
        let mut child = match self.start(job, &prepared) {
            Ok(child) => child,
            Err(e) => {
                // The log is where an operator looks first.
                let mut log = &prepared.log;
                let _ = writeln!(log, "claude-flow: {e}");
                return Err(e);
            }
        };
        let pgid = child.id();
        let guard = GroupGuard::new(pgid);
        tracing::debug!(pid = pgid, log = %prepared.log_path.display(), "workflow started");
        let wait_error =
            |e: std::io::Error| RunnerError::Other(format!("waiting for the workflow: {e}"));
        let timeout = self.settings.timeout;
        let stopped = tokio::select! {
            exited = child.exited() => { exited.map_err(wait_error)?; None }
            () = cancel.cancelled() => Some(ExitKind::Cancelled),
            () = tokio::time::sleep(timeout) => Some(ExitKind::TimedOut(timeout)),
        };
        // Stopping, and what the workflow left in its group after exiting.
        let ended = process::end_group(&mut child, self.settings.kill_grace)
            .await
            .map_err(wait_error)?;
        let exit = stopped.unwrap_or(match ended {
            Exit::Code(code) => ExitKind::Code(code),
            Exit::Signal(signal) => ExitKind::Signal(signal),
        });
        guard.disarm();
        let scanned = scan_log(&prepared.log_path, &job.issue).await?;
        Ok(RunOutcome {
            exit,
            pr_url: scanned.pr_url,
            log_path: Some(prepared.log_path),
            duration: started.elapsed(),
            retry_after: scanned
                .retry_after
                .filter(|_| exit == ExitKind::Code(EXIT_RETRY_LATER)),
        })
    }

    async fn abandon(&self, run_id: &str) -> Result<(), RunnerError> {
        let run_id = run_id.to_owned();
        let killed = tokio::task::spawn_blocking(move || process::kill_by_run_id(&run_id))
            .await
            .map_err(|e| RunnerError::Other(format!("cleaning up: {e}")))?;
        if killed > 0 {
            tracing::warn!(
                killed,
                "killed processes left over from an interrupted attempt"
            );
        }
        Ok(())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), RunnerError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(io_err(path))
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> RunnerError + '_ {
    move |source| RunnerError::Io {
        path: path.to_owned(),
        source,
    }
}
