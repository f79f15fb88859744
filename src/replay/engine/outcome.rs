//! How a run ends: its ending or stop, the counts of what happened, and
//! the errors that end it early.

use std::time::Duration;

use thiserror::Error;

use crate::replay::log::EndReason;
use crate::replay::schedule::ScheduleError;
use crate::vmm::emulate::EmulateError;
use crate::vmm::exit::CompleteError;
use crate::vmm::fallback::FallbackError;
use crate::vmm::syscall_fix::SyscallFixError;
use crate::vmm::vm::VmError;

/// How a guest run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The guest pulsed the reset line (i8042): its way to reboot or power off.
    ResetRequested,
    /// The guest halted with interrupts disabled: nothing can wake it again.
    HaltedForGood,
    /// Stopped from outside (Control::Stop).
    Stopped,
}

impl Ending {
    pub(super) fn log_reason(self) -> EndReason {
        match self {
            Ending::ResetRequested => EndReason::ResetRequested,
            Ending::HaltedForGood => EndReason::HaltedForGood,
            Ending::Stopped => EndReason::Stopped,
        }
    }
}

/// Why [`Engine::run`](super::Engine::run) returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The guest's run is over (replay: the log's End record was reached,
    /// `log_end` true).
    Ended { ending: Ending, log_end: bool },
    /// A live backup applied every record its primary sent and knows
    /// nothing about the next landmark: it may go live from here.
    LogExhausted { landmark: u64 },
}

/// Counts of what happened during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStats {
    pub total: u64,
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub kicks: u64,
    pub landmarks: u64,
    pub interrupts_injected: u64,
    pub emulation_fallbacks: u64,
    pub exceptions_injected: u64,
    pub sync_points: u64,
    pub sync_point_pages: u64,
    /// Log bytes taken by sync points (recording only).
    pub sync_point_bytes: u64,
    /// Sync points with the machine's state (`SyncState` records) logged
    /// (primary) or checked (backup).
    pub sync_states: u64,
    /// Of the primary's sync points, those made only because a sync state
    /// was overdue (catch_up.rs, `sync_state_overdue`).
    pub sync_points_for_state: u64,
    /// Times a backup behind loaded a sync point with state instead of
    /// executing up to it, the landmarks it so skipped and the records of
    /// theirs it did not apply (catch_up.rs).
    pub catch_ups: u64,
    pub landmarks_skipped: u64,
    pub records_skipped: u64,
    /// Time the primary spent making sync points (state, dirty log, pages,
    /// log write).
    pub sync_point_time: Duration,
    /// Kicks that found only a timer tick owed to a guest in user mode and
    /// let it run on (tick_deferral.rs).
    pub tick_deferrals: u64,
    /// Interrupt-window exits (landmarks the engine asked KVM for because
    /// an interrupt waited while the guest could not take it).
    pub interrupt_windows: u64,
    /// PIT periods the platform raised late, one per IRQ0 acknowledge
    /// (tick catch-up), and dropped for passing the debt's bound.
    pub pit_ticks_caught_up: u64,
    pub pit_ticks_dropped: u64,
    /// Timer polls that raised a tick, and how late past its deadline the
    /// tick was raised (the guest-visible tick latency; live roles).
    pub timer_polls: u64,
    pub timer_poll_delay_total: Duration,
    pub timer_poll_delay_max: Duration,
    /// The recording ended because its log reached its size limit.
    pub log_size_limit_reached: bool,
    /// ... at the landmark before a sync point that did not fit, so
    /// without a final digest.
    pub log_limit_before_sync_point: bool,
    pub time_reads: u64,
    /// RDRAND/RDSEED values the VMM supplied (logged on the primary).
    pub random_reads: u64,
    /// syscall/sysret privilege switches twinvm completed (syscall_fix.rs).
    pub syscall_fixes: u64,
    /// Times KVM's shadow page tables were dropped after the VMM changed
    /// guest memory (Vm::refresh_shadow_mmu).
    pub shadow_mmu_flushes: u64,
    pub net_rx_frames: u64,
    pub net_tx_frames: u64,
    pub digests: u64,
    pub digest_pages: u64,
    pub digest_time: Duration,
    pub log_records: u64,
    pub log_bytes: u64,
    /// Instructions KVM's emulator ran for the guest (KVM's own count; on
    /// hosts like the development machines nearly all of a Linux guest's
    /// kernel code); None where KVM does not say.
    pub emulated_instructions: Option<u64>,
    /// How long the vCPU ran between landmarks, by how the stretch ended.
    pub stretches: super::StretchLengths,
}

/// The outcome of a whole run, for reports.
#[derive(Debug, Clone, Copy)]
pub struct RunReport {
    pub stop: Stop,
    pub stats: ExitStats,
    pub wall: Duration,
}

impl RunReport {
    /// How the guest ended, if it did.
    pub fn ending(&self) -> Option<Ending> {
        match self.stop {
            Stop::Ended { ending, .. } => Some(ending),
            Stop::LogExhausted { .. } => None,
        }
    }
}

/// Why a run stopped with an error.
#[derive(Debug, Error)]
pub enum RunError {
    /// KVM reported a shutdown: the guest triple-faulted.
    #[error("guest triple-faulted (KVM shutdown exit) at RIP {rip:#x}")]
    TripleFault { rip: u64 },
    /// An emulation failure the fallback could not finish.
    #[error(transparent)]
    Emulation(#[from] EmulateError),
    #[error(transparent)]
    Fallback(#[from] FallbackError),
    /// KVM refused to enter the guest.
    #[error("KVM could not enter the guest: hardware reason {reason:#x}")]
    FailEntry { reason: u64 },
    /// An exit reason twinvm never asks for.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// A KVM call failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    /// Building/altering VM state failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Writing the log failed (disk full, a dead channel).
    #[error("writing the log: {0}")]
    LogWrite(std::io::Error),
    /// Handing a read's value back to KVM failed.
    #[error("completing the exit: {0}")]
    Complete(CompleteError),
    /// Emitting an output (console, network) failed.
    #[error("emitting guest output: {0}")]
    Output(std::io::Error),
    /// The vCPU thread could not be pinned to the host CPU asked for.
    #[error("pinning the vCPU thread to host CPU {cpu}: {source}")]
    Pin { cpu: u32, source: std::io::Error },
    /// A thread of the engine could not be started.
    #[error("starting the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    /// The host could not supply a random number for RDRAND/RDSEED.
    #[error("reading host entropy for the guest's RDRAND/RDSEED: {0}")]
    HostRandom(std::io::Error),
    /// The log cannot be followed (corrupt, truncated, or the replay passed it).
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// Completing a system call the host left half done failed.
    #[error(transparent)]
    SyscallFix(#[from] SyscallFixError),
    /// The replay does not do what the log says the primary did.
    #[error("replay diverged at landmark {landmark}: {detail}")]
    Divergence { landmark: u64, detail: String },
    /// Stopped while waiting for the primary's records (turned into
    /// [`Stop::Ended`] by [`Engine::run`](super::Engine::run); never
    /// returned from it).
    #[error("stopped while waiting for the primary's records")]
    Stopped,
    /// `promote` on an engine that is not a backup at a clean boundary.
    #[error("cannot promote: {0}")]
    Promote(&'static str),
}

pub(super) fn kvm_err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> RunError {
    move |source| RunError::Kvm { what, source }
}
