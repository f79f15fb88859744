//! Judging a drill (sans-IO): the client's [`Analysis`] and what became of
//! each side of the pair give a list of [`Check`]s; the drill passes only if
//! every one holds.

use std::time::Duration;

use serde::Serialize;

use super::history::Analysis;
use super::DrillKind;

/// What a drill expects to survive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expectation {
    /// This node must be the one serving afterwards.
    Survivor(String),
    /// Exactly one of the sides, whichever the arbiter chose.
    EitherSide,
}

impl Expectation {
    /// What `kind` expects of a pair whose primary runs on `primary` and
    /// backup on `backup` (node names).
    pub fn for_drill(kind: DrillKind, primary: &str, backup: &str) -> Expectation {
        match kind {
            DrillKind::KillPrimary | DrillKind::ArbiterLeader => {
                Expectation::Survivor(backup.to_owned())
            }
            DrillKind::KillBackup => Expectation::Survivor(primary.to_owned()),
            DrillKind::DoubleFailure => Expectation::Survivor(super::local::CLONE_NODE.to_owned()),
            DrillKind::Partition => Expectation::EitherSide,
        }
    }
}

/// States in which a side is serving the guest on its own after a failure
/// (pair-cli-contract: the primary's `alone`, the backup's `live`).
pub const SERVING_STATES: [&str; 2] = ["alone", "live"];

/// Exit code of a side that lost the arbitration (pair-cli-contract).
pub const EXIT_LOST_ARBITRATION: i32 = 3;

/// What became of one side (one `twinvm primary|backup` process, or the
/// single `twinvm run` of an unprotected drill).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SideOutcome {
    /// Its node name (`--node`), as the arbiter records the holder.
    pub node: String,
    /// `primary`, `backup`, or `unprotected` (a plain `twinvm run`).
    pub role: String,
    /// The drill killed it (the fault itself).
    pub killed_by_drill: bool,
    /// Still running when the drill ended.
    pub running: bool,
    /// Its exit code, if it exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub exit_signal: Option<i32>,
    /// Its `state` from the control socket at the end (if running and it answered).
    pub final_state: Option<String>,
    /// Its stderr said it won the arbitration and serves alone
    /// (`going live`, `live`, `continuing alone`).
    pub claimed_vm: bool,
    /// Its stderr said it lost the arbitration.
    pub reported_lost: bool,
}

impl SideOutcome {
    /// How the arbiter records this side when it wins: "node/role"
    /// (`FailoverConfig::requester`).
    pub fn arbiter_name(&self) -> String {
        format!("{}/{}", self.node, self.role)
    }

    /// Serving the guest alone at the end of the drill.
    pub fn serving(&self) -> bool {
        self.running
            && self
                .final_state
                .as_deref()
                .is_some_and(|s| SERVING_STATES.contains(&s))
    }

    fn how_it_ended(&self) -> String {
        if self.killed_by_drill {
            format!("{} ({}) killed by the drill", self.node, self.role)
        } else if self.running {
            format!(
                "{} ({}) running, state {}",
                self.node,
                self.role,
                self.final_state.as_deref().unwrap_or("unknown")
            )
        } else if let Some(code) = self.exit_code {
            format!("{} ({}) exited with code {code}", self.node, self.role)
        } else if let Some(sig) = self.exit_signal {
            format!("{} ({}) ended by signal {sig}", self.node, self.role)
        } else {
            format!("{} ({}) ended", self.node, self.role)
        }
    }
}

/// What the drill learnt about the pair after the fault.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PairOutcome {
    pub sides: Vec<SideOutcome>,
    /// The arbiter's holder of the VM: `None` if it was not asked (or could
    /// not answer: see `arbiter_error`), `Some(None)` if the VM has no holder.
    pub arbiter_holder: Option<Option<String>>,
    pub arbiter_error: Option<String>,
}

impl PairOutcome {
    /// The one side serving alone, if exactly one is.
    pub fn survivor(&self) -> Option<&SideOutcome> {
        let mut serving = self.sides.iter().filter(|s| s.serving());
        match (serving.next(), serving.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }
}

/// One property of the drill and whether it held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// Limits the caller may add to the verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Fail if the service interruption is longer.
    pub max_failover: Option<Duration>,
}

/// The judgement of one drill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub passed: bool,
    /// The node serving afterwards, if exactly one is.
    pub went_live: Option<String>,
    /// The service interruption from the fault on, in milliseconds.
    pub failover_ms: Option<f64>,
    pub checks: Vec<Check>,
    /// Set when the pair failed over by itself before the fault: the run
    /// does not pass, and says so apart from a failed drill.
    pub pre_fault_failover: Option<PreFaultFailover>,
}

impl Verdict {
    /// The pair failed over by itself before the fault: the drill's fault
    /// was not what it judged.
    pub fn inconclusive(&self) -> bool {
        self.pre_fault_failover.is_some()
    }

    /// Every check in [`SAFETY_CHECKS`] that is present held.
    pub fn safe(&self) -> bool {
        self.checks
            .iter()
            .filter(|c| SAFETY_CHECKS.contains(&c.name))
            .all(|c| c.passed)
    }
}

/// A failover the pair made by itself before the drill's fault: a side
/// suspected its peer while both were alive and linked (the failure
/// detector's false alarm, seen on overloaded hosts). What the drill then
/// saw is not the outcome of its fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreFaultFailover {
    /// What showed it: a side's state or exit, or the line it wrote.
    pub evidence: String,
    /// The drill injected its fault anyway (the failover showed only
    /// afterwards, in what a killed side had written before it died).
    pub fault_injected: bool,
}

/// The name of the check a pre-fault failover fails.
pub const PAIR_WHOLE_CHECK: &str = "pair whole until the fault";

/// Checks that must hold whatever happened, a pre-fault failover included:
/// the pair's safety, not the drill's expected outcome.
pub const SAFETY_CHECKS: [&str; 3] = [
    "counter never went backwards",
    "no acknowledged value repeated",
    "no split-brain",
];

/// Lost request ids named in the check's text (the report's analysis keeps more).
const LOST_IDS_SHOWN: usize = 10;

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Judge a drill from the client's analysis and the pair's outcome.
///
/// With `pre_fault` (the pair failed over by itself before the fault) the
/// run cannot pass: a failed [`PAIR_WHOLE_CHECK`] says why, and the other
/// checks judge what happened. When the fault was not injected, that was
/// the pair's own failover, so either side may have won it.
pub fn judge(
    analysis: &Analysis,
    pair: &PairOutcome,
    expect: &Expectation,
    limits: Limits,
    pre_fault: Option<&PreFaultFailover>,
) -> Verdict {
    let expect = match pre_fault {
        Some(p) if !p.fault_injected => &Expectation::EitherSide,
        _ => expect,
    };
    let mut checks = Vec::new();
    let failover = analysis.interruption.map(|i| i.length());

    checks.push(Check {
        name: "requests lost",
        passed: analysis.lost == 0,
        detail: if analysis.lost == 0 {
            format!("0 of {}", analysis.requests)
        } else {
            let shown = &analysis.lost_ids[..analysis.lost_ids.len().min(LOST_IDS_SHOWN)];
            format!(
                "{} of {} never answered (ids {}{})",
                analysis.lost,
                analysis.requests,
                join(shown),
                if analysis.lost as usize > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            )
        },
    });
    checks.push(Check {
        name: "service resumed",
        passed: analysis.answered_sent_after_fault > 0,
        detail: match failover {
            Some(d) if analysis.answered_sent_after_fault > 0 => format!(
                "{} answers after the fault; longest silence {:.1} ms",
                analysis.replies_after_fault,
                millis(d)
            ),
            _ if analysis.replies_after_fault > 0 => format!(
                "no request sent after the fault was answered (the {} replies after it \
                 answered earlier requests: in flight from the side that was stopped)",
                analysis.replies_after_fault
            ),
            _ => "no answer after the fault".to_owned(),
        },
    });
    checks.push(Check {
        name: "counter never went backwards",
        passed: analysis.backwards == 0,
        detail: anomalies(analysis.backwards, &analysis.backwards_examples),
    });
    checks.push(Check {
        name: "no acknowledged value repeated",
        passed: analysis.repeated == 0,
        detail: anomalies(analysis.repeated, &analysis.repeated_examples),
    });

    let survivor = pair.survivor();
    checks.push(split_brain(pair));
    checks.push(match (expect, survivor) {
        (_, None) => Check {
            name: "who went live",
            passed: false,
            detail: format!(
                "no single side serves the guest: {}",
                pair.sides
                    .iter()
                    .map(SideOutcome::how_it_ended)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        },
        (Expectation::Survivor(want), Some(s)) => Check {
            name: "who went live",
            passed: &s.node == want,
            detail: if &s.node == want {
                format!("{} ({}, state {})", s.node, s.role, state(s))
            } else {
                format!("{} ({}) went live; expected {want}", s.node, s.role)
            },
        },
        (Expectation::EitherSide, Some(s)) => Check {
            name: "who went live",
            passed: true,
            detail: format!("{} ({}, state {})", s.node, s.role, state(s)),
        },
    });

    if let Some(max) = limits.max_failover {
        checks.push(Check {
            name: "failover time within the limit",
            passed: failover.is_some_and(|d| d <= max),
            detail: match failover {
                Some(d) => format!("{:.1} ms (limit {:.1} ms)", millis(d), millis(max)),
                None => format!("no failover measured (limit {:.1} ms)", millis(max)),
            },
        });
    }

    if let Some(p) = pre_fault {
        checks.push(Check {
            name: PAIR_WHOLE_CHECK,
            passed: false,
            detail: format!(
                "the pair failed over by itself before the fault: {}; {}",
                p.evidence,
                if p.fault_injected {
                    "the fault was injected anyway, so the other checks judge two failures, \
                     not the drill's one"
                } else {
                    "the fault was not injected, so the other checks judge that failover"
                }
            ),
        });
    }

    Verdict {
        passed: pre_fault.is_none() && checks.iter().all(|c| c.passed),
        went_live: survivor.map(|s| s.node.clone()),
        failover_ms: failover.map(millis),
        checks,
        pre_fault_failover: pre_fault.cloned(),
    }
}

fn state(s: &SideOutcome) -> &str {
    s.final_state.as_deref().unwrap_or("unknown")
}

fn join(ids: &[u64]) -> String {
    ids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn anomalies(count: u64, examples: &[super::history::CounterAnomaly]) -> String {
    if count == 0 {
        return "never".to_owned();
    }
    let shown: Vec<String> = examples
        .iter()
        .take(3)
        .map(|e| {
            format!(
                "id {} got {} after {} had been acknowledged",
                e.id, e.value, e.previous_max
            )
        })
        .collect();
    format!("{count} times: {}", shown.join("; "))
}

/// Split brain: both sides acting as the VM after the fault. It shows as more
/// than one side serving, more than one claiming the VM, a side that was
/// neither killed nor serving still running or ending otherwise than by
/// losing the arbitration, or an arbiter holder other than the survivor.
fn split_brain(pair: &PairOutcome) -> Check {
    let mut problems = Vec::new();
    let serving: Vec<&SideOutcome> = pair.sides.iter().filter(|s| s.serving()).collect();
    if serving.len() > 1 {
        problems.push(format!(
            "{} sides serve the guest ({})",
            serving.len(),
            serving
                .iter()
                .map(|s| s.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let claims: Vec<&SideOutcome> = pair
        .sides
        .iter()
        .filter(|s| s.claimed_vm && !s.killed_by_drill)
        .collect();
    if claims.len() > 1 {
        problems.push(format!(
            "{} sides said they won the arbitration",
            claims.len()
        ));
    }
    for s in &pair.sides {
        if s.killed_by_drill || s.serving() {
            continue;
        }
        if s.running {
            problems.push(format!(
                "{} ({}) is still running in state {}, neither serving nor stopped",
                s.node,
                s.role,
                state(s)
            ));
        } else if s.exit_code != Some(EXIT_LOST_ARBITRATION) {
            problems.push(format!(
                "{} did not stop by losing the arbitration (exit code {EXIT_LOST_ARBITRATION})",
                s.how_it_ended()
            ));
        }
    }
    match (&pair.arbiter_holder, serving.as_slice()) {
        (Some(Some(holder)), [one]) if holder != &one.arbiter_name() => problems.push(format!(
            "the arbiter names {holder} as the holder, but {} serves",
            one.arbiter_name()
        )),
        (Some(None), [one]) => problems.push(format!(
            "{} serves but the arbiter records no holder",
            one.node
        )),
        _ => {}
    }
    if problems.is_empty() {
        let mut parts: Vec<String> = pair.sides.iter().map(SideOutcome::how_it_ended).collect();
        match (&pair.arbiter_holder, &pair.arbiter_error) {
            (Some(Some(h)), _) => parts.push(format!("arbiter holder {h}")),
            (_, Some(e)) => parts.push(format!("arbiter not asked ({e})")),
            _ => {}
        }
        Check {
            name: "no split-brain",
            passed: true,
            detail: parts.join("; "),
        }
    } else {
        Check {
            name: "no split-brain",
            passed: false,
            detail: problems.join("; "),
        }
    }
}

/// min / median / max of a set of failover times, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub count: usize,
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
}

/// The spread of `values` (ms); `None` when empty or any is not finite.
pub fn spread(values: &[f64]) -> Option<Spread> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        count: n,
        min_ms: v[0],
        median_ms: median,
        max_ms: v[n - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::super::history::{analyze, History, Reply, RequestRecord};
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A history with an outage from 500 to 700 ms around a fault at 498 ms.
    fn failover_history(lost: bool) -> Analysis {
        let mut h = History::default();
        let mut value = 0;
        for at in (5..=500).step_by(5).chain((700..=800).step_by(5)) {
            value += 1;
            h.requests.push(RequestRecord {
                id: value,
                first_sent: ms(at - 1),
                sends: 1,
                answered: Some(ms(at)),
            });
            h.replies.push(Reply {
                id: value,
                value,
                at: ms(at),
            });
        }
        if lost {
            h.requests.push(RequestRecord {
                id: value + 1,
                first_sent: ms(801),
                sends: 30,
                answered: None,
            });
        }
        analyze(&h, Some(ms(498)))
    }

    fn side(node: &str, role: &str) -> SideOutcome {
        SideOutcome {
            node: node.into(),
            role: role.into(),
            ..SideOutcome::default()
        }
    }

    fn killed(node: &str, role: &str) -> SideOutcome {
        SideOutcome {
            killed_by_drill: true,
            exit_signal: Some(9),
            ..side(node, role)
        }
    }

    fn serving(node: &str, role: &str, state: &str) -> SideOutcome {
        SideOutcome {
            running: true,
            final_state: Some(state.into()),
            claimed_vm: true,
            ..side(node, role)
        }
    }

    fn lost_arbitration(node: &str, role: &str) -> SideOutcome {
        SideOutcome {
            exit_code: Some(EXIT_LOST_ARBITRATION),
            reported_lost: true,
            ..side(node, role)
        }
    }

    fn pair(sides: Vec<SideOutcome>, holder: Option<&str>) -> PairOutcome {
        PairOutcome {
            sides,
            arbiter_holder: Some(holder.map(str::to_owned)),
            arbiter_error: None,
        }
    }

    fn failed(v: &Verdict) -> Vec<&'static str> {
        v.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_good_kill_primary_drill_passes() {
        let a = failover_history(false);
        let p = pair(
            vec![
                killed("hostA", "primary"),
                serving("hostB", "backup", "live"),
            ],
            Some("hostB/backup"),
        );
        let expect = Expectation::for_drill(DrillKind::KillPrimary, "hostA", "hostB");
        let v = judge(&a, &p, &expect, Limits::default(), None);
        assert!(v.passed, "{v:#?}");
        assert_eq!(v.went_live.as_deref(), Some("hostB"));
        assert_eq!(v.failover_ms, Some(200.0));
        let split = v
            .checks
            .iter()
            .find(|c| c.name == "no split-brain")
            .unwrap();
        assert!(
            split.detail.contains("arbiter holder hostB"),
            "{}",
            split.detail
        );
    }

    #[test]
    fn lost_requests_fail_the_drill() {
        let a = failover_history(true);
        let p = pair(
            vec![
                killed("hostA", "primary"),
                serving("hostB", "backup", "live"),
            ],
            Some("hostB/backup"),
        );
        let expect = Expectation::Survivor("hostB".into());
        let v = judge(&a, &p, &expect, Limits::default(), None);
        assert!(!v.passed);
        assert_eq!(failed(&v), ["requests lost"]);
        let c = &v.checks[0];
        assert!(
            c.detail.contains("1 of 122 never answered (ids 122)"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn the_wrong_survivor_fails() {
        let a = failover_history(false);
        let p = pair(
            vec![
                serving("hostA", "primary", "alone"),
                lost_arbitration("hostB", "backup"),
            ],
            Some("hostA/primary"),
        );
        let v = judge(
            &a,
            &p,
            &Expectation::for_drill(DrillKind::KillPrimary, "hostA", "hostB"),
            Limits::default(),
            None,
        );
        assert_eq!(failed(&v), ["who went live"]);
        // The same outcome is fine for a partition: either side may win.
        let v = judge(
            &a,
            &p,
            &Expectation::for_drill(DrillKind::Partition, "hostA", "hostB"),
            Limits::default(),
            None,
        );
        assert!(v.passed, "{v:#?}");
    }

    #[test]
    fn two_serving_sides_are_split_brain() {
        let a = failover_history(false);
        let p = pair(
            vec![
                serving("hostA", "primary", "alone"),
                serving("hostB", "backup", "live"),
            ],
            Some("hostB/backup"),
        );
        let v = judge(&a, &p, &Expectation::EitherSide, Limits::default(), None);
        assert_eq!(failed(&v), ["no split-brain", "who went live"]);
        let c = v
            .checks
            .iter()
            .find(|c| c.name == "no split-brain")
            .unwrap();
        assert!(
            c.detail.contains("2 sides serve the guest (hostA, hostB)"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("2 sides said they won"), "{}", c.detail);
    }

    #[test]
    fn a_loser_must_stop_with_the_lost_arbitration_code() {
        let a = failover_history(false);
        let mut loser = lost_arbitration("hostA", "primary");
        loser.exit_code = Some(1);
        let p = pair(
            vec![loser, serving("hostB", "backup", "live")],
            Some("hostB/backup"),
        );
        let v = judge(&a, &p, &Expectation::EitherSide, Limits::default(), None);
        assert_eq!(failed(&v), ["no split-brain"]);
        assert!(
            v.checks[4].detail.contains("exited with code 1"),
            "{}",
            v.checks[4].detail
        );

        // Still running, not serving: the partition was never resolved.
        let stuck = SideOutcome {
            running: true,
            final_state: Some("asking".into()),
            ..side("hostA", "primary")
        };
        let p = pair(
            vec![stuck, serving("hostB", "backup", "live")],
            Some("hostB/backup"),
        );
        let v = judge(&a, &p, &Expectation::EitherSide, Limits::default(), None);
        assert_eq!(failed(&v), ["no split-brain"]);
        assert!(
            v.checks[4].detail.contains("state asking"),
            "{}",
            v.checks[4].detail
        );
    }

    #[test]
    fn the_arbiter_must_name_the_survivor() {
        let a = failover_history(false);
        let sides = vec![
            killed("hostA", "primary"),
            serving("hostB", "backup", "live"),
        ];
        let v = judge(
            &a,
            &pair(sides.clone(), Some("hostA/primary")),
            &Expectation::EitherSide,
            Limits::default(),
            None,
        );
        assert_eq!(failed(&v), ["no split-brain"]);
        let v = judge(
            &a,
            &pair(sides.clone(), None),
            &Expectation::EitherSide,
            Limits::default(),
            None,
        );
        assert_eq!(failed(&v), ["no split-brain"]);
        // Not asked (an existing pair without --arbiters): not held against it.
        let p = PairOutcome {
            sides,
            arbiter_holder: None,
            arbiter_error: Some("no --arbiters given".into()),
        };
        let v = judge(&a, &p, &Expectation::EitherSide, Limits::default(), None);
        assert!(v.passed, "{v:#?}");
    }

    #[test]
    fn an_unprotected_guest_fails_every_way_it_should() {
        // No backup: the killed VM's requests are lost and nobody serves.
        let mut h = History::default();
        for id in 1..=10u64 {
            h.requests.push(RequestRecord {
                id,
                first_sent: ms(5 * id),
                sends: if id == 10 { 50 } else { 1 },
                answered: (id < 10).then(|| ms(5 * id + 1)),
            });
            if id < 10 {
                h.replies.push(Reply {
                    id,
                    value: id,
                    at: ms(5 * id + 1),
                });
            }
        }
        let a = analyze(&h, Some(ms(48)));
        let p = PairOutcome {
            sides: vec![killed("hostA", "unprotected")],
            ..PairOutcome::default()
        };
        let v = judge(
            &a,
            &p,
            &Expectation::Survivor("hostB".into()),
            Limits::default(),
            None,
        );
        assert!(!v.passed);
        assert_eq!(
            failed(&v),
            ["requests lost", "service resumed", "who went live"]
        );
        assert_eq!(v.went_live, None);
        assert_eq!(v.failover_ms, None);
    }

    #[test]
    fn a_failover_limit_is_checked() {
        let a = failover_history(false);
        let p = pair(
            vec![
                killed("hostA", "primary"),
                serving("hostB", "backup", "live"),
            ],
            Some("hostB/backup"),
        );
        let expect = Expectation::Survivor("hostB".into());
        let tight = Limits {
            max_failover: Some(ms(150)),
        };
        let v = judge(&a, &p, &expect, tight, None);
        assert_eq!(failed(&v), ["failover time within the limit"]);
        let loose = Limits {
            max_failover: Some(ms(300)),
        };
        assert!(judge(&a, &p, &expect, loose, None).passed);
    }

    #[test]
    fn a_failover_before_the_fault_is_inconclusive_not_passed() {
        // Before a kill-backup's fault, the backup suspected the primary and
        // won: the fault was not injected, and the pair's own failover is
        // judged as one (either side may win it).
        let a = failover_history(false);
        let p = pair(
            vec![
                lost_arbitration("hostA", "primary"),
                serving("hostB", "backup", "live"),
            ],
            Some("hostB/backup"),
        );
        let expect = Expectation::for_drill(DrillKind::KillBackup, "hostA", "hostB");
        let early = PreFaultFailover {
            evidence: "hostA (primary) lost the arbitration and exited".into(),
            fault_injected: false,
        };
        let v = judge(&a, &p, &expect, Limits::default(), Some(&early));
        assert!(!v.passed && v.inconclusive() && v.safe(), "{v:#?}");
        assert_eq!(failed(&v), [PAIR_WHOLE_CHECK]);
        assert_eq!(v.went_live.as_deref(), Some("hostB"));
        let c = v.checks.last().unwrap();
        assert!(
            c.detail.contains("hostA (primary) lost the arbitration")
                && c.detail.contains("the fault was not injected"),
            "{}",
            c.detail
        );
        assert_eq!(v.pre_fault_failover, Some(early));
        // Without it, the same outcome fails a kill-backup drill plainly.
        let v = judge(&a, &p, &expect, Limits::default(), None);
        assert!(!v.passed && !v.inconclusive(), "{v:#?}");
        assert_eq!(failed(&v), ["who went live"]);
    }

    #[test]
    fn a_failover_seen_only_after_the_fault_keeps_the_expectation() {
        // The killed backup had already won when the drill killed it; the
        // primary had lost: nobody serves. Inconclusive, and still safe.
        let a = failover_history(false);
        let p = pair(
            vec![
                lost_arbitration("hostA", "primary"),
                killed("hostB", "backup"),
            ],
            Some("hostB/backup"),
        );
        let expect = Expectation::for_drill(DrillKind::KillBackup, "hostA", "hostB");
        let late = PreFaultFailover {
            evidence: "hostB (backup) had written `twinvm backup: primary lost` before the drill killed it".into(),
            fault_injected: true,
        };
        let v = judge(&a, &p, &expect, Limits::default(), Some(&late));
        assert!(!v.passed && v.inconclusive() && v.safe(), "{v:#?}");
        assert_eq!(failed(&v), ["who went live", PAIR_WHOLE_CHECK]);
        assert!(
            v.checks.last().unwrap().detail.contains("injected anyway"),
            "{v:#?}"
        );
    }

    #[test]
    fn a_pre_fault_failover_does_not_excuse_a_split_brain() {
        let a = failover_history(false);
        let p = pair(
            vec![
                serving("hostA", "primary", "alone"),
                serving("hostB", "backup", "live"),
            ],
            Some("hostB/backup"),
        );
        let early = PreFaultFailover {
            evidence: "hostB (backup) wrote `twinvm backup: primary lost`".into(),
            fault_injected: false,
        };
        let v = judge(
            &a,
            &p,
            &Expectation::EitherSide,
            Limits::default(),
            Some(&early),
        );
        assert!(v.inconclusive() && !v.safe(), "{v:#?}");
        assert_eq!(
            failed(&v),
            ["no split-brain", "who went live", PAIR_WHOLE_CHECK]
        );
    }

    #[test]
    fn spread_is_min_median_max() {
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[1.0, f64::NAN]), None);
        let s = spread(&[30.0, 10.0, 20.0]).unwrap();
        assert_eq!(
            (s.count, s.min_ms, s.median_ms, s.max_ms),
            (3, 10.0, 20.0, 30.0)
        );
        let s = spread(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.min_ms, s.median_ms, s.max_ms), (1.0, 2.5, 4.0));
    }
}
