//! PCI configuration mechanism #1 (address register 0xCF8, data window
//! 0xCFC–0xCFF) for bus 0, with a host bridge in slot 0 and room for
//! virtio-pci devices. Only function 0 of each slot exists.
//!
//! [`PciConfigSpace`] is the reusable 256-byte type-0 header devices build
//! on: read-only identification, writable command/latency/interrupt-line
//! bits, BARs with the standard sizing protocol (write all ones, read back
//! the size mask) and a capability list.

use serde::{Deserialize, Serialize};

use super::{check_version, ensure, StateError};

/// Version of [`PciRootState`] this build writes.
const PCI_STATE_VERSION: u32 = 1;

/// Slots on bus 0.
pub const PCI_SLOTS: usize = 32;

/// Dwords in a type-0 configuration header plus device-specific space.
const CONFIG_DWORDS: usize = 64;

/// Config-space register offsets (bytes).
const REG_COMMAND: usize = 0x04;
const REG_BAR0: usize = 0x10;
const REG_CAP_PTR: usize = 0x34;
const REG_INTERRUPT: usize = 0x3c;

/// Status register bit: a capability list exists.
const STATUS_CAP_LIST: u32 = 0x0010 << 16;

/// Command register bits a device may implement: I/O, memory, bus master,
/// parity error response, SERR, interrupt disable.
const COMMAND_WRITABLE: u32 = 0x0547;

/// Where the first capability goes.
const CAP_START: usize = 0x40;

/// PCI errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// every slot on bus 0 is taken
    #[error("no free PCI slot on bus 0")]
    NoFreeSlot,
    /// the requested slot is already taken
    #[error("PCI slot {0} is already in use")]
    SlotInUse(u8),
    /// the requested slot does not exist on bus 0
    #[error("PCI slot {0} does not exist")]
    InvalidSlot(u8),
    /// a BAR index, size or layout is not valid
    #[error("invalid BAR {0}")]
    InvalidBar(usize),
    /// the capability does not fit in configuration space
    #[error("capability does not fit in configuration space")]
    CapabilitySpace,
}

/// A device's configuration space as the bus sees it. `reg` is a dword
/// index (byte offset / 4); `offset` is the byte within that dword and
/// `data` is 1, 2 or 4 bytes not crossing the dword.
pub trait PciDevice: Send {
    /// Reads configuration dword `reg`.
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` of configuration dword `reg`.
    fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]);
}

/// What a base address register decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// I/O space, `size` bytes (power of two, at least 4).
    Io,
    /// 32-bit memory space (power of two, at least 16).
    Mem32 {
        /// Marked prefetchable.
        prefetchable: bool,
    },
    /// 64-bit memory space over two BAR slots.
    Mem64 {
        /// Marked prefetchable.
        prefetchable: bool,
    },
}

/// A 256-byte PCI type-0 configuration space with write masks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigSpace {
    /// The registers, 64 dwords.
    regs: Vec<u32>,
    /// Bits the guest may change in each dword.
    wmask: Vec<u32>,
    /// Next free byte for a capability (0 = none added yet).
    next_cap: usize,
    /// Offset of the last capability's "next" pointer.
    last_cap_next: usize,
}

impl PciConfigSpace {
    /// A header with the given identity: vendor, device, class code
    /// (class, subclass, programming interface), revision and header type.
    pub fn new(
        vendor: u16,
        device: u16,
        class: u8,
        subclass: u8,
        prog_if: u8,
        revision: u8,
        header_type: u8,
    ) -> Self {
        let mut regs = vec![0u32; CONFIG_DWORDS];
        let mut wmask = vec![0u32; CONFIG_DWORDS];
        regs[0] = u32::from(device) << 16 | u32::from(vendor);
        regs[2] = u32::from(class) << 24
            | u32::from(subclass) << 16
            | u32::from(prog_if) << 8
            | u32::from(revision);
        regs[3] = u32::from(header_type) << 16;
        wmask[REG_COMMAND / 4] = COMMAND_WRITABLE;
        // Cache line size and latency timer.
        wmask[0x0c / 4] = 0x0000_ffff;
        // Interrupt line (the pin is read-only).
        wmask[REG_INTERRUPT / 4] = 0x0000_00ff;
        Self {
            regs,
            wmask,
            next_cap: CAP_START,
            last_cap_next: REG_CAP_PTR,
        }
    }

    /// Sets subsystem vendor and subsystem ID (read-only to the guest).
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.regs[0x2c / 4] = u32::from(id) << 16 | u32::from(vendor);
    }

    /// Sets the interrupt pin (1 = INTA#) and the initial interrupt line.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        let r = &mut self.regs[REG_INTERRUPT / 4];
        *r = (*r & !0xffff) | u32::from(pin) << 8 | u32::from(line);
    }

    /// Declares BAR `index` (0..=5) of `size` bytes. A 64-bit BAR also uses
    /// `index + 1`. Sizes must be powers of two (≥ 4 for I/O, ≥ 16 for
    /// memory).
    pub fn set_bar(&mut self, index: usize, kind: BarKind, size: u64) -> Result<(), PciError> {
        let wide = matches!(kind, BarKind::Mem64 { .. });
        let last = if wide { index + 1 } else { index };
        let min = if kind == BarKind::Io { 4 } else { 16 };
        let max = if wide { 1 << 63 } else { 1 << 31 };
        if last > 5 || !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::InvalidBar(index));
        }
        let mask = !(size - 1);
        let (flags, low_mask) = match kind {
            BarKind::Io => (0x1, 0xffff_fffc),
            BarKind::Mem32 { prefetchable } => (u32::from(prefetchable) << 3, 0xffff_fff0),
            BarKind::Mem64 { prefetchable } => (0x4 | u32::from(prefetchable) << 3, 0xffff_fff0),
        };
        let r = REG_BAR0 / 4 + index;
        self.regs[r] = flags;
        self.wmask[r] = (mask as u32) & low_mask;
        if wide {
            self.regs[r + 1] = 0;
            self.wmask[r + 1] = (mask >> 32) as u32;
        }
        Ok(())
    }

    /// The address BAR `index` is programmed with (without flag bits).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let r = REG_BAR0 / 4 + index;
        let low = *self.regs.get(r).filter(|_| index <= 5)?;
        if self.wmask[r] == 0 {
            return None;
        }
        if low & 1 == 1 {
            return Some(u64::from(low & !0x3));
        }
        let high = if low & 0x6 == 0x4 && index < 5 {
            u64::from(self.regs[r + 1]) << 32
        } else {
            0
        };
        Some(high | u64::from(low & !0xf))
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[REG_COMMAND / 4] as u16
    }

    /// Appends a capability with ID `id` and `body` (the bytes after the ID
    /// and next-pointer). Returns its offset in configuration space.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u8, PciError> {
        let offset = self.next_cap;
        let len = 2 + body.len();
        if offset + len > CONFIG_DWORDS * 4 {
            return Err(PciError::CapabilitySpace);
        }
        self.set_byte(offset, id);
        self.set_byte(offset + 1, 0);
        for (i, &b) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i, b);
        }
        self.set_byte(self.last_cap_next, offset as u8);
        self.last_cap_next = offset + 1;
        self.next_cap = (offset + len).next_multiple_of(4);
        self.regs[REG_COMMAND / 4] |= STATUS_CAP_LIST;
        Ok(offset as u8)
    }

    /// Makes `mask` bits of dword `reg` writable by the guest (e.g. a
    /// capability's guest-written fields).
    pub fn set_writable(&mut self, reg: usize, mask: u32) {
        if let Some(w) = self.wmask.get_mut(reg) {
            *w = mask;
        }
    }

    fn set_byte(&mut self, offset: usize, val: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.regs[offset / 4];
        *r = (*r & !(0xff << shift)) | u32::from(val) << shift;
    }

    /// Reads dword `reg`; out of range reads 0.
    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Writes `data` at byte `offset` of dword `reg` through the write mask.
    pub fn write(&mut self, reg: usize, offset: u8, data: &[u8]) {
        let offset = usize::from(offset);
        if reg >= CONFIG_DWORDS || offset + data.len() > 4 {
            return;
        }
        let mut val = 0u32;
        let mut mask = 0u32;
        for (i, &b) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            val |= u32::from(b) << shift;
            mask |= 0xff << shift;
        }
        let w = self.wmask[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !w) | (val & w);
    }
}

impl PciDevice for PciConfigSpace {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.read(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]) {
        self.write(reg, offset, data);
    }
}

/// The i440FX-style host bridge in slot 0.
fn host_bridge() -> PciConfigSpace {
    PciConfigSpace::new(0x8086, 0x1237, 0x06, 0x00, 0x00, 0x02, 0x00)
}

/// Serialisable state of the root: the address register and the host
/// bridge. Added devices save their own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    /// Format version, [`PCI_STATE_VERSION`].
    pub version: u32,
    /// The 0xCF8 address register.
    pub config_address: u32,
    /// The host bridge's configuration space.
    pub host_bridge: PciConfigSpace,
}

/// Bus 0 behind configuration mechanism #1.
pub struct PciRoot {
    config_address: u32,
    host_bridge: PciConfigSpace,
    /// Slots 1..32; index 0 is unused (the host bridge).
    slots: Vec<Option<Box<dyn PciDevice>>>,
    /// Guest accesses the model ignored (odd-sized address-register
    /// accesses, accesses beyond the window).
    pub unsupported_accesses: u64,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (1..PCI_SLOTS)
            .filter(|&s| self.slots[s].is_some())
            .collect();
        f.debug_struct("PciRoot")
            .field("config_address", &self.config_address)
            .field("used_slots", &used)
            .finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// Bus 0 with only the host bridge.
    pub fn new() -> Self {
        Self {
            config_address: 0,
            host_bridge: host_bridge(),
            slots: (0..PCI_SLOTS).map(|_| None).collect(),
            unsupported_accesses: 0,
        }
    }

    /// Plugs `dev` into the lowest free slot and returns the slot number.
    pub fn add_device(&mut self, dev: Box<dyn PciDevice>) -> Result<u8, PciError> {
        let slot = (1..PCI_SLOTS)
            .find(|&s| self.slots[s].is_none())
            .ok_or(PciError::NoFreeSlot)?;
        self.slots[slot] = Some(dev);
        Ok(slot as u8)
    }

    /// Plugs `dev` into slot `slot` (1..=31).
    pub fn add_device_at(&mut self, slot: u8, dev: Box<dyn PciDevice>) -> Result<(), PciError> {
        let s = usize::from(slot);
        if s == 0 || s >= PCI_SLOTS {
            return Err(PciError::InvalidSlot(slot));
        }
        if self.slots[s].is_some() {
            return Err(PciError::SlotInUse(slot));
        }
        self.slots[s] = Some(dev);
        Ok(())
    }

    /// The device in `slot`, for the owner to reach its state.
    pub fn device_mut(&mut self, slot: u8) -> Option<&mut (dyn PciDevice + 'static)> {
        self.slots.get_mut(usize::from(slot))?.as_deref_mut()
    }

    /// The device the address register selects, with the dword index, if
    /// config access is enabled and the target exists. `external` is a
    /// device the caller owns (the platform keeps its NIC itself, to reach
    /// its registers and state), plugged into the given slot.
    fn target<'s: 'r, 'o: 'r, 'r>(
        &'s mut self,
        external: Option<(u8, &'r mut (dyn PciDevice + 'o))>,
    ) -> Option<(&'r mut (dyn PciDevice + 'r), usize)> {
        let a = self.config_address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let slot = ((a >> 11) & 0x1f) as usize;
        let func = (a >> 8) & 0x7;
        let reg = ((a >> 2) & 0x3f) as usize;
        if !enabled || bus != 0 || func != 0 {
            return None;
        }
        if slot == 0 {
            return Some((&mut self.host_bridge, reg));
        }
        if let Some((ext_slot, dev)) = external {
            if usize::from(ext_slot) == slot {
                return Some((dev, reg));
            }
        }
        let dev = self.slots[slot].as_deref_mut()?;
        Some((dev, reg))
    }

    /// Port read in 0xCF8..=0xCFF of `data.len()` bytes (1, 2 or 4).
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.pio_read_with(port, data, None)
    }

    /// Port write in 0xCF8..=0xCFF of `data.len()` bytes (1, 2 or 4).
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.pio_write_with(port, data, None)
    }

    /// [`PciRoot::pio_read`] with a caller-owned device in a slot.
    pub fn pio_read_with(
        &mut self,
        port: u16,
        data: &mut [u8],
        external: Option<(u8, &mut dyn PciDevice)>,
    ) {
        data.fill(0xff);
        match port {
            0xcf8 if data.len() == 4 => data.copy_from_slice(&self.config_address.to_le_bytes()),
            0xcfc..=0xcff => {
                let offset = usize::from(port - 0xcfc);
                if offset + data.len() > 4 {
                    self.unsupported_accesses += 1;
                    return;
                }
                if let Some((dev, reg)) = self.target(external) {
                    let v = dev.config_read(reg).to_le_bytes();
                    data.copy_from_slice(&v[offset..offset + data.len()]);
                }
            }
            // Byte/word accesses to 0xCF8–0xCFB are not the address
            // register on a PC chipset (Linux's type-1 probe relies on it).
            _ => {}
        }
    }

    /// [`PciRoot::pio_write`] with a caller-owned device in a slot.
    pub fn pio_write_with(
        &mut self,
        port: u16,
        data: &[u8],
        external: Option<(u8, &mut dyn PciDevice)>,
    ) {
        match port {
            0xcf8 if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                // Reserved bits 30:24 and 1:0 read as zero.
                self.config_address = v & 0x80ff_fffc;
            }
            0xcfc..=0xcff => {
                let offset = usize::from(port - 0xcfc);
                if offset + data.len() > 4 || data.is_empty() {
                    self.unsupported_accesses += 1;
                    return;
                }
                if let Some((dev, reg)) = self.target(external) {
                    dev.config_write(reg, offset as u8, data);
                }
            }
            _ => {}
        }
    }

    /// Snapshot of the root's own state (not the added devices').
    pub fn save(&self) -> PciRootState {
        PciRootState {
            version: PCI_STATE_VERSION,
            config_address: self.config_address,
            host_bridge: self.host_bridge.clone(),
        }
    }

    /// Replaces the root's own state with a snapshot from [`PciRoot::save`].
    pub fn restore(&mut self, state: &PciRootState) -> Result<(), StateError> {
        check_version("pci", state.version, PCI_STATE_VERSION)?;
        let hb = &state.host_bridge;
        ensure(
            hb.regs.len() == CONFIG_DWORDS && hb.wmask.len() == CONFIG_DWORDS,
            "pci",
            "host bridge config space is not 256 bytes",
        )?;
        ensure(
            hb.next_cap <= CONFIG_DWORDS * 4 && hb.last_cap_next < CONFIG_DWORDS * 4,
            "pci",
            "capability pointers out of range",
        )?;
        self.config_address = state.config_address & 0x80ff_fffc;
        self.host_bridge = hb.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(slot: u32, reg: u32) -> [u8; 4] {
        (0x8000_0000 | slot << 11 | reg).to_le_bytes()
    }

    fn read32(root: &mut PciRoot, slot: u32, reg: u32) -> u32 {
        root.pio_write(0xcf8, &addr(slot, reg));
        let mut d = [0; 4];
        root.pio_read(0xcfc, &mut d);
        u32::from_le_bytes(d)
    }

    fn write32(root: &mut PciRoot, slot: u32, reg: u32, v: u32) {
        root.pio_write(0xcf8, &addr(slot, reg));
        root.pio_write(0xcfc, &v.to_le_bytes());
    }

    fn virtio_like() -> PciConfigSpace {
        let mut c = PciConfigSpace::new(0x1af4, 0x1041, 0x02, 0x00, 0x00, 0x01, 0x00);
        c.set_subsystem(0x1af4, 0x0001);
        c.set_interrupt(1, 10);
        c.set_bar(0, BarKind::Io, 0x40).unwrap();
        c.set_bar(
            1,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        c.set_bar(4, BarKind::Mem64 { prefetchable: true }, 0x4000)
            .unwrap();
        c
    }

    /// Linux's pci_check_type1().
    #[test]
    fn linux_type1_probe() {
        let mut root = PciRoot::new();
        root.pio_write(0xcfb, &[0x01]);
        let mut d = [0; 4];
        root.pio_read(0xcf8, &mut d);
        let saved = u32::from_le_bytes(d);
        root.pio_write(0xcf8, &0x8000_0000u32.to_le_bytes());
        root.pio_read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        root.pio_write(0xcf8, &saved.to_le_bytes());
        // Linux's pci_sanity_check: the host bridge's class.
        assert_eq!(read32(&mut root, 0, 0x08) >> 16, 0x0600);
        assert_eq!(read32(&mut root, 0, 0x00), 0x1237_8086);
    }

    #[test]
    fn empty_slots_functions_and_disabled_access_read_ones() {
        let mut root = PciRoot::new();
        assert_eq!(read32(&mut root, 3, 0), 0xffff_ffff);
        root.pio_write(0xcf8, &(0x8000_0000u32 | 1 << 8).to_le_bytes());
        let mut d = [0; 4];
        root.pio_read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4], "function 1 of the host bridge");
        root.pio_write(0xcf8, &0u32.to_le_bytes());
        root.pio_read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4], "enable bit clear");
        root.pio_write(0xcf8, &(0x8001_0000u32).to_le_bytes());
        root.pio_read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4], "bus 1");
    }

    #[test]
    fn sub_dword_accesses() {
        let mut root = PciRoot::new();
        root.pio_write(0xcf8, &addr(0, 0));
        let mut w = [0; 2];
        root.pio_read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1237);
        let mut b = [0; 1];
        root.pio_read(0xcfd, &mut b);
        assert_eq!(b[0], 0x80);
        // Command register: byte write at offset 0 of dword 1.
        root.pio_write(0xcf8, &addr(0, 0x04));
        root.pio_write(0xcfc, &[0x07]);
        assert_eq!(read32(&mut root, 0, 0x04) & 0xffff, 0x0007);
        // Interrupt line is writable, vendor ID is not.
        write32(&mut root, 0, 0x3c, 0xffff_ffff);
        assert_eq!(read32(&mut root, 0, 0x3c), 0x0000_00ff);
        write32(&mut root, 0, 0x00, 0);
        assert_eq!(read32(&mut root, 0, 0x00), 0x1237_8086);
    }

    #[test]
    fn bar_sizing_like_linux() {
        let mut root = PciRoot::new();
        let slot = root.add_device(Box::new(virtio_like())).unwrap();
        assert_eq!(slot, 1);
        let s = u32::from(slot);
        assert_eq!(read32(&mut root, s, 0x00), 0x1041_1af4);
        assert_eq!(read32(&mut root, s, 0x2c), 0x0001_1af4);
        assert_eq!(read32(&mut root, s, 0x3c), 0x0000_010a);
        // __pci_read_base: save, write ~0, read mask, restore.
        let sizes: Vec<u32> = [0x10, 0x14, 0x20, 0x24]
            .iter()
            .map(|&r| {
                let orig = read32(&mut root, s, r);
                write32(&mut root, s, r, 0xffff_ffff);
                let m = read32(&mut root, s, r);
                write32(&mut root, s, r, orig);
                m
            })
            .collect();
        assert_eq!(sizes, [0xffff_ffc1, 0xffff_f000, 0xffff_c00c, 0xffff_ffff]);
        write32(&mut root, s, 0x10, 0xc041);
        write32(&mut root, s, 0x14, 0xfebf_1234);
        write32(&mut root, s, 0x20, 0x1000_0000);
        write32(&mut root, s, 0x24, 0x0000_0001);
        assert_eq!(read32(&mut root, s, 0x10), 0xc041);
        assert_eq!(read32(&mut root, s, 0x14), 0xfebf_1000);
        let mut cfg = virtio_like();
        for (r, v) in [(4, 0xc041u32), (8, 0x1000_0000), (9, 1)] {
            cfg.write(r, 0, &v.to_le_bytes());
        }
        assert_eq!(cfg.bar_address(0), Some(0xc040));
        assert_eq!(cfg.bar_address(4), Some(0x1_1000_0000));
        assert_eq!(cfg.bar_address(2), None);
    }

    #[test]
    fn capability_list() {
        let mut cfg = virtio_like();
        let first = cfg
            .add_capability(0x09, &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        let second = cfg.add_capability(0x09, &[14, 2]).unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x50);
        assert_ne!(cfg.read(1) & STATUS_CAP_LIST, 0);
        assert_eq!(cfg.read(REG_CAP_PTR / 4) & 0xff, 0x40);
        assert_eq!(cfg.read(0x40 / 4) & 0xffff, 0x5009);
        assert_eq!(cfg.read(0x50 / 4), 0x020e_0009);
        assert_eq!(
            cfg.add_capability(0x09, &[0; 200]),
            Err(PciError::CapabilitySpace)
        );
    }

    #[test]
    fn slots_fill_and_errors() {
        let mut root = PciRoot::new();
        assert_eq!(
            root.add_device_at(0, Box::new(virtio_like())),
            Err(PciError::InvalidSlot(0))
        );
        root.add_device_at(2, Box::new(virtio_like())).unwrap();
        assert_eq!(
            root.add_device_at(2, Box::new(virtio_like())),
            Err(PciError::SlotInUse(2))
        );
        for expected in (1..32).filter(|&s| s != 2) {
            assert_eq!(root.add_device(Box::new(virtio_like())), Ok(expected));
        }
        assert_eq!(
            root.add_device(Box::new(virtio_like())),
            Err(PciError::NoFreeSlot)
        );
        assert!(root.device_mut(5).is_some());
        assert_eq!(
            PciConfigSpace::new(0, 0, 0, 0, 0, 0, 0).set_bar(
                5,
                BarKind::Mem64 {
                    prefetchable: false
                },
                16
            ),
            Err(PciError::InvalidBar(5))
        );
    }

    #[test]
    fn save_restore_round_trip() {
        let mut root = PciRoot::new();
        write32(&mut root, 0, 0x04, 0x0006);
        root.pio_write(0xcf8, &addr(0, 0x08));
        let state = root.save();
        let mut other = PciRoot::new();
        other.restore(&state).unwrap();
        let mut d = [0; 4];
        other.pio_read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 16, 0x0600);
        assert_eq!(read32(&mut other, 0, 0x04) & 0xffff, 0x0006);
    }
}
