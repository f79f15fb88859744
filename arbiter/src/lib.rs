//! The twinvm arbiter: a Raft-replicated test-and-set table.
#![forbid(unsafe_code)]
