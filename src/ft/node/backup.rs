//! `twinvm backup`: waits for its primary, replays the primary's log one
//! epoch behind with a muted NIC, keeps its outputs in the shadow until the
//! primary says it released them, and, if the primary is lost and the
//! arbiter agrees, finishes the log and goes live in place.

use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{Receiver, Select, Sender};

use super::feed::ShadowFeed;
use super::primary::{spawn_survivor_pump, SurvivorSetup};
use super::status::{serve_status, PairStatus, StatusBoard};
use super::{
    apply_socket_event, open_tap, spawn_arbiter_client, spawn_socket_reader, stop_for, Arbitration,
    Clock, EngineHandle, GuestSetup, LinkEdge, PairConfig, SocketEvent, EXIT_DIVERGED, EXIT_ERROR,
    EXIT_OK, EXIT_STOPPED, WRITE_SLICE,
};
use crate::ft::failover::{Action, Failover, FailoverConfig, FailoverEvent, Verdict};
use crate::ft::link::{BackupEvent, BackupLink, ExpectedHello};
use crate::ft::output::{OutputBounds, ShadowOutputs};
use crate::net::tap::TapBackend;
use crate::net::{format_mac, gratuitous_arp};
use crate::replay::engine::{
    Connections, ConsoleAndNet, Control, Engine, FrameSender, Inputs, Output, RecordSettings, Role,
    RunError, Stop, StopOnSignal,
};
use crate::replay::log::{record_cost, LogHeader, RecordDecoder};
use crate::replay::machine;
use crate::replay::schedule::{LiveItem, LiveSource, Schedule};
use crate::vmm::Kicker;

/// Replay queue bytes beyond which acknowledgements wait for the engine
/// (bytes are never refused: the primary's window bounds what more comes).
const REPLAY_QUEUE_BYTES: u64 = 64 << 20;
/// Gratuitous ARPs after going live, and the gaps before each.
const ARP_ANNOUNCEMENTS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(20),
    Duration::from_millis(100),
];

/// What the link thread tells the vCPU thread.
enum LinkNews {
    /// The primary's Hello, accepted: its log header.
    Hello(LogHeader),
    /// Go live at this landmark, emitting these outputs first.
    Promote { outputs: Vec<Output> },
    /// The pair is over for this side.
    Done { code: i32, message: String },
}

/// What the vCPU thread tells the link thread.
enum MainNews {
    LogExhausted {
        landmark: u64,
    },
    Diverged {
        landmark: u64,
        detail: String,
    },
    /// The guest ended (the End record), or the run stopped.
    Ended {
        code: i32,
        message: String,
    },
}

/// Run the backup replica to its end; returns the process exit code.
pub fn run_backup(cfg: PairConfig, guest: GuestSetup, listen: &str) -> Result<i32> {
    run_backup_from(cfg, guest, listen, false)
}

/// Run a backup; with `from_clone`, it first receives a clone of a live
/// primary (`twinvm clone`) and follows its log from the cut on, at the
/// generation the primary's clone names.
pub fn run_backup_from(
    mut cfg: PairConfig,
    guest: GuestSetup,
    listen: &str,
    from_clone: bool,
) -> Result<i32> {
    let clock = Clock(Instant::now());
    let board: StatusBoard = Arc::new(Mutex::new(PairStatus {
        vm: cfg.vm.clone(),
        generation: cfg.generation,
        node: cfg.node.clone(),
        role: "backup".into(),
        state: "connecting".into(),
        ..PairStatus::default()
    }));
    let stopping = Arc::new(AtomicBool::new(false));
    // Clone requests reach the link thread a backup starts when it goes live.
    let (clone_cmd_tx, clone_cmd_rx) = crossbeam_channel::bounded(1);
    serve_status(
        &cfg.control,
        board.clone(),
        stopping.clone(),
        Some(clone_cmd_tx),
    )
    .with_context(|| format!("opening the control socket {}", cfg.control.display()))?;
    let listener =
        TcpListener::bind(listen).with_context(|| format!("listening on {listen} (--listen)"))?;
    let cloned = if from_clone {
        eprintln!("twinvm backup: waiting for a clone on {listen}");
        let expect = crate::clone::receiver::ReceiverExpect {
            vm: cfg.vm.clone(),
            guest: machine::header_for(&guest.vm, 0, 0, guest.net.as_ref().map(|n| n.mac)),
        };
        let mut build = |header: &LogHeader| {
            machine::build(
                &guest.vm,
                header.boot_unix_secs,
                guest.net.as_ref().map(|n| n.mac),
            )
            .map_err(|e| e.to_string())
        };
        let received = crate::clone::receiver::receive_clone(
            &listener, &cfg.key, &expect, &mut build, &stopping,
        )
        .context("receiving the clone")?;
        cfg.generation = received.generation;
        board.lock().unwrap_or_else(|p| p.into_inner()).generation = received.generation;
        Some(received)
    } else {
        None
    };
    eprintln!("twinvm backup: waiting for the primary on {listen}");

    let kicker = Kicker::new();
    // The NIC is muted until go-live, but the TAP is opened now: attaching
    // takes a moment before frames flow, which a failover should not wait for.
    let tap = open_tap(guest.net.as_ref(), &kicker)?;
    let (control_tx, control_rx) = crossbeam_channel::bounded(16);
    let _signals = StopOnSignal::install(control_tx.clone(), kicker.clone())
        .context("installing signal handlers")?;
    let (news_tx, news_rx) = crossbeam_channel::bounded(4);
    let (main_tx, main_rx) = crossbeam_channel::bounded(4);
    let (live_tx, live_rx) = crossbeam_channel::unbounded();
    let queued = Arc::new(AtomicU64::new(0));
    let shadow = Arc::new(Mutex::new(ShadowOutputs::new(OutputBounds {
        max_bytes: 128 << 20,
        max_items: 131_072,
    })));
    let guest_ip = Arc::new(Mutex::new(None));
    let landmark = Arc::new(AtomicU64::new(0));
    let (arbiter_tx, verdict_rx) =
        spawn_arbiter_client(cfg.arbiter.clone()).context("starting the arbiter client")?;
    let link_cfg = cfg.clone();
    // The clone is applied: the primary may open the logging channel.
    let cloned = match cloned {
        Some(c) => {
            let crate::clone::receiver::Received {
                vm,
                platform,
                snapshot,
                pending,
                ..
            } = c;
            pending.confirm().context("confirming the clone")?;
            Some((vm, platform, snapshot))
        }
        None => None,
    };
    let ours = machine::header_for(&guest.vm, 0, 0, guest.net.as_ref().map(|n| n.mac));
    let survivor = Arc::new(AtomicBool::new(false));
    let start_landmark = cloned.as_ref().map_or(0, |c| c.2.landmark);
    let link_thread = {
        let survivor = survivor.clone();
        let (board, stopping, shadow, queued, landmark, control_tx, kicker) = (
            board.clone(),
            stopping.clone(),
            shadow.clone(),
            queued.clone(),
            landmark.clone(),
            control_tx.clone(),
            kicker.clone(),
        );
        thread::Builder::new()
            .name("twinvm-ft-link".into())
            .spawn(move || {
                let pump = BackupPump {
                    clock,
                    cfg: link_cfg,
                    link: None,
                    stream: None,
                    edge: LinkEdge::default(),
                    socket_rx: None,
                    arbitration: Arbitration {
                        failover: None,
                        arbiter_tx,
                    },
                    decoder: None,
                    live_tx: Some(live_tx),
                    queued,
                    unacked: VecDeque::new(),
                    shadow,
                    verdict_rx,
                    main_rx,
                    news_tx,
                    engine_handle: EngineHandle { control_tx, kicker },
                    stopping,
                    board,
                    landmark,
                    ours,
                    done: None,
                    last_replayed: 0,
                    start_landmark,
                    survivor,
                };
                pump.run(listener)
            })
            .context("starting the link thread")?
    };

    // The VM is built from the primary's header: its boot time and host CPU.
    let header = match news_rx.recv() {
        Ok(LinkNews::Hello(header)) => header,
        Ok(LinkNews::Done { code, message }) => {
            stopping.store(true, Ordering::Relaxed);
            let _ = link_thread.join();
            if code == EXIT_ERROR {
                bail!("{message}");
            }
            eprintln!("twinvm backup: {message}");
            return Ok(code);
        }
        Ok(LinkNews::Promote { .. }) | Err(_) => bail!("the link thread ended before a Hello"),
    };
    let host_cpu = match cfg.host_cpu {
        Some(cpu) if cpu != header.host_cpu => {
            tracing::warn!(
                "running on host CPU {cpu}, the primary on CPU {}: a guest that reads CPUID in \
                 user mode would see another APIC ID (the digests would report it)",
                header.host_cpu
            );
            cpu
        }
        _ => header.host_cpu,
    };
    let net_mac = guest.net.as_ref().map(|n| n.mac);
    let (vm, platform, snapshot) = match cloned {
        Some((vm, platform, snapshot)) => (vm, platform, Some(snapshot)),
        None => {
            let (vm, platform) = machine::build(&guest.vm, header.boot_unix_secs, net_mac)
                .with_context(|| format!("building the VM for {}", guest.vm.kernel_name))?;
            (vm, platform, None)
        }
    };
    let mut engine = Engine::new(
        vm,
        platform,
        Connections {
            inputs: Inputs {
                control: control_rx,
                serial: None,
                net: None,
            },
            outputs: Box::new(ShadowFeed {
                shadow: shadow.clone(),
                origin: clock.0,
                guest_ip: guest_ip.clone(),
                stopped: stopping.clone(),
            }),
            kicker: kicker.clone(),
        },
        Role::Replay(Schedule::new(Box::new(LiveSource::new(live_rx, queued)))),
        RecordSettings {
            sync_bound: cfg.sync_bound,
            tick_deferral: cfg.tick_deferral,
            ..RecordSettings::default()
        },
        Some(host_cpu),
    )
    .context("setting up the engine")?;
    if let Some(snapshot) = &snapshot {
        engine
            .resume_from_clone(snapshot)
            .context("resuming from the clone's snapshot")?;
    }
    engine.set_test_perturbation(guest.test_perturbation);
    let counter = engine.landmark_counter();
    let mut console = Some(guest.console);
    let mut live = false;
    let outcome = loop {
        let mirror = LandmarkMirror::start(counter.clone(), landmark.clone());
        let result = engine.run();
        drop(mirror);
        landmark.store(engine.landmark(), Ordering::Relaxed);
        let news = match result {
            Ok(report) => match report.stop {
                Stop::LogExhausted { landmark } => MainNews::LogExhausted { landmark },
                Stop::Ended {
                    log_end: true,
                    ending,
                } => MainNews::Ended {
                    code: EXIT_OK,
                    message: format!("the primary's guest ended ({ending:?}); so did the replica"),
                },
                Stop::Ended { ending, .. } => MainNews::Ended {
                    code: if live { EXIT_OK } else { EXIT_STOPPED },
                    message: format!("the guest ended ({ending:?})"),
                },
            },
            Err(RunError::Divergence { landmark, detail }) => {
                MainNews::Diverged { landmark, detail }
            }
            Err(e) => {
                let _ = main_tx.send(MainNews::Ended {
                    code: EXIT_ERROR,
                    message: format!("the replica failed: {e}"),
                });
                break Err(anyhow!(e).context("replaying the primary's log"));
            }
        };
        let exhausted = matches!(news, MainNews::LogExhausted { .. });
        let _ = main_tx.send(news);
        if !exhausted {
            break Ok(());
        }
        // The log ran out: go live if the arbiter agreed, else stop.
        match news_rx.recv() {
            Ok(LinkNews::Promote { outputs }) => {
                let mut world = ConsoleAndNet {
                    console: console.take().expect("promoted once"),
                    net: tap.clone().map(tap_sender),
                };
                for output in outputs {
                    crate::replay::engine::OutputSink::emit(&mut world, engine.landmark(), output)
                        .context("emitting the outputs the primary had not released")?;
                }
                let net = tap.as_ref().map(|t| {
                    // Frames that came while muted were the primary's to take.
                    while t.try_recv().is_some() {}
                    t.rx().clone()
                });
                // From here this side is a primary running alone: its
                // outputs go through a primary's link thread, which can
                // clone it (`twinvm clone`).
                // Before the survivor's pump publishes: from here the link
                // thread leaves the status board to it.
                survivor.store(true, Ordering::SeqCst);
                let mut survivor_cfg = cfg.clone();
                survivor_cfg.generation =
                    board.lock().unwrap_or_else(|p| p.into_inner()).generation;
                let outputs = spawn_survivor_pump(SurvivorSetup {
                    clock,
                    cfg: survivor_cfg,
                    log_header: header.encode().context("encoding the log header")?,
                    host_cpu,
                    console: world.console,
                    tap: tap.clone(),
                    engine_handle: EngineHandle {
                        control_tx: control_tx.clone(),
                        kicker: kicker.clone(),
                    },
                    stopping: stopping.clone(),
                    board: board.clone(),
                    landmark: counter.clone(),
                    memory: engine.guest_memory(),
                    commands: clone_cmd_rx.clone(),
                })?;
                engine
                    .promote(Role::Live, Box::new(outputs), None, net)
                    .context("going live")?;
                live = true;
                eprintln!("twinvm backup: live");
                announce(
                    &tap,
                    net_mac,
                    *guest_ip.lock().unwrap_or_else(|p| p.into_inner()),
                );
            }
            Ok(LinkNews::Done { code, message }) => {
                stopping.store(true, Ordering::Relaxed);
                let _ = link_thread.join();
                eprintln!("twinvm backup: {message}");
                return Ok(code);
            }
            Ok(LinkNews::Hello(_)) | Err(_) => {
                break Err(anyhow!("the link thread ended without a verdict"))
            }
        }
    };
    let (code, message) = match news_rx.recv() {
        Ok(LinkNews::Done { code, message }) => (code, message),
        _ => (EXIT_ERROR, "the link thread ended without a verdict".into()),
    };
    stopping.store(true, Ordering::Relaxed);
    let _ = link_thread.join();
    match outcome {
        // The link thread decided first (lost the arbitration): the
        // engine's error came from being stopped.
        Err(e) if code != EXIT_ERROR => tracing::debug!("the engine stopped with: {e:#}"),
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    if code == EXIT_ERROR {
        bail!("{message}");
    }
    eprintln!("twinvm backup: {message}");
    Ok(code)
}

/// The TAP as the live engine's frame sender.
fn tap_sender(tap: Arc<TapBackend>) -> FrameSender {
    Box::new(move |frame: &[u8]| {
        if let Err(e) = tap.send(frame) {
            tracing::warn!("sending a frame on {}: {e}", tap.name());
        }
    })
}

/// Tell the LAN the guest's MAC is here now (switches learn the new port).
fn announce(tap: &Option<Arc<TapBackend>>, mac: Option<[u8; 6]>, ip: Option<[u8; 4]>) {
    let (Some(tap), Some(mac)) = (tap, mac) else {
        return;
    };
    let Some(ip) = ip else {
        tracing::warn!(
            "the guest's IP address is unknown (it sent no IPv4 frame yet): no gratuitous ARP for {}",
            format_mac(mac)
        );
        return;
    };
    let tap = tap.clone();
    let _ = thread::Builder::new()
        .name("twinvm-garp".into())
        .spawn(move || {
            let frame = gratuitous_arp(mac, ip);
            for wait in ARP_ANNOUNCEMENTS {
                thread::sleep(wait);
                if let Err(e) = tap.send(&frame) {
                    tracing::warn!("gratuitous ARP on {}: {e}", tap.name());
                }
            }
        });
}

/// Copies the engine's landmark for the link thread while a run goes on.
struct LandmarkMirror {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LandmarkMirror {
    fn start(from: Arc<AtomicU64>, to: Arc<AtomicU64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("twinvm-ft-progress".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(5));
                }
            })
            .ok();
        LandmarkMirror { stop, thread }
    }
}

impl Drop for LandmarkMirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The link thread's state.
struct BackupPump {
    clock: Clock,
    cfg: PairConfig,
    link: Option<BackupLink>,
    stream: Option<TcpStream>,
    edge: LinkEdge,
    socket_rx: Option<Receiver<SocketEvent>>,
    arbitration: Arbitration,
    decoder: Option<RecordDecoder>,
    /// To the replaying engine; dropped when no more log will come.
    live_tx: Option<Sender<LiveItem>>,
    /// Bytes queued for the engine (`log::record_cost`).
    queued: Arc<AtomicU64>,
    /// Watermarks queued but not yet acknowledged (queue over its bound).
    unacked: VecDeque<u64>,
    shadow: Arc<Mutex<ShadowOutputs<Output>>>,
    verdict_rx: Receiver<Verdict>,
    main_rx: Receiver<MainNews>,
    news_tx: Sender<LinkNews>,
    engine_handle: EngineHandle,
    stopping: Arc<AtomicBool>,
    board: StatusBoard,
    landmark: Arc<AtomicU64>,
    /// This backup's guest, to compare with the primary's Hello.
    ours: LogHeader,
    done: Option<(i32, String)>,
    last_replayed: u64,
    /// The landmark the primary's log starts at (a clone's cut, else 0).
    start_landmark: u64,
    /// Live, with a survivor's link thread publishing the status.
    survivor: Arc<AtomicBool>,
}

impl BackupPump {
    fn run(mut self, listener: TcpListener) {
        let (code, message) = match self.accept_primary(&listener).and_then(|()| self.pump()) {
            Ok(done) => done,
            Err(e) => (EXIT_ERROR, format!("{e:#}")),
        };
        self.stopping.store(true, Ordering::Relaxed);
        if code != EXIT_OK {
            self.engine_handle.send(Control::Stop);
        }
        self.live_tx = None;
        let _ = self.news_tx.send(LinkNews::Done { code, message });
    }

    /// Accept connections until one completes the handshake and its Hello
    /// names this VM, generation and guest; strangers are refused and
    /// logged, and the backup keeps waiting.
    fn accept_primary(&mut self, listener: &TcpListener) -> Result<()> {
        listener
            .set_nonblocking(true)
            .context("setting the listener non-blocking")?;
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                bail!("stopped while waiting for the primary");
            }
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e).context("accepting the primary's connection"),
            };
            stream.set_nonblocking(false)?;
            stream.set_nodelay(true)?;
            stream.set_write_timeout(Some(WRITE_SLICE))?;
            let link = BackupLink::new(
                self.cfg.link,
                &self.cfg.key,
                ExpectedHello {
                    vm: self.cfg.vm.clone(),
                    generation: self.cfg.generation,
                },
                self.clock.now(),
            )
            .context("setting up the logging channel")?;
            let (tx, rx) = crossbeam_channel::unbounded();
            spawn_socket_reader(stream.try_clone()?, tx)?;
            self.link = Some(link);
            self.stream = Some(stream);
            self.edge.reset();
            self.socket_rx = Some(rx);
            match self.await_hello()? {
                Some(header) => {
                    self.decoder = Some(RecordDecoder::new(&header));
                    let _ = self.news_tx.send(LinkNews::Hello(header));
                    return Ok(());
                }
                None => {
                    tracing::warn!("connection from {peer} did not become our primary; waiting on");
                    if let Some(s) = self.stream.take() {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    self.link = None;
                }
            }
        }
    }

    /// Drive the handshake to the Hello; Some(header) once accepted.
    fn await_hello(&mut self) -> Result<Option<LogHeader>> {
        loop {
            self.transmit();
            let link = self.link.as_mut().expect("a link is being set up");
            while let Some(event) = link.poll_event() {
                match event {
                    BackupEvent::HelloReceived { start_landmark, .. }
                        if start_landmark != self.start_landmark =>
                    {
                        let reason = format!(
                            "its log starts at landmark {start_landmark}, this backup's state is at {}",
                            self.start_landmark
                        );
                        eprintln!("twinvm backup: refusing a primary: {reason}");
                        link.refuse_hello(&reason)?;
                        continue;
                    }
                    BackupEvent::HelloReceived { log_header, .. } => {
                        let header = match LogHeader::decode(&log_header) {
                            Ok(h) => h,
                            Err(e) => {
                                link.refuse_hello(&format!("its log header is malformed: {e}"))?;
                                continue;
                            }
                        };
                        let differences = header.differences_from(&self.ours);
                        if !differences.is_empty() {
                            let reason = format!(
                                "it runs another guest than this backup: {}",
                                differences.join("; ")
                            );
                            eprintln!("twinvm backup: refusing a primary: {reason}");
                            link.refuse_hello(&reason)?;
                            continue;
                        }
                        link.accept_hello(self.clock.now())
                            .context("accepting the Hello")?;
                        self.arbitration.failover = Some(Failover::backup(
                            FailoverConfig::new(&self.cfg.vm, self.cfg.generation, &self.cfg.node),
                            self.clock.now(),
                        ));
                        self.transmit();
                        return Ok(Some(header));
                    }
                    BackupEvent::Closed { reason } => {
                        tracing::warn!(
                            "a connection ended before its Hello was accepted: {reason}"
                        );
                        self.flush();
                        return Ok(None);
                    }
                    BackupEvent::PeerSuspected { silent_for } => {
                        tracing::warn!(
                            "a connection went silent for {silent_for:?} before its Hello"
                        );
                        self.flush();
                        return Ok(None);
                    }
                    other => bail!("{other:?} before the Hello"),
                }
            }
            self.wait_socket(Duration::from_millis(50))?;
        }
    }
}

impl BackupPump {
    fn link(&mut self) -> &mut BackupLink {
        self.link.as_mut().expect("established")
    }

    fn pump(&mut self) -> Result<(i32, String)> {
        loop {
            let open = self.link.as_ref().is_some_and(|l| !l.is_closed());
            if let Some(done) = self.turn()? {
                self.flush();
                return Ok(done);
            }
            // A write that lost the connection is the next turn's news, now.
            if open && self.link.as_ref().is_some_and(BackupLink::is_closed) {
                continue;
            }
            self.wait()?;
        }
    }

    /// One turn between waits: what the last wake-up brought is handled,
    /// and what that produced (the ack of records just received) is written
    /// before the thread waits again. An ack decided after the turn's write
    /// waited for the next wake-up: a 2 ms timer unless more bytes came, which
    /// held every output of a one-request-at-a-time client for 2 ms.
    fn turn(&mut self) -> Result<Option<(i32, String)>> {
        self.handle_events()?;
        self.ack_what_fits()?;
        self.report_replayed();
        self.perform_actions()?;
        self.transmit();
        self.publish_status();
        Ok(self.done.take())
    }

    fn transmit(&mut self) {
        if let (Some(link), Some(stream)) = (self.link.as_mut(), self.stream.as_mut()) {
            self.edge.transmit(link, stream, self.clock.now());
        }
    }

    /// The last words on this connection, for up to the peer timeout.
    fn flush(&mut self) {
        if let (Some(link), Some(stream)) = (self.link.as_mut(), self.stream.as_mut()) {
            let limit = self.cfg.link.peer_timeout;
            self.edge.flush(link, stream, &self.clock, limit);
        }
    }

    fn judge_link(&mut self) {
        if let Some(link) = self.link.as_mut() {
            self.edge.judge(
                link,
                self.socket_rx.as_ref(),
                self.stream.as_ref(),
                &self.clock,
            );
        }
    }

    /// Acknowledge queued watermarks while the replay queue is within its
    /// bound (receipt is what an ack means; the bound keeps memory finite).
    fn ack_what_fits(&mut self) -> Result<()> {
        while let Some(&w) = self.unacked.front() {
            if self.queued.load(Ordering::Relaxed) > REPLAY_QUEUE_BYTES {
                break;
            }
            self.unacked.pop_front();
            tracing::trace!(watermark = w, "backup: ack");
            if self.link.as_ref().is_some_and(|l| !l.is_closed()) {
                self.link()
                    .ack_through(w)
                    .context("acknowledging the log")?;
            }
        }
        Ok(())
    }

    fn report_replayed(&mut self) {
        let replayed = self.landmark.load(Ordering::Relaxed);
        if replayed > self.last_replayed {
            self.last_replayed = replayed;
            if let Some(link) = self.link.as_mut() {
                if !link.is_closed() {
                    let _ = link.set_replayed(replayed);
                }
            }
        }
    }

    /// Decode log bytes into records for the engine, then the watermark.
    fn queue_log(&mut self, bytes: &[u8], watermark: u64) -> Result<(), String> {
        let (Some(decoder), Some(tx)) = (self.decoder.as_mut(), self.live_tx.as_ref()) else {
            return Ok(());
        };
        decoder.push(bytes);
        loop {
            match decoder.next_record() {
                Ok(Some(record)) => {
                    self.queued
                        .fetch_add(record_cost(&record), Ordering::Relaxed);
                    if tx.send(LiveItem::Record(record)).is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(format!("the primary's log is corrupt: {e}")),
            }
        }
        let _ = tx.send(LiveItem::Watermark(watermark));
        self.unacked.push_back(watermark);
        Ok(())
    }

    fn handle_events(&mut self) -> Result<()> {
        while let Some(event) = self.link.as_mut().and_then(|l| l.poll_event()) {
            match event {
                BackupEvent::Records {
                    log_bytes,
                    watermark,
                } => {
                    tracing::trace!(watermark, bytes = log_bytes.len(), "backup: records");
                    if let Err(reason) = self.queue_log(&log_bytes, watermark) {
                        // Authenticated but undecodable: a broken primary. Stop
                        // taking its log; the failover machine decides.
                        eprintln!("twinvm backup: {reason}");
                        self.link().close(&reason);
                    }
                }
                BackupEvent::Released { released } => self
                    .shadow
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .on_released(released),
                BackupEvent::Bye { reason } => {
                    self.failover_event(FailoverEvent::Bye { reason });
                }
                BackupEvent::PeerSuspected { silent_for } => {
                    eprintln!(
                        "twinvm backup: primary lost (silent for {} ms); asking the arbiter",
                        silent_for.as_millis()
                    );
                    self.failover_event(FailoverEvent::PeerSuspected);
                }
                BackupEvent::Closed { reason } => {
                    eprintln!("twinvm backup: primary lost ({reason}); asking the arbiter");
                    self.failover_event(FailoverEvent::LinkClosed {
                        reason: reason.to_string(),
                    });
                }
                BackupEvent::HelloReceived { .. } => {
                    self.link().close("a second Hello");
                }
            }
        }
        Ok(())
    }

    fn failover_event(&mut self, event: FailoverEvent) {
        self.arbitration.handle(event, self.clock.now());
    }

    fn perform_actions(&mut self) -> Result<()> {
        for action in self.arbitration.actions(self.clock.now()) {
            match action {
                Action::FinishLog => {
                    // Nothing more can come: let the engine replay what it
                    // has to the end (it reports LogExhausted there).
                    if let Some(link) = self.link.as_mut() {
                        if !link.is_closed() {
                            link.close("the backup stops following the primary");
                        }
                    }
                    self.shadow
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .log_finished();
                    self.unacked.clear();
                    self.live_tx = None;
                }
                Action::Promote { landmark } => {
                    eprintln!(
                        "twinvm backup: going live at landmark {landmark} (arbiter: won generation {})",
                        self.cfg.generation
                    );
                    let outputs = self
                        .shadow
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take_for_go_live();
                    // The board says `live` before the main thread hears of
                    // it: once it has, the survivor's pump owns the board
                    // and this thread publishes no more (without this the
                    // board could keep `asking-arbiter` for good).
                    self.publish_status();
                    let _ = self.news_tx.send(LinkNews::Promote { outputs });
                }
                Action::Stop { exit_code, message } => {
                    self.done = Some(stop_for(&self.engine_handle, exit_code, message));
                }
                other => tracing::error!("primary action {other:?} on the backup; ignored"),
            }
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        let now = self.clock.now();
        let landmark = self.landmark.load(Ordering::Relaxed);
        let mut b = self.board.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the board's lock: the survivor's pump is started
        // after the flag is set, so its `live` is never overwritten with
        // this link's last state (seen: a clone live and serving, its
        // status stuck at asking-arbiter).
        if self.survivor.load(Ordering::SeqCst) {
            return;
        }
        self.arbitration.publish(&mut b);
        b.landmark = landmark;
        if let Some(link) = &self.link {
            let st = link.status(now);
            b.watermark = st.received_watermark;
            b.acked = st.acked_watermark;
            b.released = st.released;
            b.lag_landmarks = st.received_watermark.saturating_sub(landmark);
            b.lag_ms = st.lag_ns as f64 / 1e6;
            b.log_bytes = st.stats.log_bytes;
            b.peer_connected = st.established && st.closed.is_none();
        }
        if let Some(decoder) = &self.decoder {
            b.page_cache = Some((&decoder.page_stats()).into());
        }
        b.held_outputs = self.shadow.lock().map(|s| s.len() as u64).unwrap_or(0);
        b.uptime_s = now.as_secs_f64();
    }

    /// Bytes or the end of the connection, for at most `timeout`.
    fn wait_socket(&mut self, timeout: Duration) -> Result<()> {
        let Some(rx) = &self.socket_rx else {
            thread::sleep(timeout);
            return Ok(());
        };
        let now = self.clock.now();
        let timeout = self.edge.plan_wait(now, now + timeout);
        let received = rx.recv_timeout(timeout);
        if let Some(link) = self.link.as_mut() {
            self.edge.woke(link, &self.clock);
        }
        match received {
            Ok(event) => {
                let now = self.clock.now();
                apply_socket_event(self.link(), Ok(event), now);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                self.socket_rx = None;
            }
        }
        self.judge_link();
        Ok(())
    }

    /// Sleep until something arrives or a timer is due.
    fn wait(&mut self) -> Result<()> {
        let now = self.clock.now();
        // Short while acks wait for the replay queue to drain.
        let mut deadline = now
            + if self.unacked.is_empty() {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(2)
            };
        for t in [
            self.link.as_ref().and_then(|l| l.poll_timeout()),
            self.arbitration.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        {
            deadline = deadline.min(t);
        }
        let timeout = self.edge.plan_wait(now, deadline);
        let socket_rx = self.socket_rx.clone();
        let (verdict_rx, main_rx) = (self.verdict_rx.clone(), self.main_rx.clone());
        let mut sel = Select::new();
        let socket = socket_rx.as_ref().map(|rx| sel.recv(rx));
        let verdict = sel.recv(&verdict_rx);
        let main = sel.recv(&main_rx);
        let selected = sel.select_timeout(timeout);
        if selected.is_err() {
            tracing::trace!(
                unacked = self.unacked.len(),
                waited_us = timeout.as_micros() as u64,
                "backup: wait timed out"
            );
        }
        if let Some(link) = self.link.as_mut() {
            self.edge.woke(link, &self.clock);
        }
        if let Ok(op) = selected {
            let index = op.index();
            if Some(index) == socket {
                let rx = socket_rx.as_ref().expect("selected");
                match op.recv(rx) {
                    Ok(event) => {
                        let now = self.clock.now();
                        apply_socket_event(self.link(), Ok(event), now);
                    }
                    Err(_) => self.socket_rx = None,
                }
            } else if index == verdict {
                if let Ok(v) = op.recv(&verdict_rx) {
                    self.failover_event(FailoverEvent::ArbiterVerdict(v));
                }
            } else if index == main {
                match op.recv(&main_rx) {
                    Ok(MainNews::LogExhausted { landmark }) => {
                        self.failover_event(FailoverEvent::LogExhausted { landmark })
                    }
                    Ok(MainNews::Diverged { landmark, detail }) => {
                        eprintln!(
                            "twinvm backup: this replica diverged from the primary at landmark {landmark}: {detail}"
                        );
                        if let Some(link) = self.link.as_mut() {
                            link.send_diverged(landmark, &detail);
                        }
                        self.failover_event(FailoverEvent::Diverged { landmark, detail });
                        if self.arbitration.failover.is_none() {
                            self.done = Some((EXIT_DIVERGED, "diverged".into()));
                        }
                    }
                    Ok(MainNews::Ended { code, message }) => {
                        self.done = Some((code, message));
                    }
                    Err(_) => {}
                }
            }
        }
        self.judge_link();
        Ok(())
    }
}

#[cfg(test)]
mod turn_tests;
