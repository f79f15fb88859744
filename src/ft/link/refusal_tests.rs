//! The links refuse what they must: wrong keys, tampered, replayed,
//! reordered, reflected and oversize frames, garbage, protocol violations.
//! Nothing from a refused frame or after it is applied.

use super::channel::Channel;
use super::tests::*;
use super::*;
use crate::ft::wire::{ToBackup, ToPrimary};

/// A primary that speaks the handshake but sends whatever the test wants.
struct RawPrimary {
    chan: Channel,
}

impl RawPrimary {
    /// Handshakes with `b` and has its Hello accepted.
    fn connect(b: &mut BackupLink) -> RawPrimary {
        let mut raw = RawPrimary {
            chan: Channel::initiator(config(), &key(KEY), ms(0)),
        };
        raw.exchange(b);
        raw.send(
            b,
            ToBackup::Hello {
                protocol_version: crate::ft::wire::PROTOCOL_VERSION,
                vm: "vm1".into(),
                generation: 3,
                log_header: vec![],
                start_landmark: 0,
            },
        );
        assert!(matches!(
            b.poll_event(),
            Some(BackupEvent::HelloReceived { .. })
        ));
        b.accept_hello(ms(0)).unwrap();
        raw.exchange(b);
        raw
    }

    fn exchange(&mut self, b: &mut BackupLink) -> Vec<ToPrimary> {
        let mut got = Vec::new();
        loop {
            let mut moved = false;
            while let Some(frame) = self.chan.pop_transmit(ms(0)) {
                b.on_bytes_received(&frame, ms(0));
                moved = true;
            }
            while let Some(frame) = b.poll_transmit(ms(0)) {
                self.chan.receive(&frame);
                moved = true;
            }
            while let Some(m) = self.chan.next_message(ms(0)) {
                got.push(ToPrimary::decode(&m).unwrap());
            }
            if !moved {
                return got;
            }
        }
    }

    fn send(&mut self, b: &mut BackupLink, message: ToBackup) {
        self.chan.send(&message.encode());
        self.exchange(b);
    }
}

#[test]
fn a_wrong_key_never_gets_past_the_handshake() {
    let mut pair = Pair::new(config(), OTHER_KEY, hello("vm1", 3));
    pair.pump();
    assert!(pair.p.is_closed() && pair.b.is_closed());
    match (&pair.pe[..], &pair.be[..]) {
        (
            [PrimaryEvent::Closed {
                reason: CloseReason::Handshake(p),
            }],
            [BackupEvent::Closed {
                reason: CloseReason::Handshake(b),
            }],
        ) => {
            assert!(p.contains("wrong key"), "{p}");
            assert!(b.contains("wrong key"), "{b}");
        }
        other => panic!("{other:?}"),
    }
}

fn sealed_frames(pair: &mut Pair) -> Vec<Vec<u8>> {
    pair.p.push_log(b"abc", 1).unwrap();
    let first = pair.p.poll_transmit(pair.now).unwrap();
    pair.p.push_log(b"def", 2).unwrap();
    let second = pair.p.poll_transmit(pair.now).unwrap();
    vec![first, second]
}

fn assert_refused(pair: &mut Pair, what: &str) {
    let events: Vec<_> = std::iter::from_fn(|| pair.b.poll_event()).collect();
    assert!(
        matches!(events.last(), Some(BackupEvent::Closed { .. })),
        "{events:?}"
    );
    let BackupEvent::Closed { reason } = events.last().unwrap() else {
        unreachable!()
    };
    assert!(reason.to_string().contains(what), "{reason}");
    assert!(pair.b.is_closed());
}

#[test]
fn tampered_replayed_and_reordered_frames_are_refused() {
    // Tampered: one bit of the payload.
    let mut pair = Pair::established(config());
    let mut frames = sealed_frames(&mut pair);
    frames[0][10] ^= 1;
    pair.b.on_bytes_received(&frames[0], pair.now);
    assert_refused(&mut pair, "failed authentication");
    pair.b.on_bytes_received(&frames[1], pair.now);
    assert_eq!(
        pair.b.watermark(),
        0,
        "nothing after a refused frame is applied"
    );

    // Replayed: the same frame twice.
    let mut pair = Pair::established(config());
    let frames = sealed_frames(&mut pair);
    pair.b.on_bytes_received(&frames[0], pair.now);
    pair.b.on_bytes_received(&frames[0], pair.now);
    let events: Vec<_> = std::iter::from_fn(|| pair.b.poll_event()).collect();
    assert!(matches!(
        events[0],
        BackupEvent::Records { watermark: 1, .. }
    ));
    assert!(matches!(
        events[1],
        BackupEvent::Closed {
            reason: CloseReason::Unauthenticated(_)
        }
    ));

    // Reordered.
    let mut pair = Pair::established(config());
    let frames = sealed_frames(&mut pair);
    pair.b.on_bytes_received(&frames[1], pair.now);
    assert_refused(&mut pair, "failed authentication");

    // Reflected: the backup's own frame sent back to it.
    let mut pair = Pair::established(config());
    pair.now += ms(20);
    let own = pair.b.poll_transmit(pair.now).unwrap();
    pair.b.on_bytes_received(&own, pair.now);
    assert_refused(&mut pair, "failed authentication");
}

#[test]
fn oversize_frames_and_garbage_are_refused() {
    let mut pair = Pair::established(config());
    pair.b.on_bytes_received(&(1025u32).to_le_bytes(), pair.now);
    assert_refused(&mut pair, "frame of 1025 bytes exceeds the limit of 1024");

    // Garbage instead of handshake message 1.
    let mut b = BackupLink::new(config(), &key(KEY), expected(), ms(0)).unwrap();
    b.on_bytes_received(&[5, 0, 0, 0, 1, 2, 3, 4, 5], ms(0));
    assert!(matches!(
        b.poll_event(),
        Some(BackupEvent::Closed {
            reason: CloseReason::Handshake(_)
        })
    ));
    let mut b = BackupLink::new(config(), &key(KEY), expected(), ms(0)).unwrap();
    b.on_bytes_received(b"GET / HTTP/1.1\r\n\r\n", ms(0));
    assert!(matches!(
        b.poll_event(),
        Some(BackupEvent::Closed {
            reason: CloseReason::FrameTooLarge { .. }
        })
    ));
}

#[test]
fn protocol_violations_by_the_primary_close_the_link() {
    let violations: Vec<(Vec<ToBackup>, &str)> = vec![
        (
            vec![
                ToBackup::Records {
                    watermark: 5,
                    released: 0,
                    log_bytes: vec![1],
                },
                ToBackup::Heartbeat {
                    watermark: 4,
                    released: 0,
                    sent_at_ns: 0,
                },
            ],
            "watermark went backwards from 5 to 4",
        ),
        (
            vec![ToBackup::Records {
                watermark: 5,
                released: 3,
                log_bytes: vec![],
            }],
            "released 3 is beyond what this backup acknowledged (0)",
        ),
        (
            vec![ToBackup::Hello {
                protocol_version: 1,
                vm: "vm1".into(),
                generation: 3,
                log_header: vec![],
                start_landmark: 0,
            }],
            "Hello received while established",
        ),
        (
            (0..9)
                .map(|i| ToBackup::Records {
                    watermark: i,
                    released: 0,
                    log_bytes: vec![0; 950],
                })
                .collect(),
            "8550 unacknowledged log bytes exceed the window",
        ),
    ];
    for (messages, what) in violations {
        let cfg = LinkConfig {
            max_push_bytes: 4096,
            ..config()
        };
        let mut b = BackupLink::new(cfg, &key(KEY), expected(), ms(0)).unwrap();
        let mut raw = RawPrimary::connect(&mut b);
        for m in messages {
            raw.send(&mut b, m);
        }
        let events: Vec<_> = std::iter::from_fn(|| b.poll_event()).collect();
        match events.last() {
            Some(BackupEvent::Closed {
                reason: CloseReason::Violation(v),
            }) => assert!(v.contains(what), "{v} / {what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn records_before_the_hello_is_accepted_are_a_violation() {
    let mut b = BackupLink::new(config(), &key(KEY), expected(), ms(0)).unwrap();
    let mut raw = RawPrimary {
        chan: Channel::initiator(config(), &key(KEY), ms(0)),
    };
    raw.exchange(&mut b);
    raw.send(
        &mut b,
        ToBackup::Records {
            watermark: 1,
            released: 0,
            log_bytes: vec![],
        },
    );
    match b.poll_event() {
        Some(BackupEvent::Closed {
            reason: CloseReason::Violation(v),
        }) => assert_eq!(v, "Records received while waiting for the Hello"),
        other => panic!("{other:?}"),
    }
}

/// A backup that speaks the handshake but answers whatever the test wants.
fn raw_backup_session(p: &mut PrimaryLink) -> Channel {
    let mut chan = Channel::responder(config(), &key(KEY), ms(0));
    loop {
        let mut moved = false;
        while let Some(frame) = p.poll_transmit(ms(0)) {
            chan.receive(&frame);
            moved = true;
        }
        while chan.next_message(ms(0)).is_some() {}
        while let Some(frame) = chan.pop_transmit(ms(0)) {
            p.on_bytes_received(&frame, ms(0));
            moved = true;
        }
        if !moved {
            return chan;
        }
    }
}

#[test]
fn acks_beyond_what_was_sent_or_going_backwards_close_the_primary() {
    for (acks, what) in [
        (vec![(3, 0)], "beyond what was sent"),
        (vec![(1, 0), (0, 0)], "Ack went backwards"),
        (
            vec![(1, 4)],
            "byte 4 is beyond what was sent (landmark 1, byte 3)",
        ),
    ] {
        let mut p = PrimaryLink::new(config(), &key(KEY), hello("vm1", 3), ms(0)).unwrap();
        let mut chan = raw_backup_session(&mut p);
        chan.send(&ToPrimary::HelloOk.encode());
        p.on_bytes_received(&chan.pop_transmit(ms(0)).unwrap(), ms(0));
        assert_eq!(p.poll_event(), Some(PrimaryEvent::Established));
        p.push_log(b"abc", 1).unwrap();
        p.poll_transmit(ms(0)).unwrap();
        for (watermark, log_bytes) in acks {
            chan.send(
                &ToPrimary::Ack {
                    watermark,
                    log_bytes,
                }
                .encode(),
            );
            p.on_bytes_received(&chan.pop_transmit(ms(0)).unwrap(), ms(0));
        }
        let events: Vec<_> = std::iter::from_fn(|| p.poll_event()).collect();
        match events.last() {
            Some(PrimaryEvent::Closed {
                reason: CloseReason::Violation(v),
            }) => assert!(v.contains(what), "{v} / {what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}
