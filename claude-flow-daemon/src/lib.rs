//! The claude-flow service as a library: what `claude-flow-daemon` is made of.

pub mod notify;
