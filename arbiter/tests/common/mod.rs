//! Helpers shared by the integration tests (real processes on loopback).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command};
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

/// `serve` for node `id` of `c`'s membership, with another cluster id, data dir or key.
pub fn serve_command(
    c: &LocalCluster,
    id: u64,
    cluster_id: &str,
    data_dir: &Path,
    key_file: Option<&Path>,
) -> Command {
    let launcher = launcher();
    let peers: Vec<String> = c
        .ids()
        .iter()
        .map(|&i| format!("{i}={}", c.addr(i)))
        .collect();
    let mut cmd = Command::new(launcher.exe);
    cmd.args(launcher.prefix_args)
        .args([
            "--id",
            &id.to_string(),
            "--peers",
            &peers.join(","),
            "--cluster-id",
            cluster_id,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove(arbiter::cli::KEY_FILE_ENV);
    if let Some(path) = key_file {
        cmd.arg("--key-file").arg(path);
    }
    cmd
}

/// Kills and reaps a child process when dropped, even when the test fails.
pub struct KillOnDrop<'a>(pub &'a mut Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
