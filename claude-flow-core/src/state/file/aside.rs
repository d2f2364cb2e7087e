//! Setting damaged bytes aside: never discarded, never in the way.
//!
//! At start, the unacknowledged tail is copied to its own file
//! (`state.jsonl.torn-<unix seconds>-<pid>-<n>`, a name no other start can
//! take) and cut from the journal. Copying needs room; when there is none
//! (the disk filled up, which is how the tail came about), the bytes stay
//! where they are and the first write of the new instance starts with a
//! `set_aside` note naming them, so the journal reads on past them. That
//! needs no space beyond what that write needs anyway; the next compaction
//! copies them out.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::format::{self, EntryRef};
use super::load::{Region, Tail};
use super::{JOURNAL, io_err, sync_dir};
use crate::error::StoreError;

/// Damaged bytes left in the journal: the note (an encoded entry) to write
/// before anything else, and the region it covers.
pub(super) struct InPlace {
    /// The note must first end the damaged bytes' last line.
    pub newline: bool,
    pub note: Vec<u8>,
    pub region: Region,
}

/// Sets the journal's damaged `tail` aside. `Ok(None)`: copied to a side
/// file and cut from the journal; `Ok(Some(_))`: left in place.
pub(super) fn set_aside_tail(
    dir: &Path,
    journal: &Path,
    tail: &Tail,
) -> Result<Option<InPlace>, StoreError> {
    let end = tail.offset + tail.bytes.len() as u64;
    match write_side_file(dir, &tail.bytes) {
        Ok(kept) => {
            let file = OpenOptions::new()
                .write(true)
                .open(journal)
                .map_err(io_err(journal))?;
            file.set_len(tail.offset)
                .and_then(|()| file.sync_all())
                .map_err(io_err(journal))?;
            tracing::warn!(
                journal = %journal.display(),
                line = tail.line,
                reason = %tail.reason,
                bytes = tail.bytes.len(),
                kept_in = %kept.display(),
                "the state journal ended in a damaged line after its last good one \
                 (a write that never completed, so never acknowledged); moved it aside"
            );
            Ok(None)
        }
        Err(e) => {
            let region = Region {
                from: tail.offset,
                to: end,
            };
            let note = format::encode(&EntryRef::SetAside {
                from: region.from,
                to: region.to,
            })
            .map_err(|e| StoreError::Failed(format!("cannot encode a journal note: {e}")))?;
            tracing::warn!(
                journal = %journal.display(),
                line = tail.line,
                reason = %tail.reason,
                from = region.from,
                to = region.to,
                error = %e,
                "the state journal ended in a damaged line after its last good one \
                 (a write that never completed, so never acknowledged); no room to copy it \
                 aside, so it stays in the journal, skipped, until the next compaction"
            );
            Ok(Some(InPlace {
                newline: tail.bytes.last() != Some(&b'\n'),
                note,
                region,
            }))
        }
    }
}

/// Writes `bytes` to a new side file beside the journal, synced, and
/// returns its path; on failure nothing is left behind.
pub(super) fn write_side_file(dir: &Path, bytes: &[u8]) -> Result<PathBuf, StoreError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let pid = std::process::id();
    // The counter makes the name unique within this process and second;
    // create_new makes it unique against anything already there.
    for n in 0..1000u32 {
        let path = dir.join(format!("{JOURNAL}.torn-{secs}-{pid}-{n}"));
        let mut out = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let written = out
            .write_all(bytes)
            .and_then(|()| out.sync_all())
            .map_err(io_err(&path))
            .and_then(|()| sync_dir(dir));
        return match written {
            Ok(()) => Ok(path),
            Err(e) => {
                drop(out);
                let _ = fs::remove_file(&path);
                Err(e)
            }
        };
    }
    Err(StoreError::Failed(format!(
        "no free name for a {JOURNAL}.torn-{secs}-{pid}-N file in {}",
        dir.display()
    )))
}
