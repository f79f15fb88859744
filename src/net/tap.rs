//! A TAP device and the backend thread that feeds its frames to the VMM.
//!
//! [`Tap::open`] creates or attaches to a TAP interface in the calling thread's
//! network namespace (Ethernet frames, no packet-info prefix, no vnet header) and
//! leaves its file descriptor non-blocking. [`TapBackend::start`] then runs a
//! receive thread that queues every frame the host sends to the guest in a bounded
//! channel and calls a wake-up function (the VMM's vCPU kick); transmission is a
//! non-blocking write. Neither side ever blocks the vCPU thread or buffers without
//! bound: when the queue is full or the device cannot take a frame, the frame is
//! dropped and counted, as a real NIC does.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use thiserror::Error;
use tracing::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::{check_interface_name, InterfaceNameError, ETHERNET_HEADER_LEN, MAX_FRAME_LEN};

const TUN_DEVICE: &str = "/dev/net/tun";

/// Frames the receive queue holds before further frames are dropped.
pub const RX_QUEUE_FRAMES: usize = 1024;
/// Frames read per wake-up: bounds the delay before the VMM hears of the first
/// frame of a burst, and how long the thread goes without checking for a stop.
const RX_BATCH: usize = 64;
/// The receive thread is stopped through an eventfd; this timeout only bounds how
/// long a stop could take if that signal were somehow lost.
const RX_POLL_TIMEOUT_MS: libc::c_int = 200;

/// Why a TAP could not be opened or used.
#[derive(Debug, Error)]
pub enum TapError {
    #[error(transparent)]
    InvalidName(#[from] InterfaceNameError),
    #[error("cannot open {TUN_DEVICE}: the kernel has no TUN/TAP support (load the `tun` module)")]
    NoTunSupport,
    #[error("TAP {name}: {op} needs root or CAP_NET_ADMIN ({source})")]
    PermissionDenied {
        name: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("TAP {name} is in use by another process (or already open in this one)")]
    Busy { name: String },
    #[error("interface {name} exists but is not a single-queue TAP this can attach to (a TUN device, a multi-queue TAP or another kind of interface)")]
    NotATap { name: String },
    #[error("TAP {name}: {op}: {source}")]
    Io {
        name: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("TAP {name}: a frame of {len} bytes cannot be sent (an Ethernet frame is {ETHERNET_HEADER_LEN} to {MAX_FRAME_LEN} bytes)")]
    FrameLength { name: String, len: usize },
}

/// What became of a frame written to a [`Tap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// The kernel took it.
    Sent,
    /// The device cannot take it now (EAGAIN, ENOBUFS): not sent.
    Full,
    /// The interface is down (EIO): not sent, as on an unplugged wire.
    LinkDown,
}

/// An open TAP device: Ethernet frames in and out of a host network interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

impl Tap {
    /// Create the TAP interface `name` in the calling thread's network namespace
    /// and bring it up, or attach to an existing persistent one (such as made by
    /// `ip tuntap add dev NAME mode tap`, whose state is left as it is). An
    /// interface this call created disappears when the `Tap` is dropped.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_interface_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::NoTunSupport,
                Some(libc::EACCES | libc::EPERM) => TapError::PermissionDenied {
                    name: name.to_owned(),
                    op: "opening /dev/net/tun",
                    source: e,
                },
                _ => TapError::Io {
                    name: name.to_owned(),
                    op: "opening /dev/net/tun",
                    source: e,
                },
            })?;

        let mut req = ifreq_for(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is; the fd
        // is the /dev/net/tun file just opened.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied {
                    name: name.to_owned(),
                    op: "creating or attaching (TUNSETIFF)",
                    source: e,
                },
                Some(libc::EBUSY) => TapError::Busy {
                    name: name.to_owned(),
                },
                Some(libc::EINVAL) => TapError::NotATap {
                    name: name.to_owned(),
                },
                _ => TapError::Io {
                    name: name.to_owned(),
                    op: "TUNSETIFF",
                    source: e,
                },
            });
        }

        // An interface we can attach to without creating it is a persistent one;
        // one we created is not persistent (it lives as long as this fd).
        let mut got = ifreq_for(name);
        // SAFETY: TUNGETIFF writes one `ifreq`, which `got` is; the fd is attached.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut got) };
        if ret < 0 {
            return Err(TapError::Io {
                name: name.to_owned(),
                op: "TUNGETIFF",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = libc::c_int::from(unsafe { got.ifr_ifru.ifru_flags });
        let created = flags & libc::IFF_PERSIST == 0;

        let tap = Tap {
            file,
            name: name.to_owned(),
            created,
        };
        let up = tap.interface_flags()? & libc::IFF_UP != 0;
        if created {
            if !up {
                tap.set_interface_flags(tap.interface_flags()? | libc::IFF_UP)?;
            }
            debug!(tap = name, "created TAP interface");
        } else {
            if !up {
                warn!(
                    tap = name,
                    "attached to TAP interface that is down: no frames flow until it is brought up"
                );
            }
            debug!(tap = name, "attached to persistent TAP interface");
        }
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether opening created the interface (it then goes away with this `Tap`)
    /// rather than attaching to a persistent one.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Read one frame into `buf` without blocking: its length, or `Ok(None)` when
    /// none is waiting. The kernel silently cuts a frame longer than `buf` to
    /// `buf.len()` bytes, so pass more than [`MAX_FRAME_LEN`] bytes and treat a
    /// full buffer as an oversized frame (a TAP's MTU is at most 65521, so only a
    /// VLAN-tagged frame can be longer than 65535 bytes).
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, TapError> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error("reading a frame", e)),
            }
        }
    }

    /// Write one frame without blocking, telling whether it went out.
    pub fn send(&self, frame: &[u8]) -> Result<SendOutcome, TapError> {
        if !(ETHERNET_HEADER_LEN..=MAX_FRAME_LEN).contains(&frame.len()) {
            return Err(TapError::FrameLength {
                name: self.name.clone(),
                len: frame.len(),
            });
        }
        loop {
            match (&self.file).write(frame) {
                Ok(n) if n == frame.len() => return Ok(SendOutcome::Sent),
                Ok(n) => {
                    // A TAP takes a frame whole or not at all.
                    return Err(self.io_error(
                        "writing a frame",
                        io::Error::other(format!("short write: {n} of {} bytes", frame.len())),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(SendOutcome::Full),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(SendOutcome::Full),
                // The kernel refuses writes while the interface is down.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(SendOutcome::LinkDown),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error("writing a frame", e)),
            }
        }
    }

    /// Whether the kernel has the interface up with its link running
    /// (IFF_RUNNING). Attaching to a persistent TAP turns its carrier on, but
    /// the kernel applies that a moment later (its link-watch work): until then
    /// it drops frames sent to the TAP, and a bridge the TAP is a port of drops
    /// frames written to it. Wait for this before relying on the first frames,
    /// such as a gratuitous ARP after a failover (or send that a few times).
    pub fn is_running(&self) -> Result<bool, TapError> {
        let flags = self.interface_flags()?;
        Ok(flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0)
    }

    fn io_error(&self, op: &'static str, source: io::Error) -> TapError {
        TapError::Io {
            name: self.name.clone(),
            op,
            source,
        }
    }

    /// A datagram socket in the calling thread's namespace, for interface ioctls.
    fn control_socket(&self) -> Result<OwnedFd, TapError> {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(self.io_error("opening a control socket", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new socket that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn interface_flags(&self) -> Result<libc::c_int, TapError> {
        let sock = self.control_socket()?;
        let mut req = ifreq_for(&self.name);
        // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags to one
        // `ifreq`, which `req` is; `sock` is an open socket.
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
        if ret < 0 {
            return Err(self.io_error(
                "reading interface flags (SIOCGIFFLAGS)",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        Ok(libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff)
    }

    fn set_interface_flags(&self, flags: libc::c_int) -> Result<(), TapError> {
        let sock = self.control_socket()?;
        let mut req = ifreq_for(&self.name);
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads one `ifreq`, which `req` is; `sock` is an open socket.
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied {
                    name: self.name.clone(),
                    op: "bringing the interface up (SIOCSIFFLAGS)",
                    source: e,
                },
                _ => self.io_error("bringing the interface up (SIOCSIFFLAGS)", e),
            });
        }
        Ok(())
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// An `ifreq` naming `name`, which [`check_interface_name`] has accepted
/// (at most 15 bytes, so the NUL terminator fits).
fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is a name array and a union of integers, socket addresses
    // and a pointer; all zeroes is a valid value of each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// Frame counters of a [`TapBackend`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Frames from the host queued for the guest.
    pub rx_frames: u64,
    /// Frames from the host dropped because the queue was full (or, rarely,
    /// because they were longer than 65535 bytes: VLAN-tagged at the largest MTU).
    pub rx_dropped: u64,
    /// Frames from the guest written to the TAP.
    pub tx_frames: u64,
    /// Frames from the guest dropped because the TAP could not take them (full,
    /// or the interface down).
    pub tx_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    rx_frames: AtomicU64,
    rx_dropped: AtomicU64,
    tx_frames: AtomicU64,
    tx_dropped: AtomicU64,
}

/// Moves frames between a [`Tap`] and the VMM: a receive thread fills a bounded
/// queue, transmission writes without blocking.
pub struct TapBackend {
    tap: Arc<Tap>,
    rx: Receiver<Vec<u8>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    stop_event: Arc<EventFd>,
    rx_failure: Arc<OnceLock<TapError>>,
    link_down_logged: AtomicBool,
    thread: Option<JoinHandle<()>>,
}

impl TapBackend {
    /// Open (or create) TAP `name` and start moving its frames; `wake` as
    /// for [`TapBackend::start`].
    pub fn open(name: &str, wake: impl Fn() + Send + 'static) -> Result<TapBackend, TapError> {
        TapBackend::start(Tap::open(name)?, wake)
    }

    /// Start the receive thread with a queue of [`RX_QUEUE_FRAMES`] frames.
    /// `wake` is called (from that thread) after frames were queued; it must not block.
    pub fn start(tap: Tap, wake: impl Fn() + Send + 'static) -> Result<TapBackend, TapError> {
        TapBackend::start_with_queue(tap, RX_QUEUE_FRAMES, wake)
    }

    /// [`TapBackend::start`] with a receive queue of `queue_frames` frames (at least 1).
    pub fn start_with_queue(
        tap: Tap,
        queue_frames: usize,
        wake: impl Fn() + Send + 'static,
    ) -> Result<TapBackend, TapError> {
        let tap = Arc::new(tap);
        let (tx, rx) = crossbeam_channel::bounded(queue_frames.max(1));
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let stop_event = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| TapError::Io {
                name: tap.name.clone(),
                op: "creating the stop eventfd",
                source: e,
            })?,
        );
        let rx_failure = Arc::new(OnceLock::new());
        let receiver = RxThread {
            tap: Arc::clone(&tap),
            queue: tx,
            counters: Arc::clone(&counters),
            stop: Arc::clone(&stop),
            stop_event: Arc::clone(&stop_event),
            wake: Box::new(wake),
        };
        let failure = Arc::clone(&rx_failure);
        let thread = std::thread::Builder::new()
            .name(format!("tap-rx-{}", tap.name))
            .spawn(move || {
                if let Err(e) = receiver.run() {
                    warn!(error = %e, "TAP receive thread stopped");
                    let _ = failure.set(e);
                    // Let the VMM look at `rx_failure` rather than wait for frames.
                    (receiver.wake)();
                }
            })
            .map_err(|e| TapError::Io {
                name: tap.name.clone(),
                op: "starting the receive thread",
                source: e,
            })?;
        Ok(TapBackend {
            tap,
            rx,
            counters,
            stop,
            stop_event,
            rx_failure,
            link_down_logged: AtomicBool::new(false),
            thread: Some(thread),
        })
    }

    /// The TAP interface's name.
    pub fn name(&self) -> &str {
        self.tap.name()
    }

    /// The TAP device.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Frames received from the host, oldest first.
    pub fn rx(&self) -> &Receiver<Vec<u8>> {
        &self.rx
    }

    /// The next received frame, if one is waiting.
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        self.rx.try_recv().ok()
    }

    /// Send one frame to the host without blocking. A frame the TAP cannot take
    /// now (full, or the interface is down) is dropped and counted in
    /// [`TapStats::tx_dropped`] (still `Ok`), as a NIC drops on a busy or
    /// unplugged wire; the interface going down is logged once per episode.
    /// Errors: a frame shorter than an Ethernet header or longer than 65535
    /// bytes, or the device failing otherwise.
    pub fn send(&self, frame: &[u8]) -> Result<(), TapError> {
        match self.tap.send(frame)? {
            SendOutcome::Sent => {
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                if self.link_down_logged.swap(false, Ordering::Relaxed) {
                    warn!(
                        tap = self.tap.name(),
                        "TAP interface is up again: sending frames"
                    );
                }
            }
            SendOutcome::Full => {
                self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                debug!(
                    tap = self.tap.name(),
                    len = frame.len(),
                    "TAP full: frame dropped"
                );
            }
            SendOutcome::LinkDown => {
                self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                if !self.link_down_logged.swap(true, Ordering::Relaxed) {
                    warn!(
                        tap = self.tap.name(),
                        "TAP interface is down: dropping the guest's frames until it is up"
                    );
                }
            }
        }
        Ok(())
    }

    /// The counters so far.
    pub fn stats(&self) -> TapStats {
        let c = &self.counters;
        TapStats {
            rx_frames: c.rx_frames.load(Ordering::Relaxed),
            rx_dropped: c.rx_dropped.load(Ordering::Relaxed),
            tx_frames: c.tx_frames.load(Ordering::Relaxed),
            tx_dropped: c.tx_dropped.load(Ordering::Relaxed),
        }
    }

    /// Why the receive thread stopped, if it did: no more frames will arrive.
    pub fn rx_failure(&self) -> Option<&TapError> {
        self.rx_failure.get()
    }
}

impl Drop for TapBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.stop_event.write(1) {
            warn!(error = %e, "cannot signal the TAP receive thread; it stops at its next poll timeout");
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!(tap = self.tap.name(), "TAP receive thread panicked");
            }
        }
    }
}

struct RxThread {
    tap: Arc<Tap>,
    queue: Sender<Vec<u8>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    stop_event: Arc<EventFd>,
    wake: Box<dyn Fn() + Send>,
}

impl RxThread {
    fn run(&self) -> Result<(), TapError> {
        // One byte more than the longest frame passed on: a full buffer means
        // the kernel cut a longer one (it does not say so).
        let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
        while !self.stop.load(Ordering::Acquire) {
            if !self.wait_readable()? {
                continue;
            }
            let mut queued = false;
            for _ in 0..RX_BATCH {
                let Some(len) = self.tap.recv(&mut buf)? else {
                    break;
                };
                if len > MAX_FRAME_LEN {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        tap = self.tap.name(),
                        "frame longer than {MAX_FRAME_LEN} bytes dropped"
                    );
                    continue;
                }
                match self.queue.try_send(buf[..len].to_vec()) {
                    Ok(()) => {
                        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                        queued = true;
                    }
                    Err(TrySendError::Full(_)) => {
                        self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    // The backend owns a receiver until this thread is joined.
                    Err(TrySendError::Disconnected(_)) => return Ok(()),
                }
            }
            if queued {
                (self.wake)();
            }
        }
        Ok(())
    }

    /// Wait until the TAP has a frame (true) or the stop eventfd fired or the
    /// timeout passed (false).
    fn wait_readable(&self) -> Result<bool, TapError> {
        let mut fds = [
            libc::pollfd {
                fd: self.tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop_event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd and its length is passed.
        let ret = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                RX_POLL_TIMEOUT_MS,
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(self.tap.io_error("polling for frames", e));
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        // POLLERR/POLLHUP also count: the read that follows reports the error.
        Ok(fds[0].revents != 0)
    }
}
