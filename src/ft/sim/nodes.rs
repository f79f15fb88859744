//! The two sides as the I/O edge will drive them: link, failover machine,
//! output queues and the guest, wired as the module docs of `crate::ft` say.

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::guest::{end_record, inputs, GuestModel, LogOut, Out, Replica};
use super::net::{ArbiterModel, Net, Queue, Side};
use crate::ft::failover::{Action, Failover, FailoverConfig, FailoverEvent};
use crate::ft::link::{
    BackupEvent, BackupLink, ExpectedHello, Hello, LinkConfig, PrimaryEvent, PrimaryLink,
};
use crate::ft::output::{HeldOutputs, OutputBounds, OutputError, ShadowOutputs};

pub const VM: &str = "vm-sim";
pub const GENERATION: u64 = 1;
const HEADER: &[u8] = b"sim log header";
const KEY: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";
/// A blocked vCPU or replay looks again this often.
const RETRY: Duration = Duration::from_micros(200);
pub const NEVER: Duration = Duration::MAX;

/// What the world saw: every output written out, by whom, under which rule.
pub struct Emission {
    pub out: Out,
    pub by: Side,
    /// Released on an acknowledgement (not by a winner of the arbiter).
    pub acked: bool,
    pub at: Duration,
}

/// Everything a side touches while it is serviced.
pub struct Env<'a> {
    pub now: Duration,
    pub q: &'a mut Queue,
    pub rng: &'a mut StdRng,
    pub net: &'a mut Net,
    pub arbiter: &'a mut ArbiterModel,
    pub world: &'a mut Vec<Emission>,
    pub trace: &'a mut VecDeque<String>,
}

impl Env<'_> {
    pub fn note(&mut self, line: String) {
        if self.trace.len() == 300 {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("{:>10.3} ms {line}", self.now.as_secs_f64() * 1e3));
    }
}

pub fn key() -> arbiter::auth::Key {
    arbiter::auth::Key::from_hex(KEY).expect("valid hex key")
}

pub fn failover_config(role: &str) -> FailoverConfig {
    let mut c = FailoverConfig::new(VM, GENERATION, format!("host-{role}"));
    c.retry_max = Duration::from_millis(200);
    c
}

fn step_time(rng: &mut StdRng) -> Duration {
    Duration::from_micros(rng.gen_range(100..1500))
}

struct Step {
    landmark: u64,
    outputs: VecDeque<Out>,
    log: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryMode {
    Paired,
    Alone,
    Stopped,
}

pub struct PrimaryNode {
    pub alive: bool,
    pub link: PrimaryLink,
    pub failover: Option<Failover>,
    pub held: HeldOutputs<Out>,
    pub guest: GuestModel,
    log: LogOut,
    pub mode: PrimaryMode,
    hold: bool,
    step: Option<Step>,
    next_step_at: Duration,
    inputs: StdRng,
    pub end_at: Option<u64>,
    ended: bool,
    bye_done: bool,
    pub went_alone: bool,
    /// The guest's state after each landmark (index = landmark).
    pub truth: Vec<u64>,
    pub produced: Vec<Out>,
    pub exit: Option<(i32, String)>,
    pub window_waits: u64,
    pub held_waits: u64,
}

impl PrimaryNode {
    pub fn new(config: LinkConfig, bounds: OutputBounds, seed: u64) -> Self {
        let hello = Hello {
            vm: VM.into(),
            generation: GENERATION,
            log_header: HEADER.to_vec(),
            start_landmark: 0,
        };
        PrimaryNode {
            alive: true,
            link: PrimaryLink::new(config, &key(), hello, Duration::ZERO).expect("valid config"),
            failover: None,
            held: HeldOutputs::new(bounds),
            guest: GuestModel::default(),
            log: LogOut::new(),
            mode: PrimaryMode::Paired,
            hold: false,
            step: None,
            next_step_at: Duration::ZERO,
            inputs: StdRng::seed_from_u64(seed ^ 0x1111),
            end_at: None,
            ended: false,
            bye_done: false,
            went_alone: false,
            truth: vec![0],
            produced: Vec::new(),
            exit: None,
            window_waits: 0,
            held_waits: 0,
        }
    }

    pub fn running(&self) -> bool {
        self.alive && self.mode != PrimaryMode::Stopped && !self.ended
    }

    pub fn next_wake(&self) -> Duration {
        if !self.alive {
            return NEVER;
        }
        let mut t = self.link.poll_timeout().unwrap_or(NEVER);
        if let Some(f) = &self.failover {
            t = t.min(f.poll_timeout().unwrap_or(NEVER));
        }
        if self.running() {
            t = t.min(self.next_step_at);
        }
        t
    }

    pub fn on_bytes(&mut self, env: &mut Env, bytes: &[u8]) {
        self.link.on_bytes_received(bytes, env.now);
    }

    pub fn service(&mut self, env: &mut Env) -> Result<(), String> {
        if !self.alive {
            return Ok(());
        }
        let now = env.now;
        if self.link.poll_timeout().is_some_and(|t| t <= now) {
            self.link.handle_timeout(now);
        }
        if let Some(f) = &mut self.failover {
            if f.poll_timeout().is_some_and(|t| t <= now) {
                f.handle_timeout(now);
            }
        }
        if self.running() && self.next_step_at <= now {
            self.run_guest(env)?;
        }
        loop {
            let mut progressed = false;
            while let Some(event) = self.link.poll_event() {
                env.note(format!("primary link: {event:?}"));
                self.on_link_event(env, event)?;
                progressed = true;
            }
            while let Some(action) = self.failover.as_mut().and_then(Failover::poll_action) {
                env.note(format!("primary failover: {action:?}"));
                self.on_action(env, action)?;
                progressed = true;
            }
            progressed |= self.maybe_bye(env)?;
            if !self.alive {
                return Ok(());
            }
            while let Some(bytes) = self.link.poll_transmit(now) {
                env.net.send(env.q, env.rng, now, Side::Primary, bytes);
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    fn run_guest(&mut self, env: &mut Env) -> Result<(), String> {
        let now = env.now;
        if self.step.is_none() {
            let landmark = self.guest.landmark + 1;
            let mut records = inputs(&mut self.inputs, landmark, now.as_nanos() as u64);
            if self.end_at == Some(landmark) {
                records.push(end_record(landmark));
            }
            let outputs = self.guest.step(&records);
            self.truth.push(self.guest.state);
            self.produced.extend(outputs.iter().cloned());
            for r in &records {
                self.log.append(r);
            }
            self.step = Some(Step {
                landmark,
                outputs: outputs.into(),
                log: Some(self.log.take()),
            });
        }
        let step = self.step.as_mut().expect("created above");
        let landmark = step.landmark;
        // Outputs first, then the log through this landmark (the output rule's contract).
        while let Some(out) = step.outputs.pop_front() {
            match self.mode {
                PrimaryMode::Alone => env.world.push(Emission {
                    out,
                    by: Side::Primary,
                    acked: false,
                    at: env.now,
                }),
                _ => match self.held.push(landmark, out, now) {
                    Ok(()) => {}
                    Err(refused) if matches!(refused.error, OutputError::Full { .. }) => {
                        step.outputs.push_front(refused.output);
                        self.held_waits += 1;
                        self.next_step_at = now + RETRY;
                        return Ok(());
                    }
                    Err(refused) => return Err(format!("held outputs: {}", refused.error)),
                },
            }
        }
        if let Some(log) = &step.log {
            if self.mode == PrimaryMode::Paired && !self.link.is_closed() {
                if !self.link.can_accept(log.len() as u64) {
                    self.window_waits += 1;
                    self.next_step_at = now + RETRY;
                    return Ok(());
                }
                self.link
                    .push_log(log, landmark)
                    .map_err(|e| format!("push_log: {e}"))?;
            }
            step.log = None;
        }
        self.step = None;
        if self.end_at == Some(landmark) {
            self.ended = true;
            env.note(format!("primary guest powered off at landmark {landmark}"));
        }
        self.next_step_at = now + step_time(&mut self.inputs);
        Ok(())
    }

    fn on_link_event(&mut self, env: &mut Env, event: PrimaryEvent) -> Result<(), String> {
        let now = env.now;
        let failover_event = match event {
            PrimaryEvent::Established => {
                self.failover = Some(Failover::primary(failover_config("a"), now));
                return Ok(());
            }
            PrimaryEvent::Acked { watermark, .. } => {
                if self.mode == PrimaryMode::Paired && !self.hold {
                    for out in self.held.release_through(watermark, now) {
                        if out.landmark > watermark {
                            return Err(format!(
                                "released landmark {} beyond ack {watermark}",
                                out.landmark
                            ));
                        }
                        env.world.push(Emission {
                            out,
                            by: Side::Primary,
                            acked: true,
                            at: env.now,
                        });
                    }
                    self.link
                        .set_released(watermark)
                        .map_err(|e| format!("set_released: {e}"))?;
                }
                return Ok(());
            }
            PrimaryEvent::PeerHeartbeat { .. } => return Ok(()),
            PrimaryEvent::HelloRefused { reason } => {
                return Err(format!("hello refused: {reason}"))
            }
            PrimaryEvent::Diverged { landmark, detail } => {
                FailoverEvent::Diverged { landmark, detail }
            }
            PrimaryEvent::PeerSuspected { .. } => FailoverEvent::PeerSuspected,
            PrimaryEvent::Closed { reason } => FailoverEvent::LinkClosed {
                reason: reason.to_string(),
            },
        };
        // The socket goes with the link.
        env.net.fin(env.q, now, Side::Primary);
        match &mut self.failover {
            Some(f) => f.handle(failover_event, now),
            None => {
                return Err(format!(
                    "link ended before it was established: {failover_event:?}"
                ))
            }
        }
        Ok(())
    }

    fn on_action(&mut self, env: &mut Env, action: Action) -> Result<(), String> {
        let now = env.now;
        match action {
            Action::AskArbiter { requester, .. } => {
                env.arbiter
                    .request(env.q, env.rng, now, Side::Primary, requester)
            }
            Action::RetryArbiterAt(_) => {}
            Action::HoldOutputs => self.hold = true,
            Action::ReleaseAll => {
                self.mode = PrimaryMode::Alone;
                self.went_alone = true;
                for out in self.held.release_all(now) {
                    env.world.push(Emission {
                        out,
                        by: Side::Primary,
                        acked: false,
                        at: env.now,
                    });
                }
            }
            Action::DropLog => {
                self.link.close("running alone");
                env.net.fin(env.q, now, Side::Primary);
            }
            Action::Stop { exit_code, message } => {
                self.mode = PrimaryMode::Stopped;
                self.exit = Some((exit_code, message));
                while let Some(bytes) = self.link.poll_transmit(now) {
                    env.net.send(env.q, env.rng, now, Side::Primary, bytes);
                }
                env.net.fin(env.q, now, Side::Primary);
                self.alive = false;
            }
            other => return Err(format!("a primary was told {other:?}")),
        }
        Ok(())
    }

    /// The guest powered off: once everything is acked and released, say Bye.
    fn maybe_bye(&mut self, env: &mut Env) -> Result<bool, String> {
        let Some(f) = &mut self.failover else {
            return Ok(false);
        };
        if !self.ended || self.bye_done || self.mode == PrimaryMode::Stopped {
            return Ok(false);
        }
        let reason = "guest powered off".to_string();
        if self.mode == PrimaryMode::Paired && !self.hold {
            let all_out = self.held.is_empty()
                && self.link.is_established()
                && self.link.status().released >= self.guest.landmark;
            if !all_out {
                return Ok(false);
            }
            self.link
                .send_bye(&reason, env.now)
                .map_err(|e| format!("send_bye: {e}"))?;
        }
        self.bye_done = true;
        f.handle(FailoverEvent::Bye { reason }, env.now);
        Ok(true)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupMode {
    Following,
    Live,
    Stopped,
}

pub struct BackupNode {
    pub alive: bool,
    pub link: BackupLink,
    pub failover: Option<Failover>,
    pub shadow: ShadowOutputs<Out>,
    pub replica: Replica,
    backlog: VecDeque<(Vec<u8>, u64)>,
    pub backlog_bytes: usize,
    window: usize,
    pub mode: BackupMode,
    pub finish_log: bool,
    exhausted_reported: bool,
    pending_outs: VecDeque<Out>,
    next_replay_at: Duration,
    pub slow_until: Duration,
    rng: StdRng,
    pub diverge_next: bool,
    /// The released marker heard of, and the landmark, at promotion.
    pub promoted: Option<(u64, u64)>,
    pub live_produced: Vec<Out>,
    pub exit: Option<(i32, String)>,
    pub shadow_waits: u64,
}

impl BackupNode {
    pub fn new(config: LinkConfig, bounds: OutputBounds, seed: u64) -> Self {
        let expected = ExpectedHello {
            vm: VM.into(),
            generation: GENERATION,
        };
        BackupNode {
            alive: true,
            link: BackupLink::new(config, &key(), expected, Duration::ZERO).expect("valid config"),
            failover: None,
            shadow: ShadowOutputs::new(bounds),
            replica: Replica::new(),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            window: config.window_bytes as usize,
            mode: BackupMode::Following,
            finish_log: false,
            exhausted_reported: false,
            pending_outs: VecDeque::new(),
            next_replay_at: NEVER,
            slow_until: Duration::ZERO,
            rng: StdRng::seed_from_u64(seed ^ 0x2222),
            diverge_next: false,
            promoted: None,
            live_produced: Vec::new(),
            exit: None,
            shadow_waits: 0,
        }
    }

    pub fn next_wake(&self) -> Duration {
        if !self.alive {
            return NEVER;
        }
        let mut t = self.link.poll_timeout().unwrap_or(NEVER);
        if let Some(f) = &self.failover {
            t = t.min(f.poll_timeout().unwrap_or(NEVER));
        }
        if self.mode != BackupMode::Stopped {
            t = t.min(self.next_replay_at);
        }
        t
    }

    pub fn on_bytes(&mut self, env: &mut Env, bytes: &[u8]) {
        self.link.on_bytes_received(bytes, env.now);
    }

    pub fn service(&mut self, env: &mut Env, truth: &[u64]) -> Result<(), String> {
        if !self.alive {
            return Ok(());
        }
        let now = env.now;
        if self.link.poll_timeout().is_some_and(|t| t <= now) {
            self.link.handle_timeout(now);
        }
        if let Some(f) = &mut self.failover {
            if f.poll_timeout().is_some_and(|t| t <= now) {
                f.handle_timeout(now);
            }
        }
        if self.next_replay_at <= now {
            self.next_replay_at = NEVER;
            self.run(env, truth)?;
        }
        loop {
            let mut progressed = false;
            while let Some(event) = self.link.poll_event() {
                if !matches!(
                    event,
                    BackupEvent::Records { .. } | BackupEvent::Released { .. }
                ) {
                    env.note(format!("backup link: {event:?}"));
                }
                self.on_link_event(env, event)?;
                progressed = true;
            }
            progressed |= self.feed()?;
            while let Some(action) = self.failover.as_mut().and_then(Failover::poll_action) {
                env.note(format!("backup failover: {action:?}"));
                self.on_action(env, action)?;
                progressed = true;
            }
            if !self.alive {
                return Ok(());
            }
            while let Some(bytes) = self.link.poll_transmit(now) {
                env.net.send(env.q, env.rng, now, Side::Backup, bytes);
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    /// Moves received records into the replay queue while it has room, acking
    /// them. A replay waiting at its gate gets the bytes whatever the bound:
    /// what it holds is then all beyond the watermark (a record split across
    /// frames), and refusing would wedge the pair.
    fn feed(&mut self) -> Result<bool, String> {
        let mut fed = false;
        while let Some((bytes, _)) = self.backlog.front() {
            let queued = self.replica.queued_bytes;
            if queued + bytes.len() > self.window && self.replica.can_step() {
                break;
            }
            let (bytes, watermark) = self.backlog.pop_front().expect("front exists");
            self.backlog_bytes -= bytes.len();
            self.replica.push(&bytes, watermark);
            // After the link ended acks go nowhere; the replay still gets the bytes.
            if let Err(e) = self.link.ack_through(watermark) {
                return Err(format!("ack_through({watermark}): {e}"));
            }
            self.next_replay_at = self.next_replay_at.min(Duration::ZERO);
            fed = true;
        }
        Ok(fed)
    }

    fn on_link_event(&mut self, env: &mut Env, event: BackupEvent) -> Result<(), String> {
        let now = env.now;
        let failover_event = match event {
            BackupEvent::HelloReceived { log_header, .. } => {
                if log_header != HEADER {
                    return Err("unexpected log header".into());
                }
                self.link.accept_hello(now).map_err(|e| e.to_string())?;
                self.failover = Some(Failover::backup(failover_config("b"), now));
                return Ok(());
            }
            BackupEvent::Records {
                log_bytes,
                watermark,
            } => {
                self.backlog_bytes += log_bytes.len();
                self.backlog.push_back((log_bytes, watermark));
                return Ok(());
            }
            BackupEvent::Released { released } => {
                self.shadow.on_released(released);
                self.next_replay_at = self.next_replay_at.min(now);
                return Ok(());
            }
            BackupEvent::Bye { reason } => FailoverEvent::Bye { reason },
            BackupEvent::PeerSuspected { .. } => FailoverEvent::PeerSuspected,
            BackupEvent::Closed { reason } => FailoverEvent::LinkClosed {
                reason: reason.to_string(),
            },
        };
        env.net.fin(env.q, now, Side::Backup);
        match &mut self.failover {
            Some(f) => f.handle(failover_event, now),
            None => {
                return Err(format!(
                    "link ended before it was established: {failover_event:?}"
                ))
            }
        }
        Ok(())
    }

    fn on_action(&mut self, env: &mut Env, action: Action) -> Result<(), String> {
        let now = env.now;
        match action {
            Action::AskArbiter { requester, .. } => {
                env.arbiter
                    .request(env.q, env.rng, now, Side::Backup, requester)
            }
            Action::RetryArbiterAt(_) => {}
            Action::FinishLog => {
                self.finish_log = true;
                self.shadow.log_finished();
                self.next_replay_at = now;
            }
            Action::Promote { landmark } => {
                if landmark != self.replica.guest.landmark {
                    return Err(format!(
                        "promoted at {landmark}, replica at {}",
                        self.replica.guest.landmark
                    ));
                }
                self.promoted = Some((self.shadow.released(), landmark));
                for out in self.shadow.take_for_go_live() {
                    env.world.push(Emission {
                        out,
                        by: Side::Backup,
                        acked: false,
                        at: env.now,
                    });
                }
                self.mode = BackupMode::Live;
                self.next_replay_at = now;
            }
            Action::Stop { exit_code, message } => {
                self.mode = BackupMode::Stopped;
                self.exit = Some((exit_code, message));
                while let Some(bytes) = self.link.poll_transmit(now) {
                    env.net.send(env.q, env.rng, now, Side::Backup, bytes);
                }
                env.net.fin(env.q, now, Side::Backup);
                self.alive = false;
            }
            other => return Err(format!("a backup was told {other:?}")),
        }
        Ok(())
    }

    fn run(&mut self, env: &mut Env, truth: &[u64]) -> Result<(), String> {
        let now = env.now;
        match self.mode {
            BackupMode::Stopped => Ok(()),
            BackupMode::Live => {
                // Running live: its own inputs, outputs straight out.
                let landmark = self.replica.guest.landmark + 1;
                let records = inputs(&mut self.rng, landmark, now.as_nanos() as u64);
                for out in self.replica.guest.step(&records) {
                    self.live_produced.push(out.clone());
                    env.world.push(Emission {
                        out,
                        by: Side::Backup,
                        acked: false,
                        at: env.now,
                    });
                }
                self.next_replay_at = now + step_time(&mut self.rng);
                Ok(())
            }
            BackupMode::Following => self.replay(env, truth),
        }
    }

    fn replay(&mut self, env: &mut Env, truth: &[u64]) -> Result<(), String> {
        let now = env.now;
        while let Some(out) = self.pending_outs.pop_front() {
            if let Err(refused) = self.shadow.push(out.landmark, out, now) {
                if !matches!(refused.error, OutputError::Full { .. }) {
                    return Err(format!("shadow outputs: {}", refused.error));
                }
                self.pending_outs.push_front(refused.output);
                self.shadow_waits += 1;
                self.next_replay_at = now + RETRY;
                return Ok(());
            }
        }
        if self.replica.can_step() {
            let landmark = self.replica.guest.landmark + 1;
            if std::mem::take(&mut self.diverge_next) {
                env.note(format!("backup replay diverges at landmark {landmark}"));
                self.link.send_diverged(landmark, "simulated mismatch");
                while let Some(bytes) = self.link.poll_transmit(now) {
                    env.net.send(env.q, env.rng, now, Side::Backup, bytes);
                }
                env.net.fin(env.q, now, Side::Backup);
                if let Some(f) = &mut self.failover {
                    f.handle(
                        FailoverEvent::Diverged {
                            landmark,
                            detail: "simulated mismatch".into(),
                        },
                        now,
                    );
                }
                return Ok(());
            }
            let (_, outs) = self.replica.step()?;
            if truth.get(landmark as usize) != Some(&self.replica.guest.state) {
                return Err(format!(
                    "the replica's state differs from the primary's at landmark {landmark}: \
                     log bytes lost, reordered or garbled"
                ));
            }
            self.link
                .set_replayed(landmark)
                .map_err(|e| format!("set_replayed: {e}"))?;
            self.pending_outs.extend(outs);
            let mut pause = Duration::from_micros(self.rng.gen_range(50..700));
            if now < self.slow_until {
                pause *= 20;
            }
            self.next_replay_at = now + pause;
        } else if self.finish_log
            && !self.exhausted_reported
            && self.backlog.is_empty()
            && self.pending_outs.is_empty()
        {
            self.exhausted_reported = true;
            let landmark = self.replica.guest.landmark;
            if let Some(f) = &mut self.failover {
                f.handle(FailoverEvent::LogExhausted { landmark }, now);
            }
        }
        Ok(())
    }
}
