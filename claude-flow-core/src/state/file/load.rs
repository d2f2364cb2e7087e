//! Reading a journal back: the records, the sizes compaction decides by,
//! and what follows the last good line.
//!
//! A damaged line (bad checksum, not a record, zero bytes, no newline) is
//! only harmless in the last write: that write never completed its sync,
//! so none of its puts was acknowledged, and the caller sets everything
//! from the damage on aside. The last write is what follows the last good
//! line, or, after a power cut that lost a page in its middle, the good
//! lines after the damage that belong to the same write (each line names
//! where its write began). A damaged line followed by a line of a later
//! write is an error naming the line, unless that line is the `set_aside`
//! note for exactly those bytes, written by an earlier start that had no
//! room to copy them out.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::format::{self, Entry, HEADER, HEADER_V1, Line};
use super::io_err;
use super::writer::Sizes;
use crate::error::StoreError;
use crate::issue::IssueKey;
use crate::record::IssueRecord;

/// What a journal holds.
pub(super) struct Loaded {
    pub records: HashMap<IssueKey, IssueRecord>,
    pub sizes: Sizes,
    /// Damaged bytes in the last write, and what follows them.
    pub tail: Option<Tail>,
    /// Damaged bytes earlier starts set aside in place, still in the file.
    pub regions: Vec<Region>,
}

/// The unacknowledged end of a journal.
pub(super) struct Tail {
    /// Where it starts: the first damaged line (after which only lines of
    /// the same, never synced, write follow).
    pub offset: u64,
    /// Its 1-based line number.
    pub line: usize,
    /// Why it is not a good line.
    pub reason: String,
    pub bytes: Vec<u8>,
}

/// Bytes `from..to` of the journal, set aside in place.
#[derive(Debug, Clone, Copy)]
pub(super) struct Region {
    pub from: u64,
    pub to: u64,
}

/// The first damaged line not yet known to be the tail.
struct Damage {
    offset: u64,
    line: usize,
    reason: String,
}

/// Reads the journal `file` (at `path`) from its start.
pub(super) fn read(path: &Path, file: &mut File) -> Result<Loaded, StoreError> {
    file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    let corrupt = |line: usize, message: String| StoreError::Corrupt {
        path: path.to_owned(),
        line: Some(line),
        message,
    };
    let mut reader = BufReader::with_capacity(1 << 16, &mut *file);
    let mut records: HashMap<IssueKey, IssueRecord> = HashMap::new();
    let mut sizes = Sizes::default();
    let mut regions = Vec::new();
    let mut damage: Option<Damage> = None;
    // The write (by its first offset) that the damage is in, once a good
    // line of that same write follows it.
    let mut lost_write: Option<u64> = None;
    let mut buf = Vec::new();
    let mut number = 0usize;
    let mut offset = 0u64;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        number += 1;
        let start = offset;
        offset += n as u64;
        let whole = buf.last() == Some(&b'\n');
        let text = if whole { &buf[..n - 1] } else { &buf[..] };
        if number == 1 {
            if !whole || (text != HEADER.as_bytes() && text != HEADER_V1.as_bytes()) {
                return Err(corrupt(
                    1,
                    format!("not a claude-flow state journal (expected header {HEADER})"),
                ));
            }
            sizes.len = offset;
            continue;
        }
        let decoded = if whole {
            format::decode(text)
        } else {
            Err("the last line has no end (a write that did not complete)".into())
        };
        let line = match decoded {
            Ok(line) => line,
            Err(reason) => {
                damage.get_or_insert(Damage {
                    offset: start,
                    line: number,
                    reason,
                });
                continue;
            }
        };
        if let Some(d) = &damage {
            let batch = match &line {
                Line::Entry(_, batch) => *batch,
                Line::Previous(_) => start,
            };
            if let Line::Entry(Entry::SetAside { from, to }, _) = line
                && from == d.offset
                && to <= start
            {
                regions.push(Region { from, to });
                damage = None;
                lost_write = None;
                sizes.len = offset;
                continue;
            }
            match lost_write {
                // The rest of the write the damage is in: never synced.
                Some(b) if b == batch => continue,
                None if batch <= d.offset => {
                    lost_write = Some(batch);
                    continue;
                }
                _ => {
                    return Err(corrupt(
                        d.line,
                        format!(
                            "{}; good lines of later writes follow (line {number}), so it is \
                             not an unfinished write: restore the file from a backup or remove \
                             the line by hand",
                            d.reason
                        ),
                    ));
                }
            }
        }
        sizes.len = offset;
        let line_len = n as u64;
        match line {
            Line::Previous(record) | Line::Entry(Entry::Full(record), _) => {
                sizes.line(record.key(), line_len, true);
                records.insert(record.key().clone(), *record);
            }
            Line::Entry(Entry::Record(mut record), _) => {
                let key = record.key().clone();
                record.issue.body = records
                    .get_mut(&key)
                    .map(|r| std::mem::take(&mut r.issue.body))
                    .unwrap_or_default();
                sizes.line(&key, line_len, false);
                records.insert(key, *record);
            }
            // A note without damage before it: nothing to skip.
            Line::Entry(Entry::SetAside { .. }, _) => {}
        }
    }
    drop(reader);
    if number == 0 {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            line: None,
            message: "the file is empty (expected a header line)".into(),
        });
    }
    let tail = match damage {
        None => None,
        Some(d) => {
            let mut bytes = Vec::new();
            file.seek(SeekFrom::Start(d.offset))
                .and_then(|_| file.read_to_end(&mut bytes))
                .map_err(io_err(path))?;
            Some(Tail {
                offset: d.offset,
                line: d.line,
                reason: d.reason,
                bytes,
            })
        }
    };
    Ok(Loaded {
        records,
        sizes,
        tail,
        regions,
    })
}

/// The records, for a reader without the lock. A damaged tail seen here is
/// a write in progress (or one the next writer will set aside): ignored.
pub(super) fn read_only(path: &Path) -> Result<HashMap<IssueKey, IssueRecord>, StoreError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    // A journal appears whole (renamed into place with its header), so an
    // empty one was truncated: said as the writer says it.
    if file.metadata().map_err(io_err(path))?.len() == 0 {
        return Err(truncated(path));
    }
    Ok(read(path, &mut file)?.records)
}

/// An empty journal: never a fresh start, which would run settled issues
/// again.
pub(super) fn truncated(path: &Path) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        line: None,
        message: "the file is empty, not even its header is there: it was truncated. \
                  Restore it from a backup, or remove it to start with no state \
                  (every issue still labeled then runs again)"
            .into(),
    }
}
