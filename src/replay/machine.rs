//! The guest as every replica builds it: the VM, its devices, and the log
//! header that names it (so a replay or a backup can refuse another guest).

use super::log::LogHeader;
use crate::devices::{Platform, TickDelivery};
use crate::vmm::{Vm, VmConfig, VmError};

/// The header describing the guest `config` would boot (ticks delivered
/// at landmarks: a recording that chooses another rule sets it).
pub fn header_for(
    config: &VmConfig,
    boot_unix_secs: u64,
    host_cpu: u32,
    net_mac: Option<[u8; 6]>,
) -> LogHeader {
    LogHeader {
        kernel_hash: blake3::hash(&config.kernel).into(),
        initrd_hash: config.initrd.as_ref().map(|i| blake3::hash(i).into()),
        cmdline: config.cmdline.clone(),
        mem_bytes: config.mem_bytes,
        boot_unix_secs,
        host_cpu,
        net_mac,
        tick_delivery: TickDelivery::AtLandmarks,
    }
}

/// Build the VM and its devices: the platform with its RTC at
/// `boot_unix_secs`, ticks delivered by `tick_delivery` (the log header's
/// rule), and a NIC with `net_mac` if given.
pub fn build(
    config: &VmConfig,
    boot_unix_secs: u64,
    tick_delivery: TickDelivery,
    net_mac: Option<[u8; 6]>,
) -> Result<(Vm, Platform<Vec<u8>>), VmError> {
    let vm = Vm::create(config)?;
    tracing::info!(entry = format_args!("{:#x}", vm.kernel.entry), kind = ?vm.kernel.kind, "kernel loaded");
    let mut platform = Platform::new(Vec::new(), boot_unix_secs);
    platform.set_tick_delivery(tick_delivery);
    if let Some(mac) = net_mac {
        platform.add_net(mac);
    }
    Ok((vm, platform))
}
