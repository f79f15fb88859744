//! virtio-net (virtio 1.2 §5.1) on the virtio-pci transport: one receive
//! queue (0) and one transmit queue (1), no control queue, no offloads.
//!
//! Features offered: VERSION_1, MAC, STATUS (link always up). Every frame
//! carries the 12-byte `virtio_net_hdr_v1`; with no offloads negotiated it
//! is all zeros on receive (num_buffers = 1) and ignored on transmit.
//!
//! Determinism: the transmit queue is processed only inside the guest's
//! notify write (or its DRIVER_OK write, for buffers queued before it), the
//! receive queue only inside [`VirtioNet::receive`]. Nothing else touches
//! guest memory.
//!
//! Guest misbehaviour never panics, hangs or allocates without bound: a
//! transmit frame is at most [`MAX_TX_FRAME`] bytes and at most
//! [`TX_PENDING_LIMIT`] frames wait for [`VirtioNet::take_tx`]. A frame or
//! chain that is merely unusable is dropped and its chain returned with
//! length 0; a broken ring puts the device in DEVICE_NEEDS_RESET (see
//! [`queue`](super::queue)).

use serde::{Deserialize, Serialize};

use super::super::pci::PciDevice;
use super::super::{check_version, ensure, StateError};
use super::queue::{Buffer, Chain, Direction, RingError};
use super::transport::{self, Event, Identity, Region, Transport, TransportState};
use super::GuestRam;

/// Version of [`VirtioNetState`] this build writes.
const NET_STATE_VERSION: u32 = 1;

const NAME: &str = "virtio-net";

/// Feature bits (§5.1.3).
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Device config status: link up.
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// `struct virtio_net_hdr_v1` (with num_buffers): always this long in 1.x.
pub const NET_HDR_LEN: usize = 12;
/// Byte offset of num_buffers in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest transmit chain accepted, header included (the 64 KiB of a
/// GSO frame plus an Ethernet header and the virtio header).
pub const MAX_TX_FRAME: u64 = 65550;
/// The largest frame [`VirtioNet::receive`] delivers.
pub const MAX_RX_FRAME: usize = MAX_TX_FRAME as usize - NET_HDR_LEN;
/// A transmitted frame shorter than an Ethernet header is dropped.
const MIN_FRAME: u64 = 14;
/// Transmitted frames held for [`VirtioNet::take_tx`] at most; beyond it
/// chains stay in the ring until the next notify (one notify yields at
/// most one ring's worth, so a caller that takes after every write never
/// reaches it).
pub const TX_PENDING_LIMIT: usize = 256;

/// Queue indices.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;

/// mac (6) and status (2).
const DEVICE_CFG_LEN: u32 = 8;

/// PCI class: network controller, Ethernet.
const PCI_CLASS_NETWORK: (u8, u8) = (0x02, 0x00);

/// How the device is wired into the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioNetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Pre-assigned 32-bit address of BAR0 (aligned to
    /// [`VirtioNet::BAR0_SIZE`]); the guest may move it.
    pub bar0: u64,
    /// Interrupt line reported in PCI config (the PIC input INTA# drives).
    pub irq_line: u8,
}

/// What became of a frame offered to [`VirtioNet::receive`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written to the guest, used ring updated.
    Delivered,
    /// The driver has no receive buffer available; nothing was consumed.
    /// The caller keeps the frame and offers it again later.
    NoBuffers,
    /// The driver is not ready to receive (not DRIVER_OK, RX queue not
    /// enabled, or the device needs a reset).
    NotReady,
    /// The frame was dropped for the stated reason; any chain it took was
    /// returned to the driver with length 0.
    Dropped(&'static str),
}

/// Counters for diagnostics (not guest-visible, not saved).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// `receive` calls answered [`RxOutcome::NoBuffers`].
    pub rx_dropped_no_buffers: u64,
    /// Received frames dropped because they exceed [`MAX_RX_FRAME`] or
    /// the receive chain.
    pub rx_dropped_too_big: u64,
    /// Frames the guest transmitted.
    pub tx_frames: u64,
    /// Transmit chains dropped (too big, too short, malformed).
    pub tx_dropped: u64,
    /// Guest errors of every kind, each also logged (rate limited).
    pub guest_errors: u64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub ring_failures: u64,
}

/// Serialisable state: everything the guest can observe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    /// Format version, [`NET_STATE_VERSION`].
    pub version: u32,
    /// The MAC address in device configuration.
    pub mac: [u8; 6],
    /// Transport: PCI config, status, features, queues, ISR.
    pub transport: TransportState,
    /// Transmitted frames not yet taken with [`VirtioNet::take_tx`].
    pub tx_pending: Vec<Vec<u8>>,
}

/// A virtio-net device.
#[derive(Debug)]
pub struct VirtioNet {
    mac: [u8; 6],
    transport: Transport,
    tx_pending: Vec<Vec<u8>>,
    stats: VirtioNetStats,
}

impl VirtioNet {
    /// Size of BAR0, which holds every virtio structure.
    pub const BAR0_SIZE: u64 = transport::BAR0_SIZE;

    /// A device at power-on.
    pub fn new(config: VirtioNetConfig) -> Self {
        let id = Identity {
            name: NAME,
            virtio_id: 1,
            class: PCI_CLASS_NETWORK,
            features: VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS,
            num_queues: 2,
            device_cfg_len: DEVICE_CFG_LEN,
        };
        Self {
            mac: config.mac,
            transport: Transport::new(id, config.bar0, config.irq_line),
            tx_pending: Vec::new(),
            stats: VirtioNetStats::default(),
        }
    }

    /// The MAC address the device reports.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// BAR0's guest-physical base while memory decoding is enabled and the
    /// BAR is assigned.
    pub fn bar0(&self) -> Option<u64> {
        self.transport.bar0()
    }

    /// A guest read of `data.len()` bytes (1, 2, 4 or 8) at `offset` inside
    /// BAR0. Reading the ISR clears it (and deasserts INTx).
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 1 | 2 | 4 | 8) {
            return self.bad_access(offset, data.len(), "read");
        }
        match self.transport.region(offset, data.len()) {
            Some(Region::Common(off)) => self.transport.common_read(off, data),
            Some(Region::Isr(0)) => data[0] = self.transport.isr_read(),
            Some(Region::Isr(_)) | Some(Region::Notify(_)) => {}
            Some(Region::Device(off)) => {
                let image = self.device_config();
                let start = off as usize;
                data.copy_from_slice(&image[start..start + data.len()]);
            }
            None => self.bad_access(offset, data.len(), "read"),
        }
    }

    /// A guest write of `data` (1, 2, 4 or 8 bytes) at `offset` inside
    /// BAR0. A notify of the transmit queue processes it here, writing
    /// through `mem`.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], mem: &mut dyn GuestRam) {
        // Notifications the PCI_CFG window deferred came first.
        self.flush_pending_notify(mem);
        if let Some(event) = self.bar_write(offset, data) {
            self.handle(event, mem);
        }
    }

    /// Whether a notification written through the PCI_CFG window (a PCI
    /// configuration write, which has no guest memory at hand) waits for
    /// [`flush_pending_notify`](Self::flush_pending_notify).
    pub fn has_pending_notify(&self) -> bool {
        self.transport.has_pending_notify()
    }

    /// Processes notifications deferred from the PCI_CFG window. Call it
    /// after every PCI configuration write to the device; `mmio_write`
    /// also does it first.
    pub fn flush_pending_notify(&mut self, mem: &mut dyn GuestRam) {
        let pending = self.transport.take_pending_notify();
        for queue in [RX_QUEUE, TX_QUEUE] {
            if pending & 1 << queue != 0 {
                self.handle(Event::Notify(queue), mem);
            }
        }
    }

    /// Ethernet frames the guest transmitted since the last call, in order,
    /// without the virtio header.
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.tx_pending)
    }

    /// The driver is ready to receive: FEATURES_OK and DRIVER_OK, the
    /// receive queue enabled, bus mastering on, the device neither in
    /// DEVICE_NEEDS_RESET nor FAILED.
    pub fn can_receive(&self) -> bool {
        self.transport.live() && self.transport.queue(RX_QUEUE).ready()
    }

    /// Puts one received Ethernet frame into the next available receive
    /// chain, behind a zeroed header with num_buffers = 1, completes the
    /// chain and raises the queue interrupt unless the driver suppressed
    /// it. A frame over [`MAX_RX_FRAME`] is dropped untouched; a chain too
    /// small for the frame, or malformed, is returned with length 0 and the
    /// frame dropped; a broken ring stops the device (DEVICE_NEEDS_RESET)
    /// and drops the frame.
    pub fn receive(&mut self, frame: &[u8], mem: &mut dyn GuestRam) -> RxOutcome {
        if !self.can_receive() {
            return RxOutcome::NotReady;
        }
        if frame.len() > MAX_RX_FRAME {
            self.stats.rx_dropped_too_big += 1;
            let detail = format_args!("received frame of {} bytes dropped", frame.len());
            self.transport.warn("received frame too big", &detail);
            return RxOutcome::Dropped("frame larger than the largest virtio-net frame");
        }
        let chain = match self
            .transport
            .queue(RX_QUEUE)
            .peek(mem, Direction::DeviceWrites)
        {
            Ok(Some(chain)) => chain,
            Ok(None) => {
                self.stats.rx_dropped_no_buffers += 1;
                return RxOutcome::NoBuffers;
            }
            Err(e) => return self.rx_ring_failed(e),
        };
        let need = (NET_HDR_LEN + frame.len()) as u64;
        let (written, outcome) = if let Some(defect) = chain.defect {
            self.transport.guest_error(defect.kind(), &defect);
            (0, RxOutcome::Dropped("malformed receive descriptor chain"))
        } else if chain.total_len() < need {
            self.stats.rx_dropped_too_big += 1;
            let detail = format_args!(
                "receive chain {} holds {} bytes, the frame needs {need}",
                chain.head,
                chain.total_len()
            );
            // Not necessarily the guest's fault: the frame may exceed the
            // MTU the driver sized its buffers for.
            self.transport.warn("receive chain too small", &detail);
            (
                0,
                RxOutcome::Dropped("receive buffer chain too small for the frame"),
            )
        } else {
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
            if let Err(e) = scatter(mem, &chain.buffers, &[&hdr, frame]) {
                return self.rx_ring_failed(e);
            }
            // need ≤ MAX_TX_FRAME, so it fits in u32.
            (need as u32, RxOutcome::Delivered)
        };
        if let Err(e) = self.complete(RX_QUEUE, &chain, written, mem) {
            return self.rx_ring_failed(e);
        }
        if outcome == RxOutcome::Delivered {
            self.stats.rx_frames += 1;
        }
        outcome
    }

    fn rx_ring_failed(&mut self, e: RingError) -> RxOutcome {
        self.transport.fail(e);
        RxOutcome::Dropped("receive ring is broken; the device needs a reset")
    }

    /// The INTx line: ISR non-zero (level triggered, pin INTA#).
    pub fn irq_level(&self) -> bool {
        self.transport.irq_level()
    }

    /// The device is in DEVICE_NEEDS_RESET and does no queue work.
    pub fn needs_reset(&self) -> bool {
        self.transport.needs_reset()
    }

    /// Diagnostic counters.
    pub fn stats(&self) -> VirtioNetStats {
        VirtioNetStats {
            guest_errors: self.transport.guest_errors,
            ring_failures: self.transport.ring_failures,
            ..self.stats
        }
    }

    /// Snapshot of the guest-visible state.
    pub fn save(&self) -> VirtioNetState {
        VirtioNetState {
            version: NET_STATE_VERSION,
            mac: self.mac,
            transport: self.transport.save(),
            tx_pending: self.tx_pending.clone(),
        }
    }

    /// Replaces the state with a snapshot from [`VirtioNet::save`]. The
    /// whole state is checked first: on error nothing has changed.
    /// Counters stay.
    pub fn restore(&mut self, state: &VirtioNetState) -> Result<(), StateError> {
        check_version(NAME, state.version, NET_STATE_VERSION)?;
        self.transport.check(&state.transport)?;
        ensure(
            state.tx_pending.len() <= TX_PENDING_LIMIT,
            NAME,
            "too many pending transmit frames",
        )?;
        ensure(
            state
                .tx_pending
                .iter()
                .all(|f| f.len() as u64 <= MAX_TX_FRAME - NET_HDR_LEN as u64),
            NAME,
            "pending transmit frame too large",
        )?;
        self.transport.restore_checked(&state.transport);
        self.mac = state.mac;
        self.tx_pending = state.tx_pending.clone();
        Ok(())
    }

    fn device_config(&self) -> [u8; DEVICE_CFG_LEN as usize] {
        let mut b = [0u8; DEVICE_CFG_LEN as usize];
        b[..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        b
    }

    fn bad_access(&mut self, offset: u64, len: usize, what: &str) {
        let detail =
            format_args!("{len}-byte {what} at BAR0 offset {offset:#x} hits no virtio structure");
        self.transport
            .guest_error("BAR0 access outside virtio structures", &detail);
    }

    /// A BAR0 write that needs no guest memory; what it asks for is
    /// returned.
    fn bar_write(&mut self, offset: u64, data: &[u8]) -> Option<Event> {
        if !matches!(data.len(), 1 | 2 | 4 | 8) {
            self.bad_access(offset, data.len(), "write");
            return None;
        }
        match self.transport.region(offset, data.len()) {
            Some(Region::Common(off)) => self.transport.common_write(off, data),
            Some(Region::Notify(off)) => self.transport.notify_write(off),
            Some(Region::Isr(_)) | Some(Region::Device(_)) => {
                // The ISR is read-only; the MAC is read-only without
                // VIRTIO_NET_F_CTRL_MAC_ADDR in a modern device.
                self.bad_access(offset, data.len(), "write to a read-only structure");
                None
            }
            None => {
                self.bad_access(offset, data.len(), "write");
                None
            }
        }
    }

    fn handle(&mut self, event: Event, mem: &mut dyn GuestRam) {
        match event {
            Event::Notify(TX_QUEUE) | Event::DriverOk => self.process_tx(mem),
            // Receive buffers were added: the caller's next `receive` finds
            // them.
            Event::Notify(_) => {}
        }
    }

    /// Takes every available transmit chain (up to the pending limit).
    fn process_tx(&mut self, mem: &mut dyn GuestRam) {
        if !self.transport.live() || !self.transport.queue(TX_QUEUE).ready() {
            return;
        }
        let mut used = false;
        while self.tx_pending.len() < TX_PENDING_LIMIT {
            let chain = match self
                .transport
                .queue(TX_QUEUE)
                .peek(mem, Direction::DeviceReads)
            {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return self.transport.fail(e),
            };
            let frame = match self.read_tx_frame(&chain, mem) {
                Ok(frame) => frame,
                Err(e) => return self.transport.fail(e),
            };
            // A frame leaves only once its chain is back with the driver.
            if let Err(e) = self.complete(TX_QUEUE, &chain, 0, mem) {
                return self.transport.fail(e);
            }
            used = true;
            match frame {
                Some(frame) => {
                    self.tx_pending.push(frame);
                    self.stats.tx_frames += 1;
                }
                None => self.stats.tx_dropped += 1,
            }
        }
        if used {
            if let Err(e) = self.notify_used(TX_QUEUE, mem) {
                self.transport.fail(e);
            }
        }
    }

    /// The frame in a transmit chain, `None` if the chain is unusable (the
    /// reason is logged), an error if its buffers are outside RAM.
    fn read_tx_frame(
        &mut self,
        chain: &Chain,
        mem: &dyn GuestRam,
    ) -> Result<Option<Vec<u8>>, RingError> {
        if let Some(defect) = chain.defect {
            self.transport.guest_error(defect.kind(), &defect);
            return Ok(None);
        }
        let total = chain.total_len();
        if total > MAX_TX_FRAME {
            let detail = format_args!(
                "transmit chain {} of {total} bytes exceeds {MAX_TX_FRAME}",
                chain.head
            );
            self.transport
                .guest_error("transmit frame too big", &detail);
            return Ok(None);
        }
        if total < NET_HDR_LEN as u64 + MIN_FRAME {
            let detail = format_args!(
                "transmit chain {} of {total} bytes holds no Ethernet frame",
                chain.head
            );
            self.transport
                .guest_error("transmit frame too short", &detail);
            return Ok(None);
        }
        let mut frame = Vec::with_capacity((total - NET_HDR_LEN as u64) as usize);
        gather(mem, &chain.buffers, NET_HDR_LEN as u64, &mut frame)?;
        Ok(Some(frame))
    }

    /// Completes `chain` on `queue` and, for receive, signals it.
    fn complete(
        &mut self,
        queue: u16,
        chain: &Chain,
        len: u32,
        mem: &mut dyn GuestRam,
    ) -> Result<(), RingError> {
        self.transport
            .queue_mut(queue)
            .complete(mem, chain.head, len)?;
        if queue == RX_QUEUE {
            self.notify_used(queue, mem)?;
        }
        Ok(())
    }

    /// Raises the queue interrupt unless the driver suppressed it.
    fn notify_used(&mut self, queue: u16, mem: &dyn GuestRam) -> Result<(), RingError> {
        if !self.transport.queue(queue).interrupt_suppressed(mem)? {
            self.transport.raise_queue_interrupt();
        }
        Ok(())
    }
}

/// Writes the concatenation of `parts` across `buffers` (which hold at
/// least that much).
fn scatter(mem: &mut dyn GuestRam, buffers: &[Buffer], parts: &[&[u8]]) -> Result<(), RingError> {
    let mut rest = parts.iter().copied().filter(|p| !p.is_empty());
    let mut cur = rest.next().unwrap_or_default();
    for b in buffers {
        let (mut addr, mut room) = (b.addr, b.len as usize);
        while room > 0 && !cur.is_empty() {
            let n = room.min(cur.len());
            mem.write(addr, &cur[..n]).map_err(|_| outside(b))?;
            // The walker checked addr + len does not overflow.
            addr += n as u64;
            room -= n;
            cur = &cur[n..];
            if cur.is_empty() {
                cur = rest.next().unwrap_or_default();
            }
        }
        if cur.is_empty() {
            break;
        }
    }
    Ok(())
}

/// Appends the bytes of `buffers` after the first `skip` to `out`.
fn gather(
    mem: &dyn GuestRam,
    buffers: &[Buffer],
    mut skip: u64,
    out: &mut Vec<u8>,
) -> Result<(), RingError> {
    for b in buffers {
        let len = u64::from(b.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let start = out.len();
        out.resize(start + (len - skip) as usize, 0);
        mem.read(b.addr + skip, &mut out[start..])
            .map_err(|_| outside(b))?;
        skip = 0;
    }
    Ok(())
}

fn outside(b: &Buffer) -> RingError {
    RingError::BufferOutsideRam {
        index: b.index,
        addr: b.addr,
        len: b.len,
    }
}

impl PciDevice for VirtioNet {
    fn config_read(&mut self, reg: usize) -> u32 {
        if reg != self.transport.window_data_reg() {
            return self.transport.config_read(reg);
        }
        // The PCI_CFG window: read the BAR0 bytes it selects into the latch.
        if let Some((offset, len)) = self.transport.window() {
            let mut buf = [0u8; 4];
            self.mmio_read(offset, &mut buf[..len]);
            self.transport.window_data()[..len].copy_from_slice(&buf[..len]);
        }
        u32::from_le_bytes(*self.transport.window_data())
    }

    fn config_write(&mut self, reg: usize, offset: u8, data: &[u8]) {
        if reg != self.transport.window_data_reg() {
            return self.transport.config_write(reg, offset, data);
        }
        let at = usize::from(offset);
        if at + data.len() > 4 {
            return;
        }
        self.transport.window_data()[at..at + data.len()].copy_from_slice(data);
        if let Some((offset, len)) = self.transport.window() {
            let bytes = *self.transport.window_data();
            match self.bar_write(offset, &bytes[..len]) {
                Some(Event::Notify(queue)) => self.transport.defer_notify(queue),
                // Chains queued before DRIVER_OK go out with the next flush.
                Some(Event::DriverOk) => self.transport.defer_notify(TX_QUEUE),
                None => {}
            }
        }
    }
}
