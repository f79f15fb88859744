//! What the drill's client saw, and what it means (sans-IO).
//!
//! The client sends numbered requests to the `counter` guest and retries each
//! one with the same id until it is answered. A [`History`] holds every request
//! and every reply as they happened (duplicates included); [`analyze`] turns it
//! into the figures a drill is judged on: requests never answered, the counter
//! going backwards or repeating an acknowledged value, duplicates, and the
//! service interruption around the fault (the failover time).
//!
//! Times are offsets from one origin (the client's start); nothing here reads
//! a clock.

use std::time::Duration;

use serde::Serialize;

/// Times in JSON: milliseconds from the client's start, as numbers.
fn ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ms(d, s),
        None => s.serialize_none(),
    }
}

/// One request id as the client handled it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    pub id: u64,
    /// When it was first sent.
    #[serde(rename = "first_sent_ms", serialize_with = "ms")]
    pub first_sent: Duration,
    /// How many times it was sent (1 = never retried).
    pub sends: u32,
    /// When its first reply came, if one did.
    #[serde(rename = "answered_ms", serialize_with = "opt_ms")]
    pub answered: Option<Duration>,
}

/// One reply datagram the client received, in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Reply {
    pub id: u64,
    pub value: u64,
    #[serde(rename = "at_ms", serialize_with = "ms")]
    pub at: Duration,
}

/// Everything the client saw in one drill.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct History {
    /// Request ids 1, 2, ... in order.
    pub requests: Vec<RequestRecord>,
    /// Every reply received, in arrival order, duplicates and late ones included.
    pub replies: Vec<Reply>,
    /// Replies for ids never sent, malformed datagrams and socket errors
    /// (ICMP unreachable while nothing answers for the guest's address).
    pub stray_datagrams: u64,
    pub socket_errors: u64,
}

/// A reply that breaks the counter's promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CounterAnomaly {
    /// Position of the reply in arrival order (0-based).
    pub index: usize,
    pub id: u64,
    pub value: u64,
    /// The highest value acknowledged before it.
    pub previous_max: u64,
    #[serde(rename = "at_ms", serialize_with = "ms")]
    pub at: Duration,
}

/// The longest silence of the service from the fault on: the failover time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Interruption {
    /// The last reply before the silence (may be a little after the fault:
    /// replies already on their way when a process is killed still arrive).
    #[serde(rename = "last_before_ms", serialize_with = "ms")]
    pub last_before: Duration,
    /// The first reply after it.
    #[serde(rename = "first_after_ms", serialize_with = "ms")]
    pub first_after: Duration,
}

impl Interruption {
    pub fn length(&self) -> Duration {
        self.first_after.saturating_sub(self.last_before)
    }
}

/// The ids of lost requests kept in an analysis (the count is always exact).
pub const LOST_IDS_KEPT: usize = 20;
/// Counter anomalies kept per kind (the count is always exact).
pub const ANOMALIES_KEPT: usize = 20;

/// The figures a drill is judged on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Analysis {
    pub requests: u64,
    pub answered: u64,
    /// Requests never answered.
    pub lost: u64,
    /// The first [`LOST_IDS_KEPT`] of them.
    pub lost_ids: Vec<u64>,
    /// Sends beyond the first of each request.
    pub retries: u64,
    pub replies: u64,
    /// Replies identical (id and value) to an earlier one: outputs a new
    /// primary re-emitted, harmless.
    pub duplicate_replies: u64,
    /// Replies to an already answered id with a new value: a retry the
    /// guest served again because the first reply was late.
    pub reanswered: u64,
    /// Replies (not duplicates) whose value is below one acknowledged earlier.
    pub backwards: u64,
    pub backwards_examples: Vec<CounterAnomaly>,
    /// Replies (not duplicates) repeating a value acknowledged earlier for
    /// another request, or for the same one with another meaning.
    pub repeated: u64,
    pub repeated_examples: Vec<CounterAnomaly>,
    /// Replies that arrived after the fault (some may be the killed side's,
    /// already on their way).
    pub replies_after_fault: u64,
    /// Requests first sent after the fault that were answered: only a side
    /// alive after the fault can have answered them — the proof that the
    /// service resumed.
    pub answered_sent_after_fault: u64,
    /// The service interruption from the fault on; `None` without a fault,
    /// or when the service did not resume (`answered_sent_after_fault` 0).
    pub interruption: Option<Interruption>,
    /// The first reply after the fault, if any.
    #[serde(rename = "first_reply_after_fault_ms", serialize_with = "opt_ms")]
    pub first_reply_after_fault: Option<Duration>,
    /// The last reply at or before the fault, if any.
    #[serde(rename = "last_reply_before_fault_ms", serialize_with = "opt_ms")]
    pub last_reply_before_fault: Option<Duration>,
}

/// Analyse `history`; `fault_at` is when the fault was complete (the killed
/// process reaped, the link down; same origin).
pub fn analyze(history: &History, fault_at: Option<Duration>) -> Analysis {
    let mut a = Analysis {
        requests: history.requests.len() as u64,
        replies: history.replies.len() as u64,
        ..Analysis::default()
    };
    for r in &history.requests {
        a.retries += u64::from(r.sends.saturating_sub(1));
        if r.answered.is_some() {
            a.answered += 1;
        } else {
            a.lost += 1;
            if a.lost_ids.len() < LOST_IDS_KEPT {
                a.lost_ids.push(r.id);
            }
        }
    }
    check_counter(&history.replies, &mut a);

    if let Some(fault) = fault_at {
        a.replies_after_fault = history.replies.iter().filter(|r| r.at > fault).count() as u64;
        a.answered_sent_after_fault = history
            .requests
            .iter()
            .filter(|r| r.first_sent > fault && r.answered.is_some())
            .count() as u64;
        a.last_reply_before_fault = history
            .replies
            .iter()
            .rev()
            .find(|r| r.at <= fault)
            .map(|r| r.at);
        a.first_reply_after_fault = history.replies.iter().find(|r| r.at > fault).map(|r| r.at);
        // Replies after the fault to older requests alone may all be the
        // killed side's, in flight: no silence ended, nothing to measure.
        if a.answered_sent_after_fault > 0 {
            a.interruption = interruption(&history.replies, fault);
        }
    }
    a
}

/// Every reply that is not an exact duplicate must carry a value above all
/// values acknowledged before it: below is "backwards", equal to an earlier
/// one is "repeated". A second value for an answered id is counted apart
/// (a retry the guest served twice), and still has to increase.
fn check_counter(replies: &[Reply], a: &mut Analysis) {
    use std::collections::{BTreeSet, HashMap};
    // (id → values acknowledged for it) and every value acknowledged.
    let mut by_id: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut values: BTreeSet<u64> = BTreeSet::new();
    let mut max: Option<u64> = None;
    for (index, r) in replies.iter().enumerate() {
        let seen = by_id.entry(r.id).or_default();
        if seen.contains(&r.value) {
            a.duplicate_replies += 1;
            continue;
        }
        if !seen.is_empty() {
            a.reanswered += 1;
        }
        seen.push(r.value);
        if let Some(previous_max) = max.filter(|&m| r.value <= m) {
            let anomaly = CounterAnomaly {
                index,
                id: r.id,
                value: r.value,
                previous_max,
                at: r.at,
            };
            if values.contains(&r.value) {
                a.repeated += 1;
                if a.repeated_examples.len() < ANOMALIES_KEPT {
                    a.repeated_examples.push(anomaly);
                }
            } else {
                a.backwards += 1;
                if a.backwards_examples.len() < ANOMALIES_KEPT {
                    a.backwards_examples.push(anomaly);
                }
            }
        }
        values.insert(r.value);
        max = Some(max.map_or(r.value, |m| m.max(r.value)));
    }
}

/// The longest gap between consecutive replies, counted from the last reply
/// at or before the fault (or the fault itself when there was none) to the
/// end. Replies of the old primary that were in flight when it was killed
/// arrive a little after the fault; the silence that follows them is the
/// outage, so the gap is not simply "fault to next reply".
fn interruption(replies: &[Reply], fault: Duration) -> Option<Interruption> {
    let start = replies
        .iter()
        .rev()
        .find(|r| r.at <= fault)
        .map_or(fault, |r| r.at);
    let mut previous = start;
    let mut longest: Option<Interruption> = None;
    for r in replies.iter().filter(|r| r.at > start) {
        let gap = Interruption {
            last_before: previous,
            first_after: r.at,
        };
        if longest.is_none_or(|l| gap.length() > l.length()) {
            longest = Some(gap);
        }
        previous = r.at;
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn reply(id: u64, value: u64, at_ms: u64) -> Reply {
        Reply {
            id,
            value,
            at: ms(at_ms),
        }
    }

    /// Requests 1..=n, each sent at 5*id ms once and answered per `answered`.
    fn requests(n: u64, answered: impl Fn(u64) -> Option<u64>) -> Vec<RequestRecord> {
        (1..=n)
            .map(|id| RequestRecord {
                id,
                first_sent: ms(5 * id),
                sends: 1,
                answered: answered(id).map(ms),
            })
            .collect()
    }

    /// A clean history: id i answered with value i at 5*i+1 ms.
    fn clean(n: u64) -> History {
        History {
            requests: requests(n, |id| Some(5 * id + 1)),
            replies: (1..=n).map(|id| reply(id, id, 5 * id + 1)).collect(),
            ..History::default()
        }
    }

    #[test]
    fn a_clean_history_has_nothing_to_report() {
        let a = analyze(&clean(100), None);
        assert_eq!(a.requests, 100);
        assert_eq!(a.answered, 100);
        assert_eq!(
            (a.lost, a.retries, a.duplicate_replies, a.reanswered),
            (0, 0, 0, 0)
        );
        assert_eq!((a.backwards, a.repeated), (0, 0));
        assert_eq!(a.interruption, None);
        assert_eq!(a.replies_after_fault, 0);
    }

    #[test]
    fn unanswered_requests_are_lost_and_listed() {
        let mut h = clean(10);
        for r in &mut h.requests[7..] {
            r.answered = None;
            r.sends = 4;
        }
        h.replies.truncate(7);
        let a = analyze(&h, Some(ms(38)));
        assert_eq!(a.lost, 3);
        assert_eq!(a.lost_ids, [8, 9, 10]);
        assert_eq!(a.retries, 9);
        assert_eq!(a.replies_after_fault, 0);
        assert_eq!(a.interruption, None, "nothing came after the fault");
        assert_eq!(a.last_reply_before_fault, Some(ms(36)));
        assert_eq!(a.first_reply_after_fault, None);
    }

    #[test]
    fn lost_ids_are_capped_but_counted() {
        let h = History {
            requests: requests(100, |_| None),
            ..History::default()
        };
        let a = analyze(&h, None);
        assert_eq!(a.lost, 100);
        assert_eq!(a.lost_ids.len(), LOST_IDS_KEPT);
        assert_eq!(a.lost_ids[0], 1);
    }

    #[test]
    fn exact_duplicates_are_harmless() {
        let mut h = clean(5);
        // The new primary re-emits the replies to 4 and 5 after taking over.
        h.replies.push(reply(4, 4, 100));
        h.replies.push(reply(5, 5, 101));
        h.replies.push(reply(6, 6, 102));
        h.requests.push(RequestRecord {
            id: 6,
            first_sent: ms(30),
            sends: 3,
            answered: Some(ms(102)),
        });
        let a = analyze(&h, Some(ms(27)));
        assert_eq!(a.duplicate_replies, 2);
        assert_eq!((a.backwards, a.repeated, a.reanswered), (0, 0, 0));
        assert_eq!(a.retries, 2);
    }

    #[test]
    fn a_retried_request_served_twice_must_still_increase() {
        let mut h = clean(3);
        // The reply to 3 was late; its retry was served again: value 4 for id 3.
        h.replies.push(reply(3, 4, 40));
        let a = analyze(&h, None);
        assert_eq!(a.reanswered, 1);
        assert_eq!((a.backwards, a.repeated), (0, 0));

        // The same, but the second answer is not above what was acknowledged.
        let mut h = clean(3);
        h.replies.push(reply(2, 1, 40));
        let a = analyze(&h, None);
        assert_eq!(a.reanswered, 1);
        assert_eq!(a.repeated, 1, "value 1 was acknowledged to id 1");
    }

    #[test]
    fn a_counter_going_backwards_is_caught() {
        let mut h = clean(5);
        // A backup that went live from an older state: counts on from 3, but
        // its values were never seen (they would be "repeated" otherwise).
        h.replies.push(reply(6, 0, 100));
        let a = analyze(&h, None);
        assert_eq!(a.backwards, 1);
        assert_eq!(a.repeated, 0);
        let ex = a.backwards_examples[0];
        assert_eq!((ex.index, ex.id, ex.value, ex.previous_max), (5, 6, 0, 5));
    }

    #[test]
    fn an_acknowledged_value_repeated_for_another_request_is_caught() {
        let mut h = clean(5);
        // Split brain, or a backup that lost acknowledged outputs: a new
        // request gets a value already given to request 4.
        h.replies.push(reply(6, 4, 100));
        h.replies.push(reply(7, 5, 101));
        h.replies.push(reply(8, 6, 102));
        let a = analyze(&h, None);
        assert_eq!(a.repeated, 2);
        assert_eq!(a.backwards, 0);
        assert_eq!(
            a.repeated_examples.iter().map(|e| e.id).collect::<Vec<_>>(),
            [6, 7]
        );
        // 6 is new and above the maximum 5: fine.
    }

    #[test]
    fn the_interruption_is_the_longest_silence_from_the_fault_on() {
        // Replies every 5 ms until 500, the fault at 498, a reply of the old
        // primary still arriving at 502, then silence until 760, then steady.
        let mut replies = Vec::new();
        let mut value = 0;
        let mut push = |at: u64| {
            value += 1;
            replies.push(reply(value, value, at));
        };
        (5..=500).step_by(5).for_each(&mut push);
        push(502);
        (760..=900).step_by(5).for_each(&mut push);
        let h = History {
            requests: requests(value, |_| Some(1)),
            replies,
            ..History::default()
        };
        let a = analyze(&h, Some(ms(498)));
        let gap = a.interruption.unwrap();
        assert_eq!(gap.last_before, ms(502));
        assert_eq!(gap.first_after, ms(760));
        assert_eq!(gap.length(), ms(258));
        assert_eq!(a.last_reply_before_fault, Some(ms(495)));
        assert_eq!(a.first_reply_after_fault, Some(ms(500)));
        assert_eq!(a.replies_after_fault, 2 + 29);
    }

    #[test]
    fn an_earlier_longer_gap_does_not_count() {
        // A 100 ms gap before the fault, a 20 ms one after it.
        let times = [10, 110, 115, 120, 140, 145];
        let h = History {
            requests: times
                .iter()
                .enumerate()
                .map(|(i, &t)| RequestRecord {
                    id: i as u64 + 1,
                    first_sent: ms(t - 1),
                    sends: 1,
                    answered: Some(ms(t)),
                })
                .collect(),
            replies: times
                .iter()
                .enumerate()
                .map(|(i, &t)| reply(i as u64 + 1, i as u64 + 1, t))
                .collect(),
            ..History::default()
        };
        let a = analyze(&h, Some(ms(117)));
        let gap = a.interruption.unwrap();
        assert_eq!((gap.last_before, gap.first_after), (ms(120), ms(140)));
    }

    #[test]
    fn without_replies_before_the_fault_the_gap_starts_at_the_fault() {
        let h = History {
            requests: vec![RequestRecord {
                id: 1,
                first_sent: ms(101),
                sends: 5,
                answered: Some(ms(300)),
            }],
            replies: vec![reply(1, 1, 300)],
            ..History::default()
        };
        let a = analyze(&h, Some(ms(100)));
        let gap = a.interruption.unwrap();
        assert_eq!((gap.last_before, gap.first_after), (ms(100), ms(300)));
        assert_eq!(a.last_reply_before_fault, None);
    }

    #[test]
    fn replies_in_flight_after_a_kill_are_not_a_resumed_service() {
        // Requests every 5 ms; the only server is killed at 100 ms; two of
        // its replies (to requests sent before) arrive after, then nothing.
        let mut h = History {
            requests: requests(30, |id| (id <= 20).then_some(5 * id + 1)),
            replies: (1..=20).map(|id| reply(id, id, 5 * id + 1)).collect(),
            ..History::default()
        };
        h.requests[18].answered = Some(ms(101));
        h.requests[19].answered = Some(ms(102));
        h.replies[18].at = ms(101);
        h.replies[19].at = ms(102);
        let a = analyze(&h, Some(ms(100)));
        assert_eq!(a.replies_after_fault, 2);
        assert_eq!(a.answered_sent_after_fault, 0);
        assert_eq!(a.interruption, None, "no silence ended");
        assert_eq!(a.first_reply_after_fault, Some(ms(101)));
        // One request sent after the fault answered: the service resumed.
        h.requests[20].answered = Some(ms(400));
        h.replies.push(reply(21, 21, 400));
        let a = analyze(&h, Some(ms(100)));
        assert_eq!(a.answered_sent_after_fault, 1);
        let gap = a.interruption.unwrap();
        assert_eq!((gap.last_before, gap.first_after), (ms(102), ms(400)));
    }
}
