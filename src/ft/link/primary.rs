//! The primary's endpoint: pushes the log, learns acks, reports `released`.

use std::collections::VecDeque;
use std::time::Duration;

use arbiter::auth::Key;

use super::channel::{Channel, Expired};
use super::{CloseReason, LinkConfig, LinkError, LinkStats};
use crate::ft::wire::{
    bounded_text, ToBackup, ToPrimary, MAX_LOG_HEADER_BYTES, MAX_VM_NAME_BYTES, PROTOCOL_VERSION,
};

/// What the primary announces after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub vm: String,
    pub generation: u64,
    /// The VM's encoded `LogHeader`.
    pub log_header: Vec<u8>,
    /// 0 for a fresh boot; the first watermark and `released` are this.
    pub start_landmark: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryEvent {
    /// The backup accepted the Hello: records flow, the failover machine starts.
    Established,
    /// The backup refused the Hello (the link is closed).
    HelloRefused {
        reason: String,
    },
    /// The backup has every record through `watermark`: release outputs up to it.
    Acked {
        watermark: u64,
        log_bytes: u64,
    },
    PeerHeartbeat {
        replayed_landmark: u64,
        lag_ns: u64,
    },
    /// The backup's replay diverged; it stops (the link is closed).
    Diverged {
        landmark: u64,
        detail: String,
    },
    /// Nothing valid from the backup for `peer_timeout` (the link is closed).
    PeerSuspected {
        silent_for: Duration,
    },
    /// The link ended for another reason (refused frame, broken connection...).
    Closed {
        reason: CloseReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PrimaryLinkStatus {
    pub established: bool,
    pub closed: Option<String>,
    pub pushed_watermark: u64,
    pub sent_watermark: u64,
    pub acked_watermark: u64,
    pub released: u64,
    pub in_flight_bytes: u64,
    pub backup_replayed_landmark: u64,
    pub backup_lag_ns: u64,
    pub stats: LinkStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshaking,
    AwaitingHelloOk,
    Established,
}

pub struct PrimaryLink {
    chan: Channel,
    hello: Option<Vec<u8>>,
    phase: Phase,
    events: VecDeque<PrimaryEvent>,
    /// Closing was reported (or was our own doing).
    close_reported: bool,
    /// Log bytes pushed, not yet put in a frame.
    pending: VecDeque<u8>,
    /// (stream offset where a push ended, watermark it completed), not yet sent.
    boundaries: VecDeque<(u64, u64)>,
    pushed_bytes: u64,
    pushed_watermark: u64,
    sent_bytes: u64,
    sent_watermark: u64,
    sent_released: u64,
    acked_bytes: u64,
    acked_watermark: u64,
    released: u64,
    backup_replayed: u64,
    backup_lag_ns: u64,
}

impl PrimaryLink {
    /// A link for a freshly connected socket; handshake message 1 is queued.
    pub fn new(
        config: LinkConfig,
        key: &Key,
        hello: Hello,
        now: Duration,
    ) -> Result<Self, LinkError> {
        config.validate()?;
        if hello.vm.is_empty() || hello.vm.len() > MAX_VM_NAME_BYTES {
            return Err(LinkError::InvalidConfig(format!(
                "vm name must be 1..={MAX_VM_NAME_BYTES} bytes, got {}",
                hello.vm.len()
            )));
        }
        if hello.log_header.len() > MAX_LOG_HEADER_BYTES {
            return Err(LinkError::InvalidConfig(format!(
                "log header of {} bytes exceeds {MAX_LOG_HEADER_BYTES}",
                hello.log_header.len()
            )));
        }
        let start = hello.start_landmark;
        let encoded = ToBackup::Hello {
            protocol_version: PROTOCOL_VERSION,
            vm: hello.vm,
            generation: hello.generation,
            log_header: hello.log_header,
            start_landmark: start,
        }
        .encode();
        if encoded.len() + arbiter::auth::TAG_LEN > config.max_frame_bytes as usize {
            return Err(LinkError::InvalidConfig(format!(
                "the Hello ({} bytes) does not fit in a {}-byte frame",
                encoded.len(),
                config.max_frame_bytes
            )));
        }
        Ok(PrimaryLink {
            chan: Channel::initiator(config, key, now),
            hello: Some(encoded),
            phase: Phase::Handshaking,
            events: VecDeque::new(),
            close_reported: false,
            pending: VecDeque::new(),
            boundaries: VecDeque::new(),
            pushed_bytes: 0,
            pushed_watermark: start,
            sent_bytes: 0,
            sent_watermark: start,
            sent_released: start,
            acked_bytes: 0,
            acked_watermark: start,
            released: start,
            backup_replayed: start,
            backup_lag_ns: 0,
        })
    }

    pub fn on_bytes_received(&mut self, bytes: &[u8], now: Duration) {
        if self.expire(now) {
            return;
        }
        self.chan.receive(bytes);
        while let Some(message) = self.chan.next_message(now) {
            self.handle(&message, now);
        }
        self.send_hello_once_open();
        self.report_close();
    }

    /// The socket hit EOF or an error.
    pub fn connection_lost(&mut self, reason: &str) {
        self.chan
            .close(CloseReason::ConnectionLost(reason.to_owned()), false);
        self.report_close();
    }

    /// Closes the link on this side's decision (no event).
    pub fn close(&mut self, reason: &str) {
        self.close_reported = true;
        self.chan
            .close(CloseReason::Local(reason.to_owned()), false);
    }

    pub fn handle_timeout(&mut self, now: Duration) {
        self.expire(now);
    }

    /// This side's own thread ran `stalled` late: that time is not the
    /// peer's silence (see `Channel::credit_local_stall`). Returns the time
    /// credited.
    pub fn credit_local_stall(&mut self, stalled: Duration, now: Duration) -> Duration {
        self.chan.credit_local_stall(stalled, now)
    }

    /// When `handle_timeout` (and `poll_transmit`) must next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let deadline = self.chan.deadline()?;
        Some(match self.phase {
            Phase::Established => {
                deadline.min(self.chan.last_tx + self.chan.config.heartbeat_interval)
            }
            _ => deadline,
        })
    }

    pub fn poll_event(&mut self) -> Option<PrimaryEvent> {
        self.events.pop_front()
    }

    /// The next bytes to write to the socket.
    pub fn poll_transmit(&mut self, now: Duration) -> Option<Vec<u8>> {
        if let Some(frame) = self.chan.pop_transmit(now) {
            return Some(frame);
        }
        if self.chan.closed().is_some() || self.phase != Phase::Established {
            return None;
        }
        if let Some(records) = self.next_records() {
            self.chan.send(&records);
        } else if now >= self.chan.last_tx + self.chan.config.heartbeat_interval {
            self.send_heartbeat(now);
        }
        self.chan.pop_transmit(now)
    }

    /// Whether `push_log` of `len` bytes fits the window now. An empty window
    /// takes any push up to `max_push_bytes`, so a record bigger than the
    /// window cannot stall the guest.
    pub fn can_accept(&self, len: u64) -> bool {
        let in_flight = self.in_flight();
        len <= self.chan.config.max_push_bytes
            && (in_flight == 0 || in_flight + len <= self.chan.config.window_bytes)
    }

    /// Queues log bytes. `watermark`: every record of every landmark <= it is
    /// in the bytes pushed so far (a record split over several pushes: the
    /// pushes before its end repeat the previous watermark). Outputs of
    /// landmarks <= `watermark` must already be in `HeldOutputs`.
    pub fn push_log(&mut self, bytes: &[u8], watermark: u64) -> Result<(), LinkError> {
        if let Some(reason) = self.chan.closed() {
            return Err(LinkError::Closed(reason.clone()));
        }
        if watermark < self.pushed_watermark {
            return Err(LinkError::WatermarkBackwards {
                watermark,
                last: self.pushed_watermark,
            });
        }
        let len = bytes.len() as u64;
        if len > self.chan.config.max_push_bytes {
            return Err(LinkError::PushTooLarge {
                len,
                max: self.chan.config.max_push_bytes,
            });
        }
        if !self.can_accept(len) {
            return Err(LinkError::WindowFull {
                in_flight: self.in_flight(),
                len,
                window: self.chan.config.window_bytes,
            });
        }
        self.pending.extend(bytes);
        self.pushed_bytes += len;
        self.chan.stats.log_bytes += len;
        self.chan.stats.log_chunks += 1;
        if watermark > self.pushed_watermark {
            match self.boundaries.back_mut() {
                Some(back) if back.0 == self.pushed_bytes => back.1 = watermark,
                _ => self.boundaries.push_back((self.pushed_bytes, watermark)),
            }
            self.pushed_watermark = watermark;
        }
        Ok(())
    }

    /// Every output of landmarks <= `released` has been written to the world
    /// (call after writing, never before: the backup drops its copies).
    /// Still checked after the link closed (an `Acked` event may precede the
    /// closing one), though nothing is sent any more.
    pub fn set_released(&mut self, released: u64) -> Result<(), LinkError> {
        if released < self.released {
            return Err(LinkError::ReleasedBackwards {
                released,
                last: self.released,
            });
        }
        if released > self.acked_watermark {
            return Err(LinkError::ReleasedBeyondAck {
                released,
                acked: self.acked_watermark,
            });
        }
        self.released = released;
        Ok(())
    }

    /// Orderly end: the guest stopped, the whole log was pushed, acked and
    /// every output released. Queues the rest of the log, the final
    /// `released` and Bye, then closes; drain `poll_transmit`.
    pub fn send_bye(&mut self, reason: &str, now: Duration) -> Result<(), LinkError> {
        if let Some(reason) = self.chan.closed() {
            return Err(LinkError::Closed(reason.clone()));
        }
        if self.phase != Phase::Established {
            return Err(LinkError::NotEstablished);
        }
        if self.released < self.pushed_watermark {
            return Err(LinkError::ByeBeforeReleased {
                released: self.released,
                watermark: self.pushed_watermark,
            });
        }
        while let Some(records) = self.next_records() {
            self.chan.send(&records);
        }
        if self.sent_released < self.released {
            self.send_heartbeat(now);
        }
        let bye = ToBackup::Bye {
            reason: bounded_text(reason),
        };
        self.chan.send(&bye.encode());
        self.close_reported = true;
        self.chan
            .close(CloseReason::Local(format!("said Bye: {reason}")), true);
        Ok(())
    }

    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established && self.chan.closed().is_none()
    }

    pub fn is_closed(&self) -> bool {
        self.chan.closed().is_some()
    }

    pub fn acked_watermark(&self) -> u64 {
        self.acked_watermark
    }

    pub fn status(&self) -> PrimaryLinkStatus {
        PrimaryLinkStatus {
            established: self.phase == Phase::Established,
            closed: self.chan.closed().map(ToString::to_string),
            pushed_watermark: self.pushed_watermark,
            sent_watermark: self.sent_watermark,
            acked_watermark: self.acked_watermark,
            released: self.released,
            in_flight_bytes: self.in_flight(),
            backup_replayed_landmark: self.backup_replayed,
            backup_lag_ns: self.backup_lag_ns,
            stats: self.chan.stats,
        }
    }

    fn in_flight(&self) -> u64 {
        self.pushed_bytes - self.acked_bytes
    }

    fn expire(&mut self, now: Duration) -> bool {
        match self.chan.check_deadline(now) {
            None => return self.chan.closed().is_some(),
            Some(Expired::PeerSilent) => {
                if let Some(CloseReason::PeerSilent { silent_for }) = self.chan.closed() {
                    self.events.push_back(PrimaryEvent::PeerSuspected {
                        silent_for: *silent_for,
                    });
                }
                self.close_reported = true;
            }
            Some(Expired::Handshake) => self.report_close(),
        }
        true
    }

    fn send_hello_once_open(&mut self) {
        if self.chan.is_open() && self.chan.closed().is_none() {
            if let Some(hello) = self.hello.take() {
                self.chan.send(&hello);
                self.phase = Phase::AwaitingHelloOk;
            }
        }
    }

    fn report_close(&mut self) {
        if self.close_reported {
            return;
        }
        if let Some(reason) = self.chan.closed() {
            self.close_reported = true;
            self.events.push_back(PrimaryEvent::Closed {
                reason: reason.clone(),
            });
        }
    }

    fn violation(&mut self, what: String) {
        self.chan.close(CloseReason::Violation(what), false);
    }

    fn handle(&mut self, message: &[u8], now: Duration) {
        // Message 2 may have opened the session just before this frame.
        self.send_hello_once_open();
        let message = match ToPrimary::decode(message) {
            Ok(m) => m,
            Err(e) => return self.chan.close(CloseReason::Malformed(e), false),
        };
        match (self.phase, message) {
            (Phase::AwaitingHelloOk, ToPrimary::HelloOk) => {
                self.phase = Phase::Established;
                self.chan.set_established(now);
                self.events.push_back(PrimaryEvent::Established);
            }
            (Phase::AwaitingHelloOk, ToPrimary::HelloRefused { reason }) => {
                self.close_reported = true;
                self.chan
                    .close(CloseReason::HelloRefused(reason.clone()), false);
                self.events.push_back(PrimaryEvent::HelloRefused { reason });
            }
            (
                Phase::Established,
                ToPrimary::Ack {
                    watermark,
                    log_bytes,
                },
            ) => self.on_ack(watermark, log_bytes),
            (
                Phase::Established,
                ToPrimary::Heartbeat {
                    replayed_landmark,
                    lag_ns,
                },
            ) => {
                if replayed_landmark > self.sent_watermark
                    || replayed_landmark < self.backup_replayed
                {
                    return self.violation(format!(
                        "backup heartbeat says replayed landmark {replayed_landmark}, \
                         outside {}..={} (previous report ..= sent watermark)",
                        self.backup_replayed, self.sent_watermark
                    ));
                }
                self.backup_replayed = replayed_landmark;
                self.backup_lag_ns = lag_ns;
                self.events.push_back(PrimaryEvent::PeerHeartbeat {
                    replayed_landmark,
                    lag_ns,
                });
            }
            (Phase::Established, ToPrimary::Diverged { landmark, detail }) => {
                tracing::error!(landmark, %detail, "the backup reports that its replay diverged");
                self.close_reported = true;
                self.chan.close(
                    CloseReason::PeerDiverged {
                        landmark,
                        detail: detail.clone(),
                    },
                    false,
                );
                self.events
                    .push_back(PrimaryEvent::Diverged { landmark, detail });
            }
            (phase, message) => self.violation(format!(
                "{} received while {}",
                message.name(),
                match phase {
                    Phase::Handshaking => "handshaking",
                    Phase::AwaitingHelloOk => "waiting for HelloOk",
                    Phase::Established => "established",
                }
            )),
        }
    }

    fn on_ack(&mut self, watermark: u64, log_bytes: u64) {
        if watermark < self.acked_watermark || log_bytes < self.acked_bytes {
            return self.violation(format!(
                "Ack went backwards: watermark {} -> {watermark}, log bytes {} -> {log_bytes}",
                self.acked_watermark, self.acked_bytes
            ));
        }
        if watermark > self.sent_watermark || log_bytes > self.sent_bytes {
            return self.violation(format!(
                "Ack through landmark {watermark} / byte {log_bytes} is beyond what was sent \
                 (landmark {}, byte {})",
                self.sent_watermark, self.sent_bytes
            ));
        }
        if watermark == self.acked_watermark && log_bytes == self.acked_bytes {
            return;
        }
        self.acked_watermark = watermark;
        self.acked_bytes = log_bytes;
        self.events.push_back(PrimaryEvent::Acked {
            watermark,
            log_bytes,
        });
    }

    /// The next Records message, if log bytes or a watermark advance wait.
    /// `released` alone rides on the next frame or heartbeat.
    fn next_records(&mut self) -> Option<Vec<u8>> {
        let n = self.pending.len().min(self.chan.config.records_chunk());
        let end = self.sent_bytes + n as u64;
        let mut watermark = self.sent_watermark;
        while let Some(&(boundary, w)) = self.boundaries.front() {
            if boundary > end {
                break;
            }
            watermark = w;
            self.boundaries.pop_front();
        }
        if n == 0 && watermark == self.sent_watermark {
            return None;
        }
        let mut log_bytes = Vec::with_capacity(n);
        let (a, b) = self.pending.as_slices();
        let from_a = n.min(a.len());
        log_bytes.extend_from_slice(&a[..from_a]);
        log_bytes.extend_from_slice(&b[..n - from_a]);
        self.pending.drain(..n);
        self.sent_bytes = end;
        self.sent_watermark = watermark;
        self.sent_released = self.released;
        Some(
            ToBackup::Records {
                watermark,
                released: self.released,
                log_bytes,
            }
            .encode(),
        )
    }

    fn send_heartbeat(&mut self, now: Duration) {
        self.sent_released = self.released;
        let heartbeat = ToBackup::Heartbeat {
            watermark: self.sent_watermark,
            released: self.released,
            sent_at_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
        };
        self.chan.send(&heartbeat.encode());
    }
}
