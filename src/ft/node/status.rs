//! The control socket: `twinvm status` asks a running replica where it is.
//! A Unix stream socket; the client sends `status\n` and reads one JSON line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Hold times of released outputs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HoldTimes {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// The sync-point page cache of this replica's log (docs/log-format.md,
/// "Pages"): the primary's writer or the backup's reader, which hold the
/// same pages.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct PageCacheStatus {
    /// Pages and bytes of contents it holds (all-zero pages take none).
    pub pages: u64,
    pub bytes: u64,
    /// The most pages it may hold.
    pub limit_pages: u64,
    /// Pages sync points carried that it held a version of (sent as a
    /// delta or unchanged), and those sent whole or as zero pages.
    pub hits: u64,
    pub whole: u64,
    pub zero: u64,
}

impl From<&crate::replay::log::PageStats> for PageCacheStatus {
    fn from(s: &crate::replay::log::PageStats) -> Self {
        PageCacheStatus {
            pages: s.cache_pages,
            bytes: s.cache_bytes,
            limit_pages: s.cache_capacity,
            hits: s.delta + s.same,
            whole: s.full,
            zero: s.zero,
        }
    }
}

/// What `twinvm status` reports (docs/operations.md, "Status").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PairStatus {
    pub vm: String,
    pub generation: u64,
    pub node: String,
    pub role: String,
    /// connecting, replicating, asking, alone, lost, following, draining,
    /// live, ending, diverged.
    pub state: String,
    /// A sentence about the state (what triggered it, the arbiter's answer).
    pub detail: String,
    /// Where the guest is (the engine's landmark).
    pub landmark: u64,
    /// Primary: the last landmark whose log was pushed; backup: received.
    pub watermark: u64,
    /// The backup has acknowledged the log through here.
    pub acked: u64,
    /// Outputs of landmarks up to here have left the primary.
    pub released: u64,
    /// How far the backup's replay is behind the primary.
    pub lag_landmarks: u64,
    pub lag_ms: f64,
    /// Backup: times it fell behind and loaded a sync point with state
    /// instead of executing up to it (docs/architecture.md, "Catch-up").
    #[serde(default)]
    pub catch_ups: u64,
    /// Log bandwidth over the last second.
    pub log_mbit_s: f64,
    /// Log bytes sent (primary) or received (backup) in all.
    pub log_bytes: u64,
    /// Outputs the primary holds until the backup acknowledges their log.
    pub held_outputs: u64,
    /// Milliseconds from an output's production to its release.
    pub hold_ms: HoldTimes,
    pub peer_connected: bool,
    pub uptime_s: f64,
    /// The last clone of this replica (`twinvm clone`), if any.
    #[serde(default)]
    pub clone: Option<crate::clone::CloneStatus>,
    /// The log's page cache, once a sync point went through it.
    #[serde(default)]
    pub page_cache: Option<PageCacheStatus>,
}

/// `clone HOST:PORT` on the control socket: the pump answers whether it
/// starts the clone (or why not).
pub struct CloneCommand {
    pub to: String,
    pub reply: crossbeam_channel::Sender<Result<(), String>>,
}

/// The latest status, shared between the threads that know parts of it and
/// the control socket.
pub type StatusBoard = Arc<Mutex<PairStatus>>;

/// Serve `status` requests on `path` until `stop` is set. A stale socket
/// file (a replica that died) is replaced; a live one is an error.
pub fn serve_status(
    path: &Path,
    board: StatusBoard,
    stop: Arc<AtomicBool>,
    clones: Option<crossbeam_channel::Sender<CloneCommand>>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is the control socket of a running replica",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    let path: PathBuf = path.to_path_buf();
    thread::Builder::new()
        .name("twinvm-ft-status".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = answer(stream, &board, clones.as_ref());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => {
                        tracing::warn!("control socket {}: {e}", path.display());
                        thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        })?;
    Ok(())
}

fn answer(
    stream: UnixStream,
    board: &StatusBoard,
    clones: Option<&crossbeam_channel::Sender<CloneCommand>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.by_ref().take(256).read_line(&mut line)?;
    let mut out = &stream;
    let line = line.trim();
    if let Some(to) = line.strip_prefix("clone ") {
        let answer = match clones {
            None => Err("this replica cannot be cloned: only a primary running alone can".into()),
            Some(tx) => {
                let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
                let command = CloneCommand {
                    to: to.trim().to_owned(),
                    reply: reply_tx,
                };
                match tx.send_timeout(command, Duration::from_secs(1)) {
                    Ok(()) => reply_rx
                        .recv_timeout(Duration::from_secs(2))
                        .unwrap_or_else(|_| {
                            Err("the replica did not answer (only a primary running alone, \
                                 or a backup gone live, can be cloned)"
                                .into())
                        }),
                    Err(_) => Err("the replica does not take requests".into()),
                }
            }
        };
        let json = match answer {
            Ok(()) => serde_json::json!({ "accepted": true }),
            Err(e) => serde_json::json!({ "error": e }),
        };
        return writeln!(out, "{json}");
    }
    if line != "status" {
        return writeln!(
            out,
            "{{\"error\":\"unknown request; send `status` or `clone HOST:PORT`\"}}"
        );
    }
    let status = board.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let json = serde_json::to_string(&status).map_err(std::io::Error::other)?;
    writeln!(out, "{json}")
}

/// Ask the primary behind `path` to clone itself to `to`.
pub fn request_clone(path: &Path, to: &str) -> Result<(), String> {
    let mut stream = UnixStream::connect(path)
        .map_err(|e| format!("connecting to the control socket {}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "clone {to}").map_err(|e| format!("asking {}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(1 << 16)
        .read_line(&mut line)
        .map_err(|e| format!("reading the answer from {}: {e}", path.display()))?;
    let answer: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| format!("{} answered {line:?} ({e})", path.display()))?;
    if answer.get("accepted").and_then(|v| v.as_bool()) == Some(true) {
        return Ok(());
    }
    Err(answer
        .get("error")
        .and_then(|v| v.as_str())
        .unwrap_or("refused without a reason")
        .to_owned())
}

/// Ask the replica behind `path` for its status.
pub fn query_status(path: &Path) -> Result<PairStatus, String> {
    let mut stream = UnixStream::connect(path)
        .map_err(|e| format!("connecting to the control socket {}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"status\n")
        .map_err(|e| format!("asking {}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(1 << 20)
        .read_line(&mut line)
        .map_err(|e| format!("reading the answer from {}: {e}", path.display()))?;
    serde_json::from_str(&line).map_err(|e| {
        format!(
            "{} answered something that is not a status ({e}): {line:?}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_round_trips_through_the_socket_and_bad_requests_get_an_error() {
        let dir = std::env::temp_dir().join(format!("twinvm-status-{}", std::process::id()));
        let path = dir.join("a.sock");
        let board: StatusBoard = Arc::default();
        board.lock().unwrap().state = "replicating".into();
        board.lock().unwrap().landmark = 42;
        let stop = Arc::new(AtomicBool::new(false));
        serve_status(&path, board.clone(), stop.clone(), None).unwrap();
        let got = query_status(&path).unwrap();
        assert_eq!(got.state, "replicating");
        assert_eq!(got.landmark, 42);
        // A second replica cannot take the same socket.
        let err = serve_status(&path, board, stop.clone(), None).unwrap_err();
        assert!(request_clone(&path, "127.0.0.1:1")
            .unwrap_err()
            .contains("only a primary running alone"));
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"reboot\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.contains("unknown request"), "{line}");
        stop.store(true, Ordering::Relaxed);
        for _ in 0..100 {
            if !path.exists() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        assert!(!path.exists(), "the socket file is removed at stop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
