//! `twinvm primary`: runs the guest, streams its log to the backup, holds
//! every output until the backup has the log that produced it, and asks the
//! arbiter whether it may go on alone when the backup is lost.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{Receiver, Select, Sender};

use super::feed::{EngineMsg, LogFeed, OutputFeed};
use super::status::{serve_status, HoldTimes, PairStatus, StatusBoard};
use super::{
    apply_socket_event, open_tap, spawn_arbiter_client, spawn_socket_reader, stop_for, Arbitration,
    Clock, EngineHandle, GuestSetup, LinkEdge, PairConfig, SocketEvent, EXIT_ERROR, EXIT_OK,
    EXIT_STOPPED, WRITE_SLICE,
};
use crate::ft::failover::{Action, Failover, FailoverConfig, FailoverEvent, Verdict};
use crate::ft::link::{Hello, PrimaryEvent, PrimaryLink};
use crate::ft::output::{HeldOutputs, OutputBounds};
use crate::net::tap::TapBackend;
use crate::replay::engine::{
    window_exit_warning, Connections, Control, Ending, Engine, Inputs, Output, RecordSettings,
    Role, Stop, StopOnSignal,
};
use crate::replay::log::LogHeader;
use crate::replay::machine;
use crate::vmm::{sys, Kicker};

mod clone_host;
mod survivor;
use clone_host::{CloneHost, CloneJob};

pub(super) use survivor::{spawn_survivor_pump, SurvivorSetup};

/// How long the primary keeps trying to reach its backup at start.
const CONNECT_FOR: Duration = Duration::from_secs(30);
/// Engine messages in flight to the link thread (the log window and the
/// held-output bound are the real limits; this only smooths bursts).
const ENGINE_QUEUE: usize = 4096;

/// What the link thread tells the vCPU thread.
enum LinkNews {
    Established,
    /// The pair is over for this side: exit with this code.
    Done {
        code: i32,
        message: String,
    },
}

/// What the vCPU thread tells the link thread.
enum MainNews {
    GuestEnded(Ending),
    Failed(String),
}

fn connect(addr: &str) -> Result<TcpStream> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < CONNECT_FOR {
        let addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => bail!("the backup address {addr:?} is not host:port ({e})"),
        };
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_millis(500)) {
                Ok(s) => return Ok(s),
                Err(e) => last = e.to_string(),
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("could not reach the backup at {addr} within {CONNECT_FOR:?}: {last}")
}

/// Run the primary replica to its end; returns the process exit code.
pub fn run_primary(cfg: PairConfig, guest: GuestSetup, backup_addr: &str) -> Result<i32> {
    let clock = Clock(Instant::now());
    let board: StatusBoard = Arc::new(Mutex::new(PairStatus {
        vm: cfg.vm.clone(),
        generation: cfg.generation,
        node: cfg.node.clone(),
        role: "primary".into(),
        state: "connecting".into(),
        ..PairStatus::default()
    }));
    let stopping = Arc::new(AtomicBool::new(false));
    let (clone_cmd_tx, clone_cmd_rx) = crossbeam_channel::bounded(1);
    serve_status(
        &cfg.control,
        board.clone(),
        stopping.clone(),
        Some(clone_cmd_tx),
    )
    .with_context(|| format!("opening the control socket {}", cfg.control.display()))?;

    let host_cpu = match cfg.host_cpu {
        Some(cpu) => cpu,
        None => sys::current_cpu().context("finding the host CPU to run on")?,
    };
    let net_mac = guest.net.as_ref().map(|n| n.mac);
    // The backup follows the header's rule (docs/architecture.md, "Tick
    // deferral").
    if let Some(warning) = window_exit_warning(cfg.tick_delivery) {
        eprintln!("twinvm primary: warning: {warning}");
    }
    let header = LogHeader {
        tick_delivery: cfg.tick_delivery,
        ..machine::header_for(&guest.vm, guest.boot_unix_secs, host_cpu, net_mac)
    };
    let (vm, platform) = machine::build(
        &guest.vm,
        guest.boot_unix_secs,
        header.tick_delivery,
        net_mac,
    )
    .with_context(|| format!("building the VM for {}", guest.vm.kernel_name))?;

    eprintln!("twinvm primary: connecting to the backup at {backup_addr}");
    let stream = connect(backup_addr)?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    stream
        .set_write_timeout(Some(WRITE_SLICE))
        .context("setting the write timeout")?;
    let log_header = header.encode().context("encoding the log header")?;
    let link = PrimaryLink::new(
        cfg.link,
        &cfg.key,
        Hello {
            vm: cfg.vm.clone(),
            generation: cfg.generation,
            log_header: log_header.clone(),
            start_landmark: 0,
        },
        clock.now(),
    )
    .context("setting up the logging channel")?;

    let kicker = Kicker::new();
    let tap = open_tap(guest.net.as_ref(), &kicker)?;

    let (socket_tx, socket_rx) = crossbeam_channel::unbounded();
    spawn_socket_reader(
        stream.try_clone().context("duplicating the socket")?,
        socket_tx,
    )
    .context("starting the socket reader")?;
    let (engine_tx, engine_rx) = crossbeam_channel::bounded(ENGINE_QUEUE);
    let (control_tx, control_rx) = crossbeam_channel::bounded(16);
    let (news_tx, news_rx) = crossbeam_channel::bounded(4);
    let (main_tx, main_rx) = crossbeam_channel::bounded(4);
    let (arbiter_tx, verdict_rx) =
        spawn_arbiter_client(cfg.arbiter.clone()).context("starting the arbiter client")?;
    let clone_engine_tx = engine_tx.clone();
    let recorder = LogFeed::stream_recorder(engine_tx.clone(), stopping.clone(), board.clone());
    let _signals = StopOnSignal::install(control_tx.clone(), kicker.clone())
        .context("installing signal handlers")?;
    let mut engine = Engine::new(
        vm,
        platform,
        Connections {
            inputs: Inputs {
                control: control_rx,
                serial: None,
                net: tap.as_ref().map(|t| t.rx().clone()),
            },
            outputs: Box::new(OutputFeed {
                tx: engine_tx,
                stopped: stopping.clone(),
            }),
            kicker: kicker.clone(),
        },
        Role::Record(recorder),
        RecordSettings {
            sync_bound: cfg.sync_bound,
            tick_deferral: cfg.tick_deferral,
            sync_budget_percent: cfg.sync_budget_percent,
            hot_page_budget: cfg.hot_pages,
            sync_state_every: cfg.sync_state_every,
            ..RecordSettings::default()
        },
        Some(host_cpu),
    )
    .context("setting up the engine")?;
    let pump = PrimaryPump {
        clock,
        cfg: cfg.clone(),
        link,
        stream: Some(stream),
        edge: LinkEdge::default(),
        arbitration: Arbitration {
            failover: None,
            arbiter_tx,
        },
        held: HeldOutputs::new(OutputBounds::default()),
        console: guest.console,
        tap: tap.clone(),
        alone: false,
        holding: false,
        log_dropped: false,
        pending: None,
        engine_rx,
        socket_rx,
        verdict_rx,
        main_rx,
        news_tx,
        engine_handle: EngineHandle {
            control_tx: control_tx.clone(),
            kicker: kicker.clone(),
        },
        stopping: stopping.clone(),
        board: board.clone(),
        landmark: engine.landmark_counter(),
        guest_ended: None,
        done: None,
        rate: RateMeter::default(),
        clone: CloneHost {
            commands: clone_cmd_rx,
            engine_tx: clone_engine_tx,
            memory: engine.guest_memory(),
            log_header,
            host_cpu,
            job: None,
            status: None,
            last_generation: 0,
        },
    };
    let link_thread = thread::Builder::new()
        .name("twinvm-ft-link".into())
        .spawn(move || pump.run())
        .context("starting the link thread")?;

    // The guest boots only once the backup accepted the Hello.
    match news_rx.recv() {
        Ok(LinkNews::Established) => {}
        Ok(LinkNews::Done { code, message }) => {
            let _ = link_thread.join();
            stopping.store(true, Ordering::Relaxed);
            if code == EXIT_ERROR {
                bail!("{message}");
            }
            eprintln!("twinvm primary: {message}");
            return Ok(code);
        }
        Err(_) => bail!("the link thread ended before the backup answered"),
    }
    eprintln!(
        "twinvm primary: backup connected (generation {})",
        cfg.generation
    );

    let outcome = engine.run();
    let _ = match &outcome {
        Ok(report) => match report.stop {
            Stop::Ended { ending, .. } => main_tx.send(MainNews::GuestEnded(ending)),
            Stop::LogExhausted { .. } => main_tx.send(MainNews::Failed(
                "the primary's engine reported the end of a log it does not follow".into(),
            )),
        },
        Err(e) => main_tx.send(MainNews::Failed(e.to_string())),
    };
    let (code, message) = match news_rx.recv() {
        Ok(LinkNews::Done { code, message }) => (code, message),
        _ => (EXIT_ERROR, "the link thread ended without a verdict".into()),
    };
    stopping.store(true, Ordering::Relaxed);
    let _ = link_thread.join();
    match outcome {
        // The link thread decided (lost the arbitration, the pair ended):
        // an engine cut off from its log meanwhile is part of that stop.
        Err(e) if code != EXIT_ERROR => {
            tracing::debug!("the engine stopped with: {e}");
        }
        Err(e) => return Err(anyhow!(e).context("running the guest")),
        Ok(_) => {}
    }
    if code == EXIT_ERROR {
        bail!("{message}");
    }
    eprintln!("twinvm primary: {message}");
    Ok(code)
}

/// Log bandwidth over roughly the last second.
#[derive(Default)]
struct RateMeter {
    at: Option<(Instant, u64)>,
    mbit_s: f64,
}

impl RateMeter {
    fn update(&mut self, bytes: u64) -> f64 {
        let now = Instant::now();
        match self.at {
            Some((then, old)) if now.duration_since(then) >= Duration::from_secs(1) => {
                let secs = now.duration_since(then).as_secs_f64();
                self.mbit_s = (bytes.saturating_sub(old)) as f64 * 8.0 / secs / 1e6;
                self.at = Some((now, bytes));
            }
            None => self.at = Some((now, bytes)),
            _ => {}
        }
        self.mbit_s
    }
}

/// The link thread's state.
struct PrimaryPump {
    clock: Clock,
    cfg: PairConfig,
    link: PrimaryLink,
    /// None for a survivor that never had a backup of its own.
    stream: Option<TcpStream>,
    edge: LinkEdge,
    arbitration: Arbitration,
    held: HeldOutputs<Output>,
    console: Box<dyn std::io::Write + Send>,
    tap: Option<Arc<TapBackend>>,
    /// Won the arbiter: outputs go straight out.
    alone: bool,
    /// The failover machine said to release nothing more.
    holding: bool,
    log_dropped: bool,
    /// An engine message taken but not placed yet (no room).
    pending: Option<EngineMsg>,
    engine_rx: Receiver<EngineMsg>,
    socket_rx: Receiver<SocketEvent>,
    verdict_rx: Receiver<Verdict>,
    main_rx: Receiver<MainNews>,
    news_tx: Sender<LinkNews>,
    engine_handle: EngineHandle,
    stopping: Arc<AtomicBool>,
    board: StatusBoard,
    landmark: Arc<AtomicU64>,
    guest_ended: Option<Ending>,
    done: Option<(i32, String)>,
    rate: RateMeter,
    clone: CloneHost,
}

impl PrimaryPump {
    fn run(mut self) {
        let (code, message) = match self.pump() {
            Ok(done) => done,
            Err(e) => (EXIT_ERROR, format!("{e:#}")),
        };
        self.stopping.store(true, Ordering::Relaxed);
        if code != EXIT_OK {
            self.engine_handle.send(Control::Stop);
        }
        let _ = self.news_tx.send(LinkNews::Done { code, message });
    }

    fn pump(&mut self) -> Result<(i32, String)> {
        loop {
            let open = !self.link.is_closed();
            self.place_engine_messages()?;
            self.handle_events()?;
            self.perform_actions();
            // An ack may have made room for what waited (the engine's
            // channel is not watched while a message waits).
            self.place_engine_messages()?;
            self.try_bye()?;
            // Last, so what this turn produced (the log placed after an
            // ack made room, a Bye) is not left for the next wake-up.
            self.transmit();
            self.publish_status();
            if let Some(done) = self.done.take() {
                if let Some(stream) = self.stream.as_mut() {
                    let limit = self.cfg.link.peer_timeout;
                    self.edge.flush(&mut self.link, stream, &self.clock, limit);
                }
                return Ok(done);
            }
            // A write that lost the connection is the next turn's news, now.
            if open && self.link.is_closed() {
                continue;
            }
            self.wait()?;
        }
    }

    fn transmit(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            self.edge.transmit(&mut self.link, stream, self.clock.now());
        }
    }

    /// Move the engine's outputs into the held queue and its log into the
    /// link, in order, as long as there is room (else the engine waits).
    fn place_engine_messages(&mut self) -> Result<()> {
        loop {
            let msg = match self.pending.take() {
                Some(m) => m,
                None => match self.engine_rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => return Ok(()),
                },
            };
            match msg {
                EngineMsg::Output { landmark, output } => {
                    if let Some(job) = self.clone.job.as_mut() {
                        if job.holding_all {
                            job.cut_outputs.push((landmark, output));
                            continue;
                        }
                    }
                    if self.alone {
                        self.emit(output);
                        continue;
                    }
                    if let Err(refused) = self.held.push(landmark, output, self.clock.now()) {
                        match refused.error {
                            crate::ft::OutputError::Full { .. } => {
                                self.pending = Some(EngineMsg::Output {
                                    landmark,
                                    output: refused.output,
                                });
                                return Ok(());
                            }
                            other => bail!("the output rule's contract was broken: {other}"),
                        }
                    }
                }
                EngineMsg::Log { bytes, watermark } => {
                    // The clone's log waits for the cut's landmark and its
                    // link (the engine waits once the channel is full).
                    if self.clone.job.as_ref().is_some_and(CloneJob::log_waits) {
                        self.pending = Some(EngineMsg::Log { bytes, watermark });
                        return Ok(());
                    }
                    if self.log_dropped || self.link.is_closed() {
                        continue;
                    }
                    if !self.link.can_accept(bytes.len() as u64) {
                        self.pending = Some(EngineMsg::Log { bytes, watermark });
                        return Ok(());
                    }
                    tracing::trace!(watermark, bytes = bytes.len(), "primary: log pushed");
                    self.link
                        .push_log(&bytes, watermark)
                        .context("pushing the log")?;
                }
            }
        }
    }

    /// An output to the world: the console or the TAP.
    fn emit(&mut self, output: Output) {
        match output {
            Output::Console(bytes) => {
                let _ = self.console.write_all(&bytes);
                let _ = self.console.flush();
            }
            Output::Net(frame) => {
                if let Some(tap) = &self.tap {
                    if let Err(e) = tap.send(&frame) {
                        tracing::warn!("sending a frame on {}: {e}", tap.name());
                    }
                }
            }
        }
    }

    fn handle_events(&mut self) -> Result<()> {
        let now = self.clock.now();
        while let Some(event) = self.link.poll_event() {
            if self.clone.syncing() {
                self.clone_link_event(event)?;
                continue;
            }
            match event {
                PrimaryEvent::Established => {
                    self.arbitration.failover = Some(Failover::primary(
                        FailoverConfig::new(&self.cfg.vm, self.cfg.generation, &self.cfg.node),
                        now,
                    ));
                    let _ = self.news_tx.send(LinkNews::Established);
                }
                PrimaryEvent::HelloRefused { reason } => {
                    self.done = Some((EXIT_ERROR, format!("the backup refused us: {reason}")));
                }
                PrimaryEvent::Acked { watermark, .. } => {
                    if !self.holding && !self.alone {
                        let mut released = 0;
                        for output in self.held.release_through(watermark, now) {
                            self.emit(output);
                            released += 1;
                        }
                        tracing::trace!(watermark, released, "primary: acked");
                        // Every output of landmarks <= watermark has been
                        // pushed before the log through watermark was: all out.
                        self.link
                            .set_released(watermark)
                            .context("reporting released outputs")?;
                    }
                }
                PrimaryEvent::PeerHeartbeat { .. } => {}
                PrimaryEvent::Diverged { landmark, detail } => {
                    eprintln!(
                        "twinvm primary: the backup diverged at landmark {landmark} ({detail}) and stopped; asking the arbiter"
                    );
                    self.failover_event(FailoverEvent::Diverged { landmark, detail })?;
                }
                PrimaryEvent::PeerSuspected { silent_for } => {
                    eprintln!(
                        "twinvm primary: backup lost (silent for {} ms); asking the arbiter",
                        silent_for.as_millis()
                    );
                    self.failover_event(FailoverEvent::PeerSuspected)?;
                }
                PrimaryEvent::Closed { reason } => {
                    if self.arbitration.failover.is_none() {
                        self.done = Some((
                            EXIT_ERROR,
                            format!(
                                "the logging channel closed before the backup answered: {reason}"
                            ),
                        ));
                    } else {
                        eprintln!("twinvm primary: backup lost ({reason}); asking the arbiter");
                        self.failover_event(FailoverEvent::LinkClosed {
                            reason: reason.to_string(),
                        })?;
                    }
                }
            }
        }
        Ok(())
    }

    fn failover_event(&mut self, event: FailoverEvent) -> Result<()> {
        if self.arbitration.failover.is_none() {
            bail!("a failover event before the pair was established: {event:?}");
        }
        self.arbitration.handle(event, self.clock.now());
        Ok(())
    }

    fn perform_actions(&mut self) {
        let now = self.clock.now();
        for action in self.arbitration.actions(now) {
            match action {
                Action::HoldOutputs => self.holding = true,
                Action::ReleaseAll => {
                    for output in self.held.release_all(now) {
                        self.emit(output);
                    }
                    self.holding = false;
                    self.alone = true;
                }
                Action::DropLog => {
                    self.log_dropped = true;
                    if !self.link.is_closed() {
                        self.link.close("the primary continues alone");
                    }
                    self.engine_handle.send(Control::DropLog);
                    eprintln!(
                        "twinvm primary: continuing alone (arbiter: won generation {})",
                        self.cfg.generation
                    );
                }
                Action::Stop { exit_code, message } => {
                    self.done = Some(stop_for(&self.engine_handle, exit_code, message));
                }
                other => tracing::error!("backup action {other:?} on the primary; ignored"),
            }
        }
    }

    /// The guest ended: once every output is out (acknowledged and
    /// released), tell the backup goodbye; alone, just finish.
    fn try_bye(&mut self) -> Result<()> {
        let Some(ending) = self.guest_ended else {
            return Ok(());
        };
        if self.done.is_some() || self.pending.is_some() || !self.engine_rx.is_empty() {
            return Ok(());
        }
        let code = if ending == Ending::Stopped {
            EXIT_STOPPED
        } else {
            EXIT_OK
        };
        let now = self.clock.now();
        if self.alone || self.log_dropped {
            self.done = Some((code, format!("the guest ended ({ending:?})")));
            return Ok(());
        }
        if !self.held.is_empty() || self.holding {
            return Ok(());
        }
        if self.link.is_closed() {
            return Ok(());
        }
        if self.link.send_bye(&format!("{ending:?}"), now).is_ok() {
            self.failover_event(FailoverEvent::Bye {
                reason: format!("{ending:?}"),
            })?;
            self.perform_actions();
            if let Some((_, message)) = self.done.take() {
                self.done = Some((code, message));
            }
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        let status = self.link.status();
        let mbit_s = self.rate.update(status.stats.log_bytes);
        let landmark = self.landmark.load(Ordering::Relaxed);
        let hold = self.held.hold_times();
        let mut b = self.board.lock().unwrap_or_else(|p| p.into_inner());
        self.arbitration.publish(&mut b);
        b.landmark = landmark;
        b.watermark = status.pushed_watermark;
        b.acked = status.acked_watermark;
        b.released = status.released;
        b.lag_landmarks = landmark.saturating_sub(status.backup_replayed_landmark);
        b.lag_ms = status.backup_lag_ns as f64 / 1e6;
        b.log_mbit_s = mbit_s;
        b.log_bytes = status.stats.log_bytes;
        b.held_outputs = self.held.len() as u64;
        b.hold_ms = HoldTimes {
            count: hold.count,
            p50: hold.p50.as_secs_f64() * 1e3,
            p99: hold.p99.as_secs_f64() * 1e3,
            max: hold.max.as_secs_f64() * 1e3,
        };
        b.peer_connected = status.established && status.closed.is_none();
        b.uptime_s = self.clock.now().as_secs_f64();
        if let Some(clone) = &self.clone.status {
            b.clone = Some(clone.lock().unwrap_or_else(|p| p.into_inner()).clone());
        }
    }

    /// Sleep until something arrives or a timer is due.
    fn wait(&mut self) -> Result<()> {
        let now = self.clock.now();
        let mut deadline = now + Duration::from_millis(100);
        for t in [self.link.poll_timeout(), self.arbitration.poll_timeout()]
            .into_iter()
            .flatten()
        {
            deadline = deadline.min(t);
        }
        let timeout = self.edge.plan_wait(now, deadline);
        let (socket_rx, engine_rx, verdict_rx, main_rx) = (
            self.socket_rx.clone(),
            self.engine_rx.clone(),
            self.verdict_rx.clone(),
            self.main_rx.clone(),
        );
        let commands_rx = self.clone.commands.clone();
        let clone_rx = self.clone.job.as_ref().map(|j| j.events.clone());
        let mut sel = Select::new();
        let socket = sel.recv(&socket_rx);
        let engine = self.pending.is_none().then(|| sel.recv(&engine_rx));
        let verdict = sel.recv(&verdict_rx);
        let main = sel.recv(&main_rx);
        let command = sel.recv(&commands_rx);
        let clone_event = clone_rx.as_ref().map(|rx| sel.recv(rx));
        let selected = sel.select_timeout(timeout);
        self.edge.woke(&mut self.link, &self.clock);
        let Ok(op) = selected else {
            self.judge_link();
            return Ok(());
        };
        let index = op.index();
        if index == command {
            if let Ok(command) = op.recv(&commands_rx) {
                self.start_clone(command);
            }
        } else if Some(index) == clone_event {
            match op.recv(clone_rx.as_ref().expect("selected")) {
                Ok(event) => self.clone_event(event)?,
                Err(_) => self.clone_failed("the clone job ended without a word".into()),
            }
        } else if index == socket {
            apply_socket_event(&mut self.link, op.recv(&socket_rx), self.clock.now());
        } else if Some(index) == engine {
            if let Ok(msg) = op.recv(&engine_rx) {
                self.pending = Some(msg);
            }
        } else if index == verdict {
            if let Ok(v) = op.recv(&verdict_rx) {
                self.failover_event(FailoverEvent::ArbiterVerdict(v))?;
            }
        } else if index == main {
            match op.recv(&main_rx) {
                Ok(MainNews::GuestEnded(ending)) => self.guest_ended = Some(ending),
                Ok(MainNews::Failed(e)) => {
                    self.link.close("the primary's guest failed");
                    self.done = Some((EXIT_ERROR, format!("the guest failed: {e}")));
                }
                Err(_) => {}
            }
        }
        self.judge_link();
        Ok(())
    }

    fn judge_link(&mut self) {
        self.edge.judge(
            &mut self.link,
            Some(&self.socket_rx),
            self.stream.as_ref(),
            &self.clock,
        );
    }
}
