//! A drill's report: what was done, what the client saw, what became of the
//! pair, and the verdict — as text for people and JSON for scripts.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::history::Analysis;
use super::verdict::{spread, PairOutcome, Spread, Verdict};
use super::DrillKind;

/// The last stderr lines of a process, kept in a failed drill's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessLog {
    pub node: String,
    pub role: String,
    pub lines: Vec<String>,
}

/// Everything one drill found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrillReport {
    pub drill: DrillKind,
    /// `local` (the drill built the pair) or `existing`.
    pub mode: &'static str,
    /// `pair`, or `unprotected` (the guest alone, no backup: a baseline).
    pub protection: &'static str,
    /// The network, for a local drill.
    pub network: Option<String>,
    /// What the drill did.
    pub fault: String,
    /// When, in ms from the client's start.
    pub fault_at_ms: f64,
    /// From the start of the drill until the guest answered.
    pub setup_ms: f64,
    pub verdict: Verdict,
    pub analysis: Analysis,
    pub pair: PairOutcome,
    /// The processes' last stderr lines, when the drill failed.
    pub logs: Vec<ProcessLog>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.verdict.passed
    }

    /// The report as lines of text.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let v = &self.verdict;
        let a = &self.analysis;
        let protection = match self.protection {
            "pair" => "FT pair",
            other => other,
        };
        let _ = writeln!(
            out,
            "drill {} ({}, {protection}): {}",
            self.drill,
            self.mode,
            if v.passed {
                "PASS"
            } else if v.inconclusive() {
                "INCONCLUSIVE (the pair failed over by itself before the fault)"
            } else {
                "FAIL"
            }
        );
        if let Some(net) = &self.network {
            let _ = writeln!(out, "  network:   {net}");
        }
        let _ = writeln!(
            out,
            "  fault:     {} at {:.3} s (setup took {:.1} s)",
            self.fault,
            self.fault_at_ms / 1e3,
            self.setup_ms / 1e3
        );
        let _ = writeln!(
            out,
            "  went live: {}",
            v.went_live.as_deref().unwrap_or("nobody")
        );
        let fault_at = Duration::from_secs_f64(self.fault_at_ms.max(0.0) / 1e3);
        let since_fault = |t: Duration| ms(t) - ms(fault_at);
        match a.interruption {
            Some(gap) => {
                let _ = writeln!(
                    out,
                    "  failover:  {:.1} ms without an answer (last answer {:+.1} ms from the fault, next {:+.1} ms)",
                    ms(gap.length()),
                    since_fault(gap.last_before),
                    since_fault(gap.first_after)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  failover:  none measured (no answer after the fault)"
                );
            }
        }
        let _ = writeln!(
            out,
            "  requests:  {} sent, {} answered, {} lost; {} retries; {} replies ({} duplicates, {} answered again)",
            a.requests, a.answered, a.lost, a.retries, a.replies, a.duplicate_replies, a.reanswered
        );
        let _ = writeln!(out, "  checks:");
        for c in &v.checks {
            let _ = writeln!(
                out,
                "    {:<4}  {}: {}",
                if c.passed { "ok" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        for log in &self.logs {
            let _ = writeln!(out, "  last lines of {} ({}):", log.node, log.role);
            if log.lines.is_empty() {
                let _ = writeln!(out, "    (nothing)");
            }
            for line in &log.lines {
                let _ = writeln!(out, "    | {line}");
            }
        }
        out
    }
}

/// Several runs of one drill (`--repeat`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RepeatSummary {
    pub drill: DrillKind,
    pub runs: usize,
    pub passed: usize,
    /// Runs whose pair failed over by itself before the fault (not passed).
    pub inconclusive: usize,
    /// Failover times of the runs that measured one (inconclusive runs left out).
    pub failover: Option<Spread>,
}

impl RepeatSummary {
    pub fn of(drill: DrillKind, reports: &[DrillReport]) -> RepeatSummary {
        // An inconclusive run measured the pair's own failover, not the drill's.
        let times: Vec<f64> = reports
            .iter()
            .filter(|r| !r.verdict.inconclusive())
            .filter_map(|r| r.verdict.failover_ms)
            .collect();
        RepeatSummary {
            drill,
            runs: reports.len(),
            passed: reports.iter().filter(|r| r.passed()).count(),
            inconclusive: reports.iter().filter(|r| r.verdict.inconclusive()).count(),
            failover: spread(&times),
        }
    }

    pub fn all_passed(&self) -> bool {
        self.runs > 0 && self.passed == self.runs
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "drill {}: {} of {} runs passed",
            self.drill, self.passed, self.runs
        );
        if self.inconclusive > 0 {
            let _ = write!(
                out,
                " ({} inconclusive: the pair failed over by itself before the fault)",
                self.inconclusive
            );
        }
        match &self.failover {
            Some(s) => {
                let _ = write!(
                    out,
                    "; failover time over {} runs: min {:.1} ms, median {:.1} ms, max {:.1} ms",
                    s.count, s.min_ms, s.median_ms, s.max_ms
                );
            }
            None => out.push_str("; no failover time measured"),
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::history::Interruption;
    use super::super::verdict::{Check, PreFaultFailover, SideOutcome};
    use super::*;

    fn report(passed: bool, failover_ms: Option<f64>) -> DrillReport {
        DrillReport {
            drill: DrillKind::KillPrimary,
            mode: "local",
            protection: "pair",
            network: Some("client 10.77.0.100".into()),
            fault: "SIGKILL of the primary on hostA (pid 7)".into(),
            fault_at_ms: 2000.0,
            setup_ms: 1500.0,
            verdict: Verdict {
                passed,
                went_live: Some("hostB".into()),
                failover_ms,
                checks: vec![Check {
                    name: "requests lost",
                    passed,
                    detail: "0 of 10".into(),
                }],
                pre_fault_failover: None,
            },
            analysis: Analysis {
                requests: 10,
                answered: 10,
                interruption: Some(Interruption {
                    last_before: Duration::from_millis(1999),
                    first_after: Duration::from_millis(2210),
                }),
                ..Analysis::default()
            },
            pair: PairOutcome {
                sides: vec![SideOutcome::default()],
                ..PairOutcome::default()
            },
            logs: if passed {
                vec![]
            } else {
                vec![ProcessLog {
                    node: "hostB".into(),
                    role: "backup".into(),
                    lines: vec!["twinvm: error: boom".into()],
                }]
            },
        }
    }

    #[test]
    fn text_report_names_the_essentials() {
        let t = report(true, Some(211.0)).to_text();
        assert!(
            t.starts_with("drill kill-primary (local, FT pair): PASS\n"),
            "{t}"
        );
        assert!(t.contains("went live: hostB"), "{t}");
        assert!(
            t.contains("failover:  211.0 ms without an answer (last answer -1.0 ms from the fault, next +210.0 ms)"),
            "{t}"
        );
        assert!(t.contains("    ok    requests lost: 0 of 10"), "{t}");
        let t = report(false, None).to_text();
        assert!(
            t.contains(": FAIL\n") && t.contains("FAIL  requests lost"),
            "{t}"
        );
        assert!(
            t.contains("last lines of hostB (backup):\n    | twinvm: error: boom"),
            "{t}"
        );
    }

    #[test]
    fn json_report_has_the_verdict() {
        let j = serde_json::to_value(report(true, Some(211.0))).unwrap();
        assert_eq!(j["drill"], "kill-primary");
        assert_eq!(j["verdict"]["passed"], true);
        assert_eq!(j["verdict"]["went_live"], "hostB");
        assert_eq!(j["analysis"]["lost"], 0);
        // Times are milliseconds.
        assert_eq!(j["analysis"]["interruption"]["last_before_ms"], 1999.0);
        assert_eq!(j["analysis"]["interruption"]["first_after_ms"], 2210.0);
        assert!(j["analysis"]["first_reply_after_fault_ms"].is_null());
    }

    #[test]
    fn repeat_summary_spreads_failover_times() {
        let runs = [
            report(true, Some(300.0)),
            report(true, Some(100.0)),
            report(false, None),
            report(true, Some(200.0)),
        ];
        let s = RepeatSummary::of(DrillKind::KillPrimary, &runs);
        assert_eq!((s.runs, s.passed), (4, 3));
        assert!(!s.all_passed());
        assert_eq!(
            s.to_text(),
            "drill kill-primary: 3 of 4 runs passed; failover time over 3 runs: min 100.0 ms, median 200.0 ms, max 300.0 ms\n"
        );
        assert!(!RepeatSummary::of(DrillKind::Partition, &[]).all_passed());
    }

    #[test]
    fn a_pre_fault_failover_is_reported_apart() {
        let mut r = report(false, None);
        r.verdict.pre_fault_failover = Some(PreFaultFailover {
            evidence: "hostB (backup) lost the arbitration and exited".into(),
            fault_injected: false,
        });
        let t = r.to_text();
        assert!(
            t.starts_with(
                "drill kill-primary (local, FT pair): INCONCLUSIVE (the pair failed over by itself before the fault)\n"
            ),
            "{t}"
        );
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["verdict"]["passed"], false);
        assert_eq!(
            j["verdict"]["pre_fault_failover"]["evidence"],
            "hostB (backup) lost the arbitration and exited"
        );
        r.verdict.failover_ms = Some(900.0);
        let s = RepeatSummary::of(DrillKind::KillPrimary, &[report(true, Some(200.0)), r]);
        assert_eq!(
            s.failover.map(|f| f.max_ms),
            Some(200.0),
            "its own failover left out"
        );
        assert_eq!((s.runs, s.passed, s.inconclusive), (2, 1, 1));
        assert!(
            s.to_text().starts_with(
                "drill kill-primary: 1 of 2 runs passed (1 inconclusive: the pair failed over by itself before the fault);"
            ),
            "{}",
            s.to_text()
        );
    }
}
