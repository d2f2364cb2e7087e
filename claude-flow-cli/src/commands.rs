//! What each subcommand does: load the configuration, call the library,
//! print the answer.

use std::fmt;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use clap::CommandFactory;
use claude_flow_core::api::token::ApiToken;
use claude_flow_core::api::{ApiClient, ApiError, Health, Resumed};
use claude_flow_core::config::Config;
use claude_flow_core::{
    Error, FileStore, IssueKey, IssueRecord, IssueStatus, RunningAttempt, StateStore, StoreError,
    app, logging, ops, signals,
};
use serde_json::json;

use crate::cli::{Cli, Command, ConfigCommand, IssueArg};

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
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self {
            message: e.to_string(),
            code: 1,
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "claude-flow",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    // Before loading the configuration: installing may come before it.
    if let Command::Service(command) = &cli.command {
        return crate::service::run(cli.config.clone(), command.clone()).await;
    }
    let config = Config::load(&cli.config).map_err(Error::from)?;
    match cli.command {
        Command::Run { once } => run_orchestrator(&config, once).await,
        Command::Status => status(&config, cli.json).await,
        Command::List => list(&config, cli.json).await,
        Command::Show(arg) => show(&config, &arg, cli.json).await,
        Command::Logs {
            issue,
            round,
            attempt,
            follow,
        } => logs(&config, &issue, round, attempt, follow).await,
        Command::Retry(arg) => change(&config, &arg, Change::Retry).await,
        Command::Cancel(arg) => change(&config, &arg, Change::Cancel).await,
        Command::Resume => resume(&config).await,
        Command::Config(ConfigCommand::Check) => {
            // Building the parts checks what loading alone cannot, such as
            // a local.dir that does not exist.
            app::issue_source(&config)?;
            app::subprocess_settings(&config)?;
            config.api_token().map_err(Error::from)?;
            println!("{}: configuration OK", cli.config.display());
            Ok(())
        }
        Command::Store(command) => crate::store::run(&config, command).await,
        Command::Config(ConfigCommand::Show) => {
            print_json(&config.to_redacted_json());
            Ok(())
        }
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
        println!(
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
        );
    } else {
        orchestrator.run(shutdown).await?;
    }
    Ok(())
}

fn read_store(config: &Config) -> Result<FileStore, Failure> {
    Ok(FileStore::open_read_only(&config.service.state_dir)?)
}

fn issue_key(config: &Config, arg: &IssueArg) -> Result<IssueKey, Failure> {
    let repos = app::repositories(config)?;
    ops::parse_issue_arg(&arg.issue, &repos).map_err(Failure::usage)
}

async fn record(config: &Config, arg: &IssueArg) -> Result<IssueRecord, Failure> {
    let key = issue_key(config, arg)?;
    let store = read_store(config)?;
    store.load().await?;
    store.get(&key).await?.ok_or_else(|| Failure {
        message: format!("{key} is not known to the state store"),
        code: 1,
    })
}

/// What the service is doing: a quota pause and the running attempts.
struct Activity {
    paused_until: Option<SystemTime>,
    pause_reason: Option<String>,
    running: Vec<RunningAttempt>,
}

impl Activity {
    /// As the running service says (`GET /healthz`).
    fn of_health(health: &Health) -> Self {
        Self {
            paused_until: health.paused_until,
            pause_reason: health.pause_reason.clone(),
            running: health.running.clone(),
        }
    }

    /// As the state directory says: the pause from `service.json` (as a
    /// service started now would see it) and, while a service holds the
    /// state, the attempts its records say are running. Without one,
    /// nothing runs, whatever a crashed service left in its records.
    async fn of_store(
        config: &Config,
        store: &FileStore,
        records: &[IssueRecord],
        service_runs: bool,
    ) -> Result<Self, Failure> {
        let service = store.load_service().await?;
        let paused_until = service.pause_at(SystemTime::now(), config.service.max_pause);
        let running = if service_runs {
            records
                .iter()
                .filter_map(IssueRecord::running_attempt)
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            paused_until,
            pause_reason: paused_until.and(service.pause_reason),
            running,
        })
    }

    /// The top-level fields of `status --json` (CONTRACT section 6).
    fn to_json(&self) -> serde_json::Value {
        let running: Vec<_> = self
            .running
            .iter()
            .map(|r| {
                json!({
                    "issue": r.issue.to_string(),
                    "round": r.round,
                    "attempt": r.attempt,
                    "started_at": rfc3339(r.started_at),
                })
            })
            .collect();
        json!({
            "paused_until": self.paused_until.map(rfc3339),
            "pause_reason": self.pause_reason,
            "running": running,
        })
    }

    fn print(&self) {
        if self.running.is_empty() {
            println!("working: nothing");
        }
        let now = SystemTime::now();
        for (i, run) in self.running.iter().enumerate() {
            let elapsed = now.duration_since(run.started_at).unwrap_or_default();
            println!(
                "{} {} round {} attempt {}, running for {}",
                if i == 0 { "working:" } else { "        " },
                run.issue,
                run.round,
                run.attempt,
                human(elapsed)
            );
        }
        if let Some(until) = self.paused_until {
            let left = until
                .duration_since(now)
                .map(|d| format!(" (in {})", human(d)))
                .unwrap_or_default();
            println!(
                "paused:  until {}{left}: {}",
                rfc3339(until),
                self.pause_reason.as_deref().unwrap_or("workflow quota")
            );
            println!(
                "         no workflow starts before then; `claude-flow resume` ends the pause"
            );
        }
    }
}

async fn status(config: &Config, json: bool) -> Result<(), Failure> {
    let store = read_store(config)?;
    let records = store.load().await?;
    let holder = FileStore::lock_holder(&config.service.state_dir);
    // The running service's own view, when it has an HTTP API.
    let daemon = match holder {
        Some(_) if !config.service.listen.is_empty() => {
            Some(match ApiClient::for_listen(&config.service.listen) {
                Ok(client) => client.health().await,
                Err(e) => Err(e),
            })
        }
        _ => None,
    };
    let activity = match &daemon {
        Some(Ok(health)) => Activity::of_health(health),
        _ => Activity::of_store(config, &store, &records, holder.is_some()).await?,
    };
    let count = |s: IssueStatus| records.iter().filter(|r| r.status == s).count();
    let statuses = [
        IssueStatus::Queued,
        IssueStatus::Running,
        IssueStatus::Retrying,
        IssueStatus::Done,
        IssueStatus::Failed,
        IssueStatus::Cancelled,
    ];
    if json {
        let counts: serde_json::Map<_, _> = statuses
            .iter()
            .map(|s| (s.as_str().to_owned(), json!(count(*s))))
            .collect();
        let health = match &daemon {
            Some(Ok(health)) => serde_json::to_value(health).unwrap_or_default(),
            Some(Err(e)) => json!({ "error": e.to_string() }),
            None => serde_json::Value::Null,
        };
        let mut out = activity.to_json();
        if let serde_json::Value::Object(fields) = &mut out {
            fields.insert(
                "service".into(),
                json!({ "running": holder.is_some(), "pid": holder, "health": health }),
            );
            fields.insert("state_dir".into(), json!(config.service.state_dir));
            fields.insert("issues".into(), json!(counts));
        }
        print_json(&out);
    } else {
        match holder {
            Some(pid) => println!("service: running (pid {pid})"),
            None => println!("service: not running"),
        }
        match &daemon {
            Some(Ok(health)) => print_health(health),
            _ => activity.print(),
        }
        println!("state:   {}", config.service.state_dir.display());
        for s in statuses {
            println!("{:<10} {}", format!("{s}:"), count(s));
        }
    }
    match (daemon, holder) {
        (Some(Err(e)), Some(pid)) => Err(api_failure(pid, e)),
        _ => Ok(()),
    }
}

/// Prints the service's own view of itself (`GET /healthz`).
pub(crate) fn print_health(health: &Health) {
    match &health.reason {
        None => println!("health:  {}", health.status),
        Some(reason) => println!("health:  {} ({reason})", health.status),
    }
    match &health.last_poll {
        Some(poll) => {
            let outcome = match (&poll.error, poll.ready) {
                (Some(e), _) => format!("failed: {e}"),
                (None, Some(n)) => format!("ok, {n} ready"),
                (None, None) => "ok".to_owned(),
            };
            println!("polled:  {} ({outcome})", rfc3339(poll.at));
        }
        None => println!("polled:  not yet"),
    }
    Activity::of_health(health).print();
}

/// A failed call to a running service's API; an unreachable API is
/// explained, since the service itself is known to be running.
fn api_failure(pid: u32, e: ApiError) -> Failure {
    match e {
        ApiError::Unreachable { .. } => Failure {
            message: format!(
                "the service is running (pid {pid}) but does not answer: {e} \
                 (is service.listen the service's address? `claude-flow run` has no HTTP API)"
            ),
            code: 1,
        },
        e => Error::from(e).into(),
    }
}

async fn list(config: &Config, json: bool) -> Result<(), Failure> {
    let store = read_store(config)?;
    let records = store.load().await?;
    // The same numbers as `list --json` and `GET /api/issues`.
    let summaries: Vec<_> = records.iter().map(IssueRecord::summary).collect();
    if json {
        print_json(&json!(summaries));
        return Ok(());
    }
    if summaries.is_empty() {
        println!("no issues yet");
        return Ok(());
    }
    let width = summaries
        .iter()
        .map(|s| s.issue.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<width$}  {:<9}  {:>5}  {:>8}  {:<40}  TITLE",
        "ISSUE", "STATUS", "ROUND", "ATTEMPTS", "PULL REQUEST"
    );
    for s in &summaries {
        println!(
            "{:<width$}  {:<9}  {:>5}  {:>8}  {:<40}  {}",
            s.issue,
            s.status.as_str(),
            s.round,
            s.attempts,
            s.pr_url.as_deref().unwrap_or("-"),
            s.title.replace(['\r', '\n'], " ")
        );
    }
    Ok(())
}

async fn show(config: &Config, arg: &IssueArg, json: bool) -> Result<(), Failure> {
    let r = record(config, arg).await?;
    if json {
        print_json(&serde_json::to_value(&r).unwrap_or_default());
        return Ok(());
    }
    println!("{}  {}", r.key(), r.issue.title.replace(['\r', '\n'], " "));
    println!("status:     {} (round {})", r.status, r.round);
    if !r.issue.html_url.is_empty() {
        println!("url:        {}", r.issue.html_url);
    }
    println!("pr:         {}", r.pr_url.as_deref().unwrap_or("-"));
    if r.edited_since_approval {
        println!(
            "text:       changed at the source after approval; this round works on the \
             approved text (apply the trigger label again to approve the new one)"
        );
    }
    if let Some(t) = r.next_retry_at {
        println!("next retry: {}", rfc3339(t));
    }
    if let Some(e) = &r.last_error {
        println!("last error: {e}");
    }
    if r.attempts.is_empty() {
        println!("attempts:   none yet");
    }
    // Attempts are numbered within their round (CLAUDE_FLOW_ATTEMPT), so
    // they are listed under it.
    let mut round = None;
    for a in &r.attempts {
        if round != Some(a.round) {
            round = Some(a.round);
            let current = if a.round == r.round { " (current)" } else { "" };
            println!("round {}{current}:", a.round);
        }
        let outcome = match &a.outcome {
            None => "running".to_owned(),
            Some(o) => serde_json::to_value(o)
                .ok()
                .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
                .unwrap_or_default(),
        };
        let detail = match &a.outcome {
            Some(claude_flow_core::AttemptOutcome::Failed { reason }) => format!(" ({reason})"),
            Some(claude_flow_core::AttemptOutcome::QuotaExhausted { until }) => {
                format!(" (until {})", rfc3339(*until))
            }
            _ => String::new(),
        };
        println!(
            "  attempt {:<3} {}  {:>8}  {}{}{}",
            a.number,
            rfc3339(a.started_at),
            human(a.duration()),
            outcome,
            detail,
            a.log_path
                .as_ref()
                .map(|p| format!("  log: {}", p.display()))
                .unwrap_or_default()
        );
    }
    Ok(())
}

async fn logs(
    config: &Config,
    arg: &IssueArg,
    round: Option<u32>,
    attempt: Option<u32>,
    follow: bool,
) -> Result<(), Failure> {
    let r = record(config, arg).await?;
    // An attempt number alone is one of the current round's.
    let chosen = match (round, attempt) {
        (None, None) => r.attempts.last(),
        (round, Some(n)) => {
            let round = round.unwrap_or(r.round);
            r.attempts
                .iter()
                .find(|a| a.round == round && a.number == n)
        }
        (Some(round), None) => r.attempts.iter().rev().find(|a| a.round == round),
    }
    .ok_or_else(|| Failure {
        message: match (round, attempt) {
            (None, None) => format!("{} has no attempt yet", r.key()),
            (round, Some(n)) => format!(
                "{} has no attempt {n} in round {}",
                r.key(),
                round.unwrap_or(r.round)
            ),
            (Some(round), None) => format!("{} has no attempt in round {round}", r.key()),
        },
        code: 1,
    })?;
    // A running attempt has no log path recorded yet; it is where the
    // subprocess runner puts it.
    let path = chosen.log_path.clone().unwrap_or_else(|| {
        config
            .service
            .log_dir()
            .join(r.key().repo.dir_name())
            .join(format!("issue-{}", r.key().number))
            .join(format!(
                "round-{}-attempt-{}.log",
                chosen.round, chosen.number
            ))
    });
    let (round, number) = (chosen.round, chosen.number);
    let mut offset = copy_from(&path, 0)?;
    if !follow {
        return Ok(());
    }
    let key = r.key().clone();
    let store = read_store(config)?;
    loop {
        store.load().await?;
        let running = store
            .get(&key)
            .await?
            .and_then(|r| {
                r.attempts
                    .into_iter()
                    .find(|a| a.round == round && a.number == number)
            })
            .is_some_and(|a| a.outcome.is_none());
        offset = copy_from(&path, offset)?;
        if !running {
            // One last read: the attempt may have written more before it ended.
            copy_from(&path, offset)?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Copies `path` from `offset` to stdout; returns the new offset.
fn copy_from(path: &Path, offset: u64) -> Result<u64, Failure> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && offset == 0 => return Ok(0),
        Err(e) => {
            return Err(Failure {
                message: format!("{}: {e}", path.display()),
                code: 1,
            });
        }
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = offset;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        at += n as u64;
    }
    out.flush()?;
    Ok(at)
}

enum Change {
    Retry,
    Cancel,
}

async fn change(config: &Config, arg: &IssueArg, change: Change) -> Result<(), Failure> {
    let key = issue_key(config, arg)?;
    // A running service owns the state: ask it, through its API.
    if let Some(pid) = FileStore::lock_holder(&config.service.state_dir)
        && !config.service.listen.is_empty()
    {
        let client = operator_client(config)?;
        let summary = match change {
            Change::Retry => client.retry(&key).await,
            Change::Cancel => client.cancel(&key).await,
        }
        .map_err(|e| api_failure(pid, e))?;
        if matches!(change, Change::Cancel) && summary.status == IssueStatus::Running {
            println!(
                "{}: stopping the running workflow; the issue settles as cancelled",
                summary.issue
            );
        } else {
            println!(
                "{}: {} (round {})",
                summary.issue, summary.status, summary.round
            );
        }
        return Ok(());
    }
    let store = open_for_writing(config)?;
    let record = match change {
        Change::Retry => ops::retry(&store, &key).await?,
        Change::Cancel => ops::cancel(&store, &key).await?,
    };
    println!(
        "{}: {} (round {})",
        record.key(),
        record.status,
        record.round
    );
    Ok(())
}

/// Ends a quota pause: through the running service's API when one runs,
/// else in the state directory.
async fn resume(config: &Config) -> Result<(), Failure> {
    if let Some(pid) = FileStore::lock_holder(&config.service.state_dir)
        && !config.service.listen.is_empty()
    {
        let client = operator_client(config)?;
        let resumed = client.resume().await.map_err(|e| api_failure(pid, e))?;
        println!("{}", resumed.describe());
        return Ok(());
    }
    let store = open_for_writing(config)?;
    let before = ops::resume(&store).await?;
    // A pause that ended by itself meanwhile is not one that was lifted.
    let lifted_until = before.pause_at(SystemTime::now(), config.service.max_pause);
    let resumed = Resumed {
        lifted_until,
        pause_reason: lifted_until.and(before.pause_reason),
    };
    println!("{}", resumed.describe());
    Ok(())
}

/// A client of the running service's API that may take actions: with the
/// API token (from the configuration, else the service's
/// `<state_dir>/api-token`), or an error saying how to get it.
fn operator_client(config: &Config) -> Result<ApiClient, Failure> {
    let token = ApiToken::for_client(config).map_err(Error::from)?;
    Ok(ApiClient::for_listen(&config.service.listen)
        .map_err(Error::from)?
        .with_token(token.secret().clone()))
}

/// The state store with its lock, for a change made with no service
/// running; a running service without an HTTP API is named.
fn open_for_writing(config: &Config) -> Result<FileStore, Failure> {
    match FileStore::open(&config.service.state_dir) {
        Ok(store) => Ok(store),
        Err(StoreError::Locked { pid, .. }) => Err(Failure {
            message: format!(
                "the service is running{} and holds the state, and its HTTP API is off (service.listen is empty); stop it first",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ),
            code: 75,
        }),
        Err(e) => Err(e.into()),
    }
}

/// `d` to the second, as people read it.
fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}
