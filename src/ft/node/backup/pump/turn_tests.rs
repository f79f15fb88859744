//! The backup's link thread turn by turn, with the links on the pump's
//! clock and a loopback socket for what it writes (no engine, no KVM).

use std::io::Read;
use std::net::TcpListener;
use std::time::Instant;

use arbiter::auth::Key;

use super::*;
use crate::ft::link::{Hello, LinkConfig, PrimaryEvent, PrimaryLink};
use crate::ft::node::status::PairStatus;
use crate::ft::node::{ArbiterRequest, ArbiterSettings};
use crate::ft::output::OutputBounds;
use crate::replay::log::LogHeader;
use crate::vmm::Kicker;

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const VM: &str = "vm-turn";
const GENERATION: u64 = 4;

/// Timers far beyond the test's run: nothing here may wait on them.
fn link_config() -> LinkConfig {
    LinkConfig {
        heartbeat_interval: Duration::from_secs(30),
        peer_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(60),
        ..LinkConfig::default()
    }
}

fn header() -> LogHeader {
    LogHeader {
        kernel_hash: [7; 32],
        initrd_hash: None,
        cmdline: String::new(),
        mem_bytes: 2 << 20,
        boot_unix_secs: 0,
        host_cpu: 0,
        net_mac: None,
        tick_delivery: crate::devices::TickDelivery::AtLandmarks,
    }
}

/// What the test keeps of the pump's surroundings.
struct Around {
    primary: PrimaryLink,
    /// The primary's end of the socket the pump writes to.
    wire: TcpStream,
    live_rx: Receiver<LiveItem>,
    _keep: (Receiver<ArbiterRequest>, Sender<Verdict>, Sender<MainNews>),
    _keep_more: (Receiver<LinkNews>, Receiver<Control>),
}

/// A backup pump whose link is established with an in-memory primary.
fn established_pump() -> (BackupPump, Around) {
    let clock = Clock(Instant::now());
    let key = Key::from_hex(KEY).unwrap();
    let cfg = PairConfig {
        vm: VM.into(),
        generation: GENERATION,
        node: "backup-test".into(),
        key: key.clone(),
        arbiter: ArbiterSettings {
            addrs: Vec::new(),
            cluster_id: "turn-tests".into(),
            key: None,
            attempt_deadline: Duration::from_secs(1),
        },
        link: link_config(),
        control: "/nonexistent/turn-tests.sock".into(),
        host_cpu: None,
        sync_bound: Duration::from_micros(200),
        tick_deferral: Duration::from_millis(1),
        sync_budget_percent: 0,
        tick_delivery: crate::devices::TickDelivery::CatchUpAtWindowExits,
        hot_pages: 0,
        sync_state_every: Duration::ZERO,
    };
    let mut primary = PrimaryLink::new(
        link_config(),
        &key,
        Hello {
            vm: VM.into(),
            generation: GENERATION,
            log_header: header().encode().unwrap(),
            start_landmark: 0,
        },
        clock.now(),
    )
    .unwrap();
    let mut backup = BackupLink::new(
        link_config(),
        &key,
        ExpectedHello {
            vm: VM.into(),
            generation: GENERATION,
        },
        clock.now(),
    )
    .unwrap();
    // The handshake and Hello, frame by frame, in memory.
    let mut accepted = false;
    for _ in 0..32 {
        let now = clock.now();
        while let Some(frame) = primary.poll_transmit(now) {
            backup.on_bytes_received(&frame, now);
        }
        while let Some(event) = backup.poll_event() {
            if let BackupEvent::HelloReceived { .. } = event {
                backup.accept_hello(now).unwrap();
                accepted = true;
            }
        }
        while let Some(frame) = backup.poll_transmit(now) {
            primary.on_bytes_received(&frame, now);
        }
        if primary.is_established() && backup.is_established() {
            break;
        }
    }
    assert!(accepted && primary.is_established() && backup.is_established());
    while primary.poll_event().is_some() {}

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (wire, _) = listener.accept().unwrap();
    wire.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (arbiter_tx, arbiter_rx) = crossbeam_channel::unbounded();
    let (verdict_tx, verdict_rx) = crossbeam_channel::unbounded();
    let (main_tx, main_rx) = crossbeam_channel::unbounded();
    let (news_tx, news_rx) = crossbeam_channel::unbounded();
    let (control_tx, control_rx) = crossbeam_channel::unbounded();
    let (live_tx, live_rx) = crossbeam_channel::unbounded();
    let pump = BackupPump {
        clock,
        cfg,
        link: Some(backup),
        stream: Some(ours),
        edge: LinkEdge::default(),
        socket_rx: None,
        arbitration: Arbitration {
            failover: None,
            arbiter_tx,
        },
        decoder: Some(RecordDecoder::new(&header())),
        live_tx: Some(live_tx),
        queued: Arc::new(AtomicU64::new(0)),
        unacked: VecDeque::new(),
        shadow: Arc::new(Mutex::new(ShadowOutputs::new(OutputBounds::default()))),
        verdict_rx,
        main_rx,
        news_tx,
        engine_handle: EngineHandle {
            control_tx,
            kicker: Kicker::new(),
        },
        stopping: Arc::new(AtomicBool::new(false)),
        board: Arc::new(Mutex::new(PairStatus::default())),
        landmark: Arc::new(AtomicU64::new(0)),
        catch_ups: Arc::new(AtomicU64::new(0)),
        ours: header(),
        done: None,
        last_replayed: 0,
        start_landmark: 0,
        survivor: Arc::new(AtomicBool::new(false)),
    };
    let around = Around {
        primary,
        wire,
        live_rx,
        _keep: (arbiter_rx, verdict_tx, main_tx),
        _keep_more: (news_rx, control_rx),
    };
    (pump, around)
}

/// Read what the pump wrote and hand it to the primary until it reports
/// an ack (or nothing more is there).
fn primary_hears_ack(pump: &BackupPump, around: &mut Around) -> Option<u64> {
    let mut buf = [0u8; 4096];
    around
        .wire
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    loop {
        let n = match around.wire.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => n,
        };
        around
            .primary
            .on_bytes_received(&buf[..n], pump.clock.now());
        while let Some(event) = around.primary.poll_event() {
            if let PrimaryEvent::Acked { watermark, .. } = event {
                return Some(watermark);
            }
        }
    }
}

#[test]
fn records_received_are_acknowledged_on_the_wire_in_the_same_turn() {
    let (mut pump, mut around) = established_pump();
    // What the link thread writes of the handshake turn is not the point.
    pump.turn().unwrap();
    for watermark in [1, 2, 3] {
        // The primary's log through `watermark` (no record: a landmark
        // with nothing to log still moves the watermark) reaches the link.
        around.primary.push_log(&[], watermark).unwrap();
        let now = pump.clock.now();
        while let Some(frame) = around.primary.poll_transmit(now) {
            apply_socket_event(pump.link(), Ok(SocketEvent::Bytes(frame)), now);
        }
        // One turn, no wait: the replay gets the watermark and the
        // primary the ack, with no timer or further wake-up in between.
        assert!(pump.turn().unwrap().is_none());
        assert!(matches!(
            around.live_rx.try_recv(),
            Ok(LiveItem::Watermark(w)) if w == watermark
        ));
        assert!(pump.unacked.is_empty(), "{:?} still unacked", pump.unacked);
        assert_eq!(primary_hears_ack(&pump, &mut around), Some(watermark));
        assert_eq!(around.primary.acked_watermark(), watermark);
    }
}

#[test]
fn acknowledgements_wait_while_the_replay_queue_is_over_its_bound() {
    let (mut pump, mut around) = established_pump();
    pump.turn().unwrap();
    pump.queued.store(REPLAY_QUEUE_BYTES + 1, Ordering::Relaxed);
    around.primary.push_log(&[], 5).unwrap();
    let now = pump.clock.now();
    while let Some(frame) = around.primary.poll_transmit(now) {
        apply_socket_event(pump.link(), Ok(SocketEvent::Bytes(frame)), now);
    }
    pump.turn().unwrap();
    assert_eq!(pump.unacked, VecDeque::from([5]));
    assert_eq!(primary_hears_ack(&pump, &mut around), None);
    // The engine drained the queue: the next turn acknowledges.
    pump.queued.store(0, Ordering::Relaxed);
    pump.turn().unwrap();
    assert!(pump.unacked.is_empty());
    assert_eq!(primary_hears_ack(&pump, &mut around), Some(5));
}
