//! The file state store: an append-only journal in the state directory.
//!
//! `<state_dir>/state.jsonl` starts with a header line and then holds one
//! checksummed record per line ([`format`]): with the issue's text when
//! that changed (so once per round, however many transitions the round
//! has), without it otherwise; on load the last record for an issue wins,
//! with the text of the last one that had it. A put
//! appends its lines and returns after `fdatasync`, so an acknowledged
//! transition survives SIGKILL and power loss. Puts that arrive while a
//! sync is in flight are written and synced together (group commit), which
//! keeps the cost per transition low under concurrency. When the journal
//! holds far more lines than issues, or is more than twice the size of the
//! live records, it is compacted ([`writer`]): the live records are written
//! to a temporary file, synced, renamed over the journal, and the
//! directory is synced.
//!
//! Damage after the last good line is a write that never completed: it is
//! set aside, never dropped ([`aside`]); damage before a good line is an
//! error naming the line ([`load`]).
//!
//! `<state_dir>/lock` is held with an exclusive `flock` by the one writer
//! and names its PID. Readers (the CLI) load without the lock; since lines
//! are appended whole and compaction renames, a reader sees a consistent
//! prefix.

mod aside;
mod format;
mod load;
mod writer;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::StateStore;
use crate::error::StoreError;
use crate::issue::IssueKey;
use crate::record::{IssueRecord, ServiceState};
use format::HEADER;
#[cfg(test)]
use writer::COMPACT_SLACK;
use writer::{JournalWriter, Pending};

const JOURNAL: &str = "state.jsonl";
const LOCK: &str = "lock";
/// The service-wide state: small, rewritten whole (write, sync, rename).
const SERVICE: &str = "service.json";

/// A durable [`StateStore`] in a directory. See the module docs for the
/// file format and guarantees.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    journal: PathBuf,
    records: Arc<Mutex<HashMap<IssueKey, IssueRecord>>>,
    /// `None` when opened read-only.
    writer: Option<Mutex<mpsc::Sender<Pending>>>,
    /// The writer thread, joined on drop so that queued lines (relaxed
    /// puts) are written before the lock is released.
    writer_thread: Option<std::thread::JoinHandle<()>>,
    /// Held for the store's lifetime; dropping it releases the lock.
    _lock: Option<File>,
}

impl FileStore {
    /// Opens the store for writing: creates the directory (mode 0700) if
    /// needed, takes the exclusive lock, loads the journal and sets a
    /// damaged tail aside. Needs no free space beyond the lock file's PID
    /// when the journal exists, so that it starts on a full disk.
    ///
    /// Fails with [`StoreError::Locked`] naming the holder's PID when
    /// another process has the store open for writing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let lock = lock_dir(&dir)?;
        let journal = dir.join(JOURNAL);
        // A new journal appears whole (header written and synced, then
        // renamed into place), so an empty one is never a fresh start: it
        // was truncated, and starting over would run settled issues again.
        if !journal.exists() {
            let tmp = dir.join(format!("{JOURNAL}.new"));
            replace_file(&dir, &tmp, &journal, format!("{HEADER}\n").as_bytes())?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&journal)
            .map_err(io_err(&journal))?;
        if file.metadata().map_err(io_err(&journal))?.len() == 0 {
            return Err(load::truncated(&journal));
        }
        let mut loaded = load::read(&journal, &mut file)?;
        let mut note = None;
        if let Some(tail) = &loaded.tail {
            note = aside::set_aside_tail(&dir, &journal, tail)?;
        }
        loaded.sizes.len = file.metadata().map_err(io_err(&journal))?.len();
        let records = Arc::new(Mutex::new(loaded.records));
        let (tx, rx) = mpsc::channel();
        let writer = JournalWriter {
            dir: dir.clone(),
            path: journal.clone(),
            file,
            sizes: loaded.sizes,
            records: Arc::clone(&records),
            regions: loaded.regions,
            note,
            postponed: None,
        };
        let writer_thread = std::thread::Builder::new()
            .name("claude-flow-state".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(&dir))?;
        Ok(Self {
            dir,
            journal,
            records,
            writer: Some(Mutex::new(tx)),
            writer_thread: Some(writer_thread),
            _lock: Some(lock),
        })
    }

    /// Opens the store for reading only, without the lock, so that the CLI
    /// can inspect the state of a running service.
    pub fn open_read_only(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        let journal = dir.join(JOURNAL);
        let records = load::read_only(&journal)?;
        Ok(Self {
            dir,
            journal,
            records: Arc::new(Mutex::new(records)),
            writer: None,
            writer_thread: None,
            _lock: None,
        })
    }

    /// The PID of the service that holds the state directory, if one is
    /// alive. Reads the PID the holder wrote instead of probing the lock,
    /// since a probe could make a service starting at that instant think
    /// the directory is taken.
    pub fn lock_holder(dir: &Path) -> Option<u32> {
        let text = fs::read_to_string(dir.join(LOCK)).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        // EPERM: the process exists but belongs to another user, as a
        // service running as its own user does for an operator's CLI.
        let alive = pid > 0
            && matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                Ok(()) | Err(nix::errno::Errno::EPERM)
            );
        alive.then(|| u32::try_from(pid).ok()).flatten()
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn records(&self) -> MutexGuard<'_, HashMap<IssueKey, IssueRecord>> {
        // A panic while holding the lock leaves the map as it was before
        // the panicking statement, which is still a valid map.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer once it has written what is
        // queued; only then may another instance take the lock.
        drop(self.writer.take());
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
        // A clean exit leaves no PID behind for `lock_holder` to find,
        // and keeps the file's block, so that a start on a full disk can
        // write its PID again.
        if let Some(lock) = &self._lock {
            let _ = write_pid_field(lock, "");
        }
    }
}

#[async_trait]
impl StateStore for FileStore {
    async fn load(&self) -> Result<Vec<IssueRecord>, StoreError> {
        if self.writer.is_none() {
            let fresh = load::read_only(&self.journal)?;
            *self.records() = fresh;
        }
        // A writer's map mirrors its journal exactly.
        self.list().await
    }

    async fn get(&self, key: &IssueKey) -> Result<Option<IssueRecord>, StoreError> {
        Ok(self.records().get(key).cloned())
    }

    async fn put(&self, record: &IssueRecord) -> Result<(), StoreError> {
        let ack = self.enqueue(record)?;
        ack.await
            .map_err(|_| StoreError::Failed("the journal writer has stopped".into()))?
    }

    async fn put_relaxed(&self, record: &IssueRecord) -> Result<(), StoreError> {
        // Queued in order with every other write; only the wait is skipped.
        self.enqueue(record).map(drop)
    }

    async fn list(&self) -> Result<Vec<IssueRecord>, StoreError> {
        let mut all: Vec<IssueRecord> = self.records().values().cloned().collect();
        all.sort_by(|a, b| a.key().cmp(b.key()));
        Ok(all)
    }

    async fn load_service(&self) -> Result<ServiceState, StoreError> {
        let path = self.dir.join(SERVICE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path,
                line: None,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ServiceState::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    async fn put_service(&self, state: &ServiceState) -> Result<(), StoreError> {
        if self.writer.is_none() {
            return Err(StoreError::ReadOnly);
        }
        let dir = self.dir.clone();
        let bytes = serde_json::to_vec(state)
            .map_err(|e| StoreError::Failed(format!("cannot encode the service state: {e}")))?;
        tokio::task::spawn_blocking(move || {
            replace_file(
                &dir,
                &dir.join(format!("{SERVICE}.tmp")),
                &dir.join(SERVICE),
                &bytes,
            )
        })
        .await
        .map_err(|e| StoreError::Failed(format!("a state write panicked: {e}")))?
    }
}

impl FileStore {
    /// Hands a record's line to the journal writer and updates the map;
    /// the receiver says when the line is durable.
    fn enqueue(
        &self,
        record: &IssueRecord,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let writer = self.writer.as_ref().ok_or(StoreError::ReadOnly)?;
        let key = record.key().clone();
        let (ack, ack_rx) = oneshot::channel();
        // Encoding, updating the map and queueing the lines under one lock
        // keeps the journal's order equal to the map's, and the body line
        // written exactly when the body differs from the journal's.
        let mut records = self.records();
        let mut stored = record.clone();
        let previous = records.get(&key).map(|r| r.issue.body.as_str());
        let (entry, full) =
            writer::encode_record(&mut stored, previous).map_err(|e| StoreError::Corrupt {
                path: self.journal.clone(),
                line: None,
                message: format!("cannot encode record of {key}: {e}"),
            })?;
        let tx = writer.lock().unwrap_or_else(|e| e.into_inner());
        tx.send(Pending {
            entry,
            key: key.clone(),
            full,
            ack,
        })
        .map_err(|_| StoreError::Failed("the journal writer has stopped".into()))?;
        records.insert(key, stored);
        Ok(ack_rx)
    }
}

fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StoreError::Locked {
                dir: dir.to_owned(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
    }
    // The flock is the lock; the PID only tells the CLI who holds it, so a
    // full disk (no block for it) does not stop the start.
    if let Err(e) = write_pid_field(&file, &std::process::id().to_string()) {
        tracing::warn!(file = %path.display(), error = %e, "cannot write the PID into the lock file; the lock holds anyway");
    }
    Ok(file)
}

/// Writes `text` into the lock file as a fixed-width field, in place: the
/// file keeps its size (and its block) from one holder to the next.
fn write_pid_field(mut file: &File, text: &str) -> std::io::Result<()> {
    const WIDTH: usize = 10;
    let field = format!("{text:>WIDTH$}\n");
    file.seek(SeekFrom::Start(0))?;
    file.write_all(field.as_bytes())?;
    file.set_len(field.len() as u64)
}

/// Replaces `path` with `bytes` whole, or leaves it as it was: written to
/// `tmp` (mode 0600) and synced, renamed over `path`, the directory synced.
fn replace_file(dir: &Path, tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_synced(tmp, bytes)?;
    fs::rename(tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

/// Writes `bytes` to `path` (created mode 0600, or truncated) and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    out.write_all(bytes)
        .and_then(|()| out.sync_all())
        .map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
