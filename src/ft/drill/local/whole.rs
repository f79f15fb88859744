//! Faults go into a whole pair only: the warm-up before a fault, and how
//! the drill tells that the pair failed over by itself before it (an
//! overloaded host can starve a side past its peer timeout) — a side wrote
//! that it suspected its peer, lost the arbitration, or reported a state
//! other than `replicating`/`following` when the fault was due; or a side
//! the drill killed had suspected its peer before it died. Such a run is
//! judged as a [`PreFaultFailover`], never as the drill's fault.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{ended_early, query_status, LocalPair, Protection, STATUS_TIMEOUT, WHOLE_STATES};
use crate::ft::drill::client::Client;
use crate::ft::drill::pair::{suspicions, Proc};
use crate::ft::drill::verdict::{PreFaultFailover, EXIT_LOST_ARBITRATION};
use crate::ft::drill::{DrillError, Phases, POLL};

impl LocalPair {
    /// The pair is whole now: remember how many suspicions each running
    /// side has written, so that a new one shows a failover after this.
    pub fn mark_whole(&mut self) {
        for p in &mut self.sides {
            if p.running() {
                let n = suspicions(&p.stderr_text()).len();
                self.whole_marks.insert(p.node.clone(), n);
            }
        }
    }

    /// The first suspicion `p` wrote since the pair was last marked whole.
    fn new_suspicion(&self, p: &Proc) -> Option<String> {
        let seen = self.whole_marks.get(&p.node).copied().unwrap_or(0);
        suspicions(&p.stderr_text())
            .get(seen)
            .map(|l| (*l).to_owned())
    }

    /// A failover the pair began by itself since it was marked whole, among
    /// the sides from index `first` on: one wrote a suspicion of its peer,
    /// or ended by losing the arbitration. A side ending otherwise is an
    /// error ([`DrillError::EndedEarly`]).
    pub(super) fn failover_since_whole(
        &mut self,
        first: usize,
    ) -> Result<Option<String>, DrillError> {
        if self.protection == Protection::Unprotected {
            return self.check_running().map(|()| None);
        }
        for i in first..self.sides.len() {
            if let Some(line) = self.new_suspicion(&self.sides[i]) {
                let p = &self.sides[i];
                return Ok(Some(format!("{} ({}) wrote `{line}`", p.node, p.role)));
            }
            let p = &mut self.sides[i];
            if let Some(status) = p.poll_exit() {
                if status.code() == Some(EXIT_LOST_ARBITRATION) {
                    return Ok(Some(format!(
                        "{} ({}) lost the arbitration and exited",
                        p.node, p.role
                    )));
                }
                return Err(ended_early(p).expect("it has ended"));
            }
        }
        Ok(None)
    }

    /// Just before the fault: a side from index `first` on whose control
    /// socket reports a state other than a whole pair's (a status that does
    /// not come is no evidence either way).
    pub(super) fn not_whole(&mut self, first: usize) -> Result<Option<String>, DrillError> {
        if let Some(found) = self.failover_since_whole(first)? {
            return Ok(Some(found));
        }
        if self.protection == Protection::Unprotected {
            return Ok(None);
        }
        for p in &self.sides[first..] {
            if let Ok(s) = query_status(&p.files.control, STATUS_TIMEOUT) {
                if !WHOLE_STATES.contains(&s.state.as_str()) {
                    return Ok(Some(format!(
                        "{} ({}) was in state {} when the fault was due",
                        p.node, p.role, s.state
                    )));
                }
            }
        }
        Ok(None)
    }

    /// After the fault: a side the drill killed had suspected its peer
    /// before it died (a killed process writes nothing more), so the pair
    /// was failing over by itself already.
    pub(super) fn killed_side_had_suspected(&self) -> Option<String> {
        self.sides
            .iter()
            .filter(|p| p.killed_by_drill())
            .find_map(|p| {
                self.new_suspicion(p).map(|line| {
                    format!(
                        "{} ({}) had written `{line}` before the drill killed it",
                        p.node, p.role
                    )
                })
            })
    }
}

/// The steady traffic before a fault: at least `phases.warmup`, and until
/// the client has had `phases.warmup_answers` answers more than when it
/// began (within `phases.ready_timeout`). Returns early with the evidence
/// if the pair (its sides from index `first` on) fails over by itself
/// meanwhile.
pub(super) fn warm_up(
    lp: &mut LocalPair,
    client: &Client,
    phases: &Phases,
    first: usize,
    interrupted: &AtomicBool,
) -> Result<Option<String>, DrillError> {
    let start = Instant::now();
    let before = client.answered();
    loop {
        if interrupted.load(Ordering::SeqCst) {
            return Err(DrillError::Interrupted);
        }
        if let Some(found) = lp.failover_since_whole(first)? {
            return Ok(Some(found));
        }
        let answers = client.answered() - before;
        let elapsed = start.elapsed();
        if elapsed >= phases.warmup && answers >= phases.warmup_answers.max(1) {
            return Ok(None);
        }
        if elapsed >= phases.warmup.max(phases.ready_timeout) {
            return Err(DrillError::Timeout {
                what: format!("{} answers before the fault", phases.warmup_answers.max(1)),
                after: elapsed,
                detail: format!(" (the guest answered {answers})"),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// What the drill did for its fault.
pub(super) struct Injected {
    /// In words, for the report.
    pub what: String,
    /// When (the last fault's moment), from the client's epoch.
    pub at: Duration,
    /// The pair had failed over by itself before the fault was due.
    pub pre_fault: Option<PreFaultFailover>,
}

/// `fault` (the one that was due) was not injected: the pair had failed
/// over by itself, as `evidence` shows.
pub(super) fn not_injected(client: &Client, fault: &str, evidence: String) -> Injected {
    Injected {
        what: format!("none: the pair failed over by itself before {fault} was due"),
        at: client.epoch().elapsed(),
        pre_fault: Some(PreFaultFailover {
            evidence,
            fault_injected: false,
        }),
    }
}
