//! Deterministic record and replay without an instruction counter.
//!
//! Events are placed on landmarks (deterministic exits: port I/O, MMIO, HLT,
//! traps the VMM planted) and, for stretches of guest code with no exits, on
//! sync points (the primary stops the guest anywhere and ships its state).
//! Digests catch divergence. `log` is the on-disk/on-wire format, `schedule`
//! the backup's decisions, `digest` the hashing; all three are sans-IO.
//! `engine` drives them and the VM (through `crate::vmm`, the KVM edge).

pub mod digest;
pub mod engine;
pub mod log;
pub mod log_file;
pub mod machine;
pub mod schedule;
