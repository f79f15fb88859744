//! Whether a clone may go ahead (sans-IO): the new backup compares the
//! primary's Hello with its own build and guest, before the primary pauses
//! anything. Every difference is named.

use super::protocol::{BuildInfo, CLONE_PROTOCOL_VERSION};
use crate::replay::log::LogHeader;

/// This build's versions and CPU model.
pub fn this_build() -> BuildInfo {
    let mut model = Vec::new();
    for leaf in crate::vmm::cpuid::model() {
        for word in [
            leaf.function,
            leaf.index.map_or(u32::MAX, |i| i),
            leaf.eax,
            leaf.ebx,
            leaf.ecx,
            leaf.edx,
        ] {
            model.extend_from_slice(&word.to_le_bytes());
        }
    }
    BuildInfo {
        twinvm_version: env!("CARGO_PKG_VERSION").to_owned(),
        platform_state_version: crate::devices::platform::PLATFORM_STATE_VERSION,
        snapshot_version: crate::replay::engine::CLONE_SNAPSHOT_VERSION,
        log_version: crate::replay::log::LOG_VERSION,
        cpu_model: blake3::hash(&model).into(),
    }
}

/// What the new backup expects of the primary's Hello.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub vm: &'a str,
    pub build: &'a BuildInfo,
    /// This backup's guest (kernel, initrd, command line, memory, NIC).
    pub guest: &'a LogHeader,
}

/// The primary's Hello, as far as compatibility goes.
#[derive(Debug, Clone)]
pub struct Offered<'a> {
    pub protocol_version: u16,
    pub vm: &'a str,
    pub build: &'a BuildInfo,
    pub guest: &'a LogHeader,
}

/// Every reason the clone cannot go ahead; empty when it can.
pub fn incompatibilities(offered: &Offered, expected: &Expected) -> Vec<String> {
    let mut why = Vec::new();
    if offered.protocol_version != CLONE_PROTOCOL_VERSION {
        why.push(format!(
            "clone protocol version {} (this build speaks {CLONE_PROTOCOL_VERSION})",
            offered.protocol_version
        ));
    }
    if offered.vm != expected.vm {
        why.push(format!(
            "the primary runs VM {:?}, this backup is for {:?}",
            offered.vm, expected.vm
        ));
    }
    let (theirs, ours) = (offered.build, expected.build);
    if theirs.twinvm_version != ours.twinvm_version {
        why.push(format!(
            "twinvm {} on the primary, {} here",
            theirs.twinvm_version, ours.twinvm_version
        ));
    }
    if theirs.platform_state_version != ours.platform_state_version {
        why.push(format!(
            "device state version {} on the primary, {} here",
            theirs.platform_state_version, ours.platform_state_version
        ));
    }
    if theirs.snapshot_version != ours.snapshot_version {
        why.push(format!(
            "clone snapshot version {} on the primary, {} here",
            theirs.snapshot_version, ours.snapshot_version
        ));
    }
    if theirs.log_version != ours.log_version {
        why.push(format!(
            "log version {} on the primary, {} here",
            theirs.log_version, ours.log_version
        ));
    }
    if theirs.cpu_model != ours.cpu_model {
        why.push("the vCPU's CPU model (CPUID) differs".to_owned());
    }
    why.extend(offered.guest.differences_from(expected.guest));
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(mem_bytes: u64) -> LogHeader {
        LogHeader {
            kernel_hash: [1; 32],
            initrd_hash: None,
            cmdline: "console=ttyS0".into(),
            mem_bytes,
            boot_unix_secs: 5,
            host_cpu: 0,
            net_mac: None,
            tick_delivery: crate::devices::TickDelivery::AtLandmarks,
        }
    }

    #[test]
    fn the_same_build_and_guest_are_compatible() {
        let build = this_build();
        let guest = header(256 << 20);
        let offered = Offered {
            protocol_version: CLONE_PROTOCOL_VERSION,
            vm: "web",
            build: &build,
            guest: &guest,
        };
        let expected = Expected {
            vm: "web",
            build: &build,
            guest: &header(256 << 20),
        };
        assert!(incompatibilities(&offered, &expected).is_empty());
        assert_eq!(this_build(), build, "the CPU model hash is stable");
    }

    #[test]
    fn every_difference_is_named() {
        let ours = this_build();
        let theirs = BuildInfo {
            twinvm_version: "9.9.9".into(),
            platform_state_version: ours.platform_state_version + 1,
            snapshot_version: ours.snapshot_version + 1,
            log_version: ours.log_version + 1,
            cpu_model: [0; 32],
        };
        let (their_guest, our_guest) = (header(512 << 20), header(256 << 20));
        let why = incompatibilities(
            &Offered {
                protocol_version: 99,
                vm: "db",
                build: &theirs,
                guest: &their_guest,
            },
            &Expected {
                vm: "web",
                build: &ours,
                guest: &our_guest,
            },
        );
        let all = why.join("\n");
        for needle in [
            "protocol version 99",
            "VM \"db\"",
            "twinvm 9.9.9",
            "device state version",
            "snapshot version",
            "log version",
            "CPU model",
            "memory was 512 MiB, now 256 MiB",
        ] {
            assert!(all.contains(needle), "{needle:?} missing from {all}");
        }
    }
}
