//! twinvm: a fault-tolerance layer for single-vCPU KVM virtual machines.
//!
//! The tree follows the architecture:
//! - [`devices`]: the emulated PC platform (PIC, PIT, UART, RTC, i8042, PCI), sans-IO;
//! - [`vmm`]: the edge that owns KVM (memory, vCPU loop, CPUID, boot, emulation fallback);
//! - [`net`]: the host side of the guest NIC: TAP devices, network namespaces, test clients;
//! - [`ft`]: fault tolerance: the primary/backup pair, failover drills;
//! - [`cli`]: the `twinvm` command line.

pub mod cli;
pub mod devices;
pub mod ft;
pub mod guests;
pub mod net;
pub mod replay;
pub mod vmm;
