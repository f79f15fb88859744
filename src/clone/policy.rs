//! When to stop copying and cut (sans-IO): the primary copies guest memory
//! in rounds while the guest runs; each round sends the pages the previous
//! one saw written. The cut pauses the guest for the last dirty set, so it
//! comes once that set is small, or once more rounds would not make it
//! smaller (a guest that dirties memory faster than the link copies it),
//! or past a bound of rounds; the last two are reported as a longer pause.

use std::time::Duration;

/// The policy's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundBounds {
    /// A dirty set this small is sent during the pause.
    pub small_enough_pages: u64,
    /// Rounds after the first (the whole memory) at most.
    pub max_rounds: u32,
    /// Rounds in a row without the dirty set shrinking below 90% of the
    /// best seen before the copy gives up converging.
    pub stalled_rounds: u32,
}

impl Default for RoundBounds {
    fn default() -> Self {
        RoundBounds {
            small_enough_pages: 512,
            max_rounds: 30,
            stalled_rounds: 3,
        }
    }
}

/// Why the copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    /// The dirty set is small: a short pause.
    Converged,
    /// The dirty set stopped shrinking: the pause takes what is left.
    NotConverging,
    /// The round bound was reached: the pause takes what is left.
    RoundBound,
}

impl CutReason {
    pub fn describe(self) -> &'static str {
        match self {
            CutReason::Converged => "the dirty set converged",
            CutReason::NotConverging => {
                "the guest dirties memory as fast as it is copied: a longer pause"
            }
            CutReason::RoundBound => "the round bound was reached: a longer pause",
        }
    }
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Copy the dirty set while the guest runs.
    CopyAgain,
    /// Pause the guest and send the rest.
    Cut(CutReason),
}

/// The round policy's state.
#[derive(Debug, Clone)]
pub struct RoundPolicy {
    bounds: RoundBounds,
    rounds_done: u32,
    best: Option<u64>,
    stalled: u32,
    /// Pages copied and the time it took, over all rounds.
    pages_copied: u64,
    copy_time: Duration,
    last_dirty: u64,
    last_round_time: Duration,
}

impl RoundPolicy {
    pub fn new(bounds: RoundBounds) -> Self {
        RoundPolicy {
            bounds,
            rounds_done: 0,
            best: None,
            stalled: 0,
            pages_copied: 0,
            copy_time: Duration::ZERO,
            last_dirty: 0,
            last_round_time: Duration::ZERO,
        }
    }

    /// A round copied `pages` in `took`; `dirty` pages were written meanwhile.
    pub fn round_done(&mut self, pages: u64, took: Duration, dirty: u64) -> NextStep {
        self.rounds_done += 1;
        self.pages_copied += pages;
        self.copy_time += took;
        self.last_dirty = dirty;
        self.last_round_time = took;
        if dirty <= self.bounds.small_enough_pages {
            return NextStep::Cut(CutReason::Converged);
        }
        match self.best {
            Some(best) if dirty * 10 >= best * 9 => self.stalled += 1,
            _ => {
                self.best = Some(dirty);
                self.stalled = 0;
            }
        }
        // The first round is the whole memory: the bound counts the others.
        if self.rounds_done > self.bounds.max_rounds {
            return NextStep::Cut(CutReason::RoundBound);
        }
        if self.stalled >= self.bounds.stalled_rounds {
            return NextStep::Cut(CutReason::NotConverging);
        }
        NextStep::CopyAgain
    }

    pub fn rounds_done(&self) -> u32 {
        self.rounds_done
    }

    /// Pages per second written by the guest during the last round.
    pub fn dirty_rate(&self) -> f64 {
        let secs = self.last_round_time.as_secs_f64();
        if secs > 0.0 {
            self.last_dirty as f64 / secs
        } else {
            0.0
        }
    }

    /// The pause copying the last dirty set would take at the copy rate
    /// measured so far.
    pub fn estimated_pause(&self) -> Duration {
        if self.pages_copied == 0 {
            return Duration::ZERO;
        }
        self.copy_time
            .mul_f64(self.last_dirty as f64 / self.pages_copied as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_idle_guest_cuts_after_the_first_round() {
        let mut p = RoundPolicy::new(RoundBounds::default());
        assert_eq!(
            p.round_done(65536, 500 * MS, 12),
            NextStep::Cut(CutReason::Converged)
        );
        assert_eq!(p.rounds_done(), 1);
        // 12 of 65536 pages at 500 ms for all: under 0.1 ms.
        assert!(p.estimated_pause() < MS);
    }

    #[test]
    fn a_shrinking_dirty_set_is_copied_until_small() {
        let mut p = RoundPolicy::new(RoundBounds::default());
        let mut dirty = 20_000;
        let mut steps = 0;
        loop {
            steps += 1;
            match p.round_done(dirty, 100 * MS, dirty / 4) {
                NextStep::CopyAgain => dirty /= 4,
                NextStep::Cut(reason) => {
                    assert_eq!(reason, CutReason::Converged);
                    break;
                }
            }
            assert!(steps < 10);
        }
        assert_eq!(
            steps, 3,
            "copied 20000 (5000 dirtied), 5000 (1250), 1250 (312: cut)"
        );
    }

    #[test]
    fn a_guest_dirtying_faster_than_the_copy_stops_after_stalled_rounds() {
        let mut p = RoundPolicy::new(RoundBounds::default());
        assert_eq!(p.round_done(65536, 1000 * MS, 8000), NextStep::CopyAgain);
        assert_eq!(p.round_done(8000, 120 * MS, 7900), NextStep::CopyAgain);
        assert_eq!(p.round_done(7900, 120 * MS, 8100), NextStep::CopyAgain);
        assert_eq!(
            p.round_done(8100, 120 * MS, 7950),
            NextStep::Cut(CutReason::NotConverging)
        );
        assert!(p.estimated_pause() > 50 * MS, "{:?}", p.estimated_pause());
        assert!(p.dirty_rate() > 60_000.0);
    }

    #[test]
    fn the_round_bound_ends_a_slowly_shrinking_copy() {
        let bounds = RoundBounds {
            max_rounds: 5,
            ..RoundBounds::default()
        };
        let mut p = RoundPolicy::new(bounds);
        let mut dirty = 100_000u64;
        let mut last = NextStep::CopyAgain;
        for _ in 0..6 {
            dirty = dirty * 8 / 10; // shrinks 20% a round: never stalls
            last = p.round_done(dirty, 10 * MS, dirty);
            if last != NextStep::CopyAgain {
                break;
            }
        }
        assert_eq!(last, NextStep::Cut(CutReason::RoundBound));
        assert_eq!(p.rounds_done(), 6, "the first round plus 5");
    }
}
