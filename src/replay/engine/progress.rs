//! A status line for a person watching a long run.

use std::time::{Duration, Instant};

use super::ExitStats;

/// A status line every few seconds on stderr, for a person watching a long
/// boot, recording or replay (only when stderr is a terminal).
pub(super) struct Progress {
    enabled: bool,
    last: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(5);

    pub(super) fn new() -> Self {
        use std::io::IsTerminal;
        Progress {
            enabled: std::io::stderr().is_terminal(),
            last: Instant::now(),
        }
    }

    pub(super) fn tick(&mut self, what: &str, landmark: u64, stats: &ExitStats, start: Instant) {
        // Checked every 256 exits to keep the clock off the hot path.
        if !self.enabled || stats.total % 256 != 0 || self.last.elapsed() < Self::EVERY {
            return;
        }
        self.last = Instant::now();
        eprintln!(
            "twinvm: {what} {:.0} s: landmark {landmark}, {} exits, {} interrupts, {} sync points, {} emulation fallbacks",
            start.elapsed().as_secs_f64(),
            stats.total,
            stats.interrupts_injected,
            stats.sync_points,
            stats.emulation_fallbacks
        );
    }
}
