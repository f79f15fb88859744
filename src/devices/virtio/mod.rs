//! virtio 1.x devices on PCI ("modern" virtio-pci, split virtqueues).
//!
//! Like every device in twinvm these models are sans-IO: a device is a pure
//! function of its state, the calls made on it and the guest memory it is
//! handed. Work happens only inside those calls — transmit processing
//! inside the guest's notify write, receive delivery inside
//! [`VirtioNet::receive`] — so a backup that replays the same calls at the
//! same landmarks reaches the same state and writes the same bytes.
//!
//! Every byte a device writes to the guest goes through [`GuestRam::write`],
//! which lets the caller note the page for dirty tracking and digests.
//!
//! - [`queue`]: the split virtqueue walker, hardened against hostile rings.
//! - [`transport`]: the virtio-pci transport (capabilities, common
//!   configuration, ISR, notifications).
//! - [`net`]: virtio-net on top of both.

pub mod net;
pub mod queue;
pub mod transport;

#[cfg(test)]
mod misbehaviour_tests;
#[cfg(test)]
mod net_tests;
#[cfg(test)]
mod test_driver;

use std::collections::BTreeMap;
use std::fmt::Display;

pub use net::{
    RxOutcome, VirtioNet, VirtioNetConfig, VirtioNetState, VirtioNetStats, MAX_RX_FRAME,
    MAX_TX_FRAME, TX_PENDING_LIMIT,
};
pub use queue::{RingError, SplitQueue, MAX_QUEUE_SIZE};
pub use transport::TransportState;

/// Guest-physical memory as a device sees it (DMA). The VMM implements it
/// over KVM's memory; [`VecRam`] implements it for tests.
///
/// Both calls are all-or-nothing: a range that is not entirely guest RAM
/// is an error and nothing is read or written.
pub trait GuestRam {
    /// Fills `buf` from guest-physical address `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestRamError>;
    /// Writes `data` at guest-physical address `gpa`.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestRamError>;
}

/// A device access that does not lie entirely inside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes at guest-physical address {gpa:#x} are outside guest RAM")]
pub struct GuestRamError {
    /// First guest-physical address of the access.
    pub gpa: u64,
    /// Length of the access in bytes.
    pub len: usize,
}

/// A `Vec`-backed [`GuestRam`] starting at guest-physical address 0, for
/// tests of devices and of the code that drives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecRam {
    bytes: Vec<u8>,
}

impl VecRam {
    /// `size` bytes of zeroed RAM at guest-physical 0.
    pub fn new(size: usize) -> Self {
        Self {
            bytes: vec![0; size],
        }
    }

    /// The RAM's contents.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    /// The RAM's contents, for a test to lay out rings and buffers.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// The byte range `gpa..gpa + len` if it lies inside the RAM.
    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, GuestRamError> {
        let err = GuestRamError { gpa, len };
        let start = usize::try_from(gpa).map_err(|_| err)?;
        let end = start.checked_add(len).ok_or(err)?;
        if end > self.bytes.len() {
            return Err(err);
        }
        Ok(start..end)
    }
}

impl GuestRam for VecRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestRamError> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestRamError> {
        let r = self.range(gpa, data.len())?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }
}

/// Rate limiter for guest-misbehaviour warnings: each kind of problem is
/// logged on its 1st, 2nd, 4th, 8th... occurrence, so a guest that repeats
/// one mistake cannot flood the log nor hide a different one.
#[derive(Debug, Default)]
struct WarnLimiter {
    counts: BTreeMap<&'static str, u64>,
}

impl WarnLimiter {
    /// Counts one occurrence of `kind` and logs `detail` if it is due.
    fn warn(&mut self, device: &'static str, kind: &'static str, detail: &dyn Display) {
        let count = self.counts.entry(kind).or_insert(0);
        *count += 1;
        if count.is_power_of_two() {
            tracing::warn!(device, kind, count = *count, "guest error: {detail}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_ram_rejects_accesses_past_the_end() {
        let mut ram = VecRam::new(16);
        ram.write(12, &[1, 2, 3, 4]).unwrap();
        let mut b = [0; 4];
        ram.read(12, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(
            ram.write(13, &[0; 4]),
            Err(GuestRamError { gpa: 13, len: 4 })
        );
        assert_eq!(
            ram.read(u64::MAX, &mut b),
            Err(GuestRamError {
                gpa: u64::MAX,
                len: 4
            })
        );
        assert_eq!(ram.write(16, &[]), Ok(()));
        // A failed write leaves memory untouched.
        assert_eq!(&ram.as_slice()[12..], &[1, 2, 3, 4]);
    }

    #[test]
    fn warn_limiter_counts_each_kind_separately() {
        let mut w = WarnLimiter::default();
        for _ in 0..5 {
            w.warn("test", "a", &"detail");
        }
        w.warn("test", "b", &"detail");
        assert_eq!(w.counts.get("a"), Some(&5));
        assert_eq!(w.counts.get("b"), Some(&1));
    }
}
