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
use crate::replay::log::{LogHeader, Record};
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
    live_rx: std::sync::mpsc::Receiver<LiveItem>,
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
    let (live_tx, live_rx) = std::sync::mpsc::channel();
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
        decoding: None,
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

/// The primary's log bytes for these records (frames, no file header).
fn log_bytes(records: &[Record]) -> Vec<u8> {
    let mut w = crate::replay::log::LogWriter::new(Vec::new(), &header()).unwrap();
    let start = w.written().0 as usize;
    for r in records {
        w.append(r).unwrap();
    }
    w.into_inner()[start..].to_vec()
}

/// A sync point at `landmark` carrying every page of the test guest, all
/// zero: a few bytes each on the wire, a whole page each decoded.
fn zero_page_sync_point(landmark: u64) -> Record {
    let pages = (0..header().mem_bytes / 4096)
        .map(|n| (n * 4096, crate::replay::log::PageData::zero()))
        .collect();
    Record::SyncPoint {
        landmark,
        cpu: Box::new(crate::replay::log::CpuStateBytes {
            regs: vec![0; 144],
            xsave: vec![0; 4096],
            ..Default::default()
        }),
        vmm_state: vec![0; 26],
        pages,
    }
}

#[test]
fn a_small_read_that_decodes_to_much_is_spread_over_turns_with_its_watermark_last() {
    let (mut pump, mut around) = established_pump();
    pump.turn().unwrap();
    // Five sync points of 512 zero pages: ~2 MiB each decoded, a few
    // kilobytes on the wire, more than one turn may decode.
    let records: Vec<Record> = (1..=5).map(zero_page_sync_point).collect();
    let bytes = log_bytes(&records);
    assert!(bytes.len() < 64 << 10, "{} bytes on the wire", bytes.len());
    around.primary.push_log(&bytes, 9).unwrap();
    let now = pump.clock.now();
    while let Some(frame) = around.primary.poll_transmit(now) {
        apply_socket_event(pump.link(), Ok(SocketEvent::Bytes(frame)), now);
    }
    let mut got = Vec::new();
    let mut turns = 0;
    loop {
        pump.turn().unwrap();
        turns += 1;
        let before = got.len();
        while let Ok(item) = around.live_rx.try_recv() {
            got.push(item);
        }
        let spent: u64 = got[before..]
            .iter()
            .map(|item| match item {
                LiveItem::Record(r) => record_cost(r),
                LiveItem::Watermark(_) => 0,
            })
            .sum();
        // A turn stops at the first record past its budget.
        assert!(
            spent < DECODE_PER_TURN + (3 << 20),
            "{spent} bytes in one turn"
        );
        if matches!(got.last(), Some(LiveItem::Watermark(_))) || turns == 20 {
            break;
        }
        // No ack before the watermark's records are all out.
        assert!(pump.unacked.is_empty());
        assert!(pump.decoding.is_some());
    }
    let costs: Vec<u64> = got
        .iter()
        .map(|i| match i {
            LiveItem::Record(r) => record_cost(r),
            _ => 0,
        })
        .collect();
    assert!(turns > 1, "decoded in {turns} turn(s): {costs:?}");
    let (last, firsts) = got.split_last().unwrap();
    assert_eq!(last, &LiveItem::Watermark(9));
    let decoded: Vec<Record> = firsts
        .iter()
        .filter_map(|item| match item {
            LiveItem::Record(r @ Record::SyncPoint { .. }) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(decoded.len(), 5);
    assert_eq!(primary_hears_ack(&pump, &mut around), Some(9));
}

#[test]
fn held_log_waits_while_the_replay_queue_is_over_its_bound() {
    let (mut pump, mut around) = established_pump();
    pump.turn().unwrap();
    pump.queued.store(REPLAY_QUEUE_BYTES + 1, Ordering::Relaxed);
    let bytes = log_bytes(&[zero_page_sync_point(1), zero_page_sync_point(2)]);
    around.primary.push_log(&bytes, 4).unwrap();
    let now = pump.clock.now();
    while let Some(frame) = around.primary.poll_transmit(now) {
        apply_socket_event(pump.link(), Ok(SocketEvent::Bytes(frame)), now);
    }
    pump.turn().unwrap();
    assert!(around.live_rx.try_recv().is_err(), "decoded past the bound");
    assert_eq!(pump.decoding, Some(4));
    // The engine drained the queue: the held records, then the watermark.
    pump.queued.store(0, Ordering::Relaxed);
    pump.turn().unwrap();
    let items: Vec<LiveItem> = around.live_rx.try_iter().collect();
    assert_eq!(items.len(), 3, "{items:?}");
    assert_eq!(items[2], LiveItem::Watermark(4));
    assert_eq!(primary_hears_ack(&pump, &mut around), Some(4));
}
