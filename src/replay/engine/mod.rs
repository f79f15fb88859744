//! The engine: runs the guest on KVM and, depending on its [`Role`], records
//! every nondeterministic input, follows a log, or just runs. One set of
//! rules serves every role, so a live run, a recording and a replay place
//! events the same way (docs/architecture.md, "Record and replay"):
//!
//! - **Landmarks** are the exits that happen at the same instruction on every
//!   run: port I/O, MMIO, HLT, planted time and entropy traps, time-MSR
//!   reads, plus sync points. They are numbered from 1. Kicks (EINTR) and
//!   emulation failures are not landmarks.
//! - Interrupts are injected only at a landmark where the guest can take them
//!   (IF=1, no interrupt shadow). When the log header's tick delivery
//!   says so (`--tick-delivery`, not the default: window exits are not
//!   exact for every guest on these hosts), when one is waiting after a
//!   landmark's work and the guest cannot take it (IF=0 or a shadow), the
//!   engine asks KVM for an interrupt-window exit, which is then a landmark
//!   too: the
//!   request follows from state both replicas share, so the backup asks
//!   alike and meets the same exit without a record (landmark.rs,
//!   `decide_interrupt_window`).
//! - Devices get time only as a value the primary logs: at a port access that
//!   reads the clock, and when timers are advanced (`Poll`).
//! - When an interrupt is due and the guest makes no landmark within the
//!   sync bound (a user-mode spin), a kick stops it anywhere; the primary logs
//!   that point as a sync point (vCPU state + pages written since the last
//!   one) and the backup loads it instead of executing to it.
//!
//! The engine is a long-lived object its owner drives: [`Engine::run`] goes
//! until the guest ends, a stop, or (a live backup) the end of the primary's
//! stream; [`Engine::promote`] then turns a backup into a live VM in place.
//! It runs on the thread that calls `run`; other threads reach it through
//! its [`Inputs`] and wake it with its [`Kicker`].
//!
//! This file holds the engine and its main loop. What its callers name
//! lives beside it and is re-exported here: connections.rs (control
//! messages, inputs), outcome.rs (how a run ends, its counts and errors),
//! settings.rs (a recording's settings) and role.rs (roles, log sinks).

mod catch_up;
mod clone;
mod connections;
mod interrupt_window;
mod landmark;
mod log_limit;
mod outcome;
mod outputs;
mod pending_input;
mod perturb;
mod progress;
mod role;
mod settings;
mod stop_signal;
mod stretches;
mod sync;
mod tick_deferral;
mod traps;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

pub use self::clone::{CloneCut, CloneRequest, CloneSnapshot, CLONE_SNAPSHOT_VERSION};
pub use self::connections::{Connections, Control, Inputs};
use self::landmark::AfterKick;
pub use self::log_limit::final_records_reserve;
use self::outcome::kvm_err;
pub use self::outcome::{Ending, ExitStats, RunError, RunReport, Stop};
pub use self::outputs::{ConsoleAndNet, FrameSender, Output, OutputSink};
use self::pending_input::PendingInput;
pub use self::perturb::{PerturbKind, PerturbParseError, TestPerturbation, PERTURBED_CMOS_INDEX};
use self::progress::Progress;
pub use self::role::{LogSink, Recorder, Role};
pub use self::settings::{
    window_exit_warning, RecordSettings, DEFAULT_HOT_PAGE_BUDGET, DEFAULT_SYNC_BOUND_US,
    DEFAULT_SYNC_BUDGET_PERCENT, DEFAULT_SYNC_STATE_EVERY, DEFAULT_TICK_DEFERRAL,
    MAX_HOT_PAGE_BUDGET,
};
pub use self::stop_signal::StopOnSignal;
pub use self::stretches::{StretchBucket, StretchLengths};
use super::digest::{DirtyPages, LandmarkKind, LandmarkSignature, MemoryHash};
use super::log::{CpuStateBytes, Record};
use super::schedule::{Schedule, ScheduleError, Step, Wait};
use crate::devices::platform::port_uses_time;
use crate::devices::{Nanos, Platform};
use crate::vmm::exit::{self, Exit};
use crate::vmm::fallback::{emulation_fallback, Fallback};
use crate::vmm::sys::{self, Kicker};
use crate::vmm::syscall_fix::SyscallFix;
use crate::vmm::timer::DeadlineTimer;
use crate::vmm::vm::Vm;

/// What a logged clock reading was for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClockUse {
    /// A port access to a clock device (PIT, port B, RTC): `IoTime`.
    Device,
    /// A trapped TSC read (RDTSC trap or time MSR): `TimeRead`.
    Tsc,
}

/// The engine. It owns the VM and its devices for as long as the guest lives.
pub struct Engine {
    vm: Vm,
    platform: Platform<Vec<u8>>,
    inputs: Inputs,
    /// Control messages taken from the channel but not yet acted on.
    held_control: std::collections::VecDeque<Control>,
    /// The control channel still has a sender.
    control_open: bool,
    outputs: Box<dyn OutputSink>,
    kicker: Kicker,
    role: Role,
    host_cpu: Option<u32>,
    /// Real time of guest time 0: guest ns = start.elapsed() (never
    /// backwards; rebased at promotion so guest time continues).
    start: Instant,
    landmark: u64,
    /// The last guest time handed to the devices: a logged clock reading on
    /// the primary, the logged value on the backup.
    clock: Nanos,
    /// State of the sync point the current landmark is, if it is one.
    sync_state: Option<CpuStateBytes>,
    /// An interrupt went in at the current landmark (so a landmark finished
    /// live after its records ran out never injects twice).
    injected_here: bool,
    /// The current landmark is an interrupt-window exit.
    at_window_exit: bool,
    /// Ask KVM for an interrupt-window exit at the next KVM_RUN (decided at
    /// the last landmark, landmark.rs).
    window_wanted: bool,
    input: PendingInput,
    /// A received frame the guest had no buffer for yet.
    held_frame: Option<Vec<u8>>,
    stats: ExitStats,
    /// Host time the vCPU ran (inside KVM_RUN) since the last landmark.
    stretch: Duration,
    timer: DeadlineTimer,
    settings: RecordSettings,
    since_sync: DirtyPages,
    since_digest: DirtyPages,
    /// The contents of a sync point's pages, read here one after the other
    /// and kept between sync points (sync.rs).
    sync_pages: Vec<u8>,
    log_room: log_limit::LogRoom,
    last_harvest: Instant,
    /// A kick let the guest run on with only a timer tick owed: kick again
    /// by this guest time (tick_deferral.rs). Cleared at every landmark.
    deferred_until: Option<Nanos>,
    /// The last sync point a kick made, for the sync-point budget
    /// (tick_deferral.rs).
    last_sync: Option<tick_deferral::SyncCost>,
    progress: Progress,
    syscall_fix: SyscallFix,
    signature: LandmarkSignature,
    /// All of guest memory, hashed (roles that track dirty pages only:
    /// computed when such a role begins, so a plain run pays nothing).
    memory: Option<MemoryHash>,
    /// A replay made wrong on purpose at one landmark (tests only).
    test_perturbation: Option<TestPerturbation>,
    /// When the current `run` began (for the report's wall time).
    run_started: Instant,
    /// The current landmark, for other threads (status, lag).
    published_landmark: Arc<AtomicU64>,
    /// A live engine tracks dirty pages for a clone.
    clone_tracking: bool,
    /// A clone's snapshot to take at the next landmark.
    pending_clone: Option<Box<CloneRequest>>,
    /// When the primary last logged a sync point's state, at which
    /// landmark, and the pages written since (catch_up.rs).
    last_sync_state: Option<Instant>,
    /// The primary kicked itself for an overdue sync state; the kick makes
    /// the sync point (landmark.rs `on_kick`).
    state_kick_pending: bool,
    state_base: u64,
    since_state: DirtyPages,
    /// The catch-ups so far, for other threads (status).
    published_catch_ups: Arc<AtomicU64>,
}

impl Engine {
    /// An engine for `vm` and `platform` in `role`. Starts the deadline
    /// timer thread (idle) now, before the vCPU thread pins itself.
    pub fn new(
        vm: Vm,
        platform: Platform<Vec<u8>>,
        connections: Connections,
        role: Role,
        settings: RecordSettings,
        host_cpu: Option<u32>,
    ) -> Result<Engine, RunError> {
        let Connections {
            inputs,
            outputs,
            kicker,
        } = connections;
        let timer = DeadlineTimer::start(kicker.clone()).map_err(|source| RunError::Thread {
            what: "deadline timer",
            source,
        })?;
        let now = Instant::now();
        let mut engine = Engine {
            vm,
            platform,
            inputs,
            held_control: Default::default(),
            control_open: true,
            outputs,
            kicker,
            role: Role::Live,
            host_cpu,
            start: now,
            landmark: 0,
            clock: 0,
            sync_state: None,
            injected_here: false,
            at_window_exit: false,
            window_wanted: false,
            input: PendingInput::default(),
            held_frame: None,
            stats: ExitStats::default(),
            stretch: Duration::ZERO,
            timer,
            settings,
            since_sync: DirtyPages::default(),
            since_digest: DirtyPages::default(),
            sync_pages: Vec::new(),
            log_room: log_limit::LogRoom::default(),
            last_harvest: now,
            deferred_until: None,
            last_sync: None,
            progress: Progress::new(),
            syscall_fix: SyscallFix::default(),
            signature: LandmarkSignature::default(),
            memory: None,
            test_perturbation: None,
            run_started: now,
            published_landmark: Arc::default(),
            clone_tracking: false,
            pending_clone: None,
            last_sync_state: None,
            state_kick_pending: false,
            state_base: 0,
            since_state: DirtyPages::default(),
            published_catch_ups: Arc::default(),
        };
        engine.set_role(role)?;
        Ok(engine)
    }

    /// Take up `role`. Every role tracks dirty pages: the primary for sync
    /// points and digests, the backup for its whole-memory hash (so pages
    /// only the backup wrote are caught).
    fn set_role(&mut self, role: Role) -> Result<(), RunError> {
        if let Role::Record(rec) = &mut self.role {
            rec.log.get_mut().page_cache(None);
        }
        let tracking = !matches!(role, Role::Live);
        self.vm.set_dirty_logging(tracking)?;
        // Only a recording gains from pages left write-enabled: the clone's
        // copy rounds want the dirty set to shrink, and a backup harvests
        // only at digests.
        self.vm.set_hot_page_budget(if role.recording() {
            self.settings.hot_page_budget
        } else {
            0
        });
        // A recording's first sync point with state covers the pages
        // written from here.
        self.since_state = DirtyPages::default();
        self.state_base = self.landmark;
        self.last_sync_state = None;
        // After dirty logging is on: whatever changes from here is noted.
        if tracking && self.memory.is_none() {
            self.memory = Some(sync::memory_hash_of(&self.vm));
        }
        self.role = role;
        if let Role::Record(rec) = &mut self.role {
            let pages = rec.log.page_stats();
            rec.log.get_mut().page_cache(Some(&pages));
        }
        self.start_log_limit();
        Ok(())
    }

    /// Where the guest is.
    pub fn landmark(&self) -> u64 {
        self.landmark
    }

    /// The current landmark as other threads see it (updated before every
    /// entry into the guest).
    /// Count this engine's catch-ups (catch_up.rs) in `counter` too.
    pub fn publish_catch_ups(&mut self, counter: Arc<AtomicU64>) {
        counter.store(self.stats.catch_ups, Ordering::Relaxed);
        self.published_catch_ups = counter;
    }

    pub fn landmark_counter(&self) -> Arc<AtomicU64> {
        self.published_landmark.clone()
    }

    pub fn stats(&self) -> ExitStats {
        let mut stats = self.stats;
        stats.landmarks = self.landmark;
        stats.pit_ticks_caught_up = self.platform.pit_ticks_caught_up;
        stats.pit_ticks_dropped = self.platform.pit_ticks_dropped;
        stats.emulated_instructions = self.vm.emulated_instructions();
        match &self.role {
            Role::Record(rec) => (stats.log_bytes, stats.log_records) = rec.log.written(),
            Role::Replay(schedule) => stats.log_records = schedule.records_read(),
            Role::Live => {}
        }
        stats
    }

    /// A handle on guest memory that other threads may read (the clone
    /// copies it while the guest runs; pages it reads mid-write are dirty
    /// and sent again).
    pub fn guest_memory(&self) -> vm_memory::GuestMemoryMmap {
        self.vm.mem.clone()
    }

    /// The devices, for reports and tests.
    pub fn platform(&self) -> &Platform<Vec<u8>> {
        &self.platform
    }

    /// The role's log, when recording (to flush and sync it at the end).
    pub fn recorder_mut(&mut self) -> Option<&mut Recorder> {
        match &mut self.role {
            Role::Record(rec) => Some(rec),
            _ => None,
        }
    }

    /// Turn a backup whose primary's stream ran out ([`Stop::LogExhausted`])
    /// into a live VM in place: guest time continues from the last logged
    /// value (never backwards), outputs go to `outputs`, and new inputs come
    /// from `serial` and `net`. `role` is `Live`, or `Record` to start a new
    /// log (a new backup).
    pub fn promote(
        &mut self,
        role: Role,
        outputs: Box<dyn OutputSink>,
        serial: Option<Receiver<Vec<u8>>>,
        net: Option<Receiver<Vec<u8>>>,
    ) -> Result<(), RunError> {
        if !self.role.replaying() {
            return Err(RunError::Promote("the engine is not following a log"));
        }
        if role.replaying() {
            return Err(RunError::Promote("a promoted engine runs live"));
        }
        // Guest time resumes where the log left it.
        self.start = Instant::now()
            .checked_sub(Duration::from_nanos(self.clock))
            .unwrap_or_else(Instant::now);
        self.outputs = outputs;
        self.inputs.serial = serial;
        self.inputs.net = net;
        self.set_role(role)?;
        tracing::info!(
            landmark = self.landmark,
            clock_ns = self.clock,
            "promoted to live"
        );
        Ok(())
    }

    fn real_now(&mut self) -> Nanos {
        // Never backwards, even across a logged value.
        self.clock = self.clock.max(self.start.elapsed().as_nanos() as Nanos);
        self.clock
    }

    fn log(&mut self, record: Record) -> Result<(), RunError> {
        if let Role::Record(rec) = &mut self.role {
            tracing::trace!(
                landmark = record.landmark(),
                kind = record.kind_name(),
                "log"
            );
            rec.log.append(&record).map_err(RunError::LogWrite)?;
        }
        Ok(())
    }

    fn log_bytes_written(&self) -> u64 {
        match &self.role {
            Role::Record(rec) => rec.log.written().0,
            _ => 0,
        }
    }

    /// The replay does not do what the log says: name the landmark, what
    /// differs, and where the backup's vCPU is (to find it in the guest).
    fn diverged(&self, detail: String) -> RunError {
        if let Role::Replay(schedule) = &self.role {
            if schedule.cut_short() {
                tracing::debug!(landmark = self.landmark, "{detail}, with the log cut here");
                return RunError::Schedule(ScheduleError::NoEnd(self.landmark));
            }
        }
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

    /// Ask the schedule something, handling control messages while a live
    /// stream has nothing decisive yet. `Err(Ok(stop))` means the run is
    /// over (a Stop arrived).
    fn ask<T>(
        &mut self,
        mut question: impl FnMut(&mut Schedule) -> Result<Wait<T>, ScheduleError>,
    ) -> Result<Result<T, Stop>, RunError> {
        loop {
            let Role::Replay(schedule) = &mut self.role else {
                unreachable!("only a replaying engine asks its schedule")
            };
            match question(schedule)? {
                Wait::Ready(answer) => return Ok(Ok(answer)),
                Wait::Pending => {
                    if self.stop_asked() {
                        return Ok(Err(Stop::Ended {
                            ending: Ending::Stopped,
                            log_end: false,
                        }));
                    }
                }
            }
        }
    }

    /// The backup's next record at the current landmark, if any is left.
    /// A stop while waiting for one ends the run ([`RunError::Stopped`]).
    fn take_here(&mut self) -> Result<Option<Record>, RunError> {
        let landmark = self.landmark;
        let taken = self
            .ask(|s| s.take_at(landmark))?
            .map_err(|_| RunError::Stopped);
        if let Ok(Some(r)) = &taken {
            tracing::trace!(landmark, kind = r.kind_name(), "took");
        }
        taken
    }

    /// The guest clock at this landmark: the primary reads it and logs it,
    /// the backup takes the logged value.
    fn clock_reading(&mut self, use_: ClockUse) -> Result<Nanos, RunError> {
        let landmark = self.landmark;
        if self.role.replaying() {
            let value = match (self.take_here()?, use_) {
                (Some(Record::IoTime { now, .. }), ClockUse::Device)
                | (Some(Record::TimeRead { value: now, .. }), ClockUse::Tsc) => now,
                (other, _) => {
                    let what = if use_ == ClockUse::Device {
                        "read a clock device"
                    } else {
                        "read the TSC"
                    };
                    return Err(self.diverged(format!(
                        "the guest {what} but the log holds {}",
                        describe_record(other.as_ref())
                    )));
                }
            };
            self.clock = self.clock.max(value);
            return Ok(value);
        }
        let now = self.real_now();
        let record = match use_ {
            ClockUse::Device => Record::IoTime { landmark, now },
            ClockUse::Tsc => Record::TimeRead {
                landmark,
                value: now,
            },
        };
        self.log(record)?;
        Ok(now)
    }

    /// Guest time for a port access: a logged clock reading if the port is
    /// a clock device, else the last time handed out.
    fn port_time(&mut self, port: u16, len: usize) -> Result<Nanos, RunError> {
        if port_uses_time(port, len) {
            self.clock_reading(ClockUse::Device)
        } else {
            Ok(self.clock)
        }
    }

    /// A new landmark: number it and fold it into the signature.
    fn new_landmark(&mut self, kind: LandmarkKind<'_>) {
        self.landmark += 1;
        self.injected_here = false;
        self.at_window_exit = false;
        self.signature.fold(self.landmark, kind);
    }

    /// Run until the guest ends, a stop, or the end of a live primary's
    /// stream. May be called again after [`Engine::promote`].
    pub fn run(&mut self) -> Result<RunReport, RunError> {
        self.run_started = Instant::now();
        let _registration = sys::register_vcpu_thread(&self.vm.vcpu, &self.kicker)
            .map_err(kvm_err("install the kick handler"))?;
        // Only this thread: a timer thread sharing its CPU would wait for the
        // scheduler to preempt a busy vCPU before it could kick (measured: ~100
        // instead of ~1000 timer interrupts/s into a user-mode loop).
        let _pinned = self
            .host_cpu
            .map(|cpu| sys::PinnedThread::new(cpu).map_err(|source| RunError::Pin { cpu, source }))
            .transpose()?;
        let stop = match self.run_loop() {
            Ok(stop) => stop,
            Err(RunError::Stopped) => Stop::Ended {
                ending: Ending::Stopped,
                log_end: false,
            },
            Err(e) => return Err(e),
        };
        self.outputs.flush().map_err(RunError::Output)?;
        Ok(RunReport {
            stop,
            stats: self.stats(),
            wall: self.run_started.elapsed(),
        })
    }

    fn run_loop(&mut self) -> Result<Stop, RunError> {
        // The first landmark to process: 0 (the start: records such as early
        // input may sit there) on a fresh engine, the current one after a
        // promotion (its records ran out: finish it live).
        let mut at_landmark = true;
        loop {
            if at_landmark {
                if let Some(request) = self.pending_clone.take() {
                    self.take_clone_snapshot(*request)?;
                }
                if let Some(stop) = self.at_landmark()? {
                    return Ok(stop);
                }
                if self.role.replaying() {
                    let landmark = self.landmark;
                    match self.ask(|s| s.step_after(landmark))? {
                        Err(stop) => return Ok(stop),
                        Ok(Step::Sync(record)) => {
                            self.apply_sync_point(record)?;
                            continue;
                        }
                        Ok(Step::CatchUp(jump)) => {
                            self.catch_up(jump)?;
                            continue;
                        }
                        Ok(Step::Exhausted) => {
                            return Ok(Stop::LogExhausted {
                                landmark: self.landmark,
                            })
                        }
                        Ok(Step::Run) => {}
                    }
                }
                self.sync_state = None;
            }
            self.before_run()?;
            self.published_landmark
                .store(self.landmark, Ordering::Relaxed);
            at_landmark = false;
            self.stats.total += 1;
            let what = self.role.name();
            self.progress
                .tick(what, self.landmark, &self.stats, self.start);
            if self.vm.refresh_shadow_mmu()? {
                self.stats.shadow_mmu_flushes += 1;
            }
            exit::request_interrupt_window(&mut self.vm.vcpu, self.window_wanted);
            let entered = Instant::now();
            let ran = exit::run(&mut self.vm.vcpu);
            self.stretch += entered.elapsed();
            let exit = match ran {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR => {
                    sys::drain_pending_kick();
                    self.stats.kicks += 1;
                    self.timer.fired();
                    match self.on_kick()? {
                        AfterKick::Stop(stop) => return Ok(stop),
                        AfterKick::Landmark => {
                            self.end_stretch(true);
                            at_landmark = true;
                        }
                        AfterKick::Resume => {}
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
                Exit::IoIn { port, size, count } => {
                    self.stats.io += 1;
                    self.landmark += 1;
                    self.injected_here = false;
                    self.at_window_exit = false;
                    let now = self.port_time(port, size)?;
                    let mut data = vec![0u8; size * count];
                    for access in data.chunks_mut(size.max(1)) {
                        self.platform.pio_read(port, access, now);
                    }
                    self.signature
                        .fold(self.landmark, LandmarkKind::PortIn { port, data: &data });
                    exit::complete_read(&mut self.vm.vcpu, &data).map_err(RunError::Complete)?;
                }
                Exit::IoOut { port, size, data } => {
                    self.stats.io += 1;
                    self.new_landmark(LandmarkKind::PortOut { port, data: &data });
                    let now = self.port_time(port, size)?;
                    for access in data.chunks(size.max(1)) {
                        self.platform.pio_write(port, access, now);
                    }
                }
                Exit::MmioRead { addr, len } => {
                    self.stats.mmio += 1;
                    self.landmark += 1;
                    self.injected_here = false;
                    self.at_window_exit = false;
                    let mut data = vec![0u8; len];
                    self.mmio_read(addr, &mut data);
                    self.signature
                        .fold(self.landmark, LandmarkKind::MmioRead { addr, data: &data });
                    exit::complete_read(&mut self.vm.vcpu, &data).map_err(RunError::Complete)?;
                }
                Exit::MmioWrite { addr, data } => {
                    self.stats.mmio += 1;
                    self.new_landmark(LandmarkKind::MmioWrite { addr, data: &data });
                    self.mmio_write(addr, &data)?;
                }
                Exit::Hlt => {
                    self.stats.hlt += 1;
                    self.end_stretch(false);
                    self.new_landmark(LandmarkKind::Halt);
                    if !self.role.replaying() {
                        if self.vm.vcpu.get_kvm_run().if_flag == 0 {
                            return self.end_live(Ending::HaltedForGood);
                        }
                        if let Some(stop) = self.halted()? {
                            return Ok(stop);
                        }
                        continue;
                    }
                }
                Exit::InterruptWindowOpen => {
                    // Nothing to emulate: the landmark's work injects.
                    self.stats.interrupt_windows += 1;
                    self.new_landmark(LandmarkKind::InterruptWindow);
                    self.at_window_exit = true;
                }
                Exit::Shutdown => {
                    let rip = self.vm.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(RunError::TripleFault { rip });
                }
                Exit::FailEntry { reason } => return Err(RunError::FailEntry { reason }),
                Exit::InternalError => match self.own_emulation_failure()? {
                    // A planted time or entropy trap: a landmark.
                    Some(true) => {}
                    Some(false) => continue,
                    None => {
                        self.stats.emulation_fallbacks += 1;
                        match emulation_fallback(&mut self.vm)? {
                            Fallback::Performed => continue,
                            Fallback::ExceptionInjected => {
                                self.stats.exceptions_injected += 1;
                                continue;
                            }
                            // Entropy: a landmark, like a time read.
                            Fallback::NeedsRandom(request) => {
                                let rip = request.next_rip;
                                self.random_read(request, rip)?
                            }
                        }
                    }
                },
                Exit::RdMsr { index } => {
                    // Only the time MSRs are filtered to userspace (vm.rs).
                    self.new_landmark(LandmarkKind::MsrRead { index });
                    self.stats.time_reads += 1;
                    let value = self.clock_reading(ClockUse::Tsc)?;
                    exit::complete_read(&mut self.vm.vcpu, &value.to_le_bytes())
                        .map_err(RunError::Complete)?;
                }
                Exit::Other(what) => return Err(RunError::UnexpectedExit(what)),
            }
            self.after_exit()?;
            self.end_stretch(false);
            at_landmark = true;
        }
    }

    /// A landmark: count the stretch that led to it.
    fn end_stretch(&mut self, at_sync_point: bool) {
        if !self.stretch.is_zero() {
            self.stats.stretches.add(self.stretch, at_sync_point);
            self.stretch = Duration::ZERO;
        }
    }

    /// A guest MMIO read: a device's register, or all-ones (an empty bus).
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if !self.platform.mmio_read(addr, data) {
            tracing::debug!("guest read unmapped MMIO {addr:#x}");
            data.fill(0xff);
        }
    }

    /// A guest MMIO write: to a device's register (a NIC's notify makes it
    /// transmit), or nowhere.
    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Result<(), RunError> {
        if !self.platform.mmio_write(addr, data, &mut self.vm) {
            tracing::debug!("guest wrote unmapped MMIO {addr:#x}");
        }
        Ok(())
    }
}

/// A record for messages: its kind and landmark, or "nothing".
pub(super) fn describe_record(record: Option<&Record>) -> String {
    match record {
        Some(r) => format!("a {} record for landmark {}", r.kind_name(), r.landmark()),
        None => "no record for it".to_string(),
    }
}

/// Whether the guest can take an external interrupt, judged from vCPU state
/// that was loaded or captured (after a sync point, where `kvm_run` is stale).
pub(super) fn can_inject_from_state(cpu: &CpuStateBytes) -> bool {
    use kvm_bindings::{kvm_regs, kvm_vcpu_events};
    use zerocopy::FromBytes;
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

#[cfg(test)]
mod tests;
