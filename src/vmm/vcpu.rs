//! The vCPU loop: run the guest, hand its exits to the platform, deliver
//! interrupts, and finish the instructions KVM's emulator cannot.
//!
//! The loop runs on the calling thread. Other threads talk to it through a
//! [`Control`] channel and wake it with a [`Kicker`]; a timer thread kicks it
//! when the platform's next timer deadline passes, so a guest spinning in
//! user mode still gets its timer interrupts.

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use kvm_ioctls::VcpuExit;
use thiserror::Error;

use super::emulate::{self, EmulateError, Emulated, GuestCpu};
use super::guest_cpu::KvmGuestCpu;
use super::sys::{self, Kicker};
use super::vm::{Vm, VmError};
use crate::devices::{Nanos, Platform, PlatformEvent};

/// Messages to a running vCPU loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Bytes typed at the serial console.
    SerialInput(Vec<u8>),
    /// Stop the VM (Ctrl-C, or the caller is done).
    Stop,
}

/// How a guest run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The guest pulsed the reset line (i8042): its way to reboot or power off.
    ResetRequested,
    /// The guest halted with interrupts disabled: nothing can wake it again.
    HaltedForGood,
    /// Stopped from outside (Control::Stop).
    Stopped,
}

/// Counts of what happened during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStats {
    pub total: u64,
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub kicks: u64,
    pub irq_windows: u64,
    pub interrupts_injected: u64,
    pub emulation_fallbacks: u64,
    pub exceptions_injected: u64,
}

/// The outcome of [`run`].
#[derive(Debug, Clone, Copy)]
pub struct RunReport {
    pub ending: Ending,
    pub stats: ExitStats,
    pub wall: Duration,
}

/// Why a run stopped with an error.
#[derive(Debug, Error)]
pub enum RunError {
    /// KVM reported a shutdown: the guest triple-faulted.
    #[error("guest triple-faulted (KVM shutdown exit) at RIP {rip:#x}")]
    TripleFault { rip: u64 },
    /// An emulation failure the fallback could not finish.
    #[error(transparent)]
    Emulation(#[from] EmulateError),
    /// Another internal error from KVM.
    #[error("KVM internal error, sub-error {suberror}, data {data:x?}, at RIP {rip:#x}")]
    Internal {
        suberror: u32,
        data: Vec<u64>,
        rip: u64,
    },
    /// KVM refused to enter the guest.
    #[error("KVM could not enter the guest: hardware reason {reason:#x}")]
    FailEntry { reason: u64 },
    /// An exit reason twinvm never asks for.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// A KVM call failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    /// Building/altering VM state failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> RunError {
    move |source| RunError::Kvm { what, source }
}

/// Kicks the vCPU thread whenever the deadline it was last given passes.
struct DeadlineTimer {
    tx: Option<Sender<Option<Instant>>>,
    thread: Option<thread::JoinHandle<()>>,
    armed: Option<Nanos>,
}

impl DeadlineTimer {
    fn start(kicker: Kicker) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<Option<Instant>>();
        let thread = thread::Builder::new()
            .name("twinvm-timer".into())
            .spawn(move || {
                let mut deadline: Option<Instant> = None;
                loop {
                    let msg = match deadline {
                        Some(d) => rx.recv_deadline(d),
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    match msg {
                        Ok(d) => deadline = d,
                        Err(RecvTimeoutError::Timeout) => {
                            kicker.kick();
                            deadline = None;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("spawning the timer thread");
        DeadlineTimer {
            tx: Some(tx),
            thread: Some(thread),
            armed: None,
        }
    }

    /// Arm for `deadline` (guest ns), unless already armed for it.
    fn arm(&mut self, start: Instant, deadline: Option<Nanos>) {
        if self.armed != deadline {
            self.armed = deadline;
            if let Some(tx) = &self.tx {
                let _ = tx.send(deadline.map(|ns| start + Duration::from_nanos(ns)));
            }
        }
    }

    /// The timer fired (or may have): the next arm must be sent again.
    fn fired(&mut self) {
        self.armed = None;
    }
}

impl Drop for DeadlineTimer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serial input the UART could not take yet (its FIFO is full); never dropped.
#[derive(Default)]
struct PendingInput(std::collections::VecDeque<u8>);

impl PendingInput {
    fn feed<W: Write>(&mut self, platform: &mut Platform<W>) {
        while !self.0.is_empty() {
            let (front, _) = self.0.as_slices();
            let taken = platform.enqueue_serial_input(front);
            if taken == 0 {
                break;
            }
            self.0.drain(..taken);
        }
    }
}

/// Run the guest on the calling thread until it powers off, is stopped, or
/// fails. `kicker` must be this thread's (from [`Kicker::for_current_thread`]).
pub fn run<W: Write>(
    vm: &mut Vm,
    platform: &mut Platform<W>,
    control: &Receiver<Control>,
    kicker: Kicker,
) -> Result<RunReport, RunError> {
    let start = Instant::now();
    let now = || start.elapsed().as_nanos() as Nanos;
    let _registration =
        sys::register_vcpu_thread(&mut vm.vcpu).map_err(kvm_err("install kick handler"))?;
    let mut timer = DeadlineTimer::start(kicker);
    let mut stats = ExitStats::default();
    let mut input = PendingInput::default();
    let report = |ending, stats| {
        Ok(RunReport {
            ending,
            stats,
            wall: start.elapsed(),
        })
    };

    loop {
        for msg in control.try_iter() {
            match msg {
                Control::Stop => return report(Ending::Stopped, stats),
                Control::SerialInput(bytes) => input.0.extend(bytes),
            }
        }
        input.feed(platform);
        platform.poll(now());
        if let Some(PlatformEvent::Reset) = platform.take_event() {
            return report(Ending::ResetRequested, stats);
        }
        deliver_interrupt(vm, platform, &mut stats)?;
        timer.arm(start, platform.next_deadline());

        stats.total += 1;
        let exit = match vm.vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR => {
                vm.vcpu.set_kvm_immediate_exit(0);
                stats.kicks += 1;
                timer.fired();
                continue;
            }
            Err(e) if e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                return Err(RunError::Kvm {
                    what: "run vCPU",
                    source: e,
                })
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                stats.io += 1;
                platform.pio_read(port, data, now());
            }
            VcpuExit::IoOut(port, data) => {
                stats.io += 1;
                platform.pio_write(port, data, now());
            }
            VcpuExit::MmioRead(addr, data) => {
                // No MMIO devices yet: reads float high, as on an empty bus.
                stats.mmio += 1;
                tracing::debug!("guest read unmapped MMIO {addr:#x}");
                data.fill(0xff);
            }
            VcpuExit::MmioWrite(addr, _) => {
                stats.mmio += 1;
                tracing::debug!("guest wrote unmapped MMIO {addr:#x}");
            }
            VcpuExit::IrqWindowOpen => stats.irq_windows += 1,
            VcpuExit::Hlt => {
                stats.hlt += 1;
                if vm.vcpu.get_kvm_run().if_flag == 0 {
                    return report(Ending::HaltedForGood, stats);
                }
                if let Some(ending) = wait_while_halted(platform, control, &mut input, &now, start)?
                {
                    return report(ending, stats);
                }
            }
            VcpuExit::Shutdown => {
                let rip = vm.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(RunError::TripleFault { rip });
            }
            VcpuExit::FailEntry(reason, _) => return Err(RunError::FailEntry { reason }),
            VcpuExit::InternalError => {
                stats.emulation_fallbacks += 1;
                if emulation_fallback(vm)? {
                    stats.exceptions_injected += 1;
                }
            }
            other => return Err(RunError::UnexpectedExit(format!("{other:?}"))),
        }
    }
}

/// Inject the platform's pending interrupt if the guest can take it now,
/// otherwise ask KVM to exit as soon as it can.
fn deliver_interrupt<W: Write>(
    vm: &mut Vm,
    platform: &mut Platform<W>,
    stats: &mut ExitStats,
) -> Result<(), RunError> {
    if !platform.interrupt_pending() {
        vm.vcpu.get_kvm_run().request_interrupt_window = 0;
        return Ok(());
    }
    let run = vm.vcpu.get_kvm_run();
    if run.ready_for_interrupt_injection != 0 && run.if_flag != 0 {
        if let Some(vector) = platform.acknowledge_interrupt() {
            sys::inject_interrupt(&vm.vcpu, vector).map_err(kvm_err("inject interrupt"))?;
            stats.interrupts_injected += 1;
        }
        // One injection per entry; another pending one waits for a window.
        vm.vcpu.get_kvm_run().request_interrupt_window = u8::from(platform.interrupt_pending());
    } else {
        run.request_interrupt_window = 1;
    }
    Ok(())
}

/// The guest halted with interrupts enabled: sleep until an interrupt is due,
/// input arrives, or we are told to stop.
fn wait_while_halted<W: Write>(
    platform: &mut Platform<W>,
    control: &Receiver<Control>,
    input: &mut PendingInput,
    now: &impl Fn() -> Nanos,
    start: Instant,
) -> Result<Option<Ending>, RunError> {
    loop {
        input.feed(platform);
        platform.poll(now());
        if platform.interrupt_pending() {
            return Ok(None);
        }
        if let Some(PlatformEvent::Reset) = platform.take_event() {
            return Ok(Some(Ending::ResetRequested));
        }
        let msg = match platform.next_deadline() {
            Some(ns) => control.recv_deadline(start + Duration::from_nanos(ns)),
            None => control.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match msg {
            Ok(Control::Stop) => return Ok(Some(Ending::Stopped)),
            Ok(Control::SerialInput(bytes)) => input.0.extend(bytes),
            Err(RecvTimeoutError::Timeout) => {}
            // Nobody can send input or a stop any more, and no timer is
            // armed: the guest sleeps forever. Treat it as stopped.
            Err(RecvTimeoutError::Disconnected) if platform.next_deadline().is_none() => {
                return Ok(Some(Ending::Stopped))
            }
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(ns) = platform.next_deadline() {
                    let wait = ns.saturating_sub(now());
                    thread::sleep(Duration::from_nanos(wait));
                }
            }
        }
    }
}

/// Finish an instruction KVM's emulator gave up on. Returns whether an
/// exception was injected into the guest.
fn emulation_fallback(vm: &mut Vm) -> Result<bool, RunError> {
    let info = sys::internal_error(&mut vm.vcpu);
    let rip = vm.vcpu.get_regs().map_err(kvm_err("get regs"))?.rip;
    if info.suberror != sys::KVM_INTERNAL_ERROR_EMULATION {
        return Err(RunError::Internal {
            suberror: info.suberror,
            data: info.data,
            rip,
        });
    }
    let mut cpu = KvmGuestCpu { vm };
    let bytes = match info.instruction_bytes() {
        Some(bytes) => bytes,
        None => {
            // Older KVMs do not report the bytes: fetch them at RIP.
            let mut buf = [0u8; 15];
            cpu.read_virt(rip, &mut buf)?;
            buf.to_vec()
        }
    };
    match emulate::emulate(&mut cpu, &bytes)? {
        Emulated::Performed => Ok(false),
        Emulated::Exception { vector, error_code } => {
            tracing::trace!("reflecting exception {vector} to the guest at RIP {rip:#x}");
            vm.inject_exception(vector, error_code)?;
            Ok(true)
        }
    }
}
