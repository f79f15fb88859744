//! The guest's NIC end to end: the `counter` guest behind a real TAP in a
//! network namespace each test makes (and removes when it ends), answering
//! ping and UDP requests from the namespace; `--net` errors; record and
//! replay under a random stream of requests; logs that lost or altered a
//! received frame; and the `dmaremap` guest, which proves the rule for
//! device DMA and KVM's shadow page tables. Needs root, /dev/kvm and
//! /dev/net/tun.

mod common;

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{run_to_end, stats_counter, Finished, Running, TempDir};
use twinvm::net::netns::cleanup_stale;
use twinvm::net::probe::{decode_counter_reply, encode_counter_request, send_raw_frame};
use twinvm::net::{icmp_ping, CounterClient, NetNs, ProbeError};
use twinvm::replay::log::{LogHeader, LogReader, LogWriter, Record};

const PREFIX: &str = "twinvm-nettest";
/// A whole twinvm run (boot, traffic, power-off; a replay).
const TIMEOUT: Duration = Duration::from_secs(180);
/// One answer from the guest, or a line on its console.
const WAIT: Duration = Duration::from_secs(20);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const HOST_CIDR: &str = "10.77.0.1/24";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const COUNTER_PORT: u16 = 7777;
/// Every reply of a random request stream.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

fn namespace() -> NetNs {
    cleanup_stale(PREFIX).expect("cleaning up namespaces of earlier runs");
    NetNs::create(PREFIX).expect("creating a network namespace (needs root)")
}

/// No IPv6 on interfaces made in `ns` from now on: the kernel's router
/// solicitations and the like would be frames the guest did not ask for.
fn without_ipv6(ns: &NetNs) {
    ns.enter_on_thread(|| {
        for conf in ["all", "default"] {
            let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
            match std::fs::write(&path, "1") {
                Ok(()) => {}
                // A kernel without IPv6 sends none.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("writing {path}: {e}"),
            }
        }
    })
    .unwrap();
}

/// `twinvm ARGS` inside `ns` (`ip netns exec`): its TAP is made or opened there.
fn spawn_in(ns: &NetNs, args: &[&str]) -> Running {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_twinvm"));
    cmd.args(args);
    Running::spawn_command(cmd)
}

/// Give the host side of `tap` its address and bring it up.
fn host_side_up(ns: &NetNs, tap: &str) {
    ns.addr_add(tap, HOST_CIDR).unwrap();
    ns.link_up(tap).unwrap();
}

fn counter_cmdline(max: u64) -> String {
    format!("console=ttyS0 max={max}")
}

/// Three pings, then `requests` counter requests one after another, from a
/// thread in `ns`: every one answered, the counter counting 1, 2, ...
fn ping_and_count(ns: &NetNs, requests: u64) {
    ns.enter_on_thread(|| {
        for seq in 0..3 {
            let rtt = icmp_ping(GUEST_IP, 0x7477, seq, WAIT).expect("ping");
            assert!(rtt.is_some(), "no echo reply to ping {seq} within {WAIT:?}");
        }
        let client = CounterClient::new(
            SocketAddr::from((HOST_IP, 0)),
            SocketAddr::from((GUEST_IP, COUNTER_PORT)),
        )
        .unwrap();
        for n in 1..=requests {
            let value = client.request(1000 + n, WAIT).expect("counter request");
            assert_eq!(value, Some(n), "reply to request {n}");
        }
    })
    .unwrap();
}

fn assert_counter_finished(out: &Finished, requests: u64) {
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "counter: requests={requests} value={requests}\ncounter: done\n"
        )),
        "{}",
        out.stdout
    );
}

#[test]
fn ping_and_counter_answer_through_a_tap_twinvm_creates() {
    let ns = namespace();
    let cmdline = counter_cmdline(5);
    let mut vm = spawn_in(
        &ns,
        &[
            "run",
            "--kernel",
            "builtin:counter",
            "--mem",
            "64M",
            "--cmdline",
            &cmdline,
            "--net",
            "tap=tw0",
        ],
    );
    vm.wait_for_stdout(
        "counter: ready ip=10.77.0.2 port=7777 mac=52:54:00:12:34:56 max=5\n",
        WAIT,
    );
    // twinvm made tw0 before the guest booted.
    host_side_up(&ns, "tw0");
    ping_and_count(&ns, 5);
    assert_counter_finished(&vm.finish(TIMEOUT), 5);
}

#[test]
fn ping_and_counter_answer_through_an_existing_persistent_tap() {
    let ns = namespace();
    ns.add_tap("tw1").unwrap();
    host_side_up(&ns, "tw1");
    let cmdline = counter_cmdline(4);
    let mut vm = spawn_in(
        &ns,
        &[
            "run",
            "--kernel",
            "builtin:counter",
            "--mem",
            "64M",
            "--cmdline",
            &cmdline,
            "--net",
            "tap=tw1,mac=52:54:00:ab:cd:ef",
        ],
    );
    vm.wait_for_stdout("mac=52:54:00:ab:cd:ef max=4\n", WAIT);
    ping_and_count(&ns, 4);
    assert_counter_finished(&vm.finish(TIMEOUT), 4);
    // twinvm attached to the TAP and left it for its owner.
    ns.ip(["link", "show", "dev", "tw1"])
        .expect("the persistent TAP outlives twinvm");
}

#[test]
fn bad_net_specs_and_taps_that_cannot_be_opened_fail_clearly() {
    for (spec, needle) in [
        ("tw0", "is not KEY=VALUE"),
        ("tap=", "it is empty"),
        ("tap=tw0,colour=red", "unknown key `colour`"),
        ("tap=a,tap=b", "key `tap` given twice"),
        ("mac=52:54:00:00:00:01", "missing tap=NAME"),
        ("tap=tw0,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=tw0,mac=52:54:00", "bad MAC address"),
        ("tap=an-interface-name", "longer than 15 bytes"),
    ] {
        let out = run_to_end(
            &[
                "run",
                "--kernel",
                "builtin:counter",
                "--mem",
                "64M",
                "--net",
                spec,
            ],
            TIMEOUT,
        );
        // clap reports a value it cannot parse as a usage error: exit 2.
        assert_eq!(out.status.code(), Some(2), "--net {spec}: {out:?}");
        assert!(
            out.stderr.contains("--net") && out.stderr.contains(needle),
            "--net {spec}: expected {needle:?} in {}",
            out.stderr
        );
    }

    // A name that exists but is a bridge, not a TAP.
    let ns = namespace();
    ns.add_bridge("br0").unwrap();
    let dir = TempDir::new("net-badtap");
    let log = dir.0.join("x.log");
    let log = log.to_str().unwrap();
    for args in [&["run"][..], &["record", "--log", log][..]] {
        let mut all = args.to_vec();
        all.extend([
            "--kernel",
            "builtin:counter",
            "--mem",
            "64M",
            "--net",
            "tap=br0",
        ]);
        let out = spawn_in(&ns, &all).finish(TIMEOUT);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            out.stderr
                .contains("opening TAP device br0 (--net): interface br0 exists but is not a single-queue TAP"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

// ---- record and replay under load ----------------------------------------------

/// A small deterministic generator (xorshift64*), so the request stream is
/// the same for a given seed without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Send `requests` counter requests (ids 1..=requests) at random times from
/// `seed`: gaps of 0-5 ms, and one time in eight a burst of 2-8 requests
/// back to back. Replies are collected as they come; returns `(id, counter
/// value)` for each. Panics naming the ids still unanswered after
/// `STREAM_TIMEOUT`.
fn random_request_stream(requests: u64, seed: u64) -> Vec<(u64, u64)> {
    let socket = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
    socket
        .connect(SocketAddrV4::new(GUEST_IP, COUNTER_PORT))
        .unwrap();
    let receiver = socket.try_clone().unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    std::thread::scope(|scope| {
        // The stream takes about a second; the rest is slack for a loaded host.
        let deadline = Instant::now() + STREAM_TIMEOUT;
        let collector = scope.spawn(move || {
            let mut replies = Vec::new();
            let mut buf = [0u8; 64];
            while (replies.len() as u64) < requests && Instant::now() < deadline {
                if let Ok(n) = receiver.recv(&mut buf) {
                    if let Some(reply) = decode_counter_reply(&buf[..n]) {
                        replies.push(reply);
                    }
                }
            }
            replies
        });
        let mut rng = Rng(seed);
        let mut id = 1;
        while id <= requests {
            let burst = if rng.below(8) == 0 {
                2 + rng.below(7)
            } else {
                1
            };
            for _ in 0..burst.min(requests - id + 1) {
                socket.send(&encode_counter_request(id)).unwrap();
                id += 1;
            }
            std::thread::sleep(Duration::from_micros(rng.below(5001)));
        }
        let replies = collector.join().unwrap();
        let mut answered: Vec<u64> = replies.iter().map(|&(id, _)| id).collect();
        answered.sort_unstable();
        let missing: Vec<u64> = (1..=requests)
            .filter(|id| answered.binary_search(id).is_err())
            .collect();
        assert!(
            missing.is_empty(),
            "seed {seed:#x}: {} of {requests} requests unanswered (first: {:?})",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        replies
    })
}

/// A recording of the counter guest serving `REQUESTS` requests sent at
/// random times, which then powers off by itself.
struct CounterRecording {
    _dir: TempDir,
    log: PathBuf,
    cmdline: String,
    recorded: Finished,
}

const REQUESTS: u64 = 200;

fn record_counter_under_load(tag: &str, seed: u64) -> CounterRecording {
    let dir = TempDir::new(tag);
    let log = dir.0.join("counter.log");
    let ns = namespace();
    without_ipv6(&ns);
    let cmdline = counter_cmdline(REQUESTS);
    let mut vm = spawn_in(
        &ns,
        &[
            "record",
            "--log",
            log.to_str().unwrap(),
            "--kernel",
            "builtin:counter",
            "--mem",
            "64M",
            "--cmdline",
            &cmdline,
            "--net",
            "tap=tw0",
            "--stats",
        ],
    );
    vm.wait_for_stdout("counter: ready", WAIT);
    host_side_up(&ns, "tw0");
    let replies = ns
        .enter_on_thread(|| {
            // ARP resolved before the stream starts.
            let rtt = icmp_ping(GUEST_IP, 0x7478, 0, WAIT).expect("ping");
            assert!(rtt.is_some(), "no echo reply within {WAIT:?}");
            random_request_stream(REQUESTS, seed)
        })
        .unwrap();
    let recorded = vm.finish(TIMEOUT);
    assert_counter_finished(&recorded, REQUESTS);
    // Each request got a distinct value: together exactly 1..=REQUESTS.
    let mut values: Vec<u64> = replies.iter().map(|&(_, value)| value).collect();
    values.sort_unstable();
    assert_eq!(values, (1..=REQUESTS).collect::<Vec<_>>(), "seed {seed:#x}");
    CounterRecording {
        _dir: dir,
        log,
        cmdline,
        recorded,
    }
}

fn read_log(path: &Path) -> (LogHeader, Vec<Record>) {
    let mut reader = LogReader::new(BufReader::new(File::open(path).unwrap())).unwrap();
    let header = reader.header().clone();
    let mut records = Vec::new();
    while let Some(record) = reader.next_record().unwrap() {
        records.push(record);
    }
    (header, records)
}

fn write_log(path: &Path, header: &LogHeader, records: &[Record]) {
    let mut writer = LogWriter::new(BufWriter::new(File::create(path).unwrap()), header).unwrap();
    for record in records {
        writer.append(record).unwrap();
    }
    writer.flush().unwrap();
}

/// Offset of a counter request's payload in an Ethernet frame: Ethernet,
/// IPv4 without options, UDP headers.
const UDP_PAYLOAD: usize = 14 + 20 + 8;

fn is_counter_request(frame: &[u8]) -> bool {
    frame.get(UDP_PAYLOAD..UDP_PAYLOAD + 4) == Some(b"TWCQ")
}

/// Indexes (in `records`) of the NetRx records carrying counter requests.
fn request_frames(records: &[Record]) -> Vec<usize> {
    records
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Record::NetRx { frame, .. } if is_counter_request(frame)))
        .map(|(i, _)| i)
        .collect()
}

fn replay_counter(rec: &CounterRecording, log: &Path) -> Finished {
    run_to_end(
        &[
            "replay",
            "--log",
            log.to_str().unwrap(),
            "--kernel",
            "builtin:counter",
            "--mem",
            "64M",
            "--cmdline",
            &rec.cmdline,
            "--net",
            "tap=tw0",
        ],
        TIMEOUT,
    )
}

/// The replay ended in the recording's state with the recording's console.
fn assert_identical(recorded: &Finished, replayed: &Finished) {
    assert!(replayed.status.success(), "replay: {replayed:?}");
    let Some((console, _)) = replayed
        .stdout
        .split_once("replay: final state identical to the recording")
    else {
        panic!("no verdict: {}", replayed.stdout)
    };
    assert_eq!(console, recorded.stdout, "the replay's console differs");
}

#[test]
fn counter_under_random_requests_records_and_replays_identically() {
    let rec = record_counter_under_load("net-rr", 0x5eed_0001);
    let (header, records) = read_log(&rec.log);
    assert_eq!(header.net_mac, Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]));
    assert!(
        matches!(records.last(), Some(Record::End { .. })),
        "the guest powered off by itself: the log ends with an End record"
    );
    assert_eq!(request_frames(&records).len() as u64, REQUESTS);
    let transmitted = records
        .iter()
        .filter(|r| matches!(r, Record::NetTx { .. }))
        .count() as u64;
    assert!(transmitted > REQUESTS, "{transmitted} NetTx records");
    assert_identical(&rec.recorded, &replay_counter(&rec, &rec.log));

    // The log names a NIC: a replay without one is refused up front.
    let out = run_to_end(
        &[
            "replay",
            "--log",
            rec.log.to_str().unwrap(),
            "--kernel",
            "builtin:counter",
            "--mem",
            "64M",
            "--cmdline",
            &rec.cmdline,
        ],
        TIMEOUT,
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr
            .contains("the recording had a NIC (--net) and this run has none"),
        "{}",
        out.stderr
    );
}

/// The replay of a tampered log must fail, saying it diverged or that the
/// log is corrupt: never succeed.
fn assert_refused(out: &Finished, needles: &[&str]) {
    assert!(!out.status.success(), "a tampered log replayed: {out:?}");
    assert!(
        !out.stdout.contains("final state identical"),
        "{}",
        out.stdout
    );
    assert!(
        needles.iter().any(|n| out.stderr.contains(n)),
        "expected one of {needles:?} in {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn a_log_that_lost_a_received_frame_is_refused() {
    let rec = record_counter_under_load("net-lost", 0x5eed_0002);
    let (header, mut records) = read_log(&rec.log);
    let requests = request_frames(&records);
    let lost = requests[requests.len() / 2];
    records.remove(lost);
    let tampered = rec.log.with_file_name("lost-frame.log");
    write_log(&tampered, &header, &records);
    assert_refused(
        &replay_counter(&rec, &tampered),
        &["diverged", "corrupt", "malformed"],
    );
}

#[test]
fn a_log_with_an_altered_received_frame_diverges() {
    let rec = record_counter_under_load("net-altered", 0x5eed_0003);
    let (header, mut records) = read_log(&rec.log);
    let requests = request_frames(&records);
    let Record::NetRx { frame, .. } = &mut records[requests[requests.len() / 3]] else {
        unreachable!("request_frames returns NetRx records")
    };
    // A byte of the request id: the guest's reply (or, as the UDP checksum
    // no longer holds, its silence) differs from the logged transmission.
    frame[UDP_PAYLOAD + 4] ^= 0x5a;
    let tampered = rec.log.with_file_name("altered-frame.log");
    write_log(&tampered, &header, &records);
    assert_refused(&replay_counter(&rec, &tampered), &["diverged"]);
}

// ---- dmaremap: device DMA and KVM's shadow page tables -----------------------

const WINDOW: u64 = 0x4000_0000;
const PAGE_B: u64 = 0x0220_0000;
const PDE_FLAGS: u64 = 0x87;
const TWO_MIB: u64 = 2 << 20;

/// The frame the dmaremap guest waits for: it lands on the second page
/// directory, so entry 0 (the window) becomes page B and entries 1-6 and
/// the low half of entry 7 keep their identity-map values.
fn page_directory_frame() -> Vec<u8> {
    let mut frame = (PAGE_B | PDE_FLAGS).to_le_bytes().to_vec();
    for k in 1..7 {
        frame.extend_from_slice(&((WINDOW + k * TWO_MIB) | PDE_FLAGS).to_le_bytes());
    }
    frame.extend_from_slice(&((WINDOW + 7 * TWO_MIB) | PDE_FLAGS).to_le_bytes()[..4]);
    assert_eq!(frame.len(), 60);
    frame
}

/// The hash dmaremap prints after reading the window's first 256 KiB on
/// page B (qword i = i * K2).
fn page_b_hash() -> u64 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    (0..32768u64).fold(0x243f_6a88_85a3_08d3, |hash, i| {
        (hash ^ i.wrapping_mul(K2)).rotate_left(7).wrapping_mul(K1)
    })
}

/// The number before `label` in the record summary, or after `label=` in
/// the `--stats` line.
fn stat(stderr: &str, label: &str) -> u64 {
    stats_counter(stderr, label)
        .or_else(|| {
            let before = stderr.split(&format!(" {label}")).next()?;
            before.rsplit([' ', '(']).next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {label} in {stderr}"))
}

/// Record dmaremap (`case`: `sync` or `stale`) with one page-directory frame
/// sent once it has posted its buffer, then replay it.
fn record_and_replay_dmaremap(case: &str) -> (Finished, Finished) {
    let dir = TempDir::new(&format!("net-dmaremap-{case}"));
    let log = dir.0.join("dmaremap.log");
    let log = log.to_str().unwrap();
    let cmdline = format!("console=ttyS0 {case}");
    let ns = namespace();
    without_ipv6(&ns);
    ns.add_tap("twd0").unwrap();
    let mut vm = spawn_in(
        &ns,
        &[
            "record",
            "--log",
            log,
            "--kernel",
            "builtin:dmaremap",
            "--mem",
            "64M",
            "--cmdline",
            &cmdline,
            "--net",
            "tap=twd0",
            "--stats",
            // The scenario is a sync point at every tick of the spin.
            "--tick-deferral-ms",
            "0",
        ],
    );
    vm.wait_for_stdout(&format!("dmaremap: ready case={case} "), WAIT);
    vm.wait_for_stdout("dmaremap: posted\n", TIMEOUT);
    ns.enter_on_thread(|| send_raw_frame("twd0", &page_directory_frame()))
        .unwrap()
        .expect("sending the page-directory frame");
    let recorded = vm.finish(TIMEOUT);
    assert!(recorded.status.success(), "{recorded:?}");
    assert!(
        recorded.stdout.contains("dmaremap: used=72 "),
        "the frame filled exactly the buffer over the page directory: {}",
        recorded.stdout
    );
    let replayed = run_to_end(
        &[
            "replay",
            "--log",
            log,
            "--kernel",
            "builtin:dmaremap",
            "--mem",
            "64M",
            "--cmdline",
            &cmdline,
            "--net",
            "tap=twd0",
        ],
        TIMEOUT,
    );
    (recorded, replayed)
}

#[test]
fn dma_into_a_page_directory_after_sync_points_replays_identically() {
    // The spin's sync points make the backup drop its shadow page tables
    // while the primary keeps a shadow mapping of the window on page A; the
    // frame then moves the window to page B. The first device write after a
    // sync point flushes both replicas' shadows, so both read page B.
    // Measured without that flush (device DMA never flushing): the primary
    // read page A, the backup page B, and every replay diverged.
    let (recorded, replayed) = record_and_replay_dmaremap("sync");
    let expected = format!(
        "dmaremap: used=72 first=B last=B hash={:#018x}\n",
        page_b_hash()
    );
    assert!(recorded.stdout.contains(&expected), "{}", recorded.stdout);
    assert!(
        stat(&recorded.stderr, "sync points") >= 20,
        "{}",
        recorded.stderr
    );
    // The primary flushes once: at the frame (its VMM writes no other
    // guest memory here).
    assert_eq!(
        stat(&recorded.stderr, "shadow-mmu-flushes"),
        1,
        "{}",
        recorded.stderr
    );
    assert_identical(&recorded, &replayed);
}

#[test]
fn dma_into_a_page_directory_before_sync_points_replays_identically() {
    // No sync point before the frame: neither replica flushes at it, so both
    // keep reading page A through the same stale shadow (`first`). The
    // spin's sync points come after it: the backup drops its shadow there.
    // Both replicas must read the same page afterwards (`last`).
    let (recorded, replayed) = record_and_replay_dmaremap("stale");
    assert!(
        recorded.stdout.contains("dmaremap: used=72 first="),
        "{}",
        recorded.stdout
    );
    assert_identical(&recorded, &replayed);
}

#[test]
fn raw_frame_errors_name_the_problem() {
    let ns = namespace();
    let outcome = ns
        .enter_on_thread(|| send_raw_frame("no-such-if", &page_directory_frame()))
        .unwrap();
    assert!(
        matches!(outcome, Err(ProbeError::NoSuchInterface(ref name)) if name == "no-such-if"),
        "{outcome:?}"
    );
    for len in [13, 1515] {
        let outcome = send_raw_frame("lo", &vec![0; len]);
        assert!(
            matches!(outcome, Err(ProbeError::FrameLength(l)) if l == len),
            "{outcome:?}"
        );
    }
}
