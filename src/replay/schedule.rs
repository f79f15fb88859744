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

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use thiserror::Error;

use super::log::{LogError, LogReader, Record};

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
}

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
    head: Option<Record>,
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
            head: None,
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
        self.ended && self.head.is_none() && !self.saw_end && self.source.complete_at_end()
    }

    /// Pull items until the head record is known or every record up to
    /// `landmark` is known to be here. False when the source had nothing yet.
    fn fill(&mut self, landmark: u64) -> Result<bool, ScheduleError> {
        while self.head.is_none() && self.complete_below <= landmark && !self.ended {
            match self.source.fetch(FETCH_WAIT)? {
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
                    self.head = Some(r);
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
                Fetched::Ended => self.ended = true,
                Fetched::Pending => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The next record if it belongs to `landmark`; None once every record
    /// of `landmark` has been taken. A record for an earlier landmark means
    /// the replay went past it: divergence.
    pub fn take_at(&mut self, landmark: u64) -> Result<Wait<Option<Record>>, ScheduleError> {
        if !self.fill(landmark)? {
            return Ok(Wait::Pending);
        }
        let Some(next) = &self.head else {
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
            return Ok(Wait::Ready(self.head.take()));
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
        let Some(next) = &self.head else {
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
                self.head.take().expect("head checked above"),
            )));
        }
        Ok(Wait::Ready(Step::Run))
    }
}

#[cfg(test)]
mod tests {
    use super::super::log::{CpuStateBytes, EndReason, LogHeader, LogWriter};
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

    fn live() -> (crossbeam_channel::Sender<LiveItem>, Schedule) {
        let (tx, rx) = crossbeam_channel::bounded(16);
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
