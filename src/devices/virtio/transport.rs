//! The virtio-pci "modern" transport (virtio 1.2 §4.1): PCI identity, the
//! vendor capabilities that locate the virtio structures in BAR0, the
//! common configuration (feature negotiation, device status, queue setup),
//! the ISR and the notification area. The device-specific configuration
//! and what a queue notification means belong to the device.
//!
//! BAR0 layout (one page per structure, as Linux maps them):
//!
//! | offset | structure                         |
//! |--------|-----------------------------------|
//! | 0x0000 | common configuration (0x38 bytes) |
//! | 0x1000 | ISR status                        |
//! | 0x2000 | device-specific configuration     |
//! | 0x3000 | notifications, 4 bytes per queue  |
//!
//! There is no MSI-X capability: interrupts are INTx (pin A), level
//! triggered, asserted while the ISR is non-zero. Linux's virtio-pci falls
//! back to INTx by itself when MSI-X is absent.

use serde::{Deserialize, Serialize};

use super::super::pci::{BarKind, PciConfigSpace};
use super::super::{ensure, StateError};
use super::queue::{RingError, SplitQueue};
use super::WarnLimiter;

/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x4000;

/// Offsets of the structures in BAR0 (see the module documentation).
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Length of the common configuration structure (up to queue_device).
pub const COMMON_CFG_LEN: u64 = 0x38;
const ISR_LEN: u64 = 4;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// virtio-pci identification.
const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_MODERN_DEVICE_BASE: u16 = 0x1040;
/// Subsystem ID of a non-transitional device (spec: 0x40 or higher;
/// QEMU's value).
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;

/// Vendor-specific capability and the virtio structure types.
const PCI_CAP_ID_VNDR: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// PCI command register: memory decoding, bus mastering (DMA) and INTx
/// disable.
const PCI_COMMAND_MEMORY: u16 = 0x0002;
const PCI_COMMAND_MASTER: u16 = 0x0004;
const PCI_COMMAND_INTX_DISABLE: u16 = 0x0400;
/// PCI status register (upper half of dword 1): interrupt status.
const PCI_STATUS_INTERRUPT: u32 = 0x0008 << 16;

/// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 0x01;
pub const STATUS_DRIVER: u8 = 0x02;
pub const STATUS_DRIVER_OK: u8 = 0x04;
pub const STATUS_FEATURES_OK: u8 = 0x08;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
/// The bits the driver sets.
const STATUS_DRIVER_BITS: u8 =
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED;

/// ISR bits: a queue has used buffers; the configuration changed.
pub const ISR_QUEUE: u8 = 0x01;
pub const ISR_CONFIG: u8 = 0x02;

/// The one feature every modern device offers and every driver must take.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// "No MSI-X vector": what the vector registers read without MSI-X.
const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Where a BAR0 access lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// Common configuration, at this offset inside it.
    Common(u64),
    /// ISR status, at this offset inside it (only byte 0 is the ISR).
    Isr(u64),
    /// Device-specific configuration, at this offset inside it.
    Device(u64),
    /// The notification area, at this offset inside it.
    Notify(u64),
}

/// What a transport-level register write asks the device to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The driver set DRIVER_OK: buffers made available earlier may be used.
    DriverOk,
    /// The driver notified queue `n`.
    Notify(u16),
}

/// What a device tells the transport about itself.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    /// Name in logs and state errors.
    pub name: &'static str,
    /// virtio device ID (1 = network).
    pub virtio_id: u16,
    /// PCI class and subclass.
    pub class: (u8, u8),
    /// Feature bits offered (VERSION_1 is added).
    pub features: u64,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Length of the device-specific configuration.
    pub device_cfg_len: u32,
}

/// Serialisable transport state: everything the guest can observe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// PCI configuration space (BAR address, command, capability fields).
    pub pci: PciConfigSpace,
    /// The PCI_CFG capability's data window latch.
    pub pci_cfg_data: [u8; 4],
    /// common_cfg.device_feature_select.
    pub device_feature_select: u32,
    /// common_cfg.driver_feature_select.
    pub driver_feature_select: u32,
    /// Feature bits 0..63 the driver wrote.
    pub driver_features: u64,
    /// The driver wrote a non-zero word past feature bit 63.
    pub driver_features_beyond_64: bool,
    /// common_cfg.device_status.
    pub status: u8,
    /// common_cfg.config_generation.
    pub config_generation: u8,
    /// common_cfg.queue_select.
    pub queue_select: u16,
    /// The virtqueues.
    pub queues: Vec<SplitQueue>,
    /// ISR status bits.
    pub isr: u8,
    /// Queues notified through the PCI_CFG window and not yet processed
    /// (bit n = queue n).
    pub pending_notify: u16,
}

/// The virtio-pci transport of one device.
#[derive(Debug)]
pub struct Transport {
    id: Identity,
    /// Offset of the PCI_CFG capability in configuration space.
    pci_cfg_cap: usize,
    st: TransportState,
    warn: WarnLimiter,
    /// Guest errors seen (all kinds, including ring failures).
    pub guest_errors: u64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub ring_failures: u64,
}

impl Transport {
    /// A device at power-on: BAR0 programmed at `bar0` (decoding off until
    /// the guest enables it), interrupt line `irq_line`.
    pub fn new(id: Identity, bar0: u64, irq_line: u8) -> Self {
        let (pci, pci_cfg_cap) = build_pci(&id, bar0, irq_line);
        let st = TransportState {
            pci,
            pci_cfg_data: [0; 4],
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            driver_features_beyond_64: false,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: vec![SplitQueue::new(); usize::from(id.num_queues)],
            isr: 0,
            pending_notify: 0,
        };
        Self {
            id,
            pci_cfg_cap,
            st,
            warn: WarnLimiter::default(),
            guest_errors: 0,
            ring_failures: 0,
        }
    }

    fn device_features(&self) -> u64 {
        self.id.features | VIRTIO_F_VERSION_1
    }

    /// The driver finished initialisation, the device has not failed and
    /// bus mastering is on (Linux clears it on shutdown to stop DMA): the
    /// device may use the queues.
    pub fn live(&self) -> bool {
        let need = STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.st.status & need == need
            && self.st.status & (STATUS_NEEDS_RESET | STATUS_FAILED) == 0
            && self.st.pci.command() & PCI_COMMAND_MASTER != 0
    }

    /// The device is in DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.st.status & STATUS_NEEDS_RESET != 0
    }

    /// Queue `n`.
    pub fn queue(&self, n: u16) -> &SplitQueue {
        &self.st.queues[usize::from(n)]
    }

    /// Queue `n`, mutably.
    pub fn queue_mut(&mut self, n: u16) -> &mut SplitQueue {
        &mut self.st.queues[usize::from(n)]
    }

    /// The INTx line: ISR non-zero and INTx not disabled in PCI command.
    pub fn irq_level(&self) -> bool {
        self.st.isr != 0 && self.st.pci.command() & PCI_COMMAND_INTX_DISABLE == 0
    }

    /// Signals a used-buffer notification.
    pub fn raise_queue_interrupt(&mut self) {
        self.st.isr |= ISR_QUEUE;
    }

    /// BAR0's address while memory decoding is on and the BAR is assigned.
    pub fn bar0(&self) -> Option<u64> {
        if self.st.pci.command() & PCI_COMMAND_MEMORY == 0 {
            return None;
        }
        self.st.pci.bar_address(0).filter(|&a| a != 0)
    }

    /// Counts and logs (rate limited) a guest mistake.
    pub fn guest_error(&mut self, kind: &'static str, detail: &dyn std::fmt::Display) {
        self.guest_errors += 1;
        self.warn(kind, detail);
    }

    /// Logs (rate limited) a problem that is not the guest's fault.
    pub fn warn(&mut self, kind: &'static str, detail: &dyn std::fmt::Display) {
        self.warn.warn(self.id.name, kind, detail);
    }

    /// A ring is broken: enter DEVICE_NEEDS_RESET and raise the
    /// configuration-change interrupt. The device does no more queue work
    /// until the driver resets it.
    pub fn fail(&mut self, err: RingError) {
        self.guest_error(err.kind(), &err);
        if !self.needs_reset() {
            self.ring_failures += 1;
            self.st.status |= STATUS_NEEDS_RESET;
            self.st.isr |= ISR_CONFIG;
        }
    }

    /// Device reset (status 0 written): everything but PCI configuration
    /// goes back to power-on values.
    fn reset(&mut self) {
        let st = &mut self.st;
        st.device_feature_select = 0;
        st.driver_feature_select = 0;
        st.driver_features = 0;
        st.driver_features_beyond_64 = false;
        st.status = 0;
        st.queue_select = 0;
        st.queues.iter_mut().for_each(|q| *q = SplitQueue::new());
        st.isr = 0;
        st.pending_notify = 0;
    }

    /// Which structure a BAR0 access of `len` bytes at `offset` touches;
    /// `None` if it is not wholly inside one.
    pub fn region(&self, offset: u64, len: usize) -> Option<Region> {
        let end = offset.checked_add(len as u64)?;
        let within = |base: u64, size: u64| offset >= base && end <= base + size;
        if within(COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            Some(Region::Common(offset - COMMON_CFG_OFFSET))
        } else if within(ISR_OFFSET, ISR_LEN) {
            Some(Region::Isr(offset - ISR_OFFSET))
        } else if within(DEVICE_CFG_OFFSET, u64::from(self.id.device_cfg_len)) {
            Some(Region::Device(offset - DEVICE_CFG_OFFSET))
        } else if within(NOTIFY_OFFSET, self.notify_len()) {
            Some(Region::Notify(offset - NOTIFY_OFFSET))
        } else {
            None
        }
    }

    fn notify_len(&self) -> u64 {
        u64::from(self.id.num_queues) * u64::from(NOTIFY_OFF_MULTIPLIER)
    }

    /// Reads the ISR: returns it and clears it, which deasserts INTx.
    pub fn isr_read(&mut self) -> u8 {
        std::mem::take(&mut self.st.isr)
    }

    /// A write to the notification area.
    pub fn notify_write(&mut self, offset: u64) -> Option<Event> {
        let queue = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        if offset % u64::from(NOTIFY_OFF_MULTIPLIER) != 0 || queue >= u64::from(self.id.num_queues)
        {
            self.guest_error(
                "bad notify offset",
                &format_args!("notify write at offset {offset:#x} names no queue"),
            );
            return None;
        }
        Some(Event::Notify(queue as u16))
    }

    /// The common configuration as bytes.
    fn common_image(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let st = &self.st;
        let mut b = [0u8; COMMON_CFG_LEN as usize];
        let word = |features: u64, select: u32| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        b[0x00..0x04].copy_from_slice(&st.device_feature_select.to_le_bytes());
        let df = word(self.device_features(), st.device_feature_select);
        b[0x04..0x08].copy_from_slice(&df.to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&st.driver_feature_select.to_le_bytes());
        let gf = word(st.driver_features, st.driver_feature_select);
        b[0x0c..0x10].copy_from_slice(&gf.to_le_bytes());
        b[0x10..0x12].copy_from_slice(&VIRTIO_MSI_NO_VECTOR.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&self.id.num_queues.to_le_bytes());
        b[0x14] = st.status;
        b[0x15] = st.config_generation;
        b[0x16..0x18].copy_from_slice(&st.queue_select.to_le_bytes());
        if let Some(q) = st.queues.get(usize::from(st.queue_select)) {
            b[0x18..0x1a].copy_from_slice(&q.size().to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&VIRTIO_MSI_NO_VECTOR.to_le_bytes());
            b[0x1c..0x1e].copy_from_slice(&u16::from(q.ready()).to_le_bytes());
            // queue_notify_off: queue n notifies at n × multiplier.
            b[0x1e..0x20].copy_from_slice(&st.queue_select.to_le_bytes());
            b[0x20..0x28].copy_from_slice(&q.desc_table().to_le_bytes());
            b[0x28..0x30].copy_from_slice(&q.avail_ring().to_le_bytes());
            b[0x30..0x38].copy_from_slice(&q.used_ring().to_le_bytes());
        } else {
            // queue_size 0: no such queue.
            b[0x1a..0x1c].copy_from_slice(&VIRTIO_MSI_NO_VECTOR.to_le_bytes());
        }
        b
    }

    /// Reads common configuration bytes (no side effects).
    pub fn common_read(&self, offset: u64, data: &mut [u8]) {
        let image = self.common_image();
        let start = offset as usize;
        data.copy_from_slice(&image[start..start + data.len()]);
    }

    /// Writes common configuration bytes. A write must stay inside one
    /// field; it may cover part of it (Linux writes 64-bit addresses as two
    /// 32-bit halves).
    pub fn common_write(&mut self, offset: u64, data: &[u8]) -> Option<Event> {
        const FIELDS: [(u64, u64); 16] = [
            (0x00, 4),
            (0x04, 4),
            (0x08, 4),
            (0x0c, 4),
            (0x10, 2),
            (0x12, 2),
            (0x14, 1),
            (0x15, 1),
            (0x16, 2),
            (0x18, 2),
            (0x1a, 2),
            (0x1c, 2),
            (0x1e, 2),
            (0x20, 8),
            (0x28, 8),
            (0x30, 8),
        ];
        let end = offset + data.len() as u64;
        let Some(&(start, size)) = FIELDS.iter().find(|&&(s, n)| offset >= s && end <= s + n)
        else {
            self.guest_error(
                "common config write across fields",
                &format_args!(
                    "{}-byte write at common config offset {offset:#x} spans two fields",
                    data.len()
                ),
            );
            return None;
        };
        let image = self.common_image();
        let mut field = [0u8; 8];
        field[..size as usize].copy_from_slice(&image[start as usize..(start + size) as usize]);
        let at = (offset - start) as usize;
        field[at..at + data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(field);
        self.write_field(start, value)
    }

    fn write_field(&mut self, start: u64, value: u64) -> Option<Event> {
        match start {
            0x00 => self.st.device_feature_select = value as u32,
            0x08 => self.st.driver_feature_select = value as u32,
            0x0c => self.write_driver_features(value as u32),
            // MSI-X vectors: there is no MSI-X; they read back NO_VECTOR.
            0x10 | 0x1a => {}
            0x14 => return self.write_status(value as u8),
            0x16 => self.st.queue_select = value as u16,
            0x18 | 0x1c | 0x20 | 0x28 | 0x30 => self.write_queue_field(start, value),
            _ => self.guest_error(
                "write to read-only common config field",
                &format_args!("write to read-only common config field at {start:#x}"),
            ),
        }
        None
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.st.status & STATUS_FEATURES_OK != 0 {
            self.guest_error(
                "feature write after FEATURES_OK",
                &"driver features written after FEATURES_OK was set",
            );
            return;
        }
        let st = &mut self.st;
        match st.driver_feature_select {
            0 => st.driver_features = st.driver_features & !0xffff_ffff | u64::from(value),
            1 => st.driver_features = st.driver_features & 0xffff_ffff | u64::from(value) << 32,
            _ => st.driver_features_beyond_64 |= value != 0,
        }
    }

    fn write_status(&mut self, value: u8) -> Option<Event> {
        if value == 0 {
            self.reset();
            return None;
        }
        let old = self.st.status;
        let mut new = value & STATUS_DRIVER_BITS | old & STATUS_NEEDS_RESET;
        if value & !(STATUS_DRIVER_BITS | STATUS_NEEDS_RESET) != 0 {
            self.guest_error(
                "reserved status bits",
                &format_args!("driver wrote reserved device status bits {value:#04x}"),
            );
        }
        if old & !new & STATUS_DRIVER_BITS != 0 {
            self.guest_error(
                "status bit cleared",
                &format_args!(
                    "driver cleared device status bits {:#04x} without a reset",
                    old & !new
                ),
            );
            new |= old & STATUS_DRIVER_BITS;
        }
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let accepted = self.st.driver_features;
            if accepted & !self.device_features() != 0
                || accepted & VIRTIO_F_VERSION_1 == 0
                || self.st.driver_features_beyond_64
            {
                self.guest_error(
                    "features refused",
                    &format_args!("FEATURES_OK refused: driver accepted {accepted:#x}, device offers {:#x} and requires VERSION_1", self.device_features()),
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        self.st.status = new;
        (new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0).then_some(Event::DriverOk)
    }

    fn write_queue_field(&mut self, start: u64, value: u64) {
        let sel = self.st.queue_select;
        let Some(q) = self.st.queues.get_mut(usize::from(sel)) else {
            self.guest_error(
                "queue_select out of range",
                &format_args!("queue register write with queue_select {sel}, which names no queue"),
            );
            return;
        };
        if start == 0x1c {
            match (value, q.ready()) {
                (1, false) => {
                    if let Err(e) = q.enable() {
                        self.fail(e);
                    }
                }
                (1, true) => {}
                _ => self.guest_error(
                    "queue_enable value",
                    &format_args!("queue {sel}: queue_enable written with {value}"),
                ),
            }
            return;
        }
        if q.ready() {
            self.guest_error(
                "queue reconfigured while enabled",
                &format_args!("queue {sel}: configuration written while the queue is enabled"),
            );
            return;
        }
        match start {
            0x18 => {
                if !q.set_size(value as u16) {
                    self.guest_error(
                        "bad queue size",
                        &format_args!("queue {sel}: size {value} is not a power of two up to 256"),
                    );
                }
            }
            0x20 => q.set_desc_table(value),
            0x28 => q.set_avail_ring(value),
            _ => q.set_used_ring(value),
        }
    }

    /// PCI configuration dword `reg` (the PCI_CFG data window excepted).
    pub fn config_read(&self, reg: usize) -> u32 {
        let v = self.st.pci.read(reg);
        if reg == 1 && self.st.isr != 0 {
            v | PCI_STATUS_INTERRUPT
        } else {
            v
        }
    }

    /// Writes PCI configuration through the write masks.
    pub fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]) {
        self.st.pci.write(reg, offset, data);
    }

    /// The dword index of the PCI_CFG capability's data window.
    pub fn window_data_reg(&self) -> usize {
        self.pci_cfg_cap / 4 + 4
    }

    /// The BAR0 access the PCI_CFG window describes: `(offset, length)`,
    /// or `None` if the driver programmed it in a way the spec forbids
    /// (another BAR, a length other than 1, 2, 4, an unaligned offset, or
    /// one past the BAR).
    pub fn window(&self) -> Option<(u64, usize)> {
        let dword = |n: usize| self.st.pci.read(self.pci_cfg_cap / 4 + n);
        let bar = dword(1) & 0xff;
        let offset = u64::from(dword(2));
        let len = u64::from(dword(3));
        let ok =
            bar == 0 && matches!(len, 1 | 2 | 4) && offset % len == 0 && offset + len <= BAR0_SIZE;
        ok.then_some((offset, len as usize))
    }

    /// The PCI_CFG data latch.
    pub fn window_data(&mut self) -> &mut [u8; 4] {
        &mut self.st.pci_cfg_data
    }

    /// Records a notification that arrived through the PCI_CFG window,
    /// where no guest memory is at hand.
    pub fn defer_notify(&mut self, queue: u16) {
        self.st.pending_notify |= 1 << queue;
    }

    /// Takes the deferred notifications (bit n = queue n).
    pub fn take_pending_notify(&mut self) -> u16 {
        std::mem::take(&mut self.st.pending_notify)
    }

    /// Notifications waiting for guest memory.
    pub fn has_pending_notify(&self) -> bool {
        self.st.pending_notify != 0
    }

    /// Snapshot of the transport state.
    pub fn save(&self) -> TransportState {
        self.st.clone()
    }

    /// Checks a saved transport state against this device's layout.
    pub fn check(&self, state: &TransportState) -> Result<(), StateError> {
        let name = self.id.name;
        // Rebuild the configuration space from this device's layout and the
        // saved guest-writable bits: any other difference is a state from
        // a different device.
        let mut rebuilt = self.st.pci.clone();
        for reg in 0..64 {
            rebuilt.write(reg, 0, &state.pci.read(reg).to_le_bytes());
        }
        ensure(
            rebuilt == state.pci,
            name,
            "PCI configuration does not match this device",
        )?;
        ensure(
            state.status & !(STATUS_DRIVER_BITS | STATUS_NEEDS_RESET) == 0,
            name,
            "reserved device status bits set",
        )?;
        if state.status & STATUS_FEATURES_OK != 0 {
            ensure(
                state.driver_features & !self.device_features() == 0
                    && state.driver_features & VIRTIO_F_VERSION_1 != 0
                    && !state.driver_features_beyond_64,
                name,
                "FEATURES_OK with features the device does not offer",
            )?;
        }
        ensure(
            state.isr & !(ISR_QUEUE | ISR_CONFIG) == 0,
            name,
            "reserved ISR bits set",
        )?;
        ensure(
            state.queues.len() == self.st.queues.len(),
            name,
            "wrong number of queues",
        )?;
        for q in &state.queues {
            q.check().map_err(|reason| StateError::Invalid {
                device: name,
                reason,
            })?;
        }
        ensure(
            u32::from(state.pending_notify) >> self.id.num_queues == 0,
            name,
            "pending notification for a queue that does not exist",
        )?;
        Ok(())
    }

    /// Replaces the state with one [`check`](Self::check) accepted.
    pub fn restore_checked(&mut self, state: &TransportState) {
        self.st = state.clone();
    }
}

/// Builds the configuration space; returns it and the PCI_CFG
/// capability's offset.
fn build_pci(id: &Identity, bar0: u64, irq_line: u8) -> (PciConfigSpace, usize) {
    let mut pci = PciConfigSpace::new(
        VIRTIO_PCI_VENDOR,
        VIRTIO_PCI_MODERN_DEVICE_BASE + id.virtio_id,
        id.class.0,
        id.class.1,
        0,
        1,
        0,
    );
    pci.set_subsystem(VIRTIO_PCI_VENDOR, VIRTIO_PCI_SUBSYSTEM_ID);
    pci.set_interrupt(1, irq_line);
    let mem = BarKind::Mem32 {
        prefetchable: false,
    };
    // BAR0_SIZE is a valid BAR size and index 0 exists: cannot fail.
    let _ = pci.set_bar(0, mem, BAR0_SIZE);
    if bar0 % BAR0_SIZE != 0 || bar0 > u64::from(u32::MAX) {
        tracing::warn!(
            bar0,
            "virtio BAR0 address is not a 32-bit, size-aligned address"
        );
    }
    pci.write(4, 0, &(bar0 as u32).to_le_bytes());
    // struct virtio_pci_cap after cap_vndr and cap_next: cap_len, cfg_type,
    // bar, id, padding[2], offset, length (+ a trailing dword for the
    // notify and pci_cfg capabilities).
    let cap = |cfg_type: u8, offset: u64, length: u64, extra: Option<u32>| {
        let mut body = vec![if extra.is_some() { 20 } else { 16 }, cfg_type, 0, 0, 0, 0];
        body.extend_from_slice(&(offset as u32).to_le_bytes());
        body.extend_from_slice(&(length as u32).to_le_bytes());
        if let Some(x) = extra {
            body.extend_from_slice(&x.to_le_bytes());
        }
        body
    };
    let notify_len = u64::from(id.num_queues) * u64::from(NOTIFY_OFF_MULTIPLIER);
    let caps = [
        cap(CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LEN, None),
        cap(
            CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            notify_len,
            Some(NOTIFY_OFF_MULTIPLIER),
        ),
        cap(CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, None),
        cap(
            CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            u64::from(id.device_cfg_len),
            None,
        ),
        // The driver programs bar, offset and length, then uses the data.
        cap(CAP_PCI_CFG, 0, 0, Some(0)),
    ];
    let mut pci_cfg_cap = 0;
    for body in &caps {
        // Five capabilities of at most 20 bytes fit in 192 bytes.
        pci_cfg_cap = usize::from(pci.add_capability(PCI_CAP_ID_VNDR, body).unwrap_or(0));
    }
    let reg = pci_cfg_cap / 4;
    pci.set_writable(reg + 1, 0x0000_00ff);
    pci.set_writable(reg + 2, 0xffff_ffff);
    pci.set_writable(reg + 3, 0xffff_ffff);
    (pci, pci_cfg_cap)
}
