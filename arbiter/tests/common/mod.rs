//! Helpers shared by the integration tests (real processes on loopback).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use arbiter::local_cluster::{ClusterOptions, Launcher, LocalCluster};

pub fn launcher() -> Launcher {
    Launcher {
        exe: env!("CARGO_BIN_EXE_twinvm-arbiter").into(),
        prefix_args: vec!["serve".into()],
    }
}

pub fn cluster(opts: ClusterOptions) -> LocalCluster {
    LocalCluster::start(launcher(), opts).expect("cluster starts and elects a leader")
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
