//! A hostile or broken driver: every malformed ring and chain the device
//! must survive, each checked for its outcome (dropped chain or
//! DEVICE_NEEDS_RESET), plus property tests that throw random rings and
//! memory at the walker and the device.

use proptest::prelude::*;

use super::net::{MAX_RX_FRAME, MAX_TX_FRAME, NET_HDR_LEN, RX_QUEUE, TX_PENDING_LIMIT, TX_QUEUE};
use super::queue::{Direction, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use super::test_driver::{frame, Driver, RAM_SIZE, RX_LAYOUT, TX_LAYOUT};
use super::transport::{STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1};
use super::{GuestRam, GuestRamError, RxOutcome, SplitQueue, VecRam};

/// The device stopped for a broken ring: status, interrupt, counters, no
/// more queue work; then a reset and a fresh init bring it back.
fn assert_needs_reset(d: &mut Driver, what: &str) {
    assert!(d.dev.needs_reset(), "{what}: needs reset");
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0, "{what}: status bit");
    assert!(d.dev.irq_level(), "{what}: interrupt");
    assert_eq!(d.read_isr() & 2, 2, "{what}: config-change ISR bit");
    let s = d.dev.stats();
    assert_eq!(s.ring_failures, 1, "{what}");
    assert!(s.guest_errors >= 1, "{what}");
    assert!(!d.dev.can_receive(), "{what}");
    assert_eq!(
        d.dev.receive(&frame(60, 0), &mut d.ram),
        RxOutcome::NotReady
    );
    // No more processing: a good transmit stays queued.
    let before = d.ram.clone();
    d.notify(TX_QUEUE);
    d.notify(RX_QUEUE);
    assert!(d.ram == before, "{what}: memory untouched while stopped");
    // The driver writing status without 0 keeps the bit.
    let st = d.status();
    d.set_status(st);
    assert!(d.dev.needs_reset(), "{what}");
    // Reset and start over.
    d.ram.as_mut_slice().fill(0);
    assert!(d.init(VIRTIO_F_VERSION_1, 8), "{what}: re-init");
    assert!(!d.dev.needs_reset());
    d.post_rx(1);
    assert_eq!(
        d.dev.receive(&frame(60, 1), &mut d.ram),
        RxOutcome::Delivered,
        "{what}"
    );
    d.transmit(&frame(60, 2));
    let tx = d.dev.take_tx();
    assert_eq!(tx.last(), Some(&frame(60, 2)), "{what}");
}

#[test]
fn tx_descriptor_loop() {
    let mut d = Driver::ready(8);
    d.put_desc(TX_QUEUE, 0, TX_LAYOUT.buffers, 12, DESC_F_NEXT, 1);
    d.put_desc(TX_QUEUE, 1, TX_LAYOUT.buffers, 60, DESC_F_NEXT, 0);
    d.publish(TX_QUEUE, 0);
    d.notify(TX_QUEUE);
    assert!(d.take_used(TX_QUEUE).is_empty());
    assert_needs_reset(&mut d, "loop");
}

#[test]
fn chain_longer_than_the_queue() {
    let mut d = Driver::ready(4);
    for i in 0..4u16 {
        d.put_desc(
            RX_QUEUE,
            i,
            RX_LAYOUT.buffers,
            64,
            DESC_F_WRITE | DESC_F_NEXT,
            (i + 1) % 4,
        );
    }
    d.publish(RX_QUEUE, 2);
    let out = d.dev.receive(&frame(60, 0), &mut d.ram);
    assert!(matches!(out, RxOutcome::Dropped(_)), "{out:?}");
    assert_needs_reset(&mut d, "chain longer than the queue");
}

#[test]
fn next_index_out_of_range() {
    let mut d = Driver::ready(8);
    d.put_desc(TX_QUEUE, 0, TX_LAYOUT.buffers, 12, DESC_F_NEXT, 8);
    d.publish(TX_QUEUE, 0);
    d.notify(TX_QUEUE);
    assert_needs_reset(&mut d, "next out of range");
}

#[test]
fn head_index_out_of_range() {
    let mut d = Driver::ready(8);
    d.publish(RX_QUEUE, 0xffff);
    assert!(matches!(
        d.dev.receive(&frame(60, 0), &mut d.ram),
        RxOutcome::Dropped(_)
    ));
    assert_needs_reset(&mut d, "head out of range");
}

#[test]
fn avail_index_jumps_past_the_queue() {
    let mut d = Driver::ready(8);
    d.ram
        .write(TX_LAYOUT.avail + 2, &9u16.to_le_bytes())
        .unwrap();
    d.notify(TX_QUEUE);
    assert_needs_reset(&mut d, "avail jump");
}

#[test]
fn tx_buffer_outside_ram() {
    let mut d = Driver::ready(8);
    d.put_desc(TX_QUEUE, 0, TX_LAYOUT.buffers, 12, DESC_F_NEXT, 1);
    d.put_desc(TX_QUEUE, 1, RAM_SIZE as u64 - 10, 60, 0, 0);
    d.publish(TX_QUEUE, 0);
    d.notify(TX_QUEUE);
    assert!(d.dev.take_tx().is_empty());
    assert_needs_reset(&mut d, "tx buffer outside RAM");
}

#[test]
fn rx_buffer_outside_ram() {
    let mut d = Driver::ready(8);
    d.put_desc(
        RX_QUEUE,
        0,
        RX_LAYOUT.buffers,
        8,
        DESC_F_WRITE | DESC_F_NEXT,
        1,
    );
    d.put_desc(RX_QUEUE, 1, u64::MAX - 100, 100, DESC_F_WRITE, 0);
    d.publish(RX_QUEUE, 0);
    let out = d.dev.receive(&frame(60, 0), &mut d.ram);
    assert!(matches!(out, RxOutcome::Dropped(_)), "{out:?}");
    assert_needs_reset(&mut d, "rx buffer outside RAM");
}

#[test]
fn ring_structures_outside_ram() {
    for (part, field) in [
        ("descriptor table", 0x20),
        ("avail ring", 0x28),
        ("used ring", 0x30),
    ] {
        let mut d = Driver::new();
        assert!(d.init(VIRTIO_F_VERSION_1, 8));
        // Reconfigure the TX queue with one part past the end of RAM.
        let mut tx = TX_LAYOUT;
        let far = RAM_SIZE as u64 + 0x1000;
        match field {
            0x20 => tx.desc = far,
            0x28 => tx.avail = far,
            _ => tx.used = far,
        }
        d.tx.layout = tx;
        assert!(d.init(VIRTIO_F_VERSION_1, 8), "{part}");
        if field != 0x28 {
            d.queue_tx_raw_head(0);
        }
        d.notify(TX_QUEUE);
        d.tx.layout = TX_LAYOUT;
        assert_needs_reset(&mut d, part);
    }
}

impl Driver {
    /// Publishes descriptor `head` in the TX avail ring and sets it to a
    /// valid 60-byte frame if the descriptor table is in RAM.
    fn queue_tx_raw_head(&mut self, head: u16) {
        let addr = TX_LAYOUT.buffers;
        self.ram.write(addr, &frame(72, 0)).unwrap();
        if self.tx.layout.desc < RAM_SIZE as u64 {
            self.put_desc(TX_QUEUE, head, addr, 72, 0, 0);
        }
        self.publish(TX_QUEUE, head);
    }
}

#[test]
fn misaligned_ring_at_enable() {
    let mut d = Driver::new();
    d.rx.layout.used = RX_LAYOUT.used + 2;
    assert!(d.init(VIRTIO_F_VERSION_1, 8));
    d.rx.layout = RX_LAYOUT;
    assert_needs_reset(&mut d, "misaligned used ring");
}

/// The chain was returned with length 0 and the device goes on.
fn assert_chain_returned(d: &mut Driver, q: u16, head: u32, what: &str) {
    assert_eq!(d.take_used(q), vec![(head, 0)], "{what}");
    assert!(!d.dev.needs_reset(), "{what}");
    assert_eq!(d.dev.stats().ring_failures, 0, "{what}");
    assert_eq!(d.read_isr(), 1, "{what}: the used buffer is signalled");
}

#[test]
fn writable_descriptor_in_a_tx_chain() {
    let mut d = Driver::ready(8);
    d.put_desc(TX_QUEUE, 0, TX_LAYOUT.buffers, 12, DESC_F_NEXT, 1);
    d.put_desc(TX_QUEUE, 1, TX_LAYOUT.buffers + 0x800, 60, DESC_F_WRITE, 0);
    d.publish(TX_QUEUE, 0);
    d.transmit(&frame(64, 5));
    assert_eq!(
        d.dev.take_tx(),
        vec![frame(64, 5)],
        "the next chain still goes"
    );
    assert_eq!(d.take_used(TX_QUEUE), vec![(0, 0), (2, 0)]);
    let s = d.dev.stats();
    assert_eq!((s.tx_dropped, s.guest_errors, s.ring_failures), (1, 1, 0));
}

#[test]
fn read_only_descriptor_in_an_rx_chain() {
    let mut d = Driver::ready(8);
    d.put_desc(RX_QUEUE, 3, RX_LAYOUT.buffers, 2048, 0, 0);
    d.publish(RX_QUEUE, 3);
    let before = d.ram.as_slice()[RX_LAYOUT.buffers as usize..][..2048].to_vec();
    let out = d.dev.receive(&frame(60, 0), &mut d.ram);
    assert!(matches!(out, RxOutcome::Dropped(_)), "{out:?}");
    assert_eq!(
        &d.ram.as_slice()[RX_LAYOUT.buffers as usize..][..2048],
        &before[..]
    );
    assert_chain_returned(&mut d, RX_QUEUE, 3, "read-only rx");
    assert_eq!(d.dev.stats().guest_errors, 1);
}

#[test]
fn indirect_descriptor_not_negotiated() {
    let mut d = Driver::ready(8);
    d.put_desc(TX_QUEUE, 4, TX_LAYOUT.buffers, 32, DESC_F_INDIRECT, 0);
    d.publish(TX_QUEUE, 4);
    d.notify(TX_QUEUE);
    assert!(d.dev.take_tx().is_empty());
    assert_chain_returned(&mut d, TX_QUEUE, 4, "indirect");
    let stats = d.dev.stats();
    assert_eq!((stats.tx_dropped, stats.guest_errors), (1, 1));
}

#[test]
fn oversized_and_undersized_tx_frames_are_dropped() {
    let mut d = Driver::ready(8);
    let big = TX_LAYOUT.buffers;
    // Exactly the limit goes out: header + 65538 bytes over two buffers.
    let payload = MAX_TX_FRAME as u32 - NET_HDR_LEN as u32;
    d.put_desc(TX_QUEUE, 0, big, NET_HDR_LEN as u32, DESC_F_NEXT, 1);
    d.put_desc(TX_QUEUE, 1, big + 0x100, payload, 0, 0);
    d.publish(TX_QUEUE, 0);
    d.notify(TX_QUEUE);
    let tx = d.dev.take_tx();
    assert_eq!(tx.len(), 1);
    assert_eq!(tx[0].len(), payload as usize);
    assert_eq!(d.take_used(TX_QUEUE), vec![(0, 0)]);
    // One byte more is dropped without reading it.
    d.put_desc(TX_QUEUE, 1, big + 0x100, payload + 1, 0, 0);
    d.publish(TX_QUEUE, 0);
    d.notify(TX_QUEUE);
    assert!(d.dev.take_tx().is_empty());
    assert_chain_returned(&mut d, TX_QUEUE, 0, "too big");
    // Lengths that would overflow 32 bits in a careless sum.
    d.put_desc(TX_QUEUE, 0, big, u32::MAX, DESC_F_NEXT, 1);
    d.put_desc(TX_QUEUE, 1, big, u32::MAX, 0, 0);
    d.publish(TX_QUEUE, 0);
    d.notify(TX_QUEUE);
    assert!(d.dev.take_tx().is_empty());
    assert_chain_returned(&mut d, TX_QUEUE, 0, "huge lengths");
    // A header with no Ethernet frame behind it.
    d.put_desc(TX_QUEUE, 0, big, NET_HDR_LEN as u32 + 13, 0, 0);
    d.publish(TX_QUEUE, 0);
    d.notify(TX_QUEUE);
    assert!(d.dev.take_tx().is_empty());
    assert_chain_returned(&mut d, TX_QUEUE, 0, "too short");
    let stats = d.dev.stats();
    assert_eq!((stats.tx_dropped, stats.guest_errors), (3, 3));
}

#[test]
fn rx_chain_too_small_and_frame_too_big() {
    let mut d = Driver::ready(8);
    d.put_desc(RX_QUEUE, 1, RX_LAYOUT.buffers, 70, DESC_F_WRITE, 0);
    d.publish(RX_QUEUE, 1);
    let out = d.dev.receive(&frame(60, 0), &mut d.ram);
    assert!(matches!(out, RxOutcome::Dropped(_)), "{out:?}");
    assert_chain_returned(&mut d, RX_QUEUE, 1, "rx chain too small");
    // The host's frame may simply exceed the guest's MTU: not a guest error.
    assert_eq!(d.dev.stats().guest_errors, 0);
    // A frame over the virtio-net maximum is refused before any chain is
    // taken.
    d.post_rx(1);
    let before = d.ram.clone();
    let out = d.dev.receive(&vec![0u8; MAX_RX_FRAME + 1], &mut d.ram);
    assert!(matches!(out, RxOutcome::Dropped(_)), "{out:?}");
    assert!(d.ram == before);
    assert_eq!(d.dev.stats().rx_dropped_too_big, 2);
    assert_eq!(
        d.dev.receive(&frame(100, 0), &mut d.ram),
        RxOutcome::Delivered
    );
}

#[test]
fn register_misuse_is_counted_and_survived() {
    let mut d = Driver::ready(8);
    let mut errors = d.dev.stats().guest_errors;
    let mut expect_error = |d: &mut Driver, what: &str| {
        let now = d.dev.stats().guest_errors;
        assert_eq!(now, errors + 1, "{what}");
        errors = now;
    };
    d.set_status(0x01);
    expect_error(&mut d, "clearing status bits");
    assert_eq!(d.status(), 0x0f, "bits stay");
    d.common_write(0x08, 4, 0);
    d.common_write(0x0c, 4, 0);
    expect_error(&mut d, "features after FEATURES_OK");
    d.common_write(0x16, 2, 1);
    d.common_write(0x20, 8, 0x7000);
    expect_error(&mut d, "reconfiguring an enabled queue");
    assert_eq!(d.common_read(0x20, 8), TX_LAYOUT.desc);
    d.common_write(0x1c, 2, 0);
    expect_error(&mut d, "queue_enable 0");
    d.common_write(0x16, 2, 7);
    assert_eq!(d.common_read(0x18, 2), 0, "no queue 7");
    d.common_write(0x18, 2, 8);
    expect_error(&mut d, "queue_select out of range");
    d.common_write(0x12, 2, 5);
    expect_error(&mut d, "read-only field");
    d.common_write(0x14, 4, 0);
    expect_error(&mut d, "write across fields");
    d.write(0x3002, 2, 1);
    expect_error(&mut d, "notify offset");
    d.write(0x3008, 2, 2);
    expect_error(&mut d, "notify past the queues");
    d.write(0x2000, 4, 0);
    expect_error(&mut d, "MAC write");
    d.write(0x1000, 1, 0);
    expect_error(&mut d, "ISR write");
    assert_eq!(d.read(0x0ff0, 4), 0);
    expect_error(&mut d, "read outside the structures");
    d.write(0x4000, 8, u64::MAX);
    expect_error(&mut d, "write past BAR0");
    d.write(u64::MAX - 1, 8, 0);
    expect_error(&mut d, "offset overflow");
    d.set_status(0x0f | 0x10);
    expect_error(&mut d, "reserved status bit");
    // Access widths a CPU cannot produce still must not panic.
    for (offset, len) in [(0x1000, 0), (0x14, 3), (0, 16)] {
        let mut buf = vec![0xaa; len];
        d.dev.mmio_read(offset, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
        expect_error(&mut d, "odd-sized read");
        d.dev.mmio_write(offset, &buf, &mut d.ram);
        expect_error(&mut d, "odd-sized write");
    }
    // None of that stopped the device.
    assert!(!d.dev.needs_reset());
    d.post_rx(1);
    assert_eq!(
        d.dev.receive(&frame(60, 3), &mut d.ram),
        RxOutcome::Delivered
    );
    // A bad queue size before enabling is ignored.
    d.set_status(0);
    d.set_status(0x3);
    d.common_write(0x16, 2, 0);
    d.common_write(0x18, 2, 3);
    assert_eq!(d.common_read(0x18, 2), 256);
    d.common_write(0x18, 2, 512);
    assert_eq!(d.common_read(0x18, 2), 256);
    assert_eq!(d.dev.stats().guest_errors, errors + 2);
}

/// Guest memory that records every write attempted, in or out of range.
struct RecordingRam {
    inner: VecRam,
    writes: Vec<(u64, usize, bool)>,
}

impl GuestRam for RecordingRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestRamError> {
        self.inner.read(gpa, buf)
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestRamError> {
        let r = self.inner.write(gpa, data);
        self.writes.push((gpa, data.len(), r.is_ok()));
        r
    }
}

/// Addresses: mostly near (or just past) the RAM, sometimes anywhere.
fn addr(ram: u64) -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0..ram + 64, 1 => any::<u64>()]
}

/// Mostly in `0..n`, sometimes anything.
fn mostly_below(n: u16) -> impl Strategy<Value = u16> {
    prop_oneof![8 => 0..n, 1 => any::<u16>()]
}

/// A descriptor, mostly plausible for a queue of `size` in `ram` bytes.
fn desc_bytes(size: u16, ram: u64) -> impl Strategy<Value = [u8; 16]> {
    let len = prop_oneof![8 => 0..3000u32, 1 => any::<u32>()];
    let flags = prop_oneof![
        8 => prop::sample::select(vec![0, DESC_F_NEXT, DESC_F_WRITE, DESC_F_WRITE | DESC_F_NEXT]),
        1 => any::<u16>(),
    ];
    (addr(ram), len, flags, mostly_below(size)).prop_map(|(a, l, f, n)| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&a.to_le_bytes());
        d[8..12].copy_from_slice(&l.to_le_bytes());
        d[12..14].copy_from_slice(&f.to_le_bytes());
        d[14..16].copy_from_slice(&n.to_le_bytes());
        d
    })
}

fn size() -> impl Strategy<Value = u16> {
    (0..=8u32).prop_map(|s| 1 << s)
}

/// One queue's driver-written contents: descriptors, avail entries, the
/// published avail index.
type RandomRing = (Vec<[u8; 16]>, Vec<u16>, u16);

fn random_ring(size: u16) -> impl Strategy<Value = RandomRing> {
    let n = usize::from(size);
    (
        prop::collection::vec(desc_bytes(size, RAM_SIZE as u64), n),
        prop::collection::vec(mostly_below(size), n),
        prop_oneof![8 => 0..=size, 1 => any::<u16>()],
    )
}

/// A device of random queue size with random rings on both queues.
fn random_device() -> impl Strategy<Value = (u16, RandomRing, RandomRing)> {
    (0..=4u32)
        .prop_map(|s| 1u16 << s)
        .prop_flat_map(|size| (Just(size), random_ring(size), random_ring(size)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The walker on random rings over a RAM far smaller than the
    /// addresses: no panic, at most `size` buffers per chain, writes only
    /// into the used ring, consistent indices.
    #[test]
    fn walker_survives_random_rings(
        (size, (descs, heads, idx)) in size().prop_flat_map(|n| (Just(n), random_ring(n))),
        ram_size in 64..8192usize,
        fill in proptest::collection::vec(any::<u8>(), 8192),
        bases in (addr(8192), addr(8192), addr(8192)),
        start in prop_oneof![3 => Just(0u16), 1 => any::<u16>()],
        ops in proptest::collection::vec((any::<bool>(), any::<u32>()), 1..8),
    ) {
        let mut inner = VecRam::new(ram_size);
        inner.as_mut_slice().copy_from_slice(&fill[..ram_size]);
        let (desc, avail, used) = (bases.0 & !15, bases.1 & !1, bases.2 & !3);
        // Lay the driver's structures out where they fit (they may overlap
        // each other and the used ring, as a hostile driver may arrange).
        for (i, d) in descs.iter().enumerate() {
            let _ = desc.checked_add(16 * i as u64).map(|a| inner.write(a, d));
        }
        for (i, h) in heads.iter().enumerate() {
            let _ = avail.checked_add(4 + 2 * i as u64).map(|a| inner.write(a, &h.to_le_bytes()));
        }
        let _ = avail.checked_add(2).map(|a| inner.write(a, &idx.wrapping_add(start).to_le_bytes()));
        let mut mem = RecordingRam { inner, writes: Vec::new() };
        let mut q = SplitQueue::new();
        prop_assert!(q.set_size(size));
        q.set_desc_table(desc);
        q.set_avail_ring(avail);
        q.set_used_ring(used);
        prop_assert!(q.enable().is_ok());
        q.force_indices(start, start);
        for (rx, len) in ops {
            let dir = if rx { Direction::DeviceWrites } else { Direction::DeviceReads };
            // Errors and empty rings are fine; a chain must be sane.
            if let Ok(Some(chain)) = q.peek(&mem, dir) {
                prop_assert!(chain.buffers.len() <= usize::from(size));
                prop_assert!(chain.head < size);
                let _ = q.complete(&mut mem, chain.head, len);
            }
            prop_assert_eq!(q.next_avail(), q.next_used());
        }
        let used = u128::from(q.used_ring());
        let used_end = used + 4 + 8 * u128::from(size);
        for &(gpa, len, _) in &mem.writes {
            let (s, e) = (u128::from(gpa), u128::from(gpa) + len as u128);
            prop_assert!(s >= used && e <= used_end, "write {gpa:#x}+{len} outside the used ring");
        }
    }

    /// The whole device on random descriptor tables and avail rings: no
    /// panic, bounded output, nothing written out of RAM except attempts
    /// that stop the device, and nothing at all once stopped.
    #[test]
    fn device_survives_random_rings(
        (size, rx, tx) in random_device(),
        ops in proptest::collection::vec((0..4u8, 0..2000usize), 1..16),
    ) {
        let mut d = Driver::ready(size);
        for (q, (descs, heads, idx)) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            let l = d.queue(q).layout;
            for (i, desc) in descs.iter().enumerate() {
                d.ram.write(l.desc + 16 * i as u64, desc).unwrap();
            }
            for (i, h) in heads.iter().enumerate() {
                d.ram.write(l.avail + 4 + 2 * i as u64, &h.to_le_bytes()).unwrap();
            }
            d.ram.write(l.avail + 2, &idx.to_le_bytes()).unwrap();
        }
        let mut mem = RecordingRam { inner: std::mem::replace(&mut d.ram, VecRam::new(0)), writes: Vec::new() };
        let notify = |q: u16| 0x3000 + 4 * u64::from(q);
        for (op, len) in ops {
            let stopped = d.dev.needs_reset();
            let writes_before = mem.writes.len();
            match op {
                0 => {
                    let out = d.dev.receive(&frame(len.max(14), 7), &mut mem);
                    prop_assert!(out != RxOutcome::NotReady || stopped);
                }
                1 => d.dev.mmio_write(notify(TX_QUEUE), &1u16.to_le_bytes(), &mut mem),
                2 => d.dev.mmio_write(notify(RX_QUEUE), &0u16.to_le_bytes(), &mut mem),
                _ => {
                    let mut isr = [0u8];
                    d.dev.mmio_read(0x1000, &mut isr);
                }
            }
            if stopped {
                prop_assert_eq!(mem.writes.len(), writes_before, "writes after DEVICE_NEEDS_RESET");
            }
            if mem.writes[writes_before..].iter().any(|w| !w.2) {
                prop_assert!(d.dev.needs_reset(), "a failed write must stop the device");
            }
            let state = d.dev.save();
            prop_assert!(state.tx_pending.len() <= TX_PENDING_LIMIT);
            for f in &state.tx_pending {
                prop_assert!(f.len() as u64 <= MAX_TX_FRAME - NET_HDR_LEN as u64);
            }
            for q in &state.transport.queues {
                prop_assert!(q.check().is_ok());
            }
        }
    }
}
