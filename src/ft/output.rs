//! The output rule.
//!
//! Every output (a network frame, console bytes) is tagged with the landmark
//! at which the guest produced it.
//!
//! - The primary keeps its outputs in [`HeldOutputs`] and lets out, in order,
//!   exactly those whose landmark is at most the backup's acknowledged
//!   watermark ([`HeldOutputs::release_through`]). After writing them to the
//!   world the caller reports `released` (the acked watermark) to the link.
//!   Contract: every output of landmarks <= W is pushed here before the log
//!   through W is pushed to the link (the output is produced at the exit;
//!   the landmark is finished later), so an ack for W covers all of them.
//! - The backup keeps its replica's copies in [`ShadowOutputs`], drops those
//!   at or below the last `released` marker it heard of, and on go-live
//!   emits exactly the rest ([`ShadowOutputs::take_for_go_live`]).
//!
//! Hence nothing the world saw is lost by a failover, and the only outputs
//! the world can see twice are those of landmarks in (released seen by the
//! backup, released by the primary].

use std::collections::VecDeque;
use std::time::Duration;

use thiserror::Error;

use super::histogram::{DurationHistogram, Percentiles};

/// An output's size, for the byte bounds.
pub trait ByteSize {
    fn byte_size(&self) -> usize;
}

impl ByteSize for Vec<u8> {
    fn byte_size(&self) -> usize {
        self.len()
    }
}

/// How much a queue of outputs may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputBounds {
    pub max_bytes: usize,
    pub max_items: usize,
}

impl Default for OutputBounds {
    /// 64 MiB or 65536 outputs, whichever comes first.
    fn default() -> Self {
        OutputBounds {
            max_bytes: 64 << 20,
            max_items: 65536,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OutputError {
    /// The queue is at its bound; the vCPU must wait for releases (primary)
    /// or for the released marker to advance (backup), then push again.
    #[error("output queue full: {items} outputs, {bytes} bytes held (bounds {max_items} outputs, {max_bytes} bytes)")]
    Full {
        items: usize,
        bytes: usize,
        max_items: usize,
        max_bytes: usize,
    },
    #[error("output at landmark {landmark} pushed after one at landmark {last}: outputs come in landmark order")]
    LandmarkBackwards { landmark: u64, last: u64 },
    #[error("output at landmark {landmark} pushed after landmarks through {released} were released: the output rule's contract was broken")]
    AlreadyReleased { landmark: u64, released: u64 },
}

/// A push that was refused; the output is handed back, never dropped.
#[derive(Debug)]
pub struct Refused<T> {
    pub error: OutputError,
    pub output: T,
}

#[derive(Debug)]
struct Tagged<T> {
    landmark: u64,
    output: T,
    produced_at: Duration,
}

/// A bounded FIFO of landmark-tagged outputs (shared by both sides).
#[derive(Debug)]
struct TaggedQueue<T> {
    items: VecDeque<Tagged<T>>,
    bytes: usize,
    bounds: OutputBounds,
    last_landmark: u64,
}

impl<T: ByteSize> TaggedQueue<T> {
    fn new(bounds: OutputBounds) -> Self {
        TaggedQueue {
            items: VecDeque::new(),
            bytes: 0,
            bounds,
            last_landmark: 0,
        }
    }

    fn has_room(&self, bytes: usize) -> bool {
        // An empty queue takes any one output, so an output larger than the
        // byte bound cannot wedge the guest forever.
        self.items.is_empty()
            || (self.items.len() < self.bounds.max_items
                && self.bytes.saturating_add(bytes) <= self.bounds.max_bytes)
    }

    fn check(&self, landmark: u64, size: usize) -> Result<(), OutputError> {
        if landmark < self.last_landmark {
            return Err(OutputError::LandmarkBackwards {
                landmark,
                last: self.last_landmark,
            });
        }
        if !self.has_room(size) {
            return Err(OutputError::Full {
                items: self.items.len(),
                bytes: self.bytes,
                max_items: self.bounds.max_items,
                max_bytes: self.bounds.max_bytes,
            });
        }
        Ok(())
    }

    fn push(&mut self, landmark: u64, output: T, now: Duration) {
        self.last_landmark = landmark;
        self.bytes += output.byte_size();
        self.items.push_back(Tagged {
            landmark,
            output,
            produced_at: now,
        });
    }

    /// Removes, in order, every output with landmark <= `through`.
    fn pop_through(&mut self, through: u64, mut each: impl FnMut(Tagged<T>)) {
        while self.items.front().is_some_and(|t| t.landmark <= through) {
            let t = self.items.pop_front().expect("front exists");
            self.bytes -= t.output.byte_size();
            each(t);
        }
    }
}

/// The primary's outputs waiting for the backup's acknowledgement.
#[derive(Debug)]
pub struct HeldOutputs<T> {
    queue: TaggedQueue<T>,
    released: u64,
    hold_times: DurationHistogram,
}

impl<T: ByteSize> HeldOutputs<T> {
    pub fn new(bounds: OutputBounds) -> Self {
        HeldOutputs {
            queue: TaggedQueue::new(bounds),
            released: 0,
            hold_times: DurationHistogram::default(),
        }
    }

    /// Holds an output the guest produced at `landmark` at time `now`.
    pub fn push(&mut self, landmark: u64, output: T, now: Duration) -> Result<(), Refused<T>> {
        let check = if landmark <= self.released && self.released > 0 {
            Err(OutputError::AlreadyReleased {
                landmark,
                released: self.released,
            })
        } else {
            self.queue.check(landmark, output.byte_size())
        };
        match check {
            Ok(()) => {
                self.queue.push(landmark, output, now);
                Ok(())
            }
            Err(error) => Err(Refused { error, output }),
        }
    }

    /// Whether an output of `bytes` would be taken now.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.queue.has_room(bytes)
    }

    /// At a bound: the vCPU should wait before producing more.
    pub fn is_full(&self) -> bool {
        !self.queue.has_room(1)
    }

    /// The outputs with landmark <= `acked` (the backup's acknowledged
    /// watermark), in order, to be written to the world now. Records each
    /// one's hold time.
    pub fn release_through(&mut self, acked: u64, now: Duration) -> Vec<T> {
        let mut out = Vec::new();
        let hold_times = &mut self.hold_times;
        self.queue.pop_through(acked, |t| {
            hold_times.record(now.saturating_sub(t.produced_at));
            out.push(t.output);
        });
        self.released = self.released.max(acked);
        out
    }

    /// Every held output, in order (the primary won the arbiter and runs alone).
    pub fn release_all(&mut self, now: Duration) -> Vec<T> {
        let last = self.queue.last_landmark;
        let out = self.release_through(u64::MAX, now);
        self.released = last;
        out
    }

    pub fn len(&self) -> usize {
        self.queue.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.queue.bytes
    }

    /// Produce → release times of every output released so far.
    pub fn hold_times(&self) -> Percentiles {
        self.hold_times.percentiles()
    }
}

/// The backup's copies of its replica's outputs that the primary may not
/// have let out yet (landmark > the last `released` marker heard of).
#[derive(Debug)]
pub struct ShadowOutputs<T> {
    queue: TaggedQueue<T>,
    released: u64,
    dropped: u64,
    log_finished: bool,
}

impl<T: ByteSize> ShadowOutputs<T> {
    /// Give it about twice the primary's held bounds: it also holds what the
    /// primary released during the last round trip.
    pub fn new(bounds: OutputBounds) -> Self {
        ShadowOutputs {
            queue: TaggedQueue::new(bounds),
            released: 0,
            dropped: 0,
            log_finished: false,
        }
    }

    /// Keeps a copy of an output the replica produced at `landmark`; one the
    /// primary already released is dropped at once. `Full` means the replay
    /// must wait for the released marker to advance.
    pub fn push(&mut self, landmark: u64, output: T, now: Duration) -> Result<(), Refused<T>> {
        if landmark <= self.released && self.released > 0 {
            // Still check the order, so a replica bug is not hidden.
            if landmark < self.queue.last_landmark {
                return Err(Refused {
                    error: OutputError::LandmarkBackwards {
                        landmark,
                        last: self.queue.last_landmark,
                    },
                    output,
                });
            }
            self.queue.last_landmark = landmark;
            self.dropped += 1;
            return Ok(());
        }
        match self.queue.check(landmark, output.byte_size()) {
            Ok(()) => {}
            // Past the end of the link the marker cannot advance any more:
            // waiting would wedge the go-live, so the bound no longer applies.
            Err(OutputError::Full { .. }) if self.log_finished => {}
            Err(error) => return Err(Refused { error, output }),
        }
        self.queue.push(landmark, output, now);
        Ok(())
    }

    /// The link ended (the failover machine said `FinishLog`): the released
    /// marker will not advance again, so the replay must never wait on the
    /// bound. What is left to hold is still limited: outputs of the log
    /// already received, which the primary's own held bound and window limited.
    pub fn log_finished(&mut self) {
        self.log_finished = true;
    }

    /// The primary says every output of landmarks <= `released` is out.
    pub fn on_released(&mut self, released: u64) {
        if released <= self.released {
            return;
        }
        self.released = released;
        let dropped = &mut self.dropped;
        self.queue.pop_through(released, |_| *dropped += 1);
    }

    /// Going live: exactly the outputs after the last released marker, in order.
    pub fn take_for_go_live(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.queue.items.len());
        self.queue.pop_through(u64::MAX, |t| out.push(t.output));
        out
    }

    pub fn released(&self) -> u64 {
        self.released
    }

    /// Copies discarded because the primary had released them.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// At its bound while the link is alive: the replay should wait for the
    /// released marker (it advances: the primary may release everything the
    /// backup acknowledged, which includes everything replayed).
    pub fn is_full(&self) -> bool {
        !self.log_finished && !self.queue.has_room(1)
    }

    pub fn len(&self) -> usize {
        self.queue.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.queue.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn out(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn ack_releases_exactly_the_outputs_at_or_below_it_in_order() {
        let mut held = HeldOutputs::new(OutputBounds::default());
        held.push(1, out("a"), ms(0)).unwrap();
        held.push(3, out("b"), ms(1)).unwrap();
        held.push(3, out("c"), ms(2)).unwrap();
        held.push(5, out("d"), ms(3)).unwrap();
        assert_eq!(held.release_through(0, ms(4)), Vec::<Vec<u8>>::new());
        assert_eq!(
            held.release_through(3, ms(10)),
            vec![out("a"), out("b"), out("c")]
        );
        assert_eq!((held.len(), held.bytes()), (1, 1));
        // An ack that does not advance releases nothing more.
        assert!(held.release_through(4, ms(11)).is_empty());
        assert_eq!(held.release_through(5, ms(13)), vec![out("d")]);
        let hold = held.hold_times();
        assert_eq!(hold.count, 4);
        assert_eq!(hold.max, ms(10));
        assert!(hold.p50 >= ms(8) && hold.p50 <= ms(10), "{:?}", hold.p50);
    }

    #[test]
    fn held_outputs_refuse_over_their_bounds_and_hand_the_output_back() {
        let mut held = HeldOutputs::new(OutputBounds {
            max_bytes: 10,
            max_items: 3,
        });
        held.push(1, out("12345"), ms(0)).unwrap();
        held.push(1, out("12345"), ms(0)).unwrap();
        assert!(!held.has_room(1) && held.is_full());
        let refused = held.push(2, out("x"), ms(0)).unwrap_err();
        assert_eq!(refused.output, out("x"));
        assert!(matches!(refused.error, OutputError::Full { bytes: 10, .. }));
        held.release_through(1, ms(1));
        held.push(2, out("x"), ms(1)).unwrap();
        held.push(2, out("y"), ms(1)).unwrap();
        held.push(2, out("z"), ms(1)).unwrap();
        assert!(matches!(
            held.push(2, out("w"), ms(1)).unwrap_err().error,
            OutputError::Full { items: 3, .. }
        ));
        // An output larger than the whole bound still goes into an empty queue.
        held.release_through(2, ms(2));
        held.push(3, vec![0; 100], ms(2)).unwrap();
        assert!(held.is_full());
    }

    #[test]
    fn held_outputs_refuse_order_and_contract_violations() {
        let mut held = HeldOutputs::new(OutputBounds::default());
        held.push(4, out("a"), ms(0)).unwrap();
        assert!(matches!(
            held.push(3, out("b"), ms(0)).unwrap_err().error,
            OutputError::LandmarkBackwards {
                landmark: 3,
                last: 4
            }
        ));
        held.release_through(6, ms(1));
        assert!(matches!(
            held.push(6, out("c"), ms(1)).unwrap_err().error,
            OutputError::AlreadyReleased {
                landmark: 6,
                released: 6
            }
        ));
        held.push(7, out("d"), ms(1)).unwrap();
    }

    #[test]
    fn release_all_hands_out_everything() {
        let mut held = HeldOutputs::new(OutputBounds::default());
        for l in 1..=5 {
            held.push(l, vec![l as u8], ms(l)).unwrap();
        }
        let all = held.release_all(ms(9));
        assert_eq!(all, (1..=5u8).map(|l| vec![l]).collect::<Vec<_>>());
        assert!(held.is_empty());
        assert_eq!(held.hold_times().count, 5);
    }

    #[test]
    fn shadow_drops_what_the_primary_released_and_goes_live_with_the_rest() {
        let mut shadow = ShadowOutputs::new(OutputBounds::default());
        shadow.push(1, out("a"), ms(0)).unwrap();
        shadow.push(2, out("b"), ms(0)).unwrap();
        shadow.push(4, out("c"), ms(0)).unwrap();
        shadow.on_released(2);
        assert_eq!(shadow.len(), 1);
        assert_eq!(shadow.dropped(), 2);
        // The marker is ahead of the replay: the replica's outputs at or
        // below it are dropped on arrival.
        shadow.on_released(6);
        shadow.push(5, out("d"), ms(0)).unwrap();
        shadow.push(6, out("e"), ms(0)).unwrap();
        shadow.push(7, out("f"), ms(0)).unwrap();
        shadow.push(9, out("g"), ms(0)).unwrap();
        // A stale marker changes nothing.
        shadow.on_released(3);
        assert_eq!(shadow.take_for_go_live(), vec![out("f"), out("g")]);
        assert!(shadow.is_empty());
        assert!(matches!(
            shadow.push(8, out("x"), ms(0)).unwrap_err().error,
            OutputError::LandmarkBackwards { .. }
        ));
    }

    #[test]
    fn shadow_is_bounded() {
        let mut shadow = ShadowOutputs::new(OutputBounds {
            max_bytes: 4,
            max_items: 10,
        });
        shadow.push(1, out("abcd"), ms(0)).unwrap();
        let refused = shadow.push(2, out("e"), ms(0)).unwrap_err();
        assert_eq!(refused.output, out("e"));
        shadow.on_released(1);
        shadow.push(2, refused.output, ms(0)).unwrap();
        assert_eq!(shadow.bytes(), 1);
        shadow.push(3, out("fghi"), ms(0)).unwrap_err();
        // Once the link ended the marker cannot free room: never wait.
        shadow.log_finished();
        assert!(!shadow.is_full());
        shadow.push(3, out("fghi"), ms(0)).unwrap();
        assert_eq!(shadow.take_for_go_live(), vec![out("e"), out("fghi")]);
    }
}
