//! Serial input waiting for room in the UART.

use std::io::Write;

use crate::devices::Platform;

/// Serial input held for the UART beyond this is left in its channel, so
/// the sender (the stdin reader) is slowed instead of memory growing.
pub(super) const MAX_HELD_SERIAL_INPUT: usize = 4096;

/// Serial input the UART could not take yet (its FIFO is full); never dropped.
#[derive(Default)]
pub(super) struct PendingInput(pub(super) std::collections::VecDeque<u8>);

impl PendingInput {
    /// Offer held input to the UART; returns the bytes it took.
    pub(super) fn feed<W: Write>(&mut self, platform: &mut Platform<W>) -> Vec<u8> {
        let mut accepted = Vec::new();
        while !self.0.is_empty() {
            let (front, _) = self.0.as_slices();
            let taken = platform.enqueue_serial_input(front);
            if taken == 0 {
                break;
            }
            accepted.extend(self.0.drain(..taken));
        }
        accepted
    }
}
