//! What the engine does with the guest (its role), and where a recording's
//! log goes.

use std::io::Write;

use crate::replay::log::LogWriter;
use crate::replay::schedule::Schedule;

/// Where a log goes: a file, or the logging channel to a live backup.
pub trait LogSink: Write + Send {
    /// Every record of every landmark up to `landmark` has been written (the
    /// guest is about to run on). A live sink hands the bytes and this
    /// watermark to its sender here, and may block while the backup is too
    /// far behind: a slow backup slows the primary.
    fn landmark_done(&mut self, _landmark: u64) -> std::io::Result<()> {
        Ok(())
    }

    /// How sync-point pages travelled so far and the page cache (a pair
    /// reports it in its status): when the recording starts, after each
    /// sync point, and `None` when the recording stops (no log, no cache).
    fn page_cache(&mut self, _pages: Option<&crate::replay::log::PageStats>) {}
}

impl<W: Write + Send> LogSink for std::io::BufWriter<W> {}

/// A recording in progress.
pub struct Recorder {
    pub log: LogWriter<Box<dyn LogSink>>,
}

/// What the engine does with the guest.
pub enum Role {
    /// Run live, logging nothing.
    Live,
    /// Run live and write every nondeterministic input to a log.
    Record(Recorder),
    /// Follow a log recorded earlier or arriving from a primary.
    Replay(Schedule),
}

impl Role {
    pub(super) fn replaying(&self) -> bool {
        matches!(self, Role::Replay(_))
    }
    pub(super) fn recording(&self) -> bool {
        matches!(self, Role::Record(_))
    }
    pub(super) fn name(&self) -> &'static str {
        match self {
            Role::Live => "running",
            Role::Record(_) => "recording",
            Role::Replay(_) => "replaying",
        }
    }
}
