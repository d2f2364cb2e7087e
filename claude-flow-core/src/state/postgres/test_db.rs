//! A throwaway database per test (feature `test-util`), on the server
//! `CLAUDE_FLOW_TEST_POSTGRES` names. Without the variable a test says
//! loudly that it was skipped; with it set and the server not answering,
//! the test fails.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

use crate::secret::Secret;

/// The variable naming the test server, e.g.
/// `postgres://postgres@127.0.0.1:5432/postgres`.
pub const TEST_POSTGRES_VAR: &str = "CLAUDE_FLOW_TEST_POSTGRES";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A database created for one test and dropped (with its connections)
/// when the value is dropped, also when the test panics.
#[derive(Debug)]
pub struct TestDb {
    admin: String,
    name: String,
    /// The test database's URL.
    pub url: Secret,
}

impl TestDb {
    /// A fresh database, or `None` (after a loud `skipped: no PostgreSQL`
    /// line on stderr) when no server is configured.
    ///
    /// # Panics
    ///
    /// When the variable is set and the server does not answer or refuses
    /// to create the database: the test must fail, not skip.
    pub async fn create() -> Option<Self> {
        let Ok(admin) = std::env::var(TEST_POSTGRES_VAR) else {
            // Straight to the process's stderr: the test harness captures
            // eprintln! of passing tests, and this line must be seen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipped: no PostgreSQL ({TEST_POSTGRES_VAR} is unset; e.g. \
                 {TEST_POSTGRES_VAR}=postgres://postgres@127.0.0.1:5432/postgres)"
            );
            return None;
        };
        let name = format!(
            "cf_test_{}_{}_{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        );
        let mut conn = match PgConnection::connect(&admin).await {
            Ok(conn) => conn,
            Err(e) => panic!("{TEST_POSTGRES_VAR} is set but its server does not answer: {e}"),
        };
        // The name is made here, of letters, digits and underscores.
        if let Err(e) = conn
            .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
        {
            panic!("cannot create the test database {name}: {e}");
        }
        let _ = conn.close().await;
        let url = with_database(&admin, &name);
        Some(Self {
            admin,
            name,
            url: Secret::new(url),
        })
    }

    /// The database's URL with `user` and `password` instead of the
    /// server's.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        let url = self.url.expose();
        let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{user}:{password}@{host}")
    }
}

/// `admin` with its database replaced by `name`.
fn with_database(admin: &str, name: &str) -> String {
    let (base, query) = admin
        .split_once('?')
        .map_or((admin, None), |(b, q)| (b, Some(q)));
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let host = rest.split_once('/').map_or(rest, |(host, _)| host);
    match query {
        Some(q) => format!("{scheme}://{host}/{name}?{q}"),
        None => format!("{scheme}://{host}/{name}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop cannot await; a thread of its own runs the statement even
        // while the test's runtime is shutting down.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let _ = conn
                        .execute(AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_database_replaces_the_servers() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "cf_t"),
            "postgres://postgres@127.0.0.1:5432/cf_t"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "cf_t"),
            "postgres://u@h/cf_t?sslmode=disable"
        );
    }
}
