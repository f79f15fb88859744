//! The simulation's guest: a deterministic state machine driven by real log
//! records (`replay::log`), producing outputs at landmarks. The primary's
//! copy draws its inputs from the outside world (an RNG); the backup's
//! replica reads them back from the received log byte stream, so it
//! produces the same outputs only if every byte arrived intact and in order.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;

use rand::rngs::StdRng;
use rand::Rng;

use crate::ft::output::ByteSize;
use crate::replay::log::{EndReason, LogHeader, LogReader, LogWriter, Record};

/// One output, identified by (landmark, index) in the world's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub landmark: u64,
    pub index: u32,
    pub data: Vec<u8>,
}

impl ByteSize for Out {
    fn byte_size(&self) -> usize {
        self.data.len()
    }
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 of the combination: cheap and well spread.
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn record_digest(r: &Record) -> u64 {
    match r {
        Record::Interrupt { landmark, vector } => mix(*landmark, 1 + u64::from(*vector)),
        Record::Poll { landmark, now } => mix(mix(*landmark, 2), *now),
        Record::TimeRead { landmark, value } => mix(mix(*landmark, 3), *value),
        Record::SerialInput { landmark, bytes } => bytes
            .iter()
            .fold(mix(*landmark, 4), |h, b| mix(h, u64::from(*b))),
        Record::End { landmark, .. } => mix(*landmark, 5),
        other => mix(other.landmark(), 6),
    }
}

/// The guest's deterministic core.
#[derive(Debug, Clone, Default)]
pub struct GuestModel {
    pub landmark: u64,
    pub state: u64,
}

impl GuestModel {
    /// Runs the next landmark with its records; returns the outputs produced there.
    pub fn step(&mut self, records: &[Record]) -> Vec<Out> {
        self.landmark += 1;
        let mut s = mix(self.state, self.landmark);
        for r in records {
            debug_assert_eq!(r.landmark(), self.landmark);
            s = mix(s, record_digest(r));
        }
        self.state = s;
        let count = (s >> 8) % 3;
        (0..count as u32)
            .map(|index| {
                let h = mix(s, u64::from(index));
                let len = 1 + (h % 48) as usize;
                Out {
                    landmark: self.landmark,
                    index,
                    data: (0..len).map(|i| (mix(h, i as u64) & 0xff) as u8).collect(),
                }
            })
            .collect()
    }
}

/// The outside world's inputs at a landmark (what the primary logs).
pub fn inputs(rng: &mut StdRng, landmark: u64, now_ns: u64) -> Vec<Record> {
    let mut records = Vec::new();
    if rng.gen_bool(0.3) {
        records.push(Record::Interrupt {
            landmark,
            vector: rng.gen(),
        });
    }
    if rng.gen_bool(0.15) {
        records.push(Record::Poll {
            landmark,
            now: now_ns,
        });
    }
    if rng.gen_bool(0.1) {
        records.push(Record::TimeRead {
            landmark,
            value: rng.gen(),
        });
    }
    if rng.gen_bool(0.05) {
        // Now and then larger than a frame: split across Records frames.
        let len = if rng.gen_bool(0.2) {
            rng.gen_range(1500..4000)
        } else {
            rng.gen_range(1..200)
        };
        records.push(Record::SerialInput {
            landmark,
            bytes: (0..len).map(|_| rng.gen()).collect(),
        });
    }
    records
}

pub fn end_record(landmark: u64) -> Record {
    Record::End {
        landmark,
        reason: EndReason::HaltedForGood,
    }
}

pub fn log_header() -> LogHeader {
    LogHeader {
        kernel_hash: [7; 32],
        initrd_hash: None,
        cmdline: "console=ttyS0".into(),
        mem_bytes: 64 << 20,
        boot_unix_secs: 1_700_000_000,
        host_cpu: 0,
        net_mac: None,
        tick_delivery: crate::devices::TickDelivery::AtLandmarks,
    }
}

/// A `Write` whose bytes the owner takes out piece by piece.
#[derive(Clone, Default)]
pub struct SharedBuf(Rc<RefCell<Vec<u8>>>);

impl SharedBuf {
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The primary's log: the real writer into a buffer the node drains.
pub struct LogOut {
    writer: LogWriter<SharedBuf>,
    buf: SharedBuf,
}

impl LogOut {
    pub fn new() -> Self {
        let buf = SharedBuf::default();
        let writer = LogWriter::new(buf.clone(), &log_header()).expect("in-memory write");
        LogOut { writer, buf }
    }

    pub fn append(&mut self, r: &Record) {
        self.writer.append(r).expect("in-memory write");
    }

    /// Everything written since the last call (the first call includes the header).
    pub fn take(&mut self) -> Vec<u8> {
        self.buf.take()
    }
}

/// A `Read` over received bytes; only read when a whole frame is there.
#[derive(Clone, Default)]
struct SharedQueue(Rc<RefCell<VecDeque<u8>>>);

impl Read for SharedQueue {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut q = self.0.borrow_mut();
        let n = out.len().min(q.len());
        for (o, b) in out.iter_mut().zip(q.drain(..n)) {
            *o = b;
        }
        Ok(n)
    }
}

impl SharedQueue {
    fn len(&self) -> usize {
        self.0.borrow().len()
    }
    fn peek_u32(&self, at: usize) -> Option<u32> {
        let q = self.0.borrow();
        if q.len() < at + 4 {
            return None;
        }
        Some(u32::from_le_bytes([q[at], q[at + 1], q[at + 2], q[at + 3]]))
    }
}

/// The backup's side: received log bytes → records → the replica's guest.
pub struct Replica {
    pub guest: GuestModel,
    queue: SharedQueue,
    reader: Option<LogReader<SharedQueue>>,
    parsed: VecDeque<(Record, usize)>,
    /// Bytes received and not yet replayed (unparsed + parsed-unreplayed frames).
    pub queued_bytes: usize,
    /// Replay may run through this landmark (the link's watermark as delivered).
    pub gate: u64,
}

impl Replica {
    pub fn new() -> Self {
        Replica {
            guest: GuestModel::default(),
            queue: SharedQueue::default(),
            reader: None,
            parsed: VecDeque::new(),
            queued_bytes: 0,
            gate: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8], gate: u64) {
        self.queue.0.borrow_mut().extend(bytes.iter().copied());
        self.queued_bytes += bytes.len();
        self.gate = gate;
    }

    /// Parses every complete frame received so far.
    fn parse(&mut self) -> Result<(), String> {
        if self.reader.is_none() {
            // magic + version, then the header frame (len, body, crc).
            let Some(len) = self.queue.peek_u32(10) else {
                return Ok(());
            };
            let whole = 10 + 4 + len as usize + 4;
            if self.queue.len() < whole {
                return Ok(());
            }
            let reader = LogReader::new(self.queue.clone()).map_err(|e| e.to_string())?;
            if *reader.header() != log_header() {
                return Err("log header mismatch".into());
            }
            self.queued_bytes -= whole;
            self.reader = Some(reader);
        }
        let reader = self.reader.as_mut().expect("set above");
        while let Some(len) = self.queue.peek_u32(0) {
            let frame = 4 + len as usize + 4;
            if self.queue.len() < frame {
                break;
            }
            let record = reader
                .next_record()
                .map_err(|e| format!("replica cannot read the log: {e}"))?
                .ok_or("log ended inside a frame")?;
            self.parsed.push_back((record, frame));
        }
        Ok(())
    }

    /// Whether the next landmark may be replayed now.
    pub fn can_step(&self) -> bool {
        self.guest.landmark < self.gate
    }

    /// Replays the next landmark: its records, and the outputs it produced.
    pub fn step(&mut self) -> Result<(Vec<Record>, Vec<Out>), String> {
        self.parse()?;
        let landmark = self.guest.landmark + 1;
        let mut records = Vec::new();
        while let Some((r, _)) = self.parsed.front() {
            if r.landmark() < landmark {
                return Err(format!(
                    "record for landmark {} found when replaying {landmark}",
                    r.landmark()
                ));
            }
            if r.landmark() > landmark {
                break;
            }
            let (r, size) = self.parsed.pop_front().expect("front exists");
            self.queued_bytes -= size;
            records.push(r);
        }
        let outs = self.guest.step(&records);
        Ok((records, outs))
    }
}
