//! twinvm: a fault-tolerance layer for single-vCPU KVM virtual machines.
//!
//! The tree follows the architecture:
//! - [`devices`]: the emulated PC platform (PIC, PIT, UART, RTC, i8042, PCI), sans-IO;
//! - [`vmm`]: the edge that owns KVM (memory, vCPU loop, CPUID, boot, emulation fallback);
//! - [`ft`]: the fault-tolerant pair's protocol core (channel, output rule, failover), sans-IO;
//! - [`cli`]: the `twinvm` command line.

pub mod cli;
pub mod devices;
pub mod ft;
pub mod guests;
pub mod replay;
pub mod vmm;
