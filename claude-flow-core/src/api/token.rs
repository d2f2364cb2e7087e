//! The HTTP API's token: what every `POST /api/...` must carry as
//! `Authorization: Bearer <token>` (CONTRACT section 6).
//!
//! Where it comes from, first match wins: `service.api_token`; the file
//! `service.api_token_file` names; else a token the daemon makes at start
//! and writes to `<state_dir>/api-token` ([`FILE_NAME`]), mode 0600, for
//! the CLI run by the same user (or root) to read.
//!
//! The generated token is **replaced at every start**, not reused: the file
//! always holds the running service's token, and a copy that leaked (a
//! backup, a support bundle, a shell history) stops working at the next
//! restart. Whoever needs a token that survives restarts (a script on
//! another machine, a proxy) sets `service.api_token_file`. The file is
//! written only after the daemon holds the state directory's lock, so a
//! second instance that is refused cannot replace the running one's token.
//!
//! The token is a [`Secret`]: it is never logged, shown or put in an
//! error message; only the comparison and the `Authorization` header see
//! its value.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{Error, StoreError};
use crate::secret::Secret;

use super::ApiError;

/// The generated token's file name in the state directory.
pub const FILE_NAME: &str = "api-token";

/// Random bytes in a generated token: 256 bits, twice the least that is
/// safe against guessing, at no cost.
const TOKEN_BYTES: usize = 32;

/// `<state_dir>/api-token`.
pub fn generated_path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Where a token came from: what messages name so that a person knows
/// where to look. Never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenSource {
    /// `service.api_token`.
    Config,
    /// The file `service.api_token_file` names.
    File(PathBuf),
    /// Made by the daemon at start and written to this file.
    Generated(PathBuf),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config => f.write_str("service.api_token in the service's configuration"),
            Self::File(path) => write!(f, "the file {} (service.api_token_file)", path.display()),
            Self::Generated(path) => write!(
                f,
                "the file {}, which the service writes at start (service.api_token_file chooses a token instead)",
                path.display()
            ),
        }
    }
}

/// The HTTP API's token and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    secret: Secret,
    source: TokenSource,
}

impl ApiToken {
    /// A token from `source`.
    pub fn new(secret: Secret, source: TokenSource) -> Self {
        Self { secret, source }
    }

    /// The token itself, for the `Authorization` header.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Where it came from.
    pub fn source(&self) -> &TokenSource {
        &self.source
    }

    /// Whether `presented` is this token. The comparison takes the same
    /// time wherever the first difference is, so timing cannot reveal the
    /// token byte by byte. (A different length is refused at once; the
    /// length is no secret worth hiding: a generated token's is fixed.)
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let expected = self.secret.expose().as_bytes();
        !expected.is_empty() && bool::from(expected.ct_eq(presented))
    }

    /// The token the configuration sets (`service.api_token`, else
    /// `service.api_token_file`), if it sets one.
    pub fn configured(config: &Config) -> Result<Option<Self>, Error> {
        let Some(secret) = config.api_token()? else {
            return Ok(None);
        };
        let source = match (&config.service.api_token, &config.service.api_token_file) {
            (None, Some(file)) => TokenSource::File(file.clone()),
            _ => TokenSource::Config,
        };
        Ok(Some(Self::new(secret, source)))
    }

    /// The daemon's token at start: the configured one, else a new one
    /// written to `<state_dir>/api-token` ([`write_generated`]). Call it
    /// with the state directory's lock held. With a configured token, a
    /// generated file left by an earlier start is removed: it would
    /// only mislead.
    pub fn for_service(config: &Config) -> Result<Self, Error> {
        match Self::configured(config)? {
            Some(token) => {
                remove_generated(&config.service.state_dir);
                Ok(token)
            }
            None => Ok(write_generated(&config.service.state_dir)?),
        }
    }

    /// The token a client (the CLI) sends: the configured one, else the
    /// one the running service wrote to its state directory. Reading the
    /// file is the usual way to fail (it is 0600, the service user's): the
    /// error says what to do.
    pub fn for_client(config: &Config) -> Result<Self, ApiError> {
        if let Some(secret) = &config.service.api_token {
            return Ok(Self::new(secret.clone(), TokenSource::Config));
        }
        let (path, generated) = match &config.service.api_token_file {
            Some(file) => (file.clone(), false),
            None => (generated_path(&config.service.state_dir), true),
        };
        let unreadable = |reason: String| ApiError::Token {
            path: path.clone(),
            generated,
            reason,
        };
        let text = fs::read_to_string(&path).map_err(|e| {
            unreadable(match e.kind() {
                std::io::ErrorKind::NotFound if generated => {
                    "it does not exist: the service writes it at start when neither \
                     service.api_token nor service.api_token_file is set"
                        .to_owned()
                }
                _ => e.to_string(),
            })
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(unreadable("it is empty".to_owned()));
        }
        let source = if generated {
            TokenSource::Generated(path)
        } else {
            TokenSource::File(path)
        };
        Ok(Self::new(Secret::new(token), source))
    }
}

/// A new random token: 32 bytes (256 bits) from the operating system's
/// generator (a CSPRNG), hex-encoded so that it fits any header or shell.
pub fn generate() -> Result<Secret, std::io::Error> {
    use rand::TryRngCore;
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| std::io::Error::other(format!("the system's random generator failed: {e}")))?;
    let mut hex = String::with_capacity(TOKEN_BYTES * 2);
    for byte in bytes {
        hex.push_str(&format!("{byte:02x}"));
    }
    Ok(Secret::new(hex))
}

/// Makes a new token ([`generate`]) and writes it to
/// `<state_dir>/api-token`, replacing any earlier one atomically: written
/// to a temporary file created with mode 0600 (never readable by others,
/// not even for a moment), synced, renamed over the old one, and the
/// directory synced. On a full disk the old file is removed first, so that
/// a restart needs no room beyond what it had.
pub fn write_generated(state_dir: &Path) -> Result<ApiToken, StoreError> {
    let path = generated_path(state_dir);
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| StoreError::Io { path: p, source }
    };
    let secret = generate().map_err(io(&path))?;
    let tmp = state_dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    // A leftover of a start that died here with the same PID; create_new
    // below then refuses anything (a symlink included) put in its place.
    let _ = fs::remove_file(&tmp);
    let write = || {
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut file| {
                file.write_all(format!("{}\n", secret.expose()).as_bytes())?;
                file.sync_all()
            });
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    };
    let mut written = write();
    if let Err(e) = &written
        && matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
    {
        // A service restarting on a full disk: the old token is worthless
        // once this start replaces it, and removing it first frees the room
        // the new one needs.
        let _ = fs::remove_file(&path);
        written = write();
    }
    if let Err(e) = written {
        return Err(io(&tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(io(&path)(e));
    }
    // The rename is durable once the directory is.
    fs::File::open(state_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io(state_dir))?;
    tracing::info!(file = %path.display(), "HTTP API token written (claude-flow retry, cancel and resume read it)");
    Ok(ApiToken::new(secret, TokenSource::Generated(path)))
}

/// Removes a generated token's file, if there is one; a failure is only
/// logged, since the file is not used while a token is configured.
pub fn remove_generated(state_dir: &Path) {
    let path = generated_path(state_dir);
    match fs::remove_file(&path) {
        Ok(()) => tracing::info!(
            file = %path.display(),
            "removed the generated HTTP API token: the configuration sets one"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove the generated HTTP API token, which is no longer used")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn config(dir: &Path, service: &str) -> Config {
        let text = format!(
            r#"{{"source": "local", "local": {{"dir": "issues"}},
                "workflow": {{"command": ["wf"]}},
                "service": {{"state_dir": "state"{service}}}}}"#
        );
        Config::parse(&text, dir, Vec::new()).unwrap()
    }

    #[test]
    fn generated_tokens_are_256_random_bits_in_hex() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "[redacted]");
    }

    #[test]
    fn the_generated_file_is_private_and_replaced_at_each_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let config = config(dir.path(), "");
        let first = ApiToken::for_service(&config).unwrap();
        let path = state.join("api-token");
        assert_eq!(first.source(), &TokenSource::Generated(path.clone()));
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", first.secret().expose())
        );
        let read = ApiToken::for_client(&config).unwrap();
        assert_eq!(read.secret(), first.secret());

        // Made readable by mistake: the next start fixes that too.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let second = ApiToken::for_service(&config).unwrap();
        assert_ne!(second.secret(), first.secret());
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ApiToken::for_client(&config).unwrap(), second);
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["api-token"], "a temporary file was left behind");
    }

    #[test]
    fn a_new_token_is_written_at_start_on_a_full_disk() {
        let test = "a_new_token_is_written_at_start_on_a_full_disk";
        let Some(disk) = crate::small_fs::SmallFs::mount(test, 64) else {
            return;
        };
        let state = disk.path().join("state");
        fs::create_dir(&state).unwrap();
        let first = write_generated(&state).unwrap();
        disk.fill("filler", u64::MAX);
        assert_eq!(disk.free(), 0);
        // The service stopped for the full disk; its restart must not need
        // more room than the token it replaces.
        let second = write_generated(&state).unwrap();
        assert_ne!(second.secret(), first.secret());
        assert_eq!(
            fs::read_to_string(state.join(FILE_NAME)).unwrap(),
            format!("{}\n", second.secret().expose())
        );
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME], "a temporary file was left behind");
    }

    #[test]
    fn a_configured_token_wins_and_the_generated_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::write(state.join("api-token"), "old\n").unwrap();
        fs::write(dir.path().join("token"), "from-the-file\n").unwrap();
        let config = config(dir.path(), r#", "api_token_file": "token""#);
        let token = ApiToken::for_service(&config).unwrap();
        assert_eq!(token.secret().expose(), "from-the-file");
        assert_eq!(token.source(), &TokenSource::File(dir.path().join("token")));
        assert!(!state.join("api-token").exists());
        assert_eq!(ApiToken::for_client(&config).unwrap(), token);

        let config = self::config(dir.path(), r#", "api_token": "inline""#);
        let token = ApiToken::for_service(&config).unwrap();
        assert_eq!(token.secret().expose(), "inline");
        assert_eq!(token.source(), &TokenSource::Config);
        assert_eq!(ApiToken::for_client(&config).unwrap(), token);
    }

    #[test]
    fn a_client_that_cannot_read_the_token_is_told_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "");
        let e = ApiToken::for_client(&config).unwrap_err().to_string();
        let file = dir.path().join("state/api-token");
        assert!(
            e.starts_with(&format!(
                "cannot read the HTTP API's token {}: it does not exist",
                file.display()
            )),
            "{e}"
        );
        assert!(e.contains("as the service's user or as root"), "{e}");
        assert!(e.contains("service.api_token_file"), "{e}");

        let config = self::config(dir.path(), r#", "api_token_file": "nope""#);
        let e = ApiToken::for_client(&config).unwrap_err().to_string();
        assert!(e.contains("No such file"), "{e}");
        assert!(e.contains("(service.api_token_file)"), "{e}");
    }

    #[test]
    fn tokens_match_only_themselves() {
        let token = ApiToken::new(Secret::new("abc123"), TokenSource::Config);
        assert!(token.matches(b"abc123"));
        for other in [&b""[..], b"abc12", b"abc1234", b"ABC123", b"abc124"] {
            assert!(!token.matches(other), "{other:?}");
        }
        let empty = ApiToken::new(Secret::new(""), TokenSource::Config);
        assert!(!empty.matches(b""));
    }
}
