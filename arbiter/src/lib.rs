//! The twinvm arbiter: a Raft-replicated test-and-set table deciding which
//! replica of a VM may go live. See docs/arbiter.md.
#![forbid(unsafe_code)]

pub mod auth;
pub mod bench;
pub mod channel;
pub mod cli;
pub mod client;
pub mod engine;
pub mod frame;
pub mod linearizability;
pub mod local_cluster;
pub mod node;
pub mod proto;
pub mod selftest;
pub mod server;
pub mod state_machine;
pub mod storage;
pub mod transport;

pub use client::{ArbiterClient, ClientConfig, ClientError};
pub use state_machine::{ResetOutcome, Slot, TasOutcome};
