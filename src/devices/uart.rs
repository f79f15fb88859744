//! A 16550A UART (COM1 on a PC: 0x3F8, IRQ 4). The device takes register
//! offsets 0..=7; the platform maps the port range onto it.
//!
//! Transmission is instant: a byte written to THR goes straight to the
//! output sink and THR/TSR are empty again at once, so LSR.THRE and
//! LSR.TEMT always read 1 and the THRE interrupt behaves as on a 16550 whose
//! transmitter is infinitely fast. Reception goes through a bounded 64-byte
//! FIFO fed by [`Uart::enqueue_rx`], which never drops input: it accepts
//! only what fits and the caller holds the rest.
//!
//! With FIFOs enabled the receive interrupt reports "data available" once
//! the trigger level is reached and "character timeout" (IIR 0x0C) below it
//! — as if the 4-character timeout had already expired, since input arrives
//! in bursts from outside and waiting for more would only add latency.

use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};

use super::{check_version, ensure, StateError};

/// Version of [`UartState`] this build writes.
const UART_STATE_VERSION: u32 = 1;

/// Capacity of the receive FIFO.
pub const RX_FIFO_CAPACITY: usize = 64;

// Register offsets.
const RBR_THR_DLL: u8 = 0;
const IER_DLM: u8 = 1;
const IIR_FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const MSR: u8 = 6;
const SCR: u8 = 7;

// IER bits.
const IER_ERBFI: u8 = 0x01;
const IER_ETBEI: u8 = 0x02;
const IER_ELSI: u8 = 0x04;
const IER_EDSSI: u8 = 0x08;

// IIR values.
const IIR_NO_INT: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_CTI: u8 = 0x0c;
const IIR_FIFO_ENABLED: u8 = 0xc0;

// FCR bits.
const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

// LCR bits.
const LCR_DLAB: u8 = 0x80;

// MCR bits.
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;

// LSR bits.
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
/// Error bits cleared by reading LSR (OE, PE, FE, BI).
const LSR_ERRORS: u8 = 0x1e;

// MSR bits: deltas in the low nibble, line states in the high nibble.
const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// Modem inputs when not in loopback: the "cable" is always ready.
const MSR_LINES_CONNECTED: u8 = MSR_CTS | MSR_DSR | MSR_DCD;

/// Serialisable state of the UART: registers and receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// Format version, [`UART_STATE_VERSION`].
    pub version: u32,
    /// Divisor latch, low byte.
    pub dll: u8,
    /// Divisor latch, high byte.
    pub dlm: u8,
    /// Interrupt enable register (low nibble).
    pub ier: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register (low five bits).
    pub mcr: u8,
    /// LSR error bits latched until LSR is read (OE, PE, FE, BI).
    pub lsr_errors: u8,
    /// Modem status register: line states (high nibble) and deltas.
    pub msr: u8,
    /// Scratch register.
    pub scr: u8,
    /// FIFO control as last written (enable and trigger bits).
    pub fcr: u8,
    /// A THRE interrupt is pending.
    pub thr_ipending: bool,
    /// Receive FIFO, oldest byte first.
    pub rx_fifo: Vec<u8>,
}

/// The 16550A model writing transmitted bytes to `W`.
#[derive(Debug)]
pub struct Uart<W: Write> {
    dll: u8,
    dlm: u8,
    ier: u8,
    lcr: u8,
    mcr: u8,
    lsr_errors: u8,
    msr: u8,
    scr: u8,
    fcr: u8,
    thr_ipending: bool,
    rx: VecDeque<u8>,
    out: W,
    /// Set when the interrupt output dropped and rose again inside one
    /// access (a THR write with ETBEI): a new edge for an edge-triggered PIC.
    irq_pulse: bool,
    /// Bytes written to the output sink.
    pub tx_bytes: u64,
    /// Bytes lost because the output sink returned an error.
    pub tx_errors: u64,
    /// Loopback bytes dropped because the receive FIFO was full (overrun).
    pub rx_overruns: u64,
    /// Guest accesses the model ignored (writes to LSR/MSR, bad offsets).
    pub unsupported_accesses: u64,
}

impl<W: Write> Uart<W> {
    /// A UART after reset, transmitting into `out`.
    pub fn new(out: W) -> Self {
        Self {
            dll: 0x0c, // 9600 baud, as a BIOS leaves it
            dlm: 0,
            ier: 0,
            lcr: 0,
            mcr: 0,
            lsr_errors: 0,
            msr: MSR_LINES_CONNECTED,
            scr: 0,
            fcr: 0,
            thr_ipending: false,
            rx: VecDeque::with_capacity(RX_FIFO_CAPACITY),
            out,
            irq_pulse: false,
            tx_bytes: 0,
            tx_errors: 0,
            rx_overruns: 0,
            unsupported_accesses: 0,
        }
    }

    /// The output sink.
    pub fn out_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Consumes the UART, returning its output sink.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_ENABLE != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn rx_trigger(&self) -> usize {
        match self.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    fn lsr(&self) -> u8 {
        let dr = if self.rx.is_empty() { 0 } else { LSR_DR };
        dr | self.lsr_errors | LSR_THRE | LSR_TEMT
    }

    /// The interrupt identification, highest priority first.
    fn iir(&self) -> u8 {
        let id = if self.ier & IER_ELSI != 0 && self.lsr_errors != 0 {
            IIR_RLSI
        } else if self.ier & IER_ERBFI != 0 && !self.rx.is_empty() {
            if !self.fifo_enabled() || self.rx.len() >= self.rx_trigger() {
                IIR_RDI
            } else {
                IIR_CTI
            }
        } else if self.ier & IER_ETBEI != 0 && self.thr_ipending {
            IIR_THRI
        } else if self.ier & IER_EDSSI != 0 && self.msr & 0x0f != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        };
        if self.fifo_enabled() {
            id | IIR_FIFO_ENABLED
        } else {
            id
        }
    }

    /// The interrupt output as the PC sees it: INTR gated by MCR.OUT2.
    pub fn irq_level(&self) -> bool {
        self.mcr & MCR_OUT2 != 0 && self.iir() & IIR_NO_INT == 0
    }

    /// True once after the interrupt output pulsed low and high again inside
    /// one access; the caller should present a fresh rising edge to the PIC.
    pub fn take_irq_pulse(&mut self) -> bool {
        std::mem::take(&mut self.irq_pulse)
    }

    /// Reads register `offset` (0..=7).
    pub fn read(&mut self, offset: u8) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR_DLL if dlab => self.dll,
            RBR_THR_DLL => self.rx.pop_front().unwrap_or(0),
            IER_DLM if dlab => self.dlm,
            IER_DLM => self.ier,
            IIR_FCR => {
                let iir = self.iir();
                // Reading IIR acknowledges the THRE interrupt it reports.
                if iir & 0x0f == IIR_THRI {
                    self.thr_ipending = false;
                }
                iir
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let v = self.lsr();
                self.lsr_errors = 0;
                v
            }
            MSR => {
                let v = self.msr;
                self.msr &= 0xf0;
                v
            }
            SCR => self.scr,
            _ => {
                self.unsupported_accesses += 1;
                0xff
            }
        }
    }

    /// Writes register `offset` (0..=7).
    pub fn write(&mut self, offset: u8, val: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR_DLL if dlab => self.dll = val,
            RBR_THR_DLL => self.transmit(val),
            IER_DLM if dlab => self.dlm = val,
            IER_DLM => {
                let changed = (self.ier ^ val) & IER_ETBEI != 0;
                self.ier = val & 0x0f;
                // Enabling ETBEI with THR empty raises THRE at once (what
                // real parts do and drivers rely on); disabling drops it.
                if changed {
                    self.thr_ipending = self.ier & IER_ETBEI != 0;
                }
            }
            IIR_FCR => {
                if (self.fcr ^ val) & FCR_ENABLE != 0 || val & FCR_CLEAR_RX != 0 {
                    // Toggling the FIFO enable or the RX reset bit clears it.
                    self.rx.clear();
                }
                self.fcr = val & 0xc1;
            }
            LCR => self.lcr = val,
            MCR => {
                self.mcr = val & 0x1f;
                self.update_msr();
            }
            SCR => self.scr = val,
            _ => {
                // LSR and MSR are read-only (factory test on some parts).
                self.unsupported_accesses += 1;
            }
        }
    }

    fn transmit(&mut self, byte: u8) {
        let before = self.irq_level();
        self.thr_ipending = false;
        let dropped = !self.irq_level();
        if self.loopback() {
            if self.rx.len() < RX_FIFO_CAPACITY {
                self.rx.push_back(byte);
            } else {
                self.lsr_errors |= LSR_OE;
                self.rx_overruns += 1;
            }
        } else {
            match self.out.write_all(&[byte]).and_then(|()| self.out.flush()) {
                Ok(()) => self.tx_bytes += 1,
                Err(e) => {
                    self.tx_errors += 1;
                    if self.tx_errors.is_power_of_two() {
                        tracing::warn!(error = %e, lost = self.tx_errors, "UART: output sink failed");
                    }
                }
            }
        }
        // THR and TSR are empty again: THRE fires anew.
        self.thr_ipending = true;
        if before && dropped && self.irq_level() {
            self.irq_pulse = true;
        }
    }

    /// Recomputes the modem status inputs from MCR and sets delta bits.
    fn update_msr(&mut self) {
        let lines = if self.loopback() {
            let bit = |m: u8, b: u8| if self.mcr & m != 0 { b } else { 0 };
            bit(MCR_RTS, MSR_CTS)
                | bit(MCR_DTR, MSR_DSR)
                | bit(MCR_OUT1, MSR_RI)
                | bit(MCR_OUT2, MSR_DCD)
        } else {
            MSR_LINES_CONNECTED
        };
        let old = self.msr & 0xf0;
        let changed = old ^ lines;
        let mut deltas = self.msr & 0x0f;
        if changed & MSR_CTS != 0 {
            deltas |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            deltas |= MSR_DDSR;
        }
        if old & MSR_RI != 0 && lines & MSR_RI == 0 {
            deltas |= MSR_TERI;
        }
        if changed & MSR_DCD != 0 {
            deltas |= MSR_DDCD;
        }
        self.msr = lines | deltas;
    }

    /// Free space in the receive FIFO. Zero in loopback mode, where the
    /// receiver is disconnected from the outside.
    pub fn rx_space(&self) -> usize {
        if self.loopback() {
            0
        } else {
            RX_FIFO_CAPACITY - self.rx.len()
        }
    }

    /// Offers input from outside; returns how many bytes were accepted (a
    /// prefix of `bytes`). The caller keeps the rest and offers it again.
    pub fn enqueue_rx(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.rx_space());
        self.rx.extend(&bytes[..n]);
        n
    }

    /// Snapshot of the guest-visible state.
    pub fn save(&self) -> UartState {
        UartState {
            version: UART_STATE_VERSION,
            dll: self.dll,
            dlm: self.dlm,
            ier: self.ier,
            lcr: self.lcr,
            mcr: self.mcr,
            lsr_errors: self.lsr_errors,
            msr: self.msr,
            scr: self.scr,
            fcr: self.fcr,
            thr_ipending: self.thr_ipending,
            rx_fifo: self.rx.iter().copied().collect(),
        }
    }

    /// Replaces the state with a snapshot from [`Uart::save`]; the output
    /// sink and counters stay.
    pub fn restore(&mut self, state: &UartState) -> Result<(), StateError> {
        check_version("uart", state.version, UART_STATE_VERSION)?;
        ensure(
            state.rx_fifo.len() <= RX_FIFO_CAPACITY,
            "uart",
            "receive FIFO too long",
        )?;
        ensure(
            state.ier & 0xf0 == 0 && state.mcr & 0xe0 == 0 && state.fcr & !0xc1 == 0,
            "uart",
            "reserved register bits set",
        )?;
        ensure(
            state.lsr_errors & !LSR_ERRORS == 0,
            "uart",
            "bad LSR errors",
        )?;
        self.dll = state.dll;
        self.dlm = state.dlm;
        self.ier = state.ier;
        self.lcr = state.lcr;
        self.mcr = state.mcr;
        self.lsr_errors = state.lsr_errors;
        self.msr = state.msr;
        self.scr = state.scr;
        self.fcr = state.fcr;
        self.thr_ipending = state.thr_ipending;
        self.rx = state.rx_fifo.iter().copied().collect();
        self.irq_pulse = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Linux's 8250 driver does on open: 115200 8N1, FIFOs with an
    /// 8-byte trigger, DTR|RTS|OUT2, then enable interrupts.
    fn linux_startup(u: &mut Uart<Vec<u8>>, ier: u8) {
        u.write(LCR, 0x80);
        u.write(RBR_THR_DLL, 1);
        u.write(IER_DLM, 0);
        u.write(LCR, 0x03);
        u.write(IIR_FCR, 0x01);
        u.write(IIR_FCR, 0x87);
        u.write(MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        u.write(IER_DLM, ier);
    }

    #[test]
    fn probe_like_8250_autoconfig() {
        let mut u = Uart::new(Vec::new());
        // Scratch register test.
        u.write(SCR, 0xa5);
        assert_eq!(u.read(SCR), 0xa5);
        // IER test: write 0x0f, read back 0x0f.
        u.write(IER_DLM, 0x0f);
        assert_eq!(u.read(IER_DLM), 0x0f);
        u.write(IER_DLM, 0);
        // Loopback test: MCR = LOOP | 0x0A must give CTS and DCD.
        u.write(MCR, MCR_LOOP | 0x0a);
        assert_eq!(u.read(MSR) & 0xf0, 0x90);
        u.write(MCR, 0);
        // FIFO detection: IIR bits 7:6 = 11 means 16550A.
        u.write(IIR_FCR, FCR_ENABLE);
        assert_eq!(u.read(IIR_FCR) >> 6, 3);
        u.write(IIR_FCR, 0);
        assert_eq!(u.read(IIR_FCR), IIR_NO_INT);
        // Divisor latch is separate from IER/RBR.
        u.write(LCR, 0x80);
        u.write(RBR_THR_DLL, 0x34);
        u.write(IER_DLM, 0x12);
        u.write(LCR, 0x03);
        assert_eq!(u.read(IER_DLM), 0);
        u.write(LCR, 0x83);
        assert_eq!((u.read(RBR_THR_DLL), u.read(IER_DLM)), (0x34, 0x12));
        assert_eq!(u.unsupported_accesses, 0);
    }

    #[test]
    fn transmit_goes_to_sink_and_thr_stays_empty() {
        let mut u = Uart::new(Vec::new());
        linux_startup(&mut u, 0);
        for &b in b"hi\n" {
            assert_ne!(u.read(LSR) & LSR_THRE, 0);
            u.write(RBR_THR_DLL, b);
        }
        assert_eq!(u.read(LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(u.out_mut().as_slice(), b"hi\n");
        assert_eq!(u.tx_bytes, 3);
        assert_eq!(u.into_inner(), b"hi\n");
    }

    #[test]
    fn thre_interrupt_lifecycle() {
        let mut u = Uart::new(Vec::new());
        linux_startup(&mut u, IER_ERBFI);
        assert!(!u.irq_level());
        // Enabling ETBEI with THR empty raises THRE.
        u.write(IER_DLM, IER_ERBFI | IER_ETBEI);
        assert!(u.irq_level());
        assert_eq!(u.read(IIR_FCR), 0xc0 | IIR_THRI);
        // The IIR read acknowledged it.
        assert!(!u.irq_level());
        assert_eq!(u.read(IIR_FCR), 0xc0 | IIR_NO_INT);
        // A THR write makes THR empty again: THRE once more.
        u.write(RBR_THR_DLL, b'x');
        assert!(u.irq_level());
        assert!(!u.take_irq_pulse(), "level was low before: a plain edge");
        // A second write while THRE is pending pulses the output.
        u.write(RBR_THR_DLL, b'y');
        assert!(u.take_irq_pulse());
        assert!(!u.take_irq_pulse());
        // Disabling ETBEI drops it.
        u.write(IER_DLM, IER_ERBFI);
        assert!(!u.irq_level());
    }

    #[test]
    fn out2_gates_the_interrupt() {
        let mut u = Uart::new(Vec::new());
        linux_startup(&mut u, IER_ERBFI);
        u.write(MCR, MCR_DTR | MCR_RTS);
        assert_eq!(u.enqueue_rx(b"a"), 1);
        assert!(!u.irq_level());
        u.write(MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        assert!(u.irq_level());
    }

    #[test]
    fn rx_fifo_trigger_timeout_and_flow_control() {
        let mut u = Uart::new(Vec::new());
        linux_startup(&mut u, IER_ERBFI);
        assert_eq!(u.enqueue_rx(b"abc"), 3);
        // Below the 8-byte trigger: character timeout.
        assert_eq!(u.read(IIR_FCR), 0xc0 | IIR_CTI);
        assert_eq!(u.enqueue_rx(b"defgh"), 5);
        assert_eq!(u.read(IIR_FCR), 0xc0 | IIR_RDI);
        // The driver's receive loop: read while LSR.DR.
        let mut got = Vec::new();
        while u.read(LSR) & LSR_DR != 0 {
            got.push(u.read(RBR_THR_DLL));
        }
        assert_eq!(got, b"abcdefgh");
        assert!(!u.irq_level());
        // Bounded FIFO: never drops, reports what it took.
        let big = [7u8; 100];
        assert_eq!(u.enqueue_rx(&big), RX_FIFO_CAPACITY);
        assert_eq!(u.rx_space(), 0);
        assert_eq!(u.enqueue_rx(&big), 0);
        u.read(RBR_THR_DLL);
        assert_eq!(u.rx_space(), 1);
        // FIFO reset clears it.
        u.write(IIR_FCR, 0x87);
        assert_eq!(u.read(LSR) & LSR_DR, 0);
    }

    #[test]
    fn rx_without_fifo_reports_data_available() {
        let mut u = Uart::new(Vec::new());
        u.write(MCR, MCR_OUT2);
        u.write(IER_DLM, IER_ERBFI);
        u.enqueue_rx(b"z");
        assert_eq!(u.read(IIR_FCR), IIR_RDI);
        assert_eq!(u.read(RBR_THR_DLL), b'z');
        assert_eq!(u.read(IIR_FCR), IIR_NO_INT);
    }

    #[test]
    fn line_status_interrupt_outranks_rx() {
        let mut u = Uart::new(Vec::new());
        linux_startup(&mut u, IER_ERBFI | IER_ELSI);
        u.write(MCR, MCR_LOOP | MCR_OUT2);
        for i in 0..=RX_FIFO_CAPACITY {
            u.write(RBR_THR_DLL, i as u8);
        }
        assert_eq!(u.rx_overruns, 1);
        assert_eq!(u.read(IIR_FCR), 0xc0 | IIR_RLSI);
        let lsr = u.read(LSR);
        assert_eq!(lsr & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
        assert_eq!(u.read(LSR) & LSR_OE, 0, "read clears OE");
        assert_eq!(u.read(IIR_FCR), 0xc0 | IIR_RDI);
    }

    #[test]
    fn loopback_echoes_and_keeps_sink_quiet() {
        let mut u = Uart::new(Vec::new());
        linux_startup(&mut u, 0);
        u.write(MCR, MCR_LOOP | MCR_OUT2);
        assert_eq!(u.rx_space(), 0, "outside input held in loopback");
        u.write(RBR_THR_DLL, 0x55);
        assert_eq!(u.read(LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read(RBR_THR_DLL), 0x55);
        assert!(u.out_mut().is_empty());
    }

    #[test]
    fn modem_status_deltas_and_interrupt() {
        let mut u = Uart::new(Vec::new());
        linux_startup(&mut u, IER_EDSSI);
        assert_eq!(u.read(MSR), 0xb0);
        assert!(!u.irq_level());
        // Loopback with only OUT1 (-> RI): CTS, DSR, DCD drop.
        u.write(MCR, MCR_LOOP | MCR_OUT1);
        assert_eq!(u.read(IIR_FCR) & 0x0f, IIR_MSI);
        assert!(!u.irq_level(), "OUT2 is clear");
        assert_eq!(u.read(MSR), MSR_RI | MSR_DCTS | MSR_DDSR | MSR_DDCD);
        assert_eq!(u.read(MSR), MSR_RI);
        // RI falling sets TERI.
        u.write(MCR, MCR_LOOP | MCR_OUT2);
        assert_eq!(u.read(MSR), MSR_DCD | MSR_TERI | MSR_DDCD);
        assert!(!u.irq_level());
    }

    struct Failing;
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("sink closed"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sink_errors_are_counted_not_fatal() {
        let mut u = Uart::new(Failing);
        u.write(RBR_THR_DLL, b'a');
        u.write(RBR_THR_DLL, b'b');
        assert_eq!((u.tx_errors, u.tx_bytes), (2, 0));
        assert_ne!(u.read(LSR) & LSR_THRE, 0);
    }

    #[test]
    fn read_only_registers_count_writes() {
        let mut u = Uart::new(Vec::new());
        u.write(LSR, 0);
        u.write(MSR, 0);
        assert_eq!(u.read(8), 0xff);
        assert_eq!(u.unsupported_accesses, 3);
    }

    #[test]
    fn save_restore_keeps_fifo_and_registers() {
        let mut u = Uart::new(Vec::new());
        linux_startup(&mut u, IER_ERBFI);
        u.enqueue_rx(b"queued");
        let state = u.save();
        let mut v = Uart::new(Vec::new());
        v.restore(&state).unwrap();
        assert_eq!(v.save(), state);
        assert!(v.irq_level());
        assert_eq!(v.read(RBR_THR_DLL), b'q');
        let mut bad = state;
        bad.rx_fifo = vec![0; RX_FIFO_CAPACITY + 1];
        assert!(v.restore(&bad).is_err());
    }
}
