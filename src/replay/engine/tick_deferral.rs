//! Fewer sync points: when a kick finds that the only thing the guest is
//! owed is a timer tick and the guest is in user mode, let it run on (up
//! to the tick deferral past the missed deadline) instead of stopping it
//! for a sync point now. Every sync point costs a dirty-log harvest (and,
//! under shadow paging, a write fault on each page the guest stores to
//! next) plus the pages in the log; a tick a few milliseconds late costs a
//! user-mode loop nothing. The periods missed meanwhile reach the guest
//! as one IRQ0 at the deferral's end, then, with tick catch-up (which a
//! recording with a deferral turns on in its log header; a backup gone
//! live keeps its primary's rule), the platform's owed ticks one per
//! acknowledge, each taken at an interrupt-window exit as the guest's
//! handler returns (interrupt_window.rs), so they cost no further sync
//! point (docs/architecture.md, "Tick deferral"). Without catch-up they
//! are coalesced into that one IRQ0.
//!
//! With catch-up, a pending IRQ0, first or caught up, never waits into
//! user mode with IF=1: a landmark where the guest cannot take it asks for a window, and
//! the window exit injects it. So `other_waiting` (an interrupt the PIC
//! holds) never needs to tell a catch-up tick from other lines: when a kick
//! finds one the guest can take, something unusual happened (the guest
//! EOIs from user mode) and delivering it at once is right.
//!
//! The sync-point budget (`RecordSettings::sync_budget_percent`, on by
//! default) defers a tick the same way, but only as long as the last sync
//! point's cost asks: after one that kept the guest stopped for C, the next
//! tick owed in user mode waits until C·(100−p)/p past its end, so sync
//! points take at most p% of the time, and never more than
//! [`MAX_BUDGET_DEFERRAL`] past the missed deadline. A guest whose sync
//! points are cheap (a few pages: ~60 µs, so 1.2 ms at 5%) gets its ticks
//! as before at 250 Hz (at 1 kHz some coalesce: the test guests keep ~720
//! of 1,000 a second); one that writes megabytes between ticks gets fewer,
//! later ones instead of spending most of its time stopped
//! (docs/architecture.md, "Tick deferral").
//!
//! Pure decisions (sans-IO): the engine gathers the state, these decide.

use crate::devices::Nanos;

/// The longest the sync-point budget alone defers a tick past its missed
/// deadline: the guest-visible price (a user-mode stretch of a guest whose
/// sync points are expensive gets ~10 ticks a second) stays bounded
/// however slow a sync point was (a preempted host thread).
pub(super) const MAX_BUDGET_DEFERRAL: Nanos = 100_000_000;

/// How long a tick owed to a user-mode guest may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DeferralRule {
    /// A fixed deferral past the missed deadline (`--tick-deferral-ms`).
    pub fixed: Nanos,
    /// The most of the time sync points may keep the guest stopped, in
    /// percent (`--sync-budget-percent`; 0: no budget).
    pub budget_percent: u8,
}

/// The last sync point a kick made: when it ended and how long the guest
/// was stopped for it (guest ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SyncCost {
    pub ended: Nanos,
    pub took: Nanos,
}

impl DeferralRule {
    /// The moment a tick whose deadline was `deadline` must go in: the
    /// later of the fixed deferral's end and the budget's (so however many
    /// kicks look at it, it is never later). Equal to `deadline`: no
    /// deferral at all.
    fn end(&self, deadline: Nanos, last_sync: Option<SyncCost>) -> Nanos {
        let fixed_end = deadline.saturating_add(self.fixed);
        let budget_end = match (self.budget_percent, last_sync) {
            (p @ 1..=99, Some(sync)) => {
                let p = Nanos::from(p);
                let rest = sync.took.saturating_mul(100 - p) / p;
                sync.ended
                    .saturating_add(rest)
                    .min(deadline.saturating_add(MAX_BUDGET_DEFERRAL))
            }
            _ => deadline,
        };
        fixed_end.max(budget_end)
    }
}

/// What the engine sees when the guest was kicked (or is about to run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pending {
    /// Guest time now.
    pub now: Nanos,
    /// The earliest timer deadline (possibly passed; the PIT keeps the first
    /// missed one until it is polled).
    pub timer_deadline: Option<Nanos>,
    /// Something besides a timer waits for a landmark: an interrupt the PIC
    /// already holds, serial input, a received frame the guest can take.
    /// These are never deferred.
    pub other_waiting: bool,
    /// The last sync point, for the budget.
    pub last_sync: Option<SyncCost>,
}

impl Pending {
    fn timer_due(&self) -> bool {
        self.timer_deadline.is_some_and(|d| d <= self.now)
    }
}

/// What to do after a kick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KickDecision {
    /// Nothing the guest can take now: back into the guest.
    Resume,
    /// Stop here: make a sync point (a landmark) and deliver.
    SyncNow,
    /// Only a timer tick is owed and the guest is in user mode: back into
    /// the guest, to be kicked again at this guest time at the latest.
    DeferUntil(Nanos),
}

/// Decide what a kick leads to. `can_take_interrupt`: the guest's IF is set
/// and nothing blocks injection; `user_mode` is asked only when a deferral
/// is possible (reading the CPL costs an ioctl).
pub(super) fn on_kick(
    rule: DeferralRule,
    pending: Pending,
    can_take_interrupt: bool,
    user_mode: impl FnOnce() -> bool,
) -> KickDecision {
    if !can_take_interrupt {
        return KickDecision::Resume;
    }
    if pending.other_waiting {
        return KickDecision::SyncNow;
    }
    if !pending.timer_due() {
        return KickDecision::Resume;
    }
    match pending
        .timer_deadline
        .map(|deadline| rule.end(deadline, pending.last_sync))
    {
        Some(end) if pending.now < end && user_mode() => KickDecision::DeferUntil(end),
        _ => KickDecision::SyncNow,
    }
}

/// When the deadline timer should kick the guest (guest ns), given the sync
/// bound (how long a due event may wait for a landmark) and the end of a
/// deferral granted at the last kick, if any.
pub(super) fn wake_at(
    bound: Nanos,
    pending: Pending,
    deferred_until: Option<Nanos>,
) -> Option<Nanos> {
    let now = pending.now;
    if pending.other_waiting {
        return Some(now.saturating_add(bound));
    }
    let deadline = pending.timer_deadline?;
    match deferred_until {
        // A deferral granted for this tick: kick when it ends; once it has
        // (the guest could not take the tick then), one bound from now, as
        // without a deferral, never in a loop of kicks.
        Some(end) if deadline <= now => Some(end.max(now.saturating_add(bound))),
        _ => Some(deadline.max(now).saturating_add(bound)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    fn pending(now: Nanos, deadline: Option<Nanos>, other: bool) -> Pending {
        Pending {
            now,
            timer_deadline: deadline,
            other_waiting: other,
            last_sync: None,
        }
    }

    fn fixed(ns: Nanos) -> DeferralRule {
        DeferralRule {
            fixed: ns,
            budget_percent: 0,
        }
    }

    fn budget(percent: u8) -> DeferralRule {
        DeferralRule {
            fixed: 0,
            budget_percent: percent,
        }
    }

    fn after_sync(now: Nanos, deadline: Nanos, ended: Nanos, took: Nanos) -> Pending {
        Pending {
            last_sync: Some(SyncCost { ended, took }),
            ..pending(now, Some(deadline), false)
        }
    }

    fn never_asked() -> bool {
        panic!("the CPL must not be read here")
    }

    #[test]
    fn a_guest_that_cannot_take_interrupts_just_resumes() {
        let p = pending(10 * MS, Some(5 * MS), true);
        assert_eq!(
            on_kick(fixed(20 * MS), p, false, never_asked),
            KickDecision::Resume
        );
    }

    #[test]
    fn input_a_frame_or_a_held_interrupt_is_never_deferred() {
        let p = pending(10 * MS, Some(9 * MS), true);
        assert_eq!(
            on_kick(fixed(20 * MS), p, true, never_asked),
            KickDecision::SyncNow
        );
        let p = pending(10 * MS, None, true);
        assert_eq!(
            on_kick(fixed(20 * MS), p, true, never_asked),
            KickDecision::SyncNow
        );
    }

    #[test]
    fn nothing_due_resumes() {
        assert_eq!(
            on_kick(
                fixed(20 * MS),
                pending(10 * MS, Some(11 * MS), false),
                true,
                never_asked
            ),
            KickDecision::Resume
        );
        assert_eq!(
            on_kick(
                fixed(20 * MS),
                pending(10 * MS, None, false),
                true,
                never_asked
            ),
            KickDecision::Resume
        );
    }

    #[test]
    fn a_tick_due_in_user_mode_waits_until_the_deadline_plus_the_deferral() {
        let p = pending(10 * MS, Some(9 * MS), false);
        assert_eq!(
            on_kick(fixed(8 * MS), p, true, || true),
            KickDecision::DeferUntil(17 * MS)
        );
    }

    #[test]
    fn a_tick_due_in_kernel_mode_goes_in_now() {
        let p = pending(10 * MS, Some(9 * MS), false);
        assert_eq!(
            on_kick(fixed(8 * MS), p, true, || false),
            KickDecision::SyncNow
        );
    }

    #[test]
    fn a_deferral_never_passes_its_end_whatever_the_mode() {
        // At the end exactly and after it: deliver, without asking the mode.
        for now in [17 * MS, 30 * MS] {
            let p = pending(now, Some(9 * MS), false);
            assert_eq!(
                on_kick(fixed(8 * MS), p, true, never_asked),
                KickDecision::SyncNow
            );
        }
    }

    #[test]
    fn no_deferral_configured_keeps_the_old_rule() {
        let p = pending(10 * MS, Some(9 * MS), false);
        assert_eq!(
            on_kick(fixed(0), p, true, never_asked),
            KickDecision::SyncNow
        );
    }

    #[test]
    fn the_timer_is_armed_one_bound_after_a_deadline_not_yet_deferred() {
        let bound = MS / 5;
        assert_eq!(
            wake_at(bound, pending(10 * MS, Some(12 * MS), false), None),
            Some(12 * MS + bound)
        );
        // Already passed: one bound from now.
        assert_eq!(
            wake_at(bound, pending(10 * MS, Some(9 * MS), false), None),
            Some(10 * MS + bound)
        );
        assert_eq!(wake_at(bound, pending(10 * MS, None, false), None), None);
    }

    #[test]
    fn a_granted_deferral_moves_the_kick_to_its_end() {
        let bound = MS / 5;
        let p = pending(10 * MS, Some(9 * MS), false);
        assert_eq!(wake_at(bound, p, Some(17 * MS)), Some(17 * MS));
        // Ended already (the guest had IF=0 then): one bound from now.
        assert_eq!(
            wake_at(bound, pending(18 * MS, Some(9 * MS), false), Some(17 * MS)),
            Some(18 * MS + bound)
        );
        // A deferral shorter than the bound never kicks sooner than before.
        assert_eq!(
            wake_at(bound, pending(10 * MS, Some(9 * MS), false), Some(10 * MS)),
            Some(10 * MS + bound)
        );
        // A later deadline (the tick went in meanwhile) is not deferred.
        assert_eq!(
            wake_at(bound, pending(10 * MS, Some(13 * MS), false), Some(17 * MS)),
            Some(13 * MS + bound)
        );
    }

    #[test]
    fn other_waiting_input_cancels_a_deferral() {
        let bound = MS / 5;
        let p = pending(10 * MS, Some(9 * MS), true);
        assert_eq!(wake_at(bound, p, Some(17 * MS)), Some(10 * MS + bound));
    }

    #[test]
    fn a_cheap_sync_point_leaves_the_next_tick_on_time() {
        // 40 µs at 5%: the next may come 760 µs after it ended, long before
        // this deadline.
        let p = after_sync(10 * MS, 9 * MS, 4 * MS, MS / 25);
        assert_eq!(
            on_kick(budget(5), p, true, never_asked),
            KickDecision::SyncNow
        );
    }

    #[test]
    fn an_expensive_sync_point_defers_the_next_tick_by_the_budget() {
        // 2 ms at 5%: 38 ms more after it ended at 10 ms.
        let p = after_sync(12 * MS, 11 * MS, 10 * MS, 2 * MS);
        assert_eq!(
            on_kick(budget(5), p, true, || true),
            KickDecision::DeferUntil(48 * MS)
        );
        // At 50%: as long again as it took, which is now.
        assert_eq!(
            on_kick(budget(50), p, true, never_asked),
            KickDecision::SyncNow
        );
        // At 20%: four times as long.
        assert_eq!(
            on_kick(budget(20), p, true, || true),
            KickDecision::DeferUntil(18 * MS)
        );
        // Kernel mode is never deferred.
        assert_eq!(on_kick(budget(5), p, true, || false), KickDecision::SyncNow);
        // Nor anything else waiting.
        let mut other = p;
        other.other_waiting = true;
        assert_eq!(
            on_kick(budget(5), other, true, never_asked),
            KickDecision::SyncNow
        );
    }

    #[test]
    fn the_budget_never_defers_past_its_bound() {
        // A sync point of a second (a preempted thread) would ask for 19 s.
        let p = after_sync(1_200 * MS, 1_150 * MS, 1_100 * MS, 1_000 * MS);
        assert_eq!(
            on_kick(budget(5), p, true, || true),
            KickDecision::DeferUntil(1_150 * MS + MAX_BUDGET_DEFERRAL)
        );
        let late = after_sync(
            1_250 * MS + MAX_BUDGET_DEFERRAL,
            1_150 * MS,
            1_100 * MS,
            1_000 * MS,
        );
        assert_eq!(
            on_kick(budget(5), late, true, never_asked),
            KickDecision::SyncNow
        );
    }

    #[test]
    fn the_later_of_the_fixed_deferral_and_the_budget_wins() {
        let both = DeferralRule {
            fixed: 20 * MS,
            budget_percent: 5,
        };
        // The budget asks for 48 ms, the fixed deferral for 31.
        let p = after_sync(12 * MS, 11 * MS, 10 * MS, 2 * MS);
        assert_eq!(
            on_kick(both, p, true, || true),
            KickDecision::DeferUntil(48 * MS)
        );
        // A cheap sync point: the fixed deferral.
        let p = after_sync(12 * MS, 11 * MS, 10 * MS, MS / 25);
        assert_eq!(
            on_kick(both, p, true, || true),
            KickDecision::DeferUntil(31 * MS)
        );
    }

    #[test]
    fn no_budget_or_a_whole_one_or_no_sync_point_yet_keeps_the_old_rule() {
        let p = after_sync(12 * MS, 11 * MS, 10 * MS, 2 * MS);
        for percent in [0, 100] {
            assert_eq!(
                on_kick(budget(percent), p, true, never_asked),
                KickDecision::SyncNow
            );
        }
        let first = pending(12 * MS, Some(11 * MS), false);
        assert_eq!(
            on_kick(budget(5), first, true, never_asked),
            KickDecision::SyncNow
        );
    }
}
