//! The claude-flow service as a library, so tests and embedders run it in-process.

pub mod http;
