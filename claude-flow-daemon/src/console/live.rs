//! An attempt's log as server-sent events, for the issue page: its end
//! first, then each line as the workflow writes it, and an `end` event
//! once the attempt is over. Every event's id is the log offset it ends
//! at, so a browser reconnecting (with `Last-Event-ID`) gets only what it
//! has not seen.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use claude_flow_core::{IssueKey, Orchestrator};
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// How often the log is looked at for new lines.
const POLL: Duration = Duration::from_millis(250);

/// How much of an existing log the first event carries.
const FIRST: u64 = 64 * 1024;

/// Most bytes one event carries: a workflow printing fast is sent in
/// pieces rather than in one huge event.
const CHUNK: usize = 64 * 1024;

/// Which attempt is followed, and how far it was read.
pub(super) struct Follow {
    pub orchestrator: Arc<Orchestrator>,
    pub key: IssueKey,
    pub round: u32,
    pub attempt: u32,
    pub path: PathBuf,
    /// Where to start: a reconnecting browser's `Last-Event-ID`.
    pub resume_at: Option<u64>,
    /// How the attempt ended, when it already had: the log is sent whole
    /// and the stream ends.
    pub ended: Option<String>,
}

impl Follow {
    fn running(&self) -> bool {
        self.orchestrator
            .status()
            .running
            .iter()
            .any(|r| r.issue == self.key && r.round == self.round && r.attempt == self.attempt)
    }
}

struct Reader {
    follow: Follow,
    offset: Option<u64>,
    done: bool,
}

/// The event stream for `follow`.
pub(super) fn stream(follow: Follow) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let reader = Reader {
        offset: follow.resume_at,
        follow,
        done: false,
    };
    let events = futures::stream::unfold(reader, |mut reader| async move {
        if reader.done {
            return None;
        }
        loop {
            // Asked before reading, so that lines written just before the
            // end are read after it is seen.
            let over = reader.follow.ended.is_some() || !reader.follow.running();
            match read_new(&reader.follow.path, &mut reader.offset, over).await {
                Some(event) => return Some((Ok(event), reader)),
                None if over => {
                    reader.done = true;
                    let how = reader
                        .follow
                        .ended
                        .clone()
                        .unwrap_or_else(|| "the attempt is over".to_owned());
                    return Some((Ok(Event::default().event("end").data(how)), reader));
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// The next piece of the log after `offset`: whole lines only, unless
/// `over` (then the rest). The first read starts at most [`FIRST`] bytes
/// before the end, at a line's start. `None` when there is nothing new
/// (or no log yet).
async fn read_new(path: &std::path::Path, offset: &mut Option<u64>, over: bool) -> Option<Event> {
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let len = file.metadata().await.ok()?.len();
    let (from, skip_partial) = match *offset {
        Some(at) => (at.min(len), false),
        None => (len.saturating_sub(FIRST), len > FIRST),
    };
    if from >= len {
        *offset = Some(len);
        return None;
    }
    file.seek(std::io::SeekFrom::Start(from)).await.ok()?;
    let mut bytes = vec![0; ((len - from) as usize).min(CHUNK)];
    file.read_exact(&mut bytes).await.ok()?;
    let mut start = 0;
    if skip_partial {
        start = bytes.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
    }
    let whole = (from + bytes.len() as u64 == len && over) || bytes.len() == CHUNK;
    let end = if whole {
        bytes.len()
    } else {
        match bytes.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None => {
                *offset = Some(from);
                return None;
            }
        }
    };
    *offset = Some(from + end as u64);
    // SSE cannot carry a carriage return (axum panics on one); progress
    // output uses them to redraw a line, which a new line shows as well.
    let text = String::from_utf8_lossy(&bytes[start.min(end)..end])
        .replace("\r\n", "\n")
        .replace('\r', "\n");
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Some(
        Event::default()
            .event("log")
            .id((from + end as u64).to_string())
            .data(text),
    )
}
