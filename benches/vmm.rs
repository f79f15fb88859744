//! VMM benchmark: prints figures, asserts nothing about speed.
//!
//! - exit rate of the port-I/O-heavy `portio` guest (one exit per `out`);
//! - boot-to-marker time of every test guest: from `Vm::create` to the moment
//!   the guest's marker line reaches the serial port.
//!
//! Run: `cargo bench --bench vmm` (as root; needs /dev/kvm).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use twinvm::devices::Platform;
use twinvm::guests;
use twinvm::replay::engine::{
    Connections, ConsoleAndNet, Control, Ending, Engine, Inputs, RecordSettings, Role, RunReport,
};
use twinvm::vmm::{Kicker, Vm, VmConfig};

/// What to type once the marker is seen, where to type it, and whom to wake.
type Reply = (&'static [u8], Sender<Vec<u8>>, Kicker);

/// Serial sink that notes when a marker first appears in the output, and
/// types `reply` at the console once the marker is seen (as a user would,
/// after the guest said it is ready).
struct MarkerWatch {
    marker: &'static [u8],
    seen: Vec<u8>,
    at: Arc<Mutex<Option<Instant>>>,
    reply: Option<Reply>,
}

impl Write for MarkerWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.seen.extend_from_slice(buf);
        let mut at = self.at.lock().unwrap();
        if at.is_none()
            && self
                .seen
                .windows(self.marker.len())
                .any(|w| w == self.marker)
        {
            *at = Some(Instant::now());
            if let Some((bytes, tx, kicker)) = self.reply.take() {
                let _ = tx.send(bytes.to_vec());
                kicker.kick();
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A run that has not ended by then is stopped and reported as a failure.
const WATCHDOG: Duration = Duration::from_secs(120);

fn boot(name: &str, marker: &'static str, reply: Option<&'static [u8]>) -> (Duration, RunReport) {
    let config = VmConfig {
        kernel_name: format!("builtin:{name}"),
        kernel: guests::builtin(name).expect("guest").to_vec(),
        initrd: None,
        cmdline: String::new(),
        mem_bytes: 64 << 20,
    };
    let at = Arc::new(Mutex::new(None));
    let start = Instant::now();
    let vm = Vm::create(&config).expect("create VM");
    let kicker = Kicker::new();
    let (tx, rx) = crossbeam_channel::bounded(4);
    let (serial_tx, serial_rx) = crossbeam_channel::bounded(4);
    let sink = MarkerWatch {
        marker: marker.as_bytes(),
        seen: Vec::new(),
        at: at.clone(),
        reply: reply.map(|r| (r, serial_tx, kicker.clone())),
    };
    let platform = Platform::new(Vec::new(), 0);
    let inputs = Inputs {
        control: rx,
        serial: Some(serial_rx),
        net: None,
    };
    let outputs = Box::new(ConsoleAndNet {
        console: Box::new(sink),
        net: None,
    });
    let mut engine = Engine::new(
        vm,
        platform,
        Connections {
            inputs,
            outputs,
            kicker: kicker.clone(),
        },
        Role::Live,
        RecordSettings::default(),
        None,
    )
    .expect("engine");
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(WATCHDOG).is_err() {
            let _ = tx.send(Control::Stop);
            kicker.kick();
        }
    });
    let report = engine.run().expect("run");
    drop(done_tx);
    watchdog.join().unwrap();
    assert_ne!(
        report.ending(),
        Some(Ending::Stopped),
        "{name} did not finish within {WATCHDOG:?}"
    );
    let marker_at = at.lock().unwrap().expect("marker seen");
    (marker_at - start, report)
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    println!(
        "twinvm VMM benchmark (host: {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("exit rate, portio guest (100000 port writes from kernel mode):");
    for run in 1..=3 {
        let (_, r) = boot("portio", "portio: exits=", None);
        let secs = r.wall.as_secs_f64();
        println!(
            "  run {run}: {} exits in {:.3} s = {:.0} exits/s ({:.2} us/exit incl. the emulated loop)",
            r.stats.total,
            secs,
            r.stats.total as f64 / secs,
            secs * 1e6 / r.stats.total as f64
        );
    }
    println!();
    println!("boot-to-marker, median of 5 runs each:");
    println!(
        "  {:<8} {:<24} {:>10} {:>8} {:>11} {:>10}",
        "guest", "marker", "median ms", "exits", "interrupts", "fallbacks"
    );
    let cases: [(&str, &str, Option<&'static [u8]>); 4] = [
        ("hello", "hello: done", None),
        ("ticker", "ticker: done", None),
        ("echo", "echo: ready", Some(b"q")),
        ("portio", "portio: exits=", None),
    ];
    for (name, marker, reply) in cases {
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..5 {
            let (t, r) = boot(name, marker, reply);
            times.push(t);
            last = Some(r);
        }
        times.sort();
        let r = last.unwrap();
        println!(
            "  {:<8} {:<24} {:>10.1} {:>8} {:>11} {:>10}",
            name,
            format!("{marker:?}"),
            times[2].as_secs_f64() * 1e3,
            r.stats.total,
            r.stats.interrupts_injected,
            r.stats.emulation_fallbacks
        );
    }
}
