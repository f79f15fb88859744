//! Recovery by clone (docs/operations.md "Repair by clone"): a primary
//! running alone copies its live VM to a new backup over the clone
//! channel, then streams its log to it on an ordinary logging channel that
//! starts at the cut's landmark, and the pair is whole again.
//!
//! The protocol codec, the round policy and the compatibility check are
//! sans-IO; [`source`] (the primary's clone job) and [`receiver`] (the new
//! backup's side) move the bytes.

#![forbid(unsafe_code)]

pub mod channel;
pub mod compat;
pub mod policy;
pub mod protocol;
pub mod receiver;
pub mod source;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use channel::CloneChannel;
pub use policy::{CutReason, NextStep, RoundBounds, RoundPolicy};
pub use protocol::{BuildInfo, CloneWireError, ToClonePrimary, ToNewBackup};

/// Label bound into the handshake: a logging-channel key exchange cannot
/// be replayed on the clone channel, nor the other way round.
pub const HANDSHAKE_LABEL: &str = "twinvm-clone/1";
/// Largest sealed frame either side sends or accepts.
pub const MAX_FRAME_BYTES: u32 = 16 << 20;

/// Why a clone failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CloneError {
    #[error("{what}: {error}")]
    Io { what: &'static str, error: String },
    #[error("the clone channel's handshake failed (wrong key or not a twinvm peer): {0}")]
    Handshake(String),
    #[error("a clone frame of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge { len: u32, limit: u32 },
    #[error("a clone frame did not authenticate: {0}")]
    Unauthenticated(String),
    #[error("undecodable clone message: {0}")]
    Malformed(#[from] CloneWireError),
    #[error("the new backup refused the clone: {0}")]
    Refused(String),
    #[error("incompatible clone: {0}")]
    Incompatible(String),
    #[error("the new backup could not apply the clone: {0}")]
    PeerFailed(String),
    #[error("protocol violation on the clone channel: {0}")]
    Violation(String),
    #[error("the engine: {0}")]
    Engine(String),
    #[error("the clone was stopped")]
    Stopped,
}

/// A clone's progress, as `twinvm status --json` shows it (`clone`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CloneStatus {
    /// connecting, copying, cutting, syncing, done, failed.
    pub phase: String,
    /// The new backup's address.
    pub to: String,
    /// The pair's generation once the clone is in sync.
    pub generation: u64,
    /// Copy rounds done (the first copies the whole memory).
    pub round: u32,
    pub pages_sent: u64,
    /// Bytes on the wire (compressed).
    pub bytes_sent: u64,
    /// Pages written by the guest during the last round.
    pub dirty_pages: u64,
    /// Pages per second the guest wrote during the last round.
    pub dirty_rate: f64,
    pub estimated_pause_ms: f64,
    /// How long the engine held the vCPU at the cut's landmark (snapshot
    /// and the last dirty pages).
    pub pause_ms: f64,
    /// From asking for the cut to the engine reaching a landmark (the guest
    /// runs or sleeps meanwhile; its outputs wait).
    #[serde(default)]
    pub cut_wait_ms: f64,
    /// From the request to the new backup acknowledging the cut's landmark.
    pub total_ms: f64,
    /// The cut's landmark (the new log's first).
    pub landmark: u64,
    /// Why the copy stopped when it did.
    pub cut_reason: String,
    pub error: String,
}

impl CloneStatus {
    /// Over, one way or the other.
    pub fn finished(&self) -> bool {
        self.phase == "done" || self.phase == "failed"
    }
}
