//! The few KVM and signal operations the rust-vmm crates do not wrap.
//! All of twinvm's `unsafe` that touches KVM lives here.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::{kvm_interrupt, kvm_run, KVMIO};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

/// Queue an external interrupt for the next KVM_RUN (userspace irqchip only).
pub fn inject_interrupt(vcpu: &VcpuFd, vector: u8) -> Result<(), errno::Error> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer, which
    // refers to a live local; the fd is a vCPU fd owned by `vcpu`.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// The signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, if it runs a vCPU; the kick handler sets
    /// `immediate_exit` in it so a kick that lands just before KVM_RUN is not lost.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by `register_vcpu_thread` on this thread
        // from the vCPU's mmap'd kvm_run, which outlives the registration
        // (cleared by `VcpuThreadGuard::drop`). A volatile byte store is
        // async-signal-safe and KVM reads the field only at KVM_RUN entry.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Clears the thread's kvm_run registration when the vCPU loop ends.
pub struct VcpuThreadGuard(());

impl Drop for VcpuThreadGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Install the process-wide kick handler (once). Until it is installed a
/// kick would kill the process (the default action of a real-time signal).
fn install_kick_handler() -> Result<(), errno::Error> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
    });
    result
}

/// Make kicks of the calling thread interrupt `vcpu`'s KVM_RUN.
pub fn register_vcpu_thread(vcpu: &mut VcpuFd) -> Result<VcpuThreadGuard, errno::Error> {
    install_kick_handler()?;
    let run: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|c| c.set(run));
    Ok(VcpuThreadGuard(()))
}

/// A handle that kicks one thread out of KVM_RUN from any other thread.
#[derive(Clone, Copy, Debug)]
pub struct Kicker {
    thread: libc::pthread_t,
}

impl Kicker {
    /// A kicker for the calling thread (which will run the vCPU loop).
    pub fn for_current_thread() -> Result<Self, errno::Error> {
        install_kick_handler()?;
        // SAFETY: pthread_self has no preconditions and cannot fail.
        let thread = unsafe { libc::pthread_self() };
        Ok(Kicker { thread })
    }

    /// Interrupt the thread's KVM_RUN (or the next one if it is not in it).
    pub fn kick(&self) {
        // SAFETY: the thread id came from pthread_self on a thread that lives
        // as long as the VM (the vCPU loop joins every thread holding a
        // Kicker before returning); the signal has a handler installed.
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }
}

/// KVM_EXIT_INTERNAL_ERROR details: sub-error and raw data words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalError {
    pub suberror: u32,
    pub data: Vec<u64>,
}

/// Sub-error meaning "KVM's instruction emulator failed".
pub const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

impl InternalError {
    /// The bytes of the failing instruction, when KVM supplied them. Layout
    /// (the kernel's `emulation_failure`): data[0] flags, then a packed
    /// `u8 insn_size; u8 insn_bytes[15]` starting at data[1].
    pub fn instruction_bytes(&self) -> Option<Vec<u8>> {
        if self.suberror != KVM_INTERNAL_ERROR_EMULATION
            || self.data.len() < 3
            || self.data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES == 0
        {
            return None;
        }
        let packed: Vec<u8> = self.data[1..3]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let len = usize::from(packed[0]).min(15);
        Some(packed[1..1 + len].to_vec())
    }
}

/// Read the internal-error union after a KVM_EXIT_INTERNAL_ERROR exit.
pub fn internal_error(vcpu: &mut VcpuFd) -> InternalError {
    let run = vcpu.get_kvm_run();
    // SAFETY: only called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR,
    // when the kernel filled the `internal` member of the union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    InternalError {
        suberror: internal.suberror,
        data: internal.data[..n].to_vec(),
    }
}

/// A random number from the host CPU, as the guest's RDRAND (`seed` false)
/// or RDSEED (`seed` true) would have returned it; from /dev/urandom when
/// the host lacks the instruction or it keeps reporting "no entropy".
pub fn host_random(seed: bool) -> std::io::Result<u64> {
    use std::arch::x86_64::{_rdrand64_step, _rdseed64_step};
    // Intel's guidance: a few retries before treating the source as failed.
    for _ in 0..10 {
        let mut value = 0u64;
        let ok = if seed && std::arch::is_x86_feature_detected!("rdseed") {
            // SAFETY: RDSEED support was detected at run time just above; the
            // intrinsic only writes the local.
            unsafe { _rdseed64_step(&mut value) }
        } else if std::arch::is_x86_feature_detected!("rdrand") {
            // SAFETY: RDRAND support was detected at run time just above; the
            // intrinsic only writes the local.
            unsafe { _rdrand64_step(&mut value) }
        } else {
            break;
        };
        if ok == 1 {
            return Ok(value);
        }
    }
    let mut bytes = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

/// The host CPU the calling thread is running on now.
pub fn current_cpu() -> std::io::Result<u32> {
    // SAFETY: sched_getcpu takes no arguments and only returns a value.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).map_err(|_| std::io::Error::last_os_error())
}

/// The calling thread pinned to one host CPU; dropping it restores the
/// CPUs the thread was allowed before, so threads it starts later (and
/// later runs on the same thread) are not confined with it.
pub struct PinnedThread {
    previous: libc::cpu_set_t,
}

impl PinnedThread {
    pub fn new(cpu: u32) -> std::io::Result<PinnedThread> {
        // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>()
        // bytes into a live, zero-initialised local. Pid 0 is this thread.
        let previous = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            set
        };
        pin_current_thread(cpu)?;
        Ok(PinnedThread { previous })
    }
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        // SAFETY: sched_setaffinity reads exactly size_of::<cpu_set_t>()
        // bytes from `previous`, a set the kernel itself filled in.
        let _ = unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.previous)
        };
    }
}

/// Pin the calling thread (and the threads it starts later) to host CPU `cpu`.
pub fn pin_current_thread(cpu: u32) -> std::io::Result<()> {
    let cpu = cpu as usize;
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "CPU {cpu} is beyond the {} CPUs a cpu_set_t holds",
                libc::CPU_SETSIZE
            ),
        ));
    }
    // SAFETY: an all-zero cpu_set_t is the empty set (what CPU_ZERO makes);
    // CPU_SET was given an index below CPU_SETSIZE (checked above); and
    // sched_setaffinity reads exactly size_of::<cpu_set_t>() bytes from a
    // live local. Pid 0 is the calling thread.
    let ret = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Give the calling thread a real-time (SCHED_FIFO) priority so that its
/// wake-ups preempt busy threads at once instead of waiting for a CFS time
/// slice. Fails without CAP_SYS_NICE.
pub fn make_current_thread_realtime(priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: sched_setscheduler reads one sched_param from a live local;
    // pid 0 is the calling thread.
    let ret = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_moves_the_thread_and_bad_cpus_are_refused() {
        std::thread::spawn(|| {
            let allowed = || {
                let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
                let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:"));
                format!("{}\n", line.unwrap())
            };
            let before = allowed();
            {
                let _pinned = PinnedThread::new(0).unwrap();
                assert_eq!(current_cpu().unwrap(), 0);
                assert!(
                    allowed().contains("Cpus_allowed_list:\t0\n"),
                    "{}",
                    allowed()
                );
            }
            // Dropping the guard gives the thread its CPUs back.
            assert_eq!(allowed(), before);
            assert!(pin_current_thread(libc::CPU_SETSIZE as u32).is_err());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn host_random_numbers_differ_between_draws() {
        for seed in [false, true] {
            let draws: Vec<u64> = (0..4).map(|_| host_random(seed).unwrap()).collect();
            assert!(
                draws.windows(2).any(|w| w[0] != w[1]),
                "four equal draws: {draws:x?}"
            );
        }
    }

    #[test]
    fn instruction_bytes_follow_the_documented_layout() {
        // As measured on the development host for an int3 followed by
        // `lea rdi, [rip+0x11c]`: length 15, then the bytes.
        let e = InternalError {
            suberror: 1,
            data: vec![1, 0x0001_1c3d_8d48_cc0f, 0x8b48_ffff_ff07_e800, 0x1000],
        };
        let bytes = e.instruction_bytes().unwrap();
        assert_eq!(bytes.len(), 15);
        assert_eq!(
            &bytes[..8],
            &[0xcc, 0x48, 0x8d, 0x3d, 0x1c, 0x01, 0x00, 0x00]
        );
        let no_flag = InternalError {
            suberror: 1,
            data: vec![0, 0x0f, 0, 0],
        };
        assert_eq!(no_flag.instruction_bytes(), None);
        let other = InternalError {
            suberror: 3,
            data: vec![1, 0x0f, 0],
        };
        assert_eq!(other.instruction_bytes(), None);
    }
}
