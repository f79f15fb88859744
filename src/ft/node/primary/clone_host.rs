//! The primary pump's side of a clone (`twinvm clone`, src/clone): start
//! the job, hold outputs across the cut, switch to the new backup's link,
//! and either become a whole pair at the new generation or go back to
//! running alone.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};

use super::PrimaryPump;
use crate::clone::source::{run_source, SourceEvent, SourceParams};
use crate::clone::{CloneStatus, RoundBounds};
use crate::ft::failover::{Failover, FailoverConfig};
use crate::ft::link::{Hello, PrimaryEvent, PrimaryLink};
use crate::ft::node::feed::{EngineMsg, LogFeed};
use crate::ft::node::status::CloneCommand;
use crate::ft::node::{spawn_socket_reader, WRITE_SLICE};
use crate::ft::output::{HeldOutputs, OutputBounds};
use crate::replay::engine::{Control, Output};

impl PrimaryPump {
    /// `clone HOST:PORT` from the control socket.
    pub(super) fn start_clone(&mut self, command: CloneCommand) {
        let refusal = if self.clone.job.is_some() {
            Some("a clone is already under way".to_owned())
        } else if !self.alone || !self.log_dropped {
            Some(
                "the pair is whole (or still deciding): only a primary running alone can be cloned"
                    .to_owned(),
            )
        } else if self.guest_ended.is_some() || self.done.is_some() {
            Some("the guest has ended".to_owned())
        } else {
            None
        };
        if let Some(reason) = refusal {
            let _ = command.reply.send(Err(reason));
            return;
        }
        // Above any generation an earlier clone may have re-armed the
        // arbiter with just before it failed here.
        let generation = self.cfg.generation.max(self.clone.last_generation) + 1;
        self.clone.last_generation = generation;
        let status = Arc::new(Mutex::new(CloneStatus {
            phase: "connecting".into(),
            to: command.to.clone(),
            generation,
            ..CloneStatus::default()
        }));
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let (acked_tx, acked_rx) = crossbeam_channel::unbounded();
        let recorder = LogFeed::stream_recorder(
            self.clone.engine_tx.clone(),
            self.stopping.clone(),
            self.board.clone(),
        );
        let params = SourceParams {
            to: command.to.clone(),
            key: self.cfg.key.clone(),
            vm: self.cfg.vm.clone(),
            generation,
            log_header: self.clone.log_header.clone(),
            host_cpu: self.clone.host_cpu,
            memory: self.clone.memory.clone(),
            control_tx: self.engine_handle.control_tx.clone(),
            kicker: self.engine_handle.kicker.clone(),
            bounds: RoundBounds::default(),
            arbiter: self.cfg.arbiter.clone(),
            status: status.clone(),
            stop: self.stopping.clone(),
        };
        let spawned = thread::Builder::new()
            .name("twinvm-clone".into())
            .spawn(move || {
                if let Err(e) = run_source(params, recorder, &events_tx, &acked_rx) {
                    let _ = events_tx.send(SourceEvent::Failed(e.to_string()));
                }
            });
        if let Err(e) = spawned {
            let _ = command
                .reply
                .send(Err(format!("starting the clone thread: {e}")));
            return;
        }
        eprintln!(
            "twinvm primary: cloning to {} (generation {generation} once in sync)",
            command.to
        );
        self.clone.status = Some(status.clone());
        self.clone.job = Some(CloneJob::new(events_rx, acked_tx, status, generation));
        let _ = command.reply.send(Ok(()));
    }

    pub(super) fn clone_event(&mut self, event: SourceEvent) -> Result<()> {
        let Some(job) = self.clone.job.as_mut() else {
            return Ok(());
        };
        match event {
            SourceEvent::CutNow(request) => {
                // From here every output waits until the cut's landmark is
                // known: those before it go out, the others wait for the
                // new backup's acknowledgement.
                job.holding_all = true;
                job.engine_cut = true;
                self.engine_handle.send(Control::CloneAt(request));
            }
            SourceEvent::Cut { landmark } => {
                job.landmark = Some(landmark);
                job.holding_all = false;
                job.awaiting_link = true;
                let outputs = std::mem::take(&mut job.cut_outputs);
                self.held = HeldOutputs::new(OutputBounds::default());
                self.alone = false;
                self.log_dropped = false;
                let now = self.clock.now();
                for (at, output) in outputs {
                    if at < landmark {
                        self.emit(output);
                    } else if let Err(refused) = self.held.push(at, output, now) {
                        // The held queue is new and these are few: only a
                        // broken contract gets here.
                        self.clone_failed(format!(
                            "holding an output at the cut: {}",
                            refused.error
                        ));
                        return Ok(());
                    }
                }
            }
            SourceEvent::LinkReady { stream, landmark } => {
                let generation = job.generation;
                stream
                    .set_write_timeout(Some(WRITE_SLICE))
                    .context("setting the write timeout")?;
                let link = PrimaryLink::new(
                    self.cfg.link,
                    &self.cfg.key,
                    Hello {
                        vm: self.cfg.vm.clone(),
                        generation,
                        log_header: self.clone.log_header.clone(),
                        start_landmark: landmark,
                    },
                    self.clock.now(),
                );
                let link = match link {
                    Ok(l) => l,
                    Err(e) => {
                        self.clone_failed(format!("setting up the logging channel: {e}"));
                        return Ok(());
                    }
                };
                let (tx, rx) = crossbeam_channel::unbounded();
                let reader = stream
                    .try_clone()
                    .map_err(anyhow::Error::from)
                    .and_then(|s| spawn_socket_reader(s, tx).map_err(anyhow::Error::from));
                if let Err(e) = reader {
                    self.clone_failed(format!("reading the logging channel: {e}"));
                    return Ok(());
                }
                let job = self.clone.job.as_mut().expect("checked above");
                job.awaiting_link = false;
                job.linked = true;
                self.link = link;
                self.stream = Some(stream);
                self.edge.reset();
                self.socket_rx = rx;
            }
            SourceEvent::Rearmed { generation } => {
                let started = job.started;
                let status = job.status.clone();
                self.clone.job = None;
                self.cfg.generation = generation;
                self.arbitration.failover = Some(Failover::primary(
                    FailoverConfig::new(&self.cfg.vm, generation, &self.cfg.node),
                    self.clock.now(),
                ));
                self.board
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .generation = generation;
                let s = {
                    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                    s.phase = "done".into();
                    s.total_ms = started.elapsed().as_secs_f64() * 1e3;
                    s.clone()
                };
                eprintln!(
                    "twinvm primary: clone done: the pair is whole at generation {generation} \
                     ({} rounds, {} pages, {:.1} MiB sent, pause {:.1} ms, total {:.1} s)",
                    s.round,
                    s.pages_sent,
                    s.bytes_sent as f64 / (1 << 20) as f64,
                    s.pause_ms,
                    started.elapsed().as_secs_f64()
                );
            }
            SourceEvent::Failed(reason) => self.clone_failed(reason),
        }
        Ok(())
    }

    /// The new backup's link while the clone is not finished: acks
    /// release outputs and tell the job; any end of it fails the clone.
    pub(super) fn clone_link_event(&mut self, event: PrimaryEvent) -> Result<()> {
        let now = self.clock.now();
        match event {
            PrimaryEvent::Established | PrimaryEvent::PeerHeartbeat { .. } => {}
            PrimaryEvent::Acked { watermark, .. } => {
                for output in self.held.release_through(watermark, now) {
                    self.emit(output);
                }
                self.link
                    .set_released(watermark)
                    .context("reporting released outputs")?;
                if let Some(job) = &self.clone.job {
                    let _ = job.acked_tx.send(watermark);
                }
            }
            PrimaryEvent::HelloRefused { reason } => self.clone_failed(format!(
                "the new backup refused the logging channel: {reason}"
            )),
            PrimaryEvent::Diverged { landmark, detail } => self.clone_failed(format!(
                "the new backup diverged at landmark {landmark}: {detail}"
            )),
            PrimaryEvent::PeerSuspected { silent_for } => self.clone_failed(format!(
                "the new backup went silent for {} ms",
                silent_for.as_millis()
            )),
            PrimaryEvent::Closed { reason } => self.clone_failed(format!(
                "the logging channel to the new backup closed: {reason}"
            )),
        }
        Ok(())
    }

    /// Back to running alone: every held output goes out, the clone's log
    /// is dropped, the arbiter was not touched.
    pub(super) fn clone_failed(&mut self, reason: String) {
        let Some(job) = self.clone.job.take() else {
            return;
        };
        eprintln!("twinvm primary: clone failed: {reason}; running alone");
        {
            let mut s = job.status.lock().unwrap_or_else(|p| p.into_inner());
            s.phase = "failed".into();
            s.error = reason;
            s.total_ms = job.started.elapsed().as_secs_f64() * 1e3;
        }
        let now = self.clock.now();
        let mut pending_output = None;
        if let Some(crate::ft::node::feed::EngineMsg::Output { landmark, output }) =
            self.pending.take()
        {
            pending_output = Some((landmark, output));
        }
        let mut outputs: Vec<_> = self.held.release_all(now);
        outputs.extend(job.cut_outputs.into_iter().map(|(_, o)| o));
        outputs.extend(pending_output.map(|(_, o)| o));
        for output in outputs {
            self.emit(output);
        }
        self.alone = true;
        self.log_dropped = true;
        if !self.link.is_closed() {
            self.link.close("the clone failed");
        }
        if job.engine_cut {
            self.engine_handle.send(Control::DropLog);
        } else {
            self.engine_handle.send(Control::TrackDirty(false));
        }
    }
}

/// The primary's side of `twinvm clone` (src/clone): the job's thread and
/// what the pump holds for it.
pub(super) struct CloneHost {
    pub(super) commands: Receiver<CloneCommand>,
    /// For the clone's log feed (ordered with the outputs).
    pub(super) engine_tx: Sender<EngineMsg>,
    pub(super) memory: vm_memory::GuestMemoryMmap,
    pub(super) log_header: Vec<u8>,
    pub(super) host_cpu: u32,
    pub(super) job: Option<CloneJob>,
    /// The last clone's progress (kept for `twinvm status` once over).
    pub(super) status: Option<Arc<Mutex<crate::clone::CloneStatus>>>,
    /// The highest generation a clone was started with.
    pub(super) last_generation: u64,
}

/// A clone under way.
pub(super) struct CloneJob {
    pub(super) events: Receiver<SourceEvent>,
    pub(super) acked_tx: Sender<u64>,
    pub(super) status: Arc<Mutex<crate::clone::CloneStatus>>,
    /// The engine was asked for the cut: every output waits.
    pub(super) holding_all: bool,
    pub(super) cut_outputs: Vec<(u64, Output)>,
    /// The engine records for the clone (a failure must drop that log).
    pub(super) engine_cut: bool,
    /// The cut's landmark, once known.
    pub(super) landmark: Option<u64>,
    /// The clone's log waits for the logging channel.
    pub(super) awaiting_link: bool,
    /// The logging channel to the new backup is up, the arbiter not re-armed yet.
    pub(super) linked: bool,
    pub(super) generation: u64,
    pub(super) started: Instant,
}

impl CloneJob {
    /// A clone just asked for: copying, nothing held yet.
    pub(super) fn new(
        events: Receiver<SourceEvent>,
        acked_tx: Sender<u64>,
        status: Arc<Mutex<crate::clone::CloneStatus>>,
        generation: u64,
    ) -> CloneJob {
        CloneJob {
            events,
            acked_tx,
            status,
            holding_all: false,
            cut_outputs: Vec::new(),
            engine_cut: false,
            landmark: None,
            awaiting_link: false,
            linked: false,
            generation,
            started: Instant::now(),
        }
    }

    /// The engine's log for the new backup waits from the moment the cut is
    /// asked for until its link is up. It starts with the cut landmark's own
    /// records, which the engine writes right after its reply; the cut's
    /// landmark reaches the pump by another path (the clone thread's
    /// `SourceEvent::Cut`), so those records can come first, and pushed to
    /// the closed link of a primary running alone they were lost: the new
    /// backup skipped the cut landmark's received frames and diverged a few
    /// landmarks later.
    pub(super) fn log_waits(&self) -> bool {
        self.holding_all || self.awaiting_link
    }
}

impl CloneHost {
    /// The new backup's link is up and the clone not finished: link
    /// trouble fails the clone rather than the pair.
    pub(super) fn syncing(&self) -> bool {
        self.job.as_ref().is_some_and(|j| j.linked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> CloneJob {
        let (_events_tx, events) = crossbeam_channel::unbounded();
        let (acked_tx, _acked_rx) = crossbeam_channel::unbounded();
        CloneJob::new(events, acked_tx, Default::default(), 2)
    }

    #[test]
    fn the_clones_log_waits_from_the_cut_request_until_its_link_is_up() {
        let mut j = job();
        // Copying: the engine runs alone and writes no log.
        assert!(!j.log_waits());
        // The cut is asked for (`SourceEvent::CutNow`): the engine's next
        // log is the cut landmark's, before the pump knows the landmark.
        j.holding_all = true;
        j.engine_cut = true;
        assert!(j.log_waits());
        // The cut's landmark is known (`SourceEvent::Cut`), no link yet.
        j.holding_all = false;
        j.awaiting_link = true;
        j.landmark = Some(1724);
        assert!(j.log_waits());
        // The link is up (`SourceEvent::LinkReady`): the log flows.
        j.awaiting_link = false;
        j.linked = true;
        assert!(!j.log_waits());
    }
}
