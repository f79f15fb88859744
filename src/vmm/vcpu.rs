//! The vCPU loop: run the guest, hand its exits to the platform, deliver
//! interrupts, finish the instructions KVM's emulator cannot — and, when
//! recording or replaying, log or follow every nondeterministic input.
//!
//! One engine serves three modes ([`Mode`]): a plain live run, a live run that
//! records a log, and a replay that follows one. Their shared rules, which
//! make replay exact without an instruction counter:
//!
//! - **Landmarks** are the exits that happen at the same instruction on every
//!   run: port I/O, MMIO, HLT, planted time traps, time-MSR reads, plus sync points. They are numbered from 1.
//!   Kicks (EINTR) and emulation failures are not landmarks.
//! - Interrupts are injected only at a landmark where the guest can take them
//!   (IF=1, no interrupt shadow), never through an interrupt-window exit
//!   (imprecise on these hosts, see host-notes.md).
//! - Devices get time only as a value the primary logs: at a port access that
//!   reads the clock, and when timers are advanced (`Poll`).
//! - When an interrupt is due and the guest makes no landmark within the
//!   sync bound (a user-mode spin), a kick stops it anywhere; the primary logs
//!   that point as a sync point (vCPU state + pages written since the last
//!   one) and the backup loads it instead of executing to it.
//!
//! The loop runs on the calling thread. Other threads talk to it through a
//! [`Control`] channel and wake it with a [`Kicker`]; in live modes a timer
//! thread kicks it when a timer deadline (plus the sync bound) passes.

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use kvm_bindings::{kvm_regs, kvm_vcpu_events};
use kvm_ioctls::VcpuExit;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::FromBytes;

use super::emulate::{self, EmulateError, Emulated, GuestCpu, RandomRequest};
use super::guest_cpu::KvmGuestCpu;
use super::sys::{self, Kicker};
use super::syscall_fix::{SyscallFix, SyscallFixError};
use super::traps::PlantedTrap;
use super::vm::{Vm, VmError};
use crate::devices::platform::port_uses_time;
use crate::devices::{Nanos, Platform, PlatformEvent};
use crate::replay::digest::{self, CpuHashes, DirtyPages};
use crate::replay::log::{CpuStateBytes, EndReason, LogWriter, PageHash, Record, PAGE_SIZE};
use crate::replay::schedule::{Schedule, ScheduleError, Step};

/// Messages to a running vCPU loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Bytes typed at the serial console.
    SerialInput(Vec<u8>),
    /// Stop the VM (Ctrl-C, or the caller is done).
    Stop,
}

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
    fn log_reason(self) -> EndReason {
        match self {
            Ending::ResetRequested => EndReason::ResetRequested,
            Ending::HaltedForGood => EndReason::HaltedForGood,
            Ending::Stopped => EndReason::Stopped,
        }
    }
}

impl From<EndReason> for Ending {
    fn from(r: EndReason) -> Self {
        match r {
            EndReason::ResetRequested => Ending::ResetRequested,
            EndReason::HaltedForGood => Ending::HaltedForGood,
            EndReason::Stopped => Ending::Stopped,
        }
    }
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
    pub time_reads: u64,
    /// RDRAND/RDSEED values the VMM supplied (logged on the primary).
    pub random_reads: u64,
    /// syscall/sysret privilege switches twinvm completed (syscall_fix.rs).
    pub syscall_fixes: u64,
    /// Times KVM's shadow page tables were dropped after the VMM changed
    /// guest memory (Vm::refresh_shadow_mmu).
    pub shadow_mmu_flushes: u64,
    pub digests: u64,
    pub digest_pages: u64,
    pub digest_time: Duration,
    pub log_records: u64,
    pub log_bytes: u64,
}

/// The outcome of [`run`].
#[derive(Debug, Clone, Copy)]
pub struct RunReport {
    pub ending: Ending,
    /// Replay: the log's end record was reached (not stopped early).
    pub log_end_reached: bool,
    pub stats: ExitStats,
    pub wall: Duration,
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
    /// Another internal error from KVM.
    #[error("KVM internal error, sub-error {suberror}, data {data:x?}, at RIP {rip:#x}")]
    Internal {
        suberror: u32,
        data: Vec<u64>,
        rip: u64,
    },
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
    /// Writing the log failed.
    #[error("writing the log: {0}")]
    LogWrite(std::io::Error),
    /// The vCPU thread could not be pinned to the host CPU asked for.
    #[error("pinning the vCPU thread to host CPU {cpu}: {source}")]
    Pin { cpu: u32, source: std::io::Error },
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
}

fn kvm_err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> RunError {
    move |source| RunError::Kvm { what, source }
}

/// Least time between two dirty-log harvests at landmarks (recording).
/// Each harvest write-protects the dirtied pages again, and under shadow
/// paging every next write to them faults: every 1 ms slowed a Linux boot
/// about threefold here; 10 ms is close to the sync-point rate Linux has.
const HARVEST_EVERY: Duration = Duration::from_millis(10);

/// Settings of a recording.
#[derive(Debug, Clone, Copy)]
pub struct RecordSettings {
    /// A digest every this many landmarks (and one at the end).
    pub digest_interval: u64,
    /// How long past a timer deadline the guest may go without a landmark
    /// before it is kicked (and, when recording, a sync point is made).
    pub sync_bound: Duration,
    /// Log the guest's RIP at every landmark (`Record::Trace`).
    pub trace_landmarks: bool,
}

impl Default for RecordSettings {
    fn default() -> Self {
        RecordSettings {
            digest_interval: 256,
            sync_bound: Duration::from_micros(200),
            trace_landmarks: false,
        }
    }
}

/// Where a recording goes.
pub struct Recorder {
    pub log: LogWriter<Box<dyn Write + Send>>,
    pub settings: RecordSettings,
}

/// How [`run`] drives the guest.
pub enum Mode<'a> {
    /// Run live, logging nothing.
    Live,
    /// Run live and write every nondeterministic input to a log.
    Record(&'a mut Recorder),
    /// Follow a log recorded earlier (or arriving from a primary).
    Replay(&'a mut Schedule<Box<dyn Read + Send>>),
}

/// Kicks the vCPU thread whenever the deadline it was last given passes.
struct DeadlineTimer {
    tx: Option<Sender<Option<Instant>>>,
    thread: Option<thread::JoinHandle<()>>,
    armed: Option<Nanos>,
}

impl DeadlineTimer {
    fn start(kicker: Kicker) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<Option<Instant>>();
        let thread = thread::Builder::new()
            .name("twinvm-timer".into())
            .spawn(move || {
                // A kick is due when the vCPU has been busy too long, so the
                // timer must not wait for a time slice behind busy threads
                // (measured: with both host CPUs running vCPUs, kicks fell
                // about tenfold, to a handful per second for some guests).
                // It sleeps nearly all the time, so a real-time priority
                // costs the rest nothing.
                if let Err(e) = sys::make_current_thread_realtime(1) {
                    tracing::debug!("timer thread stays at normal priority: {e}");
                }
                let mut deadline: Option<Instant> = None;
                loop {
                    let msg = match deadline {
                        Some(d) => rx.recv_deadline(d),
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    match msg {
                        Ok(d) => deadline = d,
                        Err(RecvTimeoutError::Timeout) => {
                            kicker.kick();
                            deadline = None;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("spawning the timer thread");
        DeadlineTimer {
            tx: Some(tx),
            thread: Some(thread),
            armed: None,
        }
    }

    /// Arm for `deadline` (guest ns), unless already armed for it.
    fn arm(&mut self, start: Instant, deadline: Option<Nanos>) {
        if self.armed != deadline {
            self.armed = deadline;
            if let Some(tx) = &self.tx {
                let _ = tx.send(deadline.map(|ns| start + Duration::from_nanos(ns)));
            }
        }
    }

    /// The timer fired (or may have): the next arm must be sent again.
    fn fired(&mut self) {
        self.armed = None;
    }
}

impl Drop for DeadlineTimer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serial input the UART could not take yet (its FIFO is full); never dropped.
#[derive(Default)]
struct PendingInput(std::collections::VecDeque<u8>);

impl PendingInput {
    /// Offer held input to the UART; returns the bytes it took.
    fn feed<W: Write>(&mut self, platform: &mut Platform<W>) -> Vec<u8> {
        let mut accepted = Vec::new();
        while !self.0.is_empty() {
            let (front, _) = self.0.as_slices();
            let taken = platform.enqueue_serial_input(front);
            if taken == 0 {
                break;
            }
            accepted.extend(self.0.drain(..taken));
        }
        accepted
    }
}

/// What processing a landmark led to.
enum AtLandmark {
    /// Go on; `injected` tells whether an interrupt went in.
    Continue { injected: bool },
    /// The run is over.
    End(Ending),
}

/// Whether the guest can take an external interrupt, judged from vCPU state
/// that was loaded or captured (after a sync point, where `kvm_run` is stale).
fn can_inject_from_state(cpu: &CpuStateBytes) -> bool {
    const RFLAGS_IF: u64 = 1 << 9;
    let Ok(regs) = kvm_regs::read_from_bytes(&cpu.regs) else {
        return false;
    };
    let Ok(events) = kvm_vcpu_events::read_from_bytes(&cpu.events) else {
        return false;
    };
    regs.rflags & RFLAGS_IF != 0
        && events.interrupt.shadow == 0
        && events.interrupt.injected == 0
        && events.exception.injected == 0
}

/// What a logged clock reading was for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClockUse {
    /// A port access to a clock device (PIT, port B, RTC): `IoTime`.
    Device,
    /// A trapped TSC read (RDTSC trap or time MSR): `TimeRead`.
    Tsc,
}

/// The guest clock at `landmark`: the primary reads it and logs it, the
/// backup takes the logged value. A free function so it can run while an
/// exit's data borrows the vCPU.
fn clock_reading(
    mode: &mut Mode<'_>,
    clock: &mut Nanos,
    landmark: u64,
    start: Instant,
    use_: ClockUse,
) -> Result<Nanos, RunError> {
    if let Mode::Replay(schedule) = mode {
        let value = match (schedule.take_at(landmark)?, use_) {
            (Some(Record::IoTime { now, .. }), ClockUse::Device)
            | (Some(Record::TimeRead { value: now, .. }), ClockUse::Tsc) => now,
            (other, _) => {
                let what = if use_ == ClockUse::Device {
                    "read a clock device"
                } else {
                    "read the TSC"
                };
                return Err(RunError::Divergence {
                    landmark,
                    detail: format!("the guest {what} but the log holds {other:?}"),
                });
            }
        };
        *clock = (*clock).max(value);
        return Ok(value);
    }
    *clock = (*clock).max(start.elapsed().as_nanos() as Nanos);
    if let Mode::Record(rec) = mode {
        let record = match use_ {
            ClockUse::Device => Record::IoTime {
                landmark,
                now: *clock,
            },
            ClockUse::Tsc => Record::TimeRead {
                landmark,
                value: *clock,
            },
        };
        rec.log.append(&record).map_err(RunError::LogWrite)?;
    }
    Ok(*clock)
}

/// Guest time for a port access at `landmark`: a logged clock reading if the
/// port is a clock device, else the last time handed out (which devices
/// that do not keep time ignore).
fn port_time(
    mode: &mut Mode<'_>,
    clock: &mut Nanos,
    landmark: u64,
    start: Instant,
    port: u16,
    len: usize,
) -> Result<Nanos, RunError> {
    if port_uses_time(port, len) {
        clock_reading(mode, clock, landmark, start, ClockUse::Device)
    } else {
        Ok(*clock)
    }
}

struct Engine<'a, 'm, W: Write> {
    vm: &'a mut Vm,
    platform: &'a mut Platform<W>,
    control: &'a Receiver<Control>,
    mode: Mode<'m>,
    start: Instant,
    landmark: u64,
    /// The last guest time handed to the devices: a logged clock reading on
    /// the primary, the logged value on the backup.
    clock: Nanos,
    /// State of the sync point the current landmark is, if it is one.
    sync_state: Option<CpuStateBytes>,
    input: PendingInput,
    stats: ExitStats,
    timer: Option<DeadlineTimer>,
    sync_bound: Nanos,
    digest_interval: u64,
    since_sync: DirtyPages,
    since_digest: DirtyPages,
    log_end_reached: bool,
    last_harvest: Instant,
    progress: Progress,
    syscall_fix: SyscallFix,
}

/// A status line every few seconds on stderr, for a person watching a long
/// boot, recording or replay (only when stderr is a terminal).
struct Progress {
    enabled: bool,
    last: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(5);

    fn new() -> Self {
        use std::io::IsTerminal;
        Progress {
            enabled: std::io::stderr().is_terminal(),
            last: Instant::now(),
        }
    }

    fn tick(&mut self, what: &str, landmark: u64, stats: &ExitStats, start: Instant) {
        // Checked every 256 exits to keep the clock off the hot path.
        if !self.enabled || stats.total % 256 != 0 || self.last.elapsed() < Self::EVERY {
            return;
        }
        self.last = Instant::now();
        eprintln!(
            "twinvm: {what} {:.0} s: landmark {landmark}, {} exits, {} interrupts, {} sync points, {} emulation fallbacks",
            start.elapsed().as_secs_f64(),
            stats.total,
            stats.interrupts_injected,
            stats.sync_points,
            stats.emulation_fallbacks
        );
    }
}

impl<W: Write> Engine<'_, '_, W> {
    fn real_now(&mut self) -> Nanos {
        // Never backwards, even across a logged value.
        self.clock = self.clock.max(self.start.elapsed().as_nanos() as Nanos);
        self.clock
    }

    fn log(&mut self, record: Record) -> Result<(), RunError> {
        if let Mode::Record(rec) = &mut self.mode {
            rec.log.append(&record).map_err(RunError::LogWrite)?;
        }
        Ok(())
    }

    fn log_bytes_written(&self) -> u64 {
        match &self.mode {
            Mode::Record(rec) => rec.log.written().0,
            _ => 0,
        }
    }

    /// The replay does not do what the log says: name the landmark, what
    /// differs, and where the backup's vCPU is (to find it in the guest).
    fn diverged(&self, detail: String) -> RunError {
        let place = match (self.vm.vcpu.get_regs(), self.vm.vcpu.get_sregs()) {
            (Ok(regs), Ok(sregs)) => {
                format!(" (backup at RIP {:#x}, CPL {})", regs.rip, sregs.cs.dpl)
            }
            _ => String::new(),
        };
        RunError::Divergence {
            landmark: self.landmark,
            detail: format!("{detail}{place}"),
        }
    }

    fn can_inject(&mut self) -> bool {
        match &self.sync_state {
            Some(cpu) => can_inject_from_state(cpu),
            None => {
                let run = self.vm.vcpu.get_kvm_run();
                run.ready_for_interrupt_injection != 0 && run.if_flag != 0
            }
        }
    }

    fn inject(&mut self, vector: u8) -> Result<(), RunError> {
        sys::inject_interrupt(&self.vm.vcpu, vector).map_err(kvm_err("inject interrupt"))?;
        self.stats.interrupts_injected += 1;
        Ok(())
    }

    /// Hash the vCPU and the pages written since the last digest.
    fn compute_digest(&mut self) -> Result<(CpuHashes, Vec<PageHash>), RunError> {
        let started = Instant::now();
        self.vm
            .collect_dirty_pages(&mut [&mut self.since_sync, &mut self.since_digest])?;
        let mut page = vec![0u8; PAGE_SIZE];
        let mut pages = Vec::new();
        for gpa in self.since_digest.take() {
            if self.vm.mem.read_slice(&mut page, GuestAddress(gpa)).is_ok() {
                pages.push(PageHash {
                    gpa,
                    hash: digest::page_hash(&page),
                });
            }
        }
        let cpu = digest::cpu_hashes(&self.vm.cpu_state()?);
        self.stats.digests += 1;
        self.stats.digest_pages += pages.len() as u64;
        self.stats.digest_time += started.elapsed();
        Ok((cpu, pages))
    }

    fn record_digest(&mut self) -> Result<(), RunError> {
        let (cpu, pages) = self.compute_digest()?;
        self.log(Record::Digest {
            landmark: self.landmark,
            cpu,
            pages,
        })
    }

    fn verify_digest(&mut self, cpu: CpuHashes, pages: &[PageHash]) -> Result<(), RunError> {
        let started = Instant::now();
        let mem = &self.vm.mem;
        let mut buf = vec![0u8; PAGE_SIZE];
        let mismatched = digest::mismatched_pages(pages, |gpa| {
            mem.read_slice(&mut buf, GuestAddress(gpa))
                .ok()
                .map(|_| digest::page_hash(&buf))
        });
        let cpu_differs =
            digest::differing_cpu_parts(&cpu, &digest::cpu_hashes(&self.vm.cpu_state()?));
        self.stats.digests += 1;
        self.stats.digest_pages += pages.len() as u64;
        self.stats.digest_time += started.elapsed();
        if !mismatched.is_empty() || !cpu_differs.is_empty() {
            let shown: Vec<String> = mismatched
                .iter()
                .take(8)
                .map(|g| format!("{g:#x}"))
                .collect();
            let pages_text = if mismatched.is_empty() {
                "all pages match".to_string()
            } else {
                format!(
                    "{} of {} pages differ (first: {})",
                    mismatched.len(),
                    pages.len(),
                    shown.join(", ")
                )
            };
            let cpu_text = if cpu_differs.is_empty() {
                "vCPU state matches".to_string()
            } else {
                format!("vCPU state differs ({})", cpu_differs.join(", "))
            };
            return Err(self.diverged(format!("digest mismatch: {cpu_text}; {pages_text}")));
        }
        Ok(())
    }

    /// Primary, at a landmark: the backup will have executed everything up
    /// to here itself, so a later sync point needs only pages written after
    /// this point. Fetch the dirty log (at most once per
    /// [`HARVEST_EVERY`], to bound the ioctl cost), keep it for the next
    /// digest, and restart the sync-point set. Any superset stays correct,
    /// so the timing need not be deterministic.
    fn harvest_dirty_pages(&mut self) -> Result<(), RunError> {
        if self.last_harvest.elapsed() < HARVEST_EVERY {
            return Ok(());
        }
        self.last_harvest = Instant::now();
        self.vm.collect_dirty_pages(&mut [&mut self.since_digest])?;
        self.since_sync = DirtyPages::default();
        Ok(())
    }

    /// End a live run; a recording gets its final digest and End record.
    fn end_live(&mut self, ending: Ending) -> Result<AtLandmark, RunError> {
        if let Mode::Record(_) = self.mode {
            self.record_digest()?;
            self.log(Record::End {
                landmark: self.landmark,
                reason: ending.log_reason(),
            })?;
            if let Mode::Record(rec) = &mut self.mode {
                rec.log.flush().map_err(RunError::LogWrite)?;
            }
        }
        Ok(AtLandmark::End(ending))
    }

    /// The primary's work at a landmark: input, timers, reset, interrupt, digest.
    fn landmark_live(&mut self) -> Result<AtLandmark, RunError> {
        let mut stop = false;
        for msg in self.control.try_iter() {
            match msg {
                Control::Stop => stop = true,
                Control::SerialInput(bytes) => self.input.0.extend(bytes),
            }
        }
        if stop {
            return self.end_live(Ending::Stopped);
        }
        if let Mode::Record(rec) = &self.mode {
            if rec.settings.trace_landmarks {
                let rip = self.vm.vcpu.get_regs().map_err(kvm_err("get regs"))?.rip;
                self.log(Record::Trace {
                    landmark: self.landmark,
                    rip,
                })?;
            }
        }
        let accepted = self.input.feed(self.platform);
        if !accepted.is_empty() {
            self.log(Record::SerialInput {
                landmark: self.landmark,
                bytes: accepted,
            })?;
        }
        // An interrupt already waiting goes in before time advances: a timer
        // edge arriving one landmark later is a legitimate virtual-time
        // choice, while polling first would let IRQ0 (highest priority, and
        // due again by the time a slow emulated timer handler returns)
        // starve every other line, e.g. the serial transmit interrupt.
        let waiting = self.platform.interrupt_pending();
        if let Some(deadline) = self.platform.next_deadline().filter(|_| !waiting) {
            let now = self.real_now();
            if deadline <= now {
                self.platform.poll(now);
                self.log(Record::Poll {
                    landmark: self.landmark,
                    now,
                })?;
            }
        }
        if let Some(PlatformEvent::Reset) = self.platform.take_event() {
            return self.end_live(Ending::ResetRequested);
        }
        let mut injected = false;
        if self.platform.interrupt_pending() && self.can_inject() {
            if let Some(vector) = self.platform.acknowledge_interrupt() {
                self.inject(vector)?;
                self.log(Record::Interrupt {
                    landmark: self.landmark,
                    vector,
                })?;
                injected = true;
            }
        }
        if matches!(self.mode, Mode::Record(_)) {
            if self.landmark % self.digest_interval.max(1) == 0 {
                self.record_digest()?;
            }
            self.harvest_dirty_pages()?;
        }
        Ok(AtLandmark::Continue { injected })
    }

    /// The backup's work at a landmark: do exactly what the log says.
    fn landmark_replay(&mut self) -> Result<AtLandmark, RunError> {
        if self.control.try_iter().any(|m| m == Control::Stop) {
            return Ok(AtLandmark::End(Ending::Stopped));
        }
        let mut injected = false;
        loop {
            let Mode::Replay(schedule) = &mut self.mode else {
                unreachable!("replay mode")
            };
            let Some(record) = schedule.take_at(self.landmark)? else {
                break;
            };
            match record {
                Record::Trace { rip, .. } => {
                    let ours = self.vm.vcpu.get_regs().map_err(kvm_err("get regs"))?.rip;
                    if ours != rip {
                        return Err(self.diverged(format!(
                            "the primary was at RIP {rip:#x} at this landmark"
                        )));
                    }
                }
                Record::Poll { now, .. } => {
                    self.clock = now;
                    self.platform.poll(now);
                }
                Record::SerialInput { bytes, .. } => {
                    let taken = self.platform.enqueue_serial_input(&bytes);
                    if taken != bytes.len() {
                        return Err(self.diverged(format!(
                            "the UART took {taken} of {} logged input bytes",
                            bytes.len()
                        )));
                    }
                }
                Record::Interrupt { vector, .. } => {
                    if !self.can_inject() {
                        return Err(self.diverged(format!("the log injects vector {vector:#x} but the guest cannot take interrupts here")));
                    }
                    match self.platform.acknowledge_interrupt() {
                        Some(v) if v == vector => {
                            self.inject(vector)?;
                            injected = true;
                        }
                        other => {
                            return Err(self.diverged(format!(
                                "the log injects vector {vector:#x}, the platform has {other:x?}"
                            )))
                        }
                    }
                }
                Record::Digest { cpu, pages, .. } => self.verify_digest(cpu, &pages)?,
                Record::End { reason, .. } => {
                    self.log_end_reached = true;
                    return Ok(AtLandmark::End(reason.into()));
                }
                other => {
                    return Err(self.diverged(format!("unexpected {} record", other.kind_name())))
                }
            }
        }
        Ok(AtLandmark::Continue { injected })
    }

    fn at_landmark(&mut self) -> Result<AtLandmark, RunError> {
        match self.mode {
            Mode::Replay(_) => self.landmark_replay(),
            _ => self.landmark_live(),
        }
    }

    /// Primary: the guest was kicked at an arbitrary point; make it the next
    /// landmark (a sync point, when recording).
    fn make_sync_point(&mut self) -> Result<(), RunError> {
        self.landmark += 1;
        if let Mode::Record(_) = self.mode {
            let cpu = self.vm.cpu_state()?;
            self.vm
                .collect_dirty_pages(&mut [&mut self.since_sync, &mut self.since_digest])?;
            let mut pages = Vec::new();
            for gpa in self.since_sync.take() {
                let mut data = vec![0u8; PAGE_SIZE];
                if self.vm.mem.read_slice(&mut data, GuestAddress(gpa)).is_ok() {
                    pages.push((gpa, data));
                }
            }
            self.stats.sync_points += 1;
            self.stats.sync_point_pages += pages.len() as u64;
            let before = self.log_bytes_written();
            self.log(Record::SyncPoint {
                landmark: self.landmark,
                cpu: Box::new(cpu.clone()),
                vmm_state: self.syscall_fix.save(),
                pages,
            })?;
            self.stats.sync_point_bytes += self.log_bytes_written() - before;
            // Judge "can take an interrupt" from this state, as the backup will.
            self.sync_state = Some(cpu);
        }
        Ok(())
    }

    /// Backup: load the primary's sync point instead of executing to it.
    fn apply_sync_point(&mut self, record: Record) -> Result<(), RunError> {
        let Record::SyncPoint {
            landmark,
            cpu,
            vmm_state,
            pages,
        } = record
        else {
            unreachable!("sync point")
        };
        // Finish the landmark's exit first, or its completion would land on
        // top of the loaded state.
        self.vm.complete_pending_exit()?;
        for (gpa, data) in &pages {
            // Not noted as the VMM's own writes: on the primary these were
            // the guest's.
            self.vm
                .write_guest(*gpa, data, false)
                .map_err(|e| self.diverged(format!("sync point page: {e}")))?;
        }
        self.vm.set_cpu_state(&cpu)?;
        self.syscall_fix.restore(&vmm_state)?;
        self.stats.sync_points += 1;
        self.stats.sync_point_pages += pages.len() as u64;
        self.landmark = landmark;
        self.sync_state = Some(*cpu);
        Ok(())
    }

    /// Emulation failures twinvm caused itself or finishes itself, before
    /// the general fallback: a planted time or entropy trap (a landmark), the syscall
    /// fix's #PF-entry trap, and `sysretq`. Returns whether it was one.
    fn own_emulation_failure(&mut self) -> Result<Option<bool>, RunError> {
        self.syscall_fix.ensure_planted(self.vm)?;
        let bytes = sys::internal_error(&mut self.vm.vcpu)
            .instruction_bytes()
            .unwrap_or_default();
        if bytes.first() == Some(&0xcc) {
            let rip = self.vm.vcpu.get_regs().map_err(kvm_err("get regs"))?.rip;
            match self.vm.planted_traps.get(&rip).copied() {
                Some(PlantedTrap::Random { dest, seed, len }) => {
                    let next_rip = rip + u64::from(len);
                    self.random_read(RandomRequest {
                        dest,
                        seed,
                        next_rip,
                    })?;
                    return Ok(Some(true));
                }
                Some(trap) => {
                    self.time_trap(trap)?;
                    return Ok(Some(true));
                }
                None => {}
            }
            if self.syscall_fix.on_trap(self.vm, rip)? {
                self.stats.syscall_fixes += 1;
                return Ok(Some(false));
            }
        } else if self.syscall_fix.on_sysret(self.vm, &bytes)? {
            self.stats.syscall_fixes += 1;
            return Ok(Some(false));
        }
        Ok(None)
    }

    /// A RDRAND/RDSEED at a planted trap or as an emulation failure: a
    /// landmark. The primary performs it on the host and logs the value; the
    /// backup takes the logged value.
    fn random_read(&mut self, request: RandomRequest) -> Result<(), RunError> {
        self.landmark += 1;
        self.stats.random_reads += 1;
        let value = match &mut self.mode {
            Mode::Replay(schedule) => match schedule.take_at(self.landmark)? {
                Some(Record::Random { value, .. }) => value,
                other => {
                    return Err(self.diverged(format!(
                        "the guest executed RDRAND/RDSEED but the log holds {other:?}"
                    )))
                }
            },
            _ => sys::host_random(request.seed).map_err(RunError::HostRandom)?,
        };
        self.log(Record::Random {
            landmark: self.landmark,
            value,
        })?;
        emulate::complete_random(&mut KvmGuestCpu { vm: self.vm }, request, value)?;
        Ok(())
    }

    /// A planted time trap: a landmark whose value the primary reads from its
    /// clock (a 1 GHz virtual TSC: guest nanoseconds) and logs.
    fn time_trap(&mut self, trap: PlantedTrap) -> Result<(), RunError> {
        self.landmark += 1;
        self.stats.time_reads += 1;
        let value = clock_reading(
            &mut self.mode,
            &mut self.clock,
            self.landmark,
            self.start,
            ClockUse::Tsc,
        )?;
        let mut regs = self.vm.vcpu.get_regs().map_err(kvm_err("get regs"))?;
        regs.rax = value & 0xffff_ffff;
        regs.rdx = value >> 32;
        if trap == PlantedTrap::Rdtscp {
            regs.rcx = 0; // IA32_TSC_AUX: processor 0
        }
        regs.rip += trap.instruction_len();
        self.vm.vcpu.set_regs(&regs).map_err(kvm_err("set regs"))
    }

    /// Is an interrupt due that the guest could take, with no landmark in sight?
    fn sync_due(&mut self) -> bool {
        let now = self.real_now();
        let waiting = self.waiting_for_landmark(now);
        let run = self.vm.vcpu.get_kvm_run();
        waiting && run.if_flag != 0 && run.ready_for_interrupt_injection != 0
    }

    /// Something only a landmark can deliver is waiting: an interrupt the
    /// PIC holds (a lower-priority one stays there while a higher one is
    /// served: without this, IRQ4 would starve behind every timer tick of a
    /// guest spinning in user mode), a timer deadline that passed, or input
    /// the UART has not taken.
    fn waiting_for_landmark(&self, now: Nanos) -> bool {
        self.platform.interrupt_pending()
            || self.platform.next_deadline().is_some_and(|d| d <= now)
            || !self.input.0.is_empty()
    }

    /// Kick the guest one sync bound after the next thing it must get
    /// (now, if something is already waiting).
    fn arm_timer(&mut self) {
        let now = self.real_now();
        let bound = self.sync_bound;
        let wake = if self.waiting_for_landmark(now) {
            Some(now + bound)
        } else {
            self.platform.next_deadline().map(|d| d.max(now) + bound)
        };
        let start = self.start;
        if let Some(timer) = &mut self.timer {
            timer.arm(start, wake);
        }
    }

    /// The guest halted with interrupts enabled at a landmark: wait (live) for
    /// an interrupt, input or a stop.
    fn halted(&mut self) -> Result<Option<Ending>, RunError> {
        loop {
            match self.landmark_live()? {
                AtLandmark::End(e) => return Ok(Some(e)),
                AtLandmark::Continue { injected: true } => return Ok(None),
                AtLandmark::Continue { injected: false } => {}
            }
            let msg = match self.platform.next_deadline() {
                Some(ns) => self
                    .control
                    .recv_deadline(self.start + Duration::from_nanos(ns)),
                None => self
                    .control
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match msg {
                Ok(Control::Stop) => {
                    return self
                        .end_live(Ending::Stopped)
                        .map(|_| Some(Ending::Stopped))
                }
                Ok(Control::SerialInput(bytes)) => self.input.0.extend(bytes),
                Err(RecvTimeoutError::Timeout) => {}
                // Nobody can send input or a stop any more and no timer is
                // armed: the guest would sleep forever.
                Err(RecvTimeoutError::Disconnected) => match self.platform.next_deadline() {
                    None => {
                        return self
                            .end_live(Ending::Stopped)
                            .map(|_| Some(Ending::Stopped))
                    }
                    Some(ns) => {
                        thread::sleep(Duration::from_nanos(ns.saturating_sub(self.real_now())))
                    }
                },
            }
        }
    }

    fn run(&mut self) -> Result<Ending, RunError> {
        let replaying = matches!(self.mode, Mode::Replay(_));
        // Landmark 0 is the start: records (such as early input) may sit there.
        let mut at_landmark = true;
        loop {
            if at_landmark {
                if let AtLandmark::End(e) = self.at_landmark()? {
                    return Ok(e);
                }
                if let Mode::Replay(schedule) = &mut self.mode {
                    if let Step::Sync(record) = schedule.step_after(self.landmark)? {
                        self.apply_sync_point(record)?;
                        continue;
                    }
                }
                self.sync_state = None;
            }
            if !replaying {
                self.arm_timer();
            }
            at_landmark = false;
            self.stats.total += 1;
            let what = match self.mode {
                Mode::Live => "running",
                Mode::Record(_) => "recording",
                Mode::Replay(_) => "replaying",
            };
            self.progress
                .tick(what, self.landmark, &self.stats, self.start);
            if self.vm.refresh_shadow_mmu()? {
                self.stats.shadow_mmu_flushes += 1;
            }
            let exit = match self.vm.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR => {
                    self.vm.vcpu.set_kvm_immediate_exit(0);
                    self.stats.kicks += 1;
                    if let Some(timer) = &mut self.timer {
                        timer.fired();
                    }
                    if replaying {
                        if self.control.try_iter().any(|m| m == Control::Stop) {
                            return Ok(Ending::Stopped);
                        }
                        continue;
                    }
                    let mut stop = false;
                    for msg in self.control.try_iter() {
                        match msg {
                            Control::Stop => stop = true,
                            Control::SerialInput(bytes) => self.input.0.extend(bytes),
                        }
                    }
                    if stop {
                        // End on a landmark so the log and its final digest agree.
                        self.make_sync_point()?;
                        return self.end_live(Ending::Stopped).map(|_| Ending::Stopped);
                    }
                    if self.sync_due() {
                        self.make_sync_point()?;
                        at_landmark = true;
                    }
                    continue;
                }
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return Err(RunError::Kvm {
                        what: "run vCPU",
                        source: e,
                    })
                }
            };
            match exit {
                VcpuExit::IoIn(port, data) => {
                    self.stats.io += 1;
                    self.landmark += 1;
                    let now = port_time(
                        &mut self.mode,
                        &mut self.clock,
                        self.landmark,
                        self.start,
                        port,
                        data.len(),
                    )?;
                    self.platform.pio_read(port, data, now);
                }
                VcpuExit::IoOut(port, data) => {
                    self.stats.io += 1;
                    self.landmark += 1;
                    let now = port_time(
                        &mut self.mode,
                        &mut self.clock,
                        self.landmark,
                        self.start,
                        port,
                        data.len(),
                    )?;
                    self.platform.pio_write(port, data, now);
                }
                VcpuExit::MmioRead(addr, data) => {
                    // No MMIO devices yet: reads float high, as on an empty bus.
                    self.stats.mmio += 1;
                    self.landmark += 1;
                    tracing::debug!("guest read unmapped MMIO {addr:#x}");
                    data.fill(0xff);
                }
                VcpuExit::MmioWrite(addr, _) => {
                    self.stats.mmio += 1;
                    self.landmark += 1;
                    tracing::debug!("guest wrote unmapped MMIO {addr:#x}");
                }
                VcpuExit::Hlt => {
                    self.stats.hlt += 1;
                    self.landmark += 1;
                    if !replaying {
                        if self.vm.vcpu.get_kvm_run().if_flag == 0 {
                            return self
                                .end_live(Ending::HaltedForGood)
                                .map(|_| Ending::HaltedForGood);
                        }
                        if let Some(ending) = self.halted()? {
                            return Ok(ending);
                        }
                        continue;
                    }
                }
                VcpuExit::Shutdown => {
                    let rip = self.vm.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(RunError::TripleFault { rip });
                }
                VcpuExit::FailEntry(reason, _) => return Err(RunError::FailEntry { reason }),
                VcpuExit::InternalError => match self.own_emulation_failure()? {
                    // A planted time trap: a landmark.
                    Some(true) => {}
                    Some(false) => continue,
                    None => {
                        self.stats.emulation_fallbacks += 1;
                        match emulation_fallback(self.vm)? {
                            Fallback::Performed => continue,
                            Fallback::ExceptionInjected => {
                                self.stats.exceptions_injected += 1;
                                continue;
                            }
                            // Entropy: a landmark, like a time read.
                            Fallback::NeedsRandom(request) => self.random_read(request)?,
                        }
                    }
                },
                VcpuExit::X86Rdmsr(msr) => {
                    // Only the time MSRs are filtered to userspace (vm.rs).
                    self.landmark += 1;
                    self.stats.time_reads += 1;
                    *msr.data = clock_reading(
                        &mut self.mode,
                        &mut self.clock,
                        self.landmark,
                        self.start,
                        ClockUse::Tsc,
                    )?;
                }
                other => return Err(RunError::UnexpectedExit(format!("{other:?}"))),
            }
            at_landmark = true;
        }
    }
}

/// Run the guest on the calling thread until it powers off, is stopped, the
/// log ends (replay) or something fails. `kicker` must be this thread's
/// (from [`Kicker::for_current_thread`]).
pub fn run<W: Write>(
    vm: &mut Vm,
    platform: &mut Platform<W>,
    control: &Receiver<Control>,
    kicker: Kicker,
    mode: Mode<'_>,
    host_cpu: Option<u32>,
) -> Result<RunReport, RunError> {
    let start = Instant::now();
    let _registration =
        sys::register_vcpu_thread(&mut vm.vcpu).map_err(kvm_err("install kick handler"))?;
    let settings = match &mode {
        Mode::Record(rec) => rec.settings,
        _ => RecordSettings::default(),
    };
    if let Mode::Record(_) = mode {
        vm.set_dirty_logging(true)?;
    }
    let timer = (!matches!(mode, Mode::Replay(_))).then(|| DeadlineTimer::start(kicker));
    // Only this thread: a timer thread sharing its CPU would wait for the
    // scheduler to preempt a busy vCPU before it could kick (measured: ~100
    // instead of ~1000 timer interrupts/s into a user-mode loop).
    let _pinned = host_cpu
        .map(|cpu| sys::PinnedThread::new(cpu).map_err(|source| RunError::Pin { cpu, source }))
        .transpose()?;
    let mut engine = Engine {
        vm,
        platform,
        control,
        mode,
        start,
        landmark: 0,
        clock: 0,
        sync_state: None,
        input: PendingInput::default(),
        stats: ExitStats::default(),
        timer,
        sync_bound: settings.sync_bound.as_nanos() as Nanos,
        digest_interval: settings.digest_interval,
        since_sync: DirtyPages::default(),
        since_digest: DirtyPages::default(),
        log_end_reached: false,
        last_harvest: start,
        progress: Progress::new(),
        syscall_fix: SyscallFix::default(),
    };
    let ending = engine.run()?;
    let mut stats = engine.stats;
    stats.landmarks = engine.landmark;
    match &engine.mode {
        Mode::Record(rec) => (stats.log_bytes, stats.log_records) = rec.log.written(),
        Mode::Replay(schedule) => stats.log_records = schedule.records_read(),
        Mode::Live => {}
    }
    Ok(RunReport {
        ending,
        log_end_reached: engine.log_end_reached,
        stats,
        wall: start.elapsed(),
    })
}

/// What the general fallback did with an emulation failure.
enum Fallback {
    Performed,
    ExceptionInjected,
    /// RDRAND/RDSEED: the engine supplies the value at a landmark.
    NeedsRandom(RandomRequest),
}

/// Finish an instruction KVM's emulator gave up on, or reflect the exception
/// the guest must take.
fn emulation_fallback(vm: &mut Vm) -> Result<Fallback, RunError> {
    let info = sys::internal_error(&mut vm.vcpu);
    let rip = vm.vcpu.get_regs().map_err(kvm_err("get regs"))?.rip;
    if info.suberror != sys::KVM_INTERNAL_ERROR_EMULATION {
        return Err(RunError::Internal {
            suberror: info.suberror,
            data: info.data,
            rip,
        });
    }
    let mut cpu = KvmGuestCpu { vm };
    let bytes = match info.instruction_bytes() {
        Some(bytes) => bytes,
        None => {
            // Older KVMs do not report the bytes: fetch them at RIP.
            let mut buf = [0u8; 15];
            cpu.read_virt(rip, &mut buf)?;
            buf.to_vec()
        }
    };
    match emulate::emulate(&mut cpu, &bytes)? {
        Emulated::Performed => Ok(Fallback::Performed),
        Emulated::Exception { vector, error_code } => {
            tracing::trace!("reflecting exception {vector} to the guest at RIP {rip:#x}");
            vm.inject_exception(vector, error_code)?;
            Ok(Fallback::ExceptionInjected)
        }
        Emulated::NeedsRandom(request) => Ok(Fallback::NeedsRandom(request)),
    }
}

#[cfg(test)]
mod tests {
    use zerocopy::IntoBytes;

    use super::*;

    fn state(rflags: u64, shadow: u8, injected: u8) -> CpuStateBytes {
        let regs = kvm_regs {
            rflags,
            ..Default::default()
        };
        let mut events = kvm_vcpu_events::default();
        events.interrupt.shadow = shadow;
        events.interrupt.injected = injected;
        CpuStateBytes {
            regs: regs.as_bytes().to_vec(),
            sregs: vec![],
            fpu: vec![],
            events: events.as_bytes().to_vec(),
            msrs: vec![],
            xsave: vec![],
        }
    }

    #[test]
    fn interrupts_go_in_at_a_sync_point_only_when_the_saved_state_allows() {
        assert!(can_inject_from_state(&state(0x202, 0, 0)));
        assert!(!can_inject_from_state(&state(0x002, 0, 0)), "IF clear");
        assert!(
            !can_inject_from_state(&state(0x202, 1, 0)),
            "sti/mov ss shadow"
        );
        assert!(
            !can_inject_from_state(&state(0x202, 0, 1)),
            "an interrupt already pending"
        );
        let mut short = state(0x202, 0, 0);
        short.regs.truncate(10);
        assert!(
            !can_inject_from_state(&short),
            "malformed state never injects"
        );
    }
}
