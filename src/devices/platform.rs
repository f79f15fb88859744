//! The legacy PC platform: PIC, PIT, COM1, RTC, i8042 and the PCI root
//! behind one port-I/O entry point. The VMM calls only this.
//!
//! Interrupt wiring: PIT channel 0 → IRQ0 (one pulse per [`Platform::poll`]
//! that saw edges, then one per owed period: "Tick catch-up" below),
//! i8042 → IRQ1/IRQ12, COM1 → IRQ4, all edge-triggered on the PIC.
//!
//! Tick catch-up (when the log header asks for it, `set_tick_delivery`;
//! otherwise several edges in one poll coalesce into one IRQ0): PIT
//! periods that pass between two polls (the guest ran without a landmark,
//! or had IRQ0 still requested) are owed, not dropped:
//! each time the guest acknowledges IRQ0 and a period is owed, IRQ0 is
//! raised again, so the next tick reaches the guest right after its EOI,
//! when it can take interrupts again. A guest that keeps time by counting
//! ticks (Linux with the jiffies clocksource) so loses no time to a late
//! poll. The debt is bounded by [`MAX_OWED_TICK_SECONDS`] of periods; what
//! passes the bound is dropped and counted. Everything here depends only on
//! the platform's state and the `now` of its polls, so a backup fed the
//! same polls owes exactly the same ticks; the debt is part of
//! [`PlatformState`]. Device lines are re-driven after every port access, so an
//! interrupt raised by an access is latched before the access returns.

use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};

use super::i8042::{I8042State, I8042};
use super::pci::{PciDevice, PciRoot, PciRootState};
use super::pic::{Pic, PicState};
use super::pit::{Pit, PitState};
use super::rtc::{Rtc, RtcState};
use super::uart::{Uart, UartState};
use super::virtio::{GuestRam, RxOutcome, VirtioNet, VirtioNetConfig, VirtioNetState};
use super::{check_version, Nanos, StateError, TickDelivery};

/// Version of [`PlatformState`] this build writes (3: owed PIT ticks).
pub const PLATFORM_STATE_VERSION: u32 = 3;

/// The most PIT periods the platform owes the guest, in seconds of periods
/// at channel 0's current rate (at least one period): a guest kept from its
/// ticks longer than this (IRQ0 masked, a very long stall) gets the last
/// second's worth and the older ones are dropped
/// ([`Platform::pit_ticks_dropped`]).
pub const MAX_OWED_TICK_SECONDS: u64 = 1;

/// Where the virtio-net NIC sits: PCI slot, INTx line (level-triggered,
/// as firmware sets a PCI line in the ELCR), and the 32-bit memory BAR the
/// VMM assigns it (in the hole below 4 GiB, clear of the RAM and the
/// shadow-flush page).
pub const NET_PCI_SLOT: u8 = 1;
pub const NET_IRQ: u8 = 11;
pub const NET_BAR0: u64 = 0xE000_0000;

/// COM1's base port and IRQ.
const COM1_BASE: u16 = 0x3f8;
const COM1_IRQ: u8 = 4;
const PIT_IRQ: u8 = 0;
const KBD_IRQ: u8 = 1;
const AUX_IRQ: u8 = 12;

/// Something the VMM must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformEvent {
    /// The guest pulsed the CPU reset line through the i8042 (reboot, or
    /// the last step of a shutdown without ACPI).
    Reset,
}

/// Serialisable state of every device on the platform.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformState {
    /// Format version, [`PLATFORM_STATE_VERSION`].
    pub version: u32,
    /// The PIC pair.
    pub pic: PicState,
    /// The PIT and port 0x61.
    pub pit: PitState,
    /// COM1.
    pub uart: UartState,
    /// The CMOS RTC.
    pub rtc: RtcState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// The PCI root (address register and host bridge).
    pub pci: PciRootState,
    /// A reset request not yet taken with [`Platform::take_event`].
    pub reset_pending: bool,
    /// PIT periods owed to the guest (tick catch-up, module docs).
    pub pit_ticks_owed: u64,
    /// The NIC, if the VM has one.
    pub net: Option<VirtioNetState>,
}

/// Which device answers a byte-wide port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Pic,
    Pit,
    I8042,
    Rtc,
    Com1,
    /// POST/delay ports and absent COM ports Linux probes: reads 0xFF,
    /// writes vanish, nothing is counted.
    Quiet,
    Unhandled,
}

fn target(port: u16) -> Target {
    match port {
        0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => Target::Pic,
        0x40..=0x43 | 0x61 => Target::Pit,
        0x60 | 0x64 => Target::I8042,
        0x70 | 0x71 => Target::Rtc,
        0x3f8..=0x3ff => Target::Com1,
        0x80 | 0xed | 0x2f8..=0x2ff | 0x3e8..=0x3ef | 0x2e8..=0x2ef => Target::Quiet,
        _ => Target::Unhandled,
    }
}

/// Whether an access of `len` bytes at `port` depends on guest time (PIT,
/// port B, RTC): those are the accesses whose `now` record/replay logs.
pub fn port_uses_time(port: u16, len: usize) -> bool {
    !(0xcf8..=0xcff).contains(&port)
        && (0..len as u16)
            .any(|i| matches!(target(port.wrapping_add(i)), Target::Pit | Target::Rtc))
}

/// The emulated legacy PC.
#[derive(Debug)]
pub struct Platform<W: Write> {
    /// 8259A pair and ELCR.
    pub pic: Pic,
    /// 8254 PIT and port 0x61.
    pub pit: Pit,
    /// COM1.
    pub uart: Uart<W>,
    /// CMOS RTC.
    pub rtc: Rtc,
    /// Keyboard controller (reset line).
    pub i8042: I8042,
    /// PCI configuration mechanism #1.
    pub pci: PciRoot,
    /// The virtio-net NIC in [`NET_PCI_SLOT`], if the VM has one.
    pub net: Option<VirtioNet>,
    events: VecDeque<PlatformEvent>,
    unhandled: u64,
    /// PIT channel-0 edges that fell into one poll with another (or found
    /// IRQ0 still requested) and so were owed instead of raised at once.
    pub pit_ticks_coalesced: u64,
    /// PIT periods owed to the guest, raised one per IRQ0 acknowledge.
    pit_ticks_owed: u64,
    /// Owed periods raised as IRQ0 after an acknowledge (tick catch-up).
    pub pit_ticks_caught_up: u64,
    /// Owed periods dropped because the debt passed its bound
    /// ([`MAX_OWED_TICK_SECONDS`]).
    pub pit_ticks_dropped: u64,
    /// How ticks reach the guest (whether missed periods are owed or
    /// coalesced into one IRQ0): the log header's choice, fixed for a run.
    tick_delivery: TickDelivery,
    /// The deadline of the PIT period the IRQ0 last raised by a poll was
    /// for, the last of them when it coalesces several
    /// ([`Platform::held_tick_deadline`]). Only where the primary
    /// stops for a sync point depends on it, never what the guest sees, so
    /// it is not part of the saved state.
    tick_raised_for: Option<Nanos>,
}

impl<W: Write> Platform<W> {
    /// The platform at power-on: COM1 transmits into `serial_out`, the RTC
    /// shows `boot_unix_secs` at guest time 0.
    pub fn new(serial_out: W, boot_unix_secs: u64) -> Self {
        Self {
            pic: Pic::new(),
            pit: Pit::new(),
            uart: Uart::new(serial_out),
            rtc: Rtc::new(boot_unix_secs),
            i8042: I8042::new(),
            pci: PciRoot::new(),
            net: None,
            events: VecDeque::new(),
            unhandled: 0,
            pit_ticks_coalesced: 0,
            pit_ticks_owed: 0,
            pit_ticks_caught_up: 0,
            pit_ticks_dropped: 0,
            tick_delivery: TickDelivery::AtLandmarks,
            tick_raised_for: None,
        }
    }

    /// How ticks reach the guest: with catch-up, missed PIT periods are
    /// owed and raised later (module docs) instead of coalesced; set before
    /// the guest runs.
    pub fn set_tick_delivery(&mut self, rule: TickDelivery) {
        self.tick_delivery = rule;
    }

    /// How ticks reach the guest (the engine asks for interrupt-window
    /// exits when the rule says so).
    pub fn tick_delivery(&self) -> TickDelivery {
        self.tick_delivery
    }

    /// Plug a virtio-net NIC with MAC `mac` into [`NET_PCI_SLOT`], its
    /// line [`NET_IRQ`] set level-triggered in the ELCR as firmware would.
    pub fn add_net(&mut self, mac: [u8; 6]) {
        self.net = Some(VirtioNet::new(VirtioNetConfig {
            mac,
            bar0: NET_BAR0,
            irq_line: NET_IRQ,
        }));
        let (port, bit) = if NET_IRQ < 8 {
            (0x4d0, NET_IRQ)
        } else {
            (0x4d1, NET_IRQ - 8)
        };
        let elcr = self.pic.read(port);
        self.pic.write(port, elcr | 1 << bit);
    }

    fn is_pci(port: u16) -> bool {
        (0xcf8..=0xcff).contains(&port)
    }

    /// The NIC as a PCI device plugged into its slot, for config cycles.
    fn external_pci(net: &mut Option<VirtioNet>) -> Option<(u8, &mut dyn PciDevice)> {
        net.as_mut()
            .map(|n| (NET_PCI_SLOT, n as &mut dyn PciDevice))
    }

    /// A guest MMIO read at `addr`; false if no device decodes it.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        let Some(net) = &mut self.net else {
            return false;
        };
        match net.bar0() {
            Some(base) if (base..base + VirtioNet::BAR0_SIZE).contains(&addr) => {
                net.mmio_read(addr - base, data);
                self.sync_irq_lines();
                true
            }
            _ => false,
        }
    }

    /// A guest MMIO write at `addr` (a NIC notify transmits, reading and
    /// writing guest memory through `mem`); false if no device decodes it.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8], mem: &mut dyn GuestRam) -> bool {
        let Some(net) = &mut self.net else {
            return false;
        };
        match net.bar0() {
            Some(base) if (base..base + VirtioNet::BAR0_SIZE).contains(&addr) => {
                net.mmio_write(addr - base, data, mem);
                self.sync_irq_lines();
                true
            }
            _ => false,
        }
    }

    /// A config-space write may have notified a queue (through the NIC's
    /// PCI-configuration access window), which needs guest memory: run it.
    pub fn flush_pci_notify(&mut self, mem: &mut dyn GuestRam) {
        if let Some(net) = &mut self.net {
            if net.has_pending_notify() {
                net.flush_pending_notify(mem);
                self.sync_irq_lines();
            }
        }
    }

    /// Put a received frame into the NIC's receive ring; None without a NIC.
    pub fn net_receive(&mut self, frame: &[u8], mem: &mut dyn GuestRam) -> Option<RxOutcome> {
        let outcome = self.net.as_mut().map(|n| n.receive(frame, mem));
        self.sync_irq_lines();
        outcome
    }

    /// Whether the NIC's driver is up to take frames.
    pub fn net_can_receive(&self) -> bool {
        self.net.as_ref().is_some_and(|n| n.can_receive())
    }

    /// Frames the guest transmitted since the last call.
    pub fn take_net_tx(&mut self) -> Vec<Vec<u8>> {
        self.net.as_mut().map(|n| n.take_tx()).unwrap_or_default()
    }

    /// A guest `in` of `data.len()` bytes (1, 2 or 4) from `port`.
    /// Multi-byte accesses to byte-wide devices read consecutive ports.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8], now: Nanos) {
        if Self::is_pci(port) {
            self.pci
                .pio_read_with(port, data, Self::external_pci(&mut self.net));
        } else {
            let mut unhandled = false;
            for (i, b) in data.iter_mut().enumerate() {
                let p = port.wrapping_add(i as u16);
                *b = match target(p) {
                    Target::Pic => self.pic.read(p),
                    Target::Pit => self.pit.read(p, now),
                    Target::I8042 => self.i8042.read(p),
                    Target::Rtc => self.rtc.read(p, now),
                    Target::Com1 => self.uart.read((p - COM1_BASE) as u8),
                    Target::Quiet => 0xff,
                    Target::Unhandled => {
                        unhandled = true;
                        0xff
                    }
                };
            }
            if unhandled {
                self.note_unhandled(port, data.len(), false);
            }
        }
        self.sync_irq_lines();
    }

    /// A guest `out` of `data` (1, 2 or 4 bytes) to `port`.
    pub fn pio_write(&mut self, port: u16, data: &[u8], now: Nanos) {
        if Self::is_pci(port) {
            self.pci
                .pio_write_with(port, data, Self::external_pci(&mut self.net));
        } else {
            let mut unhandled = false;
            for (i, &b) in data.iter().enumerate() {
                let p = port.wrapping_add(i as u16);
                match target(p) {
                    Target::Pic => self.pic.write(p, b),
                    Target::Pit => self.pit.write(p, b, now),
                    Target::I8042 => {
                        self.i8042.write(p, b);
                        if self.i8042.take_reset_request() {
                            tracing::debug!("guest pulsed the reset line");
                            self.events.push_back(PlatformEvent::Reset);
                        }
                    }
                    Target::Rtc => self.rtc.write(p, b, now),
                    Target::Com1 => self.uart.write((p - COM1_BASE) as u8, b),
                    Target::Quiet => {}
                    Target::Unhandled => unhandled = true,
                }
            }
            if unhandled {
                self.note_unhandled(port, data.len(), true);
            }
        }
        self.sync_irq_lines();
    }

    fn note_unhandled(&mut self, port: u16, len: usize, write: bool) {
        self.unhandled += 1;
        // Rate limit: log the 1st, 2nd, 4th, 8th... occurrence.
        if self.unhandled.is_power_of_two() {
            tracing::debug!(
                port,
                len,
                write,
                count = self.unhandled,
                "unhandled port access"
            );
        }
    }

    /// Drives the devices' interrupt outputs onto the PIC. A device whose
    /// output dropped and rose inside the last access gets a fresh edge.
    fn sync_irq_lines(&mut self) {
        if self.uart.take_irq_pulse() {
            self.pic.set_irq_level(COM1_IRQ, false);
        }
        self.pic.set_irq_level(COM1_IRQ, self.uart.irq_level());
        if self.i8042.take_irq_pulse() {
            self.pic.set_irq_level(KBD_IRQ, false);
            self.pic.set_irq_level(AUX_IRQ, false);
        }
        self.pic.set_irq_level(KBD_IRQ, self.i8042.kbd_irq_level());
        self.pic.set_irq_level(AUX_IRQ, self.i8042.aux_irq_level());
        if let Some(net) = &self.net {
            self.pic.set_irq_level(NET_IRQ, net.irq_level());
        }
    }

    /// Advances the timers to `now`: the first PIT channel-0 edge since the
    /// last poll becomes an IRQ0 pulse (if IRQ0 is not requested already),
    /// the others are owed and raised one per acknowledge (tick catch-up).
    pub fn poll(&mut self, now: Nanos) {
        let first_edge = self.pit.next_irq_deadline();
        let edges = u64::from(self.pit.poll(now));
        if edges > 0 && !self.tick_delivery.catches_up() {
            // Several edges coalesce, as an edge-triggered IRR bit would.
            if !self.pic.irq_requested(PIT_IRQ) {
                // Counted from the last period it stands for: the earlier
                // ones fell due while the guest had the tick before held
                // or in service (a tick deferred, then injected ahead of
                // this poll), and counting from the first made a tick
                // raised in that tick's handler overdue at once: a second
                // sync point right after the first (measured: the 4 MiB
                // memwrite row at 16-19 sync points a second instead of 10).
                // (Option's order: a known edge beats none.)
                self.tick_raised_for = first_edge.max(self.pit.last_irq_edge());
            }
            self.pulse_pit_irq();
            self.pit_ticks_coalesced += edges - 1;
        } else if edges > 0 {
            let raised = if self.pic.irq_requested(PIT_IRQ) {
                0
            } else {
                self.pulse_pit_irq();
                1
            };
            self.pit_ticks_coalesced += edges - raised;
            self.owe_pit_ticks(edges - raised);
        }
        self.sync_irq_lines();
    }

    fn pulse_pit_irq(&mut self) {
        self.pic.set_irq_level(PIT_IRQ, true);
        self.pic.set_irq_level(PIT_IRQ, false);
    }

    /// The most PIT periods that may be owed: [`MAX_OWED_TICK_SECONDS`] at
    /// channel 0's rate (one period in a one-shot mode).
    fn max_owed_pit_ticks(&self) -> u64 {
        max_owed_ticks(self.pit.channel0_period())
    }

    fn owe_pit_ticks(&mut self, ticks: u64) {
        let owed = self.pit_ticks_owed.saturating_add(ticks);
        let max = self.max_owed_pit_ticks();
        if owed > max {
            self.pit_ticks_dropped += owed - max;
        }
        self.pit_ticks_owed = owed.min(max);
    }

    /// PIT periods owed to the guest, not raised yet (tick catch-up).
    pub fn pit_ticks_owed(&self) -> u64 {
        self.pit_ticks_owed
    }

    /// The earliest guest time at which [`Platform::poll`] could raise an
    /// interrupt (possibly already past); `None` if no timer is armed.
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.pit.next_irq_deadline()
    }

    /// The PIC's INTR output: an interrupt is waiting for the CPU.
    pub fn interrupt_pending(&self) -> bool {
        self.pic.has_pending()
    }

    /// A timer tick the PIC holds for the CPU with nothing else waiting:
    /// the deadline of the PIT period it was raised for. A tick raised at a
    /// landmark while the guest could not take it (in its handler for the
    /// last one, or with IF=0) then waits like one not raised yet (the
    /// sync-point budget may defer it: tick_deferral.rs). None with tick
    /// catch-up, whose owed periods are raised at acknowledges.
    pub fn held_tick_deadline(&self) -> Option<Nanos> {
        if self.tick_delivery.catches_up() || !self.pic.pending_only(PIT_IRQ) {
            return None;
        }
        self.tick_raised_for
    }

    /// The INTA cycle: the vector to inject, or `None` if nothing is
    /// pending any more. Acknowledging IRQ0 while a PIT period is owed
    /// raises IRQ0 again: the PIC holds it until the guest's EOI.
    pub fn acknowledge_interrupt(&mut self) -> Option<u8> {
        let pit_requested = self.pic.irq_requested(PIT_IRQ);
        let vector = self.pic.acknowledge()?;
        // The INTA took IRQ0 exactly when it cleared its (edge) request.
        if pit_requested && !self.pic.irq_requested(PIT_IRQ) && self.pit_ticks_owed > 0 {
            self.pit_ticks_owed -= 1;
            self.pit_ticks_caught_up += 1;
            self.pulse_pit_irq();
        }
        Some(vector)
    }

    /// Offers serial input to COM1; returns how many bytes were taken. The
    /// caller keeps the rest and offers it again later.
    pub fn enqueue_serial_input(&mut self, bytes: &[u8]) -> usize {
        let n = self.uart.enqueue_rx(bytes);
        self.sync_irq_lines();
        n
    }

    /// How many bytes of serial input COM1 can take now.
    pub fn serial_input_space(&self) -> usize {
        self.uart.rx_space()
    }

    /// Whether the guest asked for a reset (not yet taken).
    pub fn reset_requested(&self) -> bool {
        self.events.contains(&PlatformEvent::Reset)
    }

    /// The next event for the VMM, if any.
    pub fn take_event(&mut self) -> Option<PlatformEvent> {
        self.events.pop_front()
    }

    /// Port accesses no device claimed.
    pub fn unhandled_port_accesses(&self) -> u64 {
        self.unhandled
    }

    /// Guest accesses the devices ignored as unsupported or malformed.
    pub fn unsupported_device_accesses(&self) -> u64 {
        self.pic.unsupported_accesses
            + self.pit.unsupported_accesses
            + self.uart.unsupported_accesses
            + self.rtc.unsupported_accesses
            + self.i8042.unsupported_accesses
            + self.pci.unsupported_accesses
            + self.net.as_ref().map_or(0, |n| n.stats().guest_errors)
    }

    /// Snapshot of every device's guest-visible state.
    pub fn save(&self) -> PlatformState {
        PlatformState {
            version: PLATFORM_STATE_VERSION,
            pic: self.pic.save(),
            pit: self.pit.save(),
            uart: self.uart.save(),
            rtc: self.rtc.save(),
            i8042: self.i8042.save(),
            pci: self.pci.save(),
            reset_pending: self.events.contains(&PlatformEvent::Reset),
            pit_ticks_owed: self.pit_ticks_owed,
            net: self.net.as_ref().map(|n| n.save()),
        }
    }

    /// Replaces every device's state with a snapshot from
    /// [`Platform::save`]. On error nothing has changed. The serial sink,
    /// PCI devices and counters stay.
    pub fn restore(&mut self, state: &PlatformState) -> Result<(), StateError> {
        check_version("platform", state.version, PLATFORM_STATE_VERSION)?;
        // Validate everything on scratch devices first so a bad state
        // leaves the platform untouched.
        Pic::new().restore(&state.pic)?;
        Pit::new().restore(&state.pit)?;
        Uart::new(std::io::sink()).restore(&state.uart)?;
        Rtc::new(0).restore(&state.rtc)?;
        I8042::new().restore(&state.i8042)?;
        PciRoot::new().restore(&state.pci)?;
        if state.pit_ticks_owed > max_owed_ticks(Some(1)) {
            return Err(StateError::Invalid {
                device: "platform",
                reason: "more owed PIT ticks than any PIT rate allows",
            });
        }
        match (&self.net, &state.net) {
            (Some(net), Some(saved)) => {
                let mut scratch = VirtioNet::new(VirtioNetConfig {
                    mac: net.mac(),
                    bar0: NET_BAR0,
                    irq_line: NET_IRQ,
                });
                scratch.restore(saved)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(StateError::Invalid {
                    device: "platform",
                    reason: "the saved state has no NIC, this VM has one",
                })
            }
            (None, Some(_)) => {
                return Err(StateError::Invalid {
                    device: "platform",
                    reason: "the saved state has a NIC, this VM has none",
                })
            }
        }
        self.pic.restore(&state.pic)?;
        self.pit.restore(&state.pit)?;
        self.uart.restore(&state.uart)?;
        self.rtc.restore(&state.rtc)?;
        self.i8042.restore(&state.i8042)?;
        self.pci.restore(&state.pci)?;
        if let (Some(net), Some(saved)) = (&mut self.net, &state.net) {
            net.restore(saved)?;
        }
        self.pit_ticks_owed = state.pit_ticks_owed;
        self.events.clear();
        if state.reset_pending {
            self.events.push_back(PlatformEvent::Reset);
        }
        Ok(())
    }
}

/// [`MAX_OWED_TICK_SECONDS`] of PIT periods of `period` input ticks (one
/// period when channel 0 is not periodic).
fn max_owed_ticks(period: Option<u64>) -> u64 {
    use super::pit::PIT_HZ;
    period.map_or(1, |p| (MAX_OWED_TICK_SECONDS * PIT_HZ / p.max(1)).max(1))
}

#[cfg(test)]
mod time_port_tests {
    use super::*;

    #[test]
    fn only_timer_and_clock_ports_use_time() {
        for port in [0x40, 0x43, 0x61, 0x70, 0x71] {
            assert!(port_uses_time(port, 1), "{port:#x}");
        }
        for port in [0x20, 0x21, 0x3f8, 0x3fd, 0x64, 0x80, 0xcfc] {
            assert!(!port_uses_time(port, 1), "{port:#x}");
        }
        // A word access at 0x3f ends in the PIT.
        assert!(port_uses_time(0x3f, 2));
    }
}

#[cfg(test)]
#[path = "platform_tests.rs"]
mod tests;
