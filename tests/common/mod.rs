//! Helpers for tests that run the real `twinvm` binary against real KVM.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// `NAME=N` from a `--stats` line, if `stderr` has one.
pub fn stats_counter(stderr: &str, name: &str) -> Option<u64> {
    stderr
        .split(&format!("{name}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

pub fn twinvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_twinvm"))
}

/// What a finished twinvm process printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A running twinvm whose output is collected in the background; killed on drop.
pub struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<thread::JoinHandle<()>>,
}

fn collect(
    mut src: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = src.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

impl Running {
    pub fn spawn(args: &[&str]) -> Running {
        let mut cmd = twinvm();
        cmd.args(args);
        Running::spawn_command(cmd)
    }

    /// Start twinvm with its CPU affinity limited to host CPU `cpu` (taskset).
    pub fn spawn_on_cpu(cpu: u32, args: &[&str]) -> Running {
        let mut cmd = Command::new("taskset");
        cmd.arg("-c")
            .arg(cpu.to_string())
            .arg(env!("CARGO_BIN_EXE_twinvm"))
            .args(args);
        Running::spawn_command(cmd)
    }

    /// Start `cmd` (a twinvm command line built by the caller, e.g. run
    /// inside a network namespace with `ip netns exec`).
    pub fn spawn_command(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twinvm");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Running {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_now(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Wait until stdout contains `text`; panics with the output so far after `timeout`.
    pub fn wait_for_stdout(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stdout_now().contains(text) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "twinvm exited ({status}) before printing {text:?}; stdout: {}",
                    self.stdout_now()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "no {text:?} within {timeout:?}; stdout so far: {}",
            self.stdout_now()
        );
    }

    pub fn stderr_now(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Wait until stderr contains `text`; panics with the output so far after `timeout`.
    pub fn wait_for_stderr(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stderr_now().contains(text) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "twinvm exited ({status}) before printing {text:?}; stderr: {}",
                    self.stderr_now()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "no {text:?} within {timeout:?}; stderr so far: {}",
            self.stderr_now()
        );
    }

    pub fn write_stdin(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Wait for the process to end; kill it and panic after `timeout`.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "twinvm did not finish within {timeout:?}; stdout: {}",
                    self.stdout_now()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            status,
            stdout: String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run twinvm with stdin closed and wait (bounded) for it to end.
pub fn run_to_end(args: &[&str], timeout: Duration) -> Finished {
    let mut running = Running::spawn(args);
    drop(running.child.stdin.take());
    running.finish(timeout)
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("twinvm-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The counter guest's FT pair in the local drill's topology (`opts`: its
/// namespace prefix and guest), answering, and a client asking it every
/// 5 ms.
pub fn counter_pair_with_client(
    opts: &twinvm::ft::drill::LocalOptions,
    timeout: Duration,
) -> (
    twinvm::ft::drill::local::LocalPair,
    twinvm::ft::drill::client::Client,
) {
    use twinvm::ft::drill::client::{Client, ClientSettings};
    use twinvm::ft::drill::local::{guest_target, LocalPair};
    use twinvm::ft::drill::topology::addr;
    let interrupted = std::sync::atomic::AtomicBool::new(false);
    let mut lp = LocalPair::start(opts, &interrupted).expect("starting the pair");
    lp.wait_for_guest(timeout, &interrupted)
        .expect("the guest answering");
    let socket = lp
        .topo
        .client
        .enter_on_thread(|| std::net::UdpSocket::bind((addr::CLIENT, 0)))
        .unwrap()
        .unwrap();
    let client = Client::start(
        socket,
        ClientSettings {
            target: guest_target(),
            interval: Duration::from_millis(5),
            retry_after: Duration::from_millis(30),
            window: 64,
        },
        Instant::now(),
    )
    .unwrap();
    (lp, client)
}
