//! The i8042 keyboard controller (data 0x60, status/command 0x64) with no
//! keyboard and no mouse attached. It exists for the guest's controller
//! probe and for the CPU reset line (command 0xFE, or an output-port write
//! with bit 0 clear), which the VMM treats as the guest ending.
//!
//! Bytes sent to the absent devices are answered as a real controller does
//! when nothing is plugged in: 0xFE with the timeout bit in the status
//! register, so drivers give up at once instead of waiting. Responses raise
//! IRQ1 (keyboard side) or IRQ12 (aux side) when the configuration byte
//! enables them.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{check_version, ensure, StateError};

/// Version of [`I8042State`] this build writes.
const I8042_STATE_VERSION: u32 = 1;

// Status register bits.
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
const STS_CMD: u8 = 0x08;
const STS_UNLOCKED: u8 = 0x10;
const STS_AUX: u8 = 0x20;
const STS_TIMEOUT: u8 = 0x40;

// Controller configuration byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;

/// Output port bit 0: the CPU reset line (active low).
const OUTP_RESET: u8 = 0x01;
/// Output port bit 1: the A20 gate.
const OUTP_A20: u8 = 0x02;

/// No device answer.
const RESP_NO_DEVICE: u8 = 0xfe;

/// Bytes the output queue holds before further responses are dropped.
const OUT_QUEUE_MAX: usize = 16;

/// One byte waiting in the output buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutByte {
    /// The byte.
    pub data: u8,
    /// It comes from the aux (mouse) side.
    pub aux: bool,
    /// The device timed out (status bit 6 while it is at the front).
    pub timeout: bool,
}

/// Serialisable state of the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Format version, [`I8042_STATE_VERSION`].
    pub version: u32,
    /// The controller's 32 bytes of RAM; byte 0 is the configuration byte.
    pub ram: Vec<u8>,
    /// The output port (reset line, A20).
    pub output_port: u8,
    /// A command waiting for its data byte on port 0x60.
    pub pending_command: Option<u8>,
    /// Bytes waiting to be read from port 0x60, oldest first.
    pub out_queue: Vec<OutByte>,
    /// The last byte read from port 0x60 (read again when the buffer is empty).
    pub last_data: u8,
    /// The last write went to port 0x64 (status bit 3).
    pub last_was_command: bool,
    /// The guest pulsed the reset line and nobody took the request yet.
    pub reset_requested: bool,
}

/// The i8042 controller.
#[derive(Debug)]
pub struct I8042 {
    ram: [u8; 32],
    output_port: u8,
    pending_command: Option<u8>,
    out: VecDeque<OutByte>,
    last_data: u8,
    last_was_command: bool,
    reset_requested: bool,
    /// A new byte reached the front of the output buffer when the previous
    /// one was read: the interrupt line pulses.
    irq_pulse: bool,
    /// Guest accesses the model ignored (unknown commands, bad ports).
    pub unsupported_accesses: u64,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// A controller as a BIOS leaves it: POST passed, keyboard interrupt
    /// and translation on, A20 enabled.
    pub fn new() -> Self {
        let mut ram = [0; 32];
        ram[0] = CTR_KBD_INT | CTR_SYS | CTR_TRANSLATE;
        Self {
            ram,
            output_port: 0xc0 | OUTP_A20 | OUTP_RESET,
            pending_command: None,
            out: VecDeque::new(),
            last_data: 0,
            last_was_command: false,
            reset_requested: false,
            irq_pulse: false,
            unsupported_accesses: 0,
        }
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn push(&mut self, data: u8, aux: bool, timeout: bool) {
        if self.out.len() < OUT_QUEUE_MAX {
            self.out.push_back(OutByte { data, aux, timeout });
        } else {
            self.unsupported_accesses += 1;
        }
    }

    fn status(&self) -> u8 {
        let mut s = STS_UNLOCKED;
        if self.ctr() & CTR_SYS != 0 {
            s |= STS_SYS;
        }
        if self.last_was_command {
            s |= STS_CMD;
        }
        if let Some(b) = self.out.front() {
            s |= STS_OBF;
            if b.aux {
                s |= STS_AUX;
            }
            if b.timeout {
                s |= STS_TIMEOUT;
            }
        }
        s
    }

    /// Reads port 0x60 (output buffer) or 0x64 (status).
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            0x60 => {
                if let Some(b) = self.out.pop_front() {
                    self.last_data = b.data;
                    if self.kbd_irq_level() || self.aux_irq_level() {
                        self.irq_pulse = true;
                    }
                }
                self.last_data
            }
            0x64 => self.status(),
            _ => {
                self.unsupported_accesses += 1;
                0xff
            }
        }
    }

    /// Writes port 0x60 (data) or 0x64 (command).
    pub fn write(&mut self, port: u16, val: u8) {
        match port {
            0x60 => {
                self.last_was_command = false;
                self.write_data(val);
            }
            0x64 => {
                self.last_was_command = true;
                self.command(val);
            }
            _ => self.unsupported_accesses += 1,
        }
    }

    fn command(&mut self, cmd: u8) {
        // A new command cancels one still waiting for its data byte.
        self.pending_command = None;
        match cmd {
            0x20..=0x3f => self.push(self.ram[usize::from(cmd & 0x1f)], false, false),
            0x60..=0x7f | 0xd1..=0xd4 => self.pending_command = Some(cmd),
            0xa7 => self.ram[0] |= CTR_AUX_DISABLE,
            0xa8 => self.ram[0] &= !CTR_AUX_DISABLE,
            // Interface tests: 0x00 = no error.
            0xa9 | 0xab => self.push(0x00, false, false),
            0xaa => {
                self.ram[0] |= CTR_SYS;
                self.push(0x55, false, false);
            }
            0xad => self.ram[0] |= CTR_KBD_DISABLE,
            0xae => self.ram[0] &= !CTR_KBD_DISABLE,
            0xd0 => self.push(self.output_port, false, false),
            0xdd => self.output_port &= !OUTP_A20,
            0xdf => self.output_port |= OUTP_A20,
            0xe0 => self.push(0x00, false, false),
            // Pulse output port bits 0-3 low for those clear in the command.
            0xf0..=0xff => {
                if cmd & OUTP_RESET == 0 {
                    self.reset_requested = true;
                }
            }
            _ => {
                tracing::debug!(cmd, "i8042: unsupported command");
                self.unsupported_accesses += 1;
            }
        }
    }

    fn write_data(&mut self, val: u8) {
        match self.pending_command.take() {
            Some(cmd @ 0x60..=0x7f) => self.ram[usize::from(cmd & 0x1f)] = val,
            Some(0xd1) => {
                self.output_port = val;
                if val & OUTP_RESET == 0 {
                    self.reset_requested = true;
                }
            }
            Some(0xd2) => self.push(val, false, false),
            Some(0xd3) => self.push(val, true, false),
            // To the absent mouse.
            Some(_) => self.push(RESP_NO_DEVICE, true, true),
            // To the absent keyboard.
            None => self.push(RESP_NO_DEVICE, false, true),
        }
    }

    /// True once after the guest pulsed the CPU reset line.
    pub fn take_reset_request(&mut self) -> bool {
        std::mem::take(&mut self.reset_requested)
    }

    /// IRQ1: a keyboard-side byte waits and the configuration enables it.
    pub fn kbd_irq_level(&self) -> bool {
        self.out
            .front()
            .is_some_and(|b| !b.aux && self.ctr() & CTR_KBD_INT != 0)
    }

    /// IRQ12: an aux-side byte waits and the configuration enables it.
    pub fn aux_irq_level(&self) -> bool {
        self.out
            .front()
            .is_some_and(|b| b.aux && self.ctr() & CTR_AUX_INT != 0)
    }

    /// True once after reading port 0x60 exposed another pending byte: the
    /// caller should present a fresh rising edge on IRQ1/IRQ12.
    pub fn take_irq_pulse(&mut self) -> bool {
        std::mem::take(&mut self.irq_pulse)
    }

    /// Snapshot of the guest-visible state.
    pub fn save(&self) -> I8042State {
        I8042State {
            version: I8042_STATE_VERSION,
            ram: self.ram.to_vec(),
            output_port: self.output_port,
            pending_command: self.pending_command,
            out_queue: self.out.iter().copied().collect(),
            last_data: self.last_data,
            last_was_command: self.last_was_command,
            reset_requested: self.reset_requested,
        }
    }

    /// Replaces the state with a snapshot from [`I8042::save`].
    pub fn restore(&mut self, state: &I8042State) -> Result<(), StateError> {
        check_version("i8042", state.version, I8042_STATE_VERSION)?;
        let ram: [u8; 32] = state
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| StateError::Invalid {
                device: "i8042",
                reason: "RAM is not 32 bytes",
            })?;
        ensure(
            state.out_queue.len() <= OUT_QUEUE_MAX,
            "i8042",
            "output queue too long",
        )?;
        self.ram = ram;
        self.output_port = state.output_port;
        self.pending_command = state.pending_command;
        self.out = state.out_queue.iter().copied().collect();
        self.last_data = state.last_data;
        self.last_was_command = state.last_was_command;
        self.reset_requested = state.reset_requested;
        self.irq_pulse = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// i8042_wait_read + inb(0x60), as the Linux driver polls.
    fn read_response(c: &mut I8042) -> Option<u8> {
        (c.read(0x64) & STS_OBF != 0).then(|| c.read(0x60))
    }

    #[test]
    fn linux_controller_probe() {
        let mut c = I8042::new();
        // i8042_flush: nothing buffered.
        assert_eq!(read_response(&mut c), None);
        // Read the CTR, disable both ports' interrupts, write it back.
        c.write(0x64, 0x20);
        let ctr = read_response(&mut c).unwrap();
        assert_eq!(ctr, 0x45);
        c.write(0x64, 0x60);
        assert_eq!(c.read(0x64) & STS_CMD, STS_CMD);
        c.write(0x60, ctr & !(CTR_KBD_INT | CTR_AUX_INT));
        c.write(0x64, 0x20);
        assert_eq!(read_response(&mut c), Some(0x44));
        // Self test and interface tests.
        c.write(0x64, 0xaa);
        assert_eq!(read_response(&mut c), Some(0x55));
        c.write(0x64, 0xab);
        assert_eq!(read_response(&mut c), Some(0x00));
        c.write(0x64, 0xa9);
        assert_eq!(read_response(&mut c), Some(0x00));
        assert_ne!(c.read(0x64) & STS_SYS, 0);
        assert_eq!(c.unsupported_accesses, 0);
    }

    #[test]
    fn port_enable_disable_commands_edit_ctr() {
        let mut c = I8042::new();
        c.write(0x64, 0xad);
        c.write(0x64, 0xa7);
        c.write(0x64, 0x20);
        assert_eq!(c.read(0x60) & 0x30, 0x30);
        c.write(0x64, 0xae);
        c.write(0x64, 0xa8);
        c.write(0x64, 0x20);
        assert_eq!(c.read(0x60) & 0x30, 0x00);
    }

    #[test]
    fn aux_loopback_and_irq12() {
        let mut c = I8042::new();
        c.write(0x64, 0x60);
        c.write(0x60, CTR_SYS | CTR_AUX_INT);
        c.write(0x64, 0xd3);
        c.write(0x60, 0x5a);
        assert!(c.aux_irq_level());
        assert!(!c.kbd_irq_level());
        assert_eq!(c.read(0x64) & (STS_OBF | STS_AUX), STS_OBF | STS_AUX);
        assert_eq!(c.read(0x60), 0x5a);
        assert!(!c.aux_irq_level());
        // Reading an empty buffer repeats the last byte.
        assert_eq!(c.read(0x60), 0x5a);
    }

    #[test]
    fn absent_devices_answer_with_timeout() {
        let mut c = I8042::new();
        // Keyboard reset (0xFF) to the absent keyboard.
        c.write(0x60, 0xff);
        assert!(c.kbd_irq_level());
        assert_eq!(
            c.read(0x64) & (STS_OBF | STS_TIMEOUT),
            STS_OBF | STS_TIMEOUT
        );
        assert_eq!(c.read(0x60), RESP_NO_DEVICE);
        // Mouse "get ID" via 0xD4.
        c.write(0x64, 0xd4);
        c.write(0x60, 0xf2);
        let s = c.read(0x64);
        assert_eq!(s & (STS_AUX | STS_TIMEOUT), STS_AUX | STS_TIMEOUT);
        assert_eq!(c.read(0x60), RESP_NO_DEVICE);
        assert_eq!(c.read(0x64) & STS_OBF, 0);
    }

    #[test]
    fn second_byte_pulses_the_irq() {
        let mut c = I8042::new();
        c.write(0x64, 0xd2);
        c.write(0x60, 1);
        c.write(0x64, 0xd2);
        c.write(0x60, 2);
        assert_eq!(c.read(0x60), 1);
        assert!(c.take_irq_pulse());
        assert_eq!(c.read(0x60), 2);
        assert!(!c.take_irq_pulse());
    }

    #[test]
    fn reset_via_command_fe() {
        let mut c = I8042::new();
        assert!(!c.take_reset_request());
        c.write(0x64, 0xfe);
        assert!(c.take_reset_request());
        assert!(!c.take_reset_request(), "reported once");
        // 0xFF pulses nothing.
        c.write(0x64, 0xff);
        assert!(!c.take_reset_request());
    }

    #[test]
    fn output_port_read_write_and_reset_bit() {
        let mut c = I8042::new();
        c.write(0x64, 0xd0);
        let outp = c.read(0x60);
        assert_eq!(outp & (OUTP_RESET | OUTP_A20), OUTP_RESET | OUTP_A20);
        c.write(0x64, 0xd1);
        c.write(0x60, outp & !OUTP_A20);
        assert!(!c.take_reset_request());
        c.write(0x64, 0xd0);
        assert_eq!(c.read(0x60) & OUTP_A20, 0);
        c.write(0x64, 0xd1);
        c.write(0x60, 0x00);
        assert!(c.take_reset_request());
    }

    #[test]
    fn unknown_commands_are_counted() {
        let mut c = I8042::new();
        c.write(0x64, 0x12);
        assert_eq!(c.read(0x61), 0xff);
        assert_eq!(c.unsupported_accesses, 2);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut c = I8042::new();
        c.write(0x64, 0xaa);
        c.write(0x64, 0x60); // data byte pending
        let s = c.save();
        let mut d = I8042::new();
        d.restore(&s).unwrap();
        assert_eq!(d.save(), s);
        d.write(0x60, 0x07);
        d.write(0x64, 0x20);
        assert_eq!(d.read(0x60), 0x55, "self-test answer first");
        assert_eq!(d.read(0x60), 0x07);
        let mut bad = s;
        bad.ram.push(0);
        assert!(d.restore(&bad).is_err());
    }
}
