//! Split virtqueues (virtio 1.2 §2.7) as the device sees them, hardened
//! against a hostile or broken driver.
//!
//! The walker never trusts the rings: every index is range-checked, every
//! address computation is checked for overflow, a chain that revisits a
//! descriptor is a loop (so a walk visits at most `size` descriptors and
//! allocates at most `size` buffer records), and every access goes through
//! [`GuestRam`], which refuses anything outside guest RAM. Problems come in
//! two grades: a [`RingError`] means the ring itself is unusable (the device
//! must stop and ask for a reset); a [`ChainDefect`] spoils one chain only,
//! which is returned to the driver unused.
//!
//! Chains are completed in the order they are taken and at once, so the
//! device's next available index always equals its next used index; the
//! two are still kept apart, as the spec names them, and a saved state in
//! which they differ is refused.

use serde::{Deserialize, Serialize};

use super::{GuestRam, GuestRamError};

/// The largest queue the device offers (and the driver may shrink).
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Descriptor flags.
pub(super) const DESC_F_NEXT: u16 = 1;
pub(super) const DESC_F_WRITE: u16 = 2;
pub(super) const DESC_F_INDIRECT: u16 = 4;

/// Available-ring flag: the driver does not want used-buffer interrupts.
pub(super) const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Bytes per descriptor-table entry and per used-ring element.
const DESC_SIZE: u64 = 16;
const USED_ELEM_SIZE: u64 = 8;

/// Which way the device moves data through a chain's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The device reads the buffers (a transmit chain): all read-only.
    DeviceReads,
    /// The device writes the buffers (a receive chain): all write-only.
    DeviceWrites,
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// The descriptor it came from.
    pub index: u16,
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A descriptor chain taken from the available ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor: the id the used ring reports back.
    pub head: u16,
    /// The buffers in chain order (up to the defect, if any).
    pub buffers: Vec<Buffer>,
    /// Why the chain cannot be used, if it cannot; it must still be
    /// returned to the driver.
    pub defect: Option<ChainDefect>,
}

impl Chain {
    /// Sum of the buffer lengths (cannot overflow: at most 256 × 4 GiB).
    pub fn total_len(&self) -> u64 {
        self.buffers.iter().map(|b| u64::from(b.len)).sum()
    }
}

/// A chain that is well formed as a ring structure but unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainDefect {
    /// INDIRECT was never offered, so the driver may not use it.
    #[error("descriptor {index} has the INDIRECT flag, which was not negotiated")]
    Indirect {
        /// The offending descriptor.
        index: u16,
    },
    /// A device-writable buffer where the device only reads.
    #[error("descriptor {index} is device-writable in a chain the device only reads")]
    WritableInReadChain {
        /// The offending descriptor.
        index: u16,
    },
    /// A read-only buffer where the device only writes.
    #[error("descriptor {index} is read-only in a chain the device writes")]
    ReadOnlyInWriteChain {
        /// The offending descriptor.
        index: u16,
    },
}

impl ChainDefect {
    /// Short name for rate-limited logging.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Indirect { .. } => "indirect descriptor",
            Self::WritableInReadChain { .. } => "writable descriptor in TX chain",
            Self::ReadOnlyInWriteChain { .. } => "read-only descriptor in RX chain",
        }
    }
}

/// A ring the device cannot go on using: it needs a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// More new entries than the ring holds.
    #[error(
        "avail index jumped from {next_avail} to {avail_idx}, more than the queue size {size}"
    )]
    AvailIndexJump {
        /// The device's next available index.
        next_avail: u16,
        /// The index the driver published.
        avail_idx: u16,
        /// Queue size.
        size: u16,
    },
    /// An avail-ring entry names a descriptor past the table.
    #[error("avail ring names descriptor {head}, outside the queue of {size}")]
    HeadOutOfRange {
        /// The head index read.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A descriptor's next field points past the table.
    #[error("descriptor {index} chains to descriptor {next}, outside the queue of {size}")]
    NextOutOfRange {
        /// The descriptor with the bad next field.
        index: u16,
        /// The next field.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// A chain visits a descriptor twice; such a chain is also longer than
    /// the queue.
    #[error("descriptor chain from head {head} visits descriptor {index} twice (a loop)")]
    Loop {
        /// The chain's head.
        head: u16,
        /// The first descriptor visited twice.
        index: u16,
    },
    /// A ring structure (descriptor table, avail or used ring) is not in
    /// guest RAM.
    #[error("the {part} lies outside guest RAM ({source})")]
    RingOutsideRam {
        /// Which structure.
        part: &'static str,
        /// The failed access.
        source: GuestRamError,
    },
    /// A buffer a descriptor names is not in guest RAM.
    #[error("descriptor {index}: buffer of {len} bytes at {addr:#x} lies outside guest RAM")]
    BufferOutsideRam {
        /// The descriptor.
        index: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A ring part is not at the alignment the spec requires.
    #[error("the {part} address {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which structure.
        part: &'static str,
        /// The address the driver gave.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
}

impl RingError {
    /// Short name for rate-limited logging.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AvailIndexJump { .. } => "avail index jump",
            Self::HeadOutOfRange { .. } => "head index out of range",
            Self::NextOutOfRange { .. } => "next index out of range",
            Self::Loop { .. } => "descriptor loop",
            Self::RingOutsideRam { .. } => "ring outside RAM",
            Self::BufferOutsideRam { .. } => "buffer outside RAM",
            Self::Misaligned { .. } => "misaligned ring",
        }
    }
}

/// One split virtqueue's configuration and the device's position in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitQueue {
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
}

impl Default for SplitQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl SplitQueue {
    /// A queue after device reset: maximum size, not enabled.
    pub fn new() -> Self {
        Self {
            size: MAX_QUEUE_SIZE,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            next_avail: 0,
            next_used: 0,
        }
    }

    /// Entries in the ring.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The driver enabled the queue.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Descriptor table address.
    pub fn desc_table(&self) -> u64 {
        self.desc_table
    }

    /// Available ring (driver area) address.
    pub fn avail_ring(&self) -> u64 {
        self.avail_ring
    }

    /// Used ring (device area) address.
    pub fn used_ring(&self) -> u64 {
        self.used_ring
    }

    /// The next available-ring index the device will take.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The next used-ring index the device will fill.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Sets the size the driver chose; false (and no change) unless it is a
    /// power of two no larger than [`MAX_QUEUE_SIZE`].
    pub fn set_size(&mut self, size: u16) -> bool {
        let ok = size.is_power_of_two() && size <= MAX_QUEUE_SIZE;
        if ok {
            self.size = size;
        }
        ok
    }

    /// Sets the descriptor table address.
    pub fn set_desc_table(&mut self, addr: u64) {
        self.desc_table = addr;
    }

    /// Sets the available ring address.
    pub fn set_avail_ring(&mut self, addr: u64) {
        self.avail_ring = addr;
    }

    /// Sets the used ring address.
    pub fn set_used_ring(&mut self, addr: u64) {
        self.used_ring = addr;
    }

    /// Enables the queue once its addresses have the alignment the spec
    /// requires of split rings (16, 2, 4).
    pub fn enable(&mut self) -> Result<(), RingError> {
        for (part, addr, align) in [
            ("descriptor table", self.desc_table, 16),
            ("avail ring", self.avail_ring, 2),
            ("used ring", self.used_ring, 4),
        ] {
            if addr % align != 0 {
                return Err(RingError::Misaligned { part, addr, align });
            }
        }
        self.ready = true;
        Ok(())
    }

    /// Checks a queue from a saved state.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.size.is_power_of_two() || self.size > MAX_QUEUE_SIZE {
            return Err("queue size is not a power of two up to 256");
        }
        if self.next_avail != self.next_used {
            return Err("queue's next available and next used indices differ");
        }
        if !self.ready && self.next_avail != 0 {
            return Err("disabled queue has non-zero indices");
        }
        if self.ready
            && (self.desc_table % 16 != 0 || self.avail_ring % 2 != 0 || self.used_ring % 4 != 0)
        {
            return Err("enabled queue has misaligned rings");
        }
        Ok(())
    }

    /// Sets the indices directly, as a corrupted saved state could.
    #[cfg(test)]
    pub(super) fn force_indices(&mut self, next_avail: u16, next_used: u16) {
        self.next_avail = next_avail;
        self.next_used = next_used;
    }

    /// Entries the driver has made available and the device not yet taken.
    pub fn pending(&self, mem: &dyn GuestRam) -> Result<u16, RingError> {
        let avail_idx = read_u16(mem, self.avail_ring, 2, "avail ring")?;
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > self.size {
            return Err(RingError::AvailIndexJump {
                next_avail: self.next_avail,
                avail_idx,
                size: self.size,
            });
        }
        Ok(pending)
    }

    /// Whether the driver asked not to be interrupted for used buffers.
    pub fn interrupt_suppressed(&self, mem: &dyn GuestRam) -> Result<bool, RingError> {
        let flags = read_u16(mem, self.avail_ring, 0, "avail ring")?;
        Ok(flags & AVAIL_F_NO_INTERRUPT != 0)
    }

    /// The next available chain, walked and checked, without taking it:
    /// `None` if the driver has made nothing available. The caller must
    /// [`complete`](Self::complete) it before peeking again.
    pub fn peek(&self, mem: &dyn GuestRam, dir: Direction) -> Result<Option<Chain>, RingError> {
        if self.pending(mem)? == 0 {
            return Ok(None);
        }
        // The size is a power of two, so this is the ring slot.
        let slot = u64::from(self.next_avail % self.size);
        let head = read_u16(mem, self.avail_ring, 4 + 2 * slot, "avail ring")?;
        if head >= self.size {
            return Err(RingError::HeadOutOfRange {
                head,
                size: self.size,
            });
        }
        self.walk(mem, head, dir).map(Some)
    }

    /// Follows the chain from `head`. Terminates after at most `size`
    /// descriptors: a revisit is a loop.
    fn walk(&self, mem: &dyn GuestRam, head: u16, dir: Direction) -> Result<Chain, RingError> {
        let mut visited = [0u64; MAX_QUEUE_SIZE as usize / 64];
        let mut chain = Chain {
            head,
            buffers: Vec::new(),
            defect: None,
        };
        let mut index = head;
        loop {
            let (word, bit) = (usize::from(index) / 64, index % 64);
            if visited[word] & 1 << bit != 0 {
                return Err(RingError::Loop { head, index });
            }
            visited[word] |= 1 << bit;
            let mut raw = [0u8; DESC_SIZE as usize];
            read_ring(
                mem,
                self.desc_table,
                u64::from(index) * DESC_SIZE,
                &mut raw,
                "descriptor table",
            )?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            let defect = if flags & DESC_F_INDIRECT != 0 {
                Some(ChainDefect::Indirect { index })
            } else {
                match (dir, flags & DESC_F_WRITE != 0) {
                    (Direction::DeviceReads, true) => {
                        Some(ChainDefect::WritableInReadChain { index })
                    }
                    (Direction::DeviceWrites, false) => {
                        Some(ChainDefect::ReadOnlyInWriteChain { index })
                    }
                    _ => None,
                }
            };
            if defect.is_some() {
                chain.defect = defect;
                return Ok(chain);
            }
            if addr.checked_add(u64::from(len)).is_none() {
                return Err(RingError::BufferOutsideRam { index, addr, len });
            }
            chain.buffers.push(Buffer { index, addr, len });
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if next >= self.size {
                return Err(RingError::NextOutOfRange {
                    index,
                    next,
                    size: self.size,
                });
            }
            index = next;
        }
    }

    /// Returns the chain at `head` (the one [`peek`](Self::peek) gave) to
    /// the driver with `len` bytes written, and takes it off the available
    /// ring. Nothing advances if the used ring cannot be written.
    pub fn complete(
        &mut self,
        mem: &mut dyn GuestRam,
        head: u16,
        len: u32,
    ) -> Result<(), RingError> {
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; USED_ELEM_SIZE as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        write_ring(mem, self.used_ring, 4 + slot * USED_ELEM_SIZE, &elem)?;
        let next_used = self.next_used.wrapping_add(1);
        write_ring(mem, self.used_ring, 2, &next_used.to_le_bytes())?;
        self.next_used = next_used;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }
}

/// The address `base + offset`, or the error for a ring part that does not
/// fit in the address space.
fn ring_addr(base: u64, offset: u64, len: usize, part: &'static str) -> Result<u64, RingError> {
    base.checked_add(offset).ok_or(RingError::RingOutsideRam {
        part,
        source: GuestRamError { gpa: base, len },
    })
}

fn read_ring(
    mem: &dyn GuestRam,
    base: u64,
    offset: u64,
    buf: &mut [u8],
    part: &'static str,
) -> Result<(), RingError> {
    let gpa = ring_addr(base, offset, buf.len(), part)?;
    mem.read(gpa, buf)
        .map_err(|source| RingError::RingOutsideRam { part, source })
}

fn read_u16(
    mem: &dyn GuestRam,
    base: u64,
    offset: u64,
    part: &'static str,
) -> Result<u16, RingError> {
    let mut b = [0u8; 2];
    read_ring(mem, base, offset, &mut b, part)?;
    Ok(u16::from_le_bytes(b))
}

fn write_ring(
    mem: &mut dyn GuestRam,
    base: u64,
    offset: u64,
    data: &[u8],
) -> Result<(), RingError> {
    let part = "used ring";
    let gpa = ring_addr(base, offset, data.len(), part)?;
    mem.write(gpa, data)
        .map_err(|source| RingError::RingOutsideRam { part, source })
}

#[cfg(test)]
mod tests {
    use super::super::VecRam;
    use super::*;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    pub(super) fn put_desc(ram: &mut VecRam, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        ram.write(DESC + 16 * u64::from(i), &d).unwrap();
    }

    fn publish(ram: &mut VecRam, slot: u16, head: u16, idx: u16) {
        ram.write(AVAIL + 4 + 2 * u64::from(slot), &head.to_le_bytes())
            .unwrap();
        ram.write(AVAIL + 2, &idx.to_le_bytes()).unwrap();
    }

    fn queue(size: u16) -> SplitQueue {
        let mut q = SplitQueue::new();
        assert!(q.set_size(size));
        q.set_desc_table(DESC);
        q.set_avail_ring(AVAIL);
        q.set_used_ring(USED);
        q.enable().unwrap();
        q
    }

    fn u16_at(ram: &VecRam, gpa: u64) -> u16 {
        let mut b = [0; 2];
        ram.read(gpa, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    #[test]
    fn walks_a_chain_and_completes_it() {
        let mut ram = VecRam::new(0x10000);
        let mut q = queue(8);
        assert_eq!(q.peek(&ram, Direction::DeviceReads), Ok(None));
        put_desc(&mut ram, 3, 0x8000, 12, DESC_F_NEXT, 5);
        put_desc(&mut ram, 5, 0x9000, 100, 0, 0);
        publish(&mut ram, 0, 3, 1);
        assert_eq!(q.pending(&ram), Ok(1));
        let chain = q.peek(&ram, Direction::DeviceReads).unwrap().unwrap();
        assert_eq!(chain.head, 3);
        assert_eq!(chain.defect, None);
        assert_eq!(
            chain.buffers,
            vec![
                Buffer {
                    index: 3,
                    addr: 0x8000,
                    len: 12
                },
                Buffer {
                    index: 5,
                    addr: 0x9000,
                    len: 100
                }
            ]
        );
        assert_eq!(chain.total_len(), 112);
        q.complete(&mut ram, chain.head, 7).unwrap();
        assert_eq!(u16_at(&ram, USED + 2), 1);
        let mut elem = [0; 8];
        ram.read(USED + 4, &mut elem).unwrap();
        assert_eq!(elem, [3, 0, 0, 0, 7, 0, 0, 0]);
        assert_eq!((q.next_avail(), q.next_used()), (1, 1));
        assert_eq!(q.peek(&ram, Direction::DeviceReads), Ok(None));
        // Indices wrap at 2^16 while ring slots wrap at the size.
        q.next_avail = u16::MAX;
        q.next_used = u16::MAX;
        publish(&mut ram, 7, 5, 0);
        let chain = q.peek(&ram, Direction::DeviceReads).unwrap().unwrap();
        assert_eq!(chain.head, 5);
        q.complete(&mut ram, 5, 0).unwrap();
        assert_eq!(u16_at(&ram, USED + 2), 0);
        ram.read(USED + 4 + 7 * 8, &mut elem).unwrap();
        assert_eq!(elem, [5, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn interrupt_suppression_flag() {
        let mut ram = VecRam::new(0x10000);
        let q = queue(4);
        assert_eq!(q.interrupt_suppressed(&ram), Ok(false));
        ram.write(AVAIL, &AVAIL_F_NO_INTERRUPT.to_le_bytes())
            .unwrap();
        assert_eq!(q.interrupt_suppressed(&ram), Ok(true));
    }

    #[test]
    fn loop_is_a_ring_error() {
        let mut ram = VecRam::new(0x10000);
        let q = queue(8);
        put_desc(&mut ram, 0, 0x8000, 1, DESC_F_NEXT, 1);
        put_desc(&mut ram, 1, 0x8000, 1, DESC_F_NEXT, 0);
        publish(&mut ram, 0, 0, 1);
        assert_eq!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::Loop { head: 0, index: 0 })
        );
        // A descriptor pointing at itself.
        put_desc(&mut ram, 2, 0x8000, 1, DESC_F_NEXT, 2);
        publish(&mut ram, 0, 2, 1);
        assert_eq!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::Loop { head: 2, index: 2 })
        );
    }

    #[test]
    fn chain_longer_than_the_queue_is_caught_as_a_loop() {
        let mut ram = VecRam::new(0x10000);
        let q = queue(4);
        // 0 → 1 → 2 → 3 → 0: the fifth descriptor exceeds the queue size.
        for i in 0..4 {
            put_desc(&mut ram, i, 0x8000, 1, DESC_F_NEXT, (i + 1) % 4);
        }
        publish(&mut ram, 0, 0, 1);
        assert_eq!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::Loop { head: 0, index: 0 })
        );
        // The longest legal chain uses every descriptor once.
        put_desc(&mut ram, 3, 0x8000, 1, 0, 0);
        let chain = q.peek(&ram, Direction::DeviceReads).unwrap().unwrap();
        assert_eq!(chain.buffers.len(), 4);
    }

    #[test]
    fn bad_indices_are_ring_errors() {
        let mut ram = VecRam::new(0x10000);
        let mut q = queue(8);
        publish(&mut ram, 0, 8, 1);
        assert_eq!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::HeadOutOfRange { head: 8, size: 8 })
        );
        put_desc(&mut ram, 1, 0x8000, 1, DESC_F_NEXT, 200);
        publish(&mut ram, 0, 1, 1);
        assert_eq!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::NextOutOfRange {
                index: 1,
                next: 200,
                size: 8
            })
        );
        // Nine new entries in a ring of eight.
        publish(&mut ram, 0, 1, 9);
        assert_eq!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::AvailIndexJump {
                next_avail: 0,
                avail_idx: 9,
                size: 8
            })
        );
        // The index "going backwards" is a jump of almost 2^16.
        q.next_avail = 5;
        q.next_used = 5;
        publish(&mut ram, 0, 1, 4);
        assert!(matches!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::AvailIndexJump { .. })
        ));
    }

    #[test]
    fn rings_and_buffers_outside_ram() {
        let mut ram = VecRam::new(0x10000);
        let mut q = queue(8);
        q.set_avail_ring(0x20000);
        assert!(matches!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::RingOutsideRam {
                part: "avail ring",
                ..
            })
        ));
        q.set_avail_ring(AVAIL);
        q.set_desc_table(u64::MAX - 15);
        publish(&mut ram, 0, 1, 1);
        assert!(matches!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::RingOutsideRam {
                part: "descriptor table",
                ..
            })
        ));
        q.set_desc_table(DESC);
        put_desc(&mut ram, 1, u64::MAX - 2, 4, 0, 0);
        assert_eq!(
            q.peek(&ram, Direction::DeviceReads),
            Err(RingError::BufferOutsideRam {
                index: 1,
                addr: u64::MAX - 2,
                len: 4
            })
        );
        // A used ring outside RAM: nothing advances.
        put_desc(&mut ram, 1, 0x8000, 4, 0, 0);
        q.set_used_ring(0xfff8);
        assert!(matches!(
            q.complete(&mut ram, 1, 0),
            Err(RingError::RingOutsideRam {
                part: "used ring",
                ..
            })
        ));
        assert_eq!((q.next_avail(), q.next_used()), (0, 0));
    }

    #[test]
    fn defective_chains_are_returned_not_fatal() {
        let mut ram = VecRam::new(0x10000);
        let q = queue(8);
        put_desc(&mut ram, 0, 0x8000, 16, DESC_F_INDIRECT, 0);
        publish(&mut ram, 0, 0, 1);
        let c = q.peek(&ram, Direction::DeviceReads).unwrap().unwrap();
        assert_eq!(c.defect, Some(ChainDefect::Indirect { index: 0 }));
        put_desc(&mut ram, 0, 0x8000, 16, DESC_F_NEXT, 1);
        put_desc(&mut ram, 1, 0x9000, 16, DESC_F_WRITE, 0);
        let c = q.peek(&ram, Direction::DeviceReads).unwrap().unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(
            c.defect,
            Some(ChainDefect::WritableInReadChain { index: 1 })
        );
        let c = q.peek(&ram, Direction::DeviceWrites).unwrap().unwrap();
        assert_eq!(
            c.defect,
            Some(ChainDefect::ReadOnlyInWriteChain { index: 0 })
        );
    }

    #[test]
    fn configuration_checks() {
        let mut q = SplitQueue::new();
        assert!(!q.set_size(0));
        assert!(!q.set_size(3));
        assert!(!q.set_size(512));
        assert_eq!(q.size(), MAX_QUEUE_SIZE);
        assert!(q.set_size(1));
        q.set_desc_table(0x1008);
        assert_eq!(
            q.enable(),
            Err(RingError::Misaligned {
                part: "descriptor table",
                addr: 0x1008,
                align: 16
            })
        );
        q.set_desc_table(0x1000);
        q.set_used_ring(0x2002);
        assert!(matches!(
            q.enable(),
            Err(RingError::Misaligned {
                part: "used ring",
                ..
            })
        ));
        assert!(!q.ready());
        assert_eq!(q.check(), Ok(()));
        q.next_avail = 1;
        assert!(q.check().is_err());
        q.next_used = 1;
        assert_eq!(q.check(), Err("disabled queue has non-zero indices"));
    }
}
