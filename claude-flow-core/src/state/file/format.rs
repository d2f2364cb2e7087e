//! The journal's line format.
//!
//! A line is `{"crc":"<8 hex digits>","e":<entry>}`: the CRC-32 of the
//! entry's bytes exactly as written, so a damaged line is told from a good
//! one even when the damage leaves valid JSON. An entry is a whole record
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
const MIDDLE: &[u8] = br#"","e":"#;
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

/// One good line.
pub(super) enum Line {
    Entry(Entry),
    /// A whole record in the format before checksums.
    Previous(Box<IssueRecord>),
}

/// Appends `entry` as one line (with its newline) to `out`; returns the
/// line's length. On error `out` is left as it was.
pub(super) fn encode(entry: &EntryRef<'_>, out: &mut Vec<u8>) -> Result<u64, serde_json::Error> {
    let start = out.len();
    out.extend_from_slice(PREFIX);
    out.extend_from_slice(&[b'0'; CRC_DIGITS]);
    out.extend_from_slice(MIDDLE);
    let payload = out.len();
    if let Err(e) = serde_json::to_writer(&mut *out, entry) {
        out.truncate(start);
        return Err(e);
    }
    let crc = format!("{:08x}", crc32fast::hash(&out[payload..]));
    let digits = start + PREFIX.len();
    out[digits..digits + CRC_DIGITS].copy_from_slice(crc.as_bytes());
    out.extend_from_slice(b"}\n");
    Ok((out.len() - start) as u64)
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
    let payload = rest
        .strip_prefix(MIDDLE)
        .and_then(|p| p.strip_suffix(b"}"))
        .ok_or("the line is cut short or malformed")?;
    let stored = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| u32::from_str_radix(d, 16).ok())
        .ok_or("the checksum field is not 8 hex digits")?;
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x}): the line was damaged"
        ));
    }
    serde_json::from_slice(payload)
        .map(Line::Entry)
        .map_err(|e| format!("checksum matches but the entry is not understood: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_back_and_any_changed_byte_is_caught() {
        let mut out = Vec::new();
        let len = encode(&EntryRef::SetAside { from: 3, to: 9 }, &mut out).unwrap();
        assert_eq!(len as usize, out.len());
        assert_eq!(out.last(), Some(&b'\n'));
        let text = &out[..out.len() - 1];
        assert!(matches!(
            decode(text),
            Ok(Line::Entry(Entry::SetAside { from: 3, to: 9 }))
        ));
        for i in 0..text.len() {
            let mut bad = text.to_vec();
            bad[i] ^= 0x01;
            assert!(decode(&bad).is_err(), "byte {i} changed unnoticed");
        }
    }
}
