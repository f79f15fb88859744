//! virtio-net driven the way a driver drives it: PCI identity and
//! capabilities, initialisation, traffic, interrupts, reset, save/restore,
//! BAR moves and the PCI_CFG window.

use super::net::{RX_QUEUE, TX_PENDING_LIMIT, TX_QUEUE};
use super::test_driver::{frame, Driver, BAR0, IRQ_LINE, MAC};
use super::transport::{STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1};
use super::{RxOutcome, VirtioNet};
use crate::devices::StateError;

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;

#[test]
fn pci_identity_as_linux_probes_it() {
    let mut d = Driver::new();
    assert_eq!(
        d.cfg_read32(0x00),
        0x1041_1af4,
        "vendor 0x1af4, device 0x1041"
    );
    // Class 02 (network) 00 (Ethernet), prog-if 0, revision 1.
    assert_eq!(d.cfg_read32(0x08), 0x0200_0001);
    assert_eq!(d.cfg_read32(0x2c), 0x1100_1af4, "subsystem");
    assert_eq!(
        d.cfg_read32(0x3c) & 0xffff,
        0x0100 | u32::from(IRQ_LINE),
        "INTA, line"
    );
    assert_ne!(d.cfg_read32(0x04) & 0x0010_0000, 0, "capability list");
    // Every structure in BAR0, where vp_modern_map_capability wants it.
    let c = d.caps;
    assert_eq!(c.common, (0, 0x0000, 0x38));
    assert_eq!(c.isr.0, 0);
    assert!(c.isr.2 >= 1);
    assert_eq!(c.device, (0, 0x2000, 8));
    assert_eq!(c.notify, (0, 0x3000, 8));
    assert_eq!(c.notify_mult, 4);
    for (_, offset, len) in [c.common, c.isr, c.device, c.notify] {
        assert!(u64::from(offset) + u64::from(len) <= VirtioNet::BAR0_SIZE);
        assert_eq!(offset % 4, 0);
    }
    assert_ne!(c.pci_cfg, 0, "PCI_CFG capability present");
    assert_eq!(d.cfg_read8(c.pci_cfg + 2), 20, "virtio_pci_cfg_cap length");
    assert_eq!(d.dev.bar0(), Some(BAR0), "probe enabled memory decoding");
}

#[test]
fn bar_sizing_and_moving_through_config_space() {
    let mut d = Driver::new();
    // __pci_read_base: decoding off, write ~0, read the mask, restore.
    let cmd = d.cfg_read32(0x04);
    d.cfg_write32(0x04, cmd & !0x3);
    assert_eq!(d.dev.bar0(), None, "decoding off");
    let orig = d.cfg_read32(0x10);
    assert_eq!(orig, BAR0 as u32, "32-bit non-prefetchable memory BAR");
    d.cfg_write32(0x10, 0xffff_ffff);
    let mask = d.cfg_read32(0x10);
    assert_eq!(!(mask & !0xf) + 1, VirtioNet::BAR0_SIZE as u32);
    assert_eq!(mask & 0xf, 0);
    // The other BARs are absent.
    for reg in [0x14, 0x18, 0x1c, 0x20, 0x24] {
        d.cfg_write32(reg, 0xffff_ffff);
        assert_eq!(d.cfg_read32(reg), 0, "BAR at {reg:#x}");
    }
    // Move BAR0 and turn decoding back on.
    d.cfg_write32(0x10, 0xe000_4000 | 0xf);
    d.cfg_write32(0x04, cmd | 0x2);
    assert_eq!(d.dev.bar0(), Some(0xe000_4000));
    // The device still works at its new home (offsets are BAR-relative).
    assert!(d.init(VIRTIO_F_VERSION_1 | F_MAC | F_STATUS, 8));
    // An unassigned BAR is not decoded even with memory enabled.
    d.cfg_write32(0x10, 0);
    assert_eq!(d.dev.bar0(), None);
}

#[test]
fn feature_negotiation_and_device_config() {
    let mut d = Driver::new();
    assert_eq!(d.device_features(), VIRTIO_F_VERSION_1 | F_MAC | F_STATUS);
    // Device config: the MAC, then status = LINK_UP.
    let dev_cfg = u64::from(d.caps.device.1);
    let mac: Vec<u8> = (0..6).map(|i| d.read(dev_cfg + i, 1) as u8).collect();
    assert_eq!(mac, MAC);
    assert_eq!(d.read(dev_cfg + 6, 2), 1);
    assert_eq!(d.common_read(0x15, 1), 0, "config_generation");
    // INDIRECT_DESC (28) is not offered: FEATURES_OK is refused.
    assert!(!d.init(VIRTIO_F_VERSION_1 | 1 << 28, 8));
    // A modern device requires VERSION_1.
    assert!(!d.init(F_MAC, 8));
    // Feature bits past 63 are not offered either.
    d.set_status(0);
    d.set_status(0x3);
    d.common_write(0x08, 4, 2);
    d.common_write(0x0c, 4, 1);
    d.common_write(0x08, 4, 1);
    d.common_write(0x0c, 4, 1);
    d.set_status(0xb);
    assert_eq!(d.status() & STATUS_FEATURES_OK, 0);
    // A subset is fine, and the driver features read back.
    assert!(d.init(VIRTIO_F_VERSION_1, 8));
    d.common_write(0x08, 4, 1);
    assert_eq!(d.common_read(0x0c, 4), 1);
    // Without MSI-X the vectors read NO_VECTOR.
    assert_eq!(d.common_read(0x10, 2), 0xffff);
    d.common_write(0x1a, 2, 0);
    assert_eq!(d.common_read(0x1a, 2), 0xffff);
    assert!(d.dev.can_receive());
}

#[test]
fn frames_round_trip_both_ways() {
    let mut d = Driver::ready(16);
    // Transmit: header stripped, bytes exact, chains returned with len 0.
    let sent: Vec<Vec<u8>> = [60, 1514, 14, 777]
        .iter()
        .enumerate()
        .map(|(i, &n)| frame(n, i as u8))
        .collect();
    for f in &sent {
        d.queue_tx(f);
    }
    assert!(
        d.dev.take_tx().is_empty(),
        "nothing happens before the notify"
    );
    d.notify(TX_QUEUE);
    assert_eq!(d.dev.take_tx(), sent);
    assert_eq!(d.take_used(TX_QUEUE), vec![(0, 0), (2, 0), (4, 0), (6, 0)]);
    assert!(d.dev.irq_level());
    assert_eq!(d.read_isr(), 1);
    assert!(!d.dev.irq_level(), "reading the ISR deasserts INTx");
    assert_eq!(d.read_isr(), 0);
    // Receive: header zeroed but num_buffers = 1, then the frame.
    d.post_rx(4);
    for (i, f) in sent.iter().enumerate() {
        assert_eq!(
            d.dev.receive(f, &mut d.ram),
            RxOutcome::Delivered,
            "frame {i}"
        );
    }
    let used = d.take_used(RX_QUEUE);
    assert_eq!(used.len(), 4);
    for ((id, len), f) in used.into_iter().zip(&sent) {
        assert_eq!(len as usize, 12 + f.len());
        let bytes = d.rx_bytes(id, len);
        assert_eq!(bytes[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&bytes[12..], &f[..]);
    }
    assert_eq!(d.read_isr(), 1);
    let s = d.dev.stats();
    assert_eq!((s.rx_frames, s.tx_frames, s.guest_errors), (4, 4, 0));
}

#[test]
fn traffic_wraps_the_rings_at_the_negotiated_size() {
    let mut d = Driver::ready(4);
    for round in 0..10u8 {
        d.post_rx(4);
        for k in 0..4 {
            let f = frame(100 + usize::from(k), round ^ k);
            assert_eq!(d.dev.receive(&f, &mut d.ram), RxOutcome::Delivered);
            let used = d.take_used(RX_QUEUE);
            assert_eq!(used.len(), 1);
            assert_eq!(&d.rx_bytes(used[0].0, used[0].1)[12..], &f[..]);
        }
        assert_eq!(
            d.dev.receive(&frame(60, 0), &mut d.ram),
            RxOutcome::NoBuffers
        );
        d.queue_tx(&frame(60, round));
        d.queue_tx(&frame(61, round));
        d.notify(TX_QUEUE);
        assert_eq!(d.dev.take_tx(), vec![frame(60, round), frame(61, round)]);
        assert_eq!(d.take_used(TX_QUEUE).len(), 2);
    }
    assert_eq!(d.dev.stats().guest_errors, 0);
}

#[test]
fn no_buffers_consumes_nothing() {
    let mut d = Driver::ready(8);
    let before = d.ram.clone();
    let f = frame(100, 1);
    assert_eq!(d.dev.receive(&f, &mut d.ram), RxOutcome::NoBuffers);
    assert_eq!(d.ram, before, "guest memory untouched");
    assert!(!d.dev.irq_level());
    assert_eq!(d.dev.stats().rx_dropped_no_buffers, 1);
    d.post_rx(1);
    assert_eq!(d.dev.receive(&f, &mut d.ram), RxOutcome::Delivered);
    assert_eq!(d.take_used(RX_QUEUE), vec![(0, 112)]);
}

#[test]
fn not_ready_until_driver_ok() {
    let mut d = Driver::new();
    let f = frame(64, 0);
    assert_eq!(d.dev.receive(&f, &mut d.ram), RxOutcome::NotReady);
    assert!(!d.dev.can_receive());
    d.set_status(0x1);
    d.set_status(0x3);
    d.common_write(0x08, 4, 1);
    d.common_write(0x0c, 4, 1);
    d.set_status(0xb);
    d.rx.size = 8;
    d.tx.size = 8;
    for q in [RX_QUEUE, TX_QUEUE] {
        let l = d.queue(q).layout;
        d.common_write(0x16, 2, u64::from(q));
        d.common_write(0x18, 2, 8);
        d.common_write(0x20, 8, l.desc);
        d.common_write(0x28, 8, l.avail);
        d.common_write(0x30, 8, l.used);
        d.common_write(0x1c, 2, 1);
    }
    // Buffers posted and a frame queued before DRIVER_OK are not used yet.
    d.post_rx(2);
    d.transmit(&f);
    assert_eq!(d.dev.receive(&f, &mut d.ram), RxOutcome::NotReady);
    assert!(d.dev.take_tx().is_empty());
    assert!(d.take_used(TX_QUEUE).is_empty());
    // DRIVER_OK releases the queued transmit at once.
    d.set_status(0xb | STATUS_DRIVER_OK);
    assert_eq!(d.dev.take_tx(), vec![f.clone()]);
    assert_eq!(d.dev.receive(&f, &mut d.ram), RxOutcome::Delivered);
}

#[test]
fn driver_can_suppress_interrupts() {
    let mut d = Driver::ready(8);
    d.set_avail_flags(RX_QUEUE, 1);
    d.set_avail_flags(TX_QUEUE, 1);
    d.post_rx(1);
    assert_eq!(
        d.dev.receive(&frame(64, 0), &mut d.ram),
        RxOutcome::Delivered
    );
    d.transmit(&frame(64, 1));
    assert_eq!(d.take_used(RX_QUEUE).len(), 1);
    assert_eq!(d.take_used(TX_QUEUE).len(), 1);
    assert!(!d.dev.irq_level());
    d.set_avail_flags(RX_QUEUE, 0);
    d.post_rx(1);
    assert_eq!(
        d.dev.receive(&frame(64, 0), &mut d.ram),
        RxOutcome::Delivered
    );
    assert!(d.dev.irq_level());
}

#[test]
fn intx_disable_and_pci_interrupt_status() {
    let mut d = Driver::ready(8);
    d.transmit(&frame(64, 1));
    assert!(d.dev.irq_level());
    assert_ne!(d.cfg_read32(0x04) & 0x0008_0000, 0, "status.INTERRUPT");
    let cmd = d.cfg_read32(0x04);
    d.cfg_write32(0x04, cmd | 0x400);
    assert!(!d.dev.irq_level(), "INTx disabled");
    assert_ne!(d.cfg_read32(0x04) & 0x0008_0000, 0, "still pending");
    d.cfg_write32(0x04, cmd);
    assert!(d.dev.irq_level());
    d.read_isr();
    assert_eq!(d.cfg_read32(0x04) & 0x0008_0000, 0);
}

#[test]
fn no_dma_without_bus_mastering() {
    let mut d = Driver::ready(8);
    d.post_rx(1);
    let cmd = d.cfg_read32(0x04);
    d.cfg_write32(0x04, cmd & !0x4);
    assert!(!d.dev.can_receive());
    assert_eq!(
        d.dev.receive(&frame(60, 0), &mut d.ram),
        RxOutcome::NotReady
    );
    d.transmit(&frame(60, 1));
    assert!(d.dev.take_tx().is_empty());
    // Bus mastering back on: the next notify sends what was queued.
    d.cfg_write32(0x04, cmd);
    d.notify(TX_QUEUE);
    assert_eq!(d.dev.take_tx(), vec![frame(60, 1)]);
    assert_eq!(
        d.dev.receive(&frame(60, 0), &mut d.ram),
        RxOutcome::Delivered
    );
}

#[test]
fn reset_clears_the_device() {
    let mut d = Driver::ready(8);
    d.post_rx(2);
    d.transmit(&frame(64, 1));
    assert!(d.dev.irq_level());
    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert!(!d.dev.irq_level(), "reset clears the ISR");
    assert!(!d.dev.can_receive());
    for q in [RX_QUEUE, TX_QUEUE] {
        d.common_write(0x16, 2, u64::from(q));
        assert_eq!(d.common_read(0x1c, 2), 0, "queue disabled");
        assert_eq!(d.common_read(0x18, 2), 256, "size back to the maximum");
        assert_eq!(d.common_read(0x20, 8), 0);
    }
    d.common_write(0x08, 4, 1);
    assert_eq!(d.common_read(0x0c, 4), 0, "driver features cleared");
    // Frames already transmitted are not lost by the reset.
    assert_eq!(d.dev.take_tx(), vec![frame(64, 1)]);
    // A fresh start uses the rings from index 0 again.
    d.ram.as_mut_slice().fill(0);
    assert!(d.init(VIRTIO_F_VERSION_1 | F_MAC, 8));
    d.post_rx(1);
    assert_eq!(
        d.dev.receive(&frame(70, 2), &mut d.ram),
        RxOutcome::Delivered
    );
    assert_eq!(d.take_used(RX_QUEUE), vec![(0, 82)]);
}

/// Drives `d` through a fixed mix of traffic and returns what came out.
fn traffic(d: &mut Driver, seed: u8) -> (Vec<Vec<u8>>, Vec<RxOutcome>, Vec<u8>) {
    let mut outcomes = Vec::new();
    let mut isr = Vec::new();
    for k in 0..12u8 {
        if k % 3 == 0 {
            d.post_rx(2);
        }
        outcomes.push(
            d.dev
                .receive(&frame(60 + usize::from(k), seed ^ k), &mut d.ram),
        );
        d.queue_tx(&frame(200 + usize::from(k), seed.wrapping_add(k)));
        if k % 2 == 1 {
            d.notify(TX_QUEUE);
        }
        isr.push(d.read_isr());
    }
    (d.dev.take_tx(), outcomes, isr)
}

#[test]
fn save_restore_mid_traffic_continues_identically() {
    let mut a = Driver::ready(8);
    traffic(&mut a, 1);
    // Leave work in flight: a queued but unnotified transmit, posted
    // receive buffers, a pending interrupt, an untaken frame.
    a.post_rx(3);
    a.transmit(&frame(99, 9));
    a.queue_tx(&frame(98, 8));
    let state = a.save_and_check();
    let mut b = Driver::new();
    b.dev = VirtioNet::new(super::test_driver::config());
    b.dev.restore(&state).unwrap();
    b.ram = a.ram.clone();
    b.caps = a.caps;
    b.rx = a.rx.clone();
    b.tx = a.tx.clone();
    assert_eq!(b.dev.save(), state);
    let ra = traffic(&mut a, 7);
    let rb = traffic(&mut b, 7);
    assert_eq!(ra, rb);
    assert_eq!(
        ra.0[..2],
        [frame(99, 9), frame(98, 8)],
        "in-flight frames kept their place"
    );
    assert!(a.ram == b.ram, "guest memory identical");
    assert_eq!(a.dev.save(), b.dev.save());
}

impl Driver {
    fn save_and_check(&mut self) -> super::VirtioNetState {
        let s = self.dev.save();
        assert_ne!(s.transport.isr, 0);
        assert_eq!(s.tx_pending.len(), 1);
        s
    }
}

#[test]
fn restore_refuses_bad_states_and_changes_nothing() {
    let mut d = Driver::ready(8);
    d.post_rx(2);
    d.transmit(&frame(64, 1));
    let good = d.dev.save();
    let mut fresh = VirtioNet::new(super::test_driver::config());
    let untouched = fresh.save();
    let mut bad = Vec::new();
    let mut s = good.clone();
    s.version = 99;
    bad.push((s, "version"));
    let mut s = good.clone();
    // next_avail ≠ next_used: the device never leaves a chain half done.
    let (avail, used) = (
        s.transport.queues[1].next_avail(),
        s.transport.queues[1].next_used(),
    );
    s.transport.queues[1].force_indices(avail.wrapping_add(1), used);
    bad.push((s, "indices"));
    let mut s = good.clone();
    let q = &mut s.transport.queues[0];
    *q = super::SplitQueue::new();
    q.force_indices(3, 3);
    bad.push((s, "disabled queue with indices"));
    let mut s = good.clone();
    s.transport.queues.pop();
    bad.push((s, "queue count"));
    let mut s = good.clone();
    s.transport.driver_features |= 1 << 28;
    bad.push((s, "features"));
    let mut s = good.clone();
    s.transport.status |= 0x10;
    bad.push((s, "status"));
    let mut s = good.clone();
    s.transport.isr = 0x80;
    bad.push((s, "isr"));
    let mut s = good.clone();
    s.transport.pending_notify = 0x4;
    bad.push((s, "pending notify"));
    let mut s = good.clone();
    // A different device: another vendor ID.
    let mut forged = crate::devices::PciConfigSpace::new(0x8086, 0x1041, 2, 0, 0, 1, 0);
    forged.set_interrupt(1, IRQ_LINE);
    s.transport.pci = forged;
    bad.push((s, "pci"));
    let mut s = good.clone();
    s.tx_pending = vec![vec![0; 70_000]];
    bad.push((s, "tx frame"));
    let mut s = good.clone();
    s.tx_pending = vec![vec![0; 60]; TX_PENDING_LIMIT + 1];
    bad.push((s, "tx count"));
    for (state, what) in &bad {
        let err = fresh.restore(state).expect_err(what);
        if *what == "version" {
            assert_eq!(
                err,
                StateError::Version {
                    device: "virtio-net",
                    found: 99,
                    expected: 1
                }
            );
        } else {
            assert!(
                matches!(
                    err,
                    StateError::Invalid {
                        device: "virtio-net",
                        ..
                    }
                ),
                "{what}: {err}"
            );
        }
        assert_eq!(fresh.save(), untouched, "{what}: nothing changed");
    }
    fresh.restore(&good).unwrap();
    assert_eq!(fresh.save(), good);
}

#[test]
fn pci_cfg_window_reaches_bar0() {
    let mut d = Driver::ready(8);
    let cap = d.caps.pci_cfg;
    let data = cap + 16;
    let window = |d: &mut Driver, offset: u32, len: u32| {
        d.cfg_write8(cap + 4, 0);
        d.cfg_write32(cap + 8, offset);
        d.cfg_write32(cap + 12, len);
    };
    // Read device_status (1 byte) and num_queues (2 bytes) through it.
    window(&mut d, 0x14, 1);
    assert_eq!(d.cfg_read32(data) & 0xff, 0x0f);
    window(&mut d, 0x12, 2);
    assert_eq!(d.cfg_read32(data) & 0xffff, 2);
    // The MAC, four bytes at a time.
    window(&mut d, 0x2000, 4);
    assert_eq!(d.cfg_read32(data).to_le_bytes(), MAC[..4]);
    // Write queue_select through it, read back directly.
    window(&mut d, 0x16, 2);
    d.cfg_write32(data, 1);
    assert_eq!(d.common_read(0x16, 2), 1);
    // A transmit notify through the window waits for guest memory.
    d.queue_tx(&frame(80, 3));
    window(&mut d, 0x3004, 2);
    d.cfg_write32(data, 1);
    assert!(d.dev.has_pending_notify());
    assert!(d.dev.take_tx().is_empty());
    d.dev.flush_pending_notify(&mut d.ram);
    assert!(!d.dev.has_pending_notify());
    assert_eq!(d.dev.take_tx(), vec![frame(80, 3)]);
    // Reading the ISR through the window clears it.
    window(&mut d, 0x1000, 1);
    assert_eq!(d.cfg_read32(data) & 0xff, 1);
    assert!(!d.dev.irq_level());
    // Forbidden windows do nothing: length 3, unaligned, past the BAR,
    // another BAR. Writing 0 to device_status would reset the device and
    // reading the ISR would clear it.
    d.transmit(&frame(80, 4));
    assert!(d.dev.irq_level());
    for (bar, offset, len) in [(0, 0x14, 3), (0, 0x13, 2), (0, 0x4000, 4), (1, 0x14, 1)] {
        window(&mut d, offset, len);
        d.cfg_write8(cap + 4, bar);
        d.cfg_write32(data, 0);
    }
    for (bar, offset, len) in [
        (0, 0x1000, 3),
        (0, 0x0fff, 2),
        (0, 0x3ffe, 4),
        (2, 0x1000, 1),
    ] {
        window(&mut d, offset, len);
        d.cfg_write8(cap + 4, bar);
        d.cfg_read32(data);
    }
    assert_eq!(d.status(), 0x0f);
    assert!(d.dev.irq_level());
    // The capability header itself is read-only.
    d.cfg_write32(cap, 0xffff_ffff);
    assert_eq!(d.cfg_read8(cap), 0x09);
    assert_eq!(d.cfg_read8(cap + 3), 5);
}

#[test]
fn untaken_transmits_are_bounded() {
    let mut d = Driver::ready(256);
    let mut sent = Vec::new();
    // Two rings' worth without take_tx: the device stops at the limit and
    // leaves the rest available.
    for round in 0..2u8 {
        for k in 0..128u8 {
            let f = frame(60, k ^ round);
            d.queue_tx(&f);
            sent.push(f);
        }
        d.notify(TX_QUEUE);
        let _ = d.take_used(TX_QUEUE);
    }
    assert_eq!(d.dev.save().tx_pending.len(), TX_PENDING_LIMIT);
    d.queue_tx(&frame(61, 0));
    sent.push(frame(61, 0));
    d.notify(TX_QUEUE);
    let mut got = d.dev.take_tx();
    assert_eq!(got.len(), TX_PENDING_LIMIT);
    d.notify(TX_QUEUE);
    got.extend(d.dev.take_tx());
    assert_eq!(got, sent);
}
