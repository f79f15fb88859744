//! The KVM edge: guest memory, the vCPU loop, CPUID, boot and the emulation fallback.

pub mod boot;
pub mod bzimage;
pub mod cpuid;
pub mod emulate;
pub mod guest_cpu;
pub mod layout;
pub mod sys;
pub mod syscall_fix;
pub mod traps;
pub mod unicorn;
pub mod vcpu;
pub mod vm;

pub use sys::Kicker;
pub use vcpu::{
    run, Control, Ending, ExitStats, Mode, RecordSettings, Recorder, RunError, RunReport,
};
pub use vm::{Vm, VmConfig, VmError};
