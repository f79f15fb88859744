//! KVM's own per-vCPU counters, read through its binary statistics file
//! (`KVM_GET_STATS_FD`, Linux 5.14+). twinvm reads one: `insn_emulation`,
//! the instructions KVM's emulator ran for the guest. On the development
//! hosts (nested KVM with shadow paging, ../shared/host-notes.md) the guest
//! kernel's code runs almost wholly through that emulator, so the count is
//! the measure of a Linux run's cost that record, replay and a plain run
//! can be compared by (docs/benchmarks.md).
//!
//! The file starts with a header locating an id string, descriptors (each
//! a fixed part and a name of the header's `name_size` bytes) and the data
//! block; a descriptor names a statistic and its offset in the data block.
//! The parsing is sans-IO ([`find_counter`]); [`KvmCounter`] reads the
//! value at that offset with `pread`, so each read is current.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Bytes of `struct kvm_stats_header`.
const HEADER_BYTES: usize = 24;
/// Bytes of `struct kvm_stats_desc` before its name.
const DESC_FIXED_BYTES: usize = 16;
/// Descriptors a statistics file may announce before it is called absurd
/// (KVM has well under a hundred per vCPU).
const MAX_DESCRIPTORS: usize = 4096;
/// Longest statistic name KVM uses is 48 bytes (`KVM_STATS_NAME_SIZE`).
const MAX_NAME_BYTES: usize = 256;

/// The counter KVM increments for each instruction its emulator runs.
pub const EMULATED_INSTRUCTIONS: &str = "insn_emulation";

/// Where the header says the descriptors are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsHeader {
    pub name_size: usize,
    pub num_desc: usize,
    pub desc_offset: u64,
    pub data_offset: u64,
}

impl StatsHeader {
    /// Bytes the descriptors take from `desc_offset`.
    pub fn descriptors_len(&self) -> usize {
        self.num_desc * (DESC_FIXED_BYTES + self.name_size)
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

/// Parse the header; a header that could not have come from KVM is an
/// error saying what is wrong with it.
pub fn parse_header(bytes: &[u8]) -> Result<StatsHeader, String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!(
            "statistics header is {} bytes, not {HEADER_BYTES}",
            bytes.len()
        ));
    }
    let header = StatsHeader {
        name_size: u32_at(bytes, 4) as usize,
        num_desc: u32_at(bytes, 8) as usize,
        desc_offset: u64::from(u32_at(bytes, 16)),
        data_offset: u64::from(u32_at(bytes, 20)),
    };
    if header.name_size == 0 || header.name_size > MAX_NAME_BYTES {
        return Err(format!("statistic names of {} bytes", header.name_size));
    }
    if header.num_desc > MAX_DESCRIPTORS {
        return Err(format!("{} statistics announced", header.num_desc));
    }
    Ok(header)
}

/// The byte offset in the file of the 64-bit counter called `name`, from
/// the header and its descriptors; None if there is no such counter.
pub fn find_counter(header: &StatsHeader, descriptors: &[u8], name: &str) -> Option<u64> {
    let stride = DESC_FIXED_BYTES + header.name_size;
    descriptors
        .chunks_exact(stride)
        .take(header.num_desc)
        .find(|desc| {
            let raw = &desc[DESC_FIXED_BYTES..];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            &raw[..end] == name.as_bytes()
        })
        .map(|desc| header.data_offset + u64::from(u32_at(desc, 8)))
}

/// One of KVM's counters for a vCPU, read when asked.
#[derive(Debug)]
pub struct KvmCounter {
    file: File,
    offset: u64,
}

impl KvmCounter {
    /// The counter `name` in the statistics file `file` (from
    /// [`crate::vmm::sys::vcpu_stats_file`]).
    pub fn open(file: File, name: &str) -> io::Result<Self> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let mut head = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut head, 0)?;
        let header = parse_header(&head).map_err(invalid)?;
        let mut descriptors = vec![0u8; header.descriptors_len()];
        file.read_exact_at(&mut descriptors, header.desc_offset)?;
        let offset = find_counter(&header, &descriptors, name)
            .ok_or_else(|| invalid(format!("KVM keeps no `{name}` counter here")))?;
        Ok(KvmCounter { file, offset })
    }

    /// The counter's value now.
    pub fn read(&self) -> io::Result<u64> {
        let mut value = [0u8; 8];
        self.file.read_exact_at(&mut value, self.offset)?;
        Ok(u64::from_le_bytes(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics file laid out as KVM lays it out: header, id, then
    /// descriptors, then data.
    fn stats_file(name_size: usize, stats: &[(&str, u64)]) -> Vec<u8> {
        let id_offset = HEADER_BYTES;
        let desc_offset = id_offset + name_size;
        let data_offset = desc_offset + stats.len() * (DESC_FIXED_BYTES + name_size);
        let mut out = Vec::new();
        for v in [
            0u32,
            name_size as u32,
            stats.len() as u32,
            id_offset as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.resize(desc_offset, 0);
        for (i, (name, _)) in stats.iter().enumerate() {
            out.extend_from_slice(&0u32.to_le_bytes()); // flags
            out.extend_from_slice(&0i16.to_le_bytes()); // exponent
            out.extend_from_slice(&1u16.to_le_bytes()); // size: one u64
            out.extend_from_slice(&((i * 8) as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes()); // bucket size
            let mut field = name.as_bytes().to_vec();
            field.resize(name_size, 0);
            out.extend_from_slice(&field);
        }
        for (_, value) in stats {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out
    }

    fn lookup(file: &[u8], name: &str) -> Option<u64> {
        let header = parse_header(file).unwrap();
        let start = header.desc_offset as usize;
        let descriptors = &file[start..start + header.descriptors_len()];
        find_counter(&header, descriptors, name).map(|at| {
            let at = at as usize;
            u64::from_le_bytes(file[at..at + 8].try_into().unwrap())
        })
    }

    #[test]
    fn a_named_counter_is_found_and_read_at_its_offset() {
        let file = stats_file(
            48,
            &[("exits", 7), ("insn_emulation", 123_456), ("halt_exits", 9)],
        );
        assert_eq!(lookup(&file, EMULATED_INSTRUCTIONS), Some(123_456));
        assert_eq!(lookup(&file, "exits"), Some(7));
        assert_eq!(lookup(&file, "halt_exits"), Some(9));
    }

    #[test]
    fn a_missing_counter_or_a_name_prefix_is_none() {
        let file = stats_file(48, &[("insn_emulation_fail", 1), ("exits", 2)]);
        assert_eq!(lookup(&file, EMULATED_INSTRUCTIONS), None);
        assert_eq!(lookup(&file, "exit"), None);
    }

    #[test]
    fn impossible_headers_are_errors() {
        assert!(parse_header(&[0u8; 10]).unwrap_err().contains("10 bytes"));
        let mut file = stats_file(48, &[("exits", 2)]);
        file[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse_header(&file)
            .unwrap_err()
            .contains("names of 0 bytes"));
        let mut file = stats_file(48, &[("exits", 2)]);
        file[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_header(&file)
            .unwrap_err()
            .contains("statistics announced"));
    }

    #[test]
    fn descriptors_cut_short_find_nothing_past_their_end() {
        let file = stats_file(48, &[("exits", 2), ("insn_emulation", 3)]);
        let header = parse_header(&file).unwrap();
        let start = header.desc_offset as usize;
        let first_only = &file[start..start + DESC_FIXED_BYTES + 48];
        assert_eq!(
            find_counter(&header, first_only, EMULATED_INSTRUCTIONS),
            None
        );
    }
}
