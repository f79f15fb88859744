//! Platform tests: timer wiring, tick catch-up, port routing, save/restore.

use super::super::pit::{time_of_tick, PIT_HZ};
use super::*;

const MS: Nanos = 1_000_000;

fn outb(p: &mut Platform<Vec<u8>>, port: u16, val: u8, now: Nanos) {
    p.pio_write(port, &[val], now);
}

fn inb(p: &mut Platform<Vec<u8>>, port: u16, now: Nanos) -> u8 {
    let mut b = [0];
    p.pio_read(port, &mut b, now);
    b[0]
}

/// Linux's init_8259A() and the i8253 periodic clockevent at HZ=1000.
fn boot_like_linux(p: &mut Platform<Vec<u8>>) {
    outb(p, 0x21, 0xff, 0);
    outb(p, 0xa1, 0xff, 0);
    outb(p, 0x20, 0x11, 0);
    outb(p, 0x21, 0x20, 0);
    outb(p, 0x21, 0x04, 0);
    outb(p, 0x21, 0x01, 0);
    outb(p, 0xa0, 0x11, 0);
    outb(p, 0xa1, 0x28, 0);
    outb(p, 0xa1, 0x02, 0);
    outb(p, 0xa1, 0x01, 0);
    // Unmask IRQ0 (timer), IRQ2 (cascade), IRQ4 (COM1).
    outb(p, 0x21, !0x15, 0);
    outb(p, 0xa1, 0xff, 0);
    let latch = ((PIT_HZ + 500) / 1000) as u16;
    outb(p, 0x43, 0x34, 0);
    outb(p, 0x40, latch as u8, 0);
    outb(p, 0x40, (latch >> 8) as u8, 0);
}

/// A Linux-like timer at 1 kHz polled on time: a tick per period, the
/// second held while the first is in service, until its EOI.
fn two_ticks_on_time(p: &mut Platform<Vec<u8>>) {
    boot_like_linux(p);
    let period = time_of_tick(1193);
    assert_eq!(p.next_deadline(), Some(period));
    // Nothing before the first period ends.
    p.poll(period - 1);
    assert!(!p.interrupt_pending());
    assert_eq!(p.acknowledge_interrupt(), None);
    p.poll(period);
    assert!(p.interrupt_pending());
    assert_eq!(p.acknowledge_interrupt(), Some(0x20));
    assert!(!p.interrupt_pending());
    // Next tick arrives while IRQ0 is still in service: held until EOI.
    let second = p.next_deadline().unwrap();
    assert_eq!(second, time_of_tick(2 * 1193));
    p.poll(second);
    assert!(!p.interrupt_pending());
    outb(p, 0x20, 0x20, second + 1000);
    assert!(p.interrupt_pending());
    assert_eq!(p.acknowledge_interrupt(), Some(0x20));
    outb(p, 0x20, 0x20, second + 2000);
}

/// Polled at each deadline for a second from `from`: 1000 interrupts.
fn a_second_polled_on_time(p: &mut Platform<Vec<u8>>, from: Nanos) {
    let mut count = 0;
    let end = from + 1000 * MS;
    while let Some(d) = p.next_deadline().filter(|&d| d <= end) {
        p.poll(d);
        while let Some(v) = p.acknowledge_interrupt() {
            assert_eq!(v, 0x20);
            count += 1;
            outb(p, 0x20, 0x20, d);
        }
    }
    assert_eq!(count, 1000);
    assert_eq!(p.unhandled_port_accesses(), 0);
    assert_eq!(p.unsupported_device_accesses(), 0);
}

#[test]
fn timer_interrupts_with_eoi() {
    let mut p = Platform::new(Vec::new(), 0);
    two_ticks_on_time(&mut p);
    // Polling late: three periods pass, one IRQ0, two coalesced.
    let late = time_of_tick(5 * 1193);
    p.poll(late);
    assert_eq!(p.acknowledge_interrupt(), Some(0x20));
    assert_eq!(p.acknowledge_interrupt(), None);
    assert_eq!(p.pit_ticks_coalesced, 2);
    outb(&mut p, 0x20, 0x20, late);
    assert_eq!(p.acknowledge_interrupt(), None);
    assert_eq!(p.pit_ticks_owed(), 0);
    a_second_polled_on_time(&mut p, late);
}

#[test]
fn timer_interrupts_with_eoi_and_tick_catch_up() {
    let mut p = Platform::new(Vec::new(), 0);
    p.set_tick_delivery(TickDelivery::CatchUpAtWindowExits);
    two_ticks_on_time(&mut p);
    // Polling late: three periods pass, one IRQ0, two owed; each comes
    // after the EOI of the one before.
    let late = time_of_tick(5 * 1193);
    p.poll(late);
    assert_eq!(p.acknowledge_interrupt(), Some(0x20));
    assert_eq!(p.acknowledge_interrupt(), None);
    assert_eq!(p.pit_ticks_coalesced, 2);
    assert_eq!(p.pit_ticks_owed(), 1);
    for owed in [0, 0] {
        outb(&mut p, 0x20, 0x20, late);
        assert_eq!(p.acknowledge_interrupt(), Some(0x20));
        assert_eq!(p.pit_ticks_owed(), owed);
    }
    outb(&mut p, 0x20, 0x20, late);
    assert_eq!(p.acknowledge_interrupt(), None);
    assert_eq!(p.pit_ticks_caught_up, 2);
    a_second_polled_on_time(&mut p, late);
}

/// A platform catching up ticks, its timer set up as Linux does.
fn linux_like_catching_up() -> Platform<Vec<u8>> {
    let mut p = Platform::new(Vec::new(), 0);
    p.set_tick_delivery(TickDelivery::CatchUpAtWindowExits);
    boot_like_linux(&mut p);
    p
}

/// Take every interrupt the platform raises, EOI-ing each, until none
/// is left; returns how many were IRQ0.
fn take_all_ticks(p: &mut Platform<Vec<u8>>, now: Nanos) -> u64 {
    let mut ticks = 0;
    for _ in 0..100_000 {
        match p.acknowledge_interrupt() {
            Some(0x20) => ticks += 1,
            Some(other) => panic!("unexpected vector {other:#x}"),
            None => return ticks,
        }
        outb(p, 0x20, 0x20, now);
    }
    panic!("the platform never stopped raising IRQ0");
}

#[test]
fn every_period_missed_between_polls_reaches_the_guest() {
    let mut p = linux_like_catching_up();
    // 1 kHz; one poll 20 periods late: 20 ticks, one per EOI.
    let now = time_of_tick(20 * 1193);
    p.poll(now);
    assert_eq!(p.pit_ticks_owed(), 19);
    assert_eq!(take_all_ticks(&mut p, now), 20);
    assert_eq!(p.pit_ticks_owed(), 0);
    assert_eq!(p.pit_ticks_caught_up, 19);
    assert_eq!(p.pit_ticks_dropped, 0);
}

#[test]
fn an_owed_tick_waits_for_the_eoi_and_never_doubles_a_request() {
    let mut p = linux_like_catching_up();
    p.poll(time_of_tick(3 * 1193));
    assert_eq!(p.acknowledge_interrupt(), Some(0x20));
    // Re-raised at the INTA, held behind the one in service.
    assert!(!p.interrupt_pending());
    // A poll while IRQ0 is requested owes its edges instead of losing
    // them in the latched request.
    p.poll(time_of_tick(5 * 1193));
    assert_eq!(p.pit_ticks_owed(), 1 + 2);
    outb(&mut p, 0x20, 0x20, time_of_tick(5 * 1193));
    assert!(p.interrupt_pending());
    assert_eq!(take_all_ticks(&mut p, time_of_tick(5 * 1193)), 4);
}

#[test]
fn owed_ticks_are_bounded_by_a_second_of_periods() {
    let mut p = linux_like_catching_up();
    // 3 s of 1 kHz periods in one poll: one raised, 1000 owed, the rest
    // dropped.
    let now = time_of_tick(3001 * 1193);
    p.poll(now);
    assert_eq!(p.pit_ticks_owed(), 1000);
    assert_eq!(p.pit_ticks_dropped, 2000);
    assert_eq!(take_all_ticks(&mut p, now), 1001);
    assert_eq!(max_owed_ticks(None), 1);
    assert_eq!(max_owed_ticks(Some(PIT_HZ * 10)), 1);
}

#[test]
fn a_masked_timer_owes_at_most_the_bound() {
    let mut p = linux_like_catching_up();
    outb(&mut p, 0x21, 0xff, 0);
    for s in 1..=5u64 {
        p.poll(time_of_tick(s * 1000 * 1193));
        assert!(p.pit_ticks_owed() <= 1000);
    }
    assert!(!p.interrupt_pending());
}

#[test]
fn owed_ticks_survive_save_and_restore() {
    let mut a = linux_like_catching_up();
    let now = time_of_tick(10 * 1193);
    a.poll(now);
    assert_eq!(a.acknowledge_interrupt(), Some(0x20));
    let state = a.save();
    assert_eq!(state.pit_ticks_owed, 8);
    let mut b = Platform::new(Vec::new(), 0);
    b.set_tick_delivery(TickDelivery::CatchUpAtWindowExits);
    b.restore(&state).unwrap();
    assert_eq!(b.save(), state);
    outb(&mut a, 0x20, 0x20, now);
    outb(&mut b, 0x20, 0x20, now);
    assert_eq!(take_all_ticks(&mut a, now), 9);
    assert_eq!(take_all_ticks(&mut b, now), 9);
    // An impossible debt is refused and changes nothing.
    let mut bad = state.clone();
    bad.pit_ticks_owed = u64::MAX;
    let before = b.save();
    assert!(b.restore(&bad).is_err());
    assert_eq!(b.save(), before);
}

#[test]
fn serial_rx_raises_vector_0x24() {
    let mut p = Platform::new(Vec::new(), 0);
    boot_like_linux(&mut p);
    // 8250 startup: FIFO (8-byte trigger), 8N1, DTR|RTS|OUT2, ERBFI.
    outb(&mut p, 0x3fa, 0x87, 0);
    outb(&mut p, 0x3fb, 0x03, 0);
    outb(&mut p, 0x3fc, 0x0b, 0);
    outb(&mut p, 0x3f9, 0x01, 0);
    assert!(!p.interrupt_pending());
    assert_eq!(p.enqueue_serial_input(b"ls\n"), 3);
    assert!(p.interrupt_pending());
    assert_eq!(p.acknowledge_interrupt(), Some(0x24));
    // The handler: IIR, then drain RBR while LSR.DR.
    assert_eq!(inb(&mut p, 0x3fa, 0) & 0x0f, 0x0c);
    let mut got = Vec::new();
    while inb(&mut p, 0x3fd, 0) & 1 != 0 {
        got.push(inb(&mut p, 0x3f8, 0));
    }
    assert_eq!(got, b"ls\n");
    assert_eq!(inb(&mut p, 0x3fa, 0) & 0x0f, 0x01);
    outb(&mut p, 0x20, 0x20, 0);
    assert!(!p.interrupt_pending());
    // More input later: a new edge, a new interrupt.
    assert_eq!(p.enqueue_serial_input(b"x"), 1);
    assert_eq!(p.acknowledge_interrupt(), Some(0x24));
}

#[test]
fn serial_tx_and_thre_interrupts_reach_the_pic() {
    let mut p = Platform::new(Vec::new(), 0);
    boot_like_linux(&mut p);
    outb(&mut p, 0x3fc, 0x0b, 0);
    // Enabling ETBEI raises THRE: IRQ4.
    outb(&mut p, 0x3f9, 0x02, 0);
    assert_eq!(p.acknowledge_interrupt(), Some(0x24));
    // The handler writes bytes without reading IIR between them; each
    // THR write makes THRE anew, which must latch another request.
    for &b in b"ok" {
        outb(&mut p, 0x3f8, b, 0);
    }
    outb(&mut p, 0x20, 0x20, 0);
    assert_eq!(p.acknowledge_interrupt(), Some(0x24));
    assert_eq!(p.uart.out_mut().as_slice(), b"ok");
}

#[test]
fn word_access_splits_into_bytes() {
    let mut p = Platform::new(Vec::new(), 0);
    // outw to 0x70: index 0x40 to 0x70, data 0x5a to 0x71.
    p.pio_write(0x70, &[0x40, 0x5a], 0);
    outb(&mut p, 0x70, 0x40, 0);
    assert_eq!(inb(&mut p, 0x71, 0), 0x5a);
    // inw from the master PIC: IRR then IMR.
    let mut w = [0; 2];
    p.pio_read(0x20, &mut w, 0);
    assert_eq!(w, [0x00, 0xff]);
    // 32-bit PCI access goes to the PCI root whole.
    p.pio_write(0xcf8, &0x8000_0000u32.to_le_bytes(), 0);
    let mut d = [0; 4];
    p.pio_read(0xcfc, &mut d, 0);
    assert_eq!(u32::from_le_bytes(d), 0x1237_8086);
}

#[test]
fn quiet_and_unhandled_ports() {
    let mut p = Platform::new(Vec::new(), 0);
    outb(&mut p, 0x80, 0x00, 0);
    assert_eq!(inb(&mut p, 0x80, 0), 0xff);
    outb(&mut p, 0xed, 0x00, 0);
    for base in [0x2f8, 0x3e8, 0x2e8] {
        assert_eq!(inb(&mut p, base + 5, 0), 0xff);
        outb(&mut p, base + 4, 0x10, 0);
    }
    assert_eq!(p.unhandled_port_accesses(), 0);
    assert_eq!(inb(&mut p, 0x1f7, 0), 0xff);
    let mut d = [0; 4];
    p.pio_read(0x500, &mut d, 0);
    assert_eq!(d, [0xff; 4]);
    p.pio_write(0x92, &[0x02], 0);
    assert_eq!(p.unhandled_port_accesses(), 3);
}

#[test]
fn reset_through_i8042() {
    let mut p = Platform::new(Vec::new(), 0);
    assert_eq!(p.take_event(), None);
    outb(&mut p, 0x64, 0xfe, 0);
    assert_eq!(p.take_event(), Some(PlatformEvent::Reset));
    assert_eq!(p.take_event(), None);
}

#[test]
fn rtc_and_port61_through_platform() {
    let mut p = Platform::new(Vec::new(), 1_709_251_198);
    outb(&mut p, 0x70, 0x00, 0);
    assert_eq!(inb(&mut p, 0x71, 3 * MS), 0x58);
    outb(&mut p, 0x61, 0x01, 0);
    outb(&mut p, 0x43, 0xb0, 0);
    outb(&mut p, 0x42, 10, 0);
    outb(&mut p, 0x42, 0, 0);
    assert_eq!(inb(&mut p, 0x61, time_of_tick(9)) & 0x20, 0);
    assert_eq!(inb(&mut p, 0x61, time_of_tick(10)) & 0x20, 0x20);
}

#[test]
fn save_restore_continues_identically() {
    let mut a = Platform::new(Vec::new(), 1_000_000);
    boot_like_linux(&mut a);
    outb(&mut a, 0x3fc, 0x0b, 0);
    outb(&mut a, 0x3f9, 0x01, 0);
    a.enqueue_serial_input(b"abc");
    a.poll(3 * MS);
    outb(&mut a, 0x64, 0xfe, 3 * MS);
    let state = a.save();
    let mut b = Platform::new(Vec::new(), 0);
    b.restore(&state).unwrap();
    assert_eq!(b.save(), state);
    assert_eq!(b.take_event(), Some(PlatformEvent::Reset));
    for now in [3 * MS, 4 * MS, 10 * MS] {
        a.poll(now);
        b.poll(now);
        assert_eq!(a.acknowledge_interrupt(), b.acknowledge_interrupt());
        assert_eq!(inb(&mut a, 0x3f8, now), inb(&mut b, 0x3f8, now));
        outb(&mut a, 0x20, 0x20, now);
        outb(&mut b, 0x20, 0x20, now);
    }
    // A bad state changes nothing.
    let mut bad = state.clone();
    bad.rtc.cmos.clear();
    let before = b.save();
    assert!(b.restore(&bad).is_err());
    assert_eq!(b.save(), before);
}

#[test]
fn a_tick_raised_in_the_handler_of_the_last_is_held_with_its_deadline() {
    let mut p = Platform::new(Vec::new(), 0);
    boot_like_linux(&mut p);
    let first = time_of_tick(1193);
    assert_eq!(p.held_tick_deadline(), None);
    p.poll(first + 1000);
    // Raised and takeable at once: held (nothing else waits), for `first`.
    assert_eq!(p.held_tick_deadline(), Some(first));
    assert_eq!(p.acknowledge_interrupt(), Some(0x20));
    assert_eq!(p.held_tick_deadline(), None);
    // The handler outlasts the period (a long sync point before it): the
    // next poll, between the fourth and fifth periods, raises IRQ0 for the
    // second to the fourth, which the PIC holds until the EOI; then it is
    // the only thing waiting, counted from the last period it stands for
    // (the earlier ones fell due while the first tick was in service).
    let fourth = time_of_tick(4 * 1193);
    p.poll(fourth + 1000);
    assert_eq!(p.held_tick_deadline(), None, "in service: not pending yet");
    outb(&mut p, 0x20, 0x20, fourth + 1001);
    assert_eq!(p.held_tick_deadline(), Some(fourth));
    // A second poll while it is held keeps its deadline.
    p.poll(time_of_tick(6 * 1193));
    assert_eq!(p.held_tick_deadline(), Some(fourth));
    // Anything else waiting besides it (serial input): not a held tick.
    outb(&mut p, 0x3fc, 0x0b, 0);
    outb(&mut p, 0x3f9, 0x01, 0);
    assert_eq!(p.enqueue_serial_input(b"x"), 1);
    assert!(p.interrupt_pending());
    assert_eq!(p.held_tick_deadline(), None);
}

#[test]
fn with_tick_catch_up_no_tick_is_held() {
    let mut p = Platform::new(Vec::new(), 0);
    p.set_tick_delivery(TickDelivery::CatchUpAtWindowExits);
    boot_like_linux(&mut p);
    p.poll(time_of_tick(1193));
    assert!(p.interrupt_pending());
    assert_eq!(p.held_tick_deadline(), None);
}
