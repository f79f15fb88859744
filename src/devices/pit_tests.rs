//! PIT tests: modes, counters, read-back, edges in time, save/restore.

use super::*;

const MS: Nanos = 1_000_000;

/// Linux's i8253 clockevent in periodic mode: 0x34, LSB, MSB.
fn periodic(pit: &mut Pit, count: u16, now: Nanos) {
    pit.write(0x43, 0x34, now);
    pit.write(0x40, count as u8, now);
    pit.write(0x40, (count >> 8) as u8, now);
}

#[test]
fn tick_time_conversions_agree() {
    for k in [0, 1, 2, 1193, 1_193_182, 123_456_789_012] {
        assert_eq!(tick_at(time_of_tick(k)), k);
        assert!(tick_at(time_of_tick(k) - u64::from(k > 0)) < k.max(1));
    }
    assert_eq!(tick_at(1_000_000_000), PIT_HZ);
}

#[test]
fn mode2_periodic_irqs_at_1000hz() {
    let mut pit = Pit::new();
    assert_eq!(pit.next_irq_deadline(), None, "nothing until programmed");
    let latch = ((PIT_HZ + 500) / 1000) as u16; // 1193, Linux's LATCH
    periodic(&mut pit, latch, 0);
    let first = pit.next_irq_deadline().unwrap();
    assert_eq!(first, time_of_tick(1193));
    assert_eq!(pit.poll(first - 1), 0);
    assert_eq!(pit.poll(first), 1);
    let second = pit.next_irq_deadline().unwrap();
    assert_eq!(second, time_of_tick(2 * 1193));
    // Edges 2..=12 arrive coalesced into one poll.
    assert_eq!(pit.poll(time_of_tick(12 * 1193)), 11);
    assert_eq!(pit.poll(time_of_tick(12 * 1193)), 0);
    // A second of IRQs is ~1000.
    assert_eq!(pit.poll(1000 * MS + time_of_tick(12 * 1193)), 1000);
}

#[test]
fn mode2_counter_reads_and_latch() {
    let mut pit = Pit::new();
    periodic(&mut pit, 1000, 0);
    // 100 ticks in: count is 900. Linux's clocksource latches first.
    let now = time_of_tick(100);
    pit.write(0x43, 0x00, now);
    let lo = pit.read(0x40, time_of_tick(150));
    let hi = pit.read(0x40, time_of_tick(160));
    assert_eq!(u16::from_le_bytes([lo, hi]), 900);
    // Unlatched reads follow the counter; wraps back to the reload.
    let now = time_of_tick(1000 + 250);
    let lo = pit.read(0x40, now);
    let hi = pit.read(0x40, now);
    assert_eq!(u16::from_le_bytes([lo, hi]), 750);
}

#[test]
fn the_last_edge_of_a_coalesced_poll_is_known_in_the_periodic_modes() {
    let mut pit = Pit::new();
    assert_eq!(pit.last_irq_edge(), None, "nothing until programmed");
    periodic(&mut pit, 1193, 0);
    assert_eq!(pit.poll(time_of_tick(1192)), 0);
    assert_eq!(pit.last_irq_edge(), None, "before the first edge");
    // Edges 1..=3 in one poll, between the third and the fourth: the third.
    assert_eq!(pit.poll(time_of_tick(3 * 1193 + 600)), 3);
    assert_eq!(pit.last_irq_edge(), Some(time_of_tick(3 * 1193)));
    // Exactly on an edge: that edge.
    assert_eq!(pit.poll(time_of_tick(5 * 1193)), 2);
    assert_eq!(pit.last_irq_edge(), Some(time_of_tick(5 * 1193)));
    // One-shot mode: none (a single deadline is its own).
    pit.write(0x43, 0x30, 0);
    pit.write(0x40, 0x10, 0);
    pit.write(0x40, 0x00, 0);
    assert_eq!(pit.last_irq_edge(), None);
}

#[test]
fn mode0_one_shot_fires_once() {
    let mut pit = Pit::new();
    pit.write(0x43, 0x30, 0);
    pit.write(0x40, 0x10, 0);
    pit.write(0x40, 0x00, 0);
    assert_eq!(pit.next_irq_deadline(), Some(time_of_tick(16)));
    assert_eq!(pit.poll(time_of_tick(15)), 0);
    assert_eq!(pit.poll(time_of_tick(16)), 1);
    assert_eq!(pit.next_irq_deadline(), None);
    assert_eq!(pit.poll(time_of_tick(1_000_000)), 0);
    // The counter wraps on after terminal count.
    let now = time_of_tick(20);
    let mut pit2 = Pit::new();
    pit2.write(0x43, 0x30, 0);
    pit2.write(0x40, 0x10, 0);
    pit2.write(0x40, 0x00, 0);
    let lo = pit2.read(0x40, now);
    let hi = pit2.read(0x40, now);
    assert_eq!(u16::from_le_bytes([lo, hi]), 0xfffc);
}

#[test]
fn mode4_oneshot_like_linux_clockevents() {
    let mut pit = Pit::new();
    periodic(&mut pit, 1193, 0);
    assert_eq!(pit.poll(time_of_tick(1193)), 1);
    // Switch to oneshot (0x38) at tick 1500, then program 500 ticks.
    let t = time_of_tick(1500);
    pit.write(0x43, 0x38, t);
    pit.write(0x40, 0xf4, t);
    pit.write(0x40, 0x01, t);
    // Mode 4: OUT pulses low at count 0 and rises one clock later.
    assert_eq!(pit.next_irq_deadline(), Some(time_of_tick(1500 + 501)));
    assert_eq!(pit.poll(time_of_tick(2000)), 0);
    assert_eq!(pit.poll(time_of_tick(2001)), 1);
    assert_eq!(pit.poll(time_of_tick(100_000)), 0);
    // Rewriting the count re-arms.
    let t = time_of_tick(100_000);
    pit.write(0x40, 10, t);
    pit.write(0x40, 0, t);
    assert_eq!(pit.poll(time_of_tick(100_011)), 1);
}

#[test]
fn reprogramming_keeps_edges_already_due() {
    let mut pit = Pit::new();
    periodic(&mut pit, 100, 0);
    // Reprogrammed after 3 periods without a poll: those 3 are kept.
    periodic(&mut pit, 1000, time_of_tick(350));
    assert_eq!(pit.poll(time_of_tick(350)), 3);
    assert_eq!(pit.next_irq_deadline(), Some(time_of_tick(1350)));
}

#[test]
fn mode0_shutdown_then_periodic_edge() {
    // Mode word 0 sets OUT low; a later mode 2 word sets it high again,
    // a real rising edge the PIC sees.
    let mut pit = Pit::new();
    pit.write(0x43, 0x30, 0);
    assert_eq!(pit.poll(10 * MS), 0);
    assert_eq!(pit.next_irq_deadline(), None);
    pit.write(0x43, 0x34, 10 * MS);
    assert_eq!(pit.poll(10 * MS), 1);
}

#[test]
fn mode2_new_count_applies_at_period_end() {
    let mut pit = Pit::new();
    periodic(&mut pit, 100, 0);
    // Count only (no mode word) at tick 30: current period still ends at 100.
    pit.write(0x40, 50, time_of_tick(30));
    pit.write(0x40, 0, time_of_tick(30));
    assert_eq!(pit.next_irq_deadline(), Some(time_of_tick(100)));
    assert_eq!(pit.poll(time_of_tick(100)), 1);
    assert_eq!(pit.next_irq_deadline(), Some(time_of_tick(150)));
    assert_eq!(pit.poll(time_of_tick(260)), 3);
}

#[test]
fn mode3_square_wave_and_readback_status() {
    let mut pit = Pit::new();
    pit.write(0x43, 0x36, 0);
    pit.write(0x40, 0, 0);
    pit.write(0x40, 0, 0); // 65536: ~18.2 Hz
    assert_eq!(pit.next_irq_deadline(), Some(time_of_tick(65_536)));
    // Read-back status of channel 0 in the high half then the low half.
    pit.write(0x43, 0xe2, time_of_tick(100));
    assert_eq!(pit.read(0x40, time_of_tick(100)), 0x80 | 0x30 | 0x06);
    pit.write(0x43, 0xe2, time_of_tick(40_000));
    assert_eq!(pit.read(0x40, time_of_tick(40_000)), 0x30 | 0x06);
    // Count + status latch together: status first, then the count.
    pit.write(0x43, 0xc2, time_of_tick(40_000));
    assert_eq!(pit.read(0x40, 0), 0x36);
    let lo = pit.read(0x40, 0);
    let hi = pit.read(0x40, 0);
    assert_eq!(
        u32::from(u16::from_le_bytes([lo, hi])),
        65_536 - 2 * (40_000 - 32_768)
    );
    assert_eq!(pit.poll(time_of_tick(3 * 65_536)), 3);
}

#[test]
fn null_count_until_written() {
    let mut pit = Pit::new();
    pit.write(0x43, 0x34, 0);
    pit.write(0x43, 0xe2, 0);
    assert_eq!(pit.read(0x40, 0) & 0x40, 0x40);
    pit.write(0x40, 5, 0);
    pit.write(0x40, 0, 0);
    pit.write(0x43, 0xe2, 0);
    assert_eq!(pit.read(0x40, 0) & 0x40, 0);
}

/// Linux's pit_calibrate_tsc(): gate on, speaker off, channel 2 mode 0,
/// then spin on port 0x61 bit 5 until OUT goes high.
#[test]
fn channel2_calibration_via_port61() {
    let mut pit = Pit::new();
    let v = pit.read(0x61, 0);
    pit.write(0x61, (v & !0x02) | 0x01, 0);
    pit.write(0x43, 0xb0, 0);
    let latch = (PIT_HZ / (1000 / 50)) as u16; // 50 ms
    pit.write(0x42, latch as u8, 0);
    pit.write(0x42, (latch >> 8) as u8, 0);
    let mut now = 0;
    let mut reads = 0;
    while pit.read(0x61, now) & 0x20 == 0 {
        now += 10_000;
        reads += 1;
    }
    assert_eq!(now, 50 * MS);
    assert_eq!(reads, 5000);
    assert_eq!(pit.read(0x61, now) & 0x03, 0x01);
    // Channel 2 never causes IRQ0.
    assert_eq!(pit.poll(now), 0);
}

#[test]
fn channel2_gate_pauses_mode0_and_counts_msb() {
    // quick_pit_calibrate(): mode 0, count 0xffff, read the MSB.
    let mut pit = Pit::new();
    pit.write(0x61, 0x01, 0);
    pit.write(0x43, 0xb0, 0);
    pit.write(0x42, 0xff, 0);
    pit.write(0x42, 0xff, 0);
    let t = time_of_tick(0x300);
    assert_eq!(pit.read(0x42, t), 0xff);
    assert_eq!(pit.read(0x42, t), 0xfc);
    // Gate low stops counting in mode 0; gate high resumes.
    pit.write(0x61, 0x00, t);
    let later = time_of_tick(0x5000);
    pit.read(0x42, later);
    assert_eq!(pit.read(0x42, later), 0xfc);
    pit.write(0x61, 0x01, later);
    let t2 = time_of_tick(0x5000 + 0x100);
    pit.read(0x42, t2);
    assert_eq!(pit.read(0x42, t2), 0xfb);
}

fn read16(pit: &mut Pit, port: u16, tick: u64) -> u16 {
    let lo = pit.read(port, time_of_tick(tick));
    let hi = pit.read(port, time_of_tick(tick));
    u16::from_le_bytes([lo, hi])
}

fn out2(pit: &mut Pit, tick: u64) -> bool {
    pit.read(0x61, time_of_tick(tick)) & 0x20 != 0
}

#[test]
fn hardware_triggered_modes_1_and_5() {
    let mut pit = Pit::new();
    pit.write(0x43, 0xb2, 0); // ch2, lo/hi, mode 1
    pit.write(0x42, 100, 0);
    pit.write(0x42, 0, 0);
    assert!(out2(&mut pit, 5), "waits for a trigger with OUT high");
    assert_eq!(read16(&mut pit, 0x42, 5), 100);
    pit.write(0x61, 0x01, time_of_tick(10));
    assert!(!out2(&mut pit, 10));
    assert_eq!(read16(&mut pit, 0x42, 60), 50);
    assert!(!out2(&mut pit, 109));
    assert!(out2(&mut pit, 110));
    // Mode 5: a one-clock low strobe at terminal count.
    pit.write(0x61, 0x00, time_of_tick(200));
    pit.write(0x43, 0xba, time_of_tick(200));
    pit.write(0x42, 100, time_of_tick(200));
    pit.write(0x42, 0, time_of_tick(200));
    pit.write(0x61, 0x01, time_of_tick(210));
    assert!(out2(&mut pit, 309));
    assert!(!out2(&mut pit, 310));
    assert!(out2(&mut pit, 311));
}

#[test]
fn gate_low_holds_mode2_and_rising_reloads() {
    let mut pit = Pit::new();
    pit.write(0x61, 0x01, 0);
    pit.write(0x43, 0xb4, 0); // ch2, lo/hi, mode 2
    pit.write(0x42, 100, 0);
    pit.write(0x42, 0, 0);
    assert!(!out2(&mut pit, 99), "OUT low at count 1");
    assert!(out2(&mut pit, 100));
    pit.write(0x61, 0x00, time_of_tick(150));
    assert_eq!(read16(&mut pit, 0x42, 400), 50, "held while gate is low");
    pit.write(0x61, 0x01, time_of_tick(500));
    assert_eq!(
        read16(&mut pit, 0x42, 530),
        70,
        "reloaded on the rising gate"
    );
}

#[test]
fn refresh_bit_toggles_with_time() {
    let mut pit = Pit::new();
    let a = pit.read(0x61, 0) & 0x10;
    let b = pit.read(0x61, REFRESH_PERIOD_NS) & 0x10;
    let c = pit.read(0x61, 2 * REFRESH_PERIOD_NS) & 0x10;
    assert_ne!(a, b);
    assert_eq!(a, c);
}

#[test]
fn access_modes_lsb_only_and_msb_only() {
    let mut pit = Pit::new();
    pit.write(0x43, 0x50, 0); // ch1, LSB only, mode 0
    pit.write(0x41, 200, 0);
    assert_eq!(pit.read(0x41, time_of_tick(50)), 150);
    pit.write(0x43, 0x60, 0); // ch1, MSB only, mode 0
    pit.write(0x41, 0x02, 0);
    assert_eq!(pit.read(0x41, time_of_tick(256)), 0x01);
}

#[test]
fn bcd_counting() {
    let mut pit = Pit::new();
    pit.write(0x43, 0x71, 0); // ch1, lo/hi, mode 0, BCD
    pit.write(0x41, 0x00, 0);
    pit.write(0x41, 0x10, 0); // 1000 decimal
    let t = time_of_tick(1);
    assert_eq!(pit.read(0x41, t), 0x99);
    assert_eq!(pit.read(0x41, t), 0x09);
}

#[test]
fn time_never_runs_backwards() {
    let mut pit = Pit::new();
    periodic(&mut pit, 100, 0);
    assert_eq!(pit.poll(time_of_tick(250)), 2);
    assert_eq!(pit.poll(time_of_tick(120)), 0);
    assert_eq!(pit.poll(time_of_tick(300)), 1);
}

#[test]
fn save_restore_round_trip() {
    let mut pit = Pit::new();
    periodic(&mut pit, 1193, 0);
    pit.poll(time_of_tick(500));
    let state = pit.save();
    let mut other = Pit::new();
    other.restore(&state).unwrap();
    assert_eq!(other.next_irq_deadline(), pit.next_irq_deadline());
    assert_eq!(other.poll(time_of_tick(5000)), pit.poll(time_of_tick(5000)));
    let mut bad = state.clone();
    bad.channels[0].mode = 7;
    assert!(other.restore(&bad).is_err());
    bad = state;
    bad.channels[1].reload = 0;
    assert!(other.restore(&bad).is_err());
}

#[test]
fn unsupported_accesses_counted() {
    let mut pit = Pit::new();
    assert_eq!(pit.read(0x43, 0), 0xff);
    pit.write(0x44, 0, 0);
    assert_eq!(pit.unsupported_accesses, 2);
}
