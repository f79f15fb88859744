//! `twinvm run` and `twinvm demo`: boot a guest on this host.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use crossbeam_channel::Sender;

use super::size::parse_size;
use crate::devices::Platform;
use crate::guests::{self, BUILTIN_PREFIX};
use crate::vmm::boot::{self, PreparedKernel};
use crate::vmm::{self, Control, Ending, Kicker, RunReport, Vm, VmConfig};

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

    fn serial_sink(&self) -> Result<Box<dyn Write + Send>> {
        if self.serial == "stdio" {
            return Ok(Box::new(std::io::stdout()));
        }
        let file = File::create(&self.serial)
            .with_context(|| format!("creating serial output file {}", self.serial))?;
        Ok(Box::new(file))
    }
}

/// Forward stdin to the guest's serial port. The thread is left to end with
/// the process: a blocking read cannot be interrupted portably.
fn spawn_stdin_reader(tx: Sender<Control>, kicker: Kicker) {
    let _ = thread::Builder::new()
        .name("twinvm-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(Control::SerialInput(buf[..n].to_vec())).is_err() {
                            return;
                        }
                        kicker.kick();
                    }
                }
            }
        });
}

/// Stop the VM cleanly on SIGINT/SIGTERM.
struct StopOnSignal {
    handle: signal_hook::iterator::Handle,
    thread: Option<thread::JoinHandle<()>>,
}

impl StopOnSignal {
    fn install(tx: Sender<Control>, kicker: Kicker) -> Result<Self> {
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
            .context("installing signal handlers")?;
        let handle = signals.handle();
        let thread = thread::Builder::new()
            .name("twinvm-signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = tx.send(Control::Stop);
                    kicker.kick();
                }
            })
            .context("spawning the signal thread")?;
        Ok(StopOnSignal {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for StopOnSignal {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A guest ready to boot: its configuration and where its console goes.
pub struct VmSession {
    pub config: VmConfig,
    /// The kernel as it is loaded (a bzImage's kernel taken out, traps planted).
    pub kernel: PreparedKernel,
    /// Wall-clock time the guest's RTC starts from.
    pub boot_unix_secs: u64,
    args: RunArgs,
}

impl VmSession {
    /// Read the kernel and initrd named in `args`, and prepare the kernel.
    pub fn new(args: &RunArgs, boot_unix_secs: u64) -> Result<Self> {
        let config = args.vm_config()?;
        let kernel = boot::prepare_kernel(&config.kernel_name, &config.kernel)?;
        Ok(VmSession {
            config,
            kernel,
            boot_unix_secs,
            args: args.clone(),
        })
    }

    /// Refuse a kernel whose recording could not be replayed (`record` and
    /// `replay` call this before anything else).
    pub fn require_replayable(&self) -> Result<()> {
        match &self.kernel.not_replayable {
            Some(why) => bail!(
                "{}: cannot be recorded and replayed: {why}",
                self.args.kernel
            ),
            None => Ok(()),
        }
    }

    /// Build the VM and run it on this thread in `mode`, pinned to
    /// `host_cpu` if given. With `forward_stdin` (and `--serial stdio`) what
    /// is typed goes to the guest's serial port.
    pub fn run(
        &self,
        forward_stdin: bool,
        mode: vmm::Mode<'_>,
        host_cpu: Option<u32>,
    ) -> Result<RunReport> {
        if let (vmm::Mode::Live, Some(why)) = (&mode, &self.kernel.not_replayable) {
            tracing::warn!(
                "{}: {why} (`run` boots it; `record` refuses it)",
                self.args.kernel
            );
        }
        let mut vm = Vm::create_with_kernel(&self.config, &self.kernel)
            .with_context(|| format!("building the VM for {}", self.args.kernel))?;
        tracing::info!(entry = format_args!("{:#x}", vm.kernel.entry), kind = ?vm.kernel.kind, "kernel loaded");
        let mut platform = Platform::new(self.args.serial_sink()?, self.boot_unix_secs);
        let kicker = Kicker::for_current_thread().context("installing the vCPU kick handler")?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let _signals = StopOnSignal::install(tx.clone(), kicker)?;
        if forward_stdin && self.args.serial == "stdio" {
            spawn_stdin_reader(tx.clone(), kicker);
        }
        // Keep a sender alive so a closed stdin does not look like "no input ever".
        let _keep = tx;
        let report = vmm::run(&mut vm, &mut platform, &rx, kicker, mode, host_cpu)?;
        let _ = std::io::stdout().flush();
        Ok(report)
    }
}

/// Boot a guest and run it live to its end on this thread.
pub fn boot_and_run(args: &RunArgs, forward_stdin: bool) -> Result<RunReport> {
    let boot_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    VmSession::new(args, boot_secs)?.run(forward_stdin, vmm::Mode::Live, None)
}

pub(super) fn describe(report: &RunReport) -> String {
    let how = match report.ending {
        Ending::ResetRequested => "guest powered off (reset line pulsed via the i8042)",
        Ending::HaltedForGood => "guest powered off (halted with interrupts disabled)",
        Ending::Stopped => "stopped",
    };
    format!("{how} after {:.3} s", report.wall.as_secs_f64())
}

pub(super) fn print_stats(report: &RunReport) {
    let s = &report.stats;
    let secs = report.wall.as_secs_f64().max(1e-9);
    eprintln!(
        "twinvm: exits={} ({:.0}/s) io={} mmio={} hlt={} kicks={} landmarks={} interrupts={} emulation-fallbacks={} exceptions-injected={} time-reads={} random-reads={} syscall-fixes={} shadow-mmu-flushes={}",
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
        s.shadow_mmu_flushes
    );
}

/// `twinvm run`.
pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let report = boot_and_run(args, true)?;
    eprintln!("twinvm: {}", describe(&report));
    if args.stats {
        print_stats(&report);
    }
    Ok(match report.ending {
        Ending::Stopped => ExitCode::from(130),
        _ => ExitCode::SUCCESS,
    })
}
