//! `claude-flow logs <n> [--round R] [--attempt A] [--follow] [--tail N]`.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use claude_flow_core::config::Config;
use claude_flow_core::{Attempt, IssueRecord};

use super::state::ReadState;
use super::{Failure, record};
use crate::cli::IssueArg;
use crate::out;

/// Which log, and how to print it.
#[derive(Debug)]
pub struct LogsArgs<'a> {
    /// The issue.
    pub issue: &'a IssueArg,
    /// `--round`.
    pub round: Option<u32>,
    /// `--attempt`.
    pub attempt: Option<u32>,
    /// `--follow`.
    pub follow: bool,
    /// `--tail`.
    pub tail: Option<usize>,
}

/// Prints the chosen attempt's log; with `follow`, until the attempt ends.
pub async fn logs(config: &Config, args: LogsArgs<'_>) -> Result<(), Failure> {
    let r = record(config, args.issue).await?;
    let chosen = choose(&r, args.round, args.attempt)?;
    let path = log_path(config, &r, chosen);
    if let Some(at) = r.pruned_at
        && !path.exists()
    {
        return Err(Failure::other(format!(
            "{}: its logs were removed {} (service.retention)",
            r.key(),
            super::rfc3339(at)
        )));
    }
    // With several daemons, the log is on the host of the daemon that ran
    // the attempt.
    if let Some(node) = chosen.node.as_deref()
        && node != config.service.node
        && !path.exists()
    {
        return Err(Failure::other(format!(
            "{}: attempt {} of round {} ran on node {}; its log is on that host ({})",
            r.key(),
            chosen.number,
            chosen.round,
            super::list::one_line(node),
            path.display()
        )));
    }
    let (round, number) = (chosen.round, chosen.number);
    let mut offset = match args.tail {
        Some(lines) => print_tail(&path, lines)?,
        None => copy_from(&path, 0)?,
    };
    if !args.follow {
        return Ok(());
    }
    let key = r.key().clone();
    let state = ReadState::open(config).await?;
    loop {
        let running = state
            .record(&key)
            .await?
            .and_then(|r| {
                r.attempts
                    .into_iter()
                    .find(|a| a.round == round && a.number == number)
            })
            .is_some_and(|a| a.outcome.is_none());
        offset = copy_from(&path, offset)?;
        if !running {
            // One last read: the attempt may have written more before it ended.
            copy_from(&path, offset)?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The attempt asked for; an attempt number alone is one of the current
/// round's.
fn choose(r: &IssueRecord, round: Option<u32>, attempt: Option<u32>) -> Result<&Attempt, Failure> {
    match (round, attempt) {
        (None, None) => r.attempts.last(),
        (round, Some(n)) => {
            let round = round.unwrap_or(r.round);
            r.attempts
                .iter()
                .find(|a| a.round == round && a.number == n)
        }
        (Some(round), None) => r.attempts.iter().rev().find(|a| a.round == round),
    }
    .ok_or_else(|| {
        Failure::other(match (round, attempt) {
            (None, None) => format!("{} has no attempt yet", r.key()),
            (round, Some(n)) => format!(
                "{} has no attempt {n} in round {}",
                r.key(),
                round.unwrap_or(r.round)
            ),
            (Some(round), None) => format!("{} has no attempt in round {round}", r.key()),
        })
    })
}

/// Where the attempt's log is. A running attempt has no log path recorded
/// yet; it is where the subprocess runner puts it.
fn log_path(config: &Config, r: &IssueRecord, a: &Attempt) -> PathBuf {
    a.log_path.clone().unwrap_or_else(|| {
        claude_flow_core::runner::attempt_log_path(
            &config.service.log_dir(),
            r.key(),
            a.round,
            a.number,
        )
    })
}

/// Prints the last `lines` lines of `path` as it is now; returns where
/// they end, from where `--follow` goes on.
fn print_tail(path: &Path, lines: usize) -> Result<u64, Failure> {
    let Some(mut file) = open(path, 0)? else {
        return Ok(0);
    };
    let (tail, end) = last_lines(&mut file, lines)?;
    out::bytes(&tail)?;
    Ok(end)
}

/// The last `lines` lines of `file` and where they end, reading back from
/// the end a block at a time until enough line ends are seen: a log may be
/// gigabytes.
fn last_lines(file: &mut (impl Read + Seek), lines: usize) -> std::io::Result<(Vec<u8>, u64)> {
    const BLOCK: u64 = 64 * 1024;
    let end = file.seek(SeekFrom::End(0))?;
    let mut start = end;
    let mut tail = Vec::new();
    // Line ends that start a line (a final one does not).
    let breaks = |tail: &[u8]| {
        tail.iter().filter(|b| **b == b'\n').count() - usize::from(tail.last() == Some(&b'\n'))
    };
    while start > 0 && breaks(&tail) < lines {
        let from = start.saturating_sub(BLOCK);
        let mut block = vec![0u8; usize::try_from(start - from).unwrap_or(0)];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut block)?;
        block.extend_from_slice(&tail);
        tail = block;
        start = from;
    }
    if lines == 0 {
        return Ok((Vec::new(), end));
    }
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let skip = body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(lines - 1)
        .map_or(0, |(i, _)| i + 1);
    Ok((tail.split_off(skip), end))
}

/// The log, or `None` when it does not exist yet at `offset` 0 (an
/// attempt that has not written anything).
fn open(path: &Path, offset: u64) -> Result<Option<std::fs::File>, Failure> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && offset == 0 => Ok(None),
        Err(e) => Err(Failure::other(format!("{}: {e}", path.display()))),
    }
}

/// Copies `path` from `offset` to stdout; returns the new offset.
fn copy_from(path: &Path, offset: u64) -> Result<u64, Failure> {
    let Some(mut file) = open(path, offset)? else {
        return Ok(0);
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = offset;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out::bytes(&buf[..n])?;
        at += n as u64;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::last_lines;

    fn tail(text: &str, lines: usize) -> String {
        let (bytes, end) = last_lines(&mut Cursor::new(text.as_bytes()), lines).unwrap();
        assert_eq!(end, text.len() as u64);
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn the_last_lines_are_whole_lines_with_or_without_a_final_line_end() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a\nb\n", 5), "a\nb\n");
        assert_eq!(tail("a\nb\n", 0), "");
        assert_eq!(tail("", 3), "");
        assert_eq!(tail("\n\n\n", 2), "\n\n");
    }

    #[test]
    fn lines_longer_than_a_block_and_tails_across_blocks_come_whole() {
        let long = "x".repeat(200 * 1024);
        let text = format!("first\n{long}\nlast\n");
        assert_eq!(tail(&text, 2), format!("{long}\nlast\n"));
        assert_eq!(tail(&text, 3), text);
        let many: String = (0..50_000).map(|i| format!("line {i}\n")).collect();
        let expected: String = (45_000..50_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(tail(&many, 5_000), expected);
    }
}
