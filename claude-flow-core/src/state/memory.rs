//! An in-memory [`StateStore`] for tests: durable for the life of the value.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::StateStore;
use crate::error::StoreError;
use crate::issue::IssueKey;
use crate::record::{IssueRecord, ServiceState};

/// A [`StateStore`] that keeps records in a map. Clone the records out with
/// [`list`](StateStore::list) to assert on them.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<IssueKey, IssueRecord>>,
    service: Mutex<ServiceState>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that starts with these records, as if loaded after a restart.
    pub fn with_records(records: impl IntoIterator<Item = IssueRecord>) -> Self {
        let map = records.into_iter().map(|r| (r.key().clone(), r)).collect();
        Self {
            records: Mutex::new(map),
            service: Mutex::default(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<IssueKey, IssueRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn load(&self) -> Result<Vec<IssueRecord>, StoreError> {
        self.list().await
    }

    async fn get(&self, key: &IssueKey) -> Result<Option<IssueRecord>, StoreError> {
        Ok(self.map().get(key).cloned())
    }

    async fn put(&self, record: &IssueRecord) -> Result<(), StoreError> {
        self.map().insert(record.key().clone(), record.clone());
        Ok(())
    }

    async fn list(&self) -> Result<Vec<IssueRecord>, StoreError> {
        Ok(self.map().values().cloned().collect())
    }

    async fn load_service(&self) -> Result<ServiceState, StoreError> {
        Ok(self
            .service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }

    async fn put_service(&self, state: &ServiceState) -> Result<(), StoreError> {
        *self.service.lock().unwrap_or_else(|e| e.into_inner()) = state.clone();
        Ok(())
    }

    fn guarantees(&self) -> super::Guarantees {
        super::Guarantees::IN_MEMORY
    }
}
