//! The primary pump's side of a clone (`twinvm clone`, src/clone): start
//! the job, hold outputs across the cut, switch to the new backup's link,
//! and either become a whole pair at the new generation or go back to
//! running alone.

use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};

use super::{CloneJob, PrimaryPump};
use crate::clone::source::{run_source, SourceEvent, SourceParams};
use crate::clone::{CloneStatus, RoundBounds};
use crate::ft::failover::{Failover, FailoverConfig};
use crate::ft::link::{Hello, PrimaryEvent, PrimaryLink};
use crate::ft::node::feed::LogFeed;
use crate::ft::node::status::CloneCommand;
use crate::ft::node::{spawn_socket_reader, WRITE_SLICE};
use crate::ft::output::{HeldOutputs, OutputBounds};
use crate::replay::engine::{Control, Recorder};
use crate::replay::log::LogWriter;

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
        let mut feed = LogFeed::new(self.clone.engine_tx.clone(), self.stopping.clone());
        feed.start_stream();
        feed.report_to(self.board.clone());
        let recorder = Recorder {
            log: LogWriter::stream(Box::new(feed)),
        };
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
