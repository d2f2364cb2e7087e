//! What each subcommand does: load the configuration, call the library,
//! print the answer. The read commands have a module each.

mod list;
mod logs;
mod show;
pub(crate) mod state;
mod status;

use std::fmt;
use std::time::{Duration, SystemTime};

use clap::CommandFactory;
use claude_flow_core::api::token::ApiToken;
use claude_flow_core::api::{ApiClient, ApiError, Resumed};
use claude_flow_core::config::{Config, StoreKind};
use claude_flow_core::{
    Error, FileStore, IssueKey, IssueRecord, IssueStatus, StoreError, app, logging, ops, signals,
};

use crate::cli::{Cli, Command, ConfigCommand, IssueArg};
use crate::out::{self, outln};
use state::ReadState;
pub(crate) use status::print_health;

/// A failed command: what to print, and the exit code.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: i32,
}

impl Failure {
    /// Exit code 2: the command line is wrong.
    fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 2,
        }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        self.code
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Self {
            message: e.to_string(),
            code: e.exit_code(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Error::from(e).into()
    }
}

impl From<claude_flow_core::service_unit::ServiceError> for Failure {
    fn from(e: claude_flow_core::service_unit::ServiceError) -> Self {
        Self {
            message: e.to_string(),
            code: e.exit_code(),
        }
    }
}

impl Failure {
    /// Exit code 1 with `message`.
    pub fn other(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }

    /// Standard output's reader went away (`| head`): the command ends
    /// quietly, with the code of a program killed by SIGPIPE.
    pub fn closed_pipe() -> Self {
        Self {
            message: String::new(),
            code: 141,
        }
    }

    /// Whether there is nothing to say (a closed pipe).
    pub fn is_quiet(&self) -> bool {
        self.message.is_empty()
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Self::closed_pipe();
        }
        Self {
            message: e.to_string(),
            code: 1,
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Completions { shell } = cli.command {
        // Generated whole first: the generator panics on a failed write.
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "claude-flow", &mut script);
        return out::bytes(&script);
    }
    // Before loading the configuration: installing may come before it.
    if let Command::Service(command) = &cli.command {
        return crate::service::run(cli.config.clone(), command.clone()).await;
    }
    let config = Config::load(&cli.config).map_err(Error::from)?;
    match cli.command {
        Command::Run { once } => run_orchestrator(&config, once).await,
        Command::Status(json) => status::status(&config, json.json).await,
        Command::List(args) => list::list(&config, &args).await,
        Command::Show { issue, json } => show::show(&config, &issue, json.json).await,
        Command::Logs {
            issue,
            round,
            attempt,
            follow,
            tail,
        } => {
            let args = logs::LogsArgs {
                issue: &issue,
                round,
                attempt,
                follow,
                tail,
            };
            logs::logs(&config, args).await
        }
        Command::Retry(arg) => change(&config, &arg, Change::Retry).await,
        Command::Cancel(arg) => change(&config, &arg, Change::Cancel).await,
        Command::Resume => resume(&config).await,
        Command::Prune { dry_run, json } => crate::prune::run(&config, dry_run, json.json).await,
        Command::Config(ConfigCommand::Check) => {
            // Building the parts checks what loading alone cannot, such as
            // a local.dir that does not exist.
            app::issue_source(&config)?;
            app::subprocess_settings(&config)?;
            claude_flow_core::service_dirs::check_directories(&config.service)
                .map_err(Error::from)?;
            config.api_token().map_err(Error::from)?;
            outln!("{}: configuration OK", cli.config.display())
        }
        Command::Store(command) => crate::store::run(&config, command).await,
        Command::Config(ConfigCommand::Show) => out::json(&config.to_redacted_json()),
        Command::Completions { .. } | Command::Service(_) => Ok(()),
    }
}

async fn run_orchestrator(config: &Config, once: bool) -> Result<(), Failure> {
    logging::init(&config.log);
    let (orchestrator, _store) = app::orchestrator(config)?;
    let orchestrator = std::sync::Arc::new(orchestrator);
    let hurry = std::sync::Arc::clone(&orchestrator);
    let shutdown = signals::stop_on_signals(move || hurry.hurry())?;
    if once {
        let s = orchestrator.run_once(shutdown).await?;
        outln!(
            "settled {} issues: {} done, {} failed, {} cancelled{}",
            s.done + s.failed + s.cancelled,
            s.done,
            s.failed,
            s.cancelled,
            if s.interrupted > 0 {
                format!("; {} interrupted", s.interrupted)
            } else {
                String::new()
            }
        )?;
    } else {
        orchestrator.run(shutdown).await?;
    }
    Ok(())
}

fn issue_key(config: &Config, arg: &IssueArg) -> Result<IssueKey, Failure> {
    let repos = app::repositories(config)?;
    ops::parse_issue_arg(&arg.issue, &repos).map_err(Failure::usage)
}

/// The record of the issue `arg` names, or an error saying it is unknown.
async fn record(config: &Config, arg: &IssueArg) -> Result<IssueRecord, Failure> {
    let key = issue_key(config, arg)?;
    ReadState::open(config)
        .await?
        .record(&key)
        .await?
        .ok_or_else(|| Failure::other(format!("{key} is not known to the state store")))
}

/// A failed call to a running service's API; an unreachable API is
/// explained, since the service itself is known to be running.
pub(crate) fn api_failure(pid: Option<u32>, e: ApiError) -> Failure {
    match (e, pid) {
        (e @ ApiError::Unreachable { .. }, Some(pid)) => Failure {
            message: format!(
                "the service is running (pid {pid}) but does not answer: {e} \
                 (is service.listen the service's address? `claude-flow run` has no HTTP API)"
            ),
            code: 1,
        },
        (e @ ApiError::Unreachable { .. }, None) => Failure {
            message: format!(
                "no daemon answers at service.listen: {e} (with store.kind \"postgres\" the \
                 daemons own the records, so changes go through a running daemon's HTTP API)"
            ),
            code: 1,
        },
        (e, _) => Error::from(e).into(),
    }
}

/// The service to ask through its API, when one owns the state: the
/// daemon holding the state directory (with its PID), or, with a shared
/// database, the daemon at `service.listen` (the daemons own the records,
/// which are never changed behind their back).
pub(crate) fn owning_service(config: &Config) -> Option<Option<u32>> {
    if config.service.listen.is_empty() {
        return None;
    }
    match config.store.kind {
        StoreKind::File => FileStore::lock_holder(&config.service.state_dir).map(Some),
        StoreKind::Postgres => Some(None),
    }
}

enum Change {
    Retry,
    Cancel,
}

async fn change(config: &Config, arg: &IssueArg, change: Change) -> Result<(), Failure> {
    let key = issue_key(config, arg)?;
    // A running service owns the state: ask it, through its API.
    if let Some(pid) = owning_service(config) {
        let client = operator_client(config)?;
        let summary = match change {
            Change::Retry => client.retry(&key).await,
            Change::Cancel => client.cancel(&key).await,
        }
        .map_err(|e| api_failure(pid, e))?;
        if matches!(change, Change::Cancel) && summary.status == IssueStatus::Running {
            outln!(
                "{}: stopping the running workflow; the issue settles as cancelled",
                summary.issue
            )?;
        } else {
            outln!(
                "{}: {} (round {})",
                summary.issue,
                summary.status,
                summary.round
            )?;
        }
        return Ok(());
    }
    let record = match shared_store(config).await? {
        Some(store) => match change {
            Change::Retry => ops::retry(&store, &key).await?,
            Change::Cancel => ops::cancel_shared(&store, &store, &key).await?,
        },
        None => {
            let store = open_for_writing(config)?;
            match change {
                Change::Retry => ops::retry(&store, &key).await?,
                Change::Cancel => ops::cancel(&store, &key).await?,
            }
        }
    };
    if matches!(change, Change::Cancel) && record.status == IssueStatus::Running {
        return outln!(
            "{}: asked its daemon to stop the running workflow; the issue settles as cancelled",
            record.key()
        );
    }
    outln!(
        "{}: {} (round {})",
        record.key(),
        record.status,
        record.round
    )
}

/// Ends a quota pause: through the running service's API when one runs,
/// else in the state directory.
async fn resume(config: &Config) -> Result<(), Failure> {
    if let Some(pid) = owning_service(config) {
        let client = operator_client(config)?;
        let resumed = client.resume().await.map_err(|e| api_failure(pid, e))?;
        return outln!("{}", resumed.describe());
    }
    if let Some(store) = shared_store(config).await? {
        let resumed = ops::resume_shared(&store).await?;
        return outln!("{}", resumed.describe());
    }
    let store = open_for_writing(config)?;
    let before = ops::resume(&store).await?;
    // A pause that ended by itself meanwhile is not one that was lifted.
    let lifted_until = before.pause_at(SystemTime::now(), config.service.max_pause);
    let resumed = Resumed {
        lifted_until,
        pause_reason: lifted_until.and(before.pause_reason),
    };
    outln!("{}", resumed.describe())
}

/// A client of the running service's API that may take actions: with the
/// API token (from the configuration, else the service's
/// `<state_dir>/api-token`), or an error saying how to get it.
pub(crate) fn operator_client(config: &Config) -> Result<ApiClient, Failure> {
    let token = ApiToken::for_client(config).map_err(Error::from)?;
    Ok(ApiClient::for_listen(&config.service.listen)
        .map_err(Error::from)?
        .with_token(token.secret().clone()))
}

/// The state store with its lock, for a change made with no service
/// running; a running service without an HTTP API is named.
/// With `store.kind` `"postgres"`, the database, in which an operator's
/// change is safe from any host while daemons run.
async fn shared_store(
    config: &Config,
) -> Result<Option<claude_flow_core::state::PostgresStore>, Failure> {
    if config.store.kind != StoreKind::Postgres {
        return Ok(None);
    }
    Ok(Some(state::read_database(config).await?))
}

pub(crate) fn open_for_writing(config: &Config) -> Result<FileStore, Failure> {
    if config.store.kind == StoreKind::Postgres {
        return Err(Failure::other(
            "with store.kind \"postgres\" the daemons own the records: this command goes \
             through a running daemon's HTTP API, and service.listen is empty here",
        ));
    }
    match FileStore::open(&config.service.state_dir) {
        Ok(store) => Ok(store),
        Err(StoreError::Locked { pid, .. }) => Err(Failure {
            message: format!(
                "the service is running{} and holds the state, and its HTTP API is off (service.listen is empty); stop it first",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ),
            code: 75,
        }),
        Err(e) => Err(state::state_dir_failure(config, e)),
    }
}

/// `d` to the second, as people read it.
fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
