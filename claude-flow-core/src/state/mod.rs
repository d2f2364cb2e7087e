//! Durable memory of every issue's record.
//!
//! Implementations:
//! - [`FileStore`]: an fsynced append-only journal in the state directory,
//!   with group commit, compaction and an exclusive lock: one daemon.
//! - `PostgresStore` (feature `postgres`): a PostgreSQL database that
//!   several daemons share, with claims, leases, a leader and wake-ups
//!   ([`Coordination`]).
//! - `MemoryStore` (feature `test-util`): a map, for tests.
//! - `MockStateStore` (feature `test-util`): a mockall mock.

mod coordination;
mod file;
#[cfg(any(test, feature = "test-util"))]
mod memory;
#[cfg(feature = "postgres")]
mod postgres;

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::StoreError;
use crate::issue::IssueKey;
use crate::record::{IssueRecord, ServiceState};

pub use coordination::{
    Begin, Changes, Claim, Coordination, Guarantees, NodeInfo, Settle, StopRequest,
};
pub use file::FileStore;
#[cfg(any(test, feature = "test-util"))]
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{Migrated, PostgresSettings, PostgresStore};
#[cfg(all(feature = "postgres", any(test, feature = "test-util")))]
pub use postgres::{TEST_POSTGRES_VAR, TestDb};

/// Keeps issue records across restarts.
///
/// `put` returns only once the record is durable: if the process is killed
/// right after, a new instance's `load` sees it.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Reads every record from durable storage (a fresh look, not a cache).
    async fn load(&self) -> Result<Vec<IssueRecord>, StoreError>;

    /// The record of one issue.
    async fn get(&self, key: &IssueKey) -> Result<Option<IssueRecord>, StoreError>;

    /// Stores a record durably, replacing the issue's previous one.
    async fn put(&self, record: &IssueRecord) -> Result<(), StoreError>;

    /// Stores a record without waiting for it to be durable: a crash may
    /// lose this write (not earlier ones), and later writes still land in
    /// order after it. For state whose loss only repeats idempotent work,
    /// such as the note that an outcome was reported. The default waits,
    /// like [`put`](StateStore::put).
    async fn put_relaxed(&self, record: &IssueRecord) -> Result<(), StoreError> {
        self.put(record).await
    }

    /// Every record, as this store currently holds them.
    async fn list(&self) -> Result<Vec<IssueRecord>, StoreError>;

    /// The service-wide state (a quota pause), fresh from durable storage.
    async fn load_service(&self) -> Result<ServiceState, StoreError>;

    /// Stores the service-wide state durably, replacing the previous one.
    async fn put_service(&self, state: &ServiceState) -> Result<(), StoreError>;

    /// What this store promises: whether several daemons may share it,
    /// whether it locks others out, whether writes survive a crash. The
    /// default is one daemon's durable store.
    fn guarantees(&self) -> Guarantees {
        Guarantees::SINGLE_DAEMON
    }

    /// The store's own coordination of several daemons (claims, leases, a
    /// leader), for stores that can be shared. `None`, the default: one
    /// daemon owns the store, leads always and claims from its own
    /// schedule.
    fn coordination(&self) -> Option<Arc<dyn Coordination>> {
        None
    }
}

#[cfg(any(test, feature = "test-util"))]
mockall::mock! {
    /// A mockall mock of [`StateStore`]. The capability methods
    /// ([`guarantees`](StateStore::guarantees),
    /// [`coordination`](StateStore::coordination)) keep their defaults, so
    /// a test sets expectations only on what it exercises.
    pub StateStore {}

    #[async_trait]
    impl StateStore for StateStore {
        async fn load(&self) -> Result<Vec<IssueRecord>, StoreError>;
        async fn get(&self, key: &IssueKey) -> Result<Option<IssueRecord>, StoreError>;
        async fn put(&self, record: &IssueRecord) -> Result<(), StoreError>;
        async fn put_relaxed(&self, record: &IssueRecord) -> Result<(), StoreError>;
        async fn list(&self) -> Result<Vec<IssueRecord>, StoreError>;
        async fn load_service(&self) -> Result<ServiceState, StoreError>;
        async fn put_service(&self, state: &ServiceState) -> Result<(), StoreError>;
    }
}
