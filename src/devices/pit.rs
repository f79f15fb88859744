//! The 8254 programmable interval timer (ports 0x40–0x43) and the PC's
//! port B at 0x61 (channel 2 gate, speaker enable, channel 2 OUT, refresh
//! toggle).
//!
//! The PIT input clock is a free-running oscillator of [`PIT_HZ`] started
//! when the VM was created: clock tick `k` happens at guest time
//! `ceil(k * 1e9 / PIT_HZ)` ns. Every counter value and OUT level is a pure
//! function of the tick at which the counter was (re)loaded and the tick of
//! `now`, so replaying the same accesses at the same times gives the same
//! values.
//!
//! Simplifications, all invisible to Linux: a written count is loaded at the
//! write's own tick (no extra load clock); writing the first byte of a
//! two-byte count in mode 0 does not stop the counter; in mode 3 a new count
//! written while counting takes effect at the end of the period rather than
//! of the half period.

use serde::{Deserialize, Serialize};

use super::{check_version, ensure, Nanos, StateError};

/// Frequency of the PIT input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Period of the DRAM refresh toggle seen in port 0x61 bit 4 (about 15 µs on
/// a PC); the bit flips every period.
const REFRESH_PERIOD_NS: u64 = 15_085;

/// Version of [`PitState`] this build writes.
const PIT_STATE_VERSION: u32 = 1;

/// The PIT clock tick current at guest time `now`.
pub fn tick_at(now: Nanos) -> u64 {
    (u128::from(now) * u128::from(PIT_HZ) / NANOS_PER_SEC) as u64
}

/// The first guest time at which PIT clock tick `tick` has happened.
pub fn time_of_tick(tick: u64) -> Nanos {
    let ns = (u128::from(tick) * NANOS_PER_SEC).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

fn from_bcd(v: u16) -> u32 {
    let d = |s: u16| u32::from((v >> s) & 0xf);
    d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)
}

fn to_bcd(v: u32) -> u16 {
    let v = v % 10_000;
    ((v / 1000) << 12 | (v / 100 % 10) << 8 | (v / 10 % 10) << 4 | (v % 10)) as u16
}

/// Access mode from the control word: which bytes of the count a data-port
/// access reads or writes.
const ACCESS_LO: u8 = 1;
const ACCESS_HI: u8 = 2;
const ACCESS_LOHI: u8 = 3;

/// One counter's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    /// Counter mode 0..=5 (6 and 7 are stored as 2 and 3).
    pub mode: u8,
    /// Access mode: 1 = LSB, 2 = MSB, 3 = LSB then MSB.
    pub access: u8,
    /// BCD counting selected.
    pub bcd: bool,
    /// The count N in binary, 1..=65536 (1..=10000 in BCD); 0 written means
    /// the maximum.
    pub reload: u32,
    /// A count has been loaded since the last control word.
    pub count_written: bool,
    /// Modes 1 and 5: a gate rising edge has triggered the counter.
    pub triggered: bool,
    /// The GATE input.
    pub gate: bool,
    /// Clock tick at which `elapsed_at_base` was taken.
    pub base_tick: u64,
    /// Ticks counted before `base_tick` in the current count cycle (nonzero
    /// only after a gate pause in modes 0 and 4).
    pub elapsed_at_base: u64,
    /// A count written while counting, waiting for the reload point.
    pub pending_reload: Option<u32>,
    /// Elapsed ticks at which `pending_reload` takes effect (modes 2 and 3);
    /// `u64::MAX` means at the next gate trigger (modes 1 and 5).
    pub switch_elapsed: u64,
    /// Two-byte write: the LSB was written, the MSB comes next.
    pub write_hi_next: bool,
    /// The LSB of a two-byte write.
    pub write_latch: u8,
    /// Two-byte read of the live count: the MSB comes next.
    pub read_hi_next: bool,
    /// Count latched by a latch or read-back command.
    pub latched_count: Option<u16>,
    /// Two-byte read of the latched count: the MSB comes next.
    pub latched_hi_next: bool,
    /// Status latched by a read-back command.
    pub latched_status: Option<u8>,
    /// Rising edges of OUT not yet collected by [`Pit::poll`].
    pub pending_edges: u64,
    /// Clock tick up to which OUT edges have been counted.
    pub edges_tick: u64,
}

impl ChannelState {
    fn power_on(gate: bool) -> Self {
        Self {
            mode: 3,
            access: ACCESS_LOHI,
            bcd: false,
            reload: 65_536,
            count_written: false,
            triggered: false,
            gate,
            base_tick: 0,
            elapsed_at_base: 0,
            pending_reload: None,
            switch_elapsed: 0,
            write_hi_next: false,
            write_latch: 0,
            read_hi_next: false,
            latched_count: None,
            latched_hi_next: false,
            latched_status: None,
            pending_edges: 0,
            edges_tick: 0,
        }
    }

    fn modulus(&self) -> u32 {
        if self.bcd {
            10_000
        } else {
            65_536
        }
    }

    /// The count used for OUT timing: modes 2 and 3 need at least 2.
    fn period(&self) -> u64 {
        match self.mode {
            2 | 3 => u64::from(self.reload.max(2)),
            _ => u64::from(self.reload),
        }
    }

    /// Whether the counting element decrements.
    fn counting(&self) -> bool {
        self.count_written
            && match self.mode {
                1 | 5 => self.triggered,
                _ => self.gate,
            }
    }

    /// Ticks counted in the current cycle at tick `t` (t >= base_tick).
    fn elapsed(&self, t: u64) -> u64 {
        if self.counting() {
            self.elapsed_at_base + t.saturating_sub(self.base_tick)
        } else {
            self.elapsed_at_base
        }
    }

    /// OUT at tick `t`.
    fn out(&self, t: u64) -> bool {
        if !self.count_written {
            return self.mode != 0;
        }
        let d = self.elapsed(t);
        let n = self.period();
        match self.mode {
            0 => d >= n,
            1 => !self.triggered || d >= n,
            2 => !self.gate || d % n != n - 1,
            3 => !self.gate || d % n < n.div_ceil(2),
            4 => d != n,
            _ => !self.triggered || d != n,
        }
    }

    /// Rising edges of OUT in the current cycle up to and including tick `t`.
    fn edges_upto(&self, t: u64) -> u64 {
        if !self.counting() {
            return 0;
        }
        let d = self.elapsed(t);
        let n = self.period();
        match self.mode {
            0 | 1 => u64::from(d >= n),
            2 | 3 => d / n,
            _ => u64::from(d > n),
        }
    }

    /// The first tick after `t` at which OUT rises, if one is scheduled.
    fn next_edge_after(&self, t: u64) -> Option<u64> {
        if !self.counting() {
            return None;
        }
        let d = self.elapsed(t);
        let n = self.period();
        match self.mode {
            0 | 1 => (d < n).then(|| t + (n - d)),
            2 | 3 => Some(t + (n - d % n)),
            _ => (d <= n).then(|| t + (n + 1 - d)),
        }
    }

    /// Counts OUT edges up to tick `t` and applies a reload that fell due.
    fn advance(&mut self, t: u64) {
        let t = t.max(self.edges_tick);
        if let Some(new) = self.pending_reload {
            if self.counting() && self.switch_elapsed != u64::MAX {
                let switch_tick = self.base_tick.saturating_add(
                    self.switch_elapsed - self.elapsed_at_base.min(self.switch_elapsed),
                );
                if switch_tick <= t {
                    self.pending_edges += self
                        .edges_upto(switch_tick)
                        .saturating_sub(self.edges_upto(self.edges_tick));
                    self.edges_tick = switch_tick;
                    self.base_tick = switch_tick;
                    self.elapsed_at_base = 0;
                    self.reload = new;
                    self.pending_reload = None;
                }
            }
        }
        // Saturating: a restored state is the only way this could go negative.
        self.pending_edges += self
            .edges_upto(t)
            .saturating_sub(self.edges_upto(self.edges_tick));
        self.edges_tick = t;
    }

    /// Restarts the count cycle at tick `t` with the current reload value.
    fn restart(&mut self, t: u64) {
        self.base_tick = t;
        self.elapsed_at_base = 0;
        if let Some(new) = self.pending_reload.take() {
            self.reload = new;
        }
    }

    /// The counting element's value at tick `t`, as the guest reads it.
    fn count(&self, t: u64) -> u16 {
        let m = u64::from(self.modulus());
        let n = u64::from(self.reload);
        let v = if !self.count_written || (matches!(self.mode, 1 | 5) && !self.triggered) {
            n % m
        } else {
            let d = self.elapsed(t);
            match self.mode {
                2 => {
                    let p = self.period();
                    (p - d % p) % m
                }
                3 => {
                    let p = self.period();
                    let half = p.div_ceil(2);
                    let phase = d % p;
                    let into_half = if phase < half { phase } else { phase - half };
                    (p - 2 * into_half) % m
                }
                _ => (n + m - d % m) % m,
            }
        };
        if self.bcd {
            to_bcd(v as u32)
        } else {
            v as u16
        }
    }

    fn status(&self, t: u64) -> u8 {
        let null_count = !self.count_written || self.pending_reload.is_some();
        u8::from(self.out(t)) << 7
            | u8::from(null_count) << 6
            | self.access << 4
            | self.mode << 1
            | u8::from(self.bcd)
    }

    /// Applies `change` at tick `t`, counting a rising edge of OUT the
    /// change itself causes (e.g. a new mode word setting OUT high).
    fn reprogram(&mut self, t: u64, change: impl FnOnce(&mut Self, u64)) {
        self.advance(t);
        let before = self.out(t);
        change(self, t);
        if !before && self.out(t) {
            self.pending_edges += 1;
        }
    }

    fn control_word(&mut self, t: u64, val: u8) {
        self.reprogram(t, |c, t| {
            c.access = (val >> 4) & 3;
            c.mode = match (val >> 1) & 7 {
                6 => 2,
                7 => 3,
                m => m,
            };
            c.bcd = val & 1 != 0;
            c.count_written = false;
            c.triggered = false;
            c.pending_reload = None;
            c.base_tick = t;
            c.elapsed_at_base = 0;
            c.write_hi_next = false;
            c.read_hi_next = false;
            c.latched_count = None;
            c.latched_hi_next = false;
            c.latched_status = None;
        });
    }

    fn load_count(&mut self, t: u64, raw: u16) {
        let n = match (self.bcd, raw) {
            (false, 0) => 65_536,
            (false, v) => u32::from(v),
            (true, v) => match from_bcd(v) {
                0 => 10_000,
                b => b,
            },
        };
        self.reprogram(t, |c, t| {
            let running = c.count_written && c.counting();
            match c.mode {
                2 | 3 if running => {
                    let p = c.period();
                    c.pending_reload = Some(n);
                    c.switch_elapsed = (c.elapsed(t) / p + 1) * p;
                }
                1 | 5 if c.triggered => {
                    c.pending_reload = Some(n);
                    c.switch_elapsed = u64::MAX;
                }
                _ => {
                    c.reload = n;
                    c.pending_reload = None;
                    c.base_tick = t;
                    c.elapsed_at_base = 0;
                }
            }
            c.count_written = true;
        });
    }

    fn write_data(&mut self, t: u64, val: u8) {
        match self.access {
            ACCESS_LO => self.load_count(t, u16::from(val)),
            ACCESS_HI => self.load_count(t, u16::from(val) << 8),
            _ => {
                if self.write_hi_next {
                    self.write_hi_next = false;
                    self.load_count(t, u16::from(self.write_latch) | u16::from(val) << 8);
                } else {
                    self.write_hi_next = true;
                    self.write_latch = val;
                }
            }
        }
    }

    fn read_data(&mut self, t: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        if let Some(v) = self.latched_count {
            let [lo, hi] = v.to_le_bytes();
            return match self.access {
                ACCESS_LO => {
                    self.latched_count = None;
                    lo
                }
                ACCESS_HI => {
                    self.latched_count = None;
                    hi
                }
                _ if self.latched_hi_next => {
                    self.latched_count = None;
                    self.latched_hi_next = false;
                    hi
                }
                _ => {
                    self.latched_hi_next = true;
                    lo
                }
            };
        }
        let [lo, hi] = self.count(t).to_le_bytes();
        match self.access {
            ACCESS_LO => lo,
            ACCESS_HI => hi,
            _ => {
                self.read_hi_next = !self.read_hi_next;
                if self.read_hi_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn latch_count(&mut self, t: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.count(t));
            self.latched_hi_next = false;
        }
    }

    fn set_gate(&mut self, t: u64, gate: bool) {
        if gate == self.gate {
            return;
        }
        self.reprogram(t, |c, t| {
            // Freeze the cycle so far, then apply the new gate.
            c.elapsed_at_base = c.elapsed(t);
            c.base_tick = t;
            c.gate = gate;
            if gate {
                match c.mode {
                    2 | 3 => c.restart(t),
                    1 | 5 if c.count_written => {
                        c.triggered = true;
                        c.restart(t);
                    }
                    _ => {}
                }
            }
        });
    }
}

/// Serialisable state of the PIT and port 0x61.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Format version, [`PIT_STATE_VERSION`].
    pub version: u32,
    /// Channels 0, 1 and 2.
    pub channels: [ChannelState; 3],
    /// Port 0x61 bits 0–3 as written (gate 2, speaker, parity/IOCHK enables).
    pub port61: u8,
    /// Latest clock tick seen; time never runs backwards for the PIT.
    pub last_tick: u64,
}

/// The 8254 PIT with port B (0x61).
#[derive(Debug)]
pub struct Pit {
    st: PitState,
    /// Guest accesses the model ignored.
    pub unsupported_accesses: u64,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT at power-on: every channel in mode 3 without a count, so
    /// nothing counts until the guest programs it; channel 2's gate is low.
    pub fn new() -> Self {
        Self {
            st: PitState {
                version: PIT_STATE_VERSION,
                channels: [
                    ChannelState::power_on(true),
                    ChannelState::power_on(true),
                    ChannelState::power_on(false),
                ],
                port61: 0,
                last_tick: 0,
            },
            unsupported_accesses: 0,
        }
    }

    /// The current tick, never earlier than one already seen.
    fn tick(&mut self, now: Nanos) -> u64 {
        self.st.last_tick = self.st.last_tick.max(tick_at(now));
        self.st.last_tick
    }

    /// Reads port 0x40–0x42 (counters), 0x43 (reads 0xFF) or 0x61.
    pub fn read(&mut self, port: u16, now: Nanos) -> u8 {
        let t = self.tick(now);
        let v = match port {
            0x40..=0x42 => {
                let c = &mut self.st.channels[usize::from(port - 0x40)];
                c.advance(t);
                c.read_data(t)
            }
            0x61 => {
                let ch2 = &mut self.st.channels[2];
                ch2.advance(t);
                let refresh = (now / REFRESH_PERIOD_NS) & 1 == 1;
                self.st.port61 & 0x0f | u8::from(refresh) << 4 | u8::from(ch2.out(t)) << 5
            }
            _ => {
                // 0x43 is write-only on an 8254.
                self.unsupported_accesses += 1;
                0xff
            }
        };
        self.drop_unwired_edges();
        v
    }

    /// Only channel 0 is wired to an interrupt; the others' edge counts are
    /// dropped so they do not pile up in the state.
    fn drop_unwired_edges(&mut self) {
        for c in &mut self.st.channels[1..] {
            c.pending_edges = 0;
        }
    }

    /// Writes port 0x40–0x42 (counts), 0x43 (control word) or 0x61.
    pub fn write(&mut self, port: u16, val: u8, now: Nanos) {
        let t = self.tick(now);
        match port {
            0x40..=0x42 => self.st.channels[usize::from(port - 0x40)].write_data(t, val),
            0x43 => self.control(t, val),
            0x61 => {
                self.st.port61 = val & 0x0f;
                self.st.channels[2].set_gate(t, val & 1 != 0);
            }
            _ => self.unsupported_accesses += 1,
        }
        self.drop_unwired_edges();
    }

    fn control(&mut self, t: u64, val: u8) {
        let sel = val >> 6;
        if sel == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
            for (i, c) in self.st.channels.iter_mut().enumerate() {
                if val & (2 << i) == 0 {
                    continue;
                }
                c.advance(t);
                if val & 0x20 == 0 {
                    c.latch_count(t);
                }
                if val & 0x10 == 0 && c.latched_status.is_none() {
                    c.latched_status = Some(c.status(t));
                }
            }
            return;
        }
        let c = &mut self.st.channels[usize::from(sel)];
        if (val >> 4) & 3 == 0 {
            c.advance(t);
            c.latch_count(t);
        } else {
            c.control_word(t, val);
        }
    }

    /// Number of channel-0 OUT rising edges (IRQ0 requests) since the
    /// previous poll, including edges caused by reprogramming.
    pub fn poll(&mut self, now: Nanos) -> u32 {
        let t = self.tick(now);
        let c = &mut self.st.channels[0];
        c.advance(t);
        let n = std::mem::take(&mut c.pending_edges);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// When the next channel-0 rising edge happens (a time already past if
    /// edges are waiting for [`Pit::poll`]); `None` if none is scheduled.
    pub fn next_irq_deadline(&self) -> Option<Nanos> {
        let c = &self.st.channels[0];
        if c.pending_edges > 0 {
            return Some(time_of_tick(c.edges_tick));
        }
        c.next_edge_after(c.edges_tick).map(time_of_tick)
    }

    /// The latest channel-0 rising edge up to the last [`Pit::poll`]
    /// (guest ns), in the periodic modes (2 and 3); `None` in the one-shot
    /// modes or before the first edge.
    pub fn last_irq_edge(&self) -> Option<Nanos> {
        let c = &self.st.channels[0];
        if !c.counting() || !matches!(c.mode, 2 | 3) {
            return None;
        }
        let t = c.edges_tick;
        let d = c.elapsed(t);
        let n = c.period().max(1);
        (d >= n).then(|| time_of_tick(t - d % n))
    }

    /// Channel 0's period in PIT input ticks when it runs periodically
    /// (modes 2 and 3); `None` in the one-shot modes.
    pub fn channel0_period(&self) -> Option<u64> {
        let c = &self.st.channels[0];
        matches!(c.mode, 2 | 3).then(|| c.period().max(1))
    }

    /// Channel 2's OUT at `now` (what port 0x61 bit 5 shows).
    pub fn channel2_out(&self, now: Nanos) -> bool {
        self.st.channels[2].out(tick_at(now).max(self.st.last_tick))
    }

    /// Snapshot of the guest-visible state.
    pub fn save(&self) -> PitState {
        self.st.clone()
    }

    /// Replaces the state with a snapshot from [`Pit::save`].
    pub fn restore(&mut self, state: &PitState) -> Result<(), StateError> {
        check_version("pit", state.version, PIT_STATE_VERSION)?;
        for c in &state.channels {
            ensure(c.mode <= 5, "pit", "mode out of range")?;
            ensure(
                matches!(c.access, ACCESS_LO | ACCESS_HI | ACCESS_LOHI),
                "pit",
                "access mode out of range",
            )?;
            let ok = |n: u32| (1..=c.modulus()).contains(&n);
            ensure(ok(c.reload), "pit", "reload out of range")?;
            ensure(
                c.pending_reload.is_none_or(ok),
                "pit",
                "pending reload out of range",
            )?;
            ensure(
                c.base_tick <= state.last_tick && c.edges_tick <= state.last_tick,
                "pit",
                "tick in the future",
            )?;
        }
        self.st = state.clone();
        Ok(())
    }
}

#[cfg(test)]
#[path = "pit_tests.rs"]
mod tests;
