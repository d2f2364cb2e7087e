//! The directories the service writes (`service.state_dir`,
//! `service.workspace_dir`, `service.log_dir`), checked before anything
//! starts: a directory the service cannot create or write is a
//! configuration error naming its key and what to do, rather than an OS
//! error in the middle of the first attempt, or a half-created layout.

use std::path::{Path, PathBuf};

use nix::unistd::{AccessFlags, Uid, User, access};

use crate::config::ServiceConfig;
use crate::error::ConfigError;

/// Each directory the service writes, with the key that sets it.
pub fn service_directories(service: &ServiceConfig) -> [(&'static str, PathBuf); 3] {
    [
        ("service.state_dir", service.state_dir.clone()),
        ("service.workspace_dir", service.workspace_dir()),
        ("service.log_dir", service.log_dir()),
    ]
}

/// Checks, creating nothing, that each directory is writable by this
/// process or could be created by it (`config check`, and the first step
/// of [`prepare_directories`]).
pub fn check_directories(service: &ServiceConfig) -> Result<(), ConfigError> {
    for (key, dir) in service_directories(service) {
        check_directory(&dir).map_err(|reason| ConfigError::key(key, reason))?;
    }
    Ok(())
}

/// Checks every directory, then creates the missing ones (mode 0700: they
/// hold issue text, logs and tokens). Nothing is created unless every
/// check passes; a creation that still fails (a read-only mount, which
/// the permission check cannot see) may leave the ones made before it.
pub fn prepare_directories(service: &ServiceConfig) -> Result<(), ConfigError> {
    use std::os::unix::fs::DirBuilderExt;
    check_directories(service)?;
    for (key, dir) in service_directories(service) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| ConfigError::key(key, format!("cannot create {}: {e}", dir.display())))?;
    }
    Ok(())
}

fn check_directory(dir: &Path) -> Result<(), String> {
    let mut existing = dir;
    loop {
        match std::fs::metadata(existing) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) if existing == dir => {
                return Err(format!("{} is a file, not a directory", dir.display()));
            }
            Ok(_) => {
                return Err(format!(
                    "{} is a file, not a directory, so {} cannot be created",
                    existing.display(),
                    dir.display()
                ));
            }
            // ENOTDIR: a file further up, which the walk will name.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                match existing.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
                    _ => return Err(format!("{}: {e}", dir.display())),
                }
            }
            Err(e) => return Err(format!("{}: {e}", existing.display())),
        }
    }
    if access(existing, AccessFlags::W_OK | AccessFlags::X_OK).is_ok() {
        return Ok(());
    }
    let user = current_user();
    Err(if existing == dir {
        format!(
            "{} is not writable by {user}: give that user write access (chown or chmod) or choose another directory",
            dir.display()
        )
    } else {
        format!(
            "{} does not exist and {} is not writable by {user}, so it cannot be created: create it for that user (install -d -o <user> {}) or choose another directory",
            dir.display(),
            existing.display(),
            dir.display()
        )
    })
}

fn current_user() -> String {
    let uid = Uid::effective();
    match User::from_uid(uid) {
        Ok(Some(user)) => format!("user {} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_missing_directory_under_a_writable_one_passes_and_is_created() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/c");
        assert_eq!(check_directory(&dir), Ok(()));
        assert!(!dir.exists(), "checking creates nothing");
    }

    #[test]
    fn a_file_in_the_way_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("afile");
        std::fs::write(&file, "x").unwrap();
        let err = check_directory(&file.join("state")).unwrap_err();
        assert!(
            err.starts_with(&format!("{} is a file, not a directory", file.display())),
            "{err}"
        );
        let err = check_directory(&file).unwrap_err();
        assert_eq!(
            err,
            format!("{} is a file, not a directory", file.display())
        );
    }
}
