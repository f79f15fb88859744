//! `twinvm backup`: waits for its primary, replays the primary's log one
//! epoch behind with a muted NIC, keeps its outputs in the shadow until the
//! primary says it released them, and, if the primary is lost and the
//! arbiter agrees, finishes the log and goes live in place.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::feed::ShadowFeed;
use super::primary::{spawn_survivor_pump, SurvivorSetup};
use super::status::{serve_status, PairStatus, StatusBoard};
use super::{
    open_tap, spawn_arbiter_client, Arbitration, Clock, EngineHandle, GuestSetup, LinkEdge,
    PairConfig, EXIT_ERROR, EXIT_OK, EXIT_STOPPED,
};
use crate::ft::output::{OutputBounds, ShadowOutputs};
use crate::net::tap::TapBackend;
use crate::net::{format_mac, gratuitous_arp};
use crate::replay::engine::{
    Connections, ConsoleAndNet, Engine, FrameSender, Inputs, Output, RecordSettings, Role,
    RunError, Stop, StopOnSignal,
};
use crate::replay::log::LogHeader;
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
                header.tick_delivery,
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
    let (live_tx, live_rx) = std::sync::mpsc::channel();
    let queued = Arc::new(AtomicU64::new(0));
    let shadow = Arc::new(Mutex::new(ShadowOutputs::new(OutputBounds {
        max_bytes: 128 << 20,
        max_items: 131_072,
    })));
    let guest_ip = Arc::new(Mutex::new(None));
    let landmark = Arc::new(AtomicU64::new(0));
    let catch_ups = Arc::new(AtomicU64::new(0));
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
        let (board, stopping, shadow, queued, landmark, catch_ups, control_tx, kicker) = (
            board.clone(),
            stopping.clone(),
            shadow.clone(),
            queued.clone(),
            landmark.clone(),
            catch_ups.clone(),
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
                    decoding: None,
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
                    catch_ups,
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
            let (vm, platform) = machine::build(
                &guest.vm,
                header.boot_unix_secs,
                header.tick_delivery,
                net_mac,
            )
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
        Role::Replay(live_schedule(live_rx, queued, shadow.clone())),
        RecordSettings {
            sync_bound: cfg.sync_bound,
            tick_deferral: cfg.tick_deferral,
            sync_budget_percent: cfg.sync_budget_percent,
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
    engine.publish_catch_ups(catch_ups.clone());
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
                {
                    let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
                    survivor_cfg.generation = b.generation;
                    // The reader's cache went with the stream it read; a
                    // clone's stream reports its writer's.
                    b.page_cache = None;
                }
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
    let caught_up = catch_ups.load(Ordering::Relaxed);
    if caught_up > 0 {
        eprintln!(
            "twinvm backup: it fell behind and caught up {caught_up} times (docs/architecture.md, \"Catch-up\")"
        );
    }
    eprintln!("twinvm backup: {message}");
    Ok(code)
}

/// The backup's schedule over the primary's stream. It catches up when it
/// falls behind (docs/architecture.md, "Catch-up"), but never past
/// outputs the primary may not have let out: their copies must be in the
/// shadow if this side goes live.
fn live_schedule(
    live_rx: std::sync::mpsc::Receiver<LiveItem>,
    queued: Arc<AtomicU64>,
    shadow: Arc<Mutex<ShadowOutputs<Output>>>,
) -> Schedule {
    let mut schedule = Schedule::new(Box::new(LiveSource::new(live_rx, queued)));
    schedule.set_catch_up(Some(Box::new(move || {
        shadow.lock().unwrap_or_else(|p| p.into_inner()).released()
    })));
    schedule
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

mod pump;

use pump::BackupPump;
