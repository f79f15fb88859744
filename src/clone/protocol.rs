//! The clone channel's messages and their byte encoding (sans-IO).
//!
//! A message is the plaintext of one sealed frame (the same framing and
//! PSK handshake as the logging channel, label [`super::HANDSHAKE_LABEL`]):
//! one kind byte, then the fields in order, integers little-endian, byte
//! strings as `u32 length + bytes`. Primary → new backup kinds are
//! 0x11..0x14, new backup → primary 0x91..0x94, so neither direction's
//! message can be taken for the other's, nor for a logging-channel message.
//! Layout, byte by byte: docs/ft-protocol.md "The clone channel".
//!
//! Every length is checked against its limit and against the bytes left
//! before anything is allocated; trailing bytes are refused.

use thiserror::Error;

use crate::ft::codec::{CodecError, Dec, Enc};
use crate::replay::log::PAGE_SIZE;

/// Version of the clone channel's protocol.
pub const CLONE_PROTOCOL_VERSION: u16 = 1;
/// Most pages in one Pages message (4 MiB unpacked).
pub const MAX_PAGES_PER_MESSAGE: usize = 1024;
/// Longest short text (a version string, a reason).
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest encoded log header.
pub const MAX_LOG_HEADER_BYTES: usize = 64 << 10;
/// Longest serialised snapshot in a Final.
pub const MAX_SNAPSHOT_BYTES: usize = 8 << 20;
/// LZ4's worst expansion ratio is 255:1; a claim beyond it is a lie.
const LZ4_MAX_RATIO: usize = 255;

const KIND_HELLO: u8 = 0x11;
const KIND_PAGES: u8 = 0x12;
const KIND_ROUND: u8 = 0x13;
const KIND_FINAL: u8 = 0x14;
const KIND_HELLO_OK: u8 = 0x91;
const KIND_REFUSED: u8 = 0x92;
const KIND_FINAL_OK: u8 = 0x93;
const KIND_FAILED: u8 = 0x94;

/// A message that does not decode (or cannot be encoded).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CloneWireError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("empty message (no kind byte)")]
    Empty,
    #[error("unknown clone message kind {kind:#04x} from the {from}")]
    UnknownKind { kind: u8, from: &'static str },
    #[error("{message}.{field} is invalid: {why}")]
    Invalid {
        message: &'static str,
        field: &'static str,
        why: String,
    },
}

/// What a build must agree on to clone (checked before any pause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// twinvm's version (`CARGO_PKG_VERSION`).
    pub twinvm_version: String,
    pub platform_state_version: u32,
    pub snapshot_version: u32,
    pub log_version: u16,
    /// BLAKE3 of the vCPU's CPUID model (`vmm::cpuid::model`).
    pub cpu_model: [u8; 32],
}

/// Guest pages: (guest-physical address, one page of contents).
pub type PageList = Vec<(u64, Vec<u8>)>;

/// Primary → new backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToNewBackup {
    /// First message: who the VM is and what built it.
    Hello {
        protocol_version: u16,
        vm: String,
        /// The pair's generation once the clone is in sync (old + 1).
        generation: u64,
        /// The VM's encoded `LogHeader`.
        log_header: Vec<u8>,
        build: BuildInfo,
        /// Host CPU the primary's vCPU runs on.
        host_cpu: u32,
    },
    /// Guest pages of copy round `round` (the cut's pages have the last round).
    Pages { round: u32, pages: PageList },
    /// Round `round` is complete; `dirty_pages` were written meanwhile.
    Round { round: u32, dirty_pages: u64 },
    /// The cut: the snapshot (JSON of `CloneSnapshot`) and how many pages
    /// were sent in all, which the receiver checks.
    Final { snapshot: Vec<u8>, pages_sent: u64 },
}

/// New backup → primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToClonePrimary {
    HelloOk,
    /// The Hello was refused (incompatible); nothing was paused.
    Refused {
        reason: String,
    },
    /// The snapshot was applied: connect the logging channel.
    FinalOk,
    /// The snapshot or pages could not be applied.
    Failed {
        reason: String,
    },
}

/// Cut `text` to the protocol's limit on a character boundary.
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

/// `u32 count`, `count × u64 gpa`, `u32 unpacked length`, `u32 block
/// length`, the LZ4 block of every page's contents in order.
fn encode_pages(e: &mut Enc, pages: &[(u64, Vec<u8>)]) -> Result<(), CloneWireError> {
    let invalid = |why: String| CloneWireError::Invalid {
        message: "Pages",
        field: "pages",
        why,
    };
    if pages.len() > MAX_PAGES_PER_MESSAGE {
        return Err(CloneWireError::from(CodecError::TooLong {
            message: "Pages",
            field: "count",
            len: pages.len(),
            max: MAX_PAGES_PER_MESSAGE,
        }));
    }
    e.u32(pages.len() as u32);
    let mut contents = Vec::with_capacity(pages.len() * PAGE_SIZE);
    for (gpa, data) in pages {
        if data.len() != PAGE_SIZE || gpa % PAGE_SIZE as u64 != 0 {
            return Err(invalid(format!(
                "page {gpa:#x} of {} bytes is not one aligned page",
                data.len()
            )));
        }
        e.u64(*gpa);
        contents.extend_from_slice(data);
    }
    e.u32(contents.len() as u32);
    e.bytes(&lz4_flex::block::compress(&contents));
    Ok(())
}

fn decode_pages(d: &mut Dec) -> Result<PageList, CloneWireError> {
    let count = d.len("count", MAX_PAGES_PER_MESSAGE)?;
    let mut gpas = Vec::with_capacity(count.min(d.remaining() / 8));
    for _ in 0..count {
        let gpa = d.u64("gpa")?;
        if gpa % PAGE_SIZE as u64 != 0 {
            return Err(CloneWireError::Invalid {
                message: d.message(),
                field: "gpa",
                why: format!("{gpa:#x} is not page-aligned"),
            });
        }
        gpas.push(gpa);
    }
    let unpacked = d.u32("unpacked")? as usize;
    if unpacked != count * PAGE_SIZE {
        return Err(CloneWireError::Invalid {
            message: d.message(),
            field: "unpacked",
            why: format!("{unpacked} bytes for {count} pages"),
        });
    }
    // Incompressible pages come out of LZ4 slightly larger than they went in.
    let block = d.bytes(
        "block",
        lz4_flex::block::get_maximum_output_size(MAX_PAGES_PER_MESSAGE * PAGE_SIZE),
    )?;
    if unpacked > block.len().saturating_mul(LZ4_MAX_RATIO) + 16 {
        return Err(CloneWireError::Invalid {
            message: d.message(),
            field: "block",
            why: format!(
                "{unpacked} bytes cannot come from a {}-byte LZ4 block",
                block.len()
            ),
        });
    }
    let mut contents = vec![0u8; unpacked];
    let got = lz4_flex::block::decompress_into(block, &mut contents).map_err(|e| {
        CloneWireError::Invalid {
            message: d.message(),
            field: "block",
            why: format!("does not decompress: {e}"),
        }
    })?;
    if got != unpacked {
        return Err(CloneWireError::Invalid {
            message: d.message(),
            field: "block",
            why: format!("decompresses to {got} bytes, expected {unpacked}"),
        });
    }
    Ok(gpas
        .into_iter()
        .zip(contents.chunks_exact(PAGE_SIZE))
        .map(|(gpa, data)| (gpa, data.to_vec()))
        .collect())
}

impl ToNewBackup {
    pub fn name(&self) -> &'static str {
        match self {
            ToNewBackup::Hello { .. } => "Hello",
            ToNewBackup::Pages { .. } => "Pages",
            ToNewBackup::Round { .. } => "Round",
            ToNewBackup::Final { .. } => "Final",
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, CloneWireError> {
        let too_long = |field, len, max| {
            Err(CloneWireError::from(CodecError::TooLong {
                message: "Hello",
                field,
                len,
                max,
            }))
        };
        Ok(match self {
            ToNewBackup::Hello {
                protocol_version,
                vm,
                generation,
                log_header,
                build,
                host_cpu,
            } => {
                if vm.len() > crate::ft::wire::MAX_VM_NAME_BYTES {
                    return too_long("vm", vm.len(), crate::ft::wire::MAX_VM_NAME_BYTES);
                }
                if log_header.len() > MAX_LOG_HEADER_BYTES {
                    return too_long("log_header", log_header.len(), MAX_LOG_HEADER_BYTES);
                }
                let mut e = Enc::new(KIND_HELLO);
                e.u16(*protocol_version);
                e.bytes(vm.as_bytes());
                e.u64(*generation);
                e.bytes(log_header);
                e.bytes(bounded_text(&build.twinvm_version).as_bytes());
                e.u32(build.platform_state_version);
                e.u32(build.snapshot_version);
                e.u16(build.log_version);
                e.raw(&build.cpu_model);
                e.u32(*host_cpu);
                e.into_bytes()
            }
            ToNewBackup::Pages { round, pages } => {
                let mut e = Enc::new(KIND_PAGES);
                e.u32(*round);
                encode_pages(&mut e, pages)?;
                e.into_bytes()
            }
            ToNewBackup::Round { round, dirty_pages } => {
                let mut e = Enc::new(KIND_ROUND);
                e.u32(*round);
                e.u64(*dirty_pages);
                e.into_bytes()
            }
            ToNewBackup::Final {
                snapshot,
                pages_sent,
            } => {
                if snapshot.len() > MAX_SNAPSHOT_BYTES {
                    return Err(CloneWireError::from(CodecError::TooLong {
                        message: "Final",
                        field: "snapshot",
                        len: snapshot.len(),
                        max: MAX_SNAPSHOT_BYTES,
                    }));
                }
                let mut e = Enc::new(KIND_FINAL);
                e.bytes(snapshot);
                e.u64(*pages_sent);
                e.into_bytes()
            }
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CloneWireError> {
        let (&kind, rest) = bytes.split_first().ok_or(CloneWireError::Empty)?;
        let message = match kind {
            KIND_HELLO => "Hello",
            KIND_PAGES => "Pages",
            KIND_ROUND => "Round",
            KIND_FINAL => "Final",
            _ => {
                return Err(CloneWireError::UnknownKind {
                    kind,
                    from: "primary",
                })
            }
        };
        let mut d = Dec::new(rest, message);
        let msg = match kind {
            KIND_HELLO => ToNewBackup::Hello {
                protocol_version: d.u16("protocol_version")?,
                vm: d.string("vm", crate::ft::wire::MAX_VM_NAME_BYTES)?,
                generation: d.u64("generation")?,
                log_header: d.bytes("log_header", MAX_LOG_HEADER_BYTES)?.to_vec(),
                build: BuildInfo {
                    twinvm_version: d.string("twinvm_version", MAX_TEXT_BYTES)?,
                    platform_state_version: d.u32("platform_state_version")?,
                    snapshot_version: d.u32("snapshot_version")?,
                    log_version: d.u16("log_version")?,
                    cpu_model: d.array("cpu_model")?,
                },
                host_cpu: d.u32("host_cpu")?,
            },
            KIND_PAGES => ToNewBackup::Pages {
                round: d.u32("round")?,
                pages: decode_pages(&mut d)?,
            },
            KIND_ROUND => ToNewBackup::Round {
                round: d.u32("round")?,
                dirty_pages: d.u64("dirty_pages")?,
            },
            _ => ToNewBackup::Final {
                snapshot: d.bytes("snapshot", MAX_SNAPSHOT_BYTES)?.to_vec(),
                pages_sent: d.u64("pages_sent")?,
            },
        };
        d.finish()?;
        Ok(msg)
    }
}

impl ToClonePrimary {
    pub fn name(&self) -> &'static str {
        match self {
            ToClonePrimary::HelloOk => "HelloOk",
            ToClonePrimary::Refused { .. } => "Refused",
            ToClonePrimary::FinalOk => "FinalOk",
            ToClonePrimary::Failed { .. } => "Failed",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            ToClonePrimary::HelloOk => vec![KIND_HELLO_OK],
            ToClonePrimary::FinalOk => vec![KIND_FINAL_OK],
            ToClonePrimary::Refused { reason } | ToClonePrimary::Failed { reason } => {
                let kind = if matches!(self, ToClonePrimary::Refused { .. }) {
                    KIND_REFUSED
                } else {
                    KIND_FAILED
                };
                let mut e = Enc::new(kind);
                e.bytes(bounded_text(reason).as_bytes());
                e.into_bytes()
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CloneWireError> {
        let (&kind, rest) = bytes.split_first().ok_or(CloneWireError::Empty)?;
        let message = match kind {
            KIND_HELLO_OK => "HelloOk",
            KIND_REFUSED => "Refused",
            KIND_FINAL_OK => "FinalOk",
            KIND_FAILED => "Failed",
            _ => {
                return Err(CloneWireError::UnknownKind {
                    kind,
                    from: "new backup",
                })
            }
        };
        let mut d = Dec::new(rest, message);
        let msg = match kind {
            KIND_HELLO_OK => ToClonePrimary::HelloOk,
            KIND_FINAL_OK => ToClonePrimary::FinalOk,
            KIND_REFUSED => ToClonePrimary::Refused {
                reason: d.string("reason", MAX_TEXT_BYTES)?,
            },
            _ => ToClonePrimary::Failed {
                reason: d.string("reason", MAX_TEXT_BYTES)?,
            },
        };
        d.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build() -> BuildInfo {
        BuildInfo {
            twinvm_version: "0.1.0".into(),
            platform_state_version: 2,
            snapshot_version: 1,
            log_version: 3,
            cpu_model: [7; 32],
        }
    }

    fn page(fill: u8) -> Vec<u8> {
        let mut p = vec![fill; PAGE_SIZE];
        p[17] = fill.wrapping_add(1);
        p
    }

    #[test]
    fn every_message_round_trips() {
        let to_backup = [
            ToNewBackup::Hello {
                protocol_version: CLONE_PROTOCOL_VERSION,
                vm: "web".into(),
                generation: 4,
                log_header: vec![1, 2, 3],
                build: build(),
                host_cpu: 1,
            },
            ToNewBackup::Pages {
                round: 2,
                pages: vec![(0, page(0)), (0x5000, page(9))],
            },
            ToNewBackup::Pages {
                round: 0,
                pages: vec![],
            },
            ToNewBackup::Round {
                round: 3,
                dirty_pages: 77,
            },
            ToNewBackup::Final {
                snapshot: b"{}".to_vec(),
                pages_sent: 65536,
            },
        ];
        for m in to_backup {
            let bytes = m.encode().unwrap();
            assert_eq!(ToNewBackup::decode(&bytes).unwrap(), m);
            // Any cut short is refused, never a panic.
            for n in 0..bytes.len() {
                assert!(
                    ToNewBackup::decode(&bytes[..n]).is_err(),
                    "{} cut at {n}",
                    m.name()
                );
            }
            let mut long = bytes.clone();
            long.push(0);
            assert!(matches!(
                ToNewBackup::decode(&long),
                Err(CloneWireError::Codec(CodecError::Trailing { .. }))
            ));
        }
        for m in [
            ToClonePrimary::HelloOk,
            ToClonePrimary::FinalOk,
            ToClonePrimary::Refused {
                reason: "memory differs".into(),
            },
            ToClonePrimary::Failed {
                reason: "bad page".into(),
            },
        ] {
            let bytes = m.encode();
            assert_eq!(ToClonePrimary::decode(&bytes).unwrap(), m, "{}", m.name());
        }
    }

    #[test]
    fn a_direction_never_decodes_the_other_ones_messages() {
        let hello_ok = ToClonePrimary::HelloOk.encode();
        assert!(matches!(
            ToNewBackup::decode(&hello_ok),
            Err(CloneWireError::UnknownKind { .. })
        ));
        let round = ToNewBackup::Round {
            round: 1,
            dirty_pages: 1,
        }
        .encode()
        .unwrap();
        assert!(ToClonePrimary::decode(&round).is_err());
        assert_eq!(ToNewBackup::decode(&[]), Err(CloneWireError::Empty));
    }

    #[test]
    fn lengths_past_their_limits_are_refused_before_allocating() {
        // A Pages claiming 2^32-1 pages.
        let mut bytes = vec![KIND_PAGES, 0, 0, 0, 0];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ToNewBackup::decode(&bytes),
            Err(CloneWireError::Codec(CodecError::TooLong {
                field: "count",
                ..
            }))
        ));
        // A Final whose snapshot claims 4 GiB.
        let mut bytes = vec![KIND_FINAL];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ToNewBackup::decode(&bytes),
            Err(CloneWireError::Codec(CodecError::TooLong {
                field: "snapshot",
                ..
            }))
        ));
        // Too many pages to encode.
        let pages = vec![(0, page(0)); MAX_PAGES_PER_MESSAGE + 1];
        assert!(ToNewBackup::Pages { round: 0, pages }.encode().is_err());
        // A page that is not one page.
        let pages = vec![(0x1000, vec![0; 10])];
        assert!(ToNewBackup::Pages { round: 0, pages }.encode().is_err());
    }

    #[test]
    fn pages_with_a_lying_block_or_a_misaligned_address_are_refused() {
        let good = ToNewBackup::Pages {
            round: 1,
            pages: vec![(0x2000, page(3))],
        }
        .encode()
        .unwrap();
        // gpa at offset 1 (kind) + 4 (round) + 4 (count).
        let mut misaligned = good.clone();
        misaligned[9] = 0x01;
        assert!(matches!(
            ToNewBackup::decode(&misaligned),
            Err(CloneWireError::Invalid { field: "gpa", .. })
        ));
        // The unpacked length must be count pages.
        let mut wrong_len = good.clone();
        wrong_len[17..21].copy_from_slice(&(2 * PAGE_SIZE as u32).to_le_bytes());
        assert!(matches!(
            ToNewBackup::decode(&wrong_len),
            Err(CloneWireError::Invalid {
                field: "unpacked",
                ..
            })
        ));
        // A block corrupted inside.
        let mut corrupt = good.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        corrupt[25] ^= 0xff;
        assert!(ToNewBackup::decode(&corrupt).is_err());
    }

    #[test]
    fn a_full_message_of_incompressible_pages_round_trips() {
        // LZ4 makes random data a little larger: the receiver must still
        // take the largest message the sender makes.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let pages: Vec<(u64, Vec<u8>)> = (0..MAX_PAGES_PER_MESSAGE as u64)
            .map(|i| {
                let data = (0..PAGE_SIZE / 8)
                    .flat_map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x.to_le_bytes()
                    })
                    .collect();
                (i * PAGE_SIZE as u64, data)
            })
            .collect();
        let msg = ToNewBackup::Pages { round: 0, pages };
        let bytes = msg.encode().unwrap();
        assert!(bytes.len() > MAX_PAGES_PER_MESSAGE * PAGE_SIZE);
        assert!(bytes.len() + 64 < super::super::MAX_FRAME_BYTES as usize);
        assert_eq!(ToNewBackup::decode(&bytes).unwrap(), msg);
    }

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        let reason = "é".repeat(MAX_TEXT_BYTES);
        let bytes = ToClonePrimary::Failed { reason }.encode();
        let ToClonePrimary::Failed { reason } = ToClonePrimary::decode(&bytes).unwrap() else {
            panic!("not a Failed");
        };
        assert!(reason.len() <= MAX_TEXT_BYTES && reason.chars().all(|c| c == 'é'));
    }
}
