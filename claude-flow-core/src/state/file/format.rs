//! The journal's line format.
//!
//! A line is `{"crc":"<8 hex digits>","batch":<offset>,"e":<entry>}`: the
//! CRC-32 of everything after the `crc` field up to the closing brace, so a
//! damaged line is told from a good one even when the damage leaves valid
//! JSON; `batch` is where the write (group commit) that carried the line
//! began, so that a line lost inside the last, never synced, write is told
//! from damage to synced data. An entry is a whole record
//! (`full`, written when the issue's text changed, so once per round), a
//! record without its body (`record`, every other transition: the body is
//! the one of the key's previous record), or the note that damaged bytes
//! before it were set aside in place (`set_aside`). One put is one line, so
//! a torn write never leaves half a transition behind.
//!
//! Lines written before checksums (the whole record, body included, no
//! `crc`) are still read: they are the first version of the format.

use serde::{Deserialize, Serialize};

use crate::record::IssueRecord;

/// The first line of a journal this version writes.
pub(super) const HEADER: &str = r#"{"claude_flow_state":2}"#;
/// The first line of a journal of whole records without checksums; read,
/// and appended to with new lines until the next compaction rewrites it.
pub(super) const HEADER_V1: &str = r#"{"claude_flow_state":1}"#;

const PREFIX: &[u8] = br#"{"crc":""#;
const AFTER_CRC: &[u8] = br#"","#;
const CRC_DIGITS: usize = 8;

/// An entry to write, borrowing what it holds.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum EntryRef<'a> {
    /// A record with its body.
    Full(&'a IssueRecord),
    /// A record whose `issue.body` is left empty: its body is the one of
    /// the key's previous record.
    Record(&'a IssueRecord),
    /// The bytes `from..to` of the journal (just before this line) were
    /// damaged and set aside in place, because there was no room to copy
    /// them out when the store started.
    SetAside {
        /// First damaged byte.
        from: u64,
        /// End of the damaged bytes.
        to: u64,
    },
}

/// An entry as read.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Entry {
    Full(Box<IssueRecord>),
    Record(Box<IssueRecord>),
    SetAside { from: u64, to: u64 },
}

/// A checksummed line as read.
#[derive(Deserialize)]
struct Envelope {
    batch: u64,
    e: Entry,
}

/// One good line.
pub(super) enum Line {
    /// An entry, and the offset where the write that carried it began.
    Entry(Entry, u64),
    /// A whole record in the format before checksums.
    Previous(Box<IssueRecord>),
}

/// An entry's bytes, to be framed into a line by [`frame`].
pub(super) fn encode(entry: &EntryRef<'_>) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(entry)
}

/// Appends the line of an encoded entry (with its newline) to `out`, for a
/// write that begins at offset `batch`; returns the line's length.
pub(super) fn frame(entry: &[u8], batch: u64, out: &mut Vec<u8>) -> u64 {
    let start = out.len();
    let head = format!("\"batch\":{batch},\"e\":");
    let mut crc = crc32fast::Hasher::new();
    crc.update(head.as_bytes());
    crc.update(entry);
    out.extend_from_slice(PREFIX);
    out.extend_from_slice(format!("{:08x}", crc.finalize()).as_bytes());
    out.extend_from_slice(AFTER_CRC);
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(entry);
    out.extend_from_slice(b"}\n");
    (out.len() - start) as u64
}

/// Reads one line (without its newline); the error says what is wrong.
pub(super) fn decode(text: &[u8]) -> Result<Line, String> {
    if text.iter().all(|b| *b == 0) {
        return Err("zero bytes where a line should be (data lost in a crash)".into());
    }
    let Some(rest) = text.strip_prefix(PREFIX) else {
        return serde_json::from_slice(text)
            .map(|r| Line::Previous(Box::new(r)))
            .map_err(|e| format!("not a record: {e}"));
    };
    let (digits, rest) = rest
        .split_at_checked(CRC_DIGITS)
        .ok_or("the line is cut short")?;
    let covered = rest
        .strip_prefix(AFTER_CRC)
        .and_then(|p| p.strip_suffix(b"}"))
        .ok_or("the line is cut short or malformed")?;
    let stored = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| u32::from_str_radix(d, 16).ok())
        .ok_or("the checksum field is not 8 hex digits")?;
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x}): the line was damaged"
        ));
    }
    serde_json::from_slice::<Envelope>(text)
        .map(|line| Line::Entry(line.e, line.batch))
        .map_err(|e| format!("checksum matches but the entry is not understood: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_back_and_any_changed_byte_is_caught() {
        let mut out = Vec::new();
        let entry = encode(&EntryRef::SetAside { from: 3, to: 9 }).unwrap();
        let len = frame(&entry, 12, &mut out);
        assert_eq!(len as usize, out.len());
        assert_eq!(out.last(), Some(&b'\n'));
        let text = &out[..out.len() - 1];
        assert!(matches!(
            decode(text),
            Ok(Line::Entry(Entry::SetAside { from: 3, to: 9 }, 12))
        ));
        for i in 0..text.len() {
            let mut bad = text.to_vec();
            bad[i] ^= 0x01;
            assert!(decode(&bad).is_err(), "byte {i} changed unnoticed");
        }
    }
}
