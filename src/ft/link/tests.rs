//! The links rule by rule, on a virtual clock: flow, timers, window, Bye.

use std::time::Duration;

use arbiter::auth::Key;

use super::*;

pub(super) const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
pub(super) const OTHER_KEY: &str =
    "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

pub(super) fn key(hex: &str) -> Key {
    Key::from_hex(hex).unwrap()
}

pub(super) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

pub(super) fn config() -> LinkConfig {
    LinkConfig {
        max_frame_bytes: 1024,
        window_bytes: 8192,
        max_push_bytes: 32 << 10,
        ..LinkConfig::default()
    }
}

pub(super) fn hello(vm: &str, generation: u64) -> Hello {
    Hello {
        vm: vm.into(),
        generation,
        log_header: b"header".to_vec(),
        start_landmark: 0,
    }
}

pub(super) fn expected() -> ExpectedHello {
    ExpectedHello {
        vm: "vm1".into(),
        generation: 3,
    }
}

pub(super) struct Pair {
    pub(super) p: PrimaryLink,
    pub(super) b: BackupLink,
    pub(super) now: Duration,
    pub(super) pe: Vec<PrimaryEvent>,
    pub(super) be: Vec<BackupEvent>,
}

impl Pair {
    pub(super) fn new(config: LinkConfig, primary_key: &str, hello: Hello) -> Pair {
        Pair {
            p: PrimaryLink::new(config, &key(primary_key), hello, ms(0)).unwrap(),
            b: BackupLink::new(config, &key(KEY), expected(), ms(0)).unwrap(),
            now: ms(0),
            pe: Vec::new(),
            be: Vec::new(),
        }
    }

    /// Carries every queued frame across until both sides are quiet.
    pub(super) fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(frame) = self.p.poll_transmit(self.now) {
                self.b.on_bytes_received(&frame, self.now);
                moved = true;
            }
            while let Some(frame) = self.b.poll_transmit(self.now) {
                self.p.on_bytes_received(&frame, self.now);
                moved = true;
            }
            self.pe.extend(std::iter::from_fn(|| self.p.poll_event()));
            self.be.extend(std::iter::from_fn(|| self.b.poll_event()));
            if !moved {
                return;
            }
        }
    }

    pub(super) fn established(config: LinkConfig) -> Pair {
        let mut pair = Pair::new(config, KEY, hello("vm1", 3));
        pair.pump();
        assert_eq!(
            pair.be.drain(..).collect::<Vec<_>>(),
            vec![BackupEvent::HelloReceived {
                log_header: b"header".to_vec(),
                start_landmark: 0
            }]
        );
        pair.b.accept_hello(pair.now).unwrap();
        pair.pump();
        assert_eq!(
            pair.pe.drain(..).collect::<Vec<_>>(),
            vec![PrimaryEvent::Established]
        );
        assert!(pair.p.is_established() && pair.b.is_established());
        pair
    }

    /// Backup side: takes every Records event, acking each after "queueing"
    /// it, and every Released event. Returns the bytes, the watermarks, the
    /// released markers.
    pub(super) fn take_records(&mut self) -> (Vec<u8>, Vec<u64>, Vec<u64>) {
        let (mut bytes, mut watermarks, mut released) = (Vec::new(), Vec::new(), Vec::new());
        for event in std::mem::take(&mut self.be) {
            match event {
                BackupEvent::Records {
                    log_bytes,
                    watermark,
                } => {
                    bytes.extend_from_slice(&log_bytes);
                    watermarks.push(watermark);
                    self.b.ack_through(watermark).unwrap();
                }
                BackupEvent::Released { released: r } => released.push(r),
                other => panic!("unexpected {other:?}"),
            }
        }
        (bytes, watermarks, released)
    }
}

#[test]
fn handshake_and_hello_establish_the_pair() {
    let pair = Pair::established(config());
    assert_eq!(pair.p.status().stats.frames_sent, 3); // message 1, message 3, Hello
    assert_eq!(pair.b.status(ms(0)).stats.frames_sent, 2); // message 2, HelloOk
}

#[test]
fn a_hello_for_another_vm_or_generation_is_refused_naming_the_field() {
    for (hello, field) in [(hello("vm2", 3), "vm:"), (hello("vm1", 4), "generation:")] {
        let mut pair = Pair::new(config(), KEY, hello);
        pair.pump();
        match pair.pe.as_slice() {
            [PrimaryEvent::HelloRefused { reason }] => {
                assert!(reason.starts_with(field), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            pair.be.as_slice(),
            [BackupEvent::Closed {
                reason: CloseReason::HelloRefused(_)
            }]
        ));
        assert!(pair.p.is_closed() && pair.b.is_closed());
    }
    // The edge refuses on the log header.
    let mut pair = Pair::new(config(), KEY, hello("vm1", 3));
    pair.pump();
    pair.b.refuse_hello("log_header differs: cmdline").unwrap();
    pair.pump();
    assert_eq!(
        pair.pe,
        vec![PrimaryEvent::HelloRefused {
            reason: "log_header differs: cmdline".into()
        }]
    );
    assert_eq!(pair.b.accept_hello(ms(0)), Err(LinkError::NoHelloPending));
}

#[test]
fn records_are_chunked_under_the_frame_limit_and_reassembled_from_single_bytes() {
    let mut pair = Pair::established(config());
    let log: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    pair.p.push_log(&log[..100], 1).unwrap();
    // A record of 4900 bytes completing landmark 2.
    pair.p.push_log(&log[100..], 2).unwrap();
    // Deliver one byte at a time.
    let mut frames = 0;
    while let Some(frame) = pair.p.poll_transmit(pair.now) {
        assert!(frame.len() <= 4 + 1024, "frame of {} bytes", frame.len());
        frames += 1;
        for byte in frame.chunks(1) {
            pair.b.on_bytes_received(byte, pair.now);
        }
    }
    assert!(frames >= 5, "{frames} frames");
    pair.be.extend(std::iter::from_fn(|| pair.b.poll_event()));
    let (bytes, marks, _) = pair.take_records();
    assert_eq!(bytes, log);
    // Only the frame that completes the push carries its watermark.
    assert_eq!(marks.first(), Some(&1));
    assert_eq!(marks.last(), Some(&2));
    assert!(
        marks[1..marks.len() - 1].iter().all(|&w| w == 1),
        "{marks:?}"
    );
    pair.pump();
    assert_eq!(
        pair.pe.last(),
        Some(&PrimaryEvent::Acked {
            watermark: 2,
            log_bytes: 5000
        })
    );
    assert_eq!(pair.p.status().in_flight_bytes, 0);
}

#[test]
fn a_watermark_alone_is_sent_at_once_and_released_rides_along() {
    let mut pair = Pair::established(config());
    pair.p.push_log(&[], 5).unwrap();
    pair.pump();
    let (bytes, marks, released) = pair.take_records();
    assert!(bytes.is_empty() && released.is_empty());
    assert_eq!(marks, vec![5]);
    pair.pump();
    assert_eq!(
        pair.pe,
        vec![PrimaryEvent::Acked {
            watermark: 5,
            log_bytes: 0
        }]
    );
    assert_eq!(
        pair.p.set_released(6),
        Err(LinkError::ReleasedBeyondAck {
            released: 6,
            acked: 5
        })
    );
    pair.p.set_released(5).unwrap();
    // released alone waits for the next frame: here the heartbeat.
    pair.pump();
    assert!(pair.be.is_empty());
    pair.now += ms(20);
    pair.pump();
    let (_, marks, released) = pair.take_records();
    assert_eq!((marks, released), (vec![], vec![5]));
    assert_eq!(pair.b.released(), 5);
    assert_eq!(
        pair.p.set_released(4),
        Err(LinkError::ReleasedBackwards {
            released: 4,
            last: 5
        })
    );
}

#[test]
fn heartbeats_go_out_every_interval_and_the_backup_sends_its_own_while_acking() {
    let mut pair = Pair::established(config());
    pair.pe.clear();
    let start = pair.now;
    assert_eq!(pair.p.poll_timeout(), Some(start + ms(20)));
    assert_eq!(pair.b.poll_timeout(), Some(start + ms(20)));
    pair.now = start + ms(20) - Duration::from_nanos(1);
    assert_eq!(pair.p.poll_transmit(pair.now), None);
    assert_eq!(pair.b.poll_transmit(pair.now), None);
    pair.now = start + ms(20);
    pair.pump();
    assert_eq!(
        pair.pe,
        vec![PrimaryEvent::PeerHeartbeat {
            replayed_landmark: 0,
            lag_ns: 0
        }]
    );
    // A Records frame counts as the primary's heartbeat; the backup's acks do not.
    pair.now += ms(15);
    pair.p.push_log(b"x", 1).unwrap();
    pair.pump();
    pair.take_records();
    pair.pump();
    assert_eq!(pair.p.poll_timeout(), Some(pair.now + ms(20)));
    assert_eq!(pair.b.poll_timeout(), Some(start + ms(40)));
    // Lag: watermark 1 arrived at 35 ms. The engine stays one landmark
    // behind the watermark by design, so at 40 ms nothing waits yet.
    pair.now = start + ms(40);
    pair.pe.clear();
    pair.pump();
    assert_eq!(
        pair.pe,
        vec![PrimaryEvent::PeerHeartbeat {
            replayed_landmark: 0,
            lag_ns: 0
        }]
    );
    // Watermark 2 at 40 ms lets the engine pass landmark 1: from then on
    // that work waits, and the heartbeat says so.
    pair.p.push_log(b"y", 2).unwrap();
    pair.pump();
    pair.take_records();
    pair.pump();
    pair.now = start + ms(45);
    assert_eq!(pair.b.status(pair.now).lag_ns, 5_000_000);
    pair.now = start + ms(60);
    pair.pe.clear();
    pair.pump();
    assert_eq!(
        pair.pe,
        vec![PrimaryEvent::PeerHeartbeat {
            replayed_landmark: 0,
            lag_ns: 20_000_000
        }]
    );
    // An idle backup one landmark behind waits for nothing, however long.
    pair.b.set_replayed(1).unwrap();
    assert_eq!(pair.b.status(pair.now).lag_ns, 0);
    assert_eq!(pair.b.status(pair.now + ms(60_000)).lag_ns, 0);
    assert_eq!(
        pair.b.set_replayed(0),
        Err(LinkError::ReplayedBackwards {
            landmark: 0,
            last: 1
        })
    );
    assert_eq!(
        pair.b.set_replayed(3),
        Err(LinkError::ReplayedBeyondWatermark {
            landmark: 3,
            watermark: 2
        })
    );
}

#[test]
fn the_lag_stays_true_when_the_bookkeeping_queue_runs_full() {
    let mut pair = Pair::established(config());
    let start = pair.now;
    let arrive = |pair: &mut Pair, w: u64| {
        pair.now = start + ms(w);
        pair.p.push_log(b"x", w).unwrap();
        pair.pump();
        pair.take_records();
    };
    // 5,000 watermarks a millisecond apart, none replayed: more than the
    // queue keeps, so its entries merge in pairs.
    for w in 1..=5_000 {
        arrive(&mut pair, w);
    }
    // Waiting since watermark 2 arrived (2 ms), give or take one merge.
    let lag = pair.b.status(pair.now).lag_ns;
    assert!(
        (4_998_000_000..=4_999_000_000).contains(&lag),
        "lag {lag} ns with nothing replayed"
    );
    // The engine catches up to three landmarks behind: what waits now is
    // watermark 4,999, one millisecond old (merging newer entries into the
    // newest one reported 904 ms here: the time the queue filled).
    pair.b.set_replayed(4_997).unwrap();
    let lag = pair.b.status(pair.now).lag_ns;
    assert!(lag <= 2_000_000, "lag {lag} ns three landmarks behind");
    // And stays so while it follows three behind.
    for w in 5_001..=10_000 {
        arrive(&mut pair, w);
        pair.b.set_replayed(w - 3).unwrap();
        let lag = pair.b.status(pair.now).lag_ns;
        assert!(lag <= 2_000_000, "lag {lag} ns at watermark {w}");
    }
}

#[test]
fn a_local_stall_is_not_counted_as_the_peers_silence() {
    let mut pair = Pair::established(config());
    let timeout = config().peer_timeout;
    let last_rx = pair.now;
    // The backup's thread could not run for 150 ms: the primary gets that
    // time back, so the deadline moves from last_rx + 200 to last_rx + 350.
    pair.now = last_rx + ms(250);
    assert_eq!(pair.b.credit_local_stall(ms(150), pair.now), ms(150));
    pair.b.handle_timeout(pair.now);
    assert!(pair.b.poll_event().is_none() && !pair.b.is_closed());
    pair.now = last_rx + ms(150) + timeout - Duration::from_nanos(1);
    pair.b.handle_timeout(pair.now);
    assert!(pair.b.poll_event().is_none() && !pair.b.is_closed());
    // A credit never moves the last word past now.
    pair.now = last_rx + ms(300);
    assert_eq!(pair.b.credit_local_stall(ms(500), pair.now), ms(150));
    assert_eq!(pair.b.status(pair.now).stats.local_stalls, 2);
    assert_eq!(pair.b.status(pair.now).stats.longest_local_stall, ms(150));
    // Input waiting unread in the kernel: silence credited up to now.
    assert_eq!(
        pair.b.credit_local_stall(Duration::MAX, pair.now),
        Duration::ZERO
    );
    // Without further credit or word the peer is suspected on time.
    pair.now += timeout;
    pair.b.handle_timeout(pair.now);
    assert_eq!(
        pair.b.poll_event(),
        Some(BackupEvent::PeerSuspected {
            silent_for: timeout
        })
    );
    // A closed link takes no credit.
    assert_eq!(pair.b.credit_local_stall(ms(50), pair.now), Duration::ZERO);
}

#[test]
fn the_peer_is_suspected_exactly_after_peer_timeout_and_nothing_is_applied_after() {
    let mut pair = Pair::established(config());
    let timeout = config().peer_timeout;
    let last_rx = pair.now;
    pair.now = last_rx + timeout - Duration::from_nanos(1);
    pair.b.handle_timeout(pair.now);
    assert!(pair.b.poll_event().is_none() && !pair.b.is_closed());
    assert_eq!(pair.b.poll_timeout(), Some(last_rx + ms(20)));
    pair.b.poll_transmit(pair.now); // its own heartbeat; the primary stays silent
    assert_eq!(pair.b.poll_timeout(), Some(last_rx + timeout));
    pair.now = last_rx + timeout;
    pair.b.handle_timeout(pair.now);
    assert_eq!(
        pair.b.poll_event(),
        Some(BackupEvent::PeerSuspected {
            silent_for: timeout
        })
    );
    assert!(pair.b.is_closed());
    assert_eq!(pair.b.poll_timeout(), None);
    // Frames the primary sends now are not applied.
    pair.p.push_log(b"late", 1).unwrap();
    while let Some(frame) = pair.p.poll_transmit(pair.now) {
        pair.b.on_bytes_received(&frame, pair.now);
    }
    assert!(pair.b.poll_event().is_none());
    assert_eq!(pair.b.watermark(), 0);
    // Bytes arriving after the deadline on a link whose timer was not run
    // yet do not revive it either.
    let mut pair = Pair::established(config());
    pair.p.push_log(b"x", 1).unwrap();
    let frame = pair.p.poll_transmit(pair.now).unwrap();
    pair.b
        .on_bytes_received(&frame, pair.now + config().peer_timeout + ms(1));
    assert!(matches!(
        pair.b.poll_event(),
        Some(BackupEvent::PeerSuspected { .. })
    ));
    assert!(pair.b.poll_event().is_none());
}

#[test]
fn the_handshake_must_finish_in_time() {
    let mut b = BackupLink::new(config(), &key(KEY), expected(), ms(0)).unwrap();
    assert_eq!(b.poll_timeout(), Some(ms(5000)));
    b.handle_timeout(ms(5000));
    assert_eq!(
        b.poll_event(),
        Some(BackupEvent::Closed {
            reason: CloseReason::HandshakeTimeout(ms(5000))
        })
    );
}

#[test]
fn the_window_bounds_unacknowledged_log() {
    let mut pair = Pair::established(config());
    pair.p.push_log(&[1; 8000], 1).unwrap();
    assert!(pair.p.can_accept(192) && !pair.p.can_accept(193));
    assert_eq!(
        pair.p.push_log(&[2; 193], 2),
        Err(LinkError::WindowFull {
            in_flight: 8000,
            len: 193,
            window: 8192
        })
    );
    pair.pump();
    pair.take_records();
    pair.pump();
    assert!(pair.p.can_accept(8192));
    // An empty window takes one push larger than the window.
    pair.p.push_log(&[3; 20_000], 2).unwrap();
    assert!(!pair.p.can_accept(1));
    pair.pump();
    let (bytes, _, _) = pair.take_records();
    assert_eq!(bytes.len(), 20_000);
    assert!(
        pair.b.is_established(),
        "the backup accepts a push of that size"
    );
    assert_eq!(
        pair.p.push_log(&[], 1),
        Err(LinkError::WatermarkBackwards {
            watermark: 1,
            last: 2
        })
    );
}

#[test]
fn acks_follow_the_events_the_edge_queued() {
    let mut pair = Pair::established(config());
    pair.p.push_log(&[7; 3000], 1).unwrap();
    pair.pump();
    let events: Vec<_> = pair.be.drain(..).collect();
    assert!(events.len() >= 3);
    // Acking watermark 0 after the first piece: only that piece's bytes.
    assert_eq!(
        pair.b.ack_through(2),
        Err(LinkError::AckBeyondReceived {
            watermark: 2,
            received: 1
        })
    );
    pair.b.ack_through(0).unwrap();
    assert_eq!(pair.b.status(pair.now).unacked_bytes, 3000 - 971);
    pair.b.ack_through(1).unwrap();
    assert_eq!(pair.b.status(pair.now).unacked_bytes, 0);
    assert_eq!(
        pair.b.ack_through(0),
        Err(LinkError::AckBackwards {
            watermark: 0,
            last: 1
        })
    );
    pair.pump();
    assert_eq!(
        pair.pe,
        vec![PrimaryEvent::Acked {
            watermark: 1,
            log_bytes: 3000
        }]
    );
}

#[test]
fn bye_carries_the_rest_of_the_log_and_the_final_released() {
    let mut pair = Pair::established(config());
    pair.p.push_log(b"end", 9).unwrap();
    assert_eq!(
        pair.p.send_bye("powered off", pair.now),
        Err(LinkError::ByeBeforeReleased {
            released: 0,
            watermark: 9
        })
    );
    pair.pump();
    pair.take_records();
    pair.pump();
    pair.p.set_released(9).unwrap();
    pair.p.send_bye("powered off", pair.now).unwrap();
    assert!(pair.p.is_closed());
    pair.pump();
    assert_eq!(
        pair.be,
        vec![
            BackupEvent::Released { released: 9 },
            BackupEvent::Bye {
                reason: "powered off".into()
            }
        ]
    );
    assert!(pair.b.is_closed());
    // The primary closing its socket afterwards is no news.
    pair.b.connection_lost("eof");
    assert!(pair.b.poll_event().is_none());
    assert!(pair
        .pe
        .iter()
        .all(|e| matches!(e, PrimaryEvent::Acked { .. })));
}

#[test]
fn divergence_reaches_the_primary_and_ends_the_link() {
    let mut pair = Pair::established(config());
    pair.b.send_diverged(12, "rip differs");
    assert!(pair.b.is_closed());
    pair.pump();
    assert_eq!(
        pair.pe,
        vec![PrimaryEvent::Diverged {
            landmark: 12,
            detail: "rip differs".into()
        }]
    );
    assert!(pair.p.is_closed());
}

#[test]
fn a_broken_connection_is_reported_once() {
    let mut pair = Pair::established(config());
    pair.p.connection_lost("connection reset by peer");
    pair.p.connection_lost("again");
    assert_eq!(
        std::iter::from_fn(|| pair.p.poll_event()).collect::<Vec<_>>(),
        vec![PrimaryEvent::Closed {
            reason: CloseReason::ConnectionLost("connection reset by peer".into())
        }]
    );
    assert!(matches!(
        pair.p.push_log(b"x", 1),
        Err(LinkError::Closed(_))
    ));
}

#[test]
fn config_is_validated() {
    let bad = [
        LinkConfig {
            heartbeat_interval: LinkConfig::default().peer_timeout,
            ..LinkConfig::default()
        },
        LinkConfig {
            max_frame_bytes: MAX_FRAME_BYTES + 1,
            ..LinkConfig::default()
        },
        LinkConfig {
            window_bytes: 0,
            ..LinkConfig::default()
        },
    ];
    for c in bad {
        assert!(matches!(c.validate(), Err(LinkError::InvalidConfig(_))));
    }
    assert!(LinkConfig::default().validate().is_ok());
    let long = Hello {
        vm: "x".repeat(300),
        ..hello("vm1", 1)
    };
    assert!(PrimaryLink::new(config(), &key(KEY), long, ms(0)).is_err());
}

#[test]
fn the_output_rule_end_to_end_ack_release_marker_and_go_live() {
    use crate::ft::output::{HeldOutputs, OutputBounds, ShadowOutputs};
    let mut pair = Pair::established(config());
    let mut held = HeldOutputs::new(OutputBounds::default());
    let mut shadow = ShadowOutputs::new(OutputBounds::default());
    // Landmarks 1..=4, one output each, on both sides.
    for l in 1..=4u64 {
        held.push(l, vec![l as u8], pair.now).unwrap();
        shadow.push(l, vec![l as u8], pair.now).unwrap();
        if l <= 3 {
            pair.p.push_log(&[l as u8], l).unwrap();
        }
    }
    pair.pump();
    let (_, marks, _) = pair.take_records();
    assert_eq!(marks.last(), Some(&3));
    pair.now += ms(2);
    pair.pump();
    let acked = match pair.pe.pop() {
        Some(PrimaryEvent::Acked { watermark, .. }) => watermark,
        other => panic!("{other:?}"),
    };
    assert_eq!(acked, 3);
    // Exactly the outputs at or below the ack leave, after 2 ms held.
    assert_eq!(
        held.release_through(acked, pair.now),
        vec![vec![1], vec![2], vec![3]]
    );
    assert_eq!(held.hold_times().max, ms(2));
    pair.p.set_released(acked).unwrap();
    pair.now += ms(20);
    pair.pump();
    let (_, _, released) = pair.take_records();
    assert_eq!(released, vec![3]);
    shadow.on_released(3);
    // The primary dies here: the backup goes live with exactly landmark 4's output.
    assert_eq!(shadow.take_for_go_live(), vec![vec![4]]);
}

#[test]
fn records_frames_are_at_most_a_mebibyte_and_always_fit_the_frame_limit() {
    let default = LinkConfig::default();
    assert_eq!(default.records_chunk(), RECORDS_CHUNK_BYTES);
    let small = config();
    assert_eq!(
        small.records_chunk(),
        1024 - arbiter::auth::TAG_LEN - crate::ft::wire::RECORDS_OVERHEAD
    );
}
