//! Interrupt-window exits as landmarks: when an interrupt waits after a
//! landmark's work and the guest cannot take it (IF=0, an interrupt shadow,
//! or one was just injected), the engine asks KVM to exit at the first
//! instruction boundary where the guest can, and injects there. Without
//! this the interrupt waited for the guest's next landmark, and a guest
//! that went back to user mode first cost a kick and a sync point.
//!
//! The decision uses only what both replicas share at the landmark (the
//! platform after the landmark's logged work, whether an interrupt went in,
//! the vCPU's interrupt-ability as the engine judges it), so the backup
//! asks for the same window, meets the same exit, and the log needs no
//! record for it. Pure (sans-IO): the engine gathers the state.

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
    if !s.interrupt_waiting {
        return false;
    }
    if s.at_window_exit && !s.injected_here {
        // The window opened and still nothing went in: asking again would
        // make KVM exit at this same instruction for ever. The interrupt
        // waits for the next landmark, as without windows.
        return false;
    }
    // Just injected: the next one when the handler can take interrupts
    // again. Otherwise the guest cannot take it now (else it went in).
    s.injected_here || !s.can_inject
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
    fn one_injected_with_another_waiting_asks_for_the_next_window() {
        assert!(wants_window(state(true, true, true, false)));
        assert!(wants_window(state(true, true, true, true)));
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
