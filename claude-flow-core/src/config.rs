//! Configuration: one JSON file plus `CLAUDE_FLOW_<SECTION>__<KEY>`
//! environment overrides (CONTRACT section 3).
//!
//! Every error names what to fix: the key (`service.poll_interval: invalid
//! duration "five minutes"`), the line of a syntax error, or the file.
//! Unknown keys are errors, so a typo cannot be silently ignored.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ConfigError;
use crate::issue::RepoId;
use crate::secret::Secret;

/// Where the configuration is read from when no `--config` is given and
/// `CLAUDE_FLOW_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/claude-flow/config.json";

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "CLAUDE_FLOW_";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct Config {
    /// Where issues come from.
    pub source: SourceKind,
    /// The GitHub source.
    #[serde(default)]
    pub github: GithubConfig,
    /// The local-directory source.
    #[serde(default)]
    pub local: LocalConfig,
    /// The workflow to run per issue.
    #[serde(default)]
    pub workflow: WorkflowConfig,
    /// The service itself.
    #[serde(default)]
    pub service: ServiceConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Where records are kept.
    #[serde(default)]
    pub store: StoreConfig,
    /// The file this configuration was read from.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Issues of GitHub repositories.
    Github,
    /// Markdown files in `local.dir`.
    Local,
}

/// `github.*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "snake_case")]
pub struct GithubConfig {
    /// REST base URL.
    pub api_url: String,
    /// The token; see also `token_file` and `GITHUB_TOKEN`.
    pub token: Option<Secret>,
    /// A file holding the token.
    pub token_file: Option<PathBuf>,
    /// `owner/name` of every watched repository.
    pub repos: Vec<RepoId>,
    /// The label that asks for work.
    pub trigger_label: String,
    /// The status labels the service sets.
    pub labels: LabelsConfig,
    /// Minimum permission of whoever applied the trigger label.
    pub trusted_permission: Permission,
    /// Logins trusted regardless of permission.
    pub allowed_users: Vec<String>,
    /// Whether to comment on issues.
    #[serde(deserialize_with = "lenient::bool")]
    pub comment: bool,
    /// Enables `POST /webhook`.
    pub webhook_secret: Option<Secret>,
}

impl Default for GithubConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.github.com".into(),
            token: None,
            token_file: None,
            repos: Vec::new(),
            trigger_label: "claude-flow".into(),
            labels: LabelsConfig::default(),
            trusted_permission: Permission::Write,
            allowed_users: Vec::new(),
            comment: true,
            webhook_secret: None,
        }
    }
}

/// `github.labels.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "snake_case")]
pub struct LabelsConfig {
    /// Set while a round runs.
    pub in_progress: String,
    /// Set when a round succeeded.
    pub done: String,
    /// Set when a round failed.
    pub failed: String,
}

impl Default for LabelsConfig {
    fn default() -> Self {
        Self {
            in_progress: "claude-flow:in-progress".into(),
            done: "claude-flow:done".into(),
            failed: "claude-flow:failed".into(),
        }
    }
}

/// A repository permission level, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Anyone at all.
    None,
    /// Read.
    Read,
    /// Triage.
    Triage,
    /// Write (push).
    Write,
    /// Maintain.
    Maintain,
    /// Admin.
    Admin,
}

/// `local.*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "snake_case")]
pub struct LocalConfig {
    /// The directory of issue files.
    pub dir: Option<PathBuf>,
}

/// `workflow.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "snake_case")]
pub struct WorkflowConfig {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Per attempt.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// SIGTERM, then SIGKILL after this.
    #[serde(with = "duration")]
    pub kill_grace: Duration,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Export the token to the workflow.
    #[serde(deserialize_with = "lenient::bool")]
    pub pass_token: bool,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        Self {
            command: Vec::new(),
            timeout: Duration::from_secs(2 * 3600),
            kill_grace: Duration::from_secs(10),
            env: BTreeMap::new(),
            pass_token: false,
        }
    }
}

/// `service.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "snake_case")]
pub struct ServiceConfig {
    /// Between polls.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// Workflows running at once.
    #[serde(deserialize_with = "lenient::u32")]
    pub max_concurrent: u32,
    /// Failed attempts per round before the issue is marked failed.
    #[serde(deserialize_with = "lenient::u32")]
    pub max_attempts: u32,
    /// Base of the exponential backoff.
    #[serde(with = "duration")]
    pub retry_backoff: Duration,
    /// Cap of the exponential backoff.
    #[serde(with = "duration")]
    pub retry_backoff_max: Duration,
    /// State store, lock, and default logs and workspaces.
    pub state_dir: PathBuf,
    /// Defaults to `<state_dir>/workspaces`.
    pub workspace_dir: Option<PathBuf>,
    /// Defaults to `<state_dir>/logs`.
    pub log_dir: Option<PathBuf>,
    /// Written by the daemon when set.
    pub pid_file: Option<PathBuf>,
    /// HTTP address; empty disables.
    pub listen: String,
    /// How long a graceful stop waits for running workflows.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// The longest pause a quota marker can impose.
    #[serde(with = "duration")]
    pub max_pause: Duration,
    /// Interruptions in a row (the service stopping mid-attempt) after
    /// which an attempt fails its round instead of running again.
    #[serde(deserialize_with = "lenient::u32")]
    pub max_interruptions: u32,
    /// Workspaces and logs of issues settled longer ago than this are
    /// removed (their records stay); `None` (JSON `null`) keeps everything.
    #[serde(with = "optional_duration")]
    pub retention: Option<Duration>,
    /// The HTTP API's token for its operator endpoints; see also
    /// `api_token_file`. Without either, the daemon makes one at start.
    pub api_token: Option<Secret>,
    /// A file holding the HTTP API's token.
    pub api_token_file: Option<PathBuf>,
    /// This daemon's name among several sharing a store: recorded with
    /// each attempt it runs and shown in `status`.
    pub node: String,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(300),
            max_concurrent: 2,
            max_attempts: 3,
            retry_backoff: Duration::from_secs(60),
            retry_backoff_max: Duration::from_secs(3600),
            state_dir: PathBuf::from("/var/lib/claude-flow"),
            workspace_dir: None,
            log_dir: None,
            pid_file: None,
            listen: "127.0.0.1:8787".into(),
            shutdown_grace: Duration::from_secs(30),
            max_pause: Duration::from_secs(6 * 3600),
            max_interruptions: 3,
            retention: Some(Duration::from_secs(30 * 86_400)),
            api_token: None,
            api_token_file: None,
            node: host_name(),
        }
    }
}

/// The machine's host name, the default `service.node`.
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl ServiceConfig {
    /// `workspace_dir`, or its default under the state directory.
    pub fn workspace_dir(&self) -> PathBuf {
        self.workspace_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("workspaces"))
    }

    /// `log_dir`, or its default under the state directory.
    pub fn log_dir(&self) -> PathBuf {
        self.log_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("logs"))
    }
}

/// `store.*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "snake_case")]
pub struct StoreConfig {
    /// Which store keeps the records.
    pub kind: StoreKind,
    /// The PostgreSQL store.
    pub postgres: PostgresConfig,
}

/// `store.kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// The state directory's journal: one daemon, no setup.
    #[default]
    File,
    /// A PostgreSQL database that several daemons share.
    Postgres,
}

/// `store.postgres.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "snake_case")]
pub struct PostgresConfig {
    /// A libpq-style URL (`postgres://user:password@host/db`); a secret,
    /// since it may hold the password. See also `url_file`.
    pub url: Option<Secret>,
    /// A file holding the URL.
    pub url_file: Option<PathBuf>,
    /// How long a daemon's claim on a running attempt lasts without
    /// renewal.
    #[serde(with = "duration")]
    pub lease: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            lease: Duration::from_secs(30),
        }
    }
}

/// `log.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "snake_case")]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `claude_flow_core=debug,info`...
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// Reads `path` and applies overrides from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Reads `path` and applies overrides from `env`.
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            key: None,
            reason: format!("cannot read the configuration file: {e}"),
        })?;
        // Workflows run in their workspace, so paths must not stay
        // relative to the current directory.
        let folder = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(folder).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            key: None,
            reason: format!("cannot resolve the configuration's folder: {e}"),
        })?;
        let mut config = Self::parse(&text, &base, env).map_err(|e| e.in_file(path))?;
        config.file = Some(path.to_owned());
        Ok(config)
    }

    /// Parses JSON text, applies `env` overrides, resolves relative paths
    /// against `base_dir`, and validates.
    pub fn parse(
        text: &str,
        base_dir: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value: Value = serde_json::from_str(text).map_err(|e| ConfigError {
            file: None,
            key: Some(format!("line {} column {}", e.line(), e.column())),
            reason: format!("invalid JSON: {e}"),
        })?;
        if !value.is_object() {
            return Err(ConfigError {
                file: None,
                key: None,
                reason: "the configuration must be a JSON object".into(),
            });
        }
        let from_env = apply_env(&mut value, env)?;
        let mut config = deserialize(value, &from_env)?;
        config.resolve_paths(base_dir);
        config.validate()?;
        Ok(config)
    }

    /// The GitHub token: `github.token`, else the contents of
    /// `github.token_file`, else `GITHUB_TOKEN`.
    pub fn github_token(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(token) = &self.github.token {
            return Ok(Some(token.clone()));
        }
        if let Some(file) = &self.github.token_file {
            return read_secret_file("github.token_file", file).map(Some);
        }
        Ok(std::env::var("GITHUB_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(Secret::new))
    }

    /// The HTTP API's token when the configuration sets one:
    /// `service.api_token`, else the contents of `service.api_token_file`
    /// (read now, trimmed). `None`: the daemon makes its own at start
    /// (`api::token`).
    pub fn api_token(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(token) = &self.service.api_token {
            return Ok(Some(token.clone()));
        }
        self.service
            .api_token_file
            .as_deref()
            .map(|file| read_secret_file("service.api_token_file", file))
            .transpose()
    }

    /// The PostgreSQL URL: `store.postgres.url`, else the contents of
    /// `store.postgres.url_file` (read now, trimmed). Errors name the key,
    /// never the URL, which may hold a password.
    pub fn postgres_url(&self) -> Result<Secret, ConfigError> {
        let postgres = &self.store.postgres;
        let (key, url) = match (&postgres.url, &postgres.url_file) {
            (Some(url), _) => ("store.postgres.url", url.clone()),
            (None, Some(file)) => (
                "store.postgres.url_file",
                read_secret_file("store.postgres.url_file", file)?,
            ),
            (None, None) => {
                return Err(ConfigError::key(
                    "store.postgres.url",
                    "required when store.kind is \"postgres\" (or store.postgres.url_file), \
                     e.g. \"postgres://claude_flow@db.internal/claude_flow\"",
                ));
            }
        };
        let text = url.expose().trim();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err(ConfigError::key(
                key,
                "not a PostgreSQL URL: it must start with postgres:// or postgresql:// \
                 (the value is not shown, since it may hold a password)",
            ));
        }
        Ok(Secret::new(text))
    }

    /// The configuration as `config show` prints it: effective values,
    /// secrets redacted.
    pub fn to_redacted_json(&self) -> Value {
        let mut shown = self.clone();
        shown.service.workspace_dir = Some(self.service.workspace_dir());
        shown.service.log_dir = Some(self.service.log_dir());
        // workflow.env is where API keys for the agent go.
        for (name, value) in &mut shown.workflow.env {
            if looks_secret(name) {
                *value = crate::secret::REDACTED.to_owned();
            }
        }
        // Secret's Serialize impl redacts.
        serde_json::to_value(&shown).unwrap_or(Value::Null)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        if let Some(d) = &mut self.local.dir {
            abs(d);
        }
        for f in [
            &mut self.github.token_file,
            &mut self.service.api_token_file,
            &mut self.store.postgres.url_file,
        ]
        .into_iter()
        .flatten()
        {
            abs(f);
        }
        abs(&mut self.service.state_dir);
        for p in [
            &mut self.service.workspace_dir,
            &mut self.service.log_dir,
            &mut self.service.pid_file,
        ]
        .into_iter()
        .flatten()
        {
            abs(p);
        }
        // Relative paths in the command are the config folder's: argv[0]
        // with a slash and arguments starting with ./ or ../ always, and any
        // other relative element that names a file there (`workflow.sh`,
        // or `["bash", "workflow.sh"]`), since the workflow runs in its
        // workspace, where such a path would not resolve. Anything else is
        // left alone: a bare program name is looked up on PATH, a plain
        // word stays a word.
        for (i, arg) in self.workflow.command.iter_mut().enumerate() {
            if arg.is_empty() || arg.starts_with('/') || arg.starts_with('-') {
                continue;
            }
            let explicit = if i == 0 {
                arg.contains('/')
            } else {
                arg.starts_with("./") || arg.starts_with("../")
            };
            let candidate = normalize(&base.join(&*arg));
            if explicit || candidate.is_file() {
                *arg = candidate.to_string_lossy().into_owned();
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match self.source {
            SourceKind::Github => {
                if self.github.repos.is_empty() {
                    return Err(ConfigError::key(
                        "github.repos",
                        "required when source is \"github\" (a list of \"owner/name\")",
                    ));
                }
                if !(self.github.api_url.starts_with("https://")
                    || self.github.api_url.starts_with("http://"))
                {
                    return Err(ConfigError::key(
                        "github.api_url",
                        format!("{:?} is not an http(s) URL", self.github.api_url),
                    ));
                }
            }
            SourceKind::Local => {
                if self.local.dir.is_none() {
                    return Err(ConfigError::key(
                        "local.dir",
                        "required when source is \"local\"",
                    ));
                }
            }
        }
        if self.workflow.command.first().is_none_or(String::is_empty) {
            return Err(ConfigError::key(
                "workflow.command",
                "required: the workflow's program and arguments, e.g. [\"./workflow.sh\"]",
            ));
        }
        let positive = [
            ("workflow.timeout", self.workflow.timeout),
            ("service.poll_interval", self.service.poll_interval),
            ("service.retry_backoff", self.service.retry_backoff),
            ("service.max_pause", self.service.max_pause),
            ("store.postgres.lease", self.store.postgres.lease),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(ConfigError::key(key, "must be longer than 0s"));
            }
        }
        if self.service.retention.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::key(
                "service.retention",
                "must be longer than 0s, which would remove a workspace as its issue settles \
                 (null keeps everything)",
            ));
        }
        for (key, value) in [
            ("service.max_concurrent", self.service.max_concurrent),
            ("service.max_attempts", self.service.max_attempts),
            ("service.max_interruptions", self.service.max_interruptions),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "must be at least 1"));
            }
        }
        if self
            .service
            .api_token
            .as_ref()
            .is_some_and(|t| t.expose().trim().is_empty())
        {
            return Err(ConfigError::key(
                "service.api_token",
                "must not be empty (leave it out to have the daemon make a token)",
            ));
        }
        if self.service.node.trim().is_empty() {
            return Err(ConfigError::key(
                "service.node",
                "must not be empty (leave it out to use the host name)",
            ));
        }
        if self.store.kind == StoreKind::Postgres {
            // A URL given inline is checked now; a file is read where it
            // is used, as the token files are.
            if self.store.postgres.url.is_some() || self.store.postgres.url_file.is_none() {
                self.postgres_url()?;
            }
            // A daemon that loses the database stops its workflows within
            // half the lease plus the kill grace; that must end before the
            // lease does, when another daemon may start the same issue.
            if self.workflow.kill_grace * 2 >= self.store.postgres.lease {
                return Err(ConfigError::key(
                    "store.postgres.lease",
                    format!(
                        "{} must be more than twice workflow.kill_grace ({}), so that a daemon \
                         that loses the database has stopped its workflows before another may \
                         start them",
                        humantime::format_duration(self.store.postgres.lease),
                        humantime::format_duration(self.workflow.kill_grace)
                    ),
                ));
            }
        }
        if self.service.retry_backoff_max < self.service.retry_backoff {
            return Err(ConfigError::key(
                "service.retry_backoff_max",
                format!(
                    "{} is shorter than service.retry_backoff ({}); the cap must be at least the base",
                    humantime::format_duration(self.service.retry_backoff_max),
                    humantime::format_duration(self.service.retry_backoff)
                ),
            ));
        }
        // A bare word is a target name to tracing, so a misspelt level
        // ("inof") would silently hide every line: only levels may be bare.
        let level = self.log.level.trim();
        let bare = !level.contains(['=', ',', ':', '[']);
        const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
        if bare && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(ConfigError::key(
                "log.level",
                format!(
                    "{level:?} is not a level: use error, warn, info, debug or trace, or a \
                     filter directive such as \"info,claude_flow_core=debug\""
                ),
            ));
        }
        if !self.service.listen.is_empty() {
            let Ok(addr) = self.service.listen.parse::<SocketAddr>() else {
                return Err(ConfigError::key(
                    "service.listen",
                    format!(
                        "{:?} is not an address such as \"127.0.0.1:8787\" (\"\" disables HTTP)",
                        self.service.listen
                    ),
                ));
            };
            // The generated token suits one machine; anything reachable
            // from elsewhere gets a token its operator chose and keeps.
            let explicit_token =
                self.service.api_token.is_some() || self.service.api_token_file.is_some();
            if !addr.ip().to_canonical().is_loopback() && !explicit_token {
                return Err(ConfigError::key(
                    "service.listen",
                    format!(
                        "{:?} is reachable from other machines, so the HTTP API needs a token \
                         of your own: set service.api_token_file (or service.api_token) to a \
                         long random secret, or listen on 127.0.0.1",
                        self.service.listen
                    ),
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::key(
                "log.level",
                format!("invalid filter {:?}: {e}", self.log.level),
            ));
        }
        Ok(())
    }
}

/// A secret kept in a file (`github.token_file`, `service.api_token_file`):
/// its contents, trimmed; unreadable or empty is an error naming `key`.
fn read_secret_file(key: &str, file: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::key(key, format!("cannot read {}: {e}", file.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ConfigError::key(
            key,
            format!("{} is empty", file.display()),
        ));
    }
    Ok(Secret::new(token))
}

/// Whether an environment variable's name says it holds a secret.
fn looks_secret(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    ["TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL"]
        .iter()
        .any(|word| name.contains(word))
}

/// Removes `.` and `..` components without touching the file system (the
/// paths may not exist yet), so that shown paths read naturally.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Applies `CLAUDE_FLOW_<SECTION>__<KEY>=value` overrides. Returns which
/// dotted keys came from which variable, so that errors can say so.
fn apply_env(
    value: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<HashMap<String, String>, ConfigError> {
    let mut from_env = HashMap::new();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let rest = &name[ENV_PREFIX.len()..];
        // Other CLAUDE_FLOW_* variables (CLAUDE_FLOW_CONFIG, the workflow
        // contract's) are not overrides.
        if !rest.contains("__") && rest != "SOURCE" {
            continue;
        }
        let raw_path: Vec<&str> = rest.split("__").collect();
        // Keys are case-insensitive, but the names in workflow.env are
        // environment variables, whose case matters.
        let in_env_map = raw_path.len() > 2
            && raw_path[0].eq_ignore_ascii_case("workflow")
            && raw_path[1].eq_ignore_ascii_case("env");
        let path: Vec<String> = raw_path
            .iter()
            .enumerate()
            .map(|(i, part)| {
                if in_env_map && i >= 2 {
                    (*part).to_owned()
                } else {
                    part.to_lowercase()
                }
            })
            .collect();
        let dotted = path.join(".");
        let key_name = format!("{dotted} (from {name})");
        let parsed = if raw.trim_start().starts_with(['[', '{']) {
            serde_json::from_str(&raw)
                .map_err(|e| ConfigError::key(&key_name, format!("invalid JSON: {e}")))?
        } else {
            Value::String(raw)
        };
        let mut node = &mut *value;
        for (i, part) in path.iter().enumerate() {
            if part.is_empty() {
                return Err(ConfigError::key(&key_name, "empty key segment"));
            }
            let Value::Object(map) = node else {
                return Err(ConfigError::key(&key_name, "its parent is not a section"));
            };
            if i + 1 == path.len() {
                map.insert(part.clone(), parsed.clone());
                break;
            }
            node = map
                .entry(part.clone())
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
        }
        from_env.insert(dotted, name);
    }
    Ok(from_env)
}

fn deserialize(value: Value, from_env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let mut unknown = Vec::new();
    let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut on_unknown);
    let result: Result<Config, _> = serde_path_to_error::deserialize(de);
    let name_key = |key: String| match from_env.get(&key) {
        Some(var) => format!("{key} (from {var})"),
        None => key,
    };
    if let Some(key) = unknown.into_iter().next() {
        return Err(ConfigError::key(name_key(key), "unknown key"));
    }
    result.map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // serde reports a missing field at its parent; name the field.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            let key = if path == "." {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
            return ConfigError::key(name_key(key), "required");
        }
        ConfigError::key(name_key(path), message)
    })
}

/// Durations as humantime strings (`"90s"`, `"5m"`), with errors that
/// quote the bad value.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration such as \"90s\" or \"5m\"")
        })?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?} ({e})")))
    }
}

/// A duration that may be `null` (JSON, or the string `null` from an
/// environment override): "never".
mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use serde_json::Value;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            Value::String(text) if text.trim() == "null" => Ok(None),
            Value::String(text) => humantime::parse_duration(text.trim())
                .map(Some)
                .map_err(|e| D::Error::custom(format!("invalid duration {text:?} ({e})"))),
            other => Err(D::Error::custom(format!(
                "expected a duration such as \"30d\", or null, got {other}"
            ))),
        }
    }
}

/// Numbers and booleans that also accept strings, since environment
/// overrides always arrive as strings.
mod lenient {
    use serde::{Deserialize, Deserializer, de::Error};
    use serde_json::Value;

    pub(super) fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| n.try_into().ok())
                .ok_or_else(|| D::Error::custom(format!("{n} is not a whole number >= 0"))),
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| D::Error::custom(format!("{s:?} is not a whole number >= 0"))),
            other => Err(D::Error::custom(format!("expected a number, got {other}"))),
        }
    }

    pub(super) fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(b) => Ok(b),
            Value::String(s) => match s.trim() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(D::Error::custom(format!("{s:?} is not true or false"))),
            },
            other => Err(D::Error::custom(format!(
                "expected true or false, got {other}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"source": "local", "local": {"dir": "issues"},
        "workflow": {"command": ["./wf.sh", "--flag", "./data"]}}"#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        Config::parse(text, Path::new("/etc/cf"), env)
    }

    fn err(text: &str, env: &[(&str, &str)]) -> String {
        parse(text, env).unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_every_optional_key() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.service.poll_interval, Duration::from_secs(300));
        assert_eq!(c.service.max_concurrent, 2);
        assert_eq!(c.service.max_attempts, 3);
        assert_eq!(c.workflow.timeout, Duration::from_secs(7200));
        assert_eq!(c.github.trigger_label, "claude-flow");
        assert_eq!(c.github.labels.in_progress, "claude-flow:in-progress");
        assert_eq!(c.github.trusted_permission, Permission::Write);
        assert_eq!(
            c.service.workspace_dir(),
            Path::new("/var/lib/claude-flow/workspaces")
        );
        assert_eq!(c.service.listen, "127.0.0.1:8787");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.local.dir.as_deref(), Some(Path::new("/etc/cf/issues")));
        assert_eq!(
            c.workflow.command,
            ["/etc/cf/wf.sh", "--flag", "/etc/cf/data"]
        );
    }

    #[test]
    fn command_elements_naming_files_in_the_config_folder_are_resolved() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("workflow.sh"), "").unwrap();
        let text = r#"{"source": "local", "local": {"dir": "issues"},
            "workflow": {"command": ["workflow.sh", "--verbose", "workflow.sh", "word"]}}"#;
        let c = Config::parse(text, dir.path(), Vec::new()).unwrap();
        let file = dir
            .path()
            .join("workflow.sh")
            .to_string_lossy()
            .into_owned();
        assert_eq!(
            c.workflow.command,
            [file.as_str(), "--verbose", file.as_str(), "word"]
        );
        let bash = r#"{"source": "local", "local": {"dir": "i"}, "workflow": {"command": ["bash", "workflow.sh"]}}"#;
        let c = Config::parse(bash, dir.path(), Vec::new()).unwrap();
        assert_eq!(c.workflow.command, ["bash", file.as_str()]);
    }

    #[test]
    fn errors_name_the_key() {
        let text = MINIMAL.replace(
            "\"workflow\"",
            "\"service\": {\"poll_interval\": \"five minutes\"}, \"workflow\"",
        );
        let e = err(&text, &[]);
        assert!(
            e.contains("service.poll_interval: invalid duration \"five minutes\""),
            "{e}"
        );
        let e = err(&MINIMAL.replace("\"local\":", "\"locl\":"), &[]);
        assert!(e.contains("locl: unknown key"), "{e}");
        let e = err(&MINIMAL.replace("\"dir\"", "\"dri\""), &[]);
        assert!(e.contains("local.dri: unknown key"), "{e}");
        let e = err(r#"{"workflow": {"command": ["x"]}}"#, &[]);
        assert!(e.starts_with("source: required"), "{e}");
        let e = err(r#"{"source": "gitlab"}"#, &[]);
        assert!(e.starts_with("source: unknown variant `gitlab`"), "{e}");
        let e = err(
            r#"{"source": "github", "workflow": {"command": ["x"]}}"#,
            &[],
        );
        assert!(e.starts_with("github.repos: required"), "{e}");
        let e = err(
            &MINIMAL.replace("[\"./wf.sh\", \"--flag\", \"./data\"]", "[]"),
            &[],
        );
        assert!(e.starts_with("workflow.command: required"), "{e}");
        let e = err(
            r#"{"source": "github", "github": {"repos": ["nope"]}}"#,
            &[],
        );
        assert!(
            e.starts_with("github.repos[0]: invalid repository \"nope\""),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = err("{\n  \"source\": \"local\",\n  oops\n}", &[]);
        assert!(e.starts_with("line 3 column 3: invalid JSON"), "{e}");
    }

    #[test]
    fn environment_overrides_win_and_are_typed_leniently() {
        let c = parse(
            MINIMAL,
            &[
                ("CLAUDE_FLOW_SERVICE__MAX_CONCURRENT", "4"),
                ("CLAUDE_FLOW_GITHUB__TOKEN", "12345"),
                ("CLAUDE_FLOW_GITHUB__COMMENT", "false"),
                ("CLAUDE_FLOW_GITHUB__LABELS__DONE", "shipped"),
                ("CLAUDE_FLOW_SERVICE__POLL_INTERVAL", "90s"),
                ("CLAUDE_FLOW_GITHUB__REPOS", r#"["a/b"]"#),
                ("CLAUDE_FLOW_CONFIG", "/elsewhere.json"),
                ("CLAUDE_FLOW_ISSUE_TITLE", "not an override"),
            ],
        )
        .unwrap();
        assert_eq!(c.service.max_concurrent, 4);
        assert_eq!(c.github.token.as_ref().map(Secret::expose), Some("12345"));
        assert!(!c.github.comment);
        assert_eq!(c.github.labels.done, "shipped");
        assert_eq!(c.service.poll_interval, Duration::from_secs(90));
        assert_eq!(c.github.repos, ["a/b".parse::<RepoId>().unwrap()]);
    }

    #[test]
    fn workflow_env_names_keep_their_case_in_overrides() {
        let c = parse(
            MINIMAL,
            &[("CLAUDE_FLOW_WORKFLOW__ENV__CLAUDE_FLOW_AGENT_MODEL", "opus")],
        )
        .unwrap();
        assert_eq!(
            c.workflow
                .env
                .get("CLAUDE_FLOW_AGENT_MODEL")
                .map(String::as_str),
            Some("opus")
        );
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let e = err(MINIMAL, &[("CLAUDE_FLOW_SERVICE__MAX_CONCURRENT", "many")]);
        assert!(
            e.starts_with("service.max_concurrent (from CLAUDE_FLOW_SERVICE__MAX_CONCURRENT):"),
            "{e}"
        );
        let e = err(MINIMAL, &[("CLAUDE_FLOW_SERVICE__POL_INTERVAL", "1m")]);
        assert!(
            e.contains(
                "service.pol_interval (from CLAUDE_FLOW_SERVICE__POL_INTERVAL): unknown key"
            ),
            "{e}"
        );
    }

    #[test]
    fn the_api_token_keys_are_secrets_read_like_the_github_token() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api-token.txt"), "  from-a-file\n").unwrap();
        let with_file = MINIMAL.replace(
            "\"workflow\"",
            "\"service\": {\"api_token_file\": \"api-token.txt\"}, \"workflow\"",
        );
        let c = Config::parse(&with_file, dir.path(), Vec::new()).unwrap();
        assert_eq!(
            c.service.api_token_file.as_deref(),
            Some(dir.path().join("api-token.txt").as_path())
        );
        let token = c.api_token().unwrap().unwrap();
        assert_eq!(token.expose(), "from-a-file");

        // The key wins over the file, as github.token does.
        let c = Config::parse(
            &with_file,
            dir.path(),
            [(
                "CLAUDE_FLOW_SERVICE__API_TOKEN".to_owned(),
                "s3cr3t-t0ken".to_owned(),
            )],
        )
        .unwrap();
        assert_eq!(c.api_token().unwrap().unwrap().expose(), "s3cr3t-t0ken");
        let shown = c.to_redacted_json();
        assert_eq!(shown["service"]["api_token"], "[redacted]");
        assert!(!shown.to_string().contains("s3cr3t-t0ken"), "{shown}");
        assert!(!format!("{c:?}").contains("s3cr3t-t0ken"));

        std::fs::write(dir.path().join("api-token.txt"), "\n").unwrap();
        let c = Config::parse(&with_file, dir.path(), Vec::new()).unwrap();
        let e = c.api_token().unwrap_err().to_string();
        assert!(e.starts_with("service.api_token_file: "), "{e}");
        assert!(e.contains("is empty"), "{e}");
        std::fs::remove_file(dir.path().join("api-token.txt")).unwrap();
        let e = c.api_token().unwrap_err().to_string();
        assert!(e.starts_with("service.api_token_file: cannot read "), "{e}");

        assert_eq!(parse(MINIMAL, &[]).unwrap().api_token().unwrap(), None);
        let e = err(MINIMAL, &[("CLAUDE_FLOW_SERVICE__API_TOKEN", "")]);
        assert!(e.starts_with("service.api_token: "), "{e}");
    }

    #[test]
    fn listening_beyond_loopback_needs_an_explicit_api_token() {
        let listen = |addr: &str, token: &[(&str, &str)]| {
            let text = MINIMAL.replace(
                "\"workflow\"",
                &format!("\"service\": {{\"listen\": {addr:?}}}, \"workflow\""),
            );
            parse(&text, token)
        };
        for addr in [
            "0.0.0.0:8787",
            "[::]:8787",
            "192.168.1.5:80",
            "[2001:db8::1]:80",
        ] {
            let e = listen(addr, &[]).unwrap_err().to_string();
            assert!(e.starts_with("service.listen: "), "{addr}: {e}");
            assert!(e.contains("service.api_token"), "{addr}: {e}");
            assert!(
                listen(addr, &[("CLAUDE_FLOW_SERVICE__API_TOKEN", "t")]).is_ok(),
                "{addr}"
            );
            assert!(
                listen(
                    addr,
                    &[("CLAUDE_FLOW_SERVICE__API_TOKEN_FILE", "/etc/cf/t")]
                )
                .is_ok(),
                "{addr}"
            );
        }
        for addr in ["127.0.0.1:8787", "127.0.0.2:1", "[::1]:8787", ""] {
            assert!(listen(addr, &[]).is_ok(), "{addr}");
        }
    }

    #[test]
    fn retention_defaults_to_30_days_and_null_keeps_everything() {
        let days = |d: u64| Some(Duration::from_secs(d * 86_400));
        assert_eq!(parse(MINIMAL, &[]).unwrap().service.retention, days(30));
        let with = |value: &str| {
            MINIMAL.replace(
                "\"workflow\"",
                &format!("\"service\": {{\"retention\": {value}}}, \"workflow\""),
            )
        };
        assert_eq!(
            parse(&with("\"7d\""), &[]).unwrap().service.retention,
            days(7)
        );
        let kept = parse(&with("null"), &[]).unwrap();
        assert_eq!(kept.service.retention, None);
        assert!(kept.to_redacted_json()["service"]["retention"].is_null());
        assert_eq!(
            parse(MINIMAL, &[("CLAUDE_FLOW_SERVICE__RETENTION", "null")])
                .unwrap()
                .service
                .retention,
            None
        );
        assert_eq!(
            parse(MINIMAL, &[("CLAUDE_FLOW_SERVICE__RETENTION", "12h")])
                .unwrap()
                .service
                .retention,
            Some(Duration::from_secs(12 * 3600))
        );
        let shown = parse(&with("\"7d\""), &[]).unwrap().to_redacted_json();
        assert_eq!(shown["service"]["retention"], "7days");

        let e = err(&with("\"a month\""), &[]);
        assert!(
            e.starts_with("service.retention: invalid duration \"a month\""),
            "{e}"
        );
        let e = err(&with("30"), &[]);
        assert!(e.starts_with("service.retention: "), "{e}");
        assert!(e.contains("null"), "{e}");
        let e = err(&with("\"0s\""), &[]);
        assert!(e.starts_with("service.retention: "), "{e}");
        assert!(e.contains("null keeps everything"), "{e}");
        let e = err(MINIMAL, &[("CLAUDE_FLOW_SERVICE__RETENTION", "soon")]);
        assert!(
            e.starts_with("service.retention (from CLAUDE_FLOW_SERVICE__RETENTION): "),
            "{e}"
        );
    }

    #[test]
    fn config_show_redacts_secrets() {
        let c = parse(
            MINIMAL,
            &[
                ("CLAUDE_FLOW_GITHUB__TOKEN", "ghp_secret"),
                ("CLAUDE_FLOW_GITHUB__WEBHOOK_SECRET", "hook"),
            ],
        )
        .unwrap();
        let shown = c.to_redacted_json().to_string();
        assert!(
            !shown.contains("ghp_secret") && !shown.contains("hook\""),
            "{shown}"
        );
        assert!(shown.contains("[redacted]"));
        let with_env = parse(
            MINIMAL,
            &[
                ("CLAUDE_FLOW_WORKFLOW__ENV__ANTHROPIC_API_KEY", "sk-ant-123"),
                ("CLAUDE_FLOW_WORKFLOW__ENV__CLAUDE_FLOW_AGENT_MODEL", "opus"),
            ],
        )
        .unwrap()
        .to_redacted_json();
        assert_eq!(
            with_env["workflow"]["env"]["ANTHROPIC_API_KEY"],
            "[redacted]"
        );
        assert_eq!(
            with_env["workflow"]["env"]["CLAUDE_FLOW_AGENT_MODEL"],
            "opus"
        );
        assert!(shown.contains("\"poll_interval\":\"5m\""), "{shown}");
    }

    #[test]
    fn the_store_defaults_to_the_file_journal_on_this_host() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.store.kind, StoreKind::File);
        assert_eq!(c.store.postgres.lease, Duration::from_secs(30));
        assert_eq!(c.service.node, host_name());
        assert!(!c.service.node.is_empty());
        let shown = c.to_redacted_json();
        assert_eq!(shown["store"]["kind"], "file");
        assert_eq!(shown["store"]["postgres"]["lease"], "30s");
    }

    #[test]
    fn the_postgres_store_is_chosen_and_tuned_by_key_or_environment() {
        let url = "postgres://cf:hunter2@db.internal/claude_flow";
        let c = parse(
            MINIMAL,
            &[
                ("CLAUDE_FLOW_STORE__KIND", "postgres"),
                ("CLAUDE_FLOW_STORE__POSTGRES__URL", url),
                ("CLAUDE_FLOW_STORE__POSTGRES__LEASE", "45s"),
                ("CLAUDE_FLOW_SERVICE__NODE", "worker-2"),
            ],
        )
        .unwrap();
        assert_eq!(c.store.kind, StoreKind::Postgres);
        assert_eq!(c.store.postgres.lease, Duration::from_secs(45));
        assert_eq!(c.service.node, "worker-2");
        assert_eq!(c.postgres_url().unwrap().expose(), url);
        let shown = c.to_redacted_json();
        assert_eq!(shown["store"]["postgres"]["url"], "[redacted]");
        assert!(!shown.to_string().contains("hunter2"), "{shown}");
        assert!(!format!("{c:?}").contains("hunter2"));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db-url"), format!("{url}\n")).unwrap();
        let text = MINIMAL.replace(
            "\"workflow\"",
            r#""store": {"kind": "postgres", "postgres": {"url_file": "db-url"}}, "workflow""#,
        );
        let c = Config::parse(&text, dir.path(), Vec::new()).unwrap();
        assert_eq!(
            c.store.postgres.url_file.as_deref(),
            Some(dir.path().join("db-url").as_path())
        );
        assert_eq!(c.postgres_url().unwrap().expose(), url);
    }

    #[test]
    fn store_errors_name_the_key_and_never_the_url() {
        let e = err(MINIMAL, &[("CLAUDE_FLOW_STORE__KIND", "postgres")]);
        assert!(e.starts_with("store.postgres.url: required"), "{e}");
        let e = err(
            MINIMAL,
            &[
                ("CLAUDE_FLOW_STORE__KIND", "postgres"),
                ("CLAUDE_FLOW_STORE__POSTGRES__URL", "mysql://u:s3cret@h/db"),
            ],
        );
        assert!(
            e.starts_with("store.postgres.url: not a PostgreSQL URL"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        let e = err(MINIMAL, &[("CLAUDE_FLOW_STORE__KIND", "redis")]);
        assert!(
            e.starts_with("store.kind (from CLAUDE_FLOW_STORE__KIND): unknown variant"),
            "{e}"
        );
        let e = err(MINIMAL, &[("CLAUDE_FLOW_STORE__POSTGRES__LEAS", "1m")]);
        assert!(e.contains("store.postgres.leas"), "{e}");
        assert!(e.contains("unknown key"), "{e}");
        let e = err(MINIMAL, &[("CLAUDE_FLOW_STORE__POSTGRES__LEASE", "0s")]);
        assert!(
            e.starts_with("store.postgres.lease: must be longer than 0s"),
            "{e}"
        );
        let e = err(
            MINIMAL,
            &[
                ("CLAUDE_FLOW_STORE__KIND", "postgres"),
                ("CLAUDE_FLOW_STORE__POSTGRES__URL", "postgres://db/cf"),
                ("CLAUDE_FLOW_STORE__POSTGRES__LEASE", "20s"),
            ],
        );
        assert!(
            e.starts_with(
                "store.postgres.lease: 20s must be more than twice workflow.kill_grace (10s)"
            ),
            "{e}"
        );
        let e = err(MINIMAL, &[("CLAUDE_FLOW_SERVICE__NODE", " ")]);
        assert!(e.starts_with("service.node: must not be empty"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let text = MINIMAL.replace(
            "\"workflow\"",
            r#""store": {"kind": "postgres", "postgres": {"url_file": "missing"}}, "workflow""#,
        );
        let c = Config::parse(&text, dir.path(), Vec::new()).unwrap();
        let e = c.postgres_url().unwrap_err().to_string();
        assert!(
            e.starts_with("store.postgres.url_file: cannot read "),
            "{e}"
        );
    }
}
