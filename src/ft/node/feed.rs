//! Where the engine's log and outputs go in a pair: the primary's engine
//! feeds one ordered channel to its link thread (outputs of a landmark
//! always before the log that finishes it, which the output rule needs);
//! the backup's engine keeps its outputs in the shadow until released.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender};

use crate::ft::output::{ByteSize, OutputError, ShadowOutputs};
use crate::net;
use crate::replay::engine::{LogSink, Output, OutputSink, Recorder};
use crate::replay::log::{LogWriter, PageStats};

impl ByteSize for Output {
    fn byte_size(&self) -> usize {
        self.len()
    }
}

/// What the primary's engine hands its link thread, in the order it happened.
#[derive(Debug)]
pub enum EngineMsg {
    /// An output the guest produced at `landmark`.
    Output { landmark: u64, output: Output },
    /// Log bytes completing every record of every landmark up to `watermark`.
    Log { bytes: Vec<u8>, watermark: u64 },
}

/// How long a blocked engine waits between checks of its stop flag.
const BLOCKED_CHECK: Duration = Duration::from_millis(50);

/// Send `msg`, waiting while the link thread is behind (the channel is
/// bounded: a backup that lags slows the primary's guest); give up once
/// `stopped` is set.
fn send_waiting(tx: &Sender<EngineMsg>, stopped: &AtomicBool, msg: EngineMsg) -> io::Result<()> {
    let mut msg = msg;
    loop {
        match tx.send_timeout(msg, BLOCKED_CHECK) {
            Ok(()) => return Ok(()),
            Err(SendTimeoutError::Timeout(m)) => {
                if stopped.load(Ordering::Relaxed) {
                    return Err(io::Error::other("the pair is stopping"));
                }
                msg = m;
            }
            Err(SendTimeoutError::Disconnected(_)) => {
                return Err(io::Error::other("the logging channel's thread ended"))
            }
        }
    }
}

/// The primary's log sink: record bytes are collected and handed on, with
/// their watermark, each time the engine finishes a landmark.
pub struct LogFeed {
    tx: Sender<EngineMsg>,
    stopped: Arc<AtomicBool>,
    buf: Vec<u8>,
    last_watermark: Option<u64>,
    /// Where the page cache is reported (`twinvm status`).
    board: super::status::StatusBoard,
}

impl LogFeed {
    /// The recorder of a live stream: its records go to the link thread
    /// (the log's magic and header travel in the Hello, not the stream),
    /// and its page cache is reported on `board` (`twinvm status`) while
    /// it records.
    pub fn stream_recorder(
        tx: Sender<EngineMsg>,
        stopped: Arc<AtomicBool>,
        board: super::status::StatusBoard,
    ) -> Recorder {
        let feed = LogFeed {
            tx,
            stopped,
            buf: Vec::new(),
            last_watermark: None,
            board,
        };
        Recorder {
            log: LogWriter::stream(Box::new(feed)),
        }
    }
}

impl Write for LogFeed {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LogSink for LogFeed {
    fn page_cache(&mut self, pages: Option<&PageStats>) {
        self.board
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .page_cache = pages.map(Into::into);
    }

    fn landmark_done(&mut self, landmark: u64) -> io::Result<()> {
        if self.buf.is_empty() && self.last_watermark.is_some_and(|w| w >= landmark) {
            return Ok(());
        }
        self.last_watermark = Some(landmark);
        let bytes = std::mem::take(&mut self.buf);
        tracing::trace!(
            watermark = landmark,
            bytes = bytes.len(),
            "engine: log done"
        );
        send_waiting(
            &self.tx,
            &self.stopped,
            EngineMsg::Log {
                bytes,
                watermark: landmark,
            },
        )
    }
}

/// The primary's outputs: to the link thread, which holds them until the
/// backup has the log that produced them.
pub struct OutputFeed {
    pub tx: Sender<EngineMsg>,
    pub stopped: Arc<AtomicBool>,
}

impl OutputSink for OutputFeed {
    fn emit(&mut self, landmark: u64, output: Output) -> io::Result<()> {
        tracing::trace!(landmark, "engine: output");
        send_waiting(
            &self.tx,
            &self.stopped,
            EngineMsg::Output { landmark, output },
        )
    }
}

/// The backup's outputs: its replica's copies, kept until the primary says
/// it released them, emitted by the backup only if it goes live. The IPv4
/// address the guest sends from is noted for the gratuitous ARP of go-live.
pub struct ShadowFeed {
    pub shadow: Arc<Mutex<ShadowOutputs<Output>>>,
    /// The pair's clock origin (the shadow stamps what it holds).
    pub origin: std::time::Instant,
    pub guest_ip: Arc<Mutex<Option<[u8; 4]>>>,
    pub stopped: Arc<AtomicBool>,
}

impl OutputSink for ShadowFeed {
    fn emit(&mut self, landmark: u64, output: Output) -> io::Result<()> {
        if let Output::Net(frame) = &output {
            if let Some(ip) = net::ipv4_source(frame) {
                *self.guest_ip.lock().unwrap_or_else(|p| p.into_inner()) = Some(ip);
            }
        }
        let mut output = output;
        loop {
            let refused = {
                let mut shadow = self.shadow.lock().unwrap_or_else(|p| p.into_inner());
                match shadow.push(landmark, output, self.origin.elapsed()) {
                    Ok(()) => return Ok(()),
                    Err(refused) => refused,
                }
            };
            match refused.error {
                // Wait for the primary's released marker to free room.
                OutputError::Full { .. } => {
                    if self.stopped.load(Ordering::Relaxed) {
                        return Err(io::Error::other("the pair is stopping"));
                    }
                    output = refused.output;
                    std::thread::sleep(Duration::from_millis(1));
                }
                other => return Err(io::Error::other(other.to_string())),
            }
        }
    }
}
