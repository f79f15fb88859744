//! TCP to and from the Linux guest, plain (`twinvm run`) beside recorded
//! (`twinvm record`): prints figures, asserts only that the data arrived.
//!
//! Each mode boots Debian's kernel in the networked mode
//! (guest-images/linux/init, `twinvm.ip=`) behind a TAP in its own network
//! namespace. The two boot side by side, each pinned to its own host CPU
//! (a boot takes 20-40 minutes here); once both serve, the transfers run
//! one mode after the other, the other guest idle, and measure from the
//! host side:
//! echo round trips, a bulk transfer to the guest's discard service (it
//! answers the byte count), and one from its source service (the guest's
//! /bin/busybox, about 1.9 MB). While recording, the log's growth during
//! each transfer gives log bytes per received frame and the log's rate.
//!
//! Run: `cargo bench --bench linux_tcp` (root, /dev/kvm, 2 host CPUs; two
//! boots of Debian's kernel at once, 25-45 minutes here). `TWINVM_BENCH_TCP_KB` sets the
//! kilobytes sent to the guest (default 4096); the image and timeouts are
//! set as for tests/linux_boot.rs.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/linux_guest/mod.rs"]
mod linux_guest;

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Running, TempDir};
use linux_guest::{
    guest_args, net_cmdline, number_after, pinned, pseudo_random, tail, timeout, GuestNet,
};
use twinvm::replay::log::{LogReader, Record};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Run,
    Record,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Run => "run",
            Mode::Record => "record",
        }
    }
}

/// What the log gained while one transfer ran.
#[derive(Default)]
struct LogWindow {
    bytes: u64,
    rx_frames: u64,
    rx_frame_bytes: u64,
}

struct Figures {
    mode: Mode,
    serving_after: Duration,
    echo_rtt: Duration,
    to_guest: (u64, Duration),
    from_guest: (u64, Duration),
    from_guest_hash: blake3::Hash,
    log: Option<[LogWindow; 2]>,
    stats: String,
}

const ECHO_ROUNDS: usize = 10;

/// Boot `mode`'s guest on host CPU `cpu`; once it serves, take `turn`
/// (one mode measures at a time) and measure.
fn measure(mode: Mode, cpu: u32, to_guest: &[u8], turn: &Mutex<()>) -> Figures {
    let net = GuestNet::create();
    let dir = TempDir::new(&format!("linux-tcp-{}", mode.name()));
    let log = dir.0.join("linux-tcp.log");
    let mut args = vec![mode.name().to_string()];
    if mode == Mode::Record {
        args.extend([
            "--log".into(),
            log.to_str().unwrap().into(),
            "--sync-bound-us".into(),
            "2000".into(),
        ]);
    }
    args.extend([
        "--net".into(),
        format!("tap={}", linux_guest::TAP),
        "--stats".into(),
    ]);
    args.extend(guest_args(&net_cmdline(3600)));

    let started = Instant::now();
    let mut guest = Running::spawn_command(pinned(net.twinvm(&args), cpu));
    guest.wait_for_stdout("TWINVM-NET-SERVING", timeout());
    let serving_after = started.elapsed();
    eprintln!(
        "linux_tcp: {}: serving after {serving_after:.1?}",
        mode.name()
    );
    let _turn = turn.lock().unwrap_or_else(|p| p.into_inner());

    let lines: Vec<String> = (0..ECHO_ROUNDS)
        .map(|i| format!("round trip {i}"))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let t = Instant::now();
    assert_eq!(net.echo_lines(&lines), lines);
    let echo_rtt = t.elapsed() / ECHO_ROUNDS as u32;

    let log_len = || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let l0 = log_len();
    let (count, to_guest_time) = net.discard(to_guest);
    assert_eq!(count, to_guest.len() as u64, "the discard service's count");
    let l1 = log_len();
    let (from, from_guest_time) = net.source();
    let l2 = log_len();
    assert!(
        from.starts_with(b"\x7fELF") && from.len() > 1_000_000,
        "the source service sent {} bytes",
        from.len()
    );
    eprintln!(
        "linux_tcp: {}: {} KiB in {to_guest_time:.1?}, {} KiB out in {from_guest_time:.1?}",
        mode.name(),
        to_guest.len() >> 10,
        from.len() >> 10
    );
    assert_eq!(net.stop().trim(), "TWINVM-STOPPING");
    let out = guest.finish(timeout());
    assert!(
        out.status.success() && out.stdout.contains("TWINVM-POWEROFF"),
        "{} failed: {}\n{}",
        mode.name(),
        out.stderr,
        tail(&out.stdout)
    );
    let log_windows = (mode == Mode::Record).then(|| log_windows(&log, [l0, l1, l2]));
    Figures {
        mode,
        serving_after,
        echo_rtt,
        to_guest: (to_guest.len() as u64, to_guest_time),
        from_guest: (from.len() as u64, from_guest_time),
        from_guest_hash: blake3::hash(&from),
        log: log_windows,
        stats: out
            .stderr
            .lines()
            .find(|l| l.contains("exits="))
            .unwrap_or_default()
            .to_string(),
    }
}

/// The log records that start in `[bounds[0], bounds[1])` and in
/// `[bounds[1], bounds[2])` (file sizes taken around each transfer; the
/// writer's buffer makes them a few KiB early).
fn log_windows(path: &Path, bounds: [u64; 3]) -> [LogWindow; 2] {
    let file = File::open(path).expect("open the log");
    let mut reader = LogReader::new(BufReader::new(file)).expect("read the log header");
    let mut windows = [LogWindow::default(), LogWindow::default()];
    loop {
        let at = reader.offset();
        let Some(record) = reader.next_record().expect("read the log") else {
            break;
        };
        let end = reader.offset();
        let Some(w) = (0..2).find(|&w| (bounds[w]..bounds[w + 1]).contains(&at)) else {
            continue;
        };
        windows[w].bytes += end - at;
        if let Record::NetRx { frame, .. } = record {
            windows[w].rx_frames += 1;
            windows[w].rx_frame_bytes += frame.len() as u64;
        }
    }
    windows
}

fn mbit_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 * 8.0 / time.as_secs_f64() / 1e6
}

fn main() {
    let kib: usize = std::env::var("TWINVM_BENCH_TCP_KB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4096);
    let data = pseudo_random(kib << 10);
    let turn = Mutex::new(());
    let figures: Vec<Figures> = std::thread::scope(|s| {
        let boots: Vec<_> = [(Mode::Run, 0), (Mode::Record, 1)]
            .into_iter()
            .map(|(mode, cpu)| {
                let (data, turn) = (&data, &turn);
                s.spawn(move || measure(mode, cpu, data, turn))
            })
            .collect();
        boots
            .into_iter()
            .map(|b| b.join().expect("a mode's measurement failed"))
            .collect()
    });
    assert_eq!(
        figures[0].from_guest_hash, figures[1].from_guest_hash,
        "the source service sent different bytes"
    );

    println!(
        "TCP with Debian's 6.1 kernel (virtio-net, busybox nc), host <-> guest through a TAP:"
    );
    println!(
        "{:<7} {:>10} {:>9} {:>13} {:>9} {:>13} {:>9}",
        "mode", "serving s", "echo ms", "to guest KiB", "Mbit/s", "from guest", "Mbit/s"
    );
    for f in &figures {
        println!(
            "{:<7} {:>10.1} {:>9.1} {:>13} {:>9.3} {:>13} {:>9.3}",
            f.mode.name(),
            f.serving_after.as_secs_f64(),
            f.echo_rtt.as_secs_f64() * 1e3,
            f.to_guest.0 >> 10,
            mbit_per_s(f.to_guest.0, f.to_guest.1),
            f.from_guest.0 >> 10,
            mbit_per_s(f.from_guest.0, f.from_guest.1),
        );
    }
    let rec = &figures[1];
    let run = &figures[0];
    println!(
        "record/run transfer time: to guest {:.2}, from guest {:.2}",
        rec.to_guest.1.as_secs_f64() / run.to_guest.1.as_secs_f64(),
        rec.from_guest.1.as_secs_f64() / run.from_guest.1.as_secs_f64()
    );
    if let Some(windows) = &rec.log {
        for (name, w, time) in [
            ("to guest", &windows[0], rec.to_guest.1),
            ("from guest", &windows[1], rec.from_guest.1),
        ] {
            let per_frame = w.bytes.checked_div(w.rx_frames).unwrap_or(0);
            println!(
                "log while sending {name}: {} KiB, {} frames received ({} KiB of frames), {} log bytes per received frame, log {:.3} Mbit/s",
                w.bytes >> 10,
                w.rx_frames,
                w.rx_frame_bytes >> 10,
                per_frame,
                mbit_per_s(w.bytes, time)
            );
        }
    }
    for f in &figures {
        let rx = number_after(&f.stats, "net-rx=").unwrap_or(0);
        let tx = number_after(&f.stats, "net-tx=").unwrap_or(0);
        println!(
            "{}: whole boot net-rx={rx} net-tx={tx}; {}",
            f.mode.name(),
            f.stats
        );
    }
}
