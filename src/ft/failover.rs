//! Who may go on alone: the per-side failover state machine.
//!
//! Sans-IO: the caller feeds [`FailoverEvent`]s with the time, performs the
//! [`Action`]s it polls, and calls [`Failover::handle_timeout`] when
//! [`Failover::poll_timeout`] says (arbiter retries).
//!
//! ```text
//! Primary: Replicating ──suspect/closed/diverged──▶ Asking ──Won──▶ Alone
//!                                                      └──Held/NotArmed──▶ Lost
//! Backup:  Following ──suspect/closed──▶ Asking ──Won──▶ Draining ──LogExhausted──▶ Live
//!                                          └──Held/NotArmed──▶ Lost
//! Either:  Bye ──▶ Ending (exit 0, no arbiter)     Backup's own divergence ──▶ Diverged
//! ```
//!
//! Safety: the primary releases only acknowledged outputs until it wins;
//! the backup emits nothing until it wins; the arbiter names one winner per
//! (vm, generation). The requester names are role-qualified
//! ("<node>/primary", "<node>/backup"), so two nodes configured with the
//! same name (network namespaces share a host name) still cannot both win.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use arbiter::TasOutcome;
use serde::Serialize;

/// Which side of the pair this machine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Backup,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverConfig {
    pub vm: String,
    pub generation: u64,
    /// This node's name; the arbiter requester is "<node_name>/<role>".
    pub node_name: String,
    /// First wait after the arbiter could not be reached; doubles per failure.
    pub retry_initial: Duration,
    /// Longest wait between two arbiter attempts.
    pub retry_max: Duration,
}

impl FailoverConfig {
    pub fn new(vm: impl Into<String>, generation: u64, node_name: impl Into<String>) -> Self {
        FailoverConfig {
            vm: vm.into(),
            generation,
            node_name: node_name.into(),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(1),
        }
    }

    pub fn requester(&self, role: Role) -> String {
        format!("{}/{role}", self.node_name)
    }
}

/// The arbiter's answer to a test-and-set, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Decided(TasOutcome),
    /// No answer (no quorum, timeout, connection refused): retried with backoff.
    Unreachable {
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailoverEvent {
    /// The link heard nothing valid from the peer for `peer_timeout`.
    PeerSuspected,
    /// The link closed (broken connection, refused frame, peer closed).
    LinkClosed {
        reason: String,
    },
    /// Primary: the backup reported a divergence. Backup: its own replay
    /// found one (the caller also sends Diverged on the link).
    Diverged {
        landmark: u64,
        detail: String,
    },
    ArbiterVerdict(Verdict),
    /// Backup: after `FinishLog`, the replay reached the end of the log at `landmark`.
    LogExhausted {
        landmark: u64,
    },
    /// Primary: the guest ended and every output was released (Bye is sent
    /// next). Backup: the primary's Bye arrived.
    Bye {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Call test_and_set(vm, generation, requester) and feed back the verdict.
    AskArbiter {
        vm: String,
        generation: u64,
        requester: String,
    },
    /// The arbiter was unreachable; the next attempt is due at this time
    /// (also reported by `poll_timeout`).
    RetryArbiterAt(Duration),
    /// Primary: release nothing more until told otherwise.
    HoldOutputs,
    /// Primary: release every held output now and from now on send outputs directly.
    ReleaseAll,
    /// Primary: stop recording and streaming the log; forget the backup.
    DropLog,
    /// Backup: no more log will come; replay what was received and report
    /// `LogExhausted` at its end.
    FinishLog,
    /// Backup: go live at `landmark`: emit the shadow outputs
    /// (`ShadowOutputs::take_for_go_live`), unmute the NIC, send a gratuitous
    /// ARP, resume the console, run live.
    Promote { landmark: u64 },
    /// Stop the guest and exit the process with this code and message.
    Stop { exit_code: i32, message: String },
}

/// Where the machine is; see the module diagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Replicating,
    Following,
    Asking {
        trigger: String,
        attempts: u32,
        retry_at: Option<Duration>,
    },
    Alone,
    Draining,
    Live {
        landmark: u64,
    },
    Ending {
        reason: String,
    },
    Lost {
        message: String,
    },
    Diverged {
        landmark: u64,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Replicating => "replicating",
            State::Following => "following",
            State::Asking { .. } => "asking-arbiter",
            State::Alone => "alone",
            State::Draining => "draining",
            State::Live { .. } => "live",
            State::Ending { .. } => "ending",
            State::Lost { .. } => "lost",
            State::Diverged { .. } => "diverged",
        }
    }
}

/// For `twinvm status` (serialises to JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailoverStatus {
    pub role: Role,
    pub state: &'static str,
    pub vm: String,
    pub generation: u64,
    /// When the current state was entered (the caller's monotonic clock).
    pub since: Duration,
    /// A sentence: what triggered the state, attempts, who holds the slot.
    pub detail: String,
}

/// Exit code of a side that lost the arbiter or was told a repaired pair exists.
pub const EXIT_LOST: i32 = 3;
/// Exit code of a backup whose replay diverged.
pub const EXIT_DIVERGED: i32 = 4;

#[derive(Debug)]
pub struct Failover {
    role: Role,
    config: FailoverConfig,
    state: State,
    since: Duration,
    /// Primary: the guest ended while the arbiter was being asked.
    bye_pending: Option<String>,
    /// Backup: the replay reached the end of the log before the verdict.
    exhausted_at: Option<u64>,
    last_arbiter_error: Option<String>,
    actions: VecDeque<Action>,
}

impl Failover {
    /// A primary whose link to the backup was just established.
    pub fn primary(config: FailoverConfig, now: Duration) -> Self {
        Self::new(Role::Primary, State::Replicating, config, now)
    }

    /// A backup that just accepted the primary's Hello.
    pub fn backup(config: FailoverConfig, now: Duration) -> Self {
        Self::new(Role::Backup, State::Following, config, now)
    }

    fn new(role: Role, state: State, config: FailoverConfig, now: Duration) -> Self {
        Failover {
            role,
            config,
            state,
            since: now,
            bye_pending: None,
            exhausted_at: None,
            last_arbiter_error: None,
            actions: VecDeque::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When `handle_timeout` must be called next (an arbiter retry), if ever.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            State::Asking { retry_at, .. } => retry_at,
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Duration) {
        if let State::Asking {
            retry_at: Some(at), ..
        } = self.state
        {
            if now >= at {
                if let State::Asking { retry_at, .. } = &mut self.state {
                    *retry_at = None;
                }
                self.ask();
            }
        }
    }

    pub fn handle(&mut self, event: FailoverEvent, now: Duration) {
        match self.role {
            Role::Primary => self.handle_primary(event, now),
            Role::Backup => self.handle_backup(event, now),
        }
    }

    fn handle_primary(&mut self, event: FailoverEvent, now: Duration) {
        match (&self.state, event) {
            (State::Replicating, FailoverEvent::PeerSuspected) => {
                self.start_asking("the backup went silent".into(), now)
            }
            (State::Replicating, FailoverEvent::LinkClosed { reason }) => {
                self.start_asking(format!("the link closed: {reason}"), now)
            }
            (State::Replicating, FailoverEvent::Diverged { landmark, detail }) => {
                tracing::error!(landmark, %detail, "the backup's replay diverged; asking the arbiter to continue alone");
                self.start_asking(
                    format!("the backup diverged at landmark {landmark}: {detail}"),
                    now,
                )
            }
            (State::Replicating | State::Alone, FailoverEvent::Bye { reason }) => {
                self.end(reason, now)
            }
            (State::Asking { .. }, FailoverEvent::Bye { reason }) => {
                self.bye_pending = Some(reason)
            }
            (State::Asking { .. }, FailoverEvent::ArbiterVerdict(verdict)) => {
                if self.verdict(verdict, now) == Some(true) {
                    tracing::warn!(vm = %self.config.vm, generation = self.config.generation,
                        "won the arbiter: the primary continues ALONE, without a backup");
                    self.enter(State::Alone, now);
                    self.actions.push_back(Action::DropLog);
                    self.actions.push_back(Action::ReleaseAll);
                    if let Some(reason) = self.bye_pending.take() {
                        self.end(reason, now);
                    }
                }
            }
            (state, event) => ignored(self.role, state, &event),
        }
    }

    fn handle_backup(&mut self, event: FailoverEvent, now: Duration) {
        match (&self.state, event) {
            (State::Following, FailoverEvent::PeerSuspected) => {
                self.start_asking("the primary went silent".into(), now)
            }
            (State::Following, FailoverEvent::LinkClosed { reason }) => {
                self.start_asking(format!("the link closed: {reason}"), now)
            }
            (State::Following, FailoverEvent::Bye { reason }) => {
                self.actions.push_back(Action::FinishLog);
                self.enter(State::Ending { reason }, now);
            }
            (
                State::Following | State::Asking { .. } | State::Draining | State::Ending { .. },
                FailoverEvent::Diverged { landmark, detail },
            ) => {
                let message = format!(
                    "the backup's replay diverged at landmark {landmark}: {detail}; it stops \
                     (the primary continues alone)"
                );
                tracing::error!("{message}");
                self.enter(State::Diverged { landmark }, now);
                self.actions.push_back(Action::Stop {
                    exit_code: EXIT_DIVERGED,
                    message,
                });
            }
            (State::Asking { .. }, FailoverEvent::LogExhausted { landmark }) => {
                self.exhausted_at = Some(landmark)
            }
            (State::Asking { .. }, FailoverEvent::ArbiterVerdict(verdict)) => {
                if self.verdict(verdict, now) == Some(true) {
                    tracing::warn!(vm = %self.config.vm, generation = self.config.generation,
                        "won the arbiter: the backup finishes the log and goes live");
                    self.enter(State::Draining, now);
                    if let Some(landmark) = self.exhausted_at {
                        self.promote(landmark, now);
                    }
                }
            }
            (State::Draining, FailoverEvent::LogExhausted { landmark }) => {
                self.promote(landmark, now)
            }
            (State::Ending { reason }, FailoverEvent::LogExhausted { landmark }) => {
                let message = format!(
                    "the primary ended ({reason}); the backup replayed the log to landmark \
                     {landmark} and ends too"
                );
                self.actions.push_back(Action::Stop {
                    exit_code: 0,
                    message,
                });
            }
            (state, event) => ignored(self.role, state, &event),
        }
    }

    fn start_asking(&mut self, trigger: String, now: Duration) {
        tracing::warn!(role = %self.role, %trigger, "peer lost; asking the arbiter");
        self.enter(
            State::Asking {
                trigger,
                attempts: 0,
                retry_at: None,
            },
            now,
        );
        match self.role {
            Role::Primary => self.actions.push_back(Action::HoldOutputs),
            // Nothing more can arrive: replay what we have while the arbiter decides.
            Role::Backup => self.actions.push_back(Action::FinishLog),
        }
        self.ask();
    }

    fn ask(&mut self) {
        if let State::Asking { attempts, .. } = &mut self.state {
            *attempts += 1;
        }
        self.actions.push_back(Action::AskArbiter {
            vm: self.config.vm.clone(),
            generation: self.config.generation,
            requester: self.config.requester(self.role),
        });
    }

    /// Applies a verdict while asking: Some(true) won, Some(false) lost
    /// (Stop queued), None unreachable (retry scheduled).
    fn verdict(&mut self, verdict: Verdict, now: Duration) -> Option<bool> {
        let ours = self.config.generation;
        let lost = match verdict {
            Verdict::Decided(TasOutcome::Won { generation }) if generation == ours => {
                return Some(true)
            }
            Verdict::Decided(TasOutcome::Won { generation }) => format!(
                "the arbiter answered for generation {generation}, not ours ({ours}); \
                 not going on without a clear win"
            ),
            Verdict::Decided(TasOutcome::Held { holder, .. }) => match self.role {
                Role::Primary => format!("the backup took over (arbiter: held by {holder})"),
                Role::Backup => {
                    format!("the primary is alive and holds the slot (holder {holder})")
                }
            },
            Verdict::Decided(TasOutcome::NotArmed { generation }) => format!(
                "the arbiter slot is armed for generation {generation}, not {ours}: \
                 a repaired pair exists"
            ),
            Verdict::Unreachable { error } => {
                let State::Asking {
                    attempts, retry_at, ..
                } = &mut self.state
                else {
                    return None;
                };
                let shift = attempts.saturating_sub(1).min(16);
                let delay = self
                    .config
                    .retry_initial
                    .saturating_mul(1 << shift)
                    .min(self.config.retry_max);
                let at = now + delay;
                *retry_at = Some(at);
                tracing::warn!(attempt = *attempts, %error, retry_in = ?delay,
                    "arbiter unreachable; holding and retrying");
                self.last_arbiter_error = Some(error);
                self.actions.push_back(Action::RetryArbiterAt(at));
                return None;
            }
        };
        tracing::error!(role = %self.role, "{lost}");
        self.enter(
            State::Lost {
                message: lost.clone(),
            },
            now,
        );
        self.actions.push_back(Action::Stop {
            exit_code: EXIT_LOST,
            message: lost,
        });
        Some(false)
    }

    fn promote(&mut self, landmark: u64, now: Duration) {
        self.enter(State::Live { landmark }, now);
        self.actions.push_back(Action::Promote { landmark });
    }

    fn end(&mut self, reason: String, now: Duration) {
        let message = format!("the guest ended: {reason}");
        self.enter(State::Ending { reason }, now);
        self.actions.push_back(Action::Stop {
            exit_code: 0,
            message,
        });
    }

    fn enter(&mut self, state: State, now: Duration) {
        tracing::info!(role = %self.role, from = self.state.name(), to = state.name(), "failover state");
        self.state = state;
        self.since = now;
    }

    pub fn status(&self) -> FailoverStatus {
        let detail = match &self.state {
            State::Replicating => "outputs leave after the backup acknowledges the log".into(),
            State::Following => "replaying the primary's log one epoch behind".into(),
            State::Asking {
                trigger, attempts, ..
            } => match &self.last_arbiter_error {
                Some(error) => format!(
                    "{trigger}; asking the arbiter (attempt {attempts}, last error: {error})"
                ),
                None => format!("{trigger}; asking the arbiter (attempt {attempts})"),
            },
            State::Alone => "running alone: no backup, outputs are not held".into(),
            State::Draining => "won the arbiter; replaying the rest of the log".into(),
            State::Live { landmark } => format!("live since landmark {landmark}"),
            State::Ending { reason } => format!("ending: {reason}"),
            State::Lost { message } => message.clone(),
            State::Diverged { landmark } => format!("replay diverged at landmark {landmark}"),
        };
        FailoverStatus {
            role: self.role,
            state: self.state.name(),
            vm: self.config.vm.clone(),
            generation: self.config.generation,
            since: self.since,
            detail,
        }
    }
}

fn ignored(role: Role, state: &State, event: &FailoverEvent) {
    tracing::debug!(%role, state = state.name(), ?event, "event has no effect in this state");
}

#[cfg(test)]
#[path = "failover_tests.rs"]
mod tests;
