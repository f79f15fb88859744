//! Sparse XOR deltas between two byte strings of one length, sans-IO: how
//! sync points send a page against its cached version (`pages.rs`) and the
//! vCPU state against the previous sync point's (`cpu_state.rs`).
//!
//! Layout (docs/log-format.md): `varint runs`, then per run `varint skip`
//! (bytes unchanged since the end of the previous run; the first run: since
//! offset 0), `varint len` (at least 1; the run ends inside the string) and
//! `len` bytes of the new string XOR the base over the run. Varints are
//! LEB128: 7 bits a byte, low first, at most 10 bytes.

use super::codec::Dec;

pub(super) fn put_varint(out: &mut Vec<u8>, v: u64) {
    let (bytes, len) = varint_bytes(v);
    out.extend_from_slice(&bytes[..len]);
}

/// `v` as a varint in a buffer: the bytes and how many.
fn varint_bytes(mut v: u64) -> ([u8; 10], usize) {
    let mut bytes = [0u8; 10];
    let mut len = 0;
    while v >= 0x80 {
        bytes[len] = v as u8 | 0x80;
        v >>= 7;
        len += 1;
    }
    bytes[len] = v as u8;
    (bytes, len + 1)
}

pub(super) fn read_varint(d: &mut Dec) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let b = d.u8()?;
        if shift == 63 && b > 1 {
            return Err("a varint overflows 64 bits".to_string());
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a varint longer than 10 bytes".to_string())
}

/// Bit k set: byte k of `x` is not zero.
fn nonzero_bytes(x: u64) -> u64 {
    let mut t = x | (x >> 4);
    t |= t >> 2;
    t |= t >> 1;
    // Gather bit 0 of each byte into the top byte, then bring it down.
    (t & 0x0101_0101_0101_0101).wrapping_mul(0x0102_0408_1020_4080) >> 56
}

/// Words of difference bits a page's delta needs on the stack.
const STACK_BIT_WORDS: usize = super::PAGE_SIZE / 64 + 2;

/// Set the bit of each byte where `base` and `new` differ in `bits` (one
/// bit a byte, 64 to a word, zeroed by the caller, at least two words more
/// than the bytes need: run ends look two bytes ahead). An equal 64-byte
/// block, most of a page a sync point carries, costs one compare
/// (docs/benchmarks.md, "sync-point CPU").
fn difference_bits(base: &[u8], new: &[u8], bits: &mut [u64]) {
    let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().unwrap());
    let blocks = base.chunks_exact(64).zip(new.chunks_exact(64));
    for ((a, b), bits) in blocks.zip(bits.iter_mut()) {
        let words = || a.chunks_exact(8).zip(b.chunks_exact(8));
        // The OR of the block's word XORs, without an early exit, stays
        // in vector registers (cheaper than a call to compare the block).
        if words().fold(0, |acc, (a, b)| acc | (word(a) ^ word(b))) != 0 {
            *bits = words().enumerate().fold(0, |acc, (k, (a, b))| {
                acc | nonzero_bytes(word(a) ^ word(b)) << (8 * k)
            });
        }
    }
    for i in base.len() / 64 * 64..base.len() {
        if base[i] != new[i] {
            bits[i / 64] |= 1 << (i % 64);
        }
    }
}

/// The first set bit at or after `from` of the bit string whose word `i`
/// is `word(i)`, among `words` words.
#[inline(always)]
fn next_set_bit(words: usize, from: usize, word: impl Fn(usize) -> u64) -> Option<usize> {
    let mut i = from / 64;
    if i >= words {
        return None;
    }
    let mut w = word(i) & (u64::MAX << (from % 64));
    loop {
        if w != 0 {
            return Some(i * 64 + w.trailing_zeros() as usize);
        }
        i += 1;
        if i >= words {
            return None;
        }
        w = word(i);
    }
}

/// Append `new` as runs against `base` (the same length) to `out` and
/// return how many runs that took (0: equal); None, with `out` unchanged,
/// when the runs would take `limit` bytes or more (the caller then sends
/// `new` some other way).
///
/// A run starts at a differing byte and takes in gaps of up to two equal
/// bytes between differing ones (a run costs ~2 bytes); it ends before
/// three equal bytes, or before equal bytes that reach the end.
pub(super) fn encode_runs(
    base: &[u8],
    new: &[u8],
    limit: usize,
    out: &mut Vec<u8>,
) -> Option<usize> {
    debug_assert_eq!(base.len(), new.len());
    let n = base.len().min(new.len());
    let (base, new) = (&base[..n], &new[..n]);
    let words = n / 64 + 2;
    let mut stack = [0u64; STACK_BIT_WORDS];
    let mut heap = Vec::new();
    let differ: &mut [u64] = if words <= STACK_BIT_WORDS {
        &mut stack[..words]
    } else {
        heap.resize(words, 0);
        &mut heap
    };
    difference_bits(base, new, differ);
    let differ: &[u64] = differ;
    // Bit p set: bytes p, p+1 and p+2 are equal (past the end counts as
    // equal), so a run reaching p ends there.
    let ends = |i: usize| {
        let equal = |j: usize| !differ.get(j).copied().unwrap_or(0);
        let (here, next) = (equal(i), equal(i + 1));
        here & (here >> 1 | next << 63) & (here >> 2 | next << 62)
    };
    let at = out.len();
    // The runs are written as they are found, after room for their count
    // (put in place at the end), so no list of them is built first.
    const COUNT_ROOM: usize = 2;
    out.extend_from_slice(&[0; COUNT_ROOM]);
    let mut runs = 0usize;
    let mut end = 0;
    let mut bytes = 0;
    while let Some(start) = next_set_bit(words, end, |i| differ[i]).filter(|&s| s < n) {
        // Every bit from n on is set in `ends`, so a run always ends.
        let stop = next_set_bit(words, start + 1, ends).unwrap_or(n).min(n);
        // Two varints of up to two bytes each, and the bytes: the estimate
        // that decides "too large", whatever the varints take.
        bytes += 4 + stop - start;
        if bytes + 8 >= limit {
            out.truncate(at);
            return None;
        }
        put_varint(out, (start - end) as u64);
        put_varint(out, (stop - start) as u64);
        out.extend(
            base[start..stop]
                .iter()
                .zip(&new[start..stop])
                .map(|(a, b)| a ^ b),
        );
        runs += 1;
        end = stop;
    }
    let (count, len) = varint_bytes(runs as u64);
    out.splice(at..at + COUNT_ROOM, count[..len].iter().copied());
    Some(runs)
}

/// Read runs from `d` and XOR them into `target` (which holds the base).
/// Fewer than `min_runs` runs, more runs than `target` has bytes, an empty
/// run or one outside `target` is an error.
pub(super) fn apply_runs(d: &mut Dec, target: &mut [u8], min_runs: u64) -> Result<(), String> {
    let runs = read_varint(d)?;
    if runs < min_runs || runs > target.len() as u64 {
        return Err(format!("{runs} runs"));
    }
    let mut pos = 0u64;
    for _ in 0..runs {
        let skip = read_varint(d)?;
        let len = read_varint(d)?;
        let start = pos.saturating_add(skip);
        let end = start.saturating_add(len);
        if len == 0 || end > target.len() as u64 {
            return Err(format!(
                "a run of {len} bytes at offset {start} does not fit in {} bytes",
                target.len()
            ));
        }
        let bytes = d.take(len as usize)?;
        for (p, x) in target[start as usize..end as usize].iter_mut().zip(bytes) {
            *p ^= x;
        }
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Equal bytes a run takes in between differing ones.
    const MERGE_GAP: usize = 2;

    /// The plain encoding, a byte at a time with a list of runs: what
    /// `encode_runs` must write byte for byte (a log's bytes do not depend
    /// on how fast they were found).
    fn plain_runs(base: &[u8], new: &[u8], limit: usize) -> Option<Vec<u8>> {
        let n = base.len();
        let mut runs = Vec::new();
        let mut pos = 0;
        let mut bytes = 0;
        while pos < n {
            if base[pos] == new[pos] {
                pos += 1;
                continue;
            }
            let start = pos;
            loop {
                while pos < n && base[pos] != new[pos] {
                    pos += 1;
                }
                let gap = (pos..n.min(pos + MERGE_GAP + 1))
                    .take_while(|&i| base[i] == new[i])
                    .count();
                if gap <= MERGE_GAP && pos + gap < n {
                    pos += gap;
                } else {
                    break;
                }
            }
            runs.push((start, pos));
            bytes += 4 + pos - start;
            if bytes + 8 >= limit {
                return None;
            }
        }
        let mut out = Vec::new();
        put_varint(&mut out, runs.len() as u64);
        let mut end = 0;
        for (start, stop) in runs {
            put_varint(&mut out, (start - end) as u64);
            put_varint(&mut out, (stop - start) as u64);
            out.extend((start..stop).map(|i| base[i] ^ new[i]));
            end = stop;
        }
        Some(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Sparse and dense changes, at any length and limit: the same
        /// bytes and the same "too large" as the plain encoding, after
        /// whatever the output held.
        #[test]
        fn runs_are_the_plain_encoding(
            seed in any::<u64>(),
            len in prop_oneof![0usize..300, Just(4096usize), Just(5000usize)],
            changes in prop::collection::vec((any::<u16>(), 1u8..=255, 1usize..70), 0..60),
            limit in prop_oneof![Just(usize::MAX), 0usize..5000],
            prefix in prop::collection::vec(any::<u8>(), 0..3),
        ) {
            let base: Vec<u8> = (0..len)
                .map(|i| (seed.rotate_left((i % 64) as u32) as u8) ^ (i as u8))
                .collect();
            let mut new = base.clone();
            for (at, x, span) in changes {
                if len == 0 {
                    break;
                }
                let at = at as usize % len;
                for b in &mut new[at..(at + span).min(len)] {
                    *b ^= x;
                }
            }
            let mut out = prefix.clone();
            let runs = encode_runs(&base, &new, limit, &mut out);
            match plain_runs(&base, &new, limit) {
                Some(expected) => {
                    prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
                    prop_assert_eq!(&out[prefix.len()..], &expected[..]);
                    let mut d = Dec(&expected);
                    prop_assert_eq!(runs, Some(read_varint(&mut d).unwrap() as usize));
                    prop_assert_eq!(runs == Some(0), base == new);
                }
                None => {
                    prop_assert_eq!(runs, None);
                    prop_assert_eq!(out, prefix);
                }
            }
        }

        /// Any pattern of differing bytes (gaps of every length near the
        /// merge rule's, at block and word edges, at the end).
        #[test]
        fn any_difference_pattern_is_the_plain_encoding(
            pattern in prop::collection::vec(any::<bool>(), 0..200),
            offset in 0usize..130,
        ) {
            let n = offset + pattern.len();
            let base = vec![0x33u8; n];
            let mut new = base.clone();
            for (i, differs) in pattern.iter().enumerate() {
                if *differs {
                    new[offset + i] = 0x7c;
                }
            }
            let mut out = Vec::new();
            encode_runs(&base, &new, usize::MAX, &mut out);
            prop_assert_eq!(Some(out), plain_runs(&base, &new, usize::MAX));
        }
    }

    fn round_trip(base: &[u8], new: &[u8]) -> Option<usize> {
        let mut out = Vec::new();
        encode_runs(base, new, usize::MAX, &mut out)?;
        let mut d = Dec(&out);
        let mut got = base.to_vec();
        apply_runs(&mut d, &mut got, 0).unwrap();
        d.finish().unwrap();
        assert_eq!(got, new);
        Some(out.len())
    }

    #[test]
    fn runs_round_trip_at_any_length_and_offset() {
        for n in [0usize, 1, 7, 8, 9, 100, 4096, 5557] {
            let base: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            assert_eq!(round_trip(&base, &base), Some(1), "equal, {n} bytes");
            for at in [0, n / 3, n.saturating_sub(1)] {
                if at >= n {
                    continue;
                }
                let mut new = base.clone();
                new[at] ^= 0x5a;
                if at + 3 < n {
                    new[at + 3] ^= 1; // merged into the run (gap of 2)
                }
                assert!(round_trip(&base, &new).unwrap() <= 8, "{n} bytes at {at}");
            }
        }
    }

    #[test]
    fn a_delta_past_its_limit_is_not_written() {
        let base = vec![0u8; 64];
        let new = vec![1u8; 64];
        let mut out = vec![9];
        assert!(encode_runs(&base, &new, 64, &mut out).is_none());
        assert_eq!(out, [9]);
    }

    #[test]
    fn bad_runs_are_errors() {
        let mut target = vec![0u8; 16];
        // One run of 4 bytes at offset 14.
        let bytes = [1, 14, 4, 1, 2, 3, 4];
        let err = apply_runs(&mut Dec(&bytes), &mut target, 0).unwrap_err();
        assert!(err.contains("does not fit in 16 bytes"), "{err}");
        let err = apply_runs(&mut Dec(&[0]), &mut target, 1).unwrap_err();
        assert!(err.contains("0 runs"), "{err}");
        let err = apply_runs(&mut Dec(&[1, 0, 0]), &mut target, 0).unwrap_err();
        assert!(err.contains("run of 0 bytes"), "{err}");
        let err = apply_runs(&mut Dec(&[1, 0, 4, 1]), &mut target, 0).unwrap_err();
        assert!(err.contains("ends"), "{err}");
    }
}
