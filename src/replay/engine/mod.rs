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
//!   (IF=1, no interrupt shadow). With tick catch-up (the log header's
//!   flag), when one is waiting after a landmark's work and the guest
//!   cannot take it (IF=0 or a shadow), the engine asks KVM for an
//!   interrupt-window exit, which is then a landmark too: the
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

mod clone;
mod interrupt_window;
mod landmark;
mod log_limit;
mod outputs;
mod perturb;
mod stop_signal;
mod sync;
mod tick_deferral;
mod traps;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use thiserror::Error;

pub use self::clone::{CloneCut, CloneRequest, CloneSnapshot, CLONE_SNAPSHOT_VERSION};
use self::landmark::AfterKick;
pub use self::log_limit::final_records_reserve;
pub use self::outputs::{ConsoleAndNet, FrameSender, Output, OutputSink};
pub use self::perturb::{PerturbKind, PerturbParseError, TestPerturbation, PERTURBED_CMOS_INDEX};
pub use self::stop_signal::StopOnSignal;
use super::digest::{DirtyPages, LandmarkKind, LandmarkSignature, MemoryHash};
use super::log::{CpuStateBytes, EndReason, LogWriter, Record};
use super::schedule::{Schedule, ScheduleError, Step, Wait};
use crate::devices::platform::port_uses_time;
use crate::devices::{Nanos, Platform, TickDelivery};
use crate::vmm::emulate::EmulateError;
use crate::vmm::exit::{self, CompleteError, Exit};
use crate::vmm::fallback::{emulation_fallback, Fallback, FallbackError};
use crate::vmm::sys::{self, Kicker};
use crate::vmm::syscall_fix::{SyscallFix, SyscallFixError};
use crate::vmm::timer::DeadlineTimer;
use crate::vmm::vm::{Vm, VmError};

/// Messages to a running engine (besides the input channels).
pub enum Control {
    /// Stop the VM (Ctrl-C, a lost arbitration, the caller is done).
    Stop,
    /// Something arrived on an input channel: look at the inputs.
    Wake,
    /// A recording primary lost its backup and won the arbiter: stop
    /// logging and run on alone.
    DropLog,
    /// A live VM being cloned: track the pages the guest writes (or stop).
    TrackDirty(bool),
    /// A live VM being cloned: the pages written since the last ask.
    CollectDirty(Sender<Result<DirtyPages, String>>),
    /// A live VM being cloned: at the next landmark, take the snapshot a
    /// new backup resumes from and record from there (clone.rs).
    CloneAt(Box<CloneRequest>),
}

/// What reaches a running engine from outside. Every channel is bounded by
/// its creator; the engine takes serial input only as fast as the UART
/// drains it, and frames only as fast as the guest posts receive buffers.
pub struct Inputs {
    pub control: Receiver<Control>,
    /// Bytes typed at the console (live roles).
    pub serial: Option<Receiver<Vec<u8>>>,
    /// Ethernet frames received for the guest's NIC (live roles).
    pub net: Option<Receiver<Vec<u8>>>,
}

/// How the engine is connected to the rest of the process.
pub struct Connections {
    pub inputs: Inputs,
    pub outputs: Box<dyn OutputSink>,
    /// Kicks the engine's vCPU thread out of the guest; whoever feeds
    /// `inputs` holds a clone.
    pub kicker: Kicker,
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

/// Why [`Engine::run`] returned.
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
    /// [`Stop::Ended`] by [`Engine::run`]; never returned from it).
    #[error("stopped while waiting for the primary's records")]
    Stopped,
    /// `promote` on an engine that is not a backup at a clean boundary.
    #[error("cannot promote: {0}")]
    Promote(&'static str),
}

pub(super) fn kvm_err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> RunError {
    move |source| RunError::Kvm { what, source }
}

/// Least time between two dirty-log harvests at landmarks (recording).
/// Each harvest write-protects the dirtied pages again (all of them, or
/// those not hot: `RecordSettings::hot_page_budget`), and under shadow
/// paging every next write to them faults: every 1 ms slowed a Linux boot
/// about threefold here; 10 ms is close to the sync-point rate Linux has.
const HARVEST_EVERY: Duration = Duration::from_millis(10);

/// Serial input held for the UART beyond this is left in its channel, so
/// the sender (the stdin reader) is slowed instead of memory growing.
const MAX_HELD_SERIAL_INPUT: usize = 4096;

/// The default [`RecordSettings::tick_deferral`]: off. Deferred ticks are
/// coalesced, and a guest that keeps time by counting ticks (Linux here,
/// `tsc=unstable`) would lose time while user code computes; 20 ms is the
/// measured sweet spot for guests that do not (docs/benchmarks.md, "after
/// fewer sync points").
pub const DEFAULT_TICK_DEFERRAL: Duration = Duration::ZERO;

/// How a recording with this tick deferral delivers ticks: the log
/// header's `tick_delivery`, which every replica follows. Catch-up only
/// with a deferral: for Linux here it costs far more time than it saves
/// (docs/benchmarks.md, "Linux and tick catch-up").
pub fn tick_delivery(tick_deferral: Duration) -> TickDelivery {
    if tick_deferral.is_zero() {
        TickDelivery::AtLandmarks
    } else {
        TickDelivery::CatchUpAtWindowExits
    }
}

/// The default [`RecordSettings::hot_page_budget`], in pages (chosen by the
/// sweep in docs/benchmarks.md, "sync-point cost").
pub const DEFAULT_HOT_PAGE_BUDGET: usize = 2048;

/// The largest hot-page budget `twinvm record --hot-pages` takes (256 MiB
/// of guest memory): every kept page is carried by every sync point.
pub const MAX_HOT_PAGE_BUDGET: usize = 65_536;

/// Settings of a recording.
#[derive(Debug, Clone, Copy)]
pub struct RecordSettings {
    /// A digest every this many landmarks (and one at the end).
    pub digest_interval: u64,
    /// How long past a timer deadline the guest may go without a landmark
    /// before it is kicked (and, when recording, a sync point is made).
    pub sync_bound: Duration,
    /// How long past its deadline a timer tick may wait while the guest is
    /// in user mode and nothing else is owed to it, before the guest is
    /// stopped for it (a sync point). Zero: every tick as soon as the sync
    /// bound allows. See tick_deferral.rs and docs/architecture.md.
    pub tick_deferral: Duration,
    /// Log the guest's RIP and landmark signature at every landmark
    /// (`Record::Trace`).
    pub trace_landmarks: bool,
    /// End the recording cleanly (at a landmark, with its End record)
    /// before its log passes this many bytes.
    pub max_log_bytes: Option<u64>,
    /// Most guest pages a recording's dirty-log harvests leave
    /// write-enabled ("hot": reported dirty at every harvest, so sent with
    /// every sync point, unchanged ones as a few bytes against the page
    /// cache) instead of re-protecting them, which under shadow paging
    /// makes the guest's next store to each fault. 0: re-protect every
    /// page at every harvest. Needs KVM's manual dirty-log protection
    /// (`src/vmm/hot_pages.rs`); other roles re-protect everything.
    pub hot_page_budget: usize,
}

impl Default for RecordSettings {
    fn default() -> Self {
        RecordSettings {
            digest_interval: 256,
            sync_bound: Duration::from_micros(200),
            tick_deferral: DEFAULT_TICK_DEFERRAL,
            trace_landmarks: false,
            max_log_bytes: None,
            hot_page_budget: DEFAULT_HOT_PAGE_BUDGET,
        }
    }
}

/// Where a log goes: a file, or the logging channel to a live backup.
pub trait LogSink: Write + Send {
    /// Every record of every landmark up to `landmark` has been written (the
    /// guest is about to run on). A live sink hands the bytes and this
    /// watermark to its sender here, and may block while the backup is too
    /// far behind: a slow backup slows the primary.
    fn landmark_done(&mut self, _landmark: u64) -> std::io::Result<()> {
        Ok(())
    }

    /// How sync-point pages travelled so far and the page cache (a pair
    /// reports it in its status): when the recording starts, after each
    /// sync point, and `None` when the recording stops (no log, no cache).
    fn page_cache(&mut self, _pages: Option<&crate::replay::log::PageStats>) {}
}

impl<W: Write + Send> LogSink for std::io::BufWriter<W> {}

/// A recording in progress.
pub struct Recorder {
    pub log: LogWriter<Box<dyn LogSink>>,
}

/// What the engine does with the guest.
pub enum Role {
    /// Run live, logging nothing.
    Live,
    /// Run live and write every nondeterministic input to a log.
    Record(Recorder),
    /// Follow a log recorded earlier or arriving from a primary.
    Replay(Schedule),
}

impl Role {
    fn replaying(&self) -> bool {
        matches!(self, Role::Replay(_))
    }
    fn recording(&self) -> bool {
        matches!(self, Role::Record(_))
    }
    fn name(&self) -> &'static str {
        match self {
            Role::Live => "running",
            Role::Record(_) => "recording",
            Role::Replay(_) => "replaying",
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

/// What a logged clock reading was for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClockUse {
    /// A port access to a clock device (PIT, port B, RTC): `IoTime`.
    Device,
    /// A trapped TSC read (RDTSC trap or time MSR): `TimeRead`.
    Tsc,
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
            timer,
            settings,
            since_sync: DirtyPages::default(),
            since_digest: DirtyPages::default(),
            sync_pages: Vec::new(),
            log_room: log_limit::LogRoom::default(),
            last_harvest: now,
            deferred_until: None,
            progress: Progress::new(),
            syscall_fix: SyscallFix::default(),
            signature: LandmarkSignature::default(),
            memory: None,
            test_perturbation: None,
            run_started: now,
            published_landmark: Arc::default(),
            clone_tracking: false,
            pending_clone: None,
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
    pub fn landmark_counter(&self) -> Arc<AtomicU64> {
        self.published_landmark.clone()
    }

    pub fn stats(&self) -> ExitStats {
        let mut stats = self.stats;
        stats.landmarks = self.landmark;
        stats.pit_ticks_caught_up = self.platform.pit_ticks_caught_up;
        stats.pit_ticks_dropped = self.platform.pit_ticks_dropped;
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
            let exit = match exit::run(&mut self.vm.vcpu) {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR => {
                    sys::drain_pending_kick();
                    self.stats.kicks += 1;
                    self.timer.fired();
                    match self.on_kick()? {
                        AfterKick::Stop(stop) => return Ok(stop),
                        AfterKick::Landmark => at_landmark = true,
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
            at_landmark = true;
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
mod tests {
    use kvm_bindings::{kvm_regs, kvm_vcpu_events};
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
