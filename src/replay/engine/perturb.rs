//! A test hook that makes a replay wrong on purpose: `twinvm replay
//! --test-perturb KIND@LANDMARK` (hidden). At that landmark the backup
//! changes its own machine in a way the primary never did, so tests can
//! prove that each divergence detector fires. Nothing else uses it.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::{kvm_err, Engine, Role, RunError};
use crate::vmm::vm::{read_msr, GuestWrite, VmError};

/// The CMOS RAM byte `device:rtc` flips: general-purpose RAM no test guest
/// reads, so only the devices' saved state differs.
pub const PERTURBED_CMOS_INDEX: u8 = 0x7f;

/// The bit `msr:INDEX` flips (bit 12 keeps an address canonical).
const MSR_FLIP: u64 = 1 << 12;

/// What the backup does that the primary did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerturbKind {
    /// Flip the byte at this guest-physical address, written the way the
    /// VMM writes guest memory (tracked like any VMM write).
    WritePage { gpa: u64 },
    /// Flip CMOS RAM byte [`PERTURBED_CMOS_INDEX`] of the RTC.
    DeviceRtc,
    /// Flip bit 12 of this MSR of the vCPU (one the digests cover, which the
    /// guest does not use, e.g. IA32_KERNEL_GS_BASE 0xc0000102 for guests
    /// that never SWAPGS).
    Msr { index: u32 },
}

/// A perturbation and the landmark where the backup applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestPerturbation {
    pub kind: PerturbKind,
    pub landmark: u64,
}

/// A `--test-perturb` value that cannot be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PerturbParseError {
    #[error("expected KIND@LANDMARK (KIND is write-page:GPA, device:rtc or msr:INDEX), got {0:?}")]
    Shape(String),
    #[error("unknown perturbation {0:?} (known: write-page:GPA, device:rtc, msr:INDEX)")]
    UnknownKind(String),
    #[error("unknown device {0:?} to perturb (known: rtc)")]
    UnknownDevice(String),
    #[error("{what} {text:?} is not a number (decimal, or hex with 0x)")]
    Number { what: &'static str, text: String },
}

fn number(what: &'static str, text: &str) -> Result<u64, PerturbParseError> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| PerturbParseError::Number {
        what,
        text: text.to_string(),
    })
}

impl FromStr for TestPerturbation {
    type Err = PerturbParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((kind, landmark)) = s.split_once('@') else {
            return Err(PerturbParseError::Shape(s.to_string()));
        };
        let landmark = number("landmark", landmark)?;
        let kind = match kind.split_once(':') {
            Some(("write-page", gpa)) => PerturbKind::WritePage {
                gpa: number("guest-physical address", gpa)?,
            },
            Some(("device", "rtc")) => PerturbKind::DeviceRtc,
            Some(("device", other)) => return Err(PerturbParseError::UnknownDevice(other.into())),
            Some(("msr", index)) => PerturbKind::Msr {
                index: u32::try_from(number("MSR index", index)?).map_err(|_| {
                    PerturbParseError::Number {
                        what: "MSR index",
                        text: index.to_string(),
                    }
                })?,
            },
            _ => return Err(PerturbParseError::UnknownKind(kind.to_string())),
        };
        Ok(TestPerturbation { kind, landmark })
    }
}

impl fmt::Display for TestPerturbation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PerturbKind::WritePage { gpa } => write!(f, "write-page:{gpa:#x}")?,
            PerturbKind::DeviceRtc => write!(f, "device:rtc")?,
            PerturbKind::Msr { index } => write!(f, "msr:{index:#x}")?,
        }
        write!(f, "@{}", self.landmark)
    }
}

impl Engine {
    /// Make this replica wrong at landmark `p.landmark` (a replay only).
    pub fn set_test_perturbation(&mut self, p: Option<TestPerturbation>) {
        self.test_perturbation = p;
        // A replica that catches up must still execute that landmark.
        if let Role::Replay(schedule) = &mut self.role {
            schedule.hold_catch_up_at(p.map(|p| p.landmark));
        }
    }

    /// A perturbation asked for and not applied yet (its landmark was never
    /// reached): a test must not mistake that for a detector that missed it.
    pub fn test_perturbation_pending(&self) -> Option<TestPerturbation> {
        self.test_perturbation
    }

    /// At the start of each replayed landmark: apply the perturbation if
    /// this is its landmark.
    pub(super) fn apply_test_perturbation(&mut self) -> Result<(), RunError> {
        let Some(p) = self
            .test_perturbation
            .filter(|p| p.landmark == self.landmark)
        else {
            return Ok(());
        };
        self.test_perturbation = None;
        if let Role::Replay(schedule) = &mut self.role {
            schedule.hold_catch_up_at(None);
        }
        match p.kind {
            PerturbKind::WritePage { gpa } => {
                let old: u8 = self.vm.mem.read_obj(GuestAddress(gpa)).unwrap_or(0);
                self.vm.write_guest(gpa, &[!old], GuestWrite::Vmm)?;
            }
            PerturbKind::DeviceRtc => {
                let old = self.platform.rtc.save().cmos[usize::from(PERTURBED_CMOS_INDEX)];
                self.platform.rtc.set_ram(PERTURBED_CMOS_INDEX, !old);
            }
            PerturbKind::Msr { index } => {
                let value = read_msr(&self.vm.vcpu, index)
                    .map_err(kvm_err("get MSR"))?
                    .ok_or(VmError::MsrAccess("read", index))?;
                let one = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                    index,
                    data: value ^ MSR_FLIP,
                    ..Default::default()
                }])
                .expect("one entry fits");
                if self.vm.vcpu.set_msrs(&one).map_err(kvm_err("set MSR"))? != 1 {
                    return Err(VmError::MsrAccess("write", index).into());
                }
            }
        }
        tracing::warn!(%p, "test perturbation applied: this replay is wrong on purpose");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perturbations_parse_and_print_back() {
        for (text, kind, landmark) in [
            (
                "write-page:0x3000000@10",
                PerturbKind::WritePage { gpa: 0x300_0000 },
                10,
            ),
            (
                "write-page:4096@0x20",
                PerturbKind::WritePage { gpa: 4096 },
                32,
            ),
            ("device:rtc@7", PerturbKind::DeviceRtc, 7),
            (
                "msr:0xc0000102@5",
                PerturbKind::Msr { index: 0xc000_0102 },
                5,
            ),
        ] {
            let p: TestPerturbation = text.parse().unwrap();
            assert_eq!(p, TestPerturbation { kind, landmark });
            assert_eq!(p.to_string().parse::<TestPerturbation>(), Ok(p));
        }
    }

    #[test]
    fn bad_perturbations_say_what_is_wrong() {
        let err = |s: &str| s.parse::<TestPerturbation>().unwrap_err().to_string();
        assert!(err("write-page:0x1000").contains("expected KIND@LANDMARK"));
        assert!(err("flip@3").contains("unknown perturbation \"flip\""));
        assert!(err("write-page:zz@3").contains("guest-physical address \"zz\" is not a number"));
        assert!(err("device:pit@3").contains("unknown device \"pit\""));
        assert!(err("device:rtc@-1").contains("landmark \"-1\" is not a number"));
        assert!(err("device:rtc@").contains("landmark \"\" is not a number"));
        assert!(err("msr:0x100000000@1").contains("MSR index \"0x100000000\" is not a number"));
    }
}
