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
    /// Secrets the workflow may print stay out of the page.
    pub redactor: claude_flow_core::redact::Redactor,
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
    /// Whether `offset` is one of this stream's own (always at a cut the
    /// reader chose) rather than the browser's `Last-Event-ID`, which may
    /// point anywhere.
    trusted: bool,
    done: bool,
}

/// The event stream for `follow`.
pub(super) fn stream(follow: Follow) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let reader = Reader {
        offset: follow.resume_at,
        trusted: follow.resume_at.is_none(),
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
            // Only an offset this stream sent from is trusted: until then
            // (the browser's, or the end of a log it had not sent) every
            // read is aligned to a line again.
            match read_new(&reader.follow, &mut reader.offset, reader.trusted, over).await {
                Some(event) => {
                    reader.trusted = true;
                    return Some((Ok(event), reader));
                }
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
async fn read_new(
    follow: &Follow,
    offset: &mut Option<u64>,
    trusted: bool,
    over: bool,
) -> Option<Event> {
    let mut file = tokio::fs::File::open(&follow.path).await.ok()?;
    let len = file.metadata().await.ok()?.len();
    let (from, mut skip_partial) = match *offset {
        Some(at) => (at.min(len), false),
        None => (len.saturating_sub(FIRST), len > FIRST),
    };
    // An offset the browser sent back may point into a line, even into a
    // secret, whose tail redaction would not recognise: such a read
    // starts at the next line.
    if !trusted && from > 0 && from < len {
        let mut before = [0u8; 1];
        file.seek(std::io::SeekFrom::Start(from - 1)).await.ok()?;
        file.read_exact(&mut before).await.ok()?;
        skip_partial = before[0] != b'\n';
    }
    if from >= len {
        *offset = Some(len);
        return None;
    }
    file.seek(std::io::SeekFrom::Start(from)).await.ok()?;
    let mut bytes = vec![0; ((len - from) as usize).min(CHUNK)];
    file.read_exact(&mut bytes).await.ok()?;
    let mut start = 0;
    if skip_partial {
        start = bytes
            .iter()
            .position(|b| *b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
    }
    let whole = from + bytes.len() as u64 == len && over;
    let end = if whole {
        bytes.len()
    } else if bytes.len() == CHUNK {
        // A full piece is cut after its last line, or inside an overlong
        // line after a character no token has, so that a secret is never
        // split between two events (each is redacted on its own).
        bytes
            .iter()
            .rposition(|b| *b == b'\n')
            .or_else(|| {
                bytes
                    .iter()
                    .rposition(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')))
            })
            .map_or(bytes.len(), |i| i + 1)
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
    let text = follow
        .redactor
        .redact(text.strip_suffix('\n').unwrap_or(&text));
    Some(
        Event::default()
            .event("log")
            .id((from + end as u64).to_string())
            .data(text),
    )
}
