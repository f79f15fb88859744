//! Fault tolerance: the primary/backup pair and its failover drills.

pub mod drill;
