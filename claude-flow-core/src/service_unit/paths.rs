//! What `service install` checks before it writes a unit: every path the
//! service will use, seen the way the service will see it under the
//! unit's hardening and as its user. A path under /home or /tmp works when
//! the operator tries `claude-flow run` and then vanishes inside the unit
//! (exit 78 at every start, or state written into a private /tmp that is
//! gone at the next restart), so install refuses it up front.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};

use crate::config::Config;

/// Hidden from the service by `ProtectHome=yes`.
const HOME_DIRS: [&str; 3] = ["/home", "/root", "/run/user"];
/// Replaced by an empty private directory by `PrivateTmp=yes`.
const TMP_DIRS: [&str; 2] = ["/tmp", "/var/tmp"];

/// How the service uses a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Reads a file.
    Read,
    /// Lists a directory and reads its files.
    List,
    /// Runs a program.
    Run,
    /// Creates and writes files in a directory (made by install when
    /// missing, owned by the service's user; `ReadWritePaths=` lists it,
    /// so `ProtectSystem=strict` lets it through).
    Write,
}

/// One path the service will use, and the setting that names it.
#[derive(Debug, Clone)]
pub(super) struct PathUse {
    key: &'static str,
    path: PathBuf,
    how: Use,
}

/// Every path a service with this configuration uses.
pub(super) fn path_uses(config_path: &Path, config: Option<&Config>) -> Vec<PathUse> {
    let mut uses = vec![PathUse {
        key: "the configuration file",
        path: config_path.to_owned(),
        how: Use::Read,
    }];
    let Some(c) = config else {
        return uses;
    };
    let mut add = |key, path: Option<PathBuf>, how| {
        if let Some(path) = path {
            uses.push(PathUse { key, path, how });
        }
    };
    add(
        "service.state_dir",
        Some(c.service.state_dir.clone()),
        Use::Write,
    );
    add(
        "service.workspace_dir",
        Some(c.service.workspace_dir()),
        Use::Write,
    );
    add("service.log_dir", Some(c.service.log_dir()), Use::Write);
    add(
        "service.pid_file",
        c.service
            .pid_file
            .as_ref()
            .and_then(|p| p.parent())
            .map(Path::to_owned),
        Use::Write,
    );
    add("local.dir", c.local.dir.clone(), Use::List);
    add("github.token_file", c.github.token_file.clone(), Use::Read);
    add(
        "service.api_token_file",
        c.service.api_token_file.clone(),
        Use::Read,
    );
    // Resolved the way the runner will (a bare name through PATH).
    let program = c
        .workflow
        .command
        .first()
        .map(|p| crate::runner::check_program(p).unwrap_or_else(|_| PathBuf::from(p)));
    add("workflow.command", program, Use::Run);
    uses
}

/// The service's user as install will run it: `None` for the uid when
/// install is about to create the user (it then owns nothing yet).
#[derive(Debug, Clone)]
pub(super) struct Account {
    name: String,
    uid: Option<Uid>,
    gids: Vec<Gid>,
}

impl Account {
    /// The existing user `name`, or one install will create.
    pub(super) fn lookup(name: &str) -> Self {
        match User::from_name(name).ok().flatten() {
            Some(user) => {
                let gids = std::ffi::CString::new(name)
                    .ok()
                    .and_then(|c| nix::unistd::getgrouplist(&c, user.gid).ok())
                    .unwrap_or_else(|| vec![user.gid]);
                Self {
                    name: name.to_owned(),
                    uid: Some(user.uid),
                    gids,
                }
            }
            None => Self {
                name: name.to_owned(),
                uid: None,
                gids: Vec::new(),
            },
        }
    }
}

/// System directories the service must never be given, nor the operator
/// told to open up: a path of the service's own belongs below them.
const SYSTEM_DIRS: [&str; 9] = [
    "/", "/run", "/var", "/var/lib", "/etc", "/usr", "/opt", "/srv", "/home",
];

/// Whether `dir` is one of [`SYSTEM_DIRS`] (even through a link): never
/// made writable for the service, even with `--force`.
pub(super) fn is_system_dir(dir: &Path) -> bool {
    let real = resolved(dir);
    SYSTEM_DIRS
        .iter()
        .any(|d| dir == Path::new(d) || real == Path::new(d))
}

/// What would keep the service from using its paths, one line each.
pub(super) fn problems(uses: &[PathUse], account: &Account) -> Vec<String> {
    let mut found = Vec::new();
    for u in uses {
        let shown = u.path.display();
        let better = match u.how {
            Use::Write => "e.g. under /var/lib/claude-flow",
            Use::Read | Use::List | Use::Run => "e.g. under /etc/claude-flow or /usr/local",
        };
        // Where it really is: a symbolic link into /tmp is still /tmp.
        let real = resolved(&u.path);
        let hidden = |dirs: &[&'static str]| {
            dirs.iter()
                .find(|d| u.path.starts_with(d) || real.starts_with(d))
                .copied()
        };
        if let Some(home) = hidden(&HOME_DIRS) {
            found.push(format!(
                "{} {shown} is under {home}, which the unit hides (ProtectHome=yes): move it, {better}",
                u.key
            ));
            continue;
        }
        if let Some(tmp) = hidden(&TMP_DIRS) {
            found.push(format!(
                "{} {shown} is under {tmp}, which the unit replaces with an empty private one \
                 (PrivateTmp=yes): move it, {better}",
                u.key
            ));
            continue;
        }
        if u.key == "service.pid_file" {
            // Its directory must be the service's own: /run/claude-flow is
            // the unit's RuntimeDirectory=.
            if !u.path.starts_with(super::RUNTIME_DIR) && is_system_dir(&u.path) {
                found.push(format!(
                    "{} is in {shown}, a system directory the service must not be given write \
                     access to: put it under {} (the unit's RuntimeDirectory=)",
                    u.key,
                    super::RUNTIME_DIR
                ));
            }
            continue;
        }
        if u.how == Use::Write && is_system_dir(&u.path) {
            found.push(format!(
                "{} {shown} is a system directory: give the service one of its own, {better}",
                u.key
            ));
            continue;
        }
        // systemd hands the unit's StateDirectory= to the user at start.
        if u.how == Use::Write && real.starts_with(super::DEFAULT_STATE_DIR) {
            continue;
        }
        // What the service only reads must exist (install creates what it
        // writes; the configuration file itself may come later).
        if u.how != Use::Write && u.key != "the configuration file" && !real.exists() {
            found.push(format!("{} {shown} does not exist", u.key));
            continue;
        }
        if let Err(why) = access(account, &u.path, u.how) {
            found.push(format!("{} {shown}: {why}", u.key));
        }
    }
    found
}

/// `path` with its symbolic links resolved, as far as it exists (the rest
/// appended as it is).
fn resolved(path: &Path) -> PathBuf {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path.to_owned(),
        }
    }
}

/// Whether `account` can use `path` as `how` says, from the owners and
/// mode bits of the path and every directory above it (ACLs aside).
fn access(account: &Account, path: &Path, how: Use) -> Result<(), String> {
    // Root reads everything; a user install is about to create owns
    // nothing and has no group the files could be given to yet: there is
    // nothing to check (docs/operations.md says what it must read).
    if account.uid.is_none_or(|u| u.is_root()) {
        return Ok(());
    }
    let user = &account.name;
    // A missing path: install creates the directories it writes, and a
    // configuration file that does not exist yet is waited for.
    let Ok(real) = path.canonicalize() else {
        return Ok(());
    };
    let mut dirs: Vec<&Path> = real.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs {
        if !allowed(account, dir, 0o1)? {
            return Err(format!(
                "user {user} cannot enter {} (no search permission): chmod o+x {} or move it",
                dir.display(),
                dir.display()
            ));
        }
    }
    let (bits, words, fix) = match how {
        Use::Read => (0o4, "read", "g+r"),
        Use::List => (0o5, "list", "g+rx"),
        Use::Run => (0o5, "run", "g+rx"),
        Use::Write => (0o3, "write in", "g+rwx"),
    };
    if allowed(account, &real, bits)? {
        return Ok(());
    }
    let meta = std::fs::metadata(&real).map_err(|e| e.to_string())?;
    Err(format!(
        "user {user} cannot {words} it (mode {:04o}, owner uid {}, group gid {}): e.g. \
         chgrp {user} {} && chmod {fix} {}",
        meta.permissions().mode() & 0o7777,
        meta.uid(),
        meta.gid(),
        real.display(),
        real.display()
    ))
}

/// Whether the mode bits that apply to `account` on `path` include all of
/// `bits` (`0o4` read, `0o2` write, `0o1` execute/search).
fn allowed(account: &Account, path: &Path, bits: u32) -> Result<bool, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    let shift = if account.uid.is_some_and(|u| u.as_raw() == meta.uid()) {
        6
    } else if account.gids.iter().any(|g| g.as_raw() == meta.gid()) {
        3
    } else {
        0
    };
    Ok((mode >> shift) & bits == bits)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn nobody() -> Account {
        Account {
            name: "nobody".into(),
            uid: Some(Uid::from_raw(65534)),
            gids: vec![Gid::from_raw(65534)],
        }
    }

    fn one(path: &Path, how: Use) -> Vec<String> {
        let uses = [PathUse {
            key: "local.dir",
            path: path.to_owned(),
            how,
        }];
        problems(&uses, &nobody())
    }

    #[test]
    fn home_and_tmp_are_named_with_the_setting_that_hides_them() {
        let home = one(Path::new("/home/alice/issues"), Use::List);
        assert!(home[0].contains("ProtectHome=yes"), "{home:?}");
        let tmp = one(Path::new("/var/tmp/cf/issues"), Use::List);
        assert!(tmp[0].contains("PrivateTmp=yes"), "{tmp:?}");
        assert!(one(Path::new("/usr/share"), Use::List).is_empty());
    }

    #[test]
    fn mode_bits_decide_for_the_owner_the_group_and_others() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let me = Account {
            name: "me".into(),
            uid: Some(Uid::from_raw(std::fs::metadata(&file).unwrap().uid())),
            gids: Vec::new(),
        };
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(allowed(&me, &file, 0o4).unwrap());
        assert!(!allowed(&nobody(), &file, 0o4).unwrap());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o404)).unwrap();
        assert!(allowed(&nobody(), &file, 0o4).unwrap());
    }

    #[test]
    fn the_user_must_reach_and_read_what_the_service_reads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let config = dir.join("config.json");
        std::fs::write(&config, "{}").unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = access(&nobody(), &config, Use::Read).unwrap_err();
        assert!(
            err.starts_with(&format!("user nobody cannot enter {}", dir.display())),
            "{err}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = access(&nobody(), &config, Use::Read).unwrap_err();
        assert!(
            err.starts_with("user nobody cannot read it (mode 0600")
                && err.contains(&format!("chgrp nobody {}", config.display())),
            "{err}"
        );
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(access(&nobody(), &config, Use::Read), Ok(()));
        assert!(
            access(&nobody(), &config, Use::Run).is_err(),
            "not executable"
        );
    }

    #[test]
    fn links_into_tmp_missing_inputs_and_system_directories_are_problems() {
        // A link outside /tmp that leads into it.
        let tmp = tempfile::tempdir().unwrap();
        let link = PathBuf::from(format!("/dev/shm/claude-flow-test-{}", std::process::id()));
        if std::os::unix::fs::symlink(tmp.path(), &link).is_ok() {
            let found = one(&link.join("issues"), Use::List);
            let _ = std::fs::remove_file(&link);
            assert!(found[0].contains("PrivateTmp=yes"), "{found:?}");
        } else {
            eprintln!("SKIPPED the link part: cannot write /dev/shm");
        }
        let missing = problems(
            &[PathUse {
                key: "github.token_file",
                path: PathBuf::from("/etc/claude-flow-test-no-such/token"),
                how: Use::Read,
            }],
            &nobody(),
        );
        assert_eq!(
            missing,
            ["github.token_file /etc/claude-flow-test-no-such/token does not exist"]
        );
        let pid = problems(
            &[PathUse {
                key: "service.pid_file",
                path: PathBuf::from("/run"),
                how: Use::Write,
            }],
            &nobody(),
        );
        assert!(pid[0].contains("put it under /run/claude-flow"), "{pid:?}");
        let var = problems(
            &[PathUse {
                key: "service.log_dir",
                path: PathBuf::from("/var"),
                how: Use::Write,
            }],
            &nobody(),
        );
        assert!(var[0].contains("is a system directory"), "{var:?}");
        assert!(!var[0].contains("chmod"), "{var:?}");
    }
}
