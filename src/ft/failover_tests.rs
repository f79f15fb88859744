//! Rule-by-rule tests of the failover machine on a virtual clock.

use super::*;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn config() -> FailoverConfig {
    FailoverConfig::new("vm1", 5, "node")
}

fn drain(f: &mut Failover) -> Vec<Action> {
    std::iter::from_fn(|| f.poll_action()).collect()
}

fn ask(role: Role) -> Action {
    Action::AskArbiter {
        vm: "vm1".into(),
        generation: 5,
        requester: format!("node/{role}"),
    }
}

fn won() -> FailoverEvent {
    FailoverEvent::ArbiterVerdict(Verdict::Decided(TasOutcome::Won { generation: 5 }))
}

fn held_by(holder: &str) -> FailoverEvent {
    FailoverEvent::ArbiterVerdict(Verdict::Decided(TasOutcome::Held {
        holder: holder.into(),
        generation: 5,
    }))
}

fn unreachable() -> FailoverEvent {
    FailoverEvent::ArbiterVerdict(Verdict::Unreachable {
        error: "no quorum".into(),
    })
}

#[test]
fn primary_suspicion_holds_outputs_asks_and_goes_alone_on_a_win() {
    let mut f = Failover::primary(config(), ms(0));
    assert!(drain(&mut f).is_empty());
    f.handle(FailoverEvent::PeerSuspected, ms(120));
    assert_eq!(drain(&mut f), vec![Action::HoldOutputs, ask(Role::Primary)]);
    assert_eq!(f.status().state, "asking-arbiter");
    assert_eq!(f.status().since, ms(120));
    // A second trigger while asking changes nothing.
    f.handle(
        FailoverEvent::LinkClosed {
            reason: "reset".into(),
        },
        ms(121),
    );
    assert!(drain(&mut f).is_empty());
    f.handle(won(), ms(130));
    assert_eq!(drain(&mut f), vec![Action::DropLog, Action::ReleaseAll]);
    let status = f.status();
    assert_eq!((status.state, status.since), ("alone", ms(130)));
    assert_eq!(status.role, Role::Primary);
    // Late verdicts and link events are ignored once decided.
    f.handle(held_by("x"), ms(140));
    f.handle(FailoverEvent::PeerSuspected, ms(140));
    assert!(drain(&mut f).is_empty());
}

#[test]
fn primary_that_loses_stops_non_zero_naming_the_holder() {
    let mut f = Failover::primary(config(), ms(0));
    f.handle(
        FailoverEvent::LinkClosed {
            reason: "connection reset".into(),
        },
        ms(10),
    );
    drain(&mut f);
    f.handle(held_by("other/backup"), ms(20));
    assert_eq!(
        drain(&mut f),
        vec![Action::Stop {
            exit_code: EXIT_LOST,
            message: "the backup took over (arbiter: held by other/backup)".into()
        }]
    );
    assert_eq!(f.status().state, "lost");
    f.handle(won(), ms(30));
    assert!(drain(&mut f).is_empty(), "a lost side never comes back");
}

#[test]
fn not_armed_and_foreign_generations_lose() {
    let mut f = Failover::primary(config(), ms(0));
    f.handle(FailoverEvent::PeerSuspected, ms(1));
    drain(&mut f);
    f.handle(
        FailoverEvent::ArbiterVerdict(Verdict::Decided(TasOutcome::NotArmed { generation: 6 })),
        ms(2),
    );
    match drain(&mut f).as_slice() {
        [Action::Stop { exit_code, message }] => {
            assert_eq!(*exit_code, EXIT_LOST);
            assert!(message.contains("generation 6"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let mut f = Failover::backup(config(), ms(0));
    f.handle(FailoverEvent::PeerSuspected, ms(1));
    drain(&mut f);
    f.handle(
        FailoverEvent::ArbiterVerdict(Verdict::Decided(TasOutcome::Won { generation: 4 })),
        ms(2),
    );
    assert!(matches!(
        drain(&mut f).as_slice(),
        [Action::Stop {
            exit_code: EXIT_LOST,
            ..
        }]
    ));
}

#[test]
fn unreachable_arbiter_is_retried_with_bounded_backoff_forever() {
    let mut f = Failover::primary(config(), ms(0));
    f.handle(FailoverEvent::PeerSuspected, ms(0));
    drain(&mut f);
    let mut now = ms(0);
    let mut delays = Vec::new();
    for _ in 0..10 {
        f.handle(unreachable(), now);
        let at = match drain(&mut f).as_slice() {
            [Action::RetryArbiterAt(at)] => *at,
            other => panic!("{other:?}"),
        };
        assert_eq!(f.poll_timeout(), Some(at));
        delays.push(at - now);
        // Not yet due: nothing happens.
        f.handle_timeout(at - Duration::from_nanos(1));
        assert!(drain(&mut f).is_empty());
        f.handle_timeout(at);
        assert_eq!(drain(&mut f), vec![ask(Role::Primary)]);
        assert_eq!(f.poll_timeout(), None);
        now = at + ms(3);
    }
    assert_eq!(
        delays,
        [50, 100, 200, 400, 800, 1000, 1000, 1000, 1000, 1000].map(ms)
    );
    let status = f.status();
    assert!(
        status.detail.contains("attempt 11") && status.detail.contains("no quorum"),
        "{}",
        status.detail
    );
    f.handle(won(), now);
    assert_eq!(drain(&mut f), vec![Action::DropLog, Action::ReleaseAll]);
}

#[test]
fn primary_guest_ending_while_asking_waits_for_the_verdict() {
    let mut f = Failover::primary(config(), ms(0));
    f.handle(FailoverEvent::PeerSuspected, ms(0));
    drain(&mut f);
    f.handle(
        FailoverEvent::Bye {
            reason: "powered off".into(),
        },
        ms(5),
    );
    assert!(drain(&mut f).is_empty());
    f.handle(won(), ms(9));
    assert_eq!(
        drain(&mut f),
        vec![
            Action::DropLog,
            Action::ReleaseAll,
            Action::Stop {
                exit_code: 0,
                message: "the guest ended: powered off".into()
            }
        ]
    );
    assert_eq!(f.status().state, "ending");
}

#[test]
fn primary_bye_ends_without_the_arbiter() {
    let mut f = Failover::primary(config(), ms(0));
    f.handle(
        FailoverEvent::Bye {
            reason: "halted".into(),
        },
        ms(3),
    );
    assert_eq!(
        drain(&mut f),
        vec![Action::Stop {
            exit_code: 0,
            message: "the guest ended: halted".into()
        }]
    );
}

#[test]
fn primary_asks_when_the_backup_diverged() {
    let mut f = Failover::primary(config(), ms(0));
    f.handle(
        FailoverEvent::Diverged {
            landmark: 77,
            detail: "page 0x1000".into(),
        },
        ms(1),
    );
    assert_eq!(drain(&mut f), vec![Action::HoldOutputs, ask(Role::Primary)]);
    assert!(f.status().detail.contains("diverged at landmark 77"));
}

#[test]
fn backup_replays_while_asking_and_promotes_at_the_end_of_the_log() {
    // Log exhausted before the verdict: promote as soon as it is won.
    let mut f = Failover::backup(config(), ms(0));
    f.handle(FailoverEvent::PeerSuspected, ms(120));
    assert_eq!(drain(&mut f), vec![Action::FinishLog, ask(Role::Backup)]);
    f.handle(FailoverEvent::LogExhausted { landmark: 900 }, ms(125));
    assert!(drain(&mut f).is_empty());
    f.handle(won(), ms(130));
    assert_eq!(drain(&mut f), vec![Action::Promote { landmark: 900 }]);
    assert_eq!(f.status().state, "live");

    // Verdict first: draining until the log is exhausted.
    let mut f = Failover::backup(config(), ms(0));
    f.handle(
        FailoverEvent::LinkClosed {
            reason: "eof".into(),
        },
        ms(1),
    );
    drain(&mut f);
    f.handle(won(), ms(2));
    assert!(drain(&mut f).is_empty());
    assert_eq!(f.status().state, "draining");
    f.handle(FailoverEvent::LogExhausted { landmark: 12 }, ms(3));
    assert_eq!(drain(&mut f), vec![Action::Promote { landmark: 12 }]);
    assert_eq!(f.status().detail, "live since landmark 12");
}

#[test]
fn backup_that_loses_stops() {
    let mut f = Failover::backup(config(), ms(0));
    f.handle(FailoverEvent::PeerSuspected, ms(1));
    drain(&mut f);
    f.handle(held_by("node/primary"), ms(2));
    assert_eq!(
        drain(&mut f),
        vec![Action::Stop {
            exit_code: EXIT_LOST,
            message: "the primary is alive and holds the slot (holder node/primary)".into()
        }]
    );
    f.handle(FailoverEvent::LogExhausted { landmark: 3 }, ms(3));
    assert!(drain(&mut f).is_empty(), "a lost backup never promotes");
}

#[test]
fn backup_bye_finishes_the_log_and_ends_with_zero() {
    let mut f = Failover::backup(config(), ms(0));
    f.handle(
        FailoverEvent::Bye {
            reason: "guest powered off".into(),
        },
        ms(1),
    );
    assert_eq!(drain(&mut f), vec![Action::FinishLog]);
    // The primary closing the connection after Bye is expected, not a failure.
    f.handle(
        FailoverEvent::LinkClosed {
            reason: "eof".into(),
        },
        ms(2),
    );
    f.handle(FailoverEvent::PeerSuspected, ms(200));
    assert!(drain(&mut f).is_empty());
    f.handle(FailoverEvent::LogExhausted { landmark: 40 }, ms(300));
    match drain(&mut f).as_slice() {
        [Action::Stop { exit_code, message }] => {
            assert_eq!(*exit_code, 0);
            assert!(message.contains("guest powered off") && message.contains("40"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_diverged_backup_never_goes_live() {
    for before_verdict in [false, true] {
        let mut f = Failover::backup(config(), ms(0));
        f.handle(FailoverEvent::PeerSuspected, ms(1));
        drain(&mut f);
        if !before_verdict {
            f.handle(won(), ms(2));
        }
        f.handle(
            FailoverEvent::Diverged {
                landmark: 9,
                detail: "rip differs".into(),
            },
            ms(3),
        );
        assert!(matches!(
            drain(&mut f).as_slice(),
            [Action::Stop {
                exit_code: EXIT_DIVERGED,
                ..
            }]
        ));
        f.handle(won(), ms(4));
        f.handle(FailoverEvent::LogExhausted { landmark: 9 }, ms(5));
        assert!(drain(&mut f).is_empty());
        assert_eq!(f.status().state, "diverged");
    }
}

#[test]
fn requesters_differ_by_role_even_with_one_node_name() {
    let c = config();
    assert_ne!(c.requester(Role::Primary), c.requester(Role::Backup));
    let status = Failover::backup(c, ms(7)).status();
    assert_eq!(
        (status.role, status.state, status.generation, status.since),
        (Role::Backup, "following", 5, ms(7))
    );
}
