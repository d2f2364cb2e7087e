//! The schema's versions (`claude-flow-core/migrations/`), applied under
//! the migrator's advisory lock on a connection of their own.

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::{connect_error, database_error};
use crate::error::{Error, StoreError};
use crate::secret::Secret;

/// The migrations table: named for claude-flow, so that a database shared
/// with another application using sqlx keeps both histories apart.
const TABLE: &str = "claude_flow_migrations";

/// What [`PostgresStore::migrate`](super::PostgresStore::migrate) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The schema's version before.
    pub from: Option<i64>,
    /// The schema's version now (this binary's newest).
    pub to: i64,
}

fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name(TABLE);
    migrator
}

/// The newest version this binary knows.
fn known(migrator: &Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}

async fn connect(
    options: &PgConnectOptions,
    url: &Secret,
    timeout: Duration,
) -> Result<PgConnection, Error> {
    match tokio::time::timeout(timeout, options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(connect_error(&e, url)),
        Err(_) => Err(StoreError::Database {
            what: "connect".into(),
            message: format!(
                "no answer from the server within {}",
                humantime::format_duration(timeout)
            ),
            retryable: true,
        }
        .into()),
    }
}

/// The newest version applied to the database, if any.
async fn applied(conn: &mut PgConnection, url: &Secret) -> Result<Option<i64>, StoreError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(TABLE)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| database_error("read the schema version", &e, url))?;
    if !exists {
        return Ok(None);
    }
    // TABLE spelt out: sqlx takes only static SQL text.
    sqlx::query_scalar("SELECT max(version) FROM claude_flow_migrations WHERE success")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| database_error("read the schema version", &e, url))
}

/// Applies what is missing. Refuses a schema newer than this binary's
/// before changing anything.
pub(super) async fn migrate(
    options: &PgConnectOptions,
    url: &Secret,
    timeout: Duration,
) -> Result<Migrated, Error> {
    let migrator = migrator();
    let known = known(&migrator);
    let mut conn = connect(options, url, timeout).await?;
    let from = applied(&mut conn, url).await?;
    if let Some(found) = from.filter(|v| *v > known) {
        let _ = conn.close().await;
        return Err(StoreError::SchemaTooNew { found, known }.into());
    }
    // run_direct, not run: run's future is not Send for every lifetime.
    let result = migrator.run_direct(None, &mut conn, false).await;
    // Closing ends the session, and with it the migrator's advisory lock,
    // whatever state a failed migration left it in.
    let _ = conn.close().await;
    match result {
        Ok(()) => Ok(Migrated { from, to: known }),
        // A newer binary migrated between the look above and the lock.
        Err(MigrateError::VersionMissing(found)) => {
            Err(StoreError::SchemaTooNew { found, known }.into())
        }
        Err(MigrateError::Execute(e)) => Err(database_error("migrate the schema", &e, url).into()),
        Err(e) => Err(StoreError::Database {
            what: "migrate the schema".into(),
            message: super::scrub(&e.to_string(), url),
            retryable: false,
        }
        .into()),
    }
}

/// Checks that the schema is this binary's, without changing it.
pub(super) async fn check(
    options: &PgConnectOptions,
    url: &Secret,
    timeout: Duration,
) -> Result<(), Error> {
    let known = known(&migrator());
    let mut conn = connect(options, url, timeout).await?;
    let found = applied(&mut conn, url).await;
    let _ = conn.close().await;
    match found? {
        Some(found) if found > known => Err(StoreError::SchemaTooNew { found, known }.into()),
        Some(found) if found == known => Ok(()),
        found => Err(StoreError::Database {
            what: "open the store".into(),
            message: format!(
                "the database's claude-flow schema is at version {}, this claude-flow needs {known}: \
                 start a daemon or run `claude-flow store migrate`",
                found.map_or_else(|| "none".to_owned(), |v| v.to_string())
            ),
            retryable: false,
        }
        .into()),
    }
}
