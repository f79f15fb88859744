//! Traps twinvm planted or finishes itself: time and entropy reads
//! (landmarks whose value the primary supplies and logs) and the syscall
//! fix's completions.

use super::{describe_record, kvm_err, ClockUse, Engine, RunError};
use crate::replay::digest::LandmarkKind;
use crate::replay::log::Record;
use crate::vmm::emulate::{self, RandomRequest};
use crate::vmm::guest_cpu::KvmGuestCpu;
use crate::vmm::sys;
use crate::vmm::traps::PlantedTrap;

/// The planted-trap and RDRAND/RDSEED request for a trap at `rip`.
fn random_request_for(trap: PlantedTrap, rip: u64) -> Option<RandomRequest> {
    match trap {
        PlantedTrap::Random { dest, seed, len } => Some(RandomRequest {
            dest,
            seed,
            next_rip: rip + u64::from(len),
        }),
        _ => None,
    }
}

impl Engine {
    /// Emulation failures twinvm caused itself or finishes itself, before
    /// the general fallback: a planted time or entropy trap (a landmark), the
    /// syscall fix's #PF-entry trap, and `sysretq`. Returns whether it was
    /// one, and whether it was a landmark.
    pub(super) fn own_emulation_failure(&mut self) -> Result<Option<bool>, RunError> {
        self.syscall_fix.ensure_planted(&self.vm)?;
        let bytes = sys::internal_error(&mut self.vm.vcpu)
            .instruction_bytes()
            .unwrap_or_default();
        if bytes.first() == Some(&0xcc) {
            let rip = self.vm.vcpu.get_regs().map_err(kvm_err("get regs"))?.rip;
            if let Some(trap) = self.vm.planted_traps.get(&rip).copied() {
                match random_request_for(trap, rip) {
                    Some(request) => self.random_read(request, rip)?,
                    None => self.time_trap(trap, rip)?,
                }
                return Ok(Some(true));
            }
            if self.syscall_fix.on_trap(&self.vm, rip)? {
                self.stats.syscall_fixes += 1;
                return Ok(Some(false));
            }
        } else if self.syscall_fix.on_sysret(&self.vm, &bytes)? {
            self.stats.syscall_fixes += 1;
            return Ok(Some(false));
        }
        Ok(None)
    }

    /// A RDRAND/RDSEED at a planted trap or as an emulation failure: a
    /// landmark. The primary performs it on the host and logs the value; the
    /// backup takes the logged value.
    pub(super) fn random_read(&mut self, request: RandomRequest, rip: u64) -> Result<(), RunError> {
        self.new_landmark(LandmarkKind::RandomTrap { rip });
        self.stats.random_reads += 1;
        let value = if self.role.replaying() {
            match self.take_here()? {
                Some(Record::Random { value, .. }) => value,
                other => {
                    return Err(self.diverged(format!(
                        "the guest executed RDRAND/RDSEED but the log holds {}",
                        describe_record(other.as_ref())
                    )))
                }
            }
        } else {
            sys::host_random(request.seed).map_err(RunError::HostRandom)?
        };
        self.log(Record::Random {
            landmark: self.landmark,
            value,
        })?;
        emulate::complete_random(&mut KvmGuestCpu { vm: &self.vm }, request, value)?;
        Ok(())
    }

    /// A planted time trap: a landmark whose value the primary reads from its
    /// clock (a 1 GHz virtual TSC: guest nanoseconds) and logs.
    fn time_trap(&mut self, trap: PlantedTrap, rip: u64) -> Result<(), RunError> {
        self.new_landmark(LandmarkKind::TimeTrap { rip });
        self.stats.time_reads += 1;
        let value = self.clock_reading(ClockUse::Tsc)?;
        let mut regs = self.vm.vcpu.get_regs().map_err(kvm_err("get regs"))?;
        regs.rax = value & 0xffff_ffff;
        regs.rdx = value >> 32;
        if trap == PlantedTrap::Rdtscp {
            regs.rcx = 0; // IA32_TSC_AUX: processor 0
        }
        regs.rip += trap.instruction_len();
        self.vm.vcpu.set_regs(&regs).map_err(kvm_err("set regs"))
    }
}
