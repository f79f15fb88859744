//! The MC146818 CMOS real-time clock: index port 0x70 (bit 7 = NMI
//! disable), data port 0x71.
//!
//! The clock is `boot_unix_secs` at guest time 0 and runs with guest time.
//! Registers 0x00–0x09 and the century byte (0x32) are computed from `now`
//! on every read, in the format register B selects (binary or BCD, 24 or
//! 12 hour). While register B's SET bit is on they freeze and the guest
//! may write them; clearing SET starts the clock from the written values,
//! kept as an offset. Register A's UIP bit is on during the last 244 µs
//! before each second boundary.
//!
//! No interrupts: PIE, AIE and UIE are stored, IRQ8 is never raised. Only
//! register C's UF flag is maintained (set when a second boundary passed
//! since C was last read); AF and PF stay clear. Linux reads the time by
//! polling and does not need IRQ8.

use serde::{Deserialize, Serialize};

use super::{check_version, ensure, Nanos, StateError};

/// Version of [`RtcState`] this build writes.
const RTC_STATE_VERSION: u32 = 1;

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// UIP is set this long before each update.
const UIP_NS: u64 = 244_000;

const REG_SEC: u8 = 0x00;
const REG_MIN: u8 = 0x02;
const REG_HOUR: u8 = 0x04;
const REG_WDAY: u8 = 0x06;
const REG_MDAY: u8 = 0x07;
const REG_MON: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;

const CMOS_SIZE: usize = 128;

/// The registers that hold the time and date.
const TIME_REGS: [u8; 8] = [
    REG_SEC,
    REG_MIN,
    REG_HOUR,
    REG_WDAY,
    REG_MDAY,
    REG_MON,
    REG_YEAR,
    REG_CENTURY,
];

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's
/// algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month 1..=12, day 1..=31) `z` days after 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Broken-down time, all fields binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 1 = Sunday .. 7 = Saturday, as the MC146818 counts.
    weekday: u32,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            // 1970-01-01 was a Thursday (day 5 counting Sunday as 1).
            weekday: ((days + 4).rem_euclid(7) + 1) as u32,
        }
    }

    /// Seconds since the epoch, or `None` if a field is out of range.
    fn to_unix(self) -> Option<i64> {
        let ok = (0..=9999).contains(&self.year)
            && (1..=12).contains(&self.month)
            && (1..=days_in_month(self.year, self.month)).contains(&self.day)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60;
        ok.then(|| {
            days_from_civil(self.year, self.month, self.day) * 86_400
                + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
        })
    }
}

/// Serialisable state of the RTC and CMOS RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// Format version, [`RTC_STATE_VERSION`].
    pub version: u32,
    /// Selected CMOS index (0..=127).
    pub index: u8,
    /// NMI disable bit from the last index write.
    pub nmi_disabled: bool,
    /// The 128 bytes of CMOS. Time registers hold the frozen values while
    /// SET is on and are recomputed otherwise.
    pub cmos: Vec<u8>,
    /// Wall-clock second at the start of guest second 0 (see `phase_ns`).
    pub base_secs: i64,
    /// Offset of the wall clock's second boundaries from guest time, ns
    /// (0..1e9): wall second = base_secs + (now + phase_ns) / 1e9.
    pub phase_ns: u64,
    /// Guest second index at the last register C read (for UF).
    pub uf_second: u64,
}

/// The MC146818 RTC with its CMOS RAM.
#[derive(Debug)]
pub struct Rtc {
    st: RtcState,
    /// Guest accesses the model ignored (writes to read-only registers,
    /// invalid dates).
    pub unsupported_accesses: u64,
}

impl Rtc {
    /// An RTC that shows `boot_unix_secs` at guest time 0, 24-hour BCD mode.
    pub fn new(boot_unix_secs: u64) -> Self {
        let mut cmos = vec![0; CMOS_SIZE];
        cmos[usize::from(REG_A)] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        cmos[usize::from(REG_B)] = B_24H;
        cmos[usize::from(REG_D)] = D_VRT;
        Self {
            st: RtcState {
                version: RTC_STATE_VERSION,
                index: 0,
                nmi_disabled: false,
                cmos,
                base_secs: i64::try_from(boot_unix_secs).unwrap_or(i64::MAX / 2),
                phase_ns: 0,
                uf_second: 0,
            },
            unsupported_accesses: 0,
        }
    }

    fn reg_b(&self) -> u8 {
        self.st.cmos[usize::from(REG_B)]
    }

    fn frozen(&self) -> bool {
        self.reg_b() & B_SET != 0
    }

    /// Guest seconds since creation, shifted by the wall clock's phase.
    fn second_index(&self, now: Nanos) -> u64 {
        ((u128::from(now) + u128::from(self.st.phase_ns)) / u128::from(NANOS_PER_SEC)) as u64
    }

    /// Wall-clock seconds since the epoch at `now`.
    pub fn unix_time(&self, now: Nanos) -> i64 {
        self.st
            .base_secs
            .saturating_add(i64::try_from(self.second_index(now)).unwrap_or(i64::MAX))
    }

    fn encode(&self, v: u32) -> u8 {
        if self.reg_b() & B_DM_BINARY != 0 {
            v as u8
        } else {
            (((v / 10 % 10) << 4) | (v % 10)) as u8
        }
    }

    fn decode(&self, raw: u8) -> u32 {
        if self.reg_b() & B_DM_BINARY != 0 {
            u32::from(raw)
        } else {
            u32::from(raw >> 4) * 10 + u32::from(raw & 0xf)
        }
    }

    fn encode_hour(&self, h: u32) -> u8 {
        if self.reg_b() & B_24H != 0 {
            self.encode(h)
        } else {
            let h12 = match h % 12 {
                0 => 12,
                x => x,
            };
            self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
        }
    }

    fn decode_hour(&self, raw: u8) -> u32 {
        if self.reg_b() & B_24H != 0 {
            self.decode(raw)
        } else {
            self.decode(raw & 0x7f) % 12 + if raw & 0x80 != 0 { 12 } else { 0 }
        }
    }

    /// The time registers' contents at `now`, in the current format.
    fn time_regs(&self, now: Nanos) -> [(u8, u8); 8] {
        let t = DateTime::from_unix(self.unix_time(now));
        let year = t.year.rem_euclid(10_000) as u32;
        [
            (REG_SEC, self.encode(t.second)),
            (REG_MIN, self.encode(t.minute)),
            (REG_HOUR, self.encode_hour(t.hour)),
            (REG_WDAY, self.encode(t.weekday)),
            (REG_MDAY, self.encode(t.day)),
            (REG_MON, self.encode(t.month)),
            (REG_YEAR, self.encode(year % 100)),
            (REG_CENTURY, self.encode(year / 100)),
        ]
    }

    /// Copies the live time into the CMOS time registers.
    fn snapshot_time(&mut self, now: Nanos) {
        for (reg, val) in self.time_regs(now) {
            self.st.cmos[usize::from(reg)] = val;
        }
    }

    /// Restarts the clock from the CMOS time registers, keeping the phase
    /// of the second boundaries.
    fn start_from_regs(&mut self, now: Nanos) {
        let r = |reg: u8| self.st.cmos[usize::from(reg)];
        let t = DateTime {
            year: i64::from(self.decode(r(REG_CENTURY)) * 100 + self.decode(r(REG_YEAR))),
            month: self.decode(r(REG_MON)),
            day: self.decode(r(REG_MDAY)),
            hour: self.decode_hour(r(REG_HOUR)),
            minute: self.decode(r(REG_MIN)),
            second: self.decode(r(REG_SEC)),
            weekday: 0,
        };
        match t.to_unix() {
            Some(secs) => {
                let elapsed = i64::try_from(self.second_index(now)).unwrap_or(i64::MAX);
                self.st.base_secs = secs.saturating_sub(elapsed);
            }
            None => {
                tracing::debug!(?t, "RTC: guest set an invalid date; clock unchanged");
                self.unsupported_accesses += 1;
            }
        }
    }

    /// Reads port 0x70 (reads 0xFF: the index is write-only) or 0x71.
    pub fn read(&mut self, port: u16, now: Nanos) -> u8 {
        match port {
            0x70 => 0xff,
            0x71 => self.read_reg(self.st.index, now),
            _ => {
                self.unsupported_accesses += 1;
                0xff
            }
        }
    }

    /// Writes port 0x70 (index and NMI disable) or 0x71.
    pub fn write(&mut self, port: u16, val: u8, now: Nanos) {
        match port {
            0x70 => {
                self.st.index = val & 0x7f;
                self.st.nmi_disabled = val & 0x80 != 0;
            }
            0x71 => self.write_reg(self.st.index, val, now),
            _ => self.unsupported_accesses += 1,
        }
    }

    fn read_reg(&mut self, index: u8, now: Nanos) -> u8 {
        match index {
            _ if TIME_REGS.contains(&index) && !self.frozen() => self
                .time_regs(now)
                .iter()
                .find(|(r, _)| *r == index)
                .map_or(0, |&(_, v)| v),
            REG_A => {
                let into_second =
                    (u128::from(now) + u128::from(self.st.phase_ns)) % u128::from(NANOS_PER_SEC);
                let uip = !self.frozen() && into_second >= u128::from(NANOS_PER_SEC - UIP_NS);
                self.st.cmos[usize::from(REG_A)] & 0x7f | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                let second = self.second_index(now);
                let mut flags = self.st.cmos[usize::from(REG_C)];
                if !self.frozen() && second > self.st.uf_second {
                    flags |= C_UF;
                }
                if flags & self.reg_b() & 0x70 != 0 {
                    flags |= C_IRQF;
                }
                self.st.uf_second = second;
                self.st.cmos[usize::from(REG_C)] = 0;
                flags
            }
            REG_D => D_VRT,
            _ => self.st.cmos[usize::from(index)],
        }
    }

    fn write_reg(&mut self, index: u8, val: u8, now: Nanos) {
        match index {
            _ if TIME_REGS.contains(&index) => {
                if self.frozen() {
                    self.st.cmos[usize::from(index)] = val;
                } else {
                    // A running clock takes the new value and carries on.
                    self.snapshot_time(now);
                    self.st.cmos[usize::from(index)] = val;
                    self.start_from_regs(now);
                }
            }
            REG_A => self.st.cmos[usize::from(REG_A)] = val & 0x7f,
            REG_B => {
                let was_set = self.frozen();
                let val = if val & B_SET != 0 { val & !B_UIE } else { val };
                if !was_set && val & B_SET != 0 {
                    // Freeze in the old format, then switch format.
                    self.snapshot_time(now);
                }
                self.st.cmos[usize::from(REG_B)] = val;
                if was_set && val & B_SET == 0 {
                    self.start_from_regs(now);
                }
            }
            REG_C | REG_D => self.unsupported_accesses += 1,
            _ => self.st.cmos[usize::from(index)] = val,
        }
    }

    /// Sets a byte of CMOS RAM (index 0x0E..=0x7F, not the century byte)
    /// before boot, e.g. memory-size bytes a firmware would fill in.
    pub fn set_ram(&mut self, index: u8, val: u8) {
        if (0x0e..0x80).contains(&index) && index != REG_CENTURY {
            self.st.cmos[usize::from(index)] = val;
        }
    }

    /// Snapshot of the guest-visible state.
    pub fn save(&self) -> RtcState {
        self.st.clone()
    }

    /// Replaces the state with a snapshot from [`Rtc::save`].
    pub fn restore(&mut self, state: &RtcState) -> Result<(), StateError> {
        check_version("rtc", state.version, RTC_STATE_VERSION)?;
        ensure(
            state.cmos.len() == CMOS_SIZE,
            "rtc",
            "CMOS is not 128 bytes",
        )?;
        ensure(state.index < 0x80, "rtc", "index out of range")?;
        ensure(state.phase_ns < NANOS_PER_SEC, "rtc", "phase out of range")?;
        self.st = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = NANOS_PER_SEC;
    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP_EVE: u64 = 1_709_251_198;

    fn read(rtc: &mut Rtc, idx: u8, now: Nanos) -> u8 {
        rtc.write(0x70, idx, now);
        rtc.read(0x71, now)
    }

    fn write(rtc: &mut Rtc, idx: u8, val: u8, now: Nanos) {
        rtc.write(0x70, idx, now);
        rtc.write(0x71, val, now);
    }

    /// What Linux's mc146818_get_time() gathers, decoded from BCD.
    fn read_bcd_time(rtc: &mut Rtc, now: Nanos) -> [u8; 7] {
        let bcd = |v: u8| (v >> 4) * 10 + (v & 0xf);
        [
            REG_CENTURY,
            REG_YEAR,
            REG_MON,
            REG_MDAY,
            REG_HOUR,
            REG_MIN,
            REG_SEC,
        ]
        .map(|r| bcd(read(rtc, r, now)))
    }

    #[test]
    fn calendar_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for z in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(z);
            assert!((1..=days_in_month(y, m)).contains(&d));
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert!(is_leap(2000) && is_leap(2024) && !is_leap(1900) && !is_leap(2100));
    }

    #[test]
    fn reads_bcd_time_across_leap_day_and_month() {
        let mut rtc = Rtc::new(LEAP_EVE);
        assert_eq!(read_bcd_time(&mut rtc, 0), [20, 24, 2, 29, 23, 59, 58]);
        assert_eq!(read(&mut rtc, REG_WDAY, 0), 5, "Thursday");
        assert_eq!(read_bcd_time(&mut rtc, 2 * SEC), [20, 24, 3, 1, 0, 0, 0]);
        assert_eq!(read(&mut rtc, REG_WDAY, 2 * SEC), 6, "Friday");
        // The year rolls over too.
        let mut rtc = Rtc::new(1_735_689_599); // 2024-12-31 23:59:59
        assert_eq!(read_bcd_time(&mut rtc, SEC), [20, 25, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut rtc = Rtc::new(LEAP_EVE);
        write(&mut rtc, REG_B, B_DM_BINARY, 0); // binary, 12-hour
        assert_eq!(read(&mut rtc, REG_HOUR, 0), 0x80 | 11, "11 PM");
        assert_eq!(read(&mut rtc, REG_MIN, 0), 59);
        assert_eq!(read(&mut rtc, REG_HOUR, 2 * SEC), 12, "12 AM");
        write(&mut rtc, REG_B, B_DM_BINARY | B_24H, 0);
        assert_eq!(read(&mut rtc, REG_HOUR, 0), 23);
        assert_eq!(read(&mut rtc, REG_YEAR, 0), 24);
    }

    #[test]
    fn uip_in_last_244us_of_each_second() {
        let mut rtc = Rtc::new(LEAP_EVE);
        assert_eq!(read(&mut rtc, REG_A, 0), 0x26);
        assert_eq!(read(&mut rtc, REG_A, SEC - UIP_NS - 1), 0x26);
        assert_eq!(read(&mut rtc, REG_A, SEC - UIP_NS), 0xa6);
        assert_eq!(read(&mut rtc, REG_A, 5 * SEC - 1), 0xa6);
        assert_eq!(read(&mut rtc, REG_A, 5 * SEC), 0x26);
        // Linux waits for UIP to clear, then reads: the seconds changed.
        let mut now = SEC - 100_000;
        while read(&mut rtc, REG_A, now) & A_UIP != 0 {
            now += 10_000;
        }
        assert_eq!(now, SEC);
        assert_eq!(read(&mut rtc, REG_SEC, now), 0x59);
    }

    #[test]
    fn set_bit_freezes_and_guest_sets_time() {
        let mut rtc = Rtc::new(LEAP_EVE);
        // hwclock --systohc: SET, write fields (BCD), clear SET.
        write(&mut rtc, REG_B, B_SET | B_24H | B_UIE, 10 * SEC);
        assert_eq!(read(&mut rtc, REG_B, 10 * SEC) & B_UIE, 0, "SET clears UIE");
        assert_eq!(read(&mut rtc, REG_SEC, 10 * SEC), 0x08);
        assert_eq!(read(&mut rtc, REG_SEC, 20 * SEC), 0x08, "frozen");
        for (reg, val) in [
            (REG_YEAR, 0x99),
            (REG_CENTURY, 0x19),
            (REG_MON, 0x12),
            (REG_MDAY, 0x31),
            (REG_HOUR, 0x23),
            (REG_MIN, 0x59),
            (REG_SEC, 0x50),
        ] {
            write(&mut rtc, reg, val, 20 * SEC);
        }
        write(&mut rtc, REG_B, B_24H, 20 * SEC);
        assert_eq!(
            read_bcd_time(&mut rtc, 20 * SEC),
            [19, 99, 12, 31, 23, 59, 50]
        );
        assert_eq!(read_bcd_time(&mut rtc, 30 * SEC), [20, 0, 1, 1, 0, 0, 0]);
        assert_eq!(rtc.unix_time(30 * SEC), 946_684_800);
    }

    #[test]
    fn writing_a_running_clock_adjusts_it() {
        let mut rtc = Rtc::new(LEAP_EVE);
        write(&mut rtc, REG_MIN, 0x30, 0);
        assert_eq!(read_bcd_time(&mut rtc, SEC), [20, 24, 2, 29, 23, 30, 59]);
    }

    #[test]
    fn invalid_date_is_refused_and_counted() {
        let mut rtc = Rtc::new(LEAP_EVE);
        write(&mut rtc, REG_B, B_SET | B_24H, 0);
        write(&mut rtc, REG_MON, 0x13, 0);
        write(&mut rtc, REG_B, B_24H, 0);
        assert_eq!(rtc.unsupported_accesses, 1);
        assert_eq!(rtc.unix_time(0), LEAP_EVE as i64);
    }

    #[test]
    fn register_c_and_d() {
        let mut rtc = Rtc::new(LEAP_EVE);
        assert_eq!(read(&mut rtc, REG_D, 0), 0x80);
        assert_eq!(read(&mut rtc, REG_C, SEC / 2), 0);
        assert_eq!(read(&mut rtc, REG_C, 3 * SEC), C_UF);
        assert_eq!(read(&mut rtc, REG_C, 3 * SEC), 0, "read clears");
        write(&mut rtc, REG_B, B_24H | B_UIE, 3 * SEC);
        assert_eq!(read(&mut rtc, REG_C, 4 * SEC), C_UF | C_IRQF);
        write(&mut rtc, REG_C, 0xff, 0);
        write(&mut rtc, REG_D, 0x00, 0);
        assert_eq!(rtc.unsupported_accesses, 2);
    }

    #[test]
    fn cmos_ram_and_index_port() {
        let mut rtc = Rtc::new(0);
        write(&mut rtc, 0x40, 0xab, 0);
        assert_eq!(read(&mut rtc, 0x40, 0), 0xab);
        // Bit 7 of the index disables NMI and is not part of the index.
        rtc.write(0x70, 0x80 | 0x40, 0);
        assert_eq!(rtc.read(0x71, 0), 0xab);
        assert!(rtc.save().nmi_disabled);
        assert_eq!(rtc.read(0x70, 0), 0xff);
        rtc.set_ram(0x15, 0x80);
        assert_eq!(read(&mut rtc, 0x15, 0), 0x80);
        // Alarm registers are plain storage.
        write(&mut rtc, 0x01, 0x42, 0);
        assert_eq!(read(&mut rtc, 0x01, 0), 0x42);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut rtc = Rtc::new(LEAP_EVE);
        write(&mut rtc, REG_MIN, 0x10, 0);
        let state = rtc.save();
        let mut other = Rtc::new(0);
        other.restore(&state).unwrap();
        assert_eq!(
            read_bcd_time(&mut other, 5 * SEC),
            read_bcd_time(&mut rtc, 5 * SEC)
        );
        let mut bad = state;
        bad.cmos.pop();
        assert!(other.restore(&bad).is_err());
    }
}
