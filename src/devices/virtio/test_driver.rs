//! A minimal virtio-net driver for tests: it finds the virtio structures
//! through the PCI capabilities and programs the device only through PCI
//! configuration and BAR0 accesses, in the order Linux's virtio-pci and
//! virtio_net do, on a [`VecRam`].

use super::super::pci::PciDevice;
use super::net::{NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use super::queue::{DESC_F_NEXT, DESC_F_WRITE};
use super::transport::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use super::{GuestRam, VecRam, VirtioNet, VirtioNetConfig};

pub const RAM_SIZE: usize = 0x20_0000;
pub const BAR0: u64 = 0xfebf_0000;
pub const IRQ_LINE: u8 = 11;
pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Size of each buffer the driver posts or transmits from.
pub const BUF_SIZE: u64 = 0x800;

/// Where a queue's rings and buffers live in the test RAM.
#[derive(Clone, Copy, Debug)]
pub struct QueueLayout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub buffers: u64,
}

pub const RX_LAYOUT: QueueLayout = QueueLayout {
    desc: 0x1000,
    avail: 0x2000,
    used: 0x3000,
    buffers: 0x1_0000,
};
pub const TX_LAYOUT: QueueLayout = QueueLayout {
    desc: 0x4000,
    avail: 0x5000,
    used: 0x6000,
    buffers: 0x9_0000,
};

/// The driver's view of one queue.
#[derive(Clone, Debug)]
pub struct DriverQueue {
    pub size: u16,
    pub layout: QueueLayout,
    /// Next avail index the driver publishes.
    pub avail_idx: u16,
    /// Used entries already consumed by the driver.
    pub used_seen: u16,
}

/// Locations found in the capabilities: (bar, offset, length).
#[derive(Clone, Copy, Debug, Default)]
pub struct Caps {
    pub common: (u8, u32, u32),
    pub notify: (u8, u32, u32),
    pub notify_mult: u32,
    pub isr: (u8, u32, u32),
    pub device: (u8, u32, u32),
    /// Config-space offset of the PCI_CFG capability.
    pub pci_cfg: usize,
}

pub struct Driver {
    pub dev: VirtioNet,
    pub ram: VecRam,
    pub caps: Caps,
    pub rx: DriverQueue,
    pub tx: DriverQueue,
}

pub fn config() -> VirtioNetConfig {
    VirtioNetConfig {
        mac: MAC,
        bar0: BAR0,
        irq_line: IRQ_LINE,
    }
}

impl Driver {
    /// A fresh device, probed and with memory decoding enabled.
    pub fn new() -> Self {
        let mut d = Self {
            dev: VirtioNet::new(config()),
            ram: VecRam::new(RAM_SIZE),
            caps: Caps::default(),
            rx: DriverQueue::new(RX_LAYOUT),
            tx: DriverQueue::new(TX_LAYOUT),
        };
        d.probe();
        d
    }

    /// A device initialised with queues of `size` and the offered features.
    pub fn ready(size: u16) -> Self {
        let mut d = Self::new();
        assert!(d.init(VIRTIO_F_VERSION_1 | 1 << 5 | 1 << 16, size));
        d
    }

    pub fn cfg_read32(&mut self, offset: usize) -> u32 {
        self.dev.config_read(offset / 4)
    }

    pub fn cfg_read8(&mut self, offset: usize) -> u8 {
        (self.dev.config_read(offset / 4) >> (8 * (offset % 4))) as u8
    }

    pub fn cfg_write32(&mut self, offset: usize, v: u32) {
        self.dev.config_write(offset / 4, 0, &v.to_le_bytes());
    }

    pub fn cfg_write8(&mut self, offset: usize, v: u8) {
        self.dev.config_write(offset / 4, (offset % 4) as u8, &[v]);
    }

    /// virtio_pci_find_capability() for every type, then pci_enable_device
    /// and pci_set_master.
    fn probe(&mut self) {
        let mut pos = usize::from(self.cfg_read8(0x34));
        let mut seen = 0;
        while pos != 0 && seen < 48 {
            seen += 1;
            if self.cfg_read8(pos) == 0x09 {
                let cfg_type = self.cfg_read8(pos + 3);
                let loc = (
                    self.cfg_read8(pos + 4),
                    self.cfg_read32(pos + 8),
                    self.cfg_read32(pos + 12),
                );
                match cfg_type {
                    1 => self.caps.common = loc,
                    2 => {
                        self.caps.notify = loc;
                        self.caps.notify_mult = self.cfg_read32(pos + 16);
                    }
                    3 => self.caps.isr = loc,
                    4 => self.caps.device = loc,
                    5 => self.caps.pci_cfg = pos,
                    _ => {}
                }
            }
            pos = usize::from(self.cfg_read8(pos + 1));
        }
        let cmd = self.cfg_read32(0x04);
        self.cfg_write32(0x04, cmd | 0x6);
    }

    pub fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.mmio_read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    pub fn write(&mut self, offset: u64, len: usize, v: u64) {
        self.dev
            .mmio_write(offset, &v.to_le_bytes()[..len], &mut self.ram);
    }

    pub fn common_read(&mut self, field: u64, len: usize) -> u64 {
        self.read(u64::from(self.caps.common.1) + field, len)
    }

    pub fn common_write(&mut self, field: u64, len: usize, v: u64) {
        self.write(u64::from(self.caps.common.1) + field, len, v);
    }

    pub fn status(&mut self) -> u8 {
        self.common_read(0x14, 1) as u8
    }

    pub fn set_status(&mut self, s: u8) {
        self.common_write(0x14, 1, u64::from(s));
    }

    pub fn read_isr(&mut self) -> u8 {
        self.read(u64::from(self.caps.isr.1), 1) as u8
    }

    pub fn device_features(&mut self) -> u64 {
        self.common_write(0x00, 4, 0);
        let lo = self.common_read(0x04, 4);
        self.common_write(0x00, 4, 1);
        lo | self.common_read(0x04, 4) << 32
    }

    /// The Linux init sequence; returns whether FEATURES_OK stuck.
    pub fn init(&mut self, features: u64, size: u16) -> bool {
        self.set_status(0);
        assert_eq!(self.status(), 0, "reset completes at once");
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Linux reads the offer first; the caller chose `features` (possibly
        // more than offered, to test refusal).
        let offered = self.device_features();
        assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
        let accepted = features;
        self.common_write(0x08, 4, 0);
        self.common_write(0x0c, 4, accepted & 0xffff_ffff);
        self.common_write(0x08, 4, 1);
        self.common_write(0x0c, 4, accepted >> 32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(s);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return false;
        }
        assert_eq!(self.common_read(0x12, 2), 2, "num_queues");
        for q in [RX_QUEUE, TX_QUEUE] {
            self.setup_queue(q, size);
        }
        self.set_status(s | STATUS_DRIVER_OK);
        true
    }

    fn setup_queue(&mut self, q: u16, size: u16) {
        self.common_write(0x16, 2, u64::from(q));
        assert_eq!(self.common_read(0x18, 2), 256, "max queue size");
        assert_eq!(self.common_read(0x1c, 2), 0, "queue not yet enabled");
        self.common_write(0x18, 2, u64::from(size));
        let layout = self.queue(q).layout;
        for (field, addr) in [
            (0x20, layout.desc),
            (0x28, layout.avail),
            (0x30, layout.used),
        ] {
            self.common_write(field, 4, addr & 0xffff_ffff);
            self.common_write(field + 4, 4, addr >> 32);
        }
        assert_eq!(self.common_read(0x1e, 2), u64::from(q), "queue_notify_off");
        self.common_write(0x1c, 2, 1);
        let dq = self.queue_mut(q);
        dq.size = size;
        dq.avail_idx = 0;
        dq.used_seen = 0;
    }

    pub fn queue(&self, q: u16) -> &DriverQueue {
        if q == RX_QUEUE {
            &self.rx
        } else {
            &self.tx
        }
    }

    pub fn queue_mut(&mut self, q: u16) -> &mut DriverQueue {
        if q == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        }
    }

    pub fn notify(&mut self, q: u16) {
        let off = u64::from(self.caps.notify.1) + u64::from(q) * u64::from(self.caps.notify_mult);
        self.write(off, 2, u64::from(q));
    }

    pub fn put_desc(&mut self, q: u16, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = self.queue(q).layout.desc + 16 * u64::from(i);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.ram.write(base, &d).unwrap();
    }

    /// Makes the chain at `head` available (without notifying).
    pub fn publish(&mut self, q: u16, head: u16) {
        let dq = self.queue(q).clone();
        let slot = u64::from(dq.avail_idx % dq.size);
        self.ram
            .write(dq.layout.avail + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        let idx = dq.avail_idx.wrapping_add(1);
        self.ram
            .write(dq.layout.avail + 2, &idx.to_le_bytes())
            .unwrap();
        self.queue_mut(q).avail_idx = idx;
    }

    /// Sets the avail ring's flags (VIRTQ_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&mut self, q: u16, flags: u16) {
        let avail = self.queue(q).layout.avail;
        self.ram.write(avail, &flags.to_le_bytes()).unwrap();
    }

    /// Posts `n` receive buffers of BUF_SIZE, one descriptor each, using
    /// descriptor i for avail slot i, then notifies.
    pub fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.rx.avail_idx % self.rx.size;
            let addr = RX_LAYOUT.buffers + u64::from(i) * BUF_SIZE;
            self.put_desc(RX_QUEUE, i, addr, BUF_SIZE as u32, DESC_F_WRITE, 0);
            self.publish(RX_QUEUE, i);
        }
        self.notify(RX_QUEUE);
    }

    /// Queues `frame` for transmission as Linux does without offloads: the
    /// header in one descriptor, the frame in the next.
    pub fn queue_tx(&mut self, frame: &[u8]) {
        assert!(frame.len() as u64 <= BUF_SIZE);
        let size = self.tx.size;
        let head = (self.tx.avail_idx % (size / 2)) * 2;
        let hdr_addr = TX_LAYOUT.buffers + u64::from(head) * BUF_SIZE;
        let data_addr = hdr_addr + BUF_SIZE;
        self.ram.write(hdr_addr, &[0u8; NET_HDR_LEN]).unwrap();
        self.ram.write(data_addr, frame).unwrap();
        self.put_desc(
            TX_QUEUE,
            head,
            hdr_addr,
            NET_HDR_LEN as u32,
            DESC_F_NEXT,
            head + 1,
        );
        self.put_desc(TX_QUEUE, head + 1, data_addr, frame.len() as u32, 0, 0);
        self.publish(TX_QUEUE, head);
    }

    pub fn transmit(&mut self, frame: &[u8]) {
        self.queue_tx(frame);
        self.notify(TX_QUEUE);
    }

    /// Used entries the driver has not seen yet: (id, len).
    pub fn take_used(&mut self, q: u16) -> Vec<(u32, u32)> {
        let dq = self.queue(q).clone();
        let mut b = [0u8; 2];
        self.ram.read(dq.layout.used + 2, &mut b).unwrap();
        let used_idx = u16::from_le_bytes(b);
        let mut out = Vec::new();
        let mut seen = dq.used_seen;
        while seen != used_idx {
            let mut e = [0u8; 8];
            let slot = u64::from(seen % dq.size);
            self.ram
                .read(dq.layout.used + 4 + 8 * slot, &mut e)
                .unwrap();
            out.push((
                u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            ));
            seen = seen.wrapping_add(1);
        }
        self.queue_mut(q).used_seen = seen;
        out
    }

    /// The bytes a receive used entry describes (descriptor `id`'s buffer).
    pub fn rx_bytes(&self, id: u32, len: u32) -> Vec<u8> {
        let addr = RX_LAYOUT.buffers + u64::from(id) * BUF_SIZE;
        let mut b = vec![0u8; len as usize];
        self.ram.read(addr, &mut b).unwrap();
        b
    }
}

impl DriverQueue {
    fn new(layout: QueueLayout) -> Self {
        Self {
            size: 0,
            layout,
            avail_idx: 0,
            used_seen: 0,
        }
    }
}

/// An Ethernet frame of `len` bytes whose content depends on `seed`.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    f[..6].copy_from_slice(&MAC);
    f
}
