//! The few KVM and signal operations the rust-vmm crates do not wrap.
//! All of twinvm's `unsafe` that touches KVM lives here.

use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{kvm_interrupt, KVMIO};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

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

ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

/// Clear (and write-protect again) the pages of memslot `slot` whose bits
/// are set in `bitmap` (bit i: the slot's page i), when manual dirty-log
/// protection is on (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`). `pages` is the
/// slot's size in pages; `bitmap` must cover it.
pub fn clear_dirty_log(
    vm: &kvm_ioctls::VmFd,
    slot: u32,
    pages: u32,
    bitmap: &mut [u64],
) -> Result<(), errno::Error> {
    if (bitmap.len() as u64) * 64 < u64::from(pages) {
        return Err(errno::Error::new(libc::EINVAL));
    }
    let clear = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages: pages,
        first_page: 0,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: KVM_CLEAR_DIRTY_LOG reads one `kvm_clear_dirty_log` (a live
    // local) and, through its pointer, ceil(pages / 64) u64 words of
    // bitmap, which `bitmap` holds (checked above) and which is borrowed
    // mutably for the call, so nothing else sees it meanwhile. The fd is
    // a VM fd.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// The vCPU's binary statistics file (`KVM_GET_STATS_FD`; read by
/// `vmm::kvm_stats`).
pub fn vcpu_stats_file(vcpu: &VcpuFd) -> Result<std::fs::File, errno::Error> {
    use std::os::fd::FromRawFd;
    // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new
    // file descriptor; the fd it is called on is a vCPU fd owned by `vcpu`.
    let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
    if fd < 0 {
        return Err(errno::Error::last());
    }
    // SAFETY: `fd` was just returned by the kernel for this call and nothing
    // else holds it, so the File becomes its only owner and closes it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

ioctl_iow_nr!(
    KVM_SET_SIGNAL_MASK,
    KVMIO,
    0x8b,
    kvm_bindings::kvm_signal_mask
);

/// Does nothing: the kick signal is blocked in vCPU threads except inside
/// KVM_RUN, where KVM turns it into an EINTR exit; the handler only keeps a
/// stray kick from killing the process (a real-time signal's default).
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the process-wide kick handler (once).
fn install_kick_handler() -> Result<(), errno::Error> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
    });
    result
}

/// The thread a [`Kicker`] signals, while it runs a vCPU loop.
#[derive(Debug, Default)]
struct KickTarget {
    /// Cleared (under the lock) before the thread stops running its loop,
    /// so a kick never signals a thread that may have exited. The
    /// `Thread` handle is unparked too: a vCPU thread waiting for input
    /// outside KVM_RUN parks (`Engine::wait_for_input`) and every feeder of
    /// its inputs kicks after sending.
    thread: Mutex<Option<(libc::pthread_t, std::thread::Thread)>>,
}

/// A handle that kicks a vCPU thread out of KVM_RUN from any other thread.
/// A kick that lands while the thread is outside KVM_RUN stays pending and
/// makes its next KVM_RUN return at once: kicks are never lost.
#[derive(Clone, Debug)]
pub struct Kicker {
    target: Arc<KickTarget>,
}

impl Kicker {
    /// A kicker with no thread yet; [`register_vcpu_thread`] attaches one.
    /// Kicks before that (or after the loop ended) do nothing.
    pub fn new() -> Self {
        Kicker {
            target: Arc::new(KickTarget::default()),
        }
    }

    /// Interrupt the registered thread's KVM_RUN (or its next one), and
    /// wake it if it is parked waiting for input.
    pub fn kick(&self) {
        let registered = self.target.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((thread, handle)) = registered.as_ref() {
            handle.unpark();
            let thread = *thread;
            // SAFETY: the id is of a thread that is still running its vCPU
            // loop: `VcpuThreadGuard::drop` clears it under this same lock
            // before the loop returns, so while we hold the lock the thread
            // exists. The signal has a handler (installed at registration).
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

impl Default for Kicker {
    fn default() -> Self {
        Kicker::new()
    }
}

/// While alive, kicks reach the calling thread's KVM_RUN; restores the
/// thread's signal mask and detaches the kicker when dropped.
pub struct VcpuThreadGuard {
    target: Arc<KickTarget>,
    old_mask: libc::sigset_t,
}

impl Drop for VcpuThreadGuard {
    fn drop(&mut self) {
        *self.target.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // SAFETY: pthread_sigmask reads a sigset the kernel filled in at
        // registration; a null old-set pointer is allowed.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
        drain_pending_kick();
    }
}

/// Make `kicker`'s kicks interrupt `vcpu`'s KVM_RUN on the calling thread.
///
/// The kick signal is blocked in this thread and unblocked only inside
/// KVM_RUN (KVM_SET_SIGNAL_MASK), the way QEMU did before immediate_exit: a
/// kick during guest execution ends KVM_RUN with EINTR; one that lands while
/// the thread is in userspace stays pending and ends the next KVM_RUN at
/// once. Nothing writes to `kvm_run` from a signal handler.
pub fn register_vcpu_thread(
    vcpu: &VcpuFd,
    kicker: &Kicker,
) -> Result<VcpuThreadGuard, errno::Error> {
    install_kick_handler()?;
    // SAFETY: sigset_t is a plain bit array; zeroed is a valid empty set.
    let mut block: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset/sigaddset write into the live local set;
    // pthread_sigmask reads `block` and writes the previous mask into
    // `old_mask`, both live locals.
    let ret = unsafe {
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, kick_signal());
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old_mask)
    };
    if ret != 0 {
        return Err(errno::Error::new(ret));
    }
    // Inside KVM_RUN: the thread's previous mask, with the kick unblocked.
    let mut run_mask = old_mask;
    // SAFETY: sigdelset edits the live local copy.
    unsafe { libc::sigdelset(&mut run_mask, kick_signal()) };
    // KVM takes the kernel's sigset (8 bytes on x86-64), the first bytes of
    // glibc's larger sigset_t: `u32 len` then the bits.
    let mut arg = [0u8; 4 + 8];
    arg[..4].copy_from_slice(&8u32.to_le_bytes());
    // SAFETY: reading the first 8 bytes of a live sigset_t (128 bytes).
    let bits: [u8; 8] = unsafe { std::ptr::read_unaligned(std::ptr::addr_of!(run_mask).cast()) };
    arg[4..].copy_from_slice(&bits);
    // SAFETY: KVM_SET_SIGNAL_MASK reads a `kvm_signal_mask` header (u32 len)
    // followed by `len` bytes; `arg` holds exactly that and outlives the
    // call. The fd is the vCPU's.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_SET_SIGNAL_MASK(), &arg) };
    if ret < 0 {
        let e = errno::Error::last();
        // SAFETY: restoring the mask read above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
        return Err(e);
    }
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    *kicker
        .target
        .thread
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some((me, std::thread::current()));
    Ok(VcpuThreadGuard {
        target: kicker.target.clone(),
        old_mask,
    })
}

/// Consume a kick left pending (blocked) on the calling vCPU thread, after
/// KVM_RUN returned EINTR because of it; without this the pending signal
/// would end every later KVM_RUN at once. A kick that lands after this call
/// stays pending and ends the next KVM_RUN: it is handled then.
pub fn drain_pending_kick() {
    // SAFETY: sigset_t is a plain bit array; zeroed is a valid empty set.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the set and timespec are live locals; sigtimedwait with a
    // zero timeout only dequeues an already pending signal of the set (the
    // kick is blocked in this thread, so it cannot run a handler instead).
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        while libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) > 0 {}
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

/// Bytes an unprivileged writer may still put on the filesystem holding
/// `path` (statvfs: available blocks times the fragment size).
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: statvfs is plain old data; all zeros is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs reads the NUL-terminated path `c` (alive for the call)
    // and writes one `statvfs` into the live local `st`.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Start writing `len` bytes of `file` from `offset` to its disk without
/// waiting (sync_file_range with SYNC_FILE_RANGE_WRITE), so a later fsync
/// finds them on their way. Only a hint: it guarantees nothing on its own.
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: sync_file_range takes an fd (`file` is open for the call)
    // and integers; it touches no memory of this process.
    let ret = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes the kernel holds for `stream` that no read has taken yet: the
/// pair's link thread asks when its socket reader seems behind.
pub fn unread_socket_bytes(stream: &std::net::TcpStream) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD on a socket writes one c_int through the pointer,
    // which points at `unread`, alive and writable for the call.
    let ret = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut unread) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(unread).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bytes_measures_a_filesystem_and_names_a_missing_path() {
        let dir = std::env::temp_dir();
        let free = free_bytes(&dir).unwrap();
        assert!(free > 0, "{} has no free space", dir.display());
        let err = free_bytes(std::path::Path::new("/nonexistent/twinvm")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    }

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
