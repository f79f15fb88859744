//! twinvm: a fault-tolerance layer for single-vCPU KVM virtual machines.
//!
//! The tree follows the architecture:
//! - [`devices`]: the emulated PC platform (PIC, PIT, UART, RTC, i8042, PCI), sans-IO;
//! - [`vmm`]: the edge that owns KVM (memory, vCPU loop, CPUID, boot, emulation fallback);
//! - [`replay`]: deterministic record/replay: the log, the schedule, digests and the engine;
//! - [`net`]: the host side of the guest NIC: TAP devices, network namespaces, test clients;
//! - [`ft`]: the fault-tolerant pair: protocol core (channel, output rule, failover) and its edge;
//! - [`cli`]: the `twinvm` command line.

pub mod cli;
pub mod clone;
pub mod devices;
pub mod ft;
pub mod guests;
pub mod net;
pub mod replay;
pub mod vmm;
