//! The logging channel's two endpoints, sans-IO: [`PrimaryLink`] and [`BackupLink`].
//!
//! The caller owns the TCP socket and the clock. It feeds received bytes
//! with `on_bytes_received(bytes, now)`, writes whatever `poll_transmit(now)`
//! returns (in order, completely), acts on `poll_event()`, and calls
//! `handle_timeout(now)` once `poll_timeout()` has passed. `now` is any
//! monotonic clock as a `Duration` since a fixed origin (heartbeats carry it
//! in nanoseconds).
//!
//! On the wire: the 3-message PSK handshake of `arbiter::auth` (primary =
//! initiator, label [`HANDSHAKE_LABEL`]), each message as a `u32 length |
//! message` frame; then `u32 length | Sealer::seal(message)` frames whose
//! messages are [`crate::ft::wire`]'s. The handshake and the seal/open calls
//! live in one place, [`channel`]; the endpoints see plaintext messages only.
//!
//! A link is used for one connection and never reconnects: suspicion, a
//! refused frame, a broken connection, Diverged or Bye end it for good, and
//! the failover machine takes over. After a closing event, drain
//! `poll_transmit` (a refusal, Bye or Diverged may still be queued), then
//! close the socket.

#![forbid(unsafe_code)]

mod backup;
mod channel;
mod primary;

use std::time::Duration;

use thiserror::Error;

pub use backup::{BackupEvent, BackupLink, BackupLinkStatus, ExpectedHello};
pub use primary::{Hello, PrimaryEvent, PrimaryLink, PrimaryLinkStatus};

use super::wire::WireError;

/// Protocol label bound into the handshake MACs: keys for this channel
/// cannot be confused with the arbiter's connections.
pub const HANDSHAKE_LABEL: &str = "twinvm-ft-log/1";
/// Largest sealed frame (length field) either side sends or accepts.
pub const MAX_FRAME_BYTES: u32 = 16 << 20;

/// Log bytes per Records frame at most (a sender's choice; the receiver
/// takes any frame up to `max_frame_bytes`): 1 MiB crosses a loopback link
/// in milliseconds even on a loaded host, well inside the peer timeout.
const RECORDS_CHUNK_BYTES: usize = 1 << 20;

/// Default largest single `push_log` (one log record at the log's own frame
/// limit, plus its framing): a push into an empty window is always accepted,
/// so a record larger than the window cannot stall the primary.
pub const MAX_PUSH_BYTES: u64 = crate::replay::log::MAX_FRAME_BYTES as u64 + 8;

/// Timers and bounds; both sides must use the same `max_frame_bytes` and `window_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// A side sends something at least this often once established.
    pub heartbeat_interval: Duration,
    /// Without any valid frame for this long, the peer is suspected.
    pub peer_timeout: Duration,
    /// The handshake and Hello exchange must finish within this.
    pub handshake_timeout: Duration,
    /// Log bytes pushed but not acknowledged, at most, except that an empty
    /// window takes one push of up to `max_push_bytes`.
    pub window_bytes: u64,
    /// Largest single `push_log`.
    pub max_push_bytes: u64,
    /// Largest sealed frame; Records are chunked below it.
    pub max_frame_bytes: u32,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            heartbeat_interval: Duration::from_millis(20),
            // 120 ms gave false failovers on a 2-core host at load average
            // 3-12 (threads starved for up to 129 ms, docs/benchmarks.md);
            // 200 ms keeps a silent host's failover under 300 ms.
            peer_timeout: Duration::from_millis(200),
            handshake_timeout: Duration::from_secs(5),
            window_bytes: 64 << 20,
            max_push_bytes: MAX_PUSH_BYTES,
            max_frame_bytes: MAX_FRAME_BYTES,
        }
    }
}

/// Smallest frame limit accepted: a Hello with a long VM name must fit.
const MIN_FRAME_BYTES: u32 = 1024;

impl LinkConfig {
    pub fn validate(&self) -> Result<(), LinkError> {
        let bad = |what: String| Err(LinkError::InvalidConfig(what));
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.peer_timeout {
            return bad(format!(
                "heartbeat_interval ({:?}) must be positive and shorter than peer_timeout ({:?})",
                self.heartbeat_interval, self.peer_timeout
            ));
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be positive".into());
        }
        if self.window_bytes == 0 || self.max_push_bytes == 0 {
            return bad("window_bytes and max_push_bytes must be positive".into());
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return bad(format!(
                "max_frame_bytes {} is outside {MIN_FRAME_BYTES}..={MAX_FRAME_BYTES}",
                self.max_frame_bytes
            ));
        }
        Ok(())
    }

    /// Most log bytes in one Records frame: what fits the frame limit, and
    /// at most `RECORDS_CHUNK_BYTES`. The peer counts only whole frames as
    /// signs of life, so a burst of log must not travel as one 16 MiB frame
    /// that takes longer than the peer timeout to arrive on a loaded host.
    pub(crate) fn records_chunk(&self) -> usize {
        let fits =
            self.max_frame_bytes as usize - arbiter::auth::TAG_LEN - super::wire::RECORDS_OVERHEAD;
        fits.min(RECORDS_CHUNK_BYTES)
    }

    /// The most log bytes that may be unacknowledged at once.
    pub fn in_flight_bound(&self) -> u64 {
        self.window_bytes.max(self.max_push_bytes)
    }
}

/// Why a link ended. The remote-caused ones are logged as warnings.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CloseReason {
    #[error("no valid frame from the peer for {silent_for:?}")]
    PeerSilent { silent_for: Duration },
    #[error("handshake and Hello not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge { len: u32, limit: u32 },
    #[error("frame refused: {0}")]
    Unauthenticated(String),
    #[error("undecodable message: {0}")]
    Malformed(#[from] WireError),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("the Hello was refused: {0}")]
    HelloRefused(String),
    #[error("the backup's replay diverged at landmark {landmark}: {detail}")]
    PeerDiverged { landmark: u64, detail: String },
    #[error("the primary said Bye: {0}")]
    PeerBye(String),
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    #[error("closed here: {0}")]
    Local(String),
}

/// A call this side's caller should not have made (the link stays as it was).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LinkError {
    #[error("the link is closed ({0})")]
    Closed(CloseReason),
    #[error("the link is not established yet")]
    NotEstablished,
    #[error("log window full: {in_flight} bytes unacknowledged, {len} more would exceed {window}")]
    WindowFull {
        in_flight: u64,
        len: u64,
        window: u64,
    },
    #[error("a push of {len} log bytes exceeds the limit of {max}")]
    PushTooLarge { len: u64, max: u64 },
    #[error("watermark {watermark} is below the previous {last}")]
    WatermarkBackwards { watermark: u64, last: u64 },
    #[error("released {released} is below the previous {last}")]
    ReleasedBackwards { released: u64, last: u64 },
    #[error("released {released} is beyond the acknowledged watermark {acked}")]
    ReleasedBeyondAck { released: u64, acked: u64 },
    #[error("ack through {watermark} is beyond the received watermark {received}")]
    AckBeyondReceived { watermark: u64, received: u64 },
    #[error("ack through {watermark} is below the previous ack {last}")]
    AckBackwards { watermark: u64, last: u64 },
    #[error("replayed landmark {landmark} is below the previous {last}")]
    ReplayedBackwards { landmark: u64, last: u64 },
    #[error("replayed landmark {landmark} is beyond the received watermark {watermark}")]
    ReplayedBeyondWatermark { landmark: u64, watermark: u64 },
    #[error(
        "Bye before every output was released (released {released}, log watermark {watermark})"
    )]
    ByeBeforeReleased { released: u64, watermark: u64 },
    #[error("no Hello is waiting for a decision")]
    NoHelloPending,
    #[error("invalid link configuration: {0}")]
    InvalidConfig(String),
}

/// Traffic counters (for the log rate and status).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    pub frames_sent: u64,
    pub frames_received: u64,
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    /// Primary: log bytes pushed; backup: log bytes received.
    pub log_bytes: u64,
    /// Primary: `push_log` calls; backup: Records frames received.
    pub log_chunks: u64,
    /// Times this side's own threads ran late (or its socket reader fell
    /// behind) and the peer's silence was credited, and the largest credit.
    pub local_stalls: u64,
    pub longest_local_stall: Duration,
}

#[cfg(test)]
mod refusal_tests;
#[cfg(test)]
mod tests;
