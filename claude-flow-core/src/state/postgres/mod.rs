//! The PostgreSQL store: records, the service state and the coordination
//! of several daemons in one database.
//!
//! Each issue is a row of `claude_flow_issues`: the whole record as JSON
//! (as the file journal keeps it), plus the columns claims search on
//! (`ready_at`) and the claim on a running attempt (`node`, `run_id`,
//! `lease_until`, in the database's clock). Writes are single statements
//! or one transaction; PostgreSQL's commit is the durability point, so an
//! acknowledged write survives the daemon and the database server
//! crashing (with `synchronous_commit` on, its default).
//!
//! The schema lives in `claude-flow-core/migrations/` and is applied by
//! [`PostgresStore::connect`] (every daemon's start) and
//! [`PostgresStore::migrate`] (`claude-flow store migrate`), serialised
//! between daemons by the migrator's advisory lock, on a connection of its
//! own that is closed afterwards: a migration that fails cannot leave the
//! lock held on a pooled connection. See [`coordinate`] for claims, leases
//! and leadership.

mod coordinate;
mod schema;
#[cfg(any(test, feature = "test-util"))]
mod test_db;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use super::{Coordination, Guarantees, StateStore};
use crate::config::PostgresConfig;
use crate::error::{ConfigError, Error, StoreError};
use crate::issue::IssueKey;
use crate::record::{IssueRecord, IssueStatus, ServiceState};
use crate::secret::Secret;

pub use schema::Migrated;
#[cfg(any(test, feature = "test-util"))]
pub use test_db::{TEST_POSTGRES_VAR, TestDb};

/// The configuration key errors about the connection name.
const URL_KEY: &str = "store.postgres.url";

/// How the store connects and how long claims last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// How long a claim on a running attempt lasts without renewal
    /// (`store.postgres.lease`).
    pub lease: Duration,
    /// Connections in the pool, beside the leader's and the listener's.
    pub max_connections: u32,
    /// How long to wait for the server (connecting, or a free connection).
    pub connect_timeout: Duration,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self::from_config(&PostgresConfig::default())
    }
}

impl PostgresSettings {
    /// The settings of a `store.postgres` configuration section.
    pub fn from_config(config: &PostgresConfig) -> Self {
        Self {
            lease: config.lease,
            max_connections: 8,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A [`StateStore`] in a PostgreSQL database that several daemons share;
/// its [`Coordination`] keeps each issue on one daemon at a time. Cheap to
/// clone: clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    /// The listener's connection comes from here.
    listen_pool: PgPool,
    /// With the fencing `idle_session_timeout`, for the leader's
    /// connection.
    options: PgConnectOptions,
    /// The URL, only to scrub it from driver messages.
    url: Secret,
    settings: PostgresSettings,
    /// The connection that holds (or tries for) the leader's advisory
    /// lock: leadership lasts as long as this connection.
    leader: tokio::sync::Mutex<Option<(PgConnection, bool)>>,
    /// The connection that listens for work.
    listener: tokio::sync::Mutex<Option<PgListener>>,
    /// The connection that listens for changes (the leader's).
    changes: tokio::sync::Mutex<Option<PgListener>>,
    /// Set once the schema is known to be this binary's: a store opened
    /// with [`PostgresStore::open_lazy`] migrates before its first
    /// statement, and tries again at the next one when that failed.
    schema: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("host", &self.inner.options.get_host())
            .field("database", &self.inner.options.get_database())
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, brings the schema up to date (waiting for another daemon
    /// doing the same) and opens the pool.
    ///
    /// A URL that cannot be parsed, a refused login or a database that does
    /// not exist is a configuration error naming `store.postgres.url`
    /// (never showing it); a server that does not answer is a retryable
    /// [`StoreError::Database`]; a schema newer than this binary's is
    /// [`StoreError::SchemaTooNew`], and nothing is changed.
    pub async fn connect(url: &Secret, settings: PostgresSettings) -> Result<Self, Error> {
        let store = Self::open_lazy(url, settings)?;
        store.ready().await?;
        Ok(store)
    }

    /// Opens the store without connecting: the URL is checked now, and the
    /// schema brought up to date before the first statement (a daemon
    /// started while the database is down starts, and its store answers
    /// with retryable errors until the database is back).
    pub fn open_lazy(url: &Secret, settings: PostgresSettings) -> Result<Self, ConfigError> {
        let options = parse_url(url)?;
        Ok(Self::open(url, options, settings))
    }

    /// Connects without touching the schema, which must be exactly this
    /// binary's (for the CLI, which reads and never upgrades).
    pub async fn connect_current(url: &Secret, settings: PostgresSettings) -> Result<Self, Error> {
        let options = parse_url(url)?;
        schema::check(&options, url, settings.connect_timeout).await?;
        let store = Self::open(url, options, settings);
        let _ = store.inner.schema.set(());
        Ok(store)
    }

    /// Brings the database's schema up to date (`claude-flow store
    /// migrate`) and says what it did.
    pub async fn migrate(url: &Secret) -> Result<Migrated, Error> {
        let options = parse_url(url)?;
        schema::migrate(&options, url, PostgresSettings::default().connect_timeout).await
    }

    fn open(url: &Secret, options: PgConnectOptions, settings: PostgresSettings) -> Self {
        // Fencing: every session that writes ends after one lease without a
        // statement, so a daemon cut off from the database cannot have a
        // write land after another daemon took over (its sessions are gone
        // by then). The pool drops idle connections well before that, and
        // tests each one before use.
        let fenced = options.clone().options([(
            "idle_session_timeout",
            format!("{}ms", settings.lease.as_millis()),
        )]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.connect_timeout)
            .idle_timeout(settings.lease / 2)
            .test_before_acquire(true)
            .connect_lazy_with(fenced.clone());
        // The listener only reads, and idles by design: no timeout.
        // Two listeners: for work (every daemon) and for changes (the
        // leader).
        let listen_pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(settings.connect_timeout)
            .connect_lazy_with(options);
        Self {
            inner: Arc::new(Inner {
                pool,
                listen_pool,
                options: fenced,
                url: url.clone(),
                settings,
                leader: tokio::sync::Mutex::new(None),
                listener: tokio::sync::Mutex::new(None),
                changes: tokio::sync::Mutex::new(None),
                schema: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// Brings the schema up to date once (see [`open_lazy`](Self::open_lazy)).
    async fn ready(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner
            .schema
            .get_or_try_init(|| async {
                match schema::migrate(&inner.options, &inner.url, inner.settings.connect_timeout)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(Error::Store(e)) => Err(e),
                    Err(Error::Config(e)) => Err(StoreError::Misconfigured(e)),
                    Err(e) => Err(StoreError::Failed(e.to_string())),
                }
            })
            .await
            .map(|_| ())
    }

    /// Closes the pool and the dedicated connections (leadership ends).
    pub async fn close(&self) {
        if let Some((conn, _)) = self.inner.leader.lock().await.take() {
            let _ = conn.close().await;
        }
        self.inner.listener.lock().await.take();
        self.inner.changes.lock().await.take();
        self.inner.pool.close().await;
        self.inner.listen_pool.close().await;
    }

    /// Bounds a statement by the lease: a connection into a network that
    /// drops everything silently would otherwise hang its caller for as
    /// long as TCP keeps trying, and the caller (the leader's loop) must
    /// give up and let another daemon lead.
    async fn bounded<T>(
        &self,
        what: &str,
        statement: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.inner.settings.lease;
        tokio::time::timeout(limit, statement)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Database {
                    what: what.to_owned(),
                    message: format!(
                        "no answer from the database within {}",
                        humantime::format_duration(limit)
                    ),
                    retryable: true,
                })
            })
    }

    fn db(&self, what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
        move |e| database_error(what, &e, &self.inner.url)
    }
}

/// Parses the URL into connection options; errors name the key, not the
/// value.
fn parse_url(url: &Secret) -> Result<PgConnectOptions, ConfigError> {
    PgConnectOptions::from_str(url.expose()).map_err(|e| {
        ConfigError::key(
            URL_KEY,
            format!(
                "not a usable PostgreSQL URL ({}); the value is not shown, since it may hold a password",
                scrub(&e.to_string(), url)
            ),
        )
    })
}

/// A driver error as a store error, with the URL and its password taken
/// out of the message.
fn database_error(what: &str, e: &sqlx::Error, url: &Secret) -> StoreError {
    let retryable = matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed
    ) || e
        .as_database_error()
        .and_then(|d| d.code())
        // Class 08: connection exceptions; 57P01..03: the server is
        // shutting down or restarting; 40001/40P01: retry the transaction.
        .is_some_and(|c| {
            c.starts_with("08") || c.starts_with("57P") || c == "40001" || c == "40P01"
        });
    StoreError::Database {
        what: what.to_owned(),
        message: scrub(&e.to_string(), url),
        retryable,
    }
}

/// A connection failure at start: a refused login, an unknown database or
/// user is the configuration's fault (exit 78, naming the key); anything
/// else is the store's.
fn connect_error(e: &sqlx::Error, url: &Secret) -> Error {
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned());
    // 28xxx: invalid authorization (wrong password, no such user, refused by
    // pg_hba); 3D000: no such database.
    if code
        .as_deref()
        .is_some_and(|c| c.starts_with("28") || c == "3D000")
    {
        return ConfigError::key(
            URL_KEY,
            format!(
                "the server refused the connection: {}",
                scrub(&e.to_string(), url)
            ),
        )
        .into();
    }
    database_error("connect", e, url).into()
}

/// Removes the URL, and its password on its own, from a message.
fn scrub(message: &str, url: &Secret) -> String {
    let mut out = url.redact(message);
    if let Some(password) = PgConnectOptions::from_str(url.expose())
        .ok()
        .and_then(|_| password_of(url.expose()))
        && !password.is_empty()
    {
        out = out.replace(&password, crate::secret::REDACTED);
    }
    out
}

/// The password part of `scheme://user:password@host/...`, if any.
fn password_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.split('@').next().filter(|_| rest.contains('@'))?;
    Some(userinfo.split_once(':')?.1.to_owned())
}

/// Seconds since the epoch, as PostgreSQL's `to_timestamp` takes them.
fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn from_epoch(seconds: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or_default()
}

/// When an issue may start, as the engine's schedule sees it: queued
/// issues by when they became ready, retrying ones at their retry time.
fn ready_at(record: &IssueRecord) -> Option<SystemTime> {
    match record.status {
        IssueStatus::Queued => Some(record.updated_at),
        IssueStatus::Retrying => Some(record.next_retry_at.unwrap_or(record.updated_at)),
        _ => None,
    }
}

fn to_json(record: &IssueRecord) -> Result<String, StoreError> {
    serde_json::to_string(record).map_err(|e| StoreError::Database {
        what: format!("encode the record of {}", record.key()),
        message: e.to_string(),
        retryable: false,
    })
}

fn from_json(issue: &str, text: &str) -> Result<IssueRecord, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Database {
        what: format!("read the record of {issue} (table claude_flow_issues)"),
        message: e.to_string(),
        retryable: false,
    })
}

type Query = sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// The statement that stores a record, replacing the issue's previous one
/// (its claim columns stay as they are).
fn upsert(record: &IssueRecord) -> Result<Query, StoreError> {
    Ok(sqlx::query(
        "INSERT INTO claude_flow_issues (issue, status, ready_at, record) \
         VALUES ($1, $2, to_timestamp($3), $4::jsonb) \
         ON CONFLICT (issue) DO UPDATE SET status = excluded.status, \
         ready_at = excluded.ready_at, record = excluded.record, written_at = now()",
    )
    .bind(record.key().to_string())
    .bind(record.status.as_str())
    .bind(ready_at(record).map(epoch))
    .bind(to_json(record)?))
}

/// The statement that stores the service state.
fn upsert_service(state: &ServiceState) -> Result<Query, StoreError> {
    let text = serde_json::to_string(state).map_err(|e| StoreError::Database {
        what: "encode the service state".into(),
        message: e.to_string(),
        retryable: false,
    })?;
    Ok(sqlx::query(
        "INSERT INTO claude_flow_service (id, state) VALUES (true, $1::jsonb) \
         ON CONFLICT (id) DO UPDATE SET state = excluded.state",
    )
    .bind(text))
}

impl PostgresStore {
    /// Copies `records` and `service` into a database that holds no
    /// records yet (`claude-flow store copy --to postgres`): all of them in
    /// one transaction, or nothing. A database that already holds records
    /// is refused ([`Error::Conflict`]), so a copy runs once and never
    /// overwrites what daemons wrote.
    pub async fn import(
        &self,
        records: &[IssueRecord],
        service: &ServiceState,
    ) -> Result<usize, Error> {
        self.ready().await?;
        let what = "copy records in";
        let mut tx = self.inner.pool.begin().await.map_err(self.db(what))?;
        // Two copies at once: the second waits here, then finds records.
        sqlx::query("LOCK TABLE claude_flow_issues IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(self.db(what))?;
        let held: i64 = sqlx::query_scalar("SELECT count(*) FROM claude_flow_issues")
            .fetch_one(&mut *tx)
            .await
            .map_err(self.db(what))?;
        if held > 0 {
            return Err(Error::Conflict(format!(
                "the database already holds {held} issue records: `store copy` copies into a \
                 database without records only, once; nothing was copied"
            )));
        }
        for record in records {
            upsert(record)?
                .execute(&mut *tx)
                .await
                .map_err(self.db(what))?;
        }
        upsert_service(service)?
            .execute(&mut *tx)
            .await
            .map_err(self.db(what))?;
        tx.commit().await.map_err(self.db(what))?;
        Ok(records.len())
    }
}

/// The store's statements, unbounded: the trait bounds each one.
impl PostgresStore {
    async fn load_now(&self) -> Result<Vec<IssueRecord>, StoreError> {
        self.list_now().await
    }

    async fn get_now(&self, key: &IssueKey) -> Result<Option<IssueRecord>, StoreError> {
        self.ready().await?;
        let issue = key.to_string();
        let row: Option<(String,)> =
            sqlx::query_as("SELECT record::text FROM claude_flow_issues WHERE issue = $1")
                .bind(&issue)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(self.db("read a record"))?;
        row.map(|(text,)| from_json(&issue, &text)).transpose()
    }

    /// Several daemons write here, so a write never takes back what
    /// another did: while an attempt is claimed, or when the stored record
    /// is ahead of the one written (a later round, more attempts), only the
    /// leader-owned fields are taken (see
    /// [`IssueRecord::take_leader_fields`]); a record is marked running
    /// only by a claim.
    async fn put_now(&self, record: &IssueRecord) -> Result<(), StoreError> {
        self.ready().await?;
        let what = "write a record";
        let issue = record.key().to_string();
        let mut tx = self.inner.pool.begin().await.map_err(self.db(what))?;
        let row: Option<(String, bool)> = sqlx::query_as(
            "SELECT record::text, lease_until IS NOT NULL FROM claude_flow_issues \
             WHERE issue = $1 FOR UPDATE",
        )
        .bind(&issue)
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.db(what))?;
        match row {
            Some((text, claimed)) => {
                let mut stored = from_json(&issue, &text)?;
                // A write made from an older copy (the stored record was
                // changed since, by an operator's cancel, say) takes only
                // the leader's fields: `updated_at` moves with every change
                // of status (hosts' clocks are assumed to agree, as NTP
                // keeps them, far closer than two such writes come). A new
                // round always replaces a settled one, whatever the clocks.
                let replace = !claimed
                    && record.status != IssueStatus::Running
                    && !stored.is_ahead_of(record)
                    && (record.round > stored.round || record.updated_at >= stored.updated_at);
                if replace {
                    upsert(record)?
                        .execute(&mut *tx)
                        .await
                        .map_err(self.db(what))?;
                } else if stored.take_leader_fields(record) {
                    sqlx::query(
                        "UPDATE claude_flow_issues SET record = $2::jsonb, written_at = now() \
                         WHERE issue = $1",
                    )
                    .bind(&issue)
                    .bind(to_json(&stored)?)
                    .execute(&mut *tx)
                    .await
                    .map_err(self.db(what))?;
                }
            }
            None => {
                upsert(record)?
                    .execute(&mut *tx)
                    .await
                    .map_err(self.db(what))?;
            }
        }
        tx.commit().await.map_err(self.db(what))?;
        Ok(())
    }

    async fn list_now(&self) -> Result<Vec<IssueRecord>, StoreError> {
        self.ready().await?;
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT issue, record::text FROM claude_flow_issues ORDER BY issue")
                .fetch_all(&self.inner.pool)
                .await
                .map_err(self.db("list records"))?;
        rows.iter()
            .map(|(issue, text)| from_json(issue, text))
            .collect()
    }

    async fn load_service_now(&self) -> Result<ServiceState, StoreError> {
        self.ready().await?;
        let row: Option<(String,)> =
            sqlx::query_as("SELECT state::text FROM claude_flow_service WHERE id")
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(self.db("read the service state"))?;
        let Some((text,)) = row else {
            return Ok(ServiceState::default());
        };
        serde_json::from_str(&text).map_err(|e| StoreError::Database {
            what: "read the service state (table claude_flow_service)".into(),
            message: e.to_string(),
            retryable: false,
        })
    }

    async fn put_service_now(&self, state: &ServiceState) -> Result<(), StoreError> {
        self.ready().await?;
        upsert_service(state)?
            .execute(&self.inner.pool)
            .await
            .map_err(self.db("write the service state"))?;
        Ok(())
    }
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn load(&self) -> Result<Vec<IssueRecord>, StoreError> {
        self.bounded("list records", self.load_now()).await
    }

    async fn get(&self, key: &IssueKey) -> Result<Option<IssueRecord>, StoreError> {
        self.bounded("read a record", self.get_now(key)).await
    }

    /// A write never takes back a claim or a newer attempt: while an
    /// attempt is claimed, or when the stored record is ahead, only the
    /// leader-owned fields are taken.
    async fn put(&self, record: &IssueRecord) -> Result<(), StoreError> {
        self.bounded("write a record", self.put_now(record)).await
    }

    async fn list(&self) -> Result<Vec<IssueRecord>, StoreError> {
        self.bounded("list records", self.list_now()).await
    }

    async fn load_service(&self) -> Result<ServiceState, StoreError> {
        self.bounded("read the service state", self.load_service_now())
            .await
    }

    async fn put_service(&self, state: &ServiceState) -> Result<(), StoreError> {
        self.bounded("write the service state", self.put_service_now(state))
            .await
    }

    fn guarantees(&self) -> Guarantees {
        Guarantees::SHARED
    }

    fn coordination(&self) -> Option<Arc<dyn Coordination>> {
        Some(Arc::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_name_the_key_and_hide_the_password() {
        let url = Secret::new("postgres://cf:hunter2@db:notaport/claude_flow");
        let e = parse_url(&url).unwrap_err().to_string();
        assert!(
            e.starts_with("store.postgres.url: not a usable PostgreSQL URL"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn scrubbing_takes_out_the_url_and_the_password() {
        let url = Secret::new("postgres://cf:hunter2@db/claude_flow");
        let text = "failed for postgres://cf:hunter2@db/claude_flow (password hunter2)";
        assert_eq!(
            scrub(text, &url),
            "failed for [redacted] (password [redacted])"
        );
    }
}
