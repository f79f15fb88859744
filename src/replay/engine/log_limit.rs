//! A recording's size limit (`twinvm record --max-log-size`): the recording
//! ends cleanly, at a landmark and with its End record, before its log
//! would pass the limit, so it replays identically up to there.
//!
//! The log writer refuses any record that would take the log past the limit
//! less the room kept for the final digest and End record; the engine ends
//! the recording at a landmark once the room left is less than twice the
//! most one landmark has taken so far, and at the landmark before a sync
//! point that does not fit.

use super::{Ending, Engine, Role, RunError, Stop};
use crate::replay::log::Record;
use crate::vmm::layout;

/// Digest bytes per page it may list (gpa and hash), for the room a
/// recording keeps for its final digest.
const DIGEST_BYTES_PER_PAGE: u64 = 40;

/// The room a recording of `mem_bytes` of guest memory keeps for its final
/// digest (which may list every page) and End record.
pub fn final_records_reserve(mem_bytes: u64) -> u64 {
    4096 + DIGEST_BYTES_PER_PAGE * layout::ram_pages(mem_bytes) as u64
}

/// Where a recording with a size limit stands.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct LogRoom {
    /// The most log bytes one landmark took so far.
    largest_landmark: u64,
    /// Log bytes written when the current landmark began.
    landmark_start: u64,
}

impl Engine {
    /// A recording begins (or goes on with a new log): records may use the
    /// limit less the room kept for the final ones.
    pub(super) fn start_log_limit(&mut self) {
        let reserve = final_records_reserve(self.vm.mem_bytes);
        let limit = self.settings.max_log_bytes;
        if let Role::Record(rec) = &mut self.role {
            rec.log.set_limit(limit.map(|l| l.saturating_sub(reserve)));
            self.log_room = LogRoom {
                largest_landmark: 0,
                landmark_start: rec.log.written().0,
            };
        }
    }

    /// Every record of the current landmark is written: note its size.
    pub(super) fn note_landmark_logged(&mut self) {
        let written = self.log_bytes_written();
        let room = &mut self.log_room;
        room.largest_landmark = room
            .largest_landmark
            .max(written.saturating_sub(room.landmark_start));
        room.landmark_start = written;
    }

    /// A recording with a size limit whose log may not hold another
    /// landmark: less than twice the most one landmark has taken so far (at
    /// least 4 KiB) is left before the room kept for the final records.
    pub(super) fn log_limit_due(&self) -> bool {
        let (Role::Record(rec), Some(limit)) = (&self.role, self.settings.max_log_bytes) else {
            return false;
        };
        let room = limit.saturating_sub(final_records_reserve(self.vm.mem_bytes));
        rec.log.written().0 + 2 * self.log_room.largest_landmark.max(4096) > room
    }

    /// End the recording here because of its size limit: final digest and
    /// End record, which may use the room kept for them.
    pub(super) fn end_at_log_limit(&mut self) -> Result<Stop, RunError> {
        tracing::warn!(
            landmark = self.landmark,
            "the log reached its size limit: ending the recording here"
        );
        self.stats.log_size_limit_reached = true;
        self.lift_log_limit_for_final_records();
        self.end_live(Ending::Stopped)
    }

    /// The sync point the guest was kicked for does not fit in the room
    /// left: the guest state of the last landmark is gone, so the recording
    /// ends there with its End record but no final digest (the replay
    /// checks every earlier digest and stops at that landmark).
    pub(super) fn end_before_sync_point(&mut self) -> Result<Stop, RunError> {
        tracing::warn!(
            landmark = self.landmark,
            "the next sync point does not fit under the log's size limit: ending the recording at the landmark before it"
        );
        self.stats.log_size_limit_reached = true;
        self.stats.log_limit_before_sync_point = true;
        self.lift_log_limit_for_final_records();
        self.log(Record::End {
            landmark: self.landmark,
            reason: Ending::Stopped.log_reason(),
        })?;
        self.finish_log()?;
        Ok(Stop::Ended {
            ending: Ending::Stopped,
            log_end: false,
        })
    }

    fn lift_log_limit_for_final_records(&mut self) {
        let limit = self.settings.max_log_bytes;
        if let Role::Record(rec) = &mut self.role {
            rec.log.set_limit(limit);
        }
    }
}
