//! The emulated PC platform. Every device lives in userspace so the VMM alone
//! decides when and where an interrupt reaches the guest.
//!
//! Everything here is sans-IO: no clocks, threads, files or KVM. Time comes in
//! as [`Nanos`] (guest time since VM creation) and output goes to a sink the
//! caller chooses, so the same inputs always give the same outputs — the
//! property record/replay is built on.

/// Guest-visible time: nanoseconds since the VM was created.
pub type Nanos = u64;
