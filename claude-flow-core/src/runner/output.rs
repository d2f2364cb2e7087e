//! Reading what a workflow printed: its pull request URL and its
//! `claude-flow: retry-after` request. The log can be huge (a workflow may
//! print gigabytes), so it is scanned in fixed-size windows, never loaded.

use std::io::Read;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use regex::bytes::Regex;

use crate::issue::{PrScope, RepoId};

/// What the scan of a workflow's output found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkflowOutput {
    /// The last pull request URL that belongs to the issue.
    pub pr_url: Option<String>,
    /// The time of the last `claude-flow: retry-after` line.
    pub retry_after: Option<SystemTime>,
}

static PR_URL: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::unwrap_used)] // a constant pattern, checked by the tests
    Regex::new(
        r"https?://[A-Za-z0-9.-]+(?::[0-9]+)?/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)/pull/([0-9]+)",
    )
    .unwrap()
});

static RETRY_AFTER: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::unwrap_used)] // a constant pattern, checked by the tests
    Regex::new(r"(?m)^claude-flow: retry-after[ \t]+([^\r\n]+?)[ \t]*\r?$").unwrap()
});

/// Longest match we look for; windows overlap by this much so that no
/// match is cut in two.
const OVERLAP: usize = 4096;
const WINDOW: usize = 1 << 20;

/// Scans `reader` (a workflow's output) for the last pull request URL of
/// `repo` (any repository under [`PrScope::AnyRepository`]) and the last
/// `claude-flow: retry-after` line, relative to `now`.
///
/// `size_hint` (the log's length, when known) keeps the buffer small for
/// small logs: a 1 MiB buffer per attempt would sit in every allocator
/// arena of the service.
pub fn scan_output(
    mut reader: impl Read,
    size_hint: Option<u64>,
    repo: &RepoId,
    scope: PrScope,
    now: SystemTime,
) -> std::io::Result<WorkflowOutput> {
    let mut found = WorkflowOutput::default();
    let window = size_hint.map_or(WINDOW, |len| {
        usize::try_from(len).map_or(WINDOW, |len| len.clamp(1, WINDOW))
    });
    let mut buf = vec![0u8; window + OVERLAP];
    let mut filled = 0usize;
    // Bytes of `buf` already searched as the tail of the previous window;
    // a match must end past this to be new.
    let mut seen = 0usize;
    loop {
        let n = reader.read(&mut buf[filled..])?;
        let eof = n == 0;
        filled += n;
        if !eof && filled < buf.len() {
            continue;
        }
        let window = &buf[..filled];
        for m in PR_URL.captures_iter(window) {
            let whole = m.get(0).map_or(0..0, |w| w.range());
            if whole.end <= seen {
                continue;
            }
            let owner = String::from_utf8_lossy(&m[1]);
            let name = String::from_utf8_lossy(&m[2]);
            if scope == PrScope::AnyRepository || repo.matches(&owner, &name) {
                found.pr_url = Some(String::from_utf8_lossy(&m[0]).into_owned());
            }
        }
        for m in RETRY_AFTER.captures_iter(window) {
            let whole = m.get(0).map_or(0..0, |w| w.range());
            if whole.end <= seen {
                continue;
            }
            if let Some(t) = parse_retry_after(&String::from_utf8_lossy(&m[1]), now) {
                found.retry_after = Some(t);
            }
        }
        if eof {
            return Ok(found);
        }
        let keep = OVERLAP.min(filled);
        buf.copy_within(filled - keep..filled, 0);
        filled = keep;
        seen = keep;
    }
}

/// Parses `<seconds>` or an RFC 3339 time (`Z` or a `±HH:MM` offset).
pub(crate) fn parse_retry_after(text: &str, now: SystemTime) -> Option<SystemTime> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return now.checked_add(Duration::from_secs(secs));
    }
    parse_rfc3339(text)
}

/// RFC 3339 with any offset; humantime only reads UTC (`Z`).
pub(crate) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text.trim_end_matches(['Z', 'z'])) {
        return Some(t);
    }
    let split = text.len().checked_sub(6)?;
    let (base, offset) = (text.get(..split)?, text.get(split..)?);
    let sign = match offset.as_bytes().first()? {
        b'+' => 1i64,
        b'-' => -1i64,
        _ => return None,
    };
    let hours: i64 = offset.get(1..3)?.parse().ok()?;
    let minutes: i64 = offset.get(4..6)?.parse().ok()?;
    if offset.as_bytes().get(3) != Some(&b':') {
        return None;
    }
    let local = humantime::parse_rfc3339_weak(base).ok()?;
    let shift = Duration::from_secs(u64::try_from(hours * 3600 + minutes * 60).ok()?);
    // 10:00+02:00 is 08:00 UTC.
    if sign > 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

/// The last `lines` lines of a workflow's log, reading at most its last
/// 64 KiB (a log may be gigabytes); empty when it cannot be read.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    // Read from the middle of the file, the first line is a fragment (a
    // secret cut in half would slip past redaction): it is dropped.
    if start > 0 {
        let first_break = bytes
            .iter()
            .position(|b| *b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
        bytes.drain(..first_break);
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> RepoId {
        "octo/app".parse().unwrap()
    }

    fn scan(text: &[u8], scope: PrScope) -> WorkflowOutput {
        scan_output(text, None, &repo(), scope, SystemTime::UNIX_EPOCH).unwrap()
    }

    #[test]
    fn the_last_url_of_the_issues_own_repository_wins() {
        let out = b"opened https://github.com/octo/app/pull/1\n\
            see https://github.com/Octo/App/pull/22 (final)\n\
            upstream: https://github.com/other/lib/pull/99\n";
        assert_eq!(
            scan(out, PrScope::SameRepository).pr_url.as_deref(),
            Some("https://github.com/Octo/App/pull/22")
        );
        assert_eq!(
            scan(out, PrScope::AnyRepository).pr_url.as_deref(),
            Some("https://github.com/other/lib/pull/99")
        );
    }

    #[test]
    fn enterprise_hosts_and_ports_count() {
        let out = b"https://ghe.example.com:8443/octo/app/pull/7\n";
        assert_eq!(
            scan(out, PrScope::SameRepository).pr_url.as_deref(),
            Some("https://ghe.example.com:8443/octo/app/pull/7")
        );
        assert_eq!(
            scan(
                b"https://github.com/octo/app/issues/7",
                PrScope::AnyRepository
            )
            .pr_url,
            None
        );
    }

    #[test]
    fn urls_across_window_boundaries_are_found_once() {
        for pad in [
            WINDOW - 20,
            WINDOW - 1,
            WINDOW,
            WINDOW + OVERLAP - 10,
            3 * WINDOW + 5,
        ] {
            let mut out = vec![b'x'; pad];
            out.extend_from_slice(b" https://github.com/octo/app/pull/4242 ");
            out.extend(std::iter::repeat_n(b'y', 100));
            assert_eq!(
                scan(&out, PrScope::SameRepository).pr_url.as_deref(),
                Some("https://github.com/octo/app/pull/4242"),
                "pad {pad}"
            );
        }
    }

    #[test]
    fn a_wrong_size_hint_changes_nothing_but_the_buffer() {
        let mut out = vec![b'x'; 10_000];
        out.extend_from_slice(b"\nhttps://github.com/octo/app/pull/9\n");
        for hint in [Some(1), Some(100), Some(10_037), None] {
            let found = scan_output(
                &out[..],
                hint,
                &repo(),
                PrScope::SameRepository,
                SystemTime::UNIX_EPOCH,
            )
            .unwrap();
            assert_eq!(
                found.pr_url.as_deref(),
                Some("https://github.com/octo/app/pull/9"),
                "hint {hint:?}"
            );
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_rfc3339() {
        let t = scan(b"x\nclaude-flow: retry-after 90\n", PrScope::AnyRepository).retry_after;
        assert_eq!(t, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(90)));
        let t = scan(
            b"claude-flow: retry-after 1970-01-01T01:00:00Z\r\n",
            PrScope::AnyRepository,
        )
        .retry_after;
        assert_eq!(t, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(3600)));
        let t = scan(
            b"claude-flow: retry-after 1970-01-01T03:00:00+02:00\n",
            PrScope::AnyRepository,
        )
        .retry_after;
        assert_eq!(t, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(3600)));
        let t = scan(b"say claude-flow: retry-after 90\n", PrScope::AnyRepository).retry_after;
        assert_eq!(t, None, "only a line of its own counts");
        let t = scan(b"claude-flow: retry-after soon\n", PrScope::AnyRepository).retry_after;
        assert_eq!(t, None);
    }
}
