//! The kernel inside a Linux bzImage, taken out on the host.
//!
//! A bzImage carries its kernel (`vmlinux` as an ELF, stripped of symbols,
//! followed by its relocation table) compressed, and decompresses it inside
//! the guest. That hides the kernel's code from the trap planter (traps.rs
//! scans ELF sections before boot), and on hosts where guest kernel code is
//! emulated the decompressor alone takes minutes. So twinvm finds the payload
//! through the setup header (`payload_offset`/`payload_length`, boot protocol
//! 2.08+), decompresses it here and boots the ELF inside.
//!
//! Decompressed here: LZ4 in the legacy frame (Debian's cloud kernels) and
//! gzip (Linux's default); an uncompressed payload is taken as it is. xz,
//! zstd, bzip2, lzma and lzo payloads are recognised and named, not
//! decompressed. Every length is checked against the file and the output is
//! capped at [`MAX_KERNEL_BYTES`]. Sans-IO: works on the image bytes.

use std::fmt;

use linux_loader::bootparam::setup_header;
use thiserror::Error;
use vm_memory::ByteValued;

/// The most a payload may decompress to: Debian's 6.1 kernel is 53 MB with
/// its relocations, so this leaves room for big kernels while a hostile
/// image cannot make twinvm allocate more.
pub const MAX_KERNEL_BYTES: usize = 512 << 20;

/// Where the setup header starts in the boot sector.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Where the boot protocol version sits in the boot sector.
const VERSION_OFFSET: usize = 0x206;
/// `payload_offset` and `payload_length` (u32 each) in the boot sector.
const PAYLOAD_FIELDS_OFFSET: usize = 0x248;
/// The first boot protocol with `payload_offset`/`payload_length`.
const PAYLOAD_PROTOCOL: u16 = 0x0208;

/// Magic of LZ4's legacy frame, the format Linux's `lz4 -l` payloads use.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Uncompressed size of every block of an LZ4 legacy frame but the last.
const LZ4_LEGACY_BLOCK_BYTES: usize = 8 << 20;
/// The most an LZ4 block of [`LZ4_LEGACY_BLOCK_BYTES`] can take compressed
/// (LZ4_COMPRESSBOUND).
const LZ4_LEGACY_MAX_BLOCK: usize = LZ4_LEGACY_BLOCK_BYTES + LZ4_LEGACY_BLOCK_BYTES / 255 + 16;

/// How a bzImage's payload is compressed, told by its first bytes as Linux's
/// decompressors tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    /// LZ4, legacy frame.
    Lz4,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
    Lzma,
    Lzo,
    /// No compression: the payload is the ELF (CONFIG_KERNEL_UNCOMPRESSED).
    None,
}

impl Compressor {
    /// The compressor whose magic `payload` starts with.
    pub fn detect(payload: &[u8]) -> Option<Compressor> {
        const MAGICS: [(&[u8], Compressor); 9] = [
            (&[0x02, 0x21, 0x4c, 0x18], Compressor::Lz4),
            (&[0x1f, 0x8b], Compressor::Gzip),
            (&[0x1f, 0x9e], Compressor::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compressor::Xz),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compressor::Zstd),
            (b"BZh", Compressor::Bzip2),
            (&[0x5d, 0x00, 0x00], Compressor::Lzma),
            (&[0x89, b'L', b'Z', b'O'], Compressor::Lzo),
            (b"\x7fELF", Compressor::None),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, c)| c)
    }

    /// Whether twinvm takes such a payload out itself.
    pub fn supported(self) -> bool {
        matches!(self, Compressor::Lz4 | Compressor::Gzip | Compressor::None)
    }
}

impl fmt::Display for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compressor::Lz4 => "LZ4",
            Compressor::Gzip => "gzip",
            Compressor::Xz => "xz",
            Compressor::Zstd => "zstd",
            Compressor::Bzip2 => "bzip2",
            Compressor::Lzma => "lzma",
            Compressor::Lzo => "lzo",
            Compressor::None => "uncompressed",
        })
    }
}

/// Why a bzImage's kernel could not be taken out.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BzImageError {
    /// No `HdrS` setup header, or a file too short to hold one.
    #[error("no complete bzImage setup header (`HdrS` at 0x202)")]
    NoSetupHeader,
    /// A boot protocol without the payload fields.
    #[error("boot protocol {0:#06x} has no payload_offset/payload_length (2.08 or later needed)")]
    OldProtocol(u16),
    /// The header places the payload outside the file.
    #[error("the setup header places the payload at {offset:#x} ({length} bytes), past the end of the file ({file_len} bytes)")]
    PayloadOutsideFile {
        offset: u64,
        length: u64,
        file_len: usize,
    },
    /// A compressor Linux knows and twinvm does not decompress.
    #[error("its payload is {0}-compressed; twinvm decompresses LZ4 and gzip payloads only")]
    UnsupportedCompressor(Compressor),
    /// No compressor's magic.
    #[error("its payload is in no format Linux decompresses (it starts {0:02x?})")]
    UnknownFormat(Vec<u8>),
    /// The payload announces more kernel than twinvm accepts.
    #[error("its {compressor} payload announces {claimed} bytes of kernel, more than the {} MiB twinvm decompresses", MAX_KERNEL_BYTES >> 20)]
    TooBig {
        compressor: Compressor,
        claimed: u64,
    },
    /// The compressed stream is damaged or cut short.
    #[error("its {compressor} payload is corrupt: {what}")]
    Corrupt {
        compressor: Compressor,
        what: String,
    },
    /// The payload decompressed, but to something other than an ELF.
    #[error("its {compressor} payload does not decompress to an ELF (it starts {start:02x?})")]
    NotElf {
        compressor: Compressor,
        start: Vec<u8>,
    },
}

impl BzImageError {
    /// The image is fine as far as twinvm can tell, only its payload's
    /// format is one twinvm does not decompress: such a kernel still boots
    /// through its own decompressor.
    pub fn is_unsupported_format(&self) -> bool {
        matches!(
            self,
            BzImageError::UnsupportedCompressor(_) | BzImageError::UnknownFormat(_)
        )
    }
}

/// The bzImage's setup header as the file has it.
pub fn read_setup_header(bzimage: &[u8]) -> Result<setup_header, BzImageError> {
    let end = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>();
    let bytes = bzimage
        .get(SETUP_HEADER_OFFSET..end)
        .ok_or(BzImageError::NoSetupHeader)?;
    let header = *setup_header::from_slice(bytes).ok_or(BzImageError::NoSetupHeader)?;
    if { header.header } != u32::from_le_bytes(*b"HdrS") {
        return Err(BzImageError::NoSetupHeader);
    }
    Ok(header)
}

/// The compressed payload of a bzImage and its compressor.
pub fn payload(bzimage: &[u8]) -> Result<(Compressor, &[u8]), BzImageError> {
    let header = read_setup_header(bzimage)?;
    let version = u16::from_le_bytes([bzimage[VERSION_OFFSET], bzimage[VERSION_OFFSET + 1]]);
    if version < PAYLOAD_PROTOCOL {
        return Err(BzImageError::OldProtocol(version));
    }
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let field = |at: usize| {
        u64::from(u32::from_le_bytes(
            bzimage[at..at + 4].try_into().expect("4 bytes"),
        ))
    };
    // payload_offset counts from the protected-mode code, after the setup sectors.
    let offset = (setup_sects + 1) * 512 + field(PAYLOAD_FIELDS_OFFSET);
    let length = field(PAYLOAD_FIELDS_OFFSET + 4);
    let outside = BzImageError::PayloadOutsideFile {
        offset,
        length,
        file_len: bzimage.len(),
    };
    let range = usize::try_from(offset).map_err(|_| outside.clone())?
        ..usize::try_from(offset + length).map_err(|_| outside.clone())?;
    let bytes = bzimage.get(range).ok_or(outside)?;
    match Compressor::detect(bytes) {
        Some(c) if c.supported() => Ok((c, bytes)),
        Some(c) => Err(BzImageError::UnsupportedCompressor(c)),
        None => Err(BzImageError::UnknownFormat(
            bytes.iter().take(8).copied().collect(),
        )),
    }
}

/// Take the kernel ELF out of a bzImage: locate the payload, decompress it,
/// check it is an ELF. Returns the compressor and the ELF (followed by
/// whatever Linux appended to it, its relocation table).
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<(Compressor, Vec<u8>), BzImageError> {
    let (compressor, bytes) = payload(bzimage)?;
    let kernel = match compressor {
        Compressor::Lz4 => unlz4_legacy(bytes)?,
        Compressor::Gzip => gunzip(bytes)?,
        Compressor::None if bytes.len() > MAX_KERNEL_BYTES => {
            return Err(BzImageError::TooBig {
                compressor,
                claimed: bytes.len() as u64,
            })
        }
        Compressor::None => bytes.to_vec(),
        other => return Err(BzImageError::UnsupportedCompressor(other)),
    };
    if !kernel.starts_with(b"\x7fELF") {
        return Err(BzImageError::NotElf {
            compressor,
            start: kernel.iter().take(8).copied().collect(),
        });
    }
    Ok((compressor, kernel))
}

/// Linux appends the decompressed size (u32, little-endian) to every
/// compressed payload; for gzip it is the stream's own ISIZE field. Returns
/// the bytes before it and the size, checked against the cap.
fn split_size_trailer(
    payload: &[u8],
    compressor: Compressor,
) -> Result<(&[u8], usize), BzImageError> {
    let cut = payload.len().checked_sub(4).ok_or(BzImageError::Corrupt {
        compressor,
        what: format!(
            "{} bytes cannot hold the 4-byte size trailer",
            payload.len()
        ),
    })?;
    let (body, trailer) = payload.split_at(cut);
    let size = u32::from_le_bytes(trailer.try_into().expect("4 bytes"));
    if size as usize > MAX_KERNEL_BYTES {
        return Err(BzImageError::TooBig {
            compressor,
            claimed: u64::from(size),
        });
    }
    Ok((body, size as usize))
}

/// Decompress an LZ4 legacy frame as Linux's `lib/decompress_unlz4.c` does
/// in the decompressor: the magic (repeatable), then blocks of { u32
/// compressed size, block }, each block 8 MiB decompressed except the last,
/// whose size follows from the size trailer.
pub fn unlz4_legacy(payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |what: String| BzImageError::Corrupt {
        compressor: Compressor::Lz4,
        what,
    };
    let (body, size) = split_size_trailer(payload, Compressor::Lz4)?;
    let u32_at = |at: usize| {
        body.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    if u32_at(0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(corrupt("no legacy frame magic 0x184c2102".into()));
    }
    let mut out = Vec::with_capacity(size);
    let mut at = 4;
    while at < body.len() {
        let header_at = at;
        let block_len = u32_at(at).ok_or_else(|| {
            corrupt(format!(
                "cut short in the block header at payload offset {header_at}"
            ))
        })?;
        at += 4;
        if block_len == LZ4_LEGACY_MAGIC {
            continue;
        }
        let block_len = block_len as usize;
        if block_len > LZ4_LEGACY_MAX_BLOCK {
            return Err(corrupt(format!(
                "the block at payload offset {header_at} claims {block_len} bytes, more than an 8 MiB block compresses to"
            )));
        }
        let block = body.get(at..at + block_len).ok_or_else(|| {
            corrupt(format!(
                "the block at payload offset {header_at} claims {block_len} bytes, {} remain",
                body.len() - at
            ))
        })?;
        let left = size - out.len();
        if left == 0 {
            return Err(corrupt(format!(
                "a block at payload offset {header_at} follows the {size} bytes the payload announces"
            )));
        }
        let expected = left.min(LZ4_LEGACY_BLOCK_BYTES);
        let start = out.len();
        out.resize(start + expected, 0);
        let produced = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| corrupt(format!("the block at payload offset {header_at}: {e}")))?;
        if produced != expected {
            return Err(corrupt(format!(
                "the block at payload offset {header_at} gives {produced} bytes, {expected} expected"
            )));
        }
        at += block_len;
    }
    if out.len() != size {
        return Err(corrupt(format!(
            "its blocks give {} bytes, the payload announces {size}",
            out.len()
        )));
    }
    Ok(out)
}

/// Decompress a gzip member (RFC 1952) whose last 8 bytes are its CRC-32
/// and size, as Linux's `gzip -n` payloads are.
pub fn gunzip(payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    const FHCRC: u8 = 0x02;
    const FEXTRA: u8 = 0x04;
    const FNAME: u8 = 0x08;
    const FCOMMENT: u8 = 0x10;
    const RESERVED: u8 = 0xe0;
    let corrupt = |what: String| BzImageError::Corrupt {
        compressor: Compressor::Gzip,
        what,
    };
    let cut_short = || corrupt("cut short in its header".into());
    let (before_size, size) = split_size_trailer(payload, Compressor::Gzip)?;
    let crc_at = before_size.len().checked_sub(4).ok_or_else(cut_short)?;
    let (stream, crc) = before_size.split_at(crc_at);
    let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let header = stream.get(..10).ok_or_else(cut_short)?;
    if header[2] != 8 {
        return Err(corrupt(format!(
            "compression method {} is not deflate (8)",
            header[2]
        )));
    }
    let flags = header[3];
    if flags & RESERVED != 0 {
        return Err(corrupt(format!("reserved header flags set ({flags:#04x})")));
    }
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let len = stream.get(at..at + 2).ok_or_else(cut_short)?;
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let nul = stream
                .get(at..)
                .and_then(|rest| rest.iter().position(|&b| b == 0))
                .ok_or_else(cut_short)?;
            at += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    let deflate = stream.get(at..).ok_or_else(cut_short)?;
    let out = miniz_oxide::inflate::decompress_to_vec_with_limit(deflate, size)
        .map_err(|e| corrupt(format!("inflating: {e}")))?;
    if out.len() != size {
        return Err(corrupt(format!(
            "it inflates to {} bytes, its trailer says {size}",
            out.len()
        )));
    }
    if crc32fast::hash(&out) != crc {
        return Err(corrupt("CRC-32 mismatch".into()));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An LZ4 legacy frame of `data` as `lz4 -l` writes it, with Linux's
    /// size trailer, in blocks of `block` bytes (8 MiB in real payloads).
    pub(crate) fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let compressed = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            out.extend_from_slice(&compressed);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    /// A gzip member of `data` as `gzip -n -9` writes it (no name, no time).
    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3];
        out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(data, 9));
        out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    /// A minimal bzImage (boot protocol 2.15, 64-bit entry, one setup
    /// sector) around `payload`.
    pub(crate) fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 1u8;
        let payload_offset = 0x100u32;
        let start = (usize::from(setup_sects) + 1) * 512;
        let mut img = vec![0u8; start + payload_offset as usize];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        img[0x236..0x238].copy_from_slice(&0x0003u16.to_le_bytes()); // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        img[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    fn entropy_elf() -> Vec<u8> {
        crate::guests::builtin("entropy")
            .expect("entropy guest")
            .to_vec()
    }

    #[test]
    fn lz4_payload_round_trips_byte_exactly() {
        let elf = entropy_elf();
        let (c, out) =
            extract_vmlinux(&bzimage(&lz4_legacy(&elf, LZ4_LEGACY_BLOCK_BYTES))).unwrap();
        assert_eq!(c, Compressor::Lz4);
        assert_eq!(out, elf);
    }

    #[test]
    fn lz4_payload_over_several_8mib_blocks_round_trips() {
        // An ELF header followed by 17 MiB of patterned bytes: three blocks.
        let mut data = entropy_elf();
        data.extend((0..17u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        let payload = lz4_legacy(&data, LZ4_LEGACY_BLOCK_BYTES);
        // Linux's frame may repeat the magic between blocks.
        let mut with_magic = payload[..4].to_vec();
        with_magic.extend_from_slice(&payload);
        for p in [payload, with_magic] {
            let (_, out) = extract_vmlinux(&bzimage(&p)).unwrap();
            assert!(out == data, "decompressed kernel differs");
        }
    }

    #[test]
    fn gzip_and_uncompressed_payloads_round_trip() {
        let elf = entropy_elf();
        let (c, out) = extract_vmlinux(&bzimage(&gzip(&elf))).unwrap();
        assert_eq!((c, &out), (Compressor::Gzip, &elf));
        // A header with a file name and an extra field.
        let mut named = gzip(&elf);
        named[3] = 0x04 | 0x08;
        let mut extra = vec![2, 0, b'x', b'y'];
        extra.extend_from_slice(b"vmlinux\0");
        named.splice(10..10, extra);
        assert_eq!(extract_vmlinux(&bzimage(&named)).unwrap().1, elf);
        let (c, out) = extract_vmlinux(&bzimage(&elf)).unwrap();
        assert_eq!((c, out), (Compressor::None, elf));
    }

    #[test]
    fn setup_header_values_are_read_from_the_file() {
        let img = bzimage(&lz4_legacy(&entropy_elf(), LZ4_LEGACY_BLOCK_BYTES));
        let h = read_setup_header(&img).unwrap();
        assert_eq!({ h.version }, 0x020f);
        assert_eq!({ h.initrd_addr_max }, 0x7fff_ffff);
        assert_eq!({ h.kernel_alignment }, 0x20_0000);
        assert_eq!({ h.xloadflags }, 3);
        assert_eq!(
            read_setup_header(&img[..0x250]),
            Err(BzImageError::NoSetupHeader)
        );
    }

    #[test]
    fn corrupt_and_truncated_lz4_payloads_are_named() {
        let elf = entropy_elf();
        let good = lz4_legacy(&elf, LZ4_LEGACY_BLOCK_BYTES);
        let err = |payload: &[u8]| extract_vmlinux(&bzimage(payload)).unwrap_err();
        let is_corrupt = |e: &BzImageError, needle: &str| matches!(e, BzImageError::Corrupt { compressor: Compressor::Lz4, what } if what.contains(needle));

        // Cut short: the block claims more than remains.
        let mut cut = good[..good.len() / 2].to_vec();
        cut.extend_from_slice(&good[good.len() - 4..]);
        let e = err(&cut);
        assert!(is_corrupt(&e, "remain"), "{e}");
        assert!(
            e.to_string().starts_with("its LZ4 payload is corrupt: "),
            "{e}"
        );

        // Garbage inside the block.
        let mut flipped = good.clone();
        for b in &mut flipped[8..40] {
            *b = 0xff;
        }
        let e = err(&flipped);
        assert!(matches!(e, BzImageError::Corrupt { .. }), "{e}");

        // The trailer announces more than the blocks give.
        let mut short = good.clone();
        let n = short.len();
        short[n - 4..].copy_from_slice(&(elf.len() as u32 + 1).to_le_bytes());
        let e = err(&short);
        assert!(is_corrupt(&e, "expected"), "{e}");

        // A block claiming more than 8 MiB compresses to.
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(is_corrupt(&err(&huge), "more than an 8 MiB block"));

        // Nothing but the magic and a partial block header.
        let e = unlz4_legacy(&[0x02, 0x21, 0x4c, 0x18, 1, 0, 9, 0, 0, 0]).unwrap_err();
        assert!(is_corrupt(&e, "cut short"), "{e}");
        assert!(matches!(
            unlz4_legacy(&[1, 2]),
            Err(BzImageError::Corrupt { .. })
        ));
    }

    #[test]
    fn oversized_claims_are_refused_before_decompressing() {
        let mut payload = lz4_legacy(&entropy_elf(), LZ4_LEGACY_BLOCK_BYTES);
        let n = payload.len();
        payload[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = extract_vmlinux(&bzimage(&payload)).unwrap_err();
        assert_eq!(
            e,
            BzImageError::TooBig {
                compressor: Compressor::Lz4,
                claimed: u64::from(u32::MAX)
            }
        );
        assert!(e.to_string().contains("more than the 512 MiB"), "{e}");
        let mut gz = gzip(&entropy_elf());
        let n = gz.len();
        gz[n - 4..].copy_from_slice(&(600u32 << 20).to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&bzimage(&gz)),
            Err(BzImageError::TooBig { .. })
        ));
    }

    #[test]
    fn corrupt_gzip_payloads_are_named() {
        let elf = entropy_elf();
        let good = gzip(&elf);
        let gz_err = |p: &[u8]| match extract_vmlinux(&bzimage(p)) {
            Err(BzImageError::Corrupt {
                compressor: Compressor::Gzip,
                what,
            }) => what,
            other => panic!("{other:?}"),
        };
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 1;
        assert_eq!(gz_err(&bad_crc), "CRC-32 mismatch");
        let mut cut = good[..good.len() / 2].to_vec();
        cut.extend_from_slice(&good[good.len() - 8..]);
        assert!(!gz_err(&cut).is_empty());
        let mut method = good.clone();
        method[2] = 7;
        assert!(gz_err(&method).contains("not deflate"));
        // Says it is shorter than it is: inflating stops at the cap.
        let mut long = good.clone();
        long[n - 4..].copy_from_slice(&(elf.len() as u32 - 1).to_le_bytes());
        assert!(gz_err(&long).starts_with("inflating"), "{}", gz_err(&long));
    }

    #[test]
    fn unsupported_and_unknown_formats_are_named() {
        for (magic, c) in [
            (&[0x28, 0xb5, 0x2f, 0xfd, 0, 0][..], Compressor::Zstd),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compressor::Xz),
            (b"BZh91AY", Compressor::Bzip2),
            (&[0x5d, 0, 0, 0x80, 0], Compressor::Lzma),
            (&[0x89, b'L', b'Z', b'O', 0, 0x0d], Compressor::Lzo),
        ] {
            let e = extract_vmlinux(&bzimage(magic)).unwrap_err();
            assert_eq!(e, BzImageError::UnsupportedCompressor(c));
            assert!(e.is_unsupported_format());
            assert!(e.to_string().contains(&format!("{c}-compressed")), "{e}");
        }
        let e = extract_vmlinux(&bzimage(b"garbage!")).unwrap_err();
        assert!(e.is_unsupported_format());
        assert!(
            e.to_string().contains("no format Linux decompresses"),
            "{e}"
        );
        // Decompresses, but not to an ELF.
        let e = extract_vmlinux(&bzimage(&lz4_legacy(b"not an elf", 1 << 20))).unwrap_err();
        assert!(matches!(e, BzImageError::NotElf { .. }), "{e}");
        assert!(!e.is_unsupported_format());
    }

    #[test]
    fn bad_setup_headers_are_named() {
        let good = bzimage(&lz4_legacy(&entropy_elf(), LZ4_LEGACY_BLOCK_BYTES));
        let mut old = good.clone();
        old[0x206..0x208].copy_from_slice(&0x0207u16.to_le_bytes());
        assert_eq!(payload(&old).unwrap_err(), BzImageError::OldProtocol(0x207));
        let mut past_end = good.clone();
        past_end[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = payload(&past_end).unwrap_err();
        assert!(
            matches!(e, BzImageError::PayloadOutsideFile { .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("past the end of the file"), "{e}");
        let cut = &good[..good.len() - 1];
        assert!(matches!(
            payload(cut),
            Err(BzImageError::PayloadOutsideFile { .. })
        ));
        assert_eq!(payload(&[0u8; 16]), Err(BzImageError::NoSetupHeader));
        let mut no_magic = good;
        no_magic[0x202] = b'X';
        assert_eq!(payload(&no_magic), Err(BzImageError::NoSetupHeader));
    }
}
