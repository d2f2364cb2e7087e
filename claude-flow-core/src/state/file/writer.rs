//! The journal writer: group commit on its own thread, and compaction by
//! line count and by size.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

use super::aside::{InPlace, write_side_file};
use super::format::{self, EntryRef, HEADER};
use super::load::Region;
use super::{JOURNAL, io_err, sync_dir, write_synced};
use crate::error::StoreError;
use crate::issue::IssueKey;
use crate::record::IssueRecord;

/// Compact when the journal has this many more record lines than live
/// records...
pub(super) const COMPACT_SLACK: usize = 4096;
/// ...and at least this many times as many;
const COMPACT_FACTOR: usize = 4;
/// or when it is more than twice the size of the live records' lines plus
/// this much (a body that changes every round grows it in few lines).
pub(super) const COMPACT_SIZE_FLOOR: u64 = 1 << 20;
/// After a failed compaction (no room for the copy), the next try waits
/// for this much more journal...
const RETRY_AFTER_BYTES: u64 = 1 << 20;
/// ...or this many more lines.
const RETRY_AFTER_LINES: usize = 1024;

type Ack = oneshot::Sender<Result<(), StoreError>>;

/// A record's encoded entry and who waits for its line to be durable.
pub(super) struct Pending {
    pub entry: Vec<u8>,
    pub key: IssueKey,
    /// Whether the line holds the body (the text changed).
    pub full: bool,
    pub ack: Ack,
}

/// What compaction decides by: the journal's size and record lines, and
/// the size the live records would take.
#[derive(Debug, Default)]
pub(super) struct Sizes {
    /// Per key: its last line with the body, and its last line without
    /// one since.
    per_key: HashMap<IssueKey, (u64, u64)>,
    live: u64,
    /// Record lines in the journal.
    pub lines: usize,
    /// Bytes in the journal.
    pub len: u64,
}

impl Sizes {
    /// Counts a record line of `len` bytes, `full` when it holds the body.
    pub fn line(&mut self, key: &IssueKey, len: u64, full: bool) {
        let entry = self.per_key.entry(key.clone()).or_default();
        self.live -= entry.0 + entry.1;
        *entry = if full { (len, 0) } else { (entry.0, len) };
        self.live += entry.0 + entry.1;
        self.lines += 1;
    }

    fn too_many_lines(&self) -> bool {
        let live = self.per_key.len();
        self.lines
            >= live
                .saturating_mul(COMPACT_FACTOR)
                .max(live + COMPACT_SLACK)
    }

    fn too_big(&self) -> bool {
        self.len > self.live.saturating_mul(2) + COMPACT_SIZE_FLOOR
    }
}

/// Owns the journal file on its own thread: blocking writes and syncs stay
/// off the async runtime, and batching falls out of draining the channel.
pub(super) struct JournalWriter {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub file: File,
    pub sizes: Sizes,
    pub records: Arc<Mutex<HashMap<IssueKey, IssueRecord>>>,
    /// Damaged bytes set aside in place, copied out at the next compaction.
    pub regions: Vec<Region>,
    /// A `set_aside` note the next write starts with.
    pub note: Option<InPlace>,
    /// After a failed compaction: the size and line count to wait for.
    pub postponed: Option<(u64, usize)>,
}

impl JournalWriter {
    pub fn run(mut self, rx: mpsc::Receiver<Pending>) {
        let mut failed: Option<String> = None;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            if let Some(reason) = &failed {
                for p in batch {
                    let _ = p.ack.send(Err(StoreError::Failed(reason.clone())));
                }
                continue;
            }
            if let Err(reason) = self.write(batch) {
                failed = Some(reason);
                continue;
            }
            if self.compaction_due()
                && let Err(reason) = self.compact(&rx)
            {
                failed = Some(reason);
            }
        }
    }

    /// Appends a batch and syncs it; acknowledges each put.
    fn write(&mut self, batch: Vec<Pending>) -> Result<(), String> {
        if batch.is_empty() && self.note.is_none() {
            return Ok(());
        }
        let note = self.note.take();
        // Every line names where this write begins (see `format`).
        let start = self.sizes.len;
        let mut buf = Vec::with_capacity(batch.iter().map(|p| p.entry.len() + 64).sum());
        if let Some(note) = &note {
            if note.newline {
                buf.push(b'\n');
            }
            format::frame(&note.note, start, &mut buf);
        }
        let lens: Vec<u64> = batch
            .iter()
            .map(|p| format::frame(&p.entry, start, &mut buf))
            .collect();
        let result = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = result {
            let reason = format!("{}: {e}", self.path.display());
            tracing::error!(error = %reason, "state journal write failed");
            for p in batch {
                let _ = p.ack.send(Err(StoreError::Failed(reason.clone())));
            }
            return Err(reason);
        }
        self.sizes.len += buf.len() as u64;
        if let Some(note) = note {
            self.regions.push(note.region);
        }
        for (p, len) in batch.into_iter().zip(lens) {
            self.sizes.line(&p.key, len, p.full);
            let _ = p.ack.send(Ok(()));
        }
        Ok(())
    }

    fn compaction_due(&self) -> bool {
        if let Some((len, lines)) = self.postponed
            && self.sizes.len < len
            && self.sizes.lines < lines
        {
            return false;
        }
        !self.regions.is_empty() || self.sizes.too_many_lines() || self.sizes.too_big()
    }

    /// Rewrites the journal as one whole record per issue. A compaction
    /// that cannot be written (no room) leaves the journal as it was and
    /// is tried again later; only a failure after the new journal took the
    /// old one's place stops the writer.
    fn compact(&mut self, rx: &mpsc::Receiver<Pending>) -> Result<(), String> {
        let (buf, sizes, carried) = {
            let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            // Puts already queued are in the map: the snapshot holds them,
            // and they are acknowledged once it is durable. Taking them
            // while holding the map keeps the file equal to the map.
            let carried: Vec<Pending> = rx.try_iter().collect();
            match snapshot(&records) {
                Ok((buf, sizes)) => (buf, sizes, carried),
                Err(e) => {
                    drop(records);
                    tracing::error!(error = %e, "cannot encode the state for compaction");
                    self.postpone();
                    return self.write(carried);
                }
            }
        };
        let mut kept = Vec::new();
        let written = self
            .copy_out_regions(&mut kept)
            .and_then(|()| self.replace_journal(&buf));
        if let Err(e) = written {
            for path in &kept {
                // Copies only: the bytes are still in the journal.
                let _ = fs::remove_file(path);
            }
            tracing::warn!(error = %e, "state journal compaction failed; the journal is unchanged, will try again later");
            self.postpone();
            return self.write(carried);
        }
        // The new journal has replaced the old one: from here on a failure
        // leaves the writer without a file to append to.
        let reopened = sync_dir(&self.dir).and_then(|()| {
            OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map_err(io_err(&self.path))
        });
        match reopened {
            Ok(file) => self.file = file,
            Err(e) => {
                let reason = format!("state journal compaction: {e}");
                tracing::error!(error = %reason, "state journal compaction failed");
                for p in carried {
                    let _ = p.ack.send(Err(StoreError::Failed(reason.clone())));
                }
                return Err(reason);
            }
        }
        for path in &kept {
            tracing::warn!(kept_in = %path.display(), "damaged bytes set aside in the state journal moved to their own file");
        }
        tracing::debug!(
            from_lines = self.sizes.lines,
            to_lines = sizes.lines,
            from_bytes = self.sizes.len,
            to_bytes = sizes.len,
            "compacted the state journal"
        );
        self.sizes = sizes;
        self.regions.clear();
        self.postponed = None;
        for p in carried {
            let _ = p.ack.send(Ok(()));
        }
        Ok(())
    }

    fn postpone(&mut self) {
        self.postponed = Some((
            self.sizes.len + RETRY_AFTER_BYTES,
            self.sizes.lines + RETRY_AFTER_LINES,
        ));
    }

    fn copy_out_regions(&self, kept: &mut Vec<PathBuf>) -> Result<(), StoreError> {
        for region in &self.regions {
            let len = usize::try_from(region.to - region.from)
                .map_err(|_| StoreError::Failed("a set-aside region is too large".into()))?;
            let mut bytes = vec![0; len];
            File::open(&self.path)
                .and_then(|f| f.read_exact_at(&mut bytes, region.from))
                .map_err(io_err(&self.path))?;
            kept.push(write_side_file(&self.dir, &bytes)?);
        }
        Ok(())
    }

    /// Writes `buf` to a temporary file, syncs it and renames it over the
    /// journal; on failure the journal is untouched and the file removed.
    fn replace_journal(&self, buf: &[u8]) -> Result<(), StoreError> {
        let tmp = self.dir.join(format!("{JOURNAL}.compact"));
        let result = write_synced(&tmp, buf)
            .and_then(|()| fs::rename(&tmp, &self.path).map_err(io_err(&self.path)));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// The journal as it would be with only the latest version of each record.
fn snapshot(
    records: &HashMap<IssueKey, IssueRecord>,
) -> Result<(Vec<u8>, Sizes), serde_json::Error> {
    let mut buf = Vec::new();
    buf.extend_from_slice(HEADER.as_bytes());
    buf.push(b'\n');
    let mut sizes = Sizes::default();
    for record in records.values() {
        // Each line is its own write: the file is synced whole before use.
        let at = buf.len() as u64;
        let len = format::frame(&format::encode(&EntryRef::Full(record))?, at, &mut buf);
        sizes.line(record.key(), len, true);
    }
    sizes.len = buf.len() as u64;
    Ok((buf, sizes))
}

/// A record's entry: the whole record when its body differs from
/// `previous_body` (the body the journal holds for the key, `None` for a
/// new key), else the record without its body; and whether it holds the
/// body.
pub(super) fn encode_record(
    record: &mut IssueRecord,
    previous_body: Option<&str>,
) -> Result<(Vec<u8>, bool), serde_json::Error> {
    if previous_body != Some(record.issue.body.as_str()) {
        return format::encode(&EntryRef::Full(record)).map(|e| (e, true));
    }
    // Taken out for the entry and put back: no copy of a large body.
    let body = std::mem::take(&mut record.issue.body);
    let encoded = format::encode(&EntryRef::Record(record));
    record.issue.body = body;
    encoded.map(|e| (e, false))
}
