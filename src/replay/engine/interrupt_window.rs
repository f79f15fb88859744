//! Interrupt-window exits as landmarks: when an interrupt waits after a
//! landmark's work and the guest cannot take it (IF=0, an interrupt
//! shadow), the engine asks KVM to exit at the first instruction boundary
//! where the guest can, and injects there. Without
//! this the interrupt waited for the guest's next landmark, and a guest
//! that went back to user mode first cost a kick and a sync point.
//!
//! The decision uses only what both replicas share at the landmark (the
//! platform after the landmark's logged work, whether an interrupt went in,
//! the vCPU's interrupt-ability as the engine judges it), so the backup
//! asks for the same window, meets the same exit, and the log needs no
//! record for it. Pure (sans-IO): the engine gathers the state.
//!
//! Never asked for at a landmark that injected: the guest could take
//! interrupts there, so the window would be open at entry unless the
//! handler's gate clears IF, and a window requested while it is already
//! open is the case host-notes.md measured imprecise (after a kick). A
//! second interrupt waiting behind the one injected (rare: a higher
//! priority line raised meanwhile) is asked for at the handler's next
//! landmark, its EOI, where IF is 0.

/// What the engine knows at the end of a landmark's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WindowState {
    /// The PIC raises INTR (an interrupt is waiting for the CPU).
    pub interrupt_waiting: bool,
    /// An interrupt was injected at this landmark.
    pub injected_here: bool,
    /// The guest can take an interrupt here (IF=1, no shadow, nothing
    /// being injected), as the engine's `can_inject` judges it.
    pub can_inject: bool,
    /// This landmark is itself an interrupt-window exit.
    pub at_window_exit: bool,
}

/// Whether to ask KVM for an interrupt-window exit before the next KVM_RUN.
pub(super) fn wants_window(s: WindowState) -> bool {
    // Never at a landmark that injected (module docs), nor again at a
    // window exit that injected nothing: the window opened and still
    // nothing went in, and asking again would make KVM exit at this same
    // instruction for ever; the interrupt waits for the next landmark, as
    // without windows.
    s.interrupt_waiting && !s.injected_here && !s.can_inject && !s.at_window_exit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(waiting: bool, injected: bool, can: bool, window: bool) -> WindowState {
        WindowState {
            interrupt_waiting: waiting,
            injected_here: injected,
            can_inject: can,
            at_window_exit: window,
        }
    }

    #[test]
    fn nothing_waiting_asks_for_nothing() {
        for injected in [false, true] {
            for can in [false, true] {
                for window in [false, true] {
                    assert!(!wants_window(state(false, injected, can, window)));
                }
            }
        }
    }

    #[test]
    fn an_interrupt_the_guest_cannot_take_yet_asks_for_a_window() {
        assert!(wants_window(state(true, false, false, false)));
    }

    #[test]
    fn a_landmark_that_injected_asks_for_no_window() {
        for can in [false, true] {
            for window in [false, true] {
                assert!(!wants_window(state(true, true, can, window)));
            }
        }
    }

    #[test]
    fn an_interrupt_the_guest_could_take_asks_for_none() {
        // (The engine injects it at this landmark instead.)
        assert!(!wants_window(state(true, false, true, false)));
    }

    #[test]
    fn a_window_exit_that_injected_nothing_never_asks_again() {
        assert!(!wants_window(state(true, false, false, true)));
        assert!(!wants_window(state(true, false, true, true)));
    }
}
