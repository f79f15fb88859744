//! Settings of a recording and their defaults, and the tick delivery a
//! recording's tick deferral implies.

use std::time::Duration;

use crate::devices::TickDelivery;

/// Least time between two dirty-log harvests at landmarks (recording).
/// Each harvest write-protects the dirtied pages again (all of them, or
/// those not hot: `RecordSettings::hot_page_budget`), and under shadow
/// paging every next write to them faults: every 1 ms slowed a Linux boot
/// about threefold here; 10 ms is close to the sync-point rate Linux has.
pub(super) const HARVEST_EVERY: Duration = Duration::from_millis(10);

/// The default [`RecordSettings::tick_deferral`]: off. Deferred ticks are
/// coalesced, and a guest that keeps time by counting ticks (Linux here,
/// `tsc=unstable`) would lose time while user code computes; 20 ms is the
/// measured sweet spot for guests that do not (docs/benchmarks.md, "after
/// fewer sync points").
pub const DEFAULT_TICK_DEFERRAL: Duration = Duration::ZERO;

/// The default [`RecordSettings::sync_bound`], in microseconds (`run`,
/// `record`, `primary` and `backup` take `--sync-bound-us`).
pub const DEFAULT_SYNC_BOUND_US: u64 = 200;

/// The default [`RecordSettings::sync_budget_percent`]: sync points made
/// for timer ticks may keep a user-mode guest stopped at most 5% of the
/// time (docs/benchmarks.md, "the sync-point budget").
pub const DEFAULT_SYNC_BUDGET_PERCENT: u8 = 5;

/// What `record` and the primary print when a recording takes interrupts
/// at window exits (`None` for the exact rule).
pub fn window_exit_warning(rule: TickDelivery) -> Option<String> {
    rule.uses_window_exits().then(|| {
        format!(
            "tick delivery `{rule}` makes interrupt-window exits landmarks; they are exact \
             for guests that open interrupts with sti or iret, but on this kind of host not \
             for all guests (a Linux recording diverged on replay): the replay or the backup \
             may stop with a divergence (docs/operations.md, \"Tick delivery\")"
        )
    })
}

/// The default [`RecordSettings::hot_page_budget`], in pages: 2048 from the
/// sweep in docs/benchmarks.md, "sync-point cost", raised to 8192 when a
/// Linux recording under its user workload ran 6% shorter with it and the
/// memwrite rows did not change ("Linux user workload (issue 14)").
pub const DEFAULT_HOT_PAGE_BUDGET: usize = 8192;

/// The largest hot-page budget `twinvm record --hot-pages` takes (256 MiB
/// of guest memory): every kept page is carried by every sync point.
pub const MAX_HOT_PAGE_BUDGET: usize = 65_536;

/// The default [`RecordSettings::sync_state_every`]: a lagging backup can
/// jump at most this far at a time. Each one costs the log the devices'
/// state, the pages its sync point leaves out and a digest (a Linux
/// recording logged 4.6 Mbit/s with them: docs/benchmarks.md, "Catch-up").
pub const DEFAULT_SYNC_STATE_EVERY: Duration = Duration::from_millis(50);

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
    /// The most of the time, in percent, that sync points made for timer
    /// ticks may keep the guest stopped: after a sync point that took C, a
    /// tick owed in user mode waits until C·(100−p)/p after it (at most
    /// 100 ms past its deadline), as the tick deferral above does. Sync
    /// points of a few pages at 250 Hz defer nothing; 0 turns it off. See
    /// tick_deferral.rs.
    pub sync_budget_percent: u8,
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
    /// Least host time between two sync points that carry the rest of the
    /// machine's state (a `SyncState` record: devices, clock, signature),
    /// where a backup that fell behind can catch up (catch_up.rs). Zero:
    /// every sync point.
    pub sync_state_every: Duration,
}

impl Default for RecordSettings {
    fn default() -> Self {
        RecordSettings {
            digest_interval: 256,
            sync_bound: Duration::from_micros(DEFAULT_SYNC_BOUND_US),
            tick_deferral: DEFAULT_TICK_DEFERRAL,
            sync_budget_percent: DEFAULT_SYNC_BUDGET_PERCENT,
            trace_landmarks: false,
            max_log_bytes: None,
            hot_page_budget: DEFAULT_HOT_PAGE_BUDGET,
            sync_state_every: DEFAULT_SYNC_STATE_EVERY,
        }
    }
}
