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

/// Unchanged bytes between two changed stretches that are sent as part of
/// one run rather than starting a new one (a run costs ~2 bytes).
const MERGE_GAP: usize = 2;

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
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

/// The first offset at or after `pos` where `base` and `new` differ (their
/// length if none), a word at a time over equal stretches.
fn next_difference(base: &[u8], new: &[u8], mut pos: usize) -> usize {
    let n = base.len();
    // 32 bytes a step over long equal stretches (a page mostly unchanged).
    while pos + 32 <= n {
        let a: &[u8; 32] = base[pos..pos + 32].try_into().unwrap();
        let b: &[u8; 32] = new[pos..pos + 32].try_into().unwrap();
        if a != b {
            break;
        }
        pos += 32;
    }
    while pos + 8 <= n {
        let a = u64::from_le_bytes(base[pos..pos + 8].try_into().unwrap());
        let b = u64::from_le_bytes(new[pos..pos + 8].try_into().unwrap());
        let x = a ^ b;
        if x != 0 {
            return pos + (x.trailing_zeros() / 8) as usize;
        }
        pos += 8;
    }
    while pos < n && base[pos] == new[pos] {
        pos += 1;
    }
    pos
}

/// Append `new` as runs against `base` (the same length) to `out`; None,
/// with `out` unchanged, when the runs would take `limit` bytes or more
/// (the caller then sends `new` some other way).
pub(super) fn encode_runs(base: &[u8], new: &[u8], limit: usize, out: &mut Vec<u8>) -> Option<()> {
    debug_assert_eq!(base.len(), new.len());
    let n = base.len().min(new.len());
    let (base, new) = (&base[..n], &new[..n]);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut pos = next_difference(base, new, 0);
    let mut bytes = 0;
    while pos < n {
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
        // Two varints of up to two bytes each, and the bytes.
        bytes += 4 + pos - start;
        if bytes + 8 >= limit {
            return None;
        }
        pos = next_difference(base, new, pos);
    }
    put_varint(out, runs.len() as u64);
    let mut end = 0;
    for (start, stop) in runs {
        put_varint(out, (start - end) as u64);
        put_varint(out, (stop - start) as u64);
        out.extend(
            base[start..stop]
                .iter()
                .zip(&new[start..stop])
                .map(|(a, b)| a ^ b),
        );
        end = stop;
    }
    Some(())
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
    use super::*;

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
