//! `twinvm run` and `twinvm demo`: boot a guest on this host.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use crossbeam_channel::Receiver;

use super::size::parse_size;
use crate::devices::{Platform, TickDelivery};
use crate::guests::{self, BUILTIN_PREFIX};
use crate::net::tap::TapBackend;
use crate::net::NetSpec;
use crate::replay::engine::{
    Connections, ConsoleAndNet, Ending, Engine, FrameSender, Inputs, RecordSettings, Role,
    RunReport, StopOnSignal, TestPerturbation, DEFAULT_SYNC_BOUND_US,
};
use crate::replay::machine;
use crate::vmm::{boot, Kicker, Vm, VmConfig};

/// Arguments of `twinvm run` (shared by later subcommands that boot a guest).
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Kernel: an x86-64 ELF (test guest or Linux vmlinux), a bzImage, or `builtin:NAME`.
    #[arg(long)]
    pub kernel: String,
    /// Initial ramdisk loaded for Linux.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Guest memory: 512M, 2G, or a number of MiB.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Where the guest's COM1 goes: `stdio` (and input from stdin) or a file path.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// Print exit statistics on stderr when the guest ends.
    #[arg(long)]
    pub stats: bool,
    /// Give the guest a virtio-net NIC backed by a TAP device:
    /// `tap=NAME[,mac=52:54:00:12:34:56]` (the TAP is created if missing).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    pub net: Option<NetSpec>,
}

/// Arguments of `twinvm run` itself.
#[derive(Debug, Clone, Args)]
pub struct PlainRunArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Microseconds a due interrupt may wait for a landmark before the guest
    /// is stopped to take it (as `record --sync-bound-us`: give both the
    /// same bound to compare a plain run with a recording).
    #[arg(long, default_value_t = DEFAULT_SYNC_BOUND_US, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub sync_bound_us: u64,
}

/// Read the kernel named on the command line (a file or an embedded guest).
pub fn load_kernel_image(kernel: &str) -> Result<Vec<u8>> {
    if let Some(name) = kernel.strip_prefix(BUILTIN_PREFIX) {
        return match guests::builtin(name) {
            Some(image) => Ok(image.to_vec()),
            None => bail!(
                "no embedded guest `{name}`; embedded guests: {}",
                guests::names().join(", ")
            ),
        };
    }
    std::fs::read(kernel).with_context(|| format!("reading kernel {kernel}"))
}

impl RunArgs {
    /// The VM configuration these arguments describe.
    pub fn vm_config(&self) -> Result<VmConfig> {
        let kernel = load_kernel_image(&self.kernel)?;
        let initrd = match &self.initrd {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("reading initrd {}", path.display()))?,
            ),
            None => None,
        };
        Ok(VmConfig {
            kernel_name: self.kernel.clone(),
            kernel,
            initrd,
            cmdline: self.cmdline.clone(),
            mem_bytes: self.mem,
        })
    }

    pub fn serial_sink(&self) -> Result<Box<dyn Write + Send>> {
        if self.serial == "stdio" {
            return Ok(Box::new(std::io::stdout()));
        }
        let file = File::create(&self.serial)
            .with_context(|| format!("creating serial output file {}", self.serial))?;
        Ok(Box::new(file))
    }
}

/// How many chunks of typed input may wait for the guest; beyond that the
/// stdin reader blocks (the guest takes input only as fast as its UART).
const SERIAL_QUEUE: usize = 64;

/// Forward stdin to the guest's serial port. The thread is left to end with
/// the process: a blocking read cannot be interrupted portably.
fn spawn_stdin_reader(kicker: Kicker) -> Receiver<Vec<u8>> {
    let (tx, rx) = crossbeam_channel::bounded(SERIAL_QUEUE);
    let _ = thread::Builder::new()
        .name("twinvm-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                        kicker.kick();
                    }
                }
            }
            // A closed stdin is news too: the engine forgets the channel.
            drop(tx);
            kicker.kick();
        });
    rx
}

/// Refuse a kernel whose recording could not be replayed, naming why
/// (time or entropy reads that cannot be trapped: a bzImage whose payload
/// twinvm does not decompress, an ELF without readable code sections).
/// Whatever records or replays calls this before creating anything.
pub fn require_replayable(config: &VmConfig) -> Result<()> {
    let kernel = boot::prepare_kernel(&config.kernel_name, &config.kernel)?;
    match kernel.not_replayable {
        Some(why) => bail!(
            "{}: cannot be recorded and replayed: {why}",
            config.kernel_name
        ),
        None => Ok(()),
    }
}

/// A guest ready to boot: its configuration and where its console goes.
pub struct VmSession {
    pub config: VmConfig,
    /// Wall-clock time the guest's RTC starts from.
    pub boot_unix_secs: u64,
    /// `replay --test-perturb`: a replay made wrong on purpose (tests only).
    pub test_perturbation: Option<TestPerturbation>,
    /// How ticks reach the guest: a recording's choice (`--tick-delivery`),
    /// a replay's from its log header.
    pub tick_delivery: TickDelivery,
    args: RunArgs,
}

impl VmSession {
    /// Read the kernel and initrd named in `args`.
    pub fn new(args: &RunArgs, boot_unix_secs: u64) -> Result<Self> {
        Ok(VmSession {
            config: args.vm_config()?,
            boot_unix_secs,
            test_perturbation: None,
            tick_delivery: TickDelivery::AtLandmarks,
            args: args.clone(),
        })
    }

    /// [`require_replayable`] for this session's kernel.
    pub fn require_replayable(&self) -> Result<()> {
        require_replayable(&self.config)
    }

    /// The NIC's MAC, if the guest has one.
    pub fn net_mac(&self) -> Option<[u8; 6]> {
        self.args.net.as_ref().map(|n| n.mac)
    }

    /// Build the VM and its devices.
    pub fn build(&self) -> Result<(Vm, Platform<Vec<u8>>)> {
        machine::build(
            &self.config,
            self.boot_unix_secs,
            self.tick_delivery,
            self.net_mac(),
        )
        .with_context(|| format!("building the VM for {}", self.args.kernel))
    }

    /// Open the TAP device of `--net` and start moving frames; received
    /// frames wake the vCPU through `kicker`.
    pub fn open_tap(&self, kicker: &Kicker) -> Result<Option<Arc<TapBackend>>> {
        crate::ft::node::open_tap(self.args.net.as_ref(), kicker)
    }

    /// Build the VM and run it on this thread in `role`, pinned to
    /// `host_cpu` if given. A live role (not a replay) gets its input:
    /// with `forward_stdin` and `--serial stdio` what is typed goes to the
    /// guest's serial port,
    /// and `--net` opens the TAP device; a replay takes both from its log and
    /// sends no frame. Returns the engine too, for the caller to finish the
    /// role's log.
    pub fn run(
        &self,
        forward_stdin: bool,
        role: Role,
        settings: RecordSettings,
        host_cpu: Option<u32>,
    ) -> Result<(RunReport, Engine)> {
        let live = !matches!(role, Role::Replay(_));
        let (vm, platform) = self.build()?;
        let kicker = Kicker::new();
        let (control_tx, control_rx) = crossbeam_channel::bounded(16);
        let _signals = StopOnSignal::install(control_tx.clone(), kicker.clone())
            .context("installing signal handlers")?;
        let serial = (live && forward_stdin && self.args.serial == "stdio")
            .then(|| spawn_stdin_reader(kicker.clone()));
        let tap = if live { self.open_tap(&kicker)? } else { None };
        let net_sender: Option<FrameSender> = tap.clone().map(|tap| {
            Box::new(move |frame: &[u8]| {
                if let Err(e) = tap.send(frame) {
                    tracing::warn!("sending a frame on {}: {e}", tap.name());
                }
            }) as FrameSender
        });
        let outputs = Box::new(ConsoleAndNet {
            console: self.args.serial_sink()?,
            net: net_sender,
        });
        let inputs = Inputs {
            control: control_rx,
            serial,
            net: tap.as_ref().map(|t| t.rx().clone()),
        };
        let mut engine = Engine::new(
            vm,
            platform,
            Connections {
                inputs,
                outputs,
                kicker,
            },
            role,
            settings,
            host_cpu,
        )?;
        engine.set_test_perturbation(self.test_perturbation);
        // Keep a sender alive so a closed stdin does not look like "no input ever".
        let _keep = control_tx;
        let report = engine.run()?;
        Ok((report, engine))
    }
}

/// Boot a guest and run it live to its end on this thread.
pub fn boot_and_run(
    args: &RunArgs,
    settings: RecordSettings,
    forward_stdin: bool,
) -> Result<RunReport> {
    let boot_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (report, _) =
        VmSession::new(args, boot_secs)?.run(forward_stdin, Role::Live, settings, None)?;
    Ok(report)
}

pub(super) fn describe(report: &RunReport) -> String {
    let how = match report.ending() {
        Some(Ending::ResetRequested) => "guest powered off (reset line pulsed via the i8042)",
        Some(Ending::HaltedForGood) => "guest powered off (halted with interrupts disabled)",
        Some(Ending::Stopped) => "stopped",
        None => "the primary's log ended",
    };
    format!("{how} after {:.3} s", report.wall.as_secs_f64())
}

pub(super) fn print_stats(report: &RunReport) {
    let s = &report.stats;
    let secs = report.wall.as_secs_f64().max(1e-9);
    eprintln!(
        "twinvm: exits={} ({:.0}/s) io={} mmio={} hlt={} kicks={} landmarks={} interrupts={} emulation-fallbacks={} exceptions-injected={} time-reads={} random-reads={} syscall-fixes={} shadow-mmu-flushes={} net-rx={} net-tx={} tick-deferrals={} interrupt-windows={} ticks-caught-up={} ticks-dropped={} tick-late-ms-mean={:.2} tick-late-ms-max={:.2} kvm-emulated-instructions={}",
        s.total,
        s.total as f64 / secs,
        s.io,
        s.mmio,
        s.hlt,
        s.kicks,
        s.landmarks,
        s.interrupts_injected,
        s.emulation_fallbacks,
        s.exceptions_injected,
        s.time_reads,
        s.random_reads,
        s.syscall_fixes,
        s.shadow_mmu_flushes,
        s.net_rx_frames,
        s.net_tx_frames,
        s.tick_deferrals,
        s.interrupt_windows,
        s.pit_ticks_caught_up,
        s.pit_ticks_dropped,
        s.timer_poll_delay_total.as_secs_f64() * 1e3 / s.timer_polls.max(1) as f64,
        s.timer_poll_delay_max.as_secs_f64() * 1e3,
        s.emulated_instructions
            .map_or_else(|| "unknown".to_string(), |n| n.to_string()),
    );
    eprintln!(
        "twinvm: vCPU time between landmarks, count/total by length: {}",
        s.stretches.summary()
    );
}

/// `twinvm run`.
pub fn run(args: &PlainRunArgs) -> Result<ExitCode> {
    let settings = RecordSettings {
        sync_bound: std::time::Duration::from_micros(args.sync_bound_us),
        ..RecordSettings::default()
    };
    let report = boot_and_run(&args.run, settings, true)?;
    eprintln!("twinvm: {}", describe(&report));
    if args.run.stats {
        print_stats(&report);
    }
    Ok(match report.ending() {
        Some(Ending::Stopped) => ExitCode::from(130),
        _ => ExitCode::SUCCESS,
    })
}
