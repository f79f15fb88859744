//! The emulated PC platform. Every device lives in userspace so the VMM alone
//! decides when and where an interrupt reaches the guest.
//!
//! Everything here is sans-IO: no clocks, threads, files or KVM. Time comes in
//! as [`Nanos`] (guest time since VM creation) and output goes to a sink the
//! caller chooses, so the same inputs always give the same outputs — the
//! property record/replay is built on.
#![forbid(unsafe_code)]

pub mod i8042;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod platform;
pub mod rtc;
pub mod tick_delivery;
pub mod uart;
pub mod virtio;

pub use i8042::{I8042State, I8042};
pub use pci::{PciConfigSpace, PciDevice, PciError, PciRoot, PciRootState};
pub use pic::{Pic, PicState};
pub use pit::{Pit, PitState, PIT_HZ};
pub use platform::{Platform, PlatformEvent, PlatformState};
pub use rtc::{Rtc, RtcState};
pub use tick_delivery::{TickDelivery, UnknownTickDelivery};
pub use uart::{Uart, UartState};
pub use virtio::{
    GuestRam, GuestRamError, RxOutcome, VecRam, VirtioNet, VirtioNetConfig, VirtioNetState,
    VirtioNetStats,
};

/// Guest-visible time: nanoseconds since the VM was created.
pub type Nanos = u64;

/// Why a saved device state could not be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// the saved state has a version this build does not understand
    #[error("{device}: unsupported state version {found} (expected {expected})")]
    Version {
        /// Which device rejected the state.
        device: &'static str,
        /// Version found in the saved state.
        found: u32,
        /// Version this build writes.
        expected: u32,
    },
    /// the saved state is internally inconsistent
    #[error("{device}: invalid state: {reason}")]
    Invalid {
        /// Which device rejected the state.
        device: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Checks a saved state's version against the one this build writes.
fn check_version(device: &'static str, found: u32, expected: u32) -> Result<(), StateError> {
    if found == expected {
        Ok(())
    } else {
        Err(StateError::Version {
            device,
            found,
            expected,
        })
    }
}

/// Builds a [`StateError::Invalid`] when `ok` is false.
fn ensure(ok: bool, device: &'static str, reason: &'static str) -> Result<(), StateError> {
    if ok {
        Ok(())
    } else {
        Err(StateError::Invalid { device, reason })
    }
}
