//! Catch-up: a backup that fell behind loads a later sync point whole
//! instead of executing up to it (docs/architecture.md, "Catch-up").
//!
//! A sync point carries the vCPU and the pages written since the primary's
//! last dirty-log harvest (the backup executed up to that landmark itself,
//! landmark.rs `harvest_dirty_pages`). On some sync points, at most every
//! `RecordSettings::sync_state_every`, the primary also logs the rest (a
//! `SyncState` record): the devices, the guest clock, the landmark
//! signature, one flag of the shadow-flush rule (vm.rs, `GuestWrite::
//! Device`), and every page written since the previous such record that
//! the sync point does not carry. A backup anywhere after that previous
//! record can load this one.
//! A backup that executed up to such a sync point checks that its own
//! state is that one; a backup behind loads it (`Schedule::set_catch_up`).
//! A digest follows each such record, so a backup that loaded one compares
//! the whole machine with the primary's right away.

use std::time::Instant;

use super::{Engine, RunError};
use crate::devices::PlatformState;
use crate::replay::log::{PageData, Record, ResumeState, MAX_PAGES_PER_RECORD, PAGE_SIZE};
use crate::replay::schedule::CatchUp;
use vm_memory::{Bytes, GuestAddress};

/// After how many sync-state intervals without one the primary makes a
/// sync point for it.
const OVERDUE_INTERVALS: u32 = 4;

impl Engine {
    /// Primary, at a sync point just logged (its pages `carried`,
    /// ascending): log the rest of the machine's state too if the last such
    /// record is old enough, with every page written since that record
    /// that this sync point does not carry. `device_unflushed` is the
    /// shadow-flush flag as it was before the sync point. A record that
    /// does not fit under the log's size limit is left out (the recording
    /// stops at the next sync point that does not fit).
    pub(super) fn log_sync_state(
        &mut self,
        device_unflushed: bool,
        carried: &[u64],
    ) -> Result<(), RunError> {
        let due = self
            .last_sync_state
            .is_none_or(|at| at.elapsed() >= self.settings.sync_state_every);
        if !due || !self.role.recording() {
            return Ok(());
        }
        let logged = match self.sync_state_record(device_unflushed, carried)? {
            None => false,
            Some(record) => match self.log(record) {
                Err(RunError::LogWrite(e)) if e.kind() == std::io::ErrorKind::StorageFull => {
                    tracing::debug!("sync state left out: {e}");
                    false
                }
                logged => {
                    logged?;
                    true
                }
            },
        };
        // Logged or left out, the next one covers what is written from here
        // (a backup before a left-out one executes up to it before it can
        // catch up), and is an interval away.
        self.last_sync_state = Some(Instant::now());
        self.state_base = self.landmark;
        if !logged {
            return Ok(());
        }
        self.stats.sync_states += 1;
        // A backup that catches up here checks the whole machine right after
        // loading it.
        self.record_digest()
    }

    /// The `SyncState` record for this landmark: every page written since
    /// the last one that the sync point does not carry, the devices, clock
    /// and signatures. None when the pages do not fit in one record.
    fn sync_state_record(
        &mut self,
        device_unflushed: bool,
        carried: &[u64],
    ) -> Result<Option<Record>, RunError> {
        let missing: Vec<u64> = self
            .since_state
            .take()
            .into_iter()
            .filter(|gpa| carried.binary_search(gpa).is_err())
            .collect();
        if missing.len() > MAX_PAGES_PER_RECORD {
            tracing::debug!(pages = missing.len(), "sync state left out: too many pages");
            return Ok(None);
        }
        let mut pages = Vec::with_capacity(missing.len());
        let mut page = [0u8; PAGE_SIZE];
        for gpa in missing {
            // A page that cannot be read is not RAM (a sync point leaves it
            // out alike).
            if self.vm.mem.read_slice(&mut page, GuestAddress(gpa)).is_ok() {
                pages.push((gpa, PageData::from(&page[..])));
            }
        }
        let devices = serde_json::to_vec(&self.platform.save())
            .map_err(|e| RunError::LogWrite(std::io::Error::other(e)))?;
        Ok(Some(Record::SyncState {
            landmark: self.landmark,
            state: Box::new(ResumeState {
                clock: self.clock,
                signature: self.signature.running(),
                signature_last: self.signature.last(),
                device_unflushed,
                devices,
                since: self.state_base,
                pages,
            }),
        }))
    }

    /// Primary: no sync point with state for four intervals. Sync points
    /// come from ticks that land in long stretches without exits (user
    /// mode); a guest whose kernel exits often makes none for seconds, and
    /// a backup behind cannot catch up across such a stretch. So the
    /// primary then makes one itself, at the next landmark. (Four, not
    /// two: the sync-point budget spaces a memory-heavy guest's sync points
    /// up to ~100 ms apart, and those carry states already.)
    pub(super) fn sync_state_overdue(&self) -> bool {
        let every = self.settings.sync_state_every;
        self.role.recording()
            && !every.is_zero()
            && self.last_sync_state.unwrap_or(self.run_started).elapsed()
                >= every.saturating_mul(OVERDUE_INTERVALS)
    }

    /// Backup, at a sync point it loaded after executing up to it: its own
    /// state must be the one the primary logged.
    pub(super) fn check_sync_state(&mut self, theirs: &ResumeState) -> Result<(), RunError> {
        let devices = self.decode_devices(theirs)?;
        let mut differences = Vec::new();
        // The primary's clock also holds readings it did not log (a kick's
        // timer check): the backup's, the last logged one, is never later.
        if self.clock > theirs.clock {
            differences.push(format!(
                "guest time is {} ns here, later than the primary's {} ns",
                self.clock, theirs.clock
            ));
        }
        if theirs.signature != self.signature.running()
            || theirs.signature_last != self.signature.last()
        {
            differences.push(
                "the landmarks since the start differ from the primary's (record with --trace-landmarks to find where)".to_string(),
            );
        }
        if devices != self.platform.save() {
            differences.push("device state differs".to_string());
        }
        let mut page = vec![0u8; PAGE_SIZE];
        let differing: Vec<String> = theirs
            .pages
            .iter()
            .filter(|(gpa, data)| {
                self.vm
                    .mem
                    .read_slice(&mut page, GuestAddress(*gpa))
                    .map_or(true, |()| page[..] != data[..])
            })
            .take(8)
            .map(|(gpa, _)| format!("{gpa:#x}"))
            .collect();
        if !differing.is_empty() {
            differences.push(format!(
                "memory differs in pages this replica wrote itself (first: {})",
                differing.join(", ")
            ));
        }
        if theirs.device_unflushed != self.vm.device_unflushed() {
            differences.push(
                "a device wrote guest memory since the last shadow flush on one side only"
                    .to_string(),
            );
        }
        self.stats.sync_states += 1;
        if differences.is_empty() {
            return Ok(());
        }
        Err(self.diverged(format!(
            "at a sync point with state: {}",
            differences.join("; ")
        )))
    }

    /// Backup behind: load every sync point up to the target and the
    /// target's state, skipping the stretches and records in between.
    pub(super) fn catch_up(&mut self, jump: CatchUp) -> Result<(), RunError> {
        let from = self.landmark;
        let devices = self.decode_devices(&jump.state)?;
        // The landmark's exit is finished first, or its completion would
        // land on top of the loaded state.
        self.vm.complete_pending_exit()?;
        let mut target = None;
        for record in jump.sync_points {
            target = Some(self.load_sync_point_pages(record)?);
        }
        let (landmark, cpu, vmm_state) = target.expect("a catch-up ends at a sync point");
        self.load_pages(&jump.state.pages, "sync state")?;
        // The shadow-flush rule's state as the primary's was at the sync
        // point; entering it then notes the sync point as the primary did.
        self.vm
            .load_flush_state_at_sync_point(jump.state.device_unflushed);
        self.enter_sync_point(landmark, cpu, &vmm_state)?;
        self.platform
            .restore(&devices)
            .map_err(|e| self.diverged(format!("the sync state's devices: {e}")))?;
        self.clock = self.clock.max(jump.state.clock);
        self.signature
            .restore(jump.state.signature, jump.state.signature_last);
        self.stats.catch_ups += 1;
        self.published_catch_ups
            .store(self.stats.catch_ups, std::sync::atomic::Ordering::Relaxed);
        self.stats.landmarks_skipped += landmark - from;
        self.stats.records_skipped += jump.skipped_records;
        tracing::debug!(from, to = landmark, "caught up");
        Ok(())
    }

    fn decode_devices(&self, state: &ResumeState) -> Result<PlatformState, RunError> {
        serde_json::from_slice(&state.devices)
            .map_err(|e| self.diverged(format!("the log's devices' state cannot be read: {e}")))
    }
}
