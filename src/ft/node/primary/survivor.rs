//! A backup gone live runs on as a primary without a backup: its outputs go
//! through a primary's link thread running alone, which `twinvm clone` can
//! make whole again.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::thread;

use anyhow::{Context, Result};
use crossbeam_channel::Receiver;

use super::{CloneHost, PrimaryPump, RateMeter, ENGINE_QUEUE};
use crate::ft::link::{Hello, PrimaryLink};
use crate::ft::node::feed::OutputFeed;
use crate::ft::node::status::{CloneCommand, StatusBoard};
use crate::ft::node::{spawn_arbiter_client, Arbitration, Clock, EngineHandle, PairConfig};
use crate::ft::output::{HeldOutputs, OutputBounds};
use crate::net::tap::TapBackend;

/// A backup that went live hands its outputs to a primary's link thread
/// running alone, so that it can be cloned like a primary whose backup was
/// lost (`twinvm clone`). What that thread needs:
pub(in crate::ft::node) struct SurvivorSetup {
    pub clock: Clock,
    pub cfg: PairConfig,
    /// The VM's encoded log header (the clone's Hello carries it).
    pub log_header: Vec<u8>,
    pub host_cpu: u32,
    pub console: Box<dyn std::io::Write + Send>,
    pub tap: Option<Arc<TapBackend>>,
    pub engine_handle: EngineHandle,
    pub stopping: Arc<AtomicBool>,
    pub board: StatusBoard,
    pub landmark: Arc<AtomicU64>,
    pub memory: vm_memory::GuestMemoryMmap,
    /// `clone HOST:PORT` from the control socket.
    pub commands: Receiver<CloneCommand>,
}

/// Start the link thread of a survivor (see [`SurvivorSetup`]): returns
/// the sink the live engine's outputs go to (in order with a clone's log)
/// (which the caller hands the engine).
pub(in crate::ft::node) fn spawn_survivor_pump(setup: SurvivorSetup) -> Result<OutputFeed> {
    let SurvivorSetup {
        clock,
        cfg,
        log_header,
        host_cpu,
        console,
        tap,
        engine_handle,
        stopping,
        board,
        landmark,
        memory,
        commands,
    } = setup;
    // Requests made before the backup went live were not answered.
    while commands.try_recv().is_ok() {}
    {
        let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
        b.role = "primary".into();
        b.detail = "live after a failover, running alone: no backup, outputs are not held".into();
    }
    let mut link = PrimaryLink::new(
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
    .context("setting up the survivor's (closed) logging channel")?;
    link.close("a survivor runs alone until it is cloned");
    let (engine_tx, engine_rx) = crossbeam_channel::bounded(ENGINE_QUEUE);
    let (arbiter_tx, verdict_rx) =
        spawn_arbiter_client(cfg.arbiter.clone()).context("starting the arbiter client")?;
    // The vCPU thread of a survivor talks to the backup's link thread; this
    // one hears nothing from it and tells it nothing.
    let (news_tx, _) = crossbeam_channel::bounded(4);
    let pump = PrimaryPump {
        clock,
        cfg,
        link,
        stream: None,
        edge: Default::default(),
        arbitration: Arbitration {
            failover: None,
            arbiter_tx,
        },
        held: HeldOutputs::new(OutputBounds::default()),
        console,
        tap,
        alone: true,
        holding: false,
        log_dropped: true,
        pending: None,
        engine_rx,
        socket_rx: crossbeam_channel::never(),
        verdict_rx,
        main_rx: crossbeam_channel::never(),
        news_tx,
        engine_handle,
        stopping: stopping.clone(),
        board,
        landmark,
        guest_ended: None,
        done: None,
        rate: RateMeter::default(),
        clone: CloneHost {
            commands,
            engine_tx: engine_tx.clone(),
            memory,
            log_header,
            host_cpu,
            job: None,
            status: None,
            last_generation: 0,
        },
    };
    thread::Builder::new()
        .name("twinvm-ft-survivor".into())
        .spawn(move || pump.run())
        .context("starting the survivor's link thread")?;
    Ok(OutputFeed {
        tx: engine_tx,
        stopped: stopping,
    })
}
