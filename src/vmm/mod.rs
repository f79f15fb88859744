//! The KVM edge: guest memory, vCPU exits, kicks, the deadline timer, CPUID,
//! boot and the emulation fallback. The record/replay engine that drives it
//! lives in `crate::replay::engine`.

pub mod boot;
pub mod bzimage;
pub mod cpuid;
pub mod emulate;
pub mod exit;
pub mod fallback;
pub mod guest_cpu;
pub mod hot_pages;
pub mod kvm_stats;
pub mod layout;
pub mod sys;
pub mod syscall_fix;
pub mod timer;
pub mod traps;
pub mod unicorn;
pub mod vm;

pub use sys::Kicker;
pub use vm::{Vm, VmConfig, VmError};
