//! The messages of the primary/backup channel and their byte encoding.
//!
//! A message is the plaintext of one sealed frame: one kind byte, then the
//! fields in order, integers little-endian, strings and byte strings as
//! `u32 length + bytes`. Layout, byte by byte: docs/ft-protocol.md.
//!
//! Decoding checks every length against the bytes that are actually left
//! before it allocates, refuses trailing bytes, and names the field that was
//! wrong. Kinds differ per direction (primary → backup 0x01..0x04, backup →
//! primary 0x81..0x85), so a message can never be mistaken for one of the
//! other direction.

#![forbid(unsafe_code)]

use super::codec::{CodecError, Dec, Enc};
use thiserror::Error;

/// Version of this protocol; a backup refuses a Hello with another one.
/// Version 2: the records are log format 4 (sync-point pages as deltas
/// against a page cache both sides keep), which a version-1 peer cannot read.
/// Version 3: log format 5 (the vCPU state of a sync point as a delta
/// against the previous one's).
/// Version 4: log format 6 (interrupt-window exits are landmarks and the
/// platform catches up missed PIT ticks: an older peer would follow other
/// landmarks).
/// Version 5: log format 7 (sync points with state, `SyncState` records,
/// which an older backup cannot read).
pub const PROTOCOL_VERSION: u16 = 5;
/// Longest VM name (the arbiter's own limit, so every name we accept can be arbitrated).
pub const MAX_VM_NAME_BYTES: usize = arbiter::state_machine::MAX_NAME_LEN;
/// Longest reason or divergence detail; longer texts are cut when sent.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest encoded log header in a Hello (the kernel command line dominates).
pub const MAX_LOG_HEADER_BYTES: usize = 64 << 10;

const KIND_HELLO: u8 = 0x01;
const KIND_RECORDS: u8 = 0x02;
const KIND_PRIMARY_HEARTBEAT: u8 = 0x03;
const KIND_BYE: u8 = 0x04;
const KIND_HELLO_OK: u8 = 0x81;
const KIND_HELLO_REFUSED: u8 = 0x82;
const KIND_ACK: u8 = 0x83;
const KIND_BACKUP_HEARTBEAT: u8 = 0x84;
const KIND_DIVERGED: u8 = 0x85;

/// Bytes a Records message adds around its log bytes (kind, watermark,
/// released, length); the link sizes its chunks with it.
pub const RECORDS_OVERHEAD: usize = 1 + 8 + 8 + 4;

/// A message that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("empty message (no kind byte)")]
    Empty,
    #[error("unknown {direction} message kind {kind:#04x}")]
    UnknownKind { kind: u8, direction: &'static str },
}

/// Primary → backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToBackup {
    /// First message after the handshake.
    Hello {
        protocol_version: u16,
        vm: String,
        generation: u64,
        /// The encoded `LogHeader` of the VM (opaque here; the edge compares it).
        log_header: Vec<u8>,
        /// 0 for a fresh boot, else the landmark the backup's state starts at.
        start_landmark: u64,
    },
    /// A piece of the log byte stream. After it, the backup holds every
    /// record of every landmark <= `watermark`; `released`: every output of
    /// landmarks <= it has left the primary. Neither ever decreases.
    Records {
        watermark: u64,
        released: u64,
        log_bytes: Vec<u8>,
    },
    Heartbeat {
        watermark: u64,
        released: u64,
        /// The primary's monotonic clock, nanoseconds.
        sent_at_ns: u64,
    },
    /// Orderly end: the guest stopped and every output was released.
    Bye { reason: String },
}

/// Backup → primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToPrimary {
    HelloOk,
    HelloRefused {
        reason: String,
    },
    /// Every record through `watermark` was received and queued for replay;
    /// `log_bytes` of the stream are acknowledged. Cumulative.
    Ack {
        watermark: u64,
        log_bytes: u64,
    },
    Heartbeat {
        replayed_landmark: u64,
        lag_ns: u64,
    },
    /// The backup's replay disagreed with the log at `landmark`; it stops.
    Diverged {
        landmark: u64,
        detail: String,
    },
}

impl ToBackup {
    pub fn name(&self) -> &'static str {
        match self {
            ToBackup::Hello { .. } => "Hello",
            ToBackup::Records { .. } => "Records",
            ToBackup::Heartbeat { .. } => "Heartbeat",
            ToBackup::Bye { .. } => "Bye",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            ToBackup::Hello {
                protocol_version,
                vm,
                generation,
                log_header,
                start_landmark,
            } => {
                e.u8(KIND_HELLO);
                e.u16(*protocol_version);
                e.bytes(vm.as_bytes());
                e.u64(*generation);
                e.bytes(log_header);
                e.u64(*start_landmark);
            }
            ToBackup::Records {
                watermark,
                released,
                log_bytes,
            } => {
                e.reserve(RECORDS_OVERHEAD + log_bytes.len());
                e.u8(KIND_RECORDS);
                e.u64(*watermark);
                e.u64(*released);
                e.bytes(log_bytes);
            }
            ToBackup::Heartbeat {
                watermark,
                released,
                sent_at_ns,
            } => {
                e.u8(KIND_PRIMARY_HEARTBEAT);
                e.u64(*watermark);
                e.u64(*released);
                e.u64(*sent_at_ns);
            }
            ToBackup::Bye { reason } => {
                e.u8(KIND_BYE);
                e.bytes(reason.as_bytes());
            }
        }
        e.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (&kind, rest) = bytes.split_first().ok_or(WireError::Empty)?;
        let message = match kind {
            KIND_HELLO => "Hello",
            KIND_RECORDS => "Records",
            KIND_PRIMARY_HEARTBEAT => "Heartbeat",
            KIND_BYE => "Bye",
            _ => {
                return Err(WireError::UnknownKind {
                    kind,
                    direction: "primary-to-backup",
                })
            }
        };
        let mut d = Dec::new(rest, message);
        let msg = match kind {
            KIND_HELLO => ToBackup::Hello {
                protocol_version: d.u16("protocol_version")?,
                vm: d.string("vm", MAX_VM_NAME_BYTES)?,
                generation: d.u64("generation")?,
                log_header: d.bytes("log_header", MAX_LOG_HEADER_BYTES)?.to_vec(),
                start_landmark: d.u64("start_landmark")?,
            },
            KIND_RECORDS => ToBackup::Records {
                watermark: d.u64("watermark")?,
                released: d.u64("released")?,
                log_bytes: d.bytes("log_bytes", usize::MAX)?.to_vec(),
            },
            KIND_PRIMARY_HEARTBEAT => ToBackup::Heartbeat {
                watermark: d.u64("watermark")?,
                released: d.u64("released")?,
                sent_at_ns: d.u64("sent_at_ns")?,
            },
            _ => ToBackup::Bye {
                reason: d.string("reason", MAX_TEXT_BYTES)?,
            },
        };
        d.finish()?;
        Ok(msg)
    }
}

impl ToPrimary {
    pub fn name(&self) -> &'static str {
        match self {
            ToPrimary::HelloOk => "HelloOk",
            ToPrimary::HelloRefused { .. } => "HelloRefused",
            ToPrimary::Ack { .. } => "Ack",
            ToPrimary::Heartbeat { .. } => "Heartbeat",
            ToPrimary::Diverged { .. } => "Diverged",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            ToPrimary::HelloOk => e.u8(KIND_HELLO_OK),
            ToPrimary::HelloRefused { reason } => {
                e.u8(KIND_HELLO_REFUSED);
                e.bytes(reason.as_bytes());
            }
            ToPrimary::Ack {
                watermark,
                log_bytes,
            } => {
                e.u8(KIND_ACK);
                e.u64(*watermark);
                e.u64(*log_bytes);
            }
            ToPrimary::Heartbeat {
                replayed_landmark,
                lag_ns,
            } => {
                e.u8(KIND_BACKUP_HEARTBEAT);
                e.u64(*replayed_landmark);
                e.u64(*lag_ns);
            }
            ToPrimary::Diverged { landmark, detail } => {
                e.u8(KIND_DIVERGED);
                e.u64(*landmark);
                e.bytes(detail.as_bytes());
            }
        }
        e.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (&kind, rest) = bytes.split_first().ok_or(WireError::Empty)?;
        let message = match kind {
            KIND_HELLO_OK => "HelloOk",
            KIND_HELLO_REFUSED => "HelloRefused",
            KIND_ACK => "Ack",
            KIND_BACKUP_HEARTBEAT => "Heartbeat",
            KIND_DIVERGED => "Diverged",
            _ => {
                return Err(WireError::UnknownKind {
                    kind,
                    direction: "backup-to-primary",
                })
            }
        };
        let mut d = Dec::new(rest, message);
        let msg = match kind {
            KIND_HELLO_OK => ToPrimary::HelloOk,
            KIND_HELLO_REFUSED => ToPrimary::HelloRefused {
                reason: d.string("reason", MAX_TEXT_BYTES)?,
            },
            KIND_ACK => ToPrimary::Ack {
                watermark: d.u64("watermark")?,
                log_bytes: d.u64("log_bytes")?,
            },
            KIND_BACKUP_HEARTBEAT => ToPrimary::Heartbeat {
                replayed_landmark: d.u64("replayed_landmark")?,
                lag_ns: d.u64("lag_ns")?,
            },
            _ => ToPrimary::Diverged {
                landmark: d.u64("landmark")?,
                detail: d.string("detail", MAX_TEXT_BYTES)?,
            },
        };
        d.finish()?;
        Ok(msg)
    }
}

/// `text` cut to at most `MAX_TEXT_BYTES` on a character boundary, so a
/// long reason is shortened rather than making the message undecodable.
pub fn bounded_text(text: &str) -> String {
    if text.len() <= MAX_TEXT_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn to_backup_samples() -> Vec<ToBackup> {
        vec![
            ToBackup::Hello {
                protocol_version: PROTOCOL_VERSION,
                vm: "web-1".into(),
                generation: 7,
                log_header: vec![1, 2, 3, 4, 5],
                start_landmark: 0,
            },
            ToBackup::Records {
                watermark: 42,
                released: 40,
                log_bytes: (0..=255).collect(),
            },
            ToBackup::Records {
                watermark: 43,
                released: 42,
                log_bytes: Vec::new(),
            },
            ToBackup::Heartbeat {
                watermark: u64::MAX,
                released: 1,
                sent_at_ns: 123_456_789,
            },
            ToBackup::Bye {
                reason: "guest powered off ✓".into(),
            },
        ]
    }

    fn to_primary_samples() -> Vec<ToPrimary> {
        vec![
            ToPrimary::HelloOk,
            ToPrimary::HelloRefused {
                reason: "log_header differs: cmdline".into(),
            },
            ToPrimary::Ack {
                watermark: 42,
                log_bytes: 9000,
            },
            ToPrimary::Heartbeat {
                replayed_landmark: 41,
                lag_ns: 5_000_000,
            },
            ToPrimary::Diverged {
                landmark: 99,
                detail: "page 0x1000 differs".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in to_backup_samples() {
            assert_eq!(ToBackup::decode(&m.encode()).unwrap(), m, "{}", m.name());
        }
        for m in to_primary_samples() {
            assert_eq!(ToPrimary::decode(&m.encode()).unwrap(), m, "{}", m.name());
        }
    }

    #[test]
    fn hello_layout_is_as_documented() {
        let m = ToBackup::Hello {
            protocol_version: 1,
            vm: "ab".into(),
            generation: 2,
            log_header: vec![9],
            start_landmark: 3,
        };
        let mut want = vec![0x01, 1, 0, 2, 0, 0, 0, b'a', b'b'];
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&[1, 0, 0, 0, 9]);
        want.extend_from_slice(&3u64.to_le_bytes());
        assert_eq!(m.encode(), want);
        let r = ToBackup::Records {
            watermark: 1,
            released: 0,
            log_bytes: vec![7; 3],
        };
        assert_eq!(r.encode().len(), RECORDS_OVERHEAD + 3);
    }

    #[test]
    fn every_truncation_is_refused_with_the_field_named() {
        for m in to_backup_samples() {
            let bytes = m.encode();
            for cut in 0..bytes.len() {
                let err = ToBackup::decode(&bytes[..cut]).unwrap_err();
                match (cut, &err) {
                    (0, WireError::Empty) => {}
                    (_, WireError::Codec(CodecError::Truncated { message, .. })) => {
                        assert_eq!(*message, m.name())
                    }
                    _ => panic!("{} cut at {cut}: unexpected {err}", m.name()),
                }
            }
        }
        for m in to_primary_samples() {
            let bytes = m.encode();
            for cut in 0..bytes.len() {
                let err = ToPrimary::decode(&bytes[..cut]).unwrap_err();
                assert!(
                    matches!(
                        (cut, &err),
                        (0, WireError::Empty) | (_, WireError::Codec(CodecError::Truncated { .. }))
                    ),
                    "{} cut at {cut}: unexpected {err}",
                    m.name()
                );
            }
        }
        let err = ToPrimary::decode(&[KIND_ACK, 1, 2, 3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Ack.watermark is truncated: needs 8 bytes, 3 left"
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        for m in to_backup_samples() {
            let mut bytes = m.encode();
            bytes.push(0);
            assert_eq!(
                ToBackup::decode(&bytes),
                Err(WireError::Codec(CodecError::Trailing {
                    message: m.name(),
                    extra: 1
                }))
            );
        }
        for m in to_primary_samples() {
            let mut bytes = m.encode();
            bytes.extend_from_slice(&[0, 0]);
            assert!(matches!(
                ToPrimary::decode(&bytes),
                Err(WireError::Codec(CodecError::Trailing { extra: 2, .. }))
            ));
        }
    }

    #[test]
    fn oversize_lengths_are_refused_before_allocation() {
        // A Hello whose vm length claims 4 GiB: refused on the limit, not on memory.
        let mut bytes = vec![KIND_HELLO, 1, 0];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            ToBackup::decode(&bytes),
            Err(WireError::Codec(CodecError::TooLong {
                message: "Hello",
                field: "vm",
                len: u32::MAX as usize,
                max: MAX_VM_NAME_BYTES
            }))
        );
        // Records claim more log bytes than the message holds.
        let mut bytes = vec![KIND_RECORDS];
        bytes.extend_from_slice(&[0; 16]);
        bytes.extend_from_slice(&1000u32.to_le_bytes());
        bytes.extend_from_slice(&[0; 10]);
        assert_eq!(
            ToBackup::decode(&bytes),
            Err(WireError::Codec(CodecError::Truncated {
                message: "Records",
                field: "log_bytes",
                needed: 1000,
                remaining: 10
            }))
        );
        let mut bytes = vec![KIND_DIVERGED];
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&(MAX_TEXT_BYTES as u32 + 1).to_le_bytes());
        assert!(matches!(
            ToPrimary::decode(&bytes),
            Err(WireError::Codec(CodecError::TooLong {
                field: "detail",
                ..
            }))
        ));
    }

    #[test]
    fn bad_utf8_and_unknown_kinds_are_named() {
        let mut bytes = vec![KIND_BYE];
        bytes.extend_from_slice(&2u32.to_le_bytes());
        bytes.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(
            ToBackup::decode(&bytes),
            Err(WireError::Codec(CodecError::NotUtf8 {
                message: "Bye",
                field: "reason"
            }))
        );
        // A backup-to-primary kind sent to a backup (reflection) is unknown there.
        assert!(matches!(
            ToBackup::decode(&ToPrimary::HelloOk.encode()),
            Err(WireError::UnknownKind { kind: 0x81, .. })
        ));
        assert!(matches!(
            ToPrimary::decode(&[KIND_HELLO]),
            Err(WireError::UnknownKind { kind: 0x01, .. })
        ));
    }

    #[test]
    fn random_bytes_never_panic_and_round_trip_when_accepted() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            // Bias the kind byte towards valid kinds so the field decoders are exercised.
            if let Some(first) = bytes.first_mut() {
                *first = [0x01, 0x02, 0x03, 0x04, 0x81, 0x82, 0x83, 0x84, 0x85, *first]
                    [rng.gen_range(0..10)];
            }
            if let Ok(m) = ToBackup::decode(&bytes) {
                assert_eq!(m.encode(), bytes);
            }
            if let Ok(m) = ToPrimary::decode(&bytes) {
                assert_eq!(m.encode(), bytes);
            }
        }
    }

    #[test]
    fn long_texts_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_TEXT_BYTES);
        let cut = bounded_text(&long);
        assert!(cut.len() <= MAX_TEXT_BYTES && cut.len() >= MAX_TEXT_BYTES - 1);
        let m = ToBackup::Bye { reason: cut };
        assert_eq!(ToBackup::decode(&m.encode()).unwrap(), m);
        assert_eq!(bounded_text("short"), "short");
    }
}
