//! The backup's endpoint: checks the Hello, hands the log on, acknowledges.

use std::collections::VecDeque;
use std::time::Duration;

use arbiter::auth::Key;

use super::channel::{Channel, Expired};
use super::{CloseReason, LinkConfig, LinkError, LinkStats};
use crate::ft::wire::{bounded_text, ToBackup, ToPrimary, PROTOCOL_VERSION};

/// Most entries kept for ack and lag bookkeeping; at it, neighbouring
/// entries merge in pairs (acks get coarser, the lag estimate errs high by
/// at most the time between two merged arrivals).
const MAX_MARKS: usize = 4096;

/// What this backup was started for; a Hello naming anything else is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedHello {
    pub vm: String,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// The Hello matches vm, generation and protocol version: compare the
    /// log header, then call `accept_hello` or `refuse_hello`.
    HelloReceived {
        log_header: Vec<u8>,
        start_landmark: u64,
    },
    /// Queue `log_bytes` for replay (may be empty: a watermark advance),
    /// allow replay through `watermark`, then call `ack_through(watermark)`.
    /// When the replay queue is full, hold the event (unacked) until it has room.
    Records { log_bytes: Vec<u8>, watermark: u64 },
    /// The primary let out every output of landmarks <= `released`: apply it
    /// at once (`ShadowOutputs::on_released`), never behind queued records:
    /// a replay waiting on a full shadow needs it to go on.
    Released { released: u64 },
    /// Orderly end: finish the log and end (the link is closed).
    Bye { reason: String },
    /// Nothing valid from the primary for `peer_timeout` (the link is closed).
    PeerSuspected { silent_for: Duration },
    /// The link ended for another reason (refused frame, broken connection...).
    Closed { reason: CloseReason },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackupLinkStatus {
    pub established: bool,
    pub closed: Option<String>,
    pub received_watermark: u64,
    pub released: u64,
    pub acked_watermark: u64,
    pub replayed_landmark: u64,
    pub lag_ns: u64,
    pub unacked_bytes: u64,
    pub stats: LinkStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    Deciding,
    Established,
}

pub struct BackupLink {
    chan: Channel,
    expected: ExpectedHello,
    phase: Phase,
    events: VecDeque<BackupEvent>,
    close_reported: bool,
    start_landmark: u64,
    received_bytes: u64,
    watermark: u64,
    released: u64,
    /// (watermark, stream offset) of delivered Records events not yet acked.
    unacked: VecDeque<(u64, u64)>,
    acked_watermark: u64,
    acked_bytes: u64,
    ack_pending: bool,
    replayed: u64,
    /// (watermark, when it arrived) not yet replayed, for the lag.
    unreplayed: VecDeque<(u64, Duration)>,
    last_heartbeat: Duration,
}

impl BackupLink {
    /// A link for a freshly accepted socket.
    pub fn new(
        config: LinkConfig,
        key: &Key,
        expected: ExpectedHello,
        now: Duration,
    ) -> Result<Self, LinkError> {
        config.validate()?;
        Ok(BackupLink {
            chan: Channel::responder(config, key, now),
            expected,
            phase: Phase::AwaitingHello,
            events: VecDeque::new(),
            close_reported: false,
            start_landmark: 0,
            received_bytes: 0,
            watermark: 0,
            released: 0,
            unacked: VecDeque::new(),
            acked_watermark: 0,
            acked_bytes: 0,
            ack_pending: false,
            replayed: 0,
            unreplayed: VecDeque::new(),
            last_heartbeat: now,
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
        self.report_close();
    }

    /// The socket hit EOF or an error (after Bye this is expected and silent).
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

    pub fn poll_timeout(&self) -> Option<Duration> {
        let deadline = self.chan.deadline()?;
        Some(match self.phase {
            Phase::Established => {
                deadline.min(self.last_heartbeat + self.chan.config.heartbeat_interval)
            }
            _ => deadline,
        })
    }

    pub fn poll_event(&mut self) -> Option<BackupEvent> {
        self.events.pop_front()
    }

    pub fn poll_transmit(&mut self, now: Duration) -> Option<Vec<u8>> {
        if let Some(frame) = self.chan.pop_transmit(now) {
            return Some(frame);
        }
        if self.chan.closed().is_some() || self.phase != Phase::Established {
            return None;
        }
        if self.ack_pending {
            self.ack_pending = false;
            let ack = ToPrimary::Ack {
                watermark: self.acked_watermark,
                log_bytes: self.acked_bytes,
            };
            self.chan.send(&ack.encode());
        } else if now >= self.last_heartbeat + self.chan.config.heartbeat_interval {
            // Sent on its own timer even while acks flow: it carries the lag.
            self.last_heartbeat = now;
            let heartbeat = ToPrimary::Heartbeat {
                replayed_landmark: self.replayed,
                lag_ns: self.lag(now).as_nanos().try_into().unwrap_or(u64::MAX),
            };
            self.chan.send(&heartbeat.encode());
        }
        self.chan.pop_transmit(now)
    }

    pub fn accept_hello(&mut self, now: Duration) -> Result<(), LinkError> {
        if self.phase != Phase::Deciding || self.chan.closed().is_some() {
            return Err(LinkError::NoHelloPending);
        }
        self.phase = Phase::Established;
        self.chan.set_established(now);
        self.last_heartbeat = now;
        self.chan.send(&ToPrimary::HelloOk.encode());
        Ok(())
    }

    /// Refuses the Hello (e.g. "log_header differs: cmdline ..."); the link closes.
    pub fn refuse_hello(&mut self, reason: &str) -> Result<(), LinkError> {
        if self.phase != Phase::Deciding || self.chan.closed().is_some() {
            return Err(LinkError::NoHelloPending);
        }
        self.close_reported = true;
        self.refuse(reason.to_owned());
        Ok(())
    }

    /// Every record through `watermark` has been queued for replay. Call it
    /// with the watermark of a `Records` event after queueing that event's
    /// bytes (and those of every event before it). After the link closed it
    /// is still checked, but nothing is sent.
    pub fn ack_through(&mut self, watermark: u64) -> Result<(), LinkError> {
        if self.phase != Phase::Established {
            return Err(LinkError::NotEstablished);
        }
        if watermark > self.watermark {
            return Err(LinkError::AckBeyondReceived {
                watermark,
                received: self.watermark,
            });
        }
        if watermark < self.acked_watermark {
            return Err(LinkError::AckBackwards {
                watermark,
                last: self.acked_watermark,
            });
        }
        let before = (self.acked_watermark, self.acked_bytes);
        // Up to the first event that reached `watermark`: a later event with
        // the same watermark (the next piece of a split record) may not be queued yet.
        while let Some(&(w, end)) = self.unacked.front() {
            if w > watermark {
                break;
            }
            self.unacked.pop_front();
            self.acked_bytes = end;
            if w == watermark {
                break;
            }
        }
        self.acked_watermark = watermark;
        if (self.acked_watermark, self.acked_bytes) != before {
            self.ack_pending = true;
        }
        Ok(())
    }

    /// The replay finished `landmark` (also after the link closed: it is
    /// checked against what the primary sent, and feeds the lag report).
    pub fn set_replayed(&mut self, landmark: u64) -> Result<(), LinkError> {
        if landmark > self.watermark {
            return Err(LinkError::ReplayedBeyondWatermark {
                landmark,
                watermark: self.watermark,
            });
        }
        if landmark < self.replayed {
            return Err(LinkError::ReplayedBackwards {
                landmark,
                last: self.replayed,
            });
        }
        self.replayed = landmark;
        while self.unreplayed.front().is_some_and(|&(w, _)| w <= landmark) {
            self.unreplayed.pop_front();
        }
        Ok(())
    }

    /// The replay diverged: tell the primary and close.
    pub fn send_diverged(&mut self, landmark: u64, detail: &str) {
        if self.chan.closed().is_none() && self.phase == Phase::Established {
            let diverged = ToPrimary::Diverged {
                landmark,
                detail: bounded_text(detail),
            };
            self.chan.send(&diverged.encode());
        }
        self.close_reported = true;
        self.chan.close(
            CloseReason::Local(format!("replay diverged at landmark {landmark}")),
            true,
        );
    }

    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established && self.chan.closed().is_none()
    }

    pub fn is_closed(&self) -> bool {
        self.chan.closed().is_some()
    }

    /// The highest landmark whose records have all been received.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// The primary's last `released` marker.
    pub fn released(&self) -> u64 {
        self.released
    }

    pub fn status(&self, now: Duration) -> BackupLinkStatus {
        BackupLinkStatus {
            established: self.phase == Phase::Established,
            closed: self.chan.closed().map(ToString::to_string),
            received_watermark: self.watermark,
            released: self.released,
            acked_watermark: self.acked_watermark,
            replayed_landmark: self.replayed,
            lag_ns: self.lag(now).as_nanos().try_into().unwrap_or(u64::MAX),
            unacked_bytes: self.received_bytes - self.acked_bytes,
            stats: self.chan.stats,
        }
    }

    /// How long replay work has been waiting: since the first watermark
    /// that let the engine pass its next landmark arrived. The engine stays
    /// one landmark behind the watermark by design (it needs the next
    /// landmark to know where the last one ends), so a watermark only one
    /// past the replayed landmark is not work left to do: counting it made
    /// an idle pair's lag grow without bound while nothing was waiting.
    fn lag(&self, now: Duration) -> Duration {
        let next = self.replayed.saturating_add(1);
        self.unreplayed
            .iter()
            .find(|&&(w, _)| w > next)
            .map_or(Duration::ZERO, |&(_, at)| now.saturating_sub(at))
    }

    fn expire(&mut self, now: Duration) -> bool {
        match self.chan.check_deadline(now) {
            None => return self.chan.closed().is_some(),
            Some(Expired::PeerSilent) => {
                if let Some(CloseReason::PeerSilent { silent_for }) = self.chan.closed() {
                    self.events.push_back(BackupEvent::PeerSuspected {
                        silent_for: *silent_for,
                    });
                }
                self.close_reported = true;
            }
            Some(Expired::Handshake) => self.report_close(),
        }
        true
    }

    fn report_close(&mut self) {
        if self.close_reported {
            return;
        }
        if let Some(reason) = self.chan.closed() {
            self.close_reported = true;
            self.events.push_back(BackupEvent::Closed {
                reason: reason.clone(),
            });
        }
    }

    fn violation(&mut self, what: String) {
        self.chan.close(CloseReason::Violation(what), false);
    }

    fn refuse(&mut self, reason: String) {
        let refused = ToPrimary::HelloRefused {
            reason: bounded_text(&reason),
        };
        self.chan.send(&refused.encode());
        self.chan.close(CloseReason::HelloRefused(reason), true);
    }

    fn handle(&mut self, message: &[u8], now: Duration) {
        let message = match ToBackup::decode(message) {
            Ok(m) => m,
            Err(e) => return self.chan.close(CloseReason::Malformed(e), false),
        };
        match (self.phase, message) {
            (
                Phase::AwaitingHello,
                ToBackup::Hello {
                    protocol_version,
                    vm,
                    generation,
                    log_header,
                    start_landmark,
                },
            ) => {
                let mismatch = if protocol_version != PROTOCOL_VERSION {
                    Some(format!(
                        "protocol_version: the primary speaks {protocol_version}, this backup {PROTOCOL_VERSION}"
                    ))
                } else if vm != self.expected.vm {
                    Some(format!(
                        "vm: the primary runs {vm:?}, this backup is for {:?}",
                        self.expected.vm
                    ))
                } else if generation != self.expected.generation {
                    Some(format!(
                        "generation: the primary runs generation {generation}, this backup {}",
                        self.expected.generation
                    ))
                } else {
                    None
                };
                if let Some(reason) = mismatch {
                    return self.refuse(reason);
                }
                self.phase = Phase::Deciding;
                self.start_landmark = start_landmark;
                self.watermark = start_landmark;
                self.released = start_landmark;
                self.acked_watermark = start_landmark;
                self.replayed = start_landmark;
                self.events.push_back(BackupEvent::HelloReceived {
                    log_header,
                    start_landmark,
                });
            }
            (
                Phase::Established,
                ToBackup::Records {
                    watermark,
                    released,
                    log_bytes,
                },
            ) => self.on_stream(watermark, released, log_bytes, now),
            (
                Phase::Established,
                ToBackup::Heartbeat {
                    watermark,
                    released,
                    ..
                },
            ) => self.on_stream(watermark, released, Vec::new(), now),
            (Phase::Established, ToBackup::Bye { reason }) => {
                tracing::info!(%reason, "the primary said Bye");
                self.close_reported = true;
                self.chan.close(CloseReason::PeerBye(reason.clone()), false);
                self.events.push_back(BackupEvent::Bye { reason });
            }
            (phase, message) => self.violation(format!(
                "{} received while {}",
                message.name(),
                match phase {
                    Phase::AwaitingHello => "waiting for the Hello",
                    Phase::Deciding => "the Hello is not accepted yet",
                    Phase::Established => "established",
                }
            )),
        }
    }

    fn on_stream(&mut self, watermark: u64, released: u64, log_bytes: Vec<u8>, now: Duration) {
        if watermark < self.watermark {
            return self.violation(format!(
                "watermark went backwards from {} to {watermark}",
                self.watermark
            ));
        }
        if released < self.released {
            return self.violation(format!(
                "released went backwards from {} to {released}",
                self.released
            ));
        }
        if released > self.acked_watermark {
            return self.violation(format!(
                "released {released} is beyond what this backup acknowledged ({}): \
                 the primary broke the output rule",
                self.acked_watermark
            ));
        }
        let len = log_bytes.len() as u64;
        let unacked = self.received_bytes + len - self.acked_bytes;
        let bound = self.chan.config.in_flight_bound();
        if unacked > bound {
            return self.violation(format!(
                "{unacked} unacknowledged log bytes exceed the window of {bound}"
            ));
        }
        let advanced = watermark > self.watermark;
        self.received_bytes += len;
        self.chan.stats.log_bytes += len;
        if len > 0 {
            self.chan.stats.log_chunks += 1;
        }
        if advanced || len > 0 {
            // A merged pair is acked once its later event is.
            push_mark(
                &mut self.unacked,
                (watermark, self.received_bytes),
                |_, later| later,
            );
        }
        if advanced {
            // A merged pair waits from its earlier arrival.
            push_mark(&mut self.unreplayed, (watermark, now), |earlier, later| {
                (later.0, earlier.1)
            });
        }
        self.watermark = watermark;
        if advanced || len > 0 {
            self.events.push_back(BackupEvent::Records {
                log_bytes,
                watermark,
            });
        }
        if released > self.released {
            self.released = released;
            self.events.push_back(BackupEvent::Released { released });
        }
    }
}

/// Appends to a bounded bookkeeping queue; at the bound, `merge` folds
/// neighbouring entries in pairs first (earlier, later), oldest to newest,
/// so every entry keeps its place in time however long the queue runs
/// full. (Folding new entries into the newest one instead froze its arrival
/// time: a backup a few landmarks behind reported a lag growing without
/// bound for as long as the queue stayed full.)
fn push_mark<T: Copy>(queue: &mut VecDeque<T>, entry: T, merge: impl Fn(T, T) -> T) {
    if queue.len() >= MAX_MARKS {
        let merged: VecDeque<T> = queue
            .make_contiguous()
            .chunks(2)
            .map(|pair| match *pair {
                [earlier, later] => merge(earlier, later),
                [only] => only,
                _ => unreachable!("chunks of two"),
            })
            .collect();
        *queue = merged;
    }
    queue.push_back(entry);
}
