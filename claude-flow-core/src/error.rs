//! Typed errors, one enum per boundary. Each says whether trying again
//! later can help, which is what the orchestrator acts on.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::issue::IssueKey;

/// An error from an [`IssueSource`](crate::IssueSource).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The source could not be reached or answered with a server error;
    /// the same request may succeed later.
    #[error("{what}: {message}")]
    Unavailable {
        /// What was being done, e.g. `GET /repos/o/r/issues`.
        what: String,
        /// Why it failed.
        message: String,
    },
    /// The source asked us to wait before sending anything more.
    #[error("{what}: rate limited until {}", humantime::format_rfc3339_seconds(*until))]
    RateLimited {
        /// What was being done.
        what: String,
        /// When requests may resume.
        until: SystemTime,
    },
    /// The thing asked for does not exist (or is not visible to us).
    #[error("{what}: not found")]
    NotFound {
        /// What was looked up.
        what: String,
    },
    /// The source refused the request or sent something we cannot use;
    /// repeating it will not help.
    #[error("{what}: {message}")]
    Rejected {
        /// What was being done.
        what: String,
        /// HTTP status, when there is one.
        status: Option<u16>,
        /// The source's own message.
        message: String,
    },
    /// A local file the source reads could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl SourceError {
    /// Whether the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::RateLimited { .. } | Self::Io { .. }
        )
    }
}

/// An error from a [`WorkflowRunner`](crate::WorkflowRunner) that kept it
/// from running the workflow at all. A workflow that ran and failed is not
/// an error but a [`RunOutcome`](crate::RunOutcome).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// The workflow program could not be started.
    #[error("cannot start workflow {program:?}: {source}")]
    Spawn {
        /// The program (argv\[0\]).
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The workflow program cannot be started at all (missing, not
    /// executable, its interpreter missing): found before trying.
    #[error("cannot start workflow {program:?}: {reason}")]
    Unavailable {
        /// The program (argv\[0\]).
        program: String,
        /// Why, and what to do.
        reason: String,
    },
    /// Preparing the attempt (workspace, log file, issue files) failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Any other failure of an embedder's runner.
    #[error("{0}")]
    Other(String),
}

impl RunnerError {
    /// Whether the workflow never started (so no attempt was used): the
    /// program could not be started at all.
    pub fn never_started(&self) -> bool {
        matches!(self, Self::Spawn { .. } | Self::Unavailable { .. })
    }

    /// Whether a later attempt may get further. A missing program stays
    /// missing, but the orchestrator's retry budget bounds that anyway.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Spawn { source, .. } => source.kind() != std::io::ErrorKind::NotFound,
            Self::Unavailable { .. } => false,
            Self::Io { .. } | Self::Other(_) => true,
        }
    }
}

/// An error from a [`StateStore`](crate::StateStore).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process holds the state directory.
    #[error("state directory {} is locked by another instance{}", dir.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// The holder's PID, as it wrote it into the lock file.
        pid: Option<u32>,
    },
    /// A state file exists but cannot be understood. Nothing is replaced
    /// or discarded: an operator must look at it.
    #[error("corrupt state file {}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The 1-based line, for line-oriented files.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing a state file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The store was opened for reading only.
    #[error("the state store is open read-only")]
    ReadOnly,
    /// An earlier write failed; the store refuses further writes so that
    /// memory and disk cannot drift apart.
    #[error("the state store stopped after a failed write: {0}")]
    Failed(String),
    /// The database could not be reached, or refused a statement. The
    /// message never holds the connection URL.
    #[error("PostgreSQL store: {what}: {message}")]
    Database {
        /// What was being done, e.g. `claim ready issues`.
        what: String,
        /// The database's or the driver's message.
        message: String,
        /// Whether the same statement may succeed later (the connection
        /// failed, rather than the statement).
        retryable: bool,
    },
    /// This daemon's claim on a running attempt ran out (it could not
    /// renew it in time), so another daemon may run the issue: this one
    /// must neither write the attempt's record nor go on running it.
    #[error("{issue}: this daemon's claim on the running attempt ran out")]
    LeaseLost {
        /// The issue.
        issue: IssueKey,
    },
    /// The store's configuration is wrong: the database refused the login,
    /// or has no such database (exit code 78, naming the key).
    #[error("configuration error: {0}")]
    Misconfigured(ConfigError),
    /// The database was upgraded by a newer claude-flow.
    #[error(
        "the database's claude-flow schema is at version {found}, newer than this claude-flow \
         knows (up to {known}): upgrade claude-flow on this host; nothing was changed"
    )]
    SchemaTooNew {
        /// The newest migration applied to the database.
        found: i64,
        /// The newest migration this binary has.
        known: i64,
    },
}

impl StoreError {
    /// Whether trying again may help. Store errors are treated as fatal by
    /// the orchestrator, since acting without durable state risks running
    /// an issue twice.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Locked { .. }
                | Self::Database {
                    retryable: true,
                    ..
                }
        )
    }
}

/// An invalid configuration: names the file, and the key or line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{reason}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default(), key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ConfigError {
    /// The configuration file, when one was read.
    pub file: Option<PathBuf>,
    /// The key, dotted (`service.poll_interval`), or `line L column C` for
    /// syntax errors.
    pub key: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    /// An error about one key.
    pub fn key(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            file: None,
            key: Some(key.into()),
            reason: reason.into(),
        }
    }

    /// Attaches the file the configuration came from.
    pub fn in_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.file = Some(file.into());
        self
    }
}

/// Any error the orchestrator or the service wiring can end with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad configuration (exit code 78).
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    /// State store failure (exit code 75 when locked, else 1).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Source failure.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Runner failure.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The issue is not known to the state store.
    #[error("{0} is not known to the state store")]
    UnknownIssue(IssueKey),
    /// What was asked conflicts with where the issue stands, such as
    /// retrying a running issue or cancelling a settled one.
    #[error("{0}")]
    Conflict(String),
    /// The orchestrator is not running (or is stopping), so it cannot take
    /// an operator's command.
    #[error("{0}")]
    NotRunning(String),
    /// The service's HTTP API failed or could not be reached.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The process exit code the CONTRACT assigns to this error: 78 for bad
    /// configuration, 75 for a locked state directory, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Store(StoreError::Misconfigured(_)) => 78,
            Self::Store(StoreError::Locked { .. }) => 75,
            _ => 1,
        }
    }
}
