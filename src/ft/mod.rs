//! The fault-tolerant pair's protocol core, sans-IO (no sockets, threads or
//! clocks: time is passed in as `now: Duration` since any fixed origin).
//! The protocol, byte by byte, and its guarantees: docs/ft-protocol.md.
//!
//! - [`wire`]: the channel's messages ([`wire::ToBackup`], [`wire::ToPrimary`]) and their codec.
//! - [`link`]: [`PrimaryLink`] / [`BackupLink`], the endpoints of the
//!   authenticated logging channel: handshake, framing, chunking, heartbeats,
//!   suspicion, acks, watermark/released bookkeeping, the log window.
//! - [`output`]: the output rule: [`HeldOutputs`] (primary) and [`ShadowOutputs`] (backup).
//! - [`failover`]: [`Failover`], the per-side state machine that asks the
//!   arbiter and decides who goes on.
//! - [`node`]: the I/O edge (`twinvm primary`, `twinvm backup`, `twinvm status`).
//! - [`drill`]: failover drills (`twinvm drill`): the local topology, the
//!   client, the verdict.
//!
//! How the I/O edge drives them (the order matters):
//!
//! Primary
//! 1. Connect; `PrimaryLink::new(config, key, hello, now)`; write `poll_transmit`.
//! 2. Socket bytes → `on_bytes_received`; EOF/error → `connection_lost`; at
//!    `poll_timeout` → `handle_timeout`. After each, drain `poll_event` and `poll_transmit`.
//! 3. At each landmark L the guest finished: push its outputs into
//!    `HeldOutputs` (vCPU waits while `is_full`/refused), then
//!    `push_log(bytes, L)` (vCPU waits while `!can_accept(len)`).
//! 4. `Established` → `Failover::primary`. `Acked{watermark}` (unless the
//!    failover said `HoldOutputs`) → `HeldOutputs::release_through(watermark)`,
//!    write them, then `set_released(watermark)`.
//! 5. `PeerSuspected` / `Closed` / `Diverged` → the failover machine; perform
//!    its actions (`AskArbiter` → arbiter client → `ArbiterVerdict`;
//!    `ReleaseAll` → `HeldOutputs::release_all` and direct outputs from then on).
//! 6. Guest end: push the End record, wait until everything is acked and
//!    released, `send_bye`, failover `Bye`, drain `poll_transmit`, exit.
//!
//! Backup
//! 1. Accept; `BackupLink::new(config, key, expected, now)`.
//! 2. `HelloReceived` → compare the log header → `accept_hello` (then
//!    `Failover::backup`) or `refuse_hello(reason naming the field)`.
//! 3. `Records{log_bytes, watermark}` → queue the bytes for the replay
//!    engine, let it run through `watermark`, then `ack_through(watermark)`.
//!    The queue is bounded (`window_bytes`; hold the event, unacked, while
//!    full) but never refuses while the engine waits at its watermark (what
//!    it holds is then one record split across frames: refusing would wedge
//!    the pair). `Released{released}` → `ShadowOutputs::on_released` at once,
//!    never behind held records.
//! 4. The engine: outputs → `ShadowOutputs::push`; each landmark → `set_replayed`;
//!    a divergence → `send_diverged` and failover `Diverged`.
//! 5. `PeerSuspected` / `Closed` / `Bye` → the failover machine; `FinishLog`
//!    → the engine reports `LogExhausted{landmark}` at the end of what it
//!    has; `Promote` → `take_for_go_live`, write them, unmute, run live.

pub(crate) mod codec;
pub mod drill;
pub mod failover;
pub mod histogram;
pub mod link;
pub mod node;
pub mod output;
pub mod wire;

#[cfg(test)]
mod sim;

pub use failover::{
    Action, Failover, FailoverConfig, FailoverEvent, FailoverStatus, Role, Verdict,
};
pub use link::{
    BackupEvent, BackupLink, CloseReason, ExpectedHello, Hello, LinkConfig, LinkError,
    PrimaryEvent, PrimaryLink,
};
pub use output::{ByteSize, HeldOutputs, OutputBounds, OutputError, ShadowOutputs};
