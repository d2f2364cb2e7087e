//! Standard output for what the commands print.
//!
//! `println!` panics when its pipe's reader is gone (`claude-flow list |
//! head`), so every command writes through [`line()`] (the `outln!` macro)
//! instead: a closed pipe then ends the command with exit code 141, what
//! a shell reports for a program killed by SIGPIPE, and nothing on
//! stderr. Restoring SIGPIPE's default action at start would do the same
//! for every write, but takes `unsafe` (which the workspace denies), and
//! would also kill `claude-flow run`, the orchestrator, in the middle of a
//! workflow when whatever read its output went away.

use std::io::Write;

use crate::commands::Failure;

/// Writes one line to stdout, formatted as `println!` would.
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes `args` and a newline to stdout; a closed pipe is
/// [`Failure::closed_pipe`].
pub fn line(args: std::fmt::Arguments<'_>) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(Failure::from)
}

/// Writes `bytes` to stdout as they are, flushed (a followed log must show
/// up at once).
pub fn bytes(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(Failure::from)
}

/// Prints `value` as pretty JSON.
pub fn json(value: &serde_json::Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    line(format_args!("{text}"))
}
