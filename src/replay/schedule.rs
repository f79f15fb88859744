//! The replay scheduler: decides, from the log alone, what the backup does at
//! each landmark. Sans-IO: it reads records and answers; the vCPU loop acts.
//!
//! The backup runs one epoch behind: it may run the guest from landmark k to
//! the next exit only when the log already holds a record beyond k, which
//! proves the primary got past k; and never when the next event is a sync
//! point at k+1 (the primary stopped the guest between k and k+1, and the
//! backup must load that state instead of executing).

use std::io::Read;

use thiserror::Error;

use super::log::{LogError, LogReader, Record};

/// What the vCPU loop must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Run the guest to its next landmark exit.
    Run,
    /// Load this sync point (the next landmark) instead of running.
    Sync(Record),
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
}

/// Pulls records from a log in landmark order.
pub struct Schedule<R: Read> {
    reader: LogReader<R>,
    peeked: Option<Record>,
    records_read: u64,
}

impl<R: Read> Schedule<R> {
    pub fn new(reader: LogReader<R>) -> Self {
        Schedule {
            reader,
            peeked: None,
            records_read: 0,
        }
    }

    pub fn records_read(&self) -> u64 {
        self.records_read
    }

    fn peek(&mut self) -> Result<Option<&Record>, ScheduleError> {
        if self.peeked.is_none() {
            self.peeked = self.reader.next_record()?;
            if self.peeked.is_some() {
                self.records_read += 1;
            }
        }
        Ok(self.peeked.as_ref())
    }

    /// The next record if it belongs to `landmark`. A record for an earlier
    /// landmark means the replay went past it: divergence.
    pub fn take_at(&mut self, landmark: u64) -> Result<Option<Record>, ScheduleError> {
        let Some(next) = self.peek()? else {
            return Ok(None);
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
            return Ok(self.peeked.take());
        }
        Ok(None)
    }

    /// Called after every record for `landmark` was consumed: run on, or
    /// load the sync point that is the next landmark.
    pub fn step_after(&mut self, landmark: u64) -> Result<Step, ScheduleError> {
        let Some(next) = self.peek()? else {
            return Err(ScheduleError::NoEnd(landmark));
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
            return Ok(Step::Sync(self.peeked.take().expect("peeked")));
        }
        Ok(Step::Run)
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
        };
        let mut w = LogWriter::new(Vec::new(), &h).unwrap();
        for r in records {
            w.append(r).unwrap();
        }
        w.into_inner()
    }

    fn sync(landmark: u64) -> Record {
        Record::SyncPoint {
            landmark,
            cpu: Box::new(CpuStateBytes::default()),
            vmm_state: vec![],
            pages: vec![],
        }
    }

    #[test]
    fn records_come_out_at_their_landmark_then_the_guest_runs() {
        let bytes = log_of(&[
            Record::Poll {
                landmark: 2,
                now: 10,
            },
            Record::Interrupt {
                landmark: 2,
                vector: 0x20,
            },
            Record::End {
                landmark: 5,
                reason: EndReason::Stopped,
            },
        ]);
        let mut s = Schedule::new(LogReader::new(&bytes[..]).unwrap());
        assert_eq!(s.take_at(0).unwrap(), None);
        assert_eq!(s.step_after(0).unwrap(), Step::Run);
        assert_eq!(
            s.take_at(2).unwrap(),
            Some(Record::Poll {
                landmark: 2,
                now: 10
            })
        );
        assert_eq!(
            s.take_at(2).unwrap(),
            Some(Record::Interrupt {
                landmark: 2,
                vector: 0x20
            })
        );
        assert_eq!(s.take_at(2).unwrap(), None);
        assert_eq!(s.step_after(2).unwrap(), Step::Run);
        assert!(matches!(s.take_at(5).unwrap(), Some(Record::End { .. })));
        assert_eq!(s.records_read(), 3);
    }

    #[test]
    fn a_sync_point_at_the_next_landmark_replaces_running() {
        let bytes = log_of(&[
            Record::Poll {
                landmark: 3,
                now: 1,
            },
            sync(4),
            Record::End {
                landmark: 4,
                reason: EndReason::Stopped,
            },
        ]);
        let mut s = Schedule::new(LogReader::new(&bytes[..]).unwrap());
        assert!(s.take_at(3).unwrap().is_some());
        assert_eq!(s.step_after(3).unwrap(), Step::Sync(sync(4)));
        assert!(matches!(s.take_at(4).unwrap(), Some(Record::End { .. })));
    }

    #[test]
    fn a_sync_point_further_ahead_lets_the_guest_run_first() {
        let bytes = log_of(&[
            sync(7),
            Record::End {
                landmark: 7,
                reason: EndReason::Stopped,
            },
        ]);
        let mut s = Schedule::new(LogReader::new(&bytes[..]).unwrap());
        assert_eq!(s.step_after(5).unwrap(), Step::Run);
        assert_eq!(s.step_after(6).unwrap(), Step::Sync(sync(7)));
    }

    #[test]
    fn the_backup_never_runs_past_the_log() {
        let bytes = log_of(&[Record::Poll {
            landmark: 1,
            now: 1,
        }]);
        let mut s = Schedule::new(LogReader::new(&bytes[..]).unwrap());
        assert!(s.take_at(1).unwrap().is_some());
        let err = s.step_after(1).unwrap_err();
        assert!(err.to_string().contains("without an end record"), "{err}");
    }

    #[test]
    fn passing_a_logged_landmark_is_divergence() {
        let bytes = log_of(&[
            Record::Interrupt {
                landmark: 3,
                vector: 0x20,
            },
            Record::End {
                landmark: 9,
                reason: EndReason::Stopped,
            },
        ]);
        let mut s = Schedule::new(LogReader::new(&bytes[..]).unwrap());
        let err = s.take_at(4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "replay diverged: at landmark 4 the log still holds a interrupt record for landmark 3"
        );
    }
}
