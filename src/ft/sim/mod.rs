//! A deterministic discrete-event simulation of the whole pair: primary and
//! backup (links, failover machines, output queues, guest), one TCP
//! connection (latency, retransmission stalls, partitions, resets, FIN on
//! close), the arbiter (`StateMachine` itself, with outages), and faults at
//! random times: crashes and kills of either side, corrupted bytes, a slow
//! or diverging backup, the guest powering off.
//!
//! Checked after every event: at most one side ever emits outputs that the
//! other did not acknowledge (no split brain); the backup never holds a
//! watermark beyond what the primary sent, never replays past it, and its
//! replica's state equals the primary's at every landmark; the primary's
//! acks never exceed the backup's; every queue stays within its bound.
//! Checked at the end: the world's outputs, deduplicated by (landmark,
//! index), are a gap-free, in-order prefix of the surviving timeline;
//! duplicates only after a promotion and only above the released marker the
//! backup had heard of; a surviving side keeps producing output; a power-off
//! loses nothing.

mod guest;
mod net;
mod nodes;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ft::link::LinkConfig;
use crate::ft::output::OutputBounds;
use guest::Out;
use net::{ArbiterModel, Ev, Net, Queue, Side};
use nodes::{BackupMode, BackupNode, Emission, Env, PrimaryMode, PrimaryNode, NEVER};

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The host dies: silence, no FIN.
    Crash(Side),
    /// The process dies: the kernel closes the socket.
    Kill(Side),
    Partition(Option<Side>, Duration),
    Reset,
    ArbiterOutage(Duration),
    ArbiterCut(Side, Duration),
    SlowBackup(Duration),
    Corrupt(Side),
    Diverge,
    PowerOff,
}

fn random_fault(rng: &mut StdRng) -> Fault {
    let side = if rng.gen_bool(0.5) {
        Side::Primary
    } else {
        Side::Backup
    };
    match rng.gen_range(0..11) {
        0 | 1 => Fault::Crash(side),
        2 => Fault::Kill(side),
        3 => Fault::Partition(
            [None, Some(side)][rng.gen_range(0..2)],
            ms(rng.gen_range(10..300)),
        ),
        4 => Fault::Reset,
        5 => Fault::ArbiterOutage(ms(rng.gen_range(20..400))),
        6 => Fault::ArbiterCut(side, ms(rng.gen_range(20..300))),
        7 => Fault::SlowBackup(ms(rng.gen_range(50..400))),
        8 => Fault::Corrupt(side),
        9 => Fault::Diverge,
        _ => Fault::PowerOff,
    }
}

pub struct Outcome {
    pub promoted: bool,
    pub primary_alone: bool,
    pub both_ended_cleanly: bool,
    pub outputs_seen: usize,
    pub duplicates: usize,
    /// From the primary's crash to the first output of the promoted backup.
    pub failover_gap: Option<Duration>,
    pub arbiter_requests: u64,
    /// Times the primary's vCPU waited: log window full, held outputs full.
    pub window_waits: u64,
    pub held_waits: u64,
    /// Times the replay waited for the released marker (shadow full).
    pub shadow_waits: u64,
}

struct Sim {
    now: Duration,
    q: Queue,
    rng: StdRng,
    net: Net,
    arbiter: ArbiterModel,
    primary: PrimaryNode,
    backup: BackupNode,
    world: Vec<Emission>,
    trace: VecDeque<String>,
    faults: Vec<(Duration, Fault)>,
    config: LinkConfig,
    held_bounds: OutputBounds,
    shadow_bounds: OutputBounds,
    crashed_primary_at: Option<Duration>,
}

impl Sim {
    fn new(seed: u64, faults: Vec<(Duration, Fault)>) -> Sim {
        // Small bounds, so that chunking, the window and both output bounds
        // are exercised (the shadow's is even below the held one on purpose:
        // the replay waiting for the released marker must not deadlock).
        let config = LinkConfig {
            max_frame_bytes: 1024,
            window_bytes: 2048,
            max_push_bytes: 8 << 10,
            ..LinkConfig::default()
        };
        let held_bounds = OutputBounds {
            max_bytes: 2048,
            max_items: 64,
        };
        let shadow_bounds = OutputBounds {
            max_bytes: 1024,
            max_items: 32,
        };
        let mut q = Queue::default();
        for (i, (at, _)) in faults.iter().enumerate() {
            q.at(*at, Ev::Fault(i));
        }
        Sim {
            now: Duration::ZERO,
            q,
            rng: StdRng::seed_from_u64(seed),
            net: Net::new(),
            arbiter: ArbiterModel::new(nodes::VM, nodes::GENERATION),
            primary: PrimaryNode::new(config, held_bounds, seed),
            backup: BackupNode::new(config, shadow_bounds, seed),
            world: Vec::new(),
            trace: VecDeque::new(),
            faults,
            config,
            held_bounds,
            shadow_bounds,
            crashed_primary_at: None,
        }
    }

    fn env(&mut self) -> (Env<'_>, &mut PrimaryNode, &mut BackupNode) {
        (
            Env {
                now: self.now,
                q: &mut self.q,
                rng: &mut self.rng,
                net: &mut self.net,
                arbiter: &mut self.arbiter,
                world: &mut self.world,
                trace: &mut self.trace,
            },
            &mut self.primary,
            &mut self.backup,
        )
    }

    fn run(&mut self, end: Duration) -> Result<(), String> {
        let mut same_instant = 0u32;
        loop {
            let next = self
                .q
                .next_time()
                .unwrap_or(NEVER)
                .min(self.primary.next_wake())
                .min(self.backup.next_wake());
            if next > end {
                self.now = end;
                return Ok(());
            }
            same_instant = if next <= self.now {
                same_instant + 1
            } else {
                0
            };
            if same_instant > 10_000 {
                return Err("livelock: no progress at one instant".into());
            }
            self.now = self.now.max(next);
            while let Some(ev) = self.q.pop_due(self.now) {
                self.event(ev)?;
            }
            let (mut env, primary, backup) = self.env();
            primary.service(&mut env)?;
            backup.service(&mut env, &primary.truth)?;
            self.check_step()?;
        }
    }

    fn event(&mut self, ev: Ev) -> Result<(), String> {
        let (mut env, primary, backup) = self.env();
        match ev {
            Ev::Deliver { to, bytes } => {
                if !env.net.may_deliver(to) {
                    return Ok(());
                }
                match to {
                    Side::Primary if primary.alive => primary.on_bytes(&mut env, &bytes),
                    Side::Backup if backup.alive => backup.on_bytes(&mut env, &bytes),
                    _ => {}
                }
            }
            Ev::ConnLost { to, reason } => match to {
                Side::Primary if primary.alive => primary.link.connection_lost(reason),
                Side::Backup if backup.alive => backup.link.connection_lost(reason),
                _ => {}
            },
            Ev::ArbiterApply { from, requester } => {
                env.note(format!("arbiter applies test-and-set by {requester}"));
                env.arbiter
                    .apply(env.q, env.rng, env.now, from, requester)?;
            }
            Ev::ArbiterReply { to, verdict } => {
                env.note(format!("arbiter answers {to:?}: {verdict:?}"));
                let event = crate::ft::failover::FailoverEvent::ArbiterVerdict(verdict);
                match to {
                    Side::Primary if primary.alive => {
                        if let Some(f) = &mut primary.failover {
                            f.handle(event, env.now);
                        }
                    }
                    Side::Backup if backup.alive => {
                        if let Some(f) = &mut backup.failover {
                            f.handle(event, env.now);
                        }
                    }
                    _ => {}
                }
            }
            Ev::Fault(i) => {
                let fault = self.faults[i].1;
                self.fault(fault);
            }
        }
        Ok(())
    }

    fn fault(&mut self, fault: Fault) {
        let now = self.now;
        let (mut env, primary, backup) = self.env();
        env.note(format!("FAULT {fault:?}"));
        match fault {
            Fault::Crash(Side::Primary) => primary.alive = false,
            Fault::Crash(Side::Backup) => backup.alive = false,
            Fault::Kill(side) => {
                match side {
                    Side::Primary => primary.alive = false,
                    Side::Backup => backup.alive = false,
                }
                env.net.fin(env.q, now, side);
            }
            Fault::Partition(side, length) => {
                for to in [Side::Primary, Side::Backup] {
                    if side.is_none_or(|s| s == to) {
                        env.net.partition(to, now + length);
                    }
                }
            }
            Fault::Reset => env.net.reset(env.q, env.rng, now),
            Fault::ArbiterOutage(length) => env.arbiter.outage(now + length),
            Fault::ArbiterCut(side, length) => env.arbiter.cut(side, now + length),
            Fault::SlowBackup(length) => backup.slow_until = now + length,
            Fault::Corrupt(side) => env.net.corrupt_next[side as usize] = true,
            Fault::Diverge => backup.diverge_next = true,
            Fault::PowerOff => {
                if primary.end_at.is_none() {
                    primary.end_at = Some(primary.guest.landmark + 20);
                }
            }
        }
        if matches!(
            fault,
            Fault::Crash(Side::Primary) | Fault::Kill(Side::Primary)
        ) && self.primary.mode == PrimaryMode::Paired
        {
            self.crashed_primary_at.get_or_insert(now);
        }
    }

    fn check_step(&self) -> Result<(), String> {
        let p = &self.primary;
        let b = &self.backup;
        let unacked: BTreeSet<_> = self
            .world
            .iter()
            .filter(|e| !e.acked)
            .map(|e| e.by as u8)
            .collect();
        if unacked.len() > 1 || (p.went_alone && b.promoted.is_some()) {
            return Err("split brain: both sides emit unacknowledged outputs".into());
        }
        let ps = p.link.status();
        if b.link.watermark() > ps.sent_watermark {
            return Err(format!(
                "the backup holds watermark {} but the primary sent only {}",
                b.link.watermark(),
                ps.sent_watermark
            ));
        }
        if b.replica.guest.landmark > b.replica.gate.max(b.promoted.map_or(0, |p| p.1))
            && b.mode != BackupMode::Live
        {
            return Err("the replica ran past its gate".into());
        }
        if b.replica.gate > b.link.watermark() {
            return Err("the replica's gate is beyond the link's watermark".into());
        }
        let bs = b.link.status(self.now);
        if ps.acked_watermark > bs.acked_watermark {
            return Err(format!(
                "the primary believes landmark {} acked, the backup acked {}",
                ps.acked_watermark, bs.acked_watermark
            ));
        }
        let bound = self.config.in_flight_bound();
        let chunk = self.config.max_frame_bytes as u64;
        if ps.in_flight_bytes > bound
            || bs.unacked_bytes > bound
            || b.backlog_bytes as u64 > bound
            || b.replica.queued_bytes as u64 > bound + chunk
        {
            return Err(format!(
                "a log bound broke: in flight {}, unacked {}, backlog {}, queued {}",
                ps.in_flight_bytes, bs.unacked_bytes, b.backlog_bytes, b.replica.queued_bytes
            ));
        }
        let within = |len: usize, bytes: usize, bounds: OutputBounds| {
            len <= bounds.max_items && (bytes <= bounds.max_bytes || len <= 1)
        };
        if !within(p.held.len(), p.held.bytes(), self.held_bounds) {
            return Err("held outputs over their bound".into());
        }
        if !b.finish_log && !within(b.shadow.len(), b.shadow.bytes(), self.shadow_bounds) {
            return Err("shadow outputs over their bound".into());
        }
        Ok(())
    }

    /// Both sides' state in a few lines, for failure reports.
    fn summary(&self) -> String {
        let p = &self.primary;
        let b = &self.backup;
        format!(
            "primary: alive {} mode {:?} landmark {} held {} ({} B) link {:?}\n\
             backup: alive {} mode {:?} replica {}/{} queued {} B backlog {} B shadow {} \
             (released {}) link {:?}",
            p.alive,
            p.mode,
            p.guest.landmark,
            p.held.len(),
            p.held.bytes(),
            p.link.status(),
            b.alive,
            b.mode,
            b.replica.guest.landmark,
            b.replica.gate,
            b.replica.queued_bytes,
            b.backlog_bytes,
            b.shadow.len(),
            b.shadow.released(),
            b.link.status(self.now),
        )
    }

    /// The end-of-run checks; returns what happened.
    fn finish(&self, end: Duration) -> Result<Outcome, String> {
        let p = &self.primary;
        let b = &self.backup;
        // The surviving timeline: the primary's history, cut where the backup went live.
        let mut timeline: Vec<&Out> = match b.promoted {
            Some((_, at)) => p.produced.iter().filter(|o| o.landmark <= at).collect(),
            None => p.produced.iter().collect(),
        };
        timeline.extend(b.live_produced.iter());
        let mut first: HashMap<(u64, u32), usize> = HashMap::new();
        let mut deduped = Vec::new();
        let mut duplicates = 0;
        for (i, e) in self.world.iter().enumerate() {
            let key = (e.out.landmark, e.out.index);
            let Some(&j) = first.get(&key) else {
                first.insert(key, i);
                deduped.push(&e.out);
                continue;
            };
            duplicates += 1;
            if self.world[j].out != e.out {
                return Err(format!("output {key:?} seen twice with different contents"));
            }
            // Duplicates only after a promotion, in (released seen by the
            // backup, released by the primary]; either may come first (an
            // ack delayed in the network still releases on the primary).
            let released_seen = b.promoted.map(|p| p.0);
            let released = p.link.status().released;
            if released_seen.is_none_or(|r| key.0 <= r) || key.0 > released {
                return Err(format!(
                    "duplicate of {key:?} (by {:?}) outside (released seen by the backup \
                     {released_seen:?}, released by the primary {released}]",
                    e.by
                ));
            }
        }
        for (i, out) in deduped.iter().enumerate() {
            match timeline.get(i) {
                Some(expected) if *expected == *out => {}
                expected => {
                    return Err(format!(
                        "world output #{i} is {:?}, the surviving timeline has {:?}: an output \
                         was lost, reordered or came from a dead branch",
                        (out.landmark, out.index),
                        expected.map(|o| (o.landmark, o.index))
                    ))
                }
            }
        }
        let primary_on = p.running() && matches!(p.mode, PrimaryMode::Paired | PrimaryMode::Alone);
        let backup_on = b.alive && b.mode == BackupMode::Live;
        if (primary_on || backup_on) && self.world.last().is_none_or(|e| e.at + LIVENESS < end) {
            return Err(format!(
                "a surviving side emitted nothing in the last {LIVENESS:?}"
            ));
        }
        let clean_end = |exit: &Option<(i32, String)>| exit.as_ref().is_some_and(|(c, _)| *c == 0);
        if clean_end(&p.exit) && b.promoted.is_none() && deduped.len() != p.produced.len() {
            return Err(format!(
                "the guest powered off but the world saw {} of its {} outputs",
                deduped.len(),
                p.produced.len()
            ));
        }
        if b.promoted.is_some() && p.alive {
            return Err("the backup went live while the primary is still up".into());
        }
        if p.went_alone && b.alive {
            return Err("the primary runs alone while the backup is still up".into());
        }
        let failover_gap = match (self.crashed_primary_at, b.promoted) {
            (Some(at), Some(_)) => self
                .world
                .iter()
                .find(|e| e.by == Side::Backup)
                .map(|e| e.at.saturating_sub(at)),
            _ => None,
        };
        Ok(Outcome {
            promoted: b.promoted.is_some(),
            primary_alone: p.went_alone,
            both_ended_cleanly: clean_end(&p.exit) && clean_end(&b.exit),
            outputs_seen: deduped.len(),
            duplicates,
            failover_gap,
            arbiter_requests: self.arbiter.requests,
            window_waits: p.window_waits,
            held_waits: p.held_waits,
            shadow_waits: b.shadow_waits,
        })
    }
}

/// A side that is up at the end must have emitted within this.
const LIVENESS: Duration = Duration::from_millis(300);
/// Every run's length; faults happen before `LAST_FAULT`.
const RUN: Duration = Duration::from_millis(1600);
const LAST_FAULT: u64 = 700;

fn run_seed(seed: u64, faults: Option<Vec<(Duration, Fault)>>) -> Result<Outcome, String> {
    let faults = faults.unwrap_or_else(|| {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17);
        let n = rng.gen_range(0..=4);
        let mut faults: Vec<_> = (0..n)
            .map(|_| (ms(rng.gen_range(60..LAST_FAULT)), random_fault(&mut rng)))
            .collect();
        faults.sort_by_key(|f| f.0);
        faults
    });
    let mut sim = Sim::new(seed, faults.clone());
    let result = sim.run(RUN).and_then(|()| sim.finish(RUN));
    result.map_err(|e| {
        let trace: Vec<_> = sim.trace.iter().rev().take(40).rev().cloned().collect();
        format!(
            "seed {seed}: {e}\nfaults: {faults:?}\n{}\nlast events:\n  {}",
            sim.summary(),
            trace.join("\n  ")
        )
    })
}

fn seeds() -> u64 {
    std::env::var("FT_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        // Debug builds are ~20x slower; the release run is the real one.
        .unwrap_or(if cfg!(debug_assertions) { 60 } else { 600 })
}

#[test]
fn the_pair_survives_random_faults_over_many_seeds() {
    let n = seeds();
    let mut failures = Vec::new();
    let (mut promoted, mut alone, mut ended, mut dup_runs) = (0, 0, 0, 0);
    let mut gaps = Vec::new();
    let mut outputs = 0;
    let mut waits = [0u64; 3];
    for seed in 0..n {
        match run_seed(seed, None) {
            Ok(o) => {
                promoted += u32::from(o.promoted);
                alone += u32::from(o.primary_alone);
                ended += u32::from(o.both_ended_cleanly);
                dup_runs += u32::from(o.duplicates > 0);
                outputs += o.outputs_seen;
                waits[0] += o.window_waits;
                waits[1] += o.held_waits;
                waits[2] += o.shadow_waits;
                gaps.extend(o.failover_gap);
            }
            Err(e) => failures.push(e),
        }
    }
    gaps.sort();
    eprintln!(
        "{n} seeds: {promoted} backup promotions, {alone} primaries alone, {ended} clean \
         power-offs, {dup_runs} runs with duplicates, {outputs} outputs checked; waits: \
         window {}, held outputs {}, shadow {}; crash-to-first-output of the new primary \
         (any faults): median {:?}, max {:?}",
        waits[0],
        waits[1],
        waits[2],
        gaps.get(gaps.len() / 2),
        gaps.last()
    );
    for f in &failures {
        eprintln!("FAIL {}", f.lines().next().unwrap_or_default());
    }
    assert!(
        failures.is_empty(),
        "{} of {n} seeds failed; first:\n{}",
        failures.len(),
        failures[0]
    );
    // The faults must actually have exercised every way out.
    assert!(
        promoted > 0 && alone > 0 && ended > 0,
        "coverage: {promoted}/{alone}/{ended}"
    );
    // And every bound must have been reached (the waits it causes are checked too).
    assert!(
        waits.iter().all(|&w| w > 0),
        "a bound was never reached: {waits:?}"
    );
}

#[test]
fn a_quiet_pair_never_asks_the_arbiter_and_outputs_flow() {
    for seed in 0..5 {
        let o = run_seed(seed, Some(Vec::new())).unwrap();
        assert_eq!(o.arbiter_requests, 0);
        assert!(!o.promoted && !o.primary_alone);
        assert!(o.outputs_seen > 500, "only {} outputs", o.outputs_seen);
        assert_eq!(o.duplicates, 0);
    }
}

#[test]
fn a_crashed_primary_is_replaced_within_300_ms() {
    let mut gaps = Vec::new();
    for seed in 0..20 {
        let o = run_seed(seed, Some(vec![(ms(300), Fault::Crash(Side::Primary))])).unwrap();
        assert!(o.promoted, "seed {seed}");
        let gap = o.failover_gap.expect("the new primary emitted");
        assert!(gap <= ms(300), "seed {seed}: {gap:?}");
        gaps.push(gap);
    }
    gaps.sort();
    eprintln!(
        "crash to first output of the new primary: {:?} .. {:?}",
        gaps[0], gaps[19]
    );
}

#[test]
fn a_crashed_backup_leaves_the_primary_alone_and_releasing() {
    for seed in 0..20 {
        let o = run_seed(seed, Some(vec![(ms(300), Fault::Crash(Side::Backup))])).unwrap();
        assert!(o.primary_alone && !o.promoted, "seed {seed}");
    }
}

#[test]
fn a_diverging_backup_stops_and_the_primary_goes_on() {
    for seed in 0..10 {
        let o = run_seed(seed, Some(vec![(ms(200), Fault::Diverge)])).unwrap();
        assert!(o.primary_alone && !o.promoted, "seed {seed}");
    }
}

#[test]
fn a_power_off_ends_both_sides_cleanly_and_loses_nothing() {
    for seed in 0..10 {
        let o = run_seed(seed, Some(vec![(ms(200), Fault::PowerOff)])).unwrap();
        assert!(o.both_ended_cleanly, "seed {seed}");
        assert_eq!(o.arbiter_requests, 0);
    }
}
