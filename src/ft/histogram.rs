//! A fixed-size log-linear histogram of durations (output hold times).
//!
//! Values are bucketed by their power of two, each power split into 8 linear
//! sub-buckets, so a percentile is reported within 12.5% of the true value;
//! the maximum is exact. Memory is constant (504 counters) however many
//! values are recorded.

use std::time::Duration;

use serde::Serialize;

/// Values below this are counted exactly, one bucket each.
const LINEAR: u64 = 16;
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets for every u64: 16 exact ones, then 8 per power of two from 2^4 to 2^63.
const BUCKETS: usize = LINEAR as usize + (64 - 4) * SUB as usize;

/// What `twinvm status` shows about a histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone)]
pub struct DurationHistogram {
    counts: Box<[u64; BUCKETS]>,
    count: u64,
    max_ns: u64,
}

impl Default for DurationHistogram {
    fn default() -> Self {
        DurationHistogram {
            counts: Box::new([0; BUCKETS]),
            count: 0,
            max_ns: 0,
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < LINEAR {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros(); // >= 4
    let sub = (ns >> (exp - SUB_BITS)) & (SUB - 1);
    LINEAR as usize + (exp as usize - 4) * SUB as usize + sub as usize
}

/// Largest value that falls in bucket `index`.
fn bucket_upper(index: usize) -> u64 {
    if index < LINEAR as usize {
        return index as u64;
    }
    let exp = (index - LINEAR as usize) as u32 / SUB as u32 + 4;
    let sub = (index - LINEAR as usize) as u64 % SUB;
    let width = 1u64 << (exp - SUB_BITS);
    // (SUB + sub + 1) * width - 1 overflows only for the very last bucket.
    (SUB + sub + 1)
        .checked_mul(width)
        .map_or(u64::MAX, |v| v - 1)
}

impl DurationHistogram {
    pub fn record(&mut self, value: Duration) {
        let ns = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns)] += 1;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value below which a fraction `q` (0..=1) of the recorded values
    /// fall, rounded up to its bucket's upper edge and never above the max.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_nanos(bucket_upper(index).min(self.max_ns));
            }
        }
        Duration::from_nanos(self.max_ns)
    }

    pub fn percentiles(&self) -> Percentiles {
        Percentiles {
            count: self.count,
            p50: self.quantile(0.50),
            p99: self.quantile(0.99),
            max: Duration::from_nanos(self.max_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u64() {
        let mut expected_next = 0u64;
        for index in 0..BUCKETS {
            let upper = bucket_upper(index);
            assert_eq!(bucket_of(expected_next), index, "lower edge of {index}");
            assert_eq!(bucket_of(upper), index, "upper edge of {index}");
            if upper == u64::MAX {
                assert_eq!(index, BUCKETS - 1);
                return;
            }
            expected_next = upper + 1;
        }
        panic!("the last bucket does not reach u64::MAX");
    }

    #[test]
    fn percentiles_are_within_an_eighth() {
        let mut h = DurationHistogram::default();
        // 1..=1000 microseconds, uniformly.
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p = h.percentiles();
        assert_eq!(p.count, 1000);
        assert_eq!(p.max, Duration::from_micros(1000));
        let p50 = p.p50.as_nanos() as f64;
        let p99 = p.p99.as_nanos() as f64;
        assert!((500_000.0..=500_000.0 * 1.125).contains(&p50), "{p50}");
        assert!((990_000.0..=1_000_000.0).contains(&p99), "{p99}");
    }

    #[test]
    fn empty_and_single_values() {
        let mut h = DurationHistogram::default();
        assert_eq!(h.percentiles(), Percentiles::default());
        h.record(Duration::from_nanos(7));
        assert_eq!(h.quantile(0.5), Duration::from_nanos(7));
        h.record(Duration::MAX);
        assert_eq!(h.quantile(1.0), Duration::from_nanos(u64::MAX));
    }
}
