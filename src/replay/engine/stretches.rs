//! How long the vCPU ran between landmarks (host wall time inside KVM_RUN),
//! bucketed by length: where a replay spends its time executing, and which
//! stretches a sync point could have let it skip.

use std::time::Duration;

/// Upper bounds of the buckets; the last bucket holds everything longer.
const STRETCH_BOUNDS: [Duration; 4] = [
    Duration::from_micros(100),
    Duration::from_millis(1),
    Duration::from_millis(4),
    Duration::from_millis(16),
];

/// Count and total time of the stretches in one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StretchBucket {
    pub count: u64,
    pub time: Duration,
}

/// Stretches by how they ended: at an exit (both replicas execute it) or
/// at a sync point (the backup loads the primary's state instead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StretchLengths {
    pub to_exit: [StretchBucket; STRETCH_BOUNDS.len() + 1],
    pub to_sync_point: [StretchBucket; STRETCH_BOUNDS.len() + 1],
}

impl StretchLengths {
    pub fn add(&mut self, length: Duration, ended_at_sync_point: bool) {
        let index = STRETCH_BOUNDS
            .iter()
            .position(|bound| length < *bound)
            .unwrap_or(STRETCH_BOUNDS.len());
        let buckets = if ended_at_sync_point {
            &mut self.to_sync_point
        } else {
            &mut self.to_exit
        };
        buckets[index].count += 1;
        buckets[index].time += length;
    }

    /// Both kinds of ending, for `--stats` and the Linux bench row.
    pub fn summary(&self) -> String {
        format!(
            "ending at an exit {}; ending at a sync point {}",
            Self::describe(&self.to_exit),
            Self::describe(&self.to_sync_point)
        )
    }

    /// `<0.1ms:N/T.Ts <1ms:... >=16ms:...` for one kind of ending.
    fn describe(buckets: &[StretchBucket]) -> String {
        let ms = |bound: &Duration| bound.as_micros() as f64 / 1000.0;
        let last = STRETCH_BOUNDS.last().map(ms).unwrap_or(0.0);
        let labels = STRETCH_BOUNDS
            .iter()
            .map(|bound| format!("<{}ms", ms(bound)))
            .chain(std::iter::once(format!(">={last}ms")));
        labels
            .zip(buckets)
            .map(|(label, b)| format!("{label}:{}/{:.1}s", b.count, b.time.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stretches_land_in_the_bucket_of_their_length_and_ending() {
        let mut s = StretchLengths::default();
        s.add(Duration::from_micros(99), false);
        s.add(Duration::from_micros(100), false);
        s.add(Duration::from_millis(5), true);
        s.add(Duration::from_millis(16), false);
        s.add(Duration::from_secs(1), false);
        assert_eq!(s.to_exit[0].count, 1);
        assert_eq!(s.to_exit[1].count, 1);
        assert_eq!(s.to_exit[4].count, 2);
        assert_eq!(s.to_exit[4].time, Duration::from_millis(1016));
        assert_eq!(s.to_sync_point[3].count, 1);
        assert_eq!(s.to_sync_point[3].time, Duration::from_millis(5));
        assert_eq!(
            StretchLengths::describe(&s.to_sync_point),
            "<0.1ms:0/0.0s <1ms:0/0.0s <4ms:0/0.0s <16ms:1/0.0s >=16ms:0/0.0s"
        );
        assert!(s.summary().starts_with("ending at an exit <0.1ms:1/0.0s "));
        assert!(s.summary().ends_with("; ending at a sync point <0.1ms:0/0.0s <1ms:0/0.0s <4ms:0/0.0s <16ms:1/0.0s >=16ms:0/0.0s"));
    }
}
