//! The 8259A programmable interrupt controller pair of a PC: the master at
//! 0x20/0x21 (IRQ 0–7), the slave at 0xA0/0xA1 (IRQ 8–15) cascaded on the
//! master's IRQ2, and the edge/level control registers (ELCR) at 0x4D0/0x4D1.
//!
//! The model follows the datasheet's register semantics (and QEMU's proven
//! reading of them): ICW1–ICW4, OCW1–OCW3, fully nested and rotating
//! priority, special mask mode, poll mode, auto-EOI and special fully nested
//! mode. The INTR pin is [`Pic::has_pending`]; the CPU's INTA cycle is
//! [`Pic::acknowledge`].
//!
//! Before the guest initialises it, both chips are fully masked with vector
//! base 0: with no BIOS there is nobody else to mask them, and an unmasked
//! uninitialised PIC would deliver exceptions' vectors.

use serde::{Deserialize, Serialize};

use super::{check_version, ensure, StateError};

/// Version of [`PicState`] this build writes.
const PIC_STATE_VERSION: u32 = 1;

/// ELCR bits that may be set: IRQ 0, 1, 2, 8 and 13 are always edge on a PC.
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

/// One 8259A chip's registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChipState {
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// The input lines as last driven, for edge detection.
    pub lines: u8,
    /// Edge/level control register: bit set = level triggered.
    pub elcr: u8,
    /// Lowest-priority rotation: the IRQ with priority 0 is `priority_add`.
    pub priority_add: u8,
    /// Vector base from ICW2 (low three bits zero).
    pub irq_base: u8,
    /// OCW3 read register select: false = IRR, true = ISR.
    pub read_isr: bool,
    /// OCW3 poll command issued: the next read is a poll.
    pub poll: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// Which ICW the next data-port write is: 0 = none (OCW1), 2, 3 or 4.
    pub init_state: u8,
    /// ICW1 asked for an ICW4.
    pub init4: bool,
    /// ICW1 single mode (no cascade, no ICW3).
    pub single_mode: bool,
    /// ICW1 LTIM: every line of this chip is level triggered.
    pub ltim: bool,
    /// ICW4 auto-EOI.
    pub auto_eoi: bool,
    /// OCW2 rotate-in-auto-EOI mode.
    pub rotate_on_auto_eoi: bool,
    /// ICW4 special fully nested mode.
    pub special_fully_nested: bool,
}

impl ChipState {
    /// The power-on state: fully masked, vector base 0.
    fn power_on() -> Self {
        Self {
            imr: 0xff,
            ..Self::default()
        }
    }

    fn is_level(&self, irq: u8) -> bool {
        self.ltim || self.elcr & (1 << irq) != 0
    }

    /// Priority (0 = highest) of the highest-priority bit in `mask`, 8 if none.
    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        let mut p = 0;
        while mask & (1 << ((p + self.priority_add) & 7)) == 0 {
            p += 1;
        }
        p
    }

    /// The IRQ (0..7) this chip would raise INTR for, if any.
    fn pending_irq(&self, is_master: bool) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            // Special mask mode: masked in-service levels do not block.
            in_service &= !self.imr;
        }
        if is_master && self.special_fully_nested {
            // The cascade input may interrupt its own in-service level so
            // higher-priority slave requests get through.
            in_service &= !(1 << 2);
        }
        if p < self.priority(in_service) {
            Some((p + self.priority_add) & 7)
        } else {
            None
        }
    }

    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1 << irq;
        if self.is_level(irq) {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// The INTA (or poll) side effects for `irq`.
    fn intack(&mut self, irq: u8) {
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= 1 << irq;
        }
        // A level-triggered request stays while its line is high.
        if !self.is_level(irq) {
            self.irr &= !(1 << irq);
        }
    }

    /// ICW1: restart the initialisation sequence.
    fn icw1(&mut self, val: u8) {
        let elcr = self.elcr;
        let lines = self.lines;
        *self = Self {
            elcr,
            // After ICW1 a request needs a fresh low-to-high transition:
            // keep the line levels, drop latched edges.
            lines,
            irr: self.irr & elcr & lines,
            init_state: 2,
            init4: val & 0x01 != 0,
            single_mode: val & 0x02 != 0,
            ltim: val & 0x08 != 0,
            ..Self::default()
        };
    }
}

/// Serialisable state of the PIC pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// Format version, [`PIC_STATE_VERSION`].
    pub version: u32,
    /// Master (index 0) and slave (index 1).
    pub chips: [ChipState; 2],
}

/// The cascaded 8259A pair with its ELCR.
#[derive(Debug)]
pub struct Pic {
    chips: [ChipState; 2],
    /// Guest accesses the model ignored (unsupported modes, bad ports).
    pub unsupported_accesses: u64,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A PIC pair in its power-on state (all lines masked).
    pub fn new() -> Self {
        Self {
            chips: [ChipState::power_on(), ChipState::power_on()],
            unsupported_accesses: 0,
        }
    }

    /// Reads a PIC or ELCR port (0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1).
    pub fn read(&mut self, port: u16) -> u8 {
        let (chip, a0) = match port {
            0x20 => (0, false),
            0x21 => (0, true),
            0xa0 => (1, false),
            0xa1 => (1, true),
            0x4d0 => return self.chips[0].elcr,
            0x4d1 => return self.chips[1].elcr,
            _ => {
                self.unsupported_accesses += 1;
                return 0xff;
            }
        };
        if self.chips[chip].poll {
            self.chips[chip].poll = false;
            return self.poll_read(chip);
        }
        let c = &self.chips[chip];
        match (a0, c.read_isr) {
            (true, _) => c.imr,
            (false, true) => c.isr,
            (false, false) => c.irr,
        }
    }

    /// Writes a PIC or ELCR port.
    pub fn write(&mut self, port: u16, val: u8) {
        let (chip, a0) = match port {
            0x20 => (0, false),
            0x21 => (0, true),
            0xa0 => (1, false),
            0xa1 => (1, true),
            0x4d0 | 0x4d1 => {
                let i = usize::from(port - 0x4d0);
                self.chips[i].elcr = val & ELCR_MASK[i];
                self.update();
                return;
            }
            _ => {
                self.unsupported_accesses += 1;
                return;
            }
        };
        if a0 {
            self.write_data(chip, val);
        } else {
            self.write_command(chip, val);
        }
        self.update();
    }

    fn write_command(&mut self, chip: usize, val: u8) {
        let c = &mut self.chips[chip];
        if val & 0x10 != 0 {
            if val & 0x02 != 0 || val & 0x01 == 0 {
                // Single mode or no ICW4 (8080 mode): not a PC setup.
                tracing::debug!(chip, val, "PIC: unusual ICW1");
                self.unsupported_accesses += 1;
            }
            c.icw1(val);
        } else if val & 0x08 != 0 {
            // OCW3
            if val & 0x04 != 0 {
                c.poll = true;
            }
            if val & 0x02 != 0 {
                c.read_isr = val & 0x01 != 0;
            }
            if val & 0x40 != 0 {
                c.special_mask = val & 0x20 != 0;
            }
        } else {
            // OCW2
            let level = val & 7;
            match val >> 5 {
                // rotate in auto-EOI mode: clear (0) / set (4)
                0 => c.rotate_on_auto_eoi = false,
                4 => c.rotate_on_auto_eoi = true,
                // non-specific EOI (1) / rotate on non-specific EOI (5)
                cmd @ (1 | 5) => {
                    let p = c.priority(c.isr);
                    if p != 8 {
                        let irq = (p + c.priority_add) & 7;
                        c.isr &= !(1 << irq);
                        if cmd == 5 {
                            c.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                // specific EOI
                3 => c.isr &= !(1 << level),
                // set priority: `level` becomes the lowest
                6 => c.priority_add = (level + 1) & 7,
                // rotate on specific EOI
                7 => {
                    c.isr &= !(1 << level);
                    c.priority_add = (level + 1) & 7;
                }
                // 2: no operation
                _ => {}
            }
        }
    }

    fn write_data(&mut self, chip: usize, val: u8) {
        let c = &mut self.chips[chip];
        match c.init_state {
            2 => {
                c.irq_base = val & 0xf8;
                c.init_state = match (c.single_mode, c.init4) {
                    (false, _) => 3,
                    (true, true) => 4,
                    (true, false) => 0,
                };
            }
            3 => {
                // ICW3: the PC wiring is fixed (slave on IRQ2), so the value
                // is only checked.
                let expected = if chip == 0 { 0x04 } else { 0x02 };
                if val != expected {
                    self.unsupported_accesses += 1;
                }
                c.init_state = if c.init4 { 4 } else { 0 };
            }
            4 => {
                c.auto_eoi = val & 0x02 != 0;
                c.special_fully_nested = val & 0x10 != 0;
                if val & 0x01 == 0 {
                    // MCS-80/85 mode cannot work on an x86 CPU.
                    self.unsupported_accesses += 1;
                }
                c.init_state = 0;
            }
            _ => c.imr = val,
        }
    }

    /// A read after an OCW3 poll command: acknowledge like INTA, return
    /// 0x80 | level, or 0x07 (bit 7 clear) when nothing is pending.
    fn poll_read(&mut self, chip: usize) -> u8 {
        let ret = match self.chips[chip].pending_irq(chip == 0) {
            Some(irq) => {
                self.chips[chip].intack(irq);
                0x80 | irq
            }
            None => 0x07,
        };
        self.update();
        ret
    }

    /// Propagates the slave's INTR output to the master's IRQ2 input.
    fn update(&mut self) {
        let slave_intr = self.chips[1].pending_irq(false).is_some();
        self.chips[0].set_line(2, slave_intr);
    }

    /// Drives interrupt line `irq` (0..=15) to `level`. Edge-triggered lines
    /// latch a request on a rising edge; level-triggered lines (ELCR) request
    /// while high. IRQ2 is the cascade and cannot be driven from outside.
    pub fn set_irq_level(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 if irq != 2 => self.chips[0].set_line(irq, level),
            8..=15 => self.chips[1].set_line(irq - 8, level),
            _ => {
                self.unsupported_accesses += 1;
                return;
            }
        }
        self.update();
    }

    /// Whether `irq` (0..15) has a request latched in its chip's IRR.
    pub fn irq_requested(&self, irq: u8) -> bool {
        match irq {
            0..=7 => self.chips[0].irr & (1 << irq) != 0,
            8..=15 => self.chips[1].irr & (1 << (irq - 8)) != 0,
            _ => false,
        }
    }

    /// The INTR output: an unmasked request outranks everything in service.
    pub fn has_pending(&self) -> bool {
        self.chips[0].pending_irq(true).is_some()
    }

    /// Whether INTR is up for `irq` (0..7, a master input) and for nothing
    /// else: no other unmasked request is latched on either chip.
    pub fn pending_only(&self, irq: u8) -> bool {
        let [master, slave] = &self.chips;
        let bit = 1u8 << (irq & 7);
        irq < 8
            && master.pending_irq(true) == Some(irq)
            && master.irr & !master.imr & !bit == 0
            && slave.irr & !slave.imr == 0
    }

    /// The INTA cycle: returns the vector to inject and moves the request
    /// from IRR to ISR (unless auto-EOI). A cascade request whose slave
    /// request has vanished yields the slave's spurious vector (base + 7,
    /// IRQ15), as real hardware does. `None` when INTR is low: the request
    /// went away before the CPU took it, so nothing must be injected.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.chips[0].pending_irq(true)?;
        let vector = if irq == 2 {
            let slave_irq = match self.chips[1].pending_irq(false) {
                Some(s) => {
                    self.chips[1].intack(s);
                    s
                }
                None => 7,
            };
            self.chips[1].irq_base + slave_irq
        } else {
            self.chips[0].irq_base + irq
        };
        self.chips[0].intack(irq);
        self.update();
        Some(vector)
    }

    /// The vector base each chip was given in ICW2 (master, slave).
    pub fn vector_bases(&self) -> (u8, u8) {
        (self.chips[0].irq_base, self.chips[1].irq_base)
    }

    /// Snapshot of the guest-visible state.
    pub fn save(&self) -> PicState {
        PicState {
            version: PIC_STATE_VERSION,
            chips: self.chips.clone(),
        }
    }

    /// Replaces the state with a snapshot from [`Pic::save`].
    pub fn restore(&mut self, state: &PicState) -> Result<(), StateError> {
        check_version("pic", state.version, PIC_STATE_VERSION)?;
        for c in &state.chips {
            ensure(
                matches!(c.init_state, 0 | 2 | 3 | 4),
                "pic",
                "init_state out of range",
            )?;
            ensure(c.priority_add < 8, "pic", "priority_add out of range")?;
            ensure(c.irq_base & 7 == 0, "pic", "vector base not 8-aligned")?;
        }
        self.chips = state.chips.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's init_8259A(auto_eoi = 0), ending with `imr` masks.
    fn linux_init(pic: &mut Pic, auto_eoi: bool) {
        pic.write(0x21, 0xff);
        pic.write(0xa1, 0xff);
        pic.write(0x20, 0x11);
        pic.write(0x21, 0x20);
        pic.write(0x21, 0x04);
        pic.write(0x21, if auto_eoi { 0x03 } else { 0x01 });
        pic.write(0xa0, 0x11);
        pic.write(0xa1, 0x28);
        pic.write(0xa1, 0x02);
        pic.write(0xa1, 0x01);
        pic.write(0x21, 0xff);
        pic.write(0xa1, 0xff);
    }

    fn eoi_master(pic: &mut Pic) {
        pic.write(0x20, 0x20);
    }

    #[test]
    fn power_on_is_masked_and_quiet() {
        let mut pic = Pic::new();
        pic.set_irq_level(0, true);
        assert!(!pic.has_pending());
        assert_eq!(pic.acknowledge(), None);
        assert_eq!(pic.read(0x21), 0xff);
        assert_eq!(pic.read(0xa1), 0xff);
    }

    #[test]
    fn pending_only_one_irq_on_either_chip() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x21, 0xe8); // unmask IRQ0, 1, 2 (cascade), 4
        pic.write(0xa1, 0xfe); // unmask IRQ8
        assert!(!pic.pending_only(0));
        pic.set_irq_level(0, true);
        pic.set_irq_level(0, false);
        assert!(pic.pending_only(0));
        assert!(!pic.pending_only(4));
        // A lower-priority master request besides it.
        pic.set_irq_level(4, true);
        assert!(!pic.pending_only(0));
        pic.set_irq_level(4, false);
        assert_eq!(pic.acknowledge(), Some(0x20));
        eoi_master(&mut pic);
        assert!(pic.pending_only(4));
        assert_eq!(pic.acknowledge(), Some(0x24));
        eoi_master(&mut pic);
        // A masked request does not count.
        pic.write(0x21, 0xf8); // mask IRQ4 again
        pic.set_irq_level(0, true);
        pic.set_irq_level(0, false);
        pic.set_irq_level(4, true);
        assert!(pic.pending_only(0));
        pic.set_irq_level(4, false);
        // A slave request besides it.
        pic.set_irq_level(8, true);
        assert!(!pic.pending_only(0));
        // In service, IRQ0 is not pending at all.
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.set_irq_level(0, true);
        pic.set_irq_level(0, false);
        assert!(!pic.pending_only(0));
        // Only master inputs are asked about.
        assert!(!pic.pending_only(9));
    }

    #[test]
    fn linux_init_then_timer_interrupt() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        assert_eq!(pic.vector_bases(), (0x20, 0x28));
        assert_eq!(pic.unsupported_accesses, 0);
        pic.write(0x21, 0xfa); // unmask IRQ0 and the cascade
        pic.set_irq_level(0, true);
        pic.set_irq_level(0, false);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert!(!pic.has_pending());
        // In service: read ISR via OCW3.
        pic.write(0x20, 0x0b);
        assert_eq!(pic.read(0x20), 0x01);
        pic.write(0x20, 0x0a);
        assert_eq!(pic.read(0x20), 0x00); // IRR clear
                                          // A second tick while in service waits for the EOI.
        pic.set_irq_level(0, true);
        pic.set_irq_level(0, false);
        assert!(!pic.has_pending());
        assert_eq!(pic.read(0x20), 0x01); // IRR latched
        eoi_master(&mut pic);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x20));
    }

    #[test]
    fn edge_needs_a_new_rising_edge() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x21, 0x00);
        pic.set_irq_level(4, true);
        assert_eq!(pic.acknowledge(), Some(0x24));
        eoi_master(&mut pic);
        // Line still high: no new request.
        pic.set_irq_level(4, true);
        assert!(!pic.has_pending());
        pic.set_irq_level(4, false);
        pic.set_irq_level(4, true);
        assert_eq!(pic.acknowledge(), Some(0x24));
    }

    #[test]
    fn level_triggered_follows_line_via_elcr() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x4d0, 0x20); // IRQ5 level
        pic.write(0x21, 0x00);
        pic.set_irq_level(5, true);
        assert!(pic.has_pending());
        pic.set_irq_level(5, false);
        assert!(!pic.has_pending(), "level request vanished with the line");
        assert_eq!(pic.acknowledge(), None);
        pic.set_irq_level(5, true);
        assert_eq!(pic.acknowledge(), Some(0x25));
        // Still high after EOI: requests again without a new edge.
        eoi_master(&mut pic);
        assert_eq!(pic.acknowledge(), Some(0x25));
        eoi_master(&mut pic);
    }

    #[test]
    fn level_triggered_on_the_slave() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x4d1, 0xff);
        assert_eq!(pic.read(0x4d1), 0xde, "IRQ 8 and 13 are fixed edge");
        pic.write(0x21, 0xfb);
        pic.write(0xa1, 0x00);
        pic.set_irq_level(11, true);
        assert_eq!(pic.read(0xa0), 0x08);
        pic.set_irq_level(11, false);
        assert_eq!(pic.read(0xa0), 0x00, "slave IRR follows the line");
        pic.set_irq_level(11, true);
        assert_eq!(pic.acknowledge(), Some(0x2b));
        // Still high after both EOIs: requests again.
        pic.write(0xa0, 0x20);
        eoi_master(&mut pic);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x2b));
    }

    #[test]
    fn fully_nested_priority_and_cascade() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x21, 0x00);
        pic.write(0xa1, 0x00);
        pic.set_irq_level(4, true);
        pic.set_irq_level(12, true); // via IRQ2: outranks IRQ4
        pic.set_irq_level(1, true);
        assert_eq!(pic.acknowledge(), Some(0x21));
        // IRQ1 in service blocks IRQ2 and IRQ4.
        assert!(!pic.has_pending());
        eoi_master(&mut pic);
        assert_eq!(pic.acknowledge(), Some(0x2c));
        assert!(!pic.has_pending(), "IRQ2 in service blocks IRQ4");
        // Higher-priority IRQ0 still gets through.
        pic.set_irq_level(0, true);
        assert_eq!(pic.acknowledge(), Some(0x20));
        eoi_master(&mut pic); // ends IRQ0
        pic.write(0xa0, 0x20);
        eoi_master(&mut pic); // ends IRQ2
        assert_eq!(pic.acknowledge(), Some(0x24));
        eoi_master(&mut pic);
        assert!(!pic.has_pending());
    }

    #[test]
    fn masking_in_imr_hides_requests() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x21, 0xfe);
        pic.set_irq_level(3, true);
        assert!(!pic.has_pending());
        pic.write(0x21, 0xf6);
        assert_eq!(pic.acknowledge(), Some(0x23));
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = Pic::new();
        linux_init(&mut pic, true);
        pic.write(0x21, 0x00);
        pic.set_irq_level(3, true);
        assert_eq!(pic.acknowledge(), Some(0x23));
        pic.write(0x20, 0x0b);
        assert_eq!(pic.read(0x20), 0);
        pic.set_irq_level(5, true);
        assert_eq!(pic.acknowledge(), Some(0x25));
    }

    #[test]
    fn spurious_slave_vector_when_request_vanishes() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x4d1, 0x08); // IRQ11 level
        pic.write(0x21, 0xfb);
        pic.write(0xa1, 0x00);
        pic.set_irq_level(11, true);
        assert!(pic.has_pending());
        // The device drops its line; the master's edge-latched IRQ2 stays.
        pic.set_irq_level(11, false);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x2f));
        // Linux then EOIs only the master.
        pic.write(0x20, 0x0b);
        assert_eq!(pic.read(0x20), 0x04);
        eoi_master(&mut pic);
        assert_eq!(pic.read(0x20), 0x00);
    }

    #[test]
    fn specific_eoi_and_rotation() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x21, 0x00);
        pic.set_irq_level(3, true);
        assert_eq!(pic.acknowledge(), Some(0x23));
        pic.write(0x20, 0x60 | 3); // specific EOI for IRQ3
        pic.write(0x20, 0x0b);
        assert_eq!(pic.read(0x20), 0);
        // Set priority: IRQ3 lowest, so IRQ4 outranks IRQ0.
        pic.write(0x20, 0xc0 | 3);
        pic.set_irq_level(0, true);
        pic.set_irq_level(4, true);
        assert_eq!(pic.acknowledge(), Some(0x24));
        // Rotate on non-specific EOI: IRQ4 becomes lowest; IRQ0 next.
        pic.write(0x20, 0xa0);
        assert_eq!(pic.acknowledge(), Some(0x20));
    }

    #[test]
    fn poll_mode_acknowledges() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x21, 0x00);
        pic.write(0x20, 0x0c);
        assert_eq!(pic.read(0x20), 0x07, "nothing pending: bit 7 clear");
        pic.set_irq_level(6, true);
        pic.write(0x20, 0x0c);
        assert_eq!(pic.read(0x20), 0x86);
        assert!(!pic.has_pending());
        pic.write(0x20, 0x0b);
        assert_eq!(pic.read(0x20), 0x40);
    }

    #[test]
    fn special_mask_mode_lets_lower_priority_through() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x21, 0x00);
        pic.set_irq_level(1, true);
        assert_eq!(pic.acknowledge(), Some(0x21));
        pic.set_irq_level(5, true);
        assert!(!pic.has_pending());
        // Mask IRQ1 and enter special mask mode.
        pic.write(0x21, 0x02);
        pic.write(0x20, 0x68);
        assert_eq!(pic.acknowledge(), Some(0x25));
        pic.write(0x20, 0x48); // leave special mask mode
    }

    #[test]
    fn bad_ports_and_irqs_are_counted() {
        let mut pic = Pic::new();
        assert_eq!(pic.read(0x22), 0xff);
        pic.set_irq_level(2, true);
        pic.set_irq_level(16, true);
        assert_eq!(pic.unsupported_accesses, 3);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x21, 0x00);
        pic.set_irq_level(3, true);
        let state = pic.save();
        let mut other = Pic::new();
        other.restore(&state).unwrap();
        assert_eq!(other.acknowledge(), Some(0x23));
        let mut bad = state.clone();
        bad.version = 99;
        assert!(other.restore(&bad).is_err());
        bad = state;
        bad.chips[0].init_state = 1;
        assert!(other.restore(&bad).is_err());
    }
}
