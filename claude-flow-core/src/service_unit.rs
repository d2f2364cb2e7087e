//! The systemd unit, and what `claude-flow service` does with it.
//!
//! [`render`] fills the unit template (`claude-flow.service.in`, beside this
//! file) with the daemon's path, the configuration, the user and the paths
//! the service may write. `deploy/claude-flow.service` is that template
//! rendered with [`UnitSettings::default`]; a test keeps the two equal.
//!
//! The commands are planned first and carried out second: [`install`],
//! [`uninstall`] and [`control`] return a list of [`Step`]s, which the CLI
//! either prints (`--dry-run`) or runs one by one with [`Step::run`]. Nothing
//! here knows the daemon's internals; it only knows where the daemon keeps
//! its files, from the configuration.

use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::config::Config;
use crate::error::ConfigError;

mod paths;

/// The unit's file name.
pub const UNIT_NAME: &str = "claude-flow.service";
/// Where units written by an administrator go.
pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";
/// The system user the service runs as.
pub const DEFAULT_USER: &str = "claude-flow";
/// Where the deploy/ unit expects the daemon.
pub const DEFAULT_DAEMON_PATH: &str = "/usr/local/bin/claude-flow-daemon";
/// The daemon's file name, expected beside the `claude-flow` binary.
pub const DAEMON_NAME: &str = "claude-flow-daemon";
/// Exists when systemd is the running init system (`sd_booted(3)`).
pub const SYSTEMD_RUN_DIR: &str = "/run/systemd/system";
/// The state directory systemd creates for `StateDirectory=claude-flow`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/claude-flow";
/// The runtime directory systemd creates for `RuntimeDirectory=claude-flow`.
const RUNTIME_DIR: &str = "/run/claude-flow";

const TEMPLATE: &str = include_str!("claude-flow.service.in");

/// A failure of `claude-flow service`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// This machine does not run systemd.
    #[error("systemd is not available: {0}")]
    NoSystemd(String),
    /// The configuration file exists but is invalid.
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    /// A value cannot be written into the unit, or a setting is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A file or directory operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A command (systemctl, useradd) failed or could not be started.
    #[error("`{command}` {reason}")]
    Command {
        /// The command line.
        command: String,
        /// What went wrong, e.g. `exited with status 5`.
        reason: String,
    },
}

impl ServiceError {
    /// The CONTRACT's exit code: 78 for a bad configuration, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 78,
            _ => 1,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServiceError + '_ {
    move |source| ServiceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What varies between installations of the unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSettings {
    /// The daemon binary (absolute).
    pub daemon: PathBuf,
    /// The configuration file (absolute).
    pub config: PathBuf,
    /// `User=`.
    pub user: String,
    /// `Group=`.
    pub group: String,
    /// `ReadWritePaths=`: the state directory and any workspace, log or
    /// PID-file directory outside it.
    pub writable: Vec<PathBuf>,
}

impl Default for UnitSettings {
    /// The settings of `deploy/claude-flow.service`.
    fn default() -> Self {
        Self {
            daemon: PathBuf::from(DEFAULT_DAEMON_PATH),
            config: PathBuf::from(crate::config::DEFAULT_CONFIG_PATH),
            user: DEFAULT_USER.into(),
            group: DEFAULT_USER.into(),
            writable: vec![PathBuf::from(DEFAULT_STATE_DIR)],
        }
    }
}

/// The unit file's text for `settings`.
pub fn render(settings: &UnitSettings) -> Result<String, ServiceError> {
    let exec_start = format!(
        "{} --config {}",
        quote(&settings.daemon, true)?,
        quote(&settings.config, true)?
    );
    let writable = settings
        .writable
        .iter()
        .map(|p| quote(p, false))
        .collect::<Result<Vec<_>, _>>()?
        .join(" ");
    Ok(TEMPLATE
        .replace("@EXEC_START@", &exec_start)
        .replace("@USER@", check_name("user", &settings.user)?)
        .replace("@GROUP@", check_name("group", &settings.group)?)
        .replace("@READ_WRITE_PATHS@", &writable))
}

/// A path as one word of a unit file: `%` doubled (specifiers), `$`
/// doubled in command lines (variable expansion), and double quotes with
/// C escapes when the path holds blanks, quotes or backslashes.
fn quote(path: &Path, command_line: bool) -> Result<String, ServiceError> {
    let text = path
        .to_str()
        .ok_or_else(|| ServiceError::Invalid(format!("{}: not valid UTF-8", path.display())))?;
    if !path.is_absolute() {
        return Err(ServiceError::Invalid(format!(
            "{text}: the unit needs an absolute path"
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(ServiceError::Invalid(format!(
            "{text:?}: control characters cannot be written into a unit"
        )));
    }
    let mut word = text.replace('%', "%%");
    if command_line {
        word = word.replace('$', "$$");
    }
    if word.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';')) {
        word = format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""));
    }
    Ok(word)
}

/// A user or group name, checked so it cannot break the unit's syntax.
fn check_name<'a>(what: &str, name: &'a str) -> Result<&'a str, ServiceError> {
    let valid = !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(name)
    } else {
        Err(ServiceError::Invalid(format!(
            "{what} name {name:?} is not valid"
        )))
    }
}

/// Where the CLI is: what `systemctl` to run, and whether systemd runs.
#[derive(Debug, Clone)]
pub struct Systemd {
    /// The `systemctl` program found on `PATH`.
    pub systemctl: PathBuf,
}

impl Systemd {
    /// Finds `systemctl` on `path` (the `PATH` value) and checks that
    /// `run_dir` (normally [`SYSTEMD_RUN_DIR`]) exists, which is how
    /// systemd's own `sd_booted(3)` tells that systemd is the init system.
    pub fn detect(path: Option<OsString>, run_dir: &Path) -> Result<Self, ServiceError> {
        let systemctl = path
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("systemctl"))
            .find(|p| is_executable(p))
            .ok_or_else(|| {
                ServiceError::NoSystemd(
                    "`systemctl` was not found on PATH; `claude-flow service` needs a machine \
                     that runs systemd (elsewhere, run `claude-flow-daemon` under your own \
                     supervisor)"
                        .into(),
                )
            })?;
        if !run_dir.is_dir() {
            return Err(ServiceError::NoSystemd(format!(
                "{} does not exist, so systemd is not this machine's init system \
                 (a container?); run `claude-flow-daemon` under your own supervisor",
                run_dir.display()
            )));
        }
        Ok(Self { systemctl })
    }

    /// For `--dry-run` where systemd is missing: the steps name plain
    /// `systemctl`.
    pub fn assumed() -> Self {
        Self {
            systemctl: PathBuf::from("systemctl"),
        }
    }

    fn step(&self, args: &[&str], may_fail: bool) -> Step {
        Step::Run {
            program: self.systemctl.clone(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            may_fail,
        }
    }
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One thing `claude-flow service` does.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// `useradd --system` a user (and its group) whose home is `home`.
    CreateUser {
        /// The user name.
        name: String,
        /// Its home: the state directory.
        home: PathBuf,
    },
    /// Create a directory (and its parents) with `mode`, owned by `owner`
    /// and `group` when running as root.
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// The owning user.
        owner: String,
        /// The owning group.
        group: String,
    },
    /// Write a file with mode 0644, replacing it atomically.
    WriteFile {
        /// The file.
        path: PathBuf,
        /// Its contents.
        contents: String,
    },
    /// Remove a file.
    RemoveFile {
        /// The file.
        path: PathBuf,
    },
    /// Run a program; a non-zero exit fails the command unless `may_fail`.
    Run {
        /// The program.
        program: PathBuf,
        /// Its arguments.
        args: Vec<String>,
        /// Whether failure is only reported (e.g. stopping a unit that is
        /// not loaded).
        may_fail: bool,
    },
    /// Nothing to do but tell the operator.
    Note(String),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateUser { name, home } => write!(
                f,
                "create system user {name}: {}",
                command_line(Path::new("useradd"), &useradd_args(name, home))
            ),
            Self::CreateDir {
                path,
                mode,
                owner,
                group,
            } => write!(
                f,
                "create {} (mode {mode:04o}, owner {owner}:{group})",
                path.display()
            ),
            Self::WriteFile { path, .. } => write!(f, "write {}", path.display()),
            Self::RemoveFile { path } => write!(f, "remove {}", path.display()),
            Self::Run { program, args, .. } => write!(f, "run {}", command_line(program, args)),
            Self::Note(note) => f.write_str(note),
        }
    }
}

fn useradd_args(name: &str, home: &Path) -> Vec<String> {
    vec![
        "--system".into(),
        "--user-group".into(),
        "--home-dir".into(),
        home.display().to_string(),
        "--no-create-home".into(),
        "--shell".into(),
        "/usr/sbin/nologin".into(),
        "--comment".into(),
        "claude-flow service".into(),
        name.into(),
    ]
}

fn command_line(program: &Path, args: &[String]) -> String {
    let mut line = program.display().to_string();
    for arg in args {
        line.push(' ');
        if arg.contains(char::is_whitespace) || arg.is_empty() {
            line.push_str(&format!("{arg:?}"));
        } else {
            line.push_str(arg);
        }
    }
    line
}

impl Step {
    /// Carries the step out. Programs inherit stdout and stderr, so the
    /// operator sees systemctl's own messages.
    pub fn run(&self) -> Result<(), ServiceError> {
        match self {
            Self::CreateUser { name, home } => {
                let program = Path::new("useradd");
                let args = useradd_args(name, home);
                check_status(program, &args, spawn(program, &args)?)
            }
            Self::CreateDir {
                path,
                mode,
                owner,
                group,
            } => create_dir(path, *mode, owner, group),
            Self::WriteFile { path, contents } => write_file(path, contents),
            Self::RemoveFile { path } => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
                _ => Ok(()),
            },
            Self::Run {
                program,
                args,
                may_fail,
            } => {
                let status = spawn(program, args)?;
                if *may_fail && !status.success() {
                    return Ok(());
                }
                check_status(program, args, status)
            }
            Self::Note(_) => Ok(()),
        }
    }
}

fn spawn(program: &Path, args: &[String]) -> Result<ExitStatus, ServiceError> {
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| ServiceError::Command {
            command: command_line(program, args),
            reason: format!("could not be started: {e}"),
        })
}

fn check_status(program: &Path, args: &[String], status: ExitStatus) -> Result<(), ServiceError> {
    if status.success() {
        Ok(())
    } else {
        Err(ServiceError::Command {
            command: command_line(program, args),
            reason: match status.code() {
                Some(code) => format!("exited with status {code}"),
                None => format!("was killed ({status})"),
            },
        })
    }
}

fn create_dir(path: &Path, mode: u32, owner: &str, group: &str) -> Result<(), ServiceError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_err(path))?;
    // The umask may have narrowed the mode; set it exactly.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))?;
    if !nix::unistd::geteuid().is_root() {
        // Only root can give a directory away; planning made sure that a
        // non-root install is for the current user.
        return Ok(());
    }
    let uid = nix::unistd::User::from_name(owner)
        .ok()
        .flatten()
        .ok_or_else(|| ServiceError::Invalid(format!("user {owner} does not exist")))?
        .uid;
    let gid = nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .ok_or_else(|| ServiceError::Invalid(format!("group {group} does not exist")))?
        .gid;
    nix::unistd::chown(path, Some(uid), Some(gid))
        .map_err(|e| io_err(path)(std::io::Error::from(e)))
}

fn write_file(path: &Path, contents: &str) -> Result<(), ServiceError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    // Written beside the target and renamed over it, so systemd never
    // reads half a unit.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        // The umask may have narrowed the mode; units are world-readable.
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    Ok(())
}

/// What `claude-flow service install` is given.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The daemon binary; must exist.
    pub daemon: PathBuf,
    /// The configuration file; may not exist yet.
    pub config: PathBuf,
    /// Where to write the unit.
    pub unit_dir: PathBuf,
    /// The user to run as.
    pub user: String,
    /// The state directory when the configuration file does not exist yet
    /// (when it exists, its `service.state_dir` is used).
    pub state_dir: Option<PathBuf>,
    /// Install even when the service could not use some of its paths
    /// (they are then listed as warnings).
    pub force: bool,
}

/// The daemon's path when none is given: `claude-flow-daemon` beside the
/// running `claude-flow`.
pub fn daemon_beside_current_exe() -> Result<PathBuf, ServiceError> {
    let exe = std::env::current_exe().map_err(|e| {
        ServiceError::Invalid(format!(
            "cannot tell where claude-flow is installed ({e}); pass --daemon PATH"
        ))
    })?;
    Ok(exe.with_file_name(DAEMON_NAME))
}

/// Plans `service install`: the user, the configuration and state
/// directories, the unit, `daemon-reload` and `enable --now` (only
/// `enable` while the configuration file does not exist yet).
pub fn install(systemd: &Systemd, options: &InstallOptions) -> Result<Vec<Step>, ServiceError> {
    let daemon = options.daemon.canonicalize().map_err(|e| {
        ServiceError::Invalid(format!(
            "the daemon binary {} cannot be used ({e}); build or copy {DAEMON_NAME} there, \
             or pass --daemon PATH",
            options.daemon.display()
        ))
    })?;
    if !is_executable(&daemon) {
        return Err(ServiceError::Invalid(format!(
            "{} is not an executable file; pass --daemon PATH",
            daemon.display()
        )));
    }
    let config_path = std::path::absolute(&options.config).map_err(io_err(&options.config))?;
    let config = if config_path.exists() {
        Some(Config::load(&config_path)?)
    } else {
        None
    };
    let state_dir = match (&config, &options.state_dir) {
        (Some(c), Some(s))
            if std::path::absolute(s).ok().as_ref() != Some(&c.service.state_dir) =>
        {
            return Err(ServiceError::Invalid(format!(
                "--state-dir {} differs from service.state_dir {} in {}; change the \
                 configuration instead",
                s.display(),
                c.service.state_dir.display(),
                config_path.display()
            )));
        }
        (Some(c), _) => c.service.state_dir.clone(),
        (None, Some(s)) => std::path::absolute(s).map_err(io_err(s))?,
        (None, None) => PathBuf::from(DEFAULT_STATE_DIR),
    };

    let mut steps = Vec::new();
    let current_user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten();
    let is_root = nix::unistd::geteuid().is_root();
    let group = match nix::unistd::User::from_name(&options.user).ok().flatten() {
        Some(user) => nix::unistd::Group::from_gid(user.gid)
            .ok()
            .flatten()
            .map_or_else(|| user.gid.to_string(), |g| g.name),
        None if is_root => {
            steps.push(Step::CreateUser {
                name: options.user.clone(),
                home: state_dir.clone(),
            });
            options.user.clone()
        }
        None => {
            return Err(ServiceError::Invalid(format!(
                "user {user} does not exist and only root can create it; run as root, or \
                 create it with `useradd --system --user-group --home-dir {home} \
                 --shell /usr/sbin/nologin {user}`, or pass --user NAME",
                user = options.user,
                home = state_dir.display()
            )));
        }
    };
    if !is_root && current_user.as_ref().map(|u| u.name.as_str()) != Some(&options.user) {
        return Err(ServiceError::Invalid(format!(
            "only root can install a service for user {}; run as root (or pass --user with \
             your own name to try it out with --unit-dir)",
            options.user
        )));
    }

    // Paths the service writes: the state directory, and workspaces, logs
    // and the PID file wherever the configuration puts them.
    let mut writable = vec![state_dir.clone()];
    let mut more_dirs = Vec::new();
    if let Some(c) = &config {
        for dir in [c.service.workspace_dir(), c.service.log_dir()] {
            if !dir.starts_with(&state_dir) {
                more_dirs.push(dir.clone());
                writable.push(dir);
            }
        }
        if let Some(dir) = c.service.pid_file.as_ref().and_then(|p| p.parent())
            && !writable.iter().any(|w| dir.starts_with(w))
            && !dir.starts_with(RUNTIME_DIR)
        {
            writable.push(dir.to_owned());
        }
    }
    writable.dedup();

    let config_dir = config_path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_owned);
    if !config_dir.exists() {
        // The configuration holds secrets: readable by the service's
        // group, writable only by root.
        steps.push(Step::CreateDir {
            path: config_dir.clone(),
            mode: 0o750,
            owner: if is_root {
                "root".into()
            } else {
                options.user.clone()
            },
            group: group.clone(),
        });
    }
    for dir in std::iter::once(&state_dir).chain(&more_dirs) {
        if !dir.exists() {
            steps.push(Step::CreateDir {
                path: dir.clone(),
                mode: 0o700,
                owner: options.user.clone(),
                group: group.clone(),
            });
        }
    }
    let mut uses = paths::path_uses(&config_path, config.as_ref());
    if config.is_none() {
        // Not written yet: what install creates must still be reachable.
        uses.extend(paths::path_uses(&state_dir, None));
    }
    let problems = paths::problems(&uses, &paths::Account::lookup(&options.user));
    if !problems.is_empty() && !options.force {
        return Err(ServiceError::Invalid(format!(
            "the service could not use these paths under its unit's hardening or as user {}:\n  - {}\nfix them, or pass --force to install anyway",
            options.user,
            problems.join("\n  - ")
        )));
    }
    steps.extend(
        problems
            .into_iter()
            .map(|p| Step::Note(format!("warning: {p}"))),
    );

    let settings = UnitSettings {
        daemon,
        config: config_path.clone(),
        user: options.user.clone(),
        group,
        writable,
    };
    steps.push(Step::WriteFile {
        path: options.unit_dir.join(UNIT_NAME),
        contents: render(&settings)?,
    });
    steps.push(systemd.step(&["daemon-reload"], false));
    if config.is_some() {
        steps.push(systemd.step(&["enable", "--now", UNIT_NAME], false));
    } else {
        steps.push(systemd.step(&["enable", UNIT_NAME], false));
        steps.push(Step::Note(format!(
            "{} does not exist yet: write it (see deploy/config.example.json), check it with \
             `claude-flow --config {} config check`, then run `claude-flow service start`",
            config_path.display(),
            config_path.display()
        )));
    }
    Ok(steps)
}

/// Plans `service uninstall`: stop, disable, remove the unit,
/// `daemon-reload`. The state, the configuration and the user stay.
pub fn uninstall(systemd: &Systemd, unit_dir: &Path) -> Vec<Step> {
    vec![
        // Not loaded, or already stopped: carry on removing.
        systemd.step(&["stop", UNIT_NAME], true),
        systemd.step(&["disable", UNIT_NAME], true),
        Step::RemoveFile {
            path: unit_dir.join(UNIT_NAME),
        },
        systemd.step(&["daemon-reload"], false),
        Step::Note(
            "kept: the state directory, the configuration and the service user; remove them \
             by hand if they are no longer wanted"
                .into(),
        ),
    ]
}

/// A `systemctl` verb for the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `systemctl start`.
    Start,
    /// `systemctl stop`: a graceful stop, see the unit's `KillMode=mixed`.
    Stop,
    /// `systemctl restart`.
    Restart,
}

/// Plans `service start|stop|restart`.
pub fn control(systemd: &Systemd, verb: Verb) -> Vec<Step> {
    let verb = match verb {
        Verb::Start => "start",
        Verb::Stop => "stop",
        Verb::Restart => "restart",
    };
    vec![systemd.step(&[verb, UNIT_NAME], false)]
}

/// What `systemctl status` said about the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitState {
    /// Running (exit 0).
    Active,
    /// Known but not running (exit 3).
    Inactive,
    /// Not installed, or systemctl failed (any other exit).
    Unknown(Option<i32>),
}

/// Runs `systemctl status --no-pager claude-flow.service`, its output going
/// to ours, and classifies its exit status (LSB: 0 running, 3 not running).
pub fn status(systemd: &Systemd) -> Result<UnitState, ServiceError> {
    let args: Vec<String> = ["status", "--no-pager", UNIT_NAME]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    let status = spawn(&systemd.systemctl, &args)?;
    Ok(match status.code() {
        Some(0) => UnitState::Active,
        Some(3) => UnitState::Inactive,
        code => UnitState::Unknown(code),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deployed_unit_is_the_template_with_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/claude-flow.service");
        let rendered = render(&UnitSettings::default()).unwrap();
        if std::env::var_os("REGENERATE_DEPLOY_UNIT").is_some() {
            std::fs::write(&path, &rendered).unwrap();
        }
        let deployed = std::fs::read_to_string(&path).unwrap();
        assert!(
            deployed == rendered,
            "deploy/claude-flow.service differs from claude-flow-core/src/claude-flow.service.in \
             rendered with the defaults; edit the template, then regenerate deploy/ with\n\
             REGENERATE_DEPLOY_UNIT=1 cargo test -p claude-flow-core service_unit"
        );
    }

    #[test]
    fn render_fills_every_placeholder() {
        let unit = render(&UnitSettings {
            daemon: "/opt/cf/bin/claude-flow-daemon".into(),
            config: "/srv/cf/config.json".into(),
            user: "robot".into(),
            group: "robots".into(),
            writable: vec!["/srv/cf/state".into(), "/srv/cf/logs".into()],
        })
        .unwrap();
        let placeholder = regex::Regex::new("@[A-Z_]+@").unwrap();
        assert!(!placeholder.is_match(&unit), "{unit}");
        let line = |key: &str| {
            unit.lines()
                .find(|l| l.starts_with(&format!("{key}=")))
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            line("ExecStart"),
            "ExecStart=/opt/cf/bin/claude-flow-daemon --config /srv/cf/config.json"
        );
        assert_eq!(line("User"), "User=robot");
        assert_eq!(line("Group"), "Group=robots");
        assert_eq!(
            line("ReadWritePaths"),
            "ReadWritePaths=/srv/cf/state /srv/cf/logs"
        );
    }

    #[test]
    fn odd_paths_are_escaped_for_systemd() {
        let q = |p: &str, cmd| quote(Path::new(p), cmd).unwrap();
        assert_eq!(q("/opt/a b/d", true), r#""/opt/a b/d""#);
        assert_eq!(q("/opt/100%/d", true), "/opt/100%%/d");
        assert_eq!(q("/opt/$HOME/d", true), "/opt/$$HOME/d");
        assert_eq!(q("/opt/$HOME/d", false), "/opt/$HOME/d");
        assert_eq!(q(r#"/opt/"q"\b"#, false), r#""/opt/\"q\"\\b""#);
        assert!(quote(Path::new("relative"), true).is_err());
        assert!(quote(Path::new("/a\nExecStartPre=/bin/evil"), true).is_err());
        assert!(check_name("user", "root\nUser=x").is_err());
        assert!(check_name("user", "-x").is_err());
        assert!(check_name("user", "claude-flow").is_ok());
    }

    #[test]
    fn without_systemctl_or_systemd_detection_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let e = Systemd::detect(Some(dir.path().into()), dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("`systemctl` was not found on PATH"),
            "{e}"
        );
        let systemctl = dir.path().join("systemctl");
        std::fs::write(&systemctl, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = Systemd::detect(Some(dir.path().into()), &dir.path().join("nope")).unwrap_err();
        assert!(
            e.to_string().contains("not this machine's init system"),
            "{e}"
        );
        let found = Systemd::detect(Some(dir.path().into()), dir.path()).unwrap();
        assert_eq!(found.systemctl, systemctl);
    }
}
