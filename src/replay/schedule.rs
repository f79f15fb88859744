//! The replay scheduler: decides, from the log alone, what the backup does at
//! each landmark. Sans-IO: it pulls records from a [`RecordSource`] and
//! answers; the engine acts.
//!
//! The backup runs one epoch behind: it may run the guest from landmark k to
//! the next exit only when it knows every record of landmark k+1 is in hand
//! — a later record has arrived, or the primary's watermark says it finished
//! k+1 — and never when k+1 is a sync point (the primary stopped the guest
//! between k and k+1, and the backup loads that state instead of executing).
//!
//! Two kinds of source feed it. A log file is complete: its end without an
//! End record is an error. A live stream from a primary may simply stop (the
//! primary died); then the schedule reports [`Step::Exhausted`] at a landmark
//! boundary, and the backup may go live from there.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use thiserror::Error;

use super::log::{record_cost, LogError, LogReader, Record, ResumeState};

/// What the engine must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Run the guest to its next landmark exit.
    Run,
    /// Load this sync point (the next landmark) instead of running.
    Sync(Record),
    /// A live stream ended here: every record the primary sent has been
    /// applied, and nothing is known about the next landmark.
    Exhausted,
    /// The backup is behind: load everything up to a later sync point that
    /// carries the machine's state instead of executing up to it.
    CatchUp(CatchUp),
}

/// What a backup loads to catch up (see [`Schedule::set_catch_up`]).
#[derive(Debug, PartialEq, Eq)]
pub struct CatchUp {
    /// Every sync point after the current landmark up to the target, in
    /// order; the last is the target's.
    pub sync_points: Vec<Record>,
    /// The target's machine state (its `SyncState` record).
    pub state: Box<ResumeState>,
    /// Records of the landmarks skipped (inputs, digests, checks), not
    /// applied: the target's state includes what they did.
    pub skipped_records: u64,
}

/// The highest landmark a catching-up backup may jump to, asked when it
/// would: a live backup may not skip outputs the primary has not let out
/// yet (it must hold their copies for a go-live: src/ft/output.rs), so it
/// answers the primary's released marker.
pub type CatchUpLimit = Box<dyn Fn() -> u64 + Send>;

/// A backup catches up only while at least this many sync points with
/// state are in hand ahead of it: then it is more than one such interval
/// behind, and loads the first (a backup keeping up executes everything).
const CATCH_UP_STATES_AHEAD: usize = 2;
/// A catching-up backup reads at most this much of the log ahead (record
/// sizes as `record_cost` counts them), so a file cannot make it hold a
/// whole log.
const CATCH_UP_LOOKAHEAD_BYTES: u64 = 256 << 20;

/// An answer, or "nothing decisive arrived yet" (live streams only): the
/// engine then handles its control messages and asks again.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait<T> {
    Ready(T),
    Pending,
}

/// One item from a record source.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    Record(Record),
    /// Every record of every landmark up to this one has been delivered.
    Watermark(u64),
    /// No more items will come.
    Ended,
    /// Nothing arrived within the wait.
    Pending,
}

/// Where a backup's records come from.
pub trait RecordSource: Send {
    /// The next item, waiting at most `wait` for one.
    fn fetch(&mut self, wait: Duration) -> Result<Fetched, ScheduleError>;
    /// Whether the end of the source means the log is complete (a file,
    /// which must then hold an End record) rather than cut off (a live
    /// stream whose primary stopped sending).
    fn complete_at_end(&self) -> bool;
}

/// A recorded log file: every record is there, no watermarks needed.
pub struct FileSource<R: Read> {
    reader: LogReader<R>,
}

impl<R: Read> FileSource<R> {
    pub fn new(reader: LogReader<R>) -> Self {
        FileSource { reader }
    }
}

impl<R: Read + Send> RecordSource for FileSource<R> {
    fn fetch(&mut self, _wait: Duration) -> Result<Fetched, ScheduleError> {
        Ok(match self.reader.next_record()? {
            Some(r) => Fetched::Record(r),
            None => Fetched::Ended,
        })
    }

    fn complete_at_end(&self) -> bool {
        true
    }
}

/// What a live backup's receiver thread hands the engine, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveItem {
    Record(Record),
    Watermark(u64),
}

/// Records arriving from a primary through a channel; the channel closing
/// is the end of the stream. `queued` counts what the channel holds
/// (`log::record_cost`), so the receiver can bound it.
///
/// A std channel, not crossbeam's: crossbeam's blocking receive calls
/// `sched_yield` four times before it parks, and on a host CPU shared with
/// a busy thread (the primary's vCPU, another guest) each yield gives that
/// thread a whole time slice; the backup's vCPU, which waits here every
/// time it drains the queue, got 2% of a shared CPU (measured,
/// docs/benchmarks.md). std's parks without yielding.
pub struct LiveSource {
    rx: Receiver<LiveItem>,
    queued: Arc<AtomicU64>,
}

impl LiveSource {
    pub fn new(rx: Receiver<LiveItem>, queued: Arc<AtomicU64>) -> Self {
        LiveSource { rx, queued }
    }
}

impl RecordSource for LiveSource {
    fn fetch(&mut self, wait: Duration) -> Result<Fetched, ScheduleError> {
        Ok(match self.rx.recv_timeout(wait) {
            Ok(LiveItem::Record(r)) => {
                self.queued
                    .fetch_sub(super::log::record_cost(&r), Ordering::Relaxed);
                Fetched::Record(r)
            }
            Ok(LiveItem::Watermark(w)) => Fetched::Watermark(w),
            Err(RecvTimeoutError::Timeout) => Fetched::Pending,
            Err(RecvTimeoutError::Disconnected) => Fetched::Ended,
        })
    }

    fn complete_at_end(&self) -> bool {
        false
    }
}

/// Replay cannot go on.
#[derive(Debug, Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Log(#[from] LogError),
    /// The log stops without saying how the recording ended.
    #[error("log ends after landmark {0} without an end record: it is incomplete (truncated at a record boundary?)")]
    NoEnd(u64),
    /// The replay got past a landmark the log has events for: divergence.
    #[error("replay diverged: at landmark {at} the log still holds a {kind} record for landmark {expected}")]
    Passed {
        at: u64,
        expected: u64,
        kind: &'static str,
    },
    /// A live stream's records or watermarks went backwards.
    #[error("the primary's stream went backwards: {0}")]
    OutOfOrder(String),
}

/// How long one fetch may wait before the engine gets control back.
const FETCH_WAIT: Duration = Duration::from_millis(20);

/// Pulls records in landmark order.
pub struct Schedule {
    source: Box<dyn RecordSource>,
    /// Records read and not yet taken, in order (only a catching-up
    /// schedule holds more than one).
    ahead: VecDeque<Record>,
    /// `SyncState` records in `ahead`, and what `ahead` costs.
    states_ahead: usize,
    bytes_ahead: u64,
    /// Load sync points with state instead of executing while behind, up
    /// to this landmark.
    catch_up: Option<CatchUpLimit>,
    /// Never catch up to this landmark or past it (None: no such bound).
    catch_up_held_at: Option<u64>,
    /// Every record of every landmark below this one has arrived.
    complete_below: u64,
    ended: bool,
    /// The End record came (a log without one is incomplete).
    saw_end: bool,
    last_landmark: u64,
    last_watermark: u64,
    records_read: u64,
}

impl Schedule {
    pub fn new(source: Box<dyn RecordSource>) -> Self {
        Schedule {
            source,
            ahead: VecDeque::new(),
            states_ahead: 0,
            bytes_ahead: 0,
            catch_up: None,
            catch_up_held_at: None,
            complete_below: 0,
            ended: false,
            saw_end: false,
            last_landmark: 0,
            last_watermark: 0,
            records_read: 0,
        }
    }

    /// A schedule over a complete log.
    pub fn from_log<R: Read + Send + 'static>(reader: LogReader<R>) -> Self {
        Schedule::new(Box::new(FileSource::new(reader)))
    }

    /// Catch up while behind: when at least two sync points that carry the
    /// machine's state (`SyncState`) are in hand ahead of the backup, step
    /// to the first instead of running ([`Step::CatchUp`]). Nothing in the
    /// skipped stretches is checked; digests and the target's state keep
    /// checking what the backup holds after it. Only to targets at or
    /// below `limit()`; None: never.
    pub fn set_catch_up(&mut self, limit: Option<CatchUpLimit>) {
        self.catch_up = limit;
    }

    /// Never catch up to `landmark` or past it, so the replica executes it
    /// (a test perturbation is applied there); None lifts the bound.
    pub fn hold_catch_up_at(&mut self, landmark: Option<u64>) {
        self.catch_up_held_at = landmark;
    }

    pub fn records_read(&self) -> u64 {
        self.records_read
    }

    /// Every record of every landmark below this one is known to be here.
    pub fn complete_below(&self) -> u64 {
        self.complete_below
    }

    /// A complete log (a file) was read to its last record, every record
    /// was taken, and none was the End record: the log was cut (at a record
    /// boundary). A replay that finds the guest disagreeing with the log at
    /// its last landmark then reports the cut ([`ScheduleError::NoEnd`]),
    /// not a divergence: the records it misses are past the cut.
    pub fn cut_short(&self) -> bool {
        self.ended && self.ahead.is_empty() && !self.saw_end && self.source.complete_at_end()
    }

    /// Pull items until the head record is known or every record up to
    /// `landmark` is known to be here. False when the source had nothing yet.
    fn fill(&mut self, landmark: u64) -> Result<bool, ScheduleError> {
        while self.ahead.is_empty() && self.complete_below <= landmark && !self.ended {
            if !self.pull(FETCH_WAIT)? && !self.ended {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Take one item from the source, waiting at most `wait`. False when
    /// nothing came.
    fn pull(&mut self, wait: Duration) -> Result<bool, ScheduleError> {
        match self.source.fetch(wait)? {
            Fetched::Record(r) => {
                if r.landmark() < self.last_landmark {
                    return Err(ScheduleError::OutOfOrder(format!(
                        "a {} record for landmark {} after landmark {}",
                        r.kind_name(),
                        r.landmark(),
                        self.last_landmark
                    )));
                }
                self.last_landmark = r.landmark();
                // A record for landmark L proves every earlier landmark
                // complete (records come in landmark order).
                self.complete_below = self.complete_below.max(r.landmark());
                self.records_read += 1;
                self.saw_end |= matches!(r, Record::End { .. });
                self.states_ahead += usize::from(matches!(r, Record::SyncState { .. }));
                self.bytes_ahead += record_cost(&r);
                self.ahead.push_back(r);
            }
            Fetched::Watermark(w) => {
                if w < self.last_watermark {
                    return Err(ScheduleError::OutOfOrder(format!(
                        "watermark {w} after watermark {}",
                        self.last_watermark
                    )));
                }
                self.last_watermark = w;
                self.complete_below = self.complete_below.max(w.saturating_add(1));
            }
            Fetched::Ended => {
                self.ended = true;
                return Ok(false);
            }
            Fetched::Pending => return Ok(false),
        }
        Ok(true)
    }

    /// The first record in hand, taken.
    fn pop(&mut self) -> Option<Record> {
        let r = self.ahead.pop_front()?;
        self.states_ahead -= usize::from(matches!(r, Record::SyncState { .. }));
        self.bytes_ahead -= record_cost(&r);
        Some(r)
    }

    /// The next record if it belongs to `landmark`; None once every record
    /// of `landmark` has been taken. A record for an earlier landmark means
    /// the replay went past it: divergence.
    pub fn take_at(&mut self, landmark: u64) -> Result<Wait<Option<Record>>, ScheduleError> {
        if !self.fill(landmark)? {
            return Ok(Wait::Pending);
        }
        let Some(next) = self.ahead.front() else {
            return Ok(Wait::Ready(None));
        };
        let at = next.landmark();
        if at < landmark {
            return Err(ScheduleError::Passed {
                at: landmark,
                expected: at,
                kind: next.kind_name(),
            });
        }
        if at == landmark {
            return Ok(Wait::Ready(self.pop()));
        }
        Ok(Wait::Ready(None))
    }

    /// Called after every record for `landmark` was consumed: run on, load
    /// the sync point that is the next landmark, or report the end of a live
    /// stream.
    pub fn step_after(&mut self, landmark: u64) -> Result<Wait<Step>, ScheduleError> {
        if !self.fill(landmark + 1)? {
            return Ok(Wait::Pending);
        }
        if self.catch_up.is_some() {
            if let Some(catch_up) = self.catch_up_from(landmark)? {
                return Ok(Wait::Ready(Step::CatchUp(catch_up)));
            }
        }
        let Some(next) = self.ahead.front() else {
            if self.complete_below > landmark + 1 {
                return Ok(Wait::Ready(Step::Run));
            }
            return if self.source.complete_at_end() {
                Err(ScheduleError::NoEnd(landmark))
            } else {
                Ok(Wait::Ready(Step::Exhausted))
            };
        };
        let at = next.landmark();
        if at <= landmark {
            return Err(ScheduleError::Passed {
                at: landmark,
                expected: at,
                kind: next.kind_name(),
            });
        }
        if at == landmark + 1 && matches!(next, Record::SyncPoint { .. }) {
            return Ok(Wait::Ready(Step::Sync(
                self.pop().expect("head checked above"),
            )));
        }
        Ok(Wait::Ready(Step::Run))
    }

    /// At `landmark` (every record of it taken): read ahead what is already
    /// there, without waiting, and if enough sync points with state are in
    /// hand, take everything up to the first of them.
    fn catch_up_from(&mut self, landmark: u64) -> Result<Option<CatchUp>, ScheduleError> {
        while self.states_ahead < CATCH_UP_STATES_AHEAD
            && self.bytes_ahead < CATCH_UP_LOOKAHEAD_BYTES
            && !self.ended
        {
            if !self.pull(Duration::ZERO)? {
                break;
            }
        }
        if self.states_ahead < CATCH_UP_STATES_AHEAD {
            return Ok(None);
        }
        // The first sync state ahead, if it covers the pages written since
        // a landmark this replica has reached.
        let Some((target, since)) = self.ahead.iter().find_map(|r| match r {
            Record::SyncState { landmark, state } => Some((*landmark, state.since)),
            _ => None,
        }) else {
            return Ok(None);
        };
        if since > landmark
            || self.catch_up_held_at.is_some_and(|held| target >= held)
            || self.catch_up.as_ref().is_none_or(|limit| target > limit())
        {
            return Ok(None);
        }
        if let Some(next) = self.ahead.front() {
            if next.landmark() <= landmark {
                return Err(ScheduleError::Passed {
                    at: landmark,
                    expected: next.landmark(),
                    kind: next.kind_name(),
                });
            }
        }
        let mut sync_points = Vec::new();
        let mut skipped_records = 0;
        while let Some(record) = self.pop() {
            match record {
                Record::SyncPoint { .. } => sync_points.push(record),
                Record::SyncState {
                    landmark: at,
                    state,
                } => {
                    if sync_points.last().map(Record::landmark) != Some(at) {
                        return Err(ScheduleError::OutOfOrder(format!(
                            "the sync-state record of landmark {at} does not follow that landmark's sync point"
                        )));
                    }
                    return Ok(Some(CatchUp {
                        sync_points,
                        state,
                        skipped_records,
                    }));
                }
                _ => skipped_records += 1,
            }
        }
        unreachable!("a sync-state record was counted in hand")
    }
}

#[cfg(test)]
mod tests {
    use super::super::log::{CpuStateBytes, EndReason, LogHeader, LogWriter, ResumeState};
    use super::*;

    fn log_of(records: &[Record]) -> Vec<u8> {
        let h = LogHeader {
            kernel_hash: [0; 32],
            initrd_hash: None,
            cmdline: String::new(),
            mem_bytes: 1 << 24,
            boot_unix_secs: 0,
            host_cpu: 0,
            net_mac: None,
            tick_delivery: crate::devices::TickDelivery::AtLandmarks,
        };
        let mut w = LogWriter::new(Vec::new(), &h).unwrap();
        for r in records {
            w.append(r).unwrap();
        }
        w.into_inner()
    }

    fn file(bytes: Vec<u8>) -> Schedule {
        Schedule::from_log(LogReader::new(std::io::Cursor::new(bytes)).unwrap())
    }

    fn ready<T: std::fmt::Debug>(w: Result<Wait<T>, ScheduleError>) -> T {
        match w.unwrap() {
            Wait::Ready(t) => t,
            Wait::Pending => panic!("a file source is never pending"),
        }
    }

    fn sync(landmark: u64) -> Record {
        Record::SyncPoint {
            landmark,
            cpu: Box::new(CpuStateBytes::default()),
            vmm_state: vec![],
            pages: vec![],
        }
    }

    fn end(landmark: u64) -> Record {
        Record::End {
            landmark,
            reason: EndReason::Stopped,
        }
    }

    #[test]
    fn records_come_out_at_their_landmark_then_the_guest_runs() {
        let mut s = file(log_of(&[
            Record::Poll {
                landmark: 2,
                now: 10,
            },
            Record::Interrupt {
                landmark: 2,
                vector: 0x20,
            },
            end(5),
        ]));
        assert_eq!(ready(s.take_at(0)), None);
        assert_eq!(ready(s.step_after(0)), Step::Run);
        assert_eq!(
            ready(s.take_at(2)),
            Some(Record::Poll {
                landmark: 2,
                now: 10
            })
        );
        assert_eq!(
            ready(s.take_at(2)),
            Some(Record::Interrupt {
                landmark: 2,
                vector: 0x20
            })
        );
        assert_eq!(ready(s.take_at(2)), None);
        assert_eq!(ready(s.step_after(2)), Step::Run);
        assert!(matches!(ready(s.take_at(5)), Some(Record::End { .. })));
        assert_eq!(s.records_read(), 3);
    }

    #[test]
    fn a_sync_point_at_the_next_landmark_replaces_running() {
        let mut s = file(log_of(&[
            Record::Poll {
                landmark: 3,
                now: 1,
            },
            sync(4),
            end(4),
        ]));
        assert!(ready(s.take_at(3)).is_some());
        assert_eq!(ready(s.step_after(3)), Step::Sync(sync(4)));
        assert!(matches!(ready(s.take_at(4)), Some(Record::End { .. })));
    }

    #[test]
    fn a_sync_point_further_ahead_lets_the_guest_run_first() {
        let mut s = file(log_of(&[sync(7), end(7)]));
        assert_eq!(ready(s.step_after(5)), Step::Run);
        assert_eq!(ready(s.step_after(6)), Step::Sync(sync(7)));
    }

    #[test]
    fn the_backup_never_runs_past_the_log() {
        let mut s = file(log_of(&[Record::Poll {
            landmark: 1,
            now: 1,
        }]));
        assert!(ready(s.take_at(1)).is_some());
        let err = s.step_after(1).unwrap_err();
        assert!(err.to_string().contains("without an end record"), "{err}");
    }

    #[test]
    fn a_log_cut_inside_a_landmarks_records_is_cut_short_and_a_whole_one_is_not() {
        let poll = Record::Poll {
            landmark: 5,
            now: 1,
        };
        let interrupt = Record::Interrupt {
            landmark: 5,
            vector: 0x20,
        };
        // Cut between the landmark's Poll and its Interrupt.
        let mut s = file(log_of(&[sync(5), poll.clone()]));
        assert!(!s.cut_short());
        assert_eq!(ready(s.take_at(5)), Some(sync(5)));
        assert_eq!(ready(s.take_at(5)), Some(poll.clone()));
        assert_eq!(ready(s.take_at(5)), None);
        assert!(s.cut_short());
        // The whole log: its End record was read.
        let mut s = file(log_of(&[sync(5), poll, interrupt, end(5)]));
        for _ in 0..4 {
            assert!(ready(s.take_at(5)).is_some());
        }
        assert_eq!(ready(s.take_at(5)), None);
        assert!(!s.cut_short());
    }

    #[test]
    fn passing_a_logged_landmark_is_divergence() {
        let mut s = file(log_of(&[
            Record::Interrupt {
                landmark: 3,
                vector: 0x20,
            },
            end(9),
        ]));
        let err = s.take_at(4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "replay diverged: at landmark 4 the log still holds a interrupt record for landmark 3"
        );
    }

    fn state(landmark: u64) -> Record {
        state_since(landmark, 0)
    }

    fn state_since(landmark: u64, since: u64) -> Record {
        Record::SyncState {
            landmark,
            state: Box::new(ResumeState {
                clock: landmark * 10,
                signature: [0; 32],
                signature_last: [0; 16],
                device_unflushed: false,
                devices: b"{}".to_vec(),
                since,
                pages: vec![(0x5000, vec![landmark as u8; 4096].into())],
            }),
        }
    }

    fn catching_up(records: &[Record], limit: u64) -> Schedule {
        let mut s = file(log_of(records));
        s.set_catch_up(Some(Box::new(move || limit)));
        s
    }

    #[test]
    fn a_backup_two_states_behind_loads_the_first_and_skips_what_lies_before() {
        let poll = |landmark| Record::Poll { landmark, now: 1 };
        let log = [
            poll(2),
            sync(3),
            poll(4),
            sync(5),
            state(5),
            poll(5),
            sync(8),
            state(8),
            end(9),
        ];
        let mut s = catching_up(&log, u64::MAX);
        let Step::CatchUp(jump) = ready(s.step_after(1)) else {
            panic!("no catch-up")
        };
        assert_eq!(jump.sync_points, vec![sync(3), sync(5)]);
        assert_eq!(jump.state.clock, 50);
        assert_eq!(jump.skipped_records, 2);
        // The target's own records after its state stay for it.
        assert_eq!(ready(s.take_at(5)), Some(poll(5)));
        assert_eq!(ready(s.take_at(5)), None);
        // One state ahead: the backup executes (here to the sync point).
        assert_eq!(ready(s.step_after(5)), Step::Run);
        assert_eq!(ready(s.step_after(7)), Step::Sync(sync(8)));
        assert_eq!(ready(s.take_at(8)), Some(state(8)));
        // Without catch-up, the same log runs everything.
        let mut s = file(log_of(&log));
        assert_eq!(ready(s.step_after(1)), Step::Run);
    }

    #[test]
    fn catch_up_stops_at_its_limit() {
        let log = [sync(5), state(5), sync(8), state(8), end(9)];
        // The primary released outputs only through landmark 4.
        let mut s = catching_up(&log, 4);
        assert_eq!(ready(s.step_after(1)), Step::Run);
        assert_eq!(ready(s.step_after(4)), Step::Sync(sync(5)));
        let mut s = catching_up(&log, 5);
        assert!(
            matches!(ready(s.step_after(1)), Step::CatchUp(j) if j.sync_points == vec![sync(5)])
        );
        // Held at landmark 5 (a test perturbation there): executed, not loaded.
        let mut s = catching_up(&log, u64::MAX);
        s.hold_catch_up_at(Some(5));
        assert_eq!(ready(s.step_after(1)), Step::Run);
        s.hold_catch_up_at(None);
        assert!(matches!(ready(s.step_after(1)), Step::CatchUp(_)));
        // A sync state that covers pages only from landmark 3 on: a backup
        // before it executes up to there first.
        let log = [sync(5), state_since(5, 3), sync(8), state(8), end(9)];
        let mut s = catching_up(&log, u64::MAX);
        assert_eq!(ready(s.step_after(1)), Step::Run);
        assert!(matches!(ready(s.step_after(3)), Step::CatchUp(j) if j.state.since == 3));
    }

    #[test]
    fn a_sync_state_without_its_sync_point_is_refused() {
        let mut s = catching_up(&[sync(3), state(5), sync(8), state(8), end(9)], u64::MAX);
        let err = s.step_after(1).unwrap_err();
        assert!(
            err.to_string().contains(
                "sync-state record of landmark 5 does not follow that landmark's sync point"
            ),
            "{err}"
        );
    }

    fn live() -> (std::sync::mpsc::SyncSender<LiveItem>, Schedule) {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        (
            tx,
            Schedule::new(Box::new(LiveSource::new(rx, Default::default()))),
        )
    }

    #[test]
    fn a_live_backup_waits_for_the_watermark_before_running() {
        let (tx, mut s) = live();
        // Nothing yet: the backup may not run from landmark 0.
        assert_eq!(s.step_after(0).unwrap(), Wait::Pending);
        // The primary finished landmark 1 without records: run to it.
        tx.send(LiveItem::Watermark(1)).unwrap();
        assert_eq!(s.step_after(0).unwrap(), Wait::Ready(Step::Run));
        assert_eq!(s.take_at(1).unwrap(), Wait::Ready(None));
        // Landmark 2's records are not all known until watermark 2.
        tx.send(LiveItem::Record(Record::Poll {
            landmark: 3,
            now: 5,
        }))
        .unwrap();
        // A record for 3 proves 2 complete and not a sync point.
        assert_eq!(s.step_after(1).unwrap(), Wait::Ready(Step::Run));
        assert_eq!(s.take_at(2).unwrap(), Wait::Ready(None));
        assert_eq!(s.step_after(2).unwrap(), Wait::Ready(Step::Run));
        assert!(matches!(s.take_at(3).unwrap(), Wait::Ready(Some(_))));
        // Landmark 3 may hold more records: wait for them or a watermark.
        assert_eq!(s.take_at(3).unwrap(), Wait::Pending);
        tx.send(LiveItem::Watermark(3)).unwrap();
        assert_eq!(s.take_at(3).unwrap(), Wait::Ready(None));
        assert_eq!(s.step_after(3).unwrap(), Wait::Pending);
        tx.send(LiveItem::Record(sync(4))).unwrap();
        assert_eq!(s.step_after(3).unwrap(), Wait::Ready(Step::Sync(sync(4))));
    }

    #[test]
    fn a_live_stream_that_stops_is_exhausted_not_an_error() {
        let (tx, mut s) = live();
        tx.send(LiveItem::Watermark(2)).unwrap();
        drop(tx);
        assert_eq!(s.step_after(1).unwrap(), Wait::Ready(Step::Run));
        assert_eq!(s.take_at(2).unwrap(), Wait::Ready(None));
        assert_eq!(s.step_after(2).unwrap(), Wait::Ready(Step::Exhausted));
    }

    #[test]
    fn a_live_stream_going_backwards_is_refused() {
        let (tx, mut s) = live();
        tx.send(LiveItem::Watermark(5)).unwrap();
        tx.send(LiveItem::Watermark(4)).unwrap();
        assert_eq!(s.step_after(4).unwrap(), Wait::Ready(Step::Run));
        let err = s.step_after(5).unwrap_err();
        assert!(
            err.to_string().contains("watermark 4 after watermark 5"),
            "{err}"
        );
    }
}
