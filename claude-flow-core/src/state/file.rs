//! The file state store: an append-only journal of full records.
//!
//! `<state_dir>/state.jsonl` starts with a header line and then holds one
//! JSON record per line; on load the last line for an issue wins. A put
//! appends its line and returns after `fdatasync`, so an acknowledged
//! transition survives SIGKILL and power loss. Puts that arrive while a
//! sync is in flight are written and synced together (group commit), which
//! keeps the cost per transition low under concurrency. When the journal
//! holds far more lines than issues it is compacted: the live records are
//! written to a temporary file, synced, renamed over the journal, and the
//! directory is synced.
//!
//! `<state_dir>/lock` is held with an exclusive `flock` by the one writer
//! and names its PID. Readers (the CLI) load without the lock; since lines
//! are appended whole and compaction renames, a reader sees a consistent
//! prefix.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::StateStore;
use crate::error::StoreError;
use crate::issue::IssueKey;
use crate::record::{IssueRecord, ServiceState};

const JOURNAL: &str = "state.jsonl";
const LOCK: &str = "lock";
/// The service-wide state: small, rewritten whole (write, sync, rename).
const SERVICE: &str = "service.json";
const HEADER: &str = r#"{"claude_flow_state":1}"#;
/// Compact when the journal has this many more lines than live records...
const COMPACT_SLACK: usize = 4096;
/// ...and at least this many times as many.
const COMPACT_FACTOR: usize = 4;

type Ack = oneshot::Sender<Result<(), StoreError>>;
/// A journal line and who waits for it to be durable.
type Pending = (Vec<u8>, Ack);

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
    /// needed, takes the exclusive lock, and loads the journal.
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
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&journal)
            .map_err(io_err(&journal))?;
        // An empty journal holds nothing: it was created by an instance that
        // died before writing its header.
        let empty = file.metadata().map_err(io_err(&journal))?.len() == 0;
        if empty {
            file.write_all(format!("{HEADER}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io_err(&journal))?;
            sync_dir(&dir)?;
        }
        let loaded = read_journal(&journal, &mut file)?;
        if let Some(torn) = &loaded.torn_tail {
            preserve_torn_tail(&dir, &journal, loaded.valid_len, torn)?;
        }
        let lines = loaded.lines;
        let records = Arc::new(Mutex::new(loaded.records));
        let (tx, rx) = mpsc::channel();
        let writer = JournalWriter {
            dir: dir.clone(),
            path: journal.clone(),
            file,
            lines,
            records: Arc::clone(&records),
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
        let records = load_read_only(&journal)?;
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
        // A clean exit leaves no PID behind for `lock_holder` to find.
        if let Some(lock) = &self._lock {
            let _ = lock.set_len(0);
        }
    }
}

#[async_trait]
impl StateStore for FileStore {
    async fn load(&self) -> Result<Vec<IssueRecord>, StoreError> {
        if self.writer.is_none() {
            let fresh = load_read_only(&self.journal)?;
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
        let mut line = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            path: self.journal.clone(),
            line: None,
            message: format!("cannot encode record of {}: {e}", record.key()),
        })?;
        line.push(b'\n');
        let (ack_tx, ack_rx) = oneshot::channel();
        {
            // Updating the map and queueing the line under one lock keeps
            // the journal's order equal to the map's.
            let mut records = self.records();
            let tx = writer.lock().unwrap_or_else(|e| e.into_inner());
            tx.send((line, ack_tx))
                .map_err(|_| StoreError::Failed("the journal writer has stopped".into()))?;
            records.insert(record.key().clone(), record.clone());
        }
        Ok(ack_rx)
    }
}

/// Owns the journal file on its own thread: blocking writes and syncs stay
/// off the async runtime, and batching falls out of draining the channel.
struct JournalWriter {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    lines: usize,
    records: Arc<Mutex<HashMap<IssueKey, IssueRecord>>>,
}

impl JournalWriter {
    fn run(mut self, rx: mpsc::Receiver<Pending>) {
        let mut failed: Option<String> = None;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            if let Some(reason) = &failed {
                for (_, ack) in batch {
                    let _ = ack.send(Err(StoreError::Failed(reason.clone())));
                }
                continue;
            }
            let mut buf = Vec::with_capacity(batch.iter().map(|(l, _)| l.len()).sum());
            for (line, _) in &batch {
                buf.extend_from_slice(line);
            }
            let result = self
                .file
                .write_all(&buf)
                .and_then(|()| self.file.sync_data());
            match result {
                Ok(()) => {
                    self.lines += batch.len();
                    for (_, ack) in batch {
                        let _ = ack.send(Ok(()));
                    }
                    if let Err(e) = self.maybe_compact() {
                        tracing::error!(error = %e, "state journal compaction failed");
                        failed = Some(e.to_string());
                    }
                }
                Err(e) => {
                    let reason = format!("{}: {e}", self.path.display());
                    tracing::error!(error = %reason, "state journal write failed");
                    for (_, ack) in batch {
                        let _ = ack.send(Err(StoreError::Failed(reason.clone())));
                    }
                    failed = Some(reason);
                }
            }
        }
    }

    fn maybe_compact(&mut self) -> Result<(), StoreError> {
        let snapshot: Vec<Vec<u8>> = {
            let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            let live = records.len();
            if self.lines
                < live
                    .saturating_mul(COMPACT_FACTOR)
                    .max(live + COMPACT_SLACK)
            {
                return Ok(());
            }
            records
                .values()
                .map(serde_json::to_vec)
                .collect::<Result<_, _>>()
                .map_err(|e| StoreError::Failed(format!("cannot encode a record: {e}")))?
        };
        // Lines queued but not yet written are older than or equal to the
        // map's versions; appending them after the snapshot is harmless.
        let tmp = self.dir.join(format!("{JOURNAL}.compact"));
        let mut buf = Vec::new();
        buf.extend_from_slice(HEADER.as_bytes());
        buf.push(b'\n');
        for line in &snapshot {
            buf.extend_from_slice(line);
            buf.push(b'\n');
        }
        replace_file(&self.dir, &tmp, &self.path, &buf)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        tracing::debug!(
            from = self.lines,
            to = snapshot.len(),
            "compacted the state journal"
        );
        self.lines = snapshot.len();
        Ok(())
    }
}

struct Loaded {
    records: HashMap<IssueKey, IssueRecord>,
    lines: usize,
    /// Bytes up to and including the last complete line.
    valid_len: u64,
    /// An unterminated last line: a write that never completed, so never
    /// acknowledged.
    torn_tail: Option<Vec<u8>>,
}

fn read_journal(path: &Path, file: &mut File) -> Result<Loaded, StoreError> {
    file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut records = HashMap::new();
    let mut buf = Vec::new();
    let mut lines = 0usize;
    let mut valid_len = 0u64;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            return Ok(Loaded {
                records,
                lines: lines.saturating_sub(1),
                valid_len,
                torn_tail: Some(buf),
            });
        }
        lines += 1;
        valid_len += n as u64;
        let text = &buf[..buf.len() - 1];
        if lines == 1 {
            check_header(path, text)?;
            continue;
        }
        let record: IssueRecord =
            serde_json::from_slice(text).map_err(|e| StoreError::Corrupt {
                path: path.to_owned(),
                line: Some(lines),
                message: e.to_string(),
            })?;
        records.insert(record.key().clone(), record);
    }
    if lines == 0 {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            line: None,
            message: "the file is empty (expected a header line)".into(),
        });
    }
    Ok(Loaded {
        records,
        lines: lines - 1,
        valid_len,
        torn_tail: None,
    })
}

fn check_header(path: &Path, text: &[u8]) -> Result<(), StoreError> {
    if text == HEADER.as_bytes() {
        Ok(())
    } else {
        Err(StoreError::Corrupt {
            path: path.to_owned(),
            line: Some(1),
            message: format!("not a claude-flow state journal (expected header {HEADER})"),
        })
    }
}

fn load_read_only(path: &Path) -> Result<HashMap<IssueKey, IssueRecord>, StoreError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    // Created but not yet given its header (a service starting right now,
    // or one killed at that instant): nothing stored yet.
    if file.metadata().map_err(io_err(path))?.len() == 0 {
        return Ok(HashMap::new());
    }
    // A torn tail seen by a reader is a write in progress; ignore it.
    Ok(read_journal(path, &mut file)?.records)
}

/// Moves an unterminated last line aside (never discarding it) and cuts it
/// from the journal so that appends start on a line boundary.
fn preserve_torn_tail(
    dir: &Path,
    journal: &Path,
    valid_len: u64,
    torn: &[u8],
) -> Result<(), StoreError> {
    let aside = dir.join(format!(
        "{JOURNAL}.torn-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    ));
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)
        .map_err(io_err(&aside))?;
    out.write_all(torn)
        .and_then(|()| out.sync_all())
        .map_err(io_err(&aside))?;
    let file = OpenOptions::new()
        .write(true)
        .open(journal)
        .map_err(io_err(journal))?;
    file.set_len(valid_len)
        .and_then(|()| file.sync_all())
        .map_err(io_err(journal))?;
    sync_dir(dir)?;
    tracing::warn!(
        journal = %journal.display(),
        kept_in = %aside.display(),
        bytes = torn.len(),
        "the state journal ended in an incomplete write (never acknowledged); moved it aside"
    );
    Ok(())
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
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(io_err(&path))?;
    Ok(file)
}

/// Replaces `path` with `bytes` whole, or leaves it as it was: written to
/// `tmp` (mode 0600) and synced, renamed over `path`, the directory synced.
fn replace_file(dir: &Path, tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io_err(tmp))?;
    out.write_all(bytes)
        .and_then(|()| out.sync_all())
        .map_err(io_err(tmp))?;
    fs::rename(tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
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
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::issue::Issue;
    use crate::record::IssueStatus;

    fn record(n: u64, status: IssueStatus) -> IssueRecord {
        let key = IssueKey::new("o/r".parse().unwrap(), n);
        let mut r = IssueRecord::new(Issue::new(key, format!("issue {n}")));
        r.status = status;
        r
    }

    #[tokio::test]
    async fn acknowledged_puts_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStore::open(dir.path()).unwrap();
            store.put(&record(1, IssueStatus::Queued)).await.unwrap();
            store.put(&record(1, IssueStatus::Done)).await.unwrap();
            store.put(&record(2, IssueStatus::Failed)).await.unwrap();
        }
        let store = FileStore::open(dir.path()).unwrap();
        let all = store.load().await.unwrap();
        let statuses: Vec<_> = all.iter().map(|r| (r.key().number, r.status)).collect();
        assert_eq!(statuses, [(1, IssueStatus::Done), (2, IssueStatus::Failed)]);
    }

    #[tokio::test]
    async fn relaxed_puts_land_in_order_with_the_others() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStore::open(dir.path()).unwrap();
            store.put(&record(1, IssueStatus::Running)).await.unwrap();
            store
                .put_relaxed(&record(1, IssueStatus::Done))
                .await
                .unwrap();
            store.put(&record(2, IssueStatus::Done)).await.unwrap();
        }
        // The durable put after it means the relaxed one is on disk too.
        let store = FileStore::open_read_only(dir.path()).unwrap();
        let statuses: Vec<_> = store
            .load()
            .await
            .unwrap()
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(statuses, [IssueStatus::Done, IssueStatus::Done]);
    }

    #[tokio::test]
    async fn relaxed_puts_are_on_disk_once_the_store_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        for n in 0..50 {
            store
                .put_relaxed(&record(n, IssueStatus::Done))
                .await
                .unwrap();
        }
        drop(store);
        let reread = FileStore::open_read_only(dir.path()).unwrap();
        assert_eq!(reread.load().await.unwrap().len(), 50);
    }

    #[tokio::test]
    async fn an_empty_journal_reads_as_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        File::create(dir.path().join(JOURNAL)).unwrap();
        let reader = FileStore::open_read_only(dir.path()).unwrap();
        assert!(reader.load().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_puts_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for n in 0..200 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                store.put(&record(n, IssueStatus::Done)).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(store);
        let reread = FileStore::open_read_only(dir.path()).unwrap();
        assert_eq!(reread.load().await.unwrap().len(), 200);
    }

    #[test]
    fn a_second_writer_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _first = FileStore::open(dir.path()).unwrap();
        match FileStore::open(dir.path()) {
            Err(StoreError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let _store = FileStore::open(dir.path().join("state")).unwrap();
        for name in ["state", "state/state.jsonl", "state/lock"] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{name} is readable by others: {mode:o}");
        }
    }

    #[tokio::test]
    async fn a_corrupt_line_is_an_error_naming_file_and_line_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStore::open(dir.path()).unwrap();
            store.put(&record(1, IssueStatus::Done)).await.unwrap();
        }
        let journal = dir.path().join(JOURNAL);
        let mut text = fs::read_to_string(&journal).unwrap();
        text.push_str("{not json}\n");
        fs::write(&journal, &text).unwrap();
        let err = FileStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("state.jsonl line 3"), "{err}");
        assert_eq!(
            fs::read_to_string(&journal).unwrap(),
            text,
            "the file was changed"
        );
    }

    #[tokio::test]
    async fn a_torn_last_line_is_moved_aside_and_the_rest_loads() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStore::open(dir.path()).unwrap();
            store.put(&record(1, IssueStatus::Done)).await.unwrap();
        }
        let journal = dir.path().join(JOURNAL);
        let mut f = OpenOptions::new().append(true).open(&journal).unwrap();
        f.write_all(b"{\"issue\":{\"key\"").unwrap();
        drop(f);
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(store.load().await.unwrap().len(), 1);
        store.put(&record(2, IssueStatus::Done)).await.unwrap();
        drop(store);
        let kept: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(fs::read(kept[0].path()).unwrap(), b"{\"issue\":{\"key\"");
        let reread = FileStore::open_read_only(dir.path()).unwrap();
        assert_eq!(reread.load().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn compaction_keeps_the_latest_version_of_every_record() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStore::open(dir.path()).unwrap();
            for round in 0..(COMPACT_SLACK / 10 + 20) {
                for n in 0..10 {
                    let mut r = record(n, IssueStatus::Running);
                    r.round = u32::try_from(round).unwrap();
                    store.put(&r).await.unwrap();
                }
            }
        }
        let lines = fs::read_to_string(dir.path().join(JOURNAL))
            .unwrap()
            .lines()
            .count();
        assert!(
            lines < COMPACT_SLACK,
            "journal was not compacted: {lines} lines"
        );
        let store = FileStore::open_read_only(dir.path()).unwrap();
        let all = store.load().await.unwrap();
        assert_eq!(all.len(), 10);
        let last = u32::try_from(COMPACT_SLACK / 10 + 19).unwrap();
        assert!(all.iter().all(|r| r.round == last));
    }

    #[tokio::test]
    async fn the_service_state_survives_reopening_and_readers_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(store.load_service().await.unwrap(), ServiceState::default());
        let state = ServiceState {
            paused_until: Some(std::time::SystemTime::UNIX_EPOCH),
            pause_reason: Some("quota".into()),
            quota_exits: 2,
            ..ServiceState::default()
        };
        store.put_service(&state).await.unwrap();
        let reader = FileStore::open_read_only(dir.path()).unwrap();
        assert_eq!(reader.load_service().await.unwrap(), state);
        assert!(matches!(
            reader.put_service(&state).await,
            Err(StoreError::ReadOnly)
        ));
        drop(store);
        let again = FileStore::open(dir.path()).unwrap();
        assert_eq!(again.load_service().await.unwrap(), state);
    }

    #[tokio::test]
    async fn a_read_only_store_refuses_writes_and_sees_new_data_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let writer = FileStore::open(dir.path()).unwrap();
        let reader = FileStore::open_read_only(dir.path()).unwrap();
        assert!(matches!(
            reader.put(&record(1, IssueStatus::Done)).await,
            Err(StoreError::ReadOnly)
        ));
        writer.put(&record(1, IssueStatus::Done)).await.unwrap();
        assert_eq!(reader.load().await.unwrap().len(), 1);
    }
}
