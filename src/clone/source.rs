//! The primary's clone job (a thread of its own): connects to the new
//! backup, copies guest memory in rounds while the guest runs, has the pump
//! ask the engine for the cut, sends the last pages and the snapshot, opens
//! the logging channel that starts at the cut, waits until the new backup
//! has acknowledged the cut's landmark, and only then re-arms the arbiter
//! at the new generation. Any failure before the re-arm leaves the primary
//! running alone (the pump drops the new log and lets held outputs out).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::auth::Key;
use arbiter::state_machine::ResetOutcome;
use arbiter::{ArbiterClient, ClientConfig};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::compat::this_build;
use super::policy::{NextStep, RoundBounds, RoundPolicy};
use super::protocol::{ToClonePrimary, ToNewBackup, CLONE_PROTOCOL_VERSION, MAX_PAGES_PER_MESSAGE};
use super::{CloneChannel, CloneError, CloneStatus};
use crate::replay::digest::DirtyPages;
use crate::replay::engine::{CloneCut, CloneRequest, Control, Recorder};
use crate::replay::log::PAGE_SIZE;
use crate::vmm::Kicker;

/// How long to try reaching the new backup.
const CONNECT_FOR: Duration = Duration::from_secs(10);
/// How long one answer from the new backup may take (the Final's covers
/// building its VM and loading every page).
const ANSWER_WITHIN: Duration = Duration::from_secs(120);
/// How long the engine may take to reach a landmark and cut.
const CUT_WITHIN: Duration = Duration::from_secs(30);

/// What the clone job needs.
pub struct SourceParams {
    /// The new backup's `--listen` address.
    pub to: String,
    pub key: Key,
    pub vm: String,
    /// The pair's generation once the clone is in sync (the old one + 1).
    pub generation: u64,
    pub log_header: Vec<u8>,
    pub host_cpu: u32,
    pub memory: GuestMemoryMmap,
    pub control_tx: Sender<Control>,
    pub kicker: Kicker,
    pub bounds: RoundBounds,
    pub arbiter: crate::ft::node::ArbiterSettings,
    pub status: Arc<Mutex<CloneStatus>>,
    pub stop: Arc<AtomicBool>,
}

/// What the job tells the pump.
pub enum SourceEvent {
    /// Hold every output from now on, then hand this to the engine.
    CutNow(Box<CloneRequest>),
    /// The cut is at `landmark`: outputs before it may go; from it on they
    /// wait for the new backup's acknowledgement.
    Cut { landmark: u64 },
    /// The logging channel to the new backup, connected.
    LinkReady { stream: TcpStream, landmark: u64 },
    /// The arbiter was re-armed at the new generation: the pair is whole.
    Rearmed { generation: u64 },
    /// The clone failed; the primary goes on alone.
    Failed(String),
}

fn engine_call<T>(
    control_tx: &Sender<Control>,
    kicker: &Kicker,
    msg: Control,
    reply: &Receiver<Result<T, String>>,
    within: Duration,
) -> Result<T, CloneError> {
    control_tx
        .send_timeout(msg, within)
        .map_err(|_| CloneError::Engine("the engine does not take requests".into()))?;
    kicker.kick();
    match reply.recv_timeout(within) {
        Ok(r) => r.map_err(CloneError::Engine),
        Err(RecvTimeoutError::Timeout) => {
            Err(CloneError::Engine(format!("no answer within {within:?}")))
        }
        Err(RecvTimeoutError::Disconnected) => Err(CloneError::Engine("the engine ended".into())),
    }
}

/// Reach `addr` within [`CONNECT_FOR`].
pub fn connect(addr: &str) -> Result<TcpStream, CloneError> {
    let started = Instant::now();
    let mut last = String::from("no address");
    while started.elapsed() < CONNECT_FOR {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| CloneError::Io {
                what: "resolving the new backup's address",
                error: format!("{addr:?}: {e}"),
            })?
            .collect();
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_millis(500)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(CloneError::Io {
        what: "connecting to the new backup",
        error: format!("{addr} not reachable within {CONNECT_FOR:?}: {last}"),
    })
}

/// Every guest RAM page address, ascending.
fn all_pages(memory: &GuestMemoryMmap) -> Vec<u64> {
    let mut pages = Vec::new();
    for region in memory.iter() {
        let start = region.start_addr().0;
        let mut gpa = start;
        while gpa < start + region.len() {
            pages.push(gpa);
            gpa += PAGE_SIZE as u64;
        }
    }
    pages
}

/// The clone job's running state.
struct Job<'a> {
    params: &'a SourceParams,
    chan: CloneChannel,
    pages_sent: u64,
    bytes_sent: u64,
}

impl Job<'_> {
    fn status(&self, update: impl FnOnce(&mut CloneStatus)) {
        let mut s = self.params.status.lock().unwrap_or_else(|p| p.into_inner());
        update(&mut s);
        s.pages_sent = self.pages_sent;
        s.bytes_sent = self.bytes_sent;
    }

    fn send(&mut self, msg: &ToNewBackup) -> Result<(), CloneError> {
        if self.params.stop.load(Ordering::Relaxed) {
            return Err(CloneError::Stopped);
        }
        let bytes = msg.encode()?;
        self.bytes_sent += bytes.len() as u64;
        self.chan.send(&bytes)
    }

    fn answer(&mut self) -> Result<ToClonePrimary, CloneError> {
        Ok(ToClonePrimary::decode(&self.chan.recv()?)?)
    }

    /// Send `gpas` as read from guest memory now.
    fn send_pages(&mut self, round: u32, gpas: &[u64]) -> Result<(), CloneError> {
        for chunk in gpas.chunks(MAX_PAGES_PER_MESSAGE) {
            let mut pages = Vec::with_capacity(chunk.len());
            for &gpa in chunk {
                let mut page = vec![0u8; PAGE_SIZE];
                self.params
                    .memory
                    .read_slice(&mut page, GuestAddress(gpa))
                    .map_err(|e| CloneError::Engine(format!("reading page {gpa:#x}: {e}")))?;
                pages.push((gpa, page));
            }
            self.send_page_list(round, pages)?;
        }
        Ok(())
    }

    fn send_page_list(&mut self, round: u32, pages: Vec<(u64, Vec<u8>)>) -> Result<(), CloneError> {
        let n = pages.len() as u64;
        self.send(&ToNewBackup::Pages { round, pages })?;
        self.pages_sent += n;
        self.status(|_| {});
        Ok(())
    }

    fn collect_dirty(&self) -> Result<DirtyPages, CloneError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        engine_call(
            &self.params.control_tx,
            &self.params.kicker,
            Control::CollectDirty(tx),
            &rx,
            CUT_WITHIN,
        )
    }
}

/// Run a clone to its end; `Ok(())` once the arbiter is re-armed. The
/// engine records into `recorder` from the cut on (the pump's feed). The
/// events tell the pump what to do; `acked_rx` tells the job that the new
/// backup acknowledged the cut's landmark.
pub fn run_source(
    params: SourceParams,
    recorder: Recorder,
    events: &Sender<SourceEvent>,
    acked_rx: &Receiver<u64>,
) -> Result<(), CloneError> {
    let started = Instant::now();
    let params = &params;
    {
        let mut s = params.status.lock().unwrap_or_else(|p| p.into_inner());
        s.phase = "connecting".into();
        s.to = params.to.clone();
        s.generation = params.generation;
    }
    let stream = connect(&params.to)?;
    let chan = CloneChannel::connect(stream, &params.key, ANSWER_WITHIN)?;
    let mut job = Job {
        params,
        chan,
        pages_sent: 0,
        bytes_sent: 0,
    };
    job.send(&ToNewBackup::Hello {
        protocol_version: CLONE_PROTOCOL_VERSION,
        vm: params.vm.clone(),
        generation: params.generation,
        log_header: params.log_header.clone(),
        build: this_build(),
        host_cpu: params.host_cpu,
    })?;
    match job.answer()? {
        ToClonePrimary::HelloOk => {}
        ToClonePrimary::Refused { reason } => return Err(CloneError::Refused(reason)),
        other => {
            return Err(CloneError::Violation(format!(
                "{} instead of HelloOk",
                other.name()
            )))
        }
    }

    // Copy while the guest runs.
    params
        .control_tx
        .send_timeout(Control::TrackDirty(true), CUT_WITHIN)
        .map_err(|_| CloneError::Engine("the engine does not take requests".into()))?;
    params.kicker.kick();
    let copied = (|| {
        job.collect_dirty()?;
        let mut policy = RoundPolicy::new(params.bounds);
        let mut round = 0u32;
        let mut to_send = all_pages(&params.memory);
        job.status(|s| s.phase = "copying".into());
        loop {
            let began = Instant::now();
            job.send_pages(round, &to_send)?;
            let dirty = job.collect_dirty()?;
            let took = began.elapsed();
            job.send(&ToNewBackup::Round {
                round,
                dirty_pages: dirty.len() as u64,
            })?;
            let step = policy.round_done(to_send.len() as u64, took, dirty.len() as u64);
            job.status(|s| {
                s.round = policy.rounds_done();
                s.dirty_pages = dirty.len() as u64;
                s.dirty_rate = policy.dirty_rate();
                s.estimated_pause_ms = policy.estimated_pause().as_secs_f64() * 1e3;
            });
            match step {
                NextStep::CopyAgain => {
                    let mut dirty = dirty;
                    to_send = dirty.take();
                    round += 1;
                }
                // The pages of `dirty` were written after their copy: send
                // them once more while the guest runs (small by now, or
                // bounded); the cut's collection has whatever is written
                // after this read.
                NextStep::Cut(reason) => {
                    job.status(|s| s.cut_reason = reason.describe().into());
                    let mut dirty = dirty;
                    job.send_pages(round + 1, &dirty.take())?;
                    return Ok(round + 1);
                }
            }
        }
    })();
    let final_round = match copied {
        Ok(r) => r,
        Err(e) => {
            let _ = params.control_tx.try_send(Control::TrackDirty(false));
            params.kicker.kick();
            return Err(e);
        }
    };

    // The cut: the pump holds outputs, then the engine stops at a landmark.
    job.status(|s| s.phase = "cutting".into());
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    let asked = Instant::now();
    events
        .send(SourceEvent::CutNow(Box::new(CloneRequest {
            recorder,
            reply: reply_tx,
        })))
        .map_err(|_| CloneError::Engine("the pump ended".into()))?;
    let CloneCut {
        snapshot,
        pages,
        held,
    } = match reply_rx.recv_timeout(CUT_WITHIN) {
        Ok(Ok(cut)) => cut,
        Ok(Err(e)) => return Err(CloneError::Engine(e)),
        Err(_) => return Err(CloneError::Engine(format!("no cut within {CUT_WITHIN:?}"))),
    };
    let waited = asked.elapsed().saturating_sub(held);
    let landmark = snapshot.landmark;
    let _ = events.send(SourceEvent::Cut { landmark });
    job.status(|s| {
        s.pause_ms = held.as_secs_f64() * 1e3;
        s.cut_wait_ms = waited.as_secs_f64() * 1e3;
        s.landmark = landmark;
        s.phase = "syncing".into();
    });
    for chunk in pages.chunks(MAX_PAGES_PER_MESSAGE) {
        job.send_page_list(final_round, chunk.to_vec())?;
    }
    let snapshot_bytes = serde_json::to_vec(&snapshot)
        .map_err(|e| CloneError::Engine(format!("serialising the snapshot: {e}")))?;
    let pages_sent = job.pages_sent;
    job.send(&ToNewBackup::Final {
        snapshot: snapshot_bytes,
        pages_sent,
    })?;
    match job.answer()? {
        ToClonePrimary::FinalOk => {}
        ToClonePrimary::Failed { reason } => return Err(CloneError::PeerFailed(reason)),
        other => {
            return Err(CloneError::Violation(format!(
                "{} instead of FinalOk",
                other.name()
            )))
        }
    }
    let link = connect(&params.to)?;
    events
        .send(SourceEvent::LinkReady {
            stream: link,
            landmark,
        })
        .map_err(|_| CloneError::Engine("the pump ended".into()))?;
    // The slot stays ours at the old generation until the new backup
    // holds the log from the cut on.
    let wait_until = Instant::now() + ANSWER_WITHIN;
    loop {
        if params.stop.load(Ordering::Relaxed) {
            return Err(CloneError::Stopped);
        }
        match acked_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(acked) if acked >= landmark => break,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) if Instant::now() < wait_until => {}
            Err(RecvTimeoutError::Timeout) => {
                return Err(CloneError::Violation(format!(
                "the new backup did not acknowledge landmark {landmark} within {ANSWER_WITHIN:?}"
            )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(CloneError::Violation(
                    "the logging channel to the new backup ended before it acknowledged the cut"
                        .into(),
                ))
            }
        }
    }
    let mut client = ArbiterClient::new(ClientConfig {
        cluster_id: params.arbiter.cluster_id.clone(),
        addrs: params.arbiter.addrs.clone(),
        deadline: params.arbiter.attempt_deadline.max(Duration::from_secs(5)),
        key: params.arbiter.key.clone(),
    });
    match client.reset(&params.vm, params.generation) {
        Ok(ResetOutcome::Reset { generation }) => {
            let _ = events.send(SourceEvent::Rearmed { generation });
        }
        Ok(ResetOutcome::Rejected { current_generation }) => {
            return Err(CloneError::Refused(format!(
                "the arbiter refused generation {} (its generation is {current_generation})",
                params.generation
            )))
        }
        Err(e) => {
            return Err(CloneError::Io {
                what: "re-arming the arbiter",
                error: e.to_string(),
            })
        }
    }
    // The pump marks the clone done when it takes the Rearmed (it may have
    // failed the clone meanwhile: then it stays failed).
    job.status(|s| s.total_ms = started.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
