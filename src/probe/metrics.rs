//! Running totals of every probe the engine has run, for the Prometheus endpoint: counts by
//! strategy, verdict and replica, and histograms of commit-to-visible and read latency.
//! The engine records; the HTTP transport renders a [`MetricsSnapshot`].

use std::{collections::BTreeMap, sync::Mutex};

use super::{ProbeResult, millis};

/// Histogram bucket upper bounds, seconds (Prometheus' base unit).
pub const BUCKETS_SECONDS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0, 10.0, 30.0,
];

/// A cumulative-bucket histogram in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or below each bound of [`BUCKETS_SECONDS`].
    pub buckets: [u64; BUCKETS_SECONDS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, bucket) in BUCKETS_SECONDS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }
}

/// `(strategy, verdict, replica)`.
pub type ProbeKey = (String, &'static str, String);

/// Everything recorded so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    pub probes: BTreeMap<ProbeKey, u64>,
    /// Commit-to-visible by strategy.
    pub visible_after: BTreeMap<String, Histogram>,
    /// Read latency by strategy.
    pub read_latency: BTreeMap<String, Histogram>,
    /// lsn-wait fallbacks to the primary, by strategy.
    pub fallbacks: BTreeMap<String, u64>,
}

/// The engine's recorder.
#[derive(Debug, Default)]
pub struct ProbeMetrics {
    totals: Mutex<MetricsSnapshot>,
}

impl ProbeMetrics {
    pub fn record(&self, probe: &ProbeResult) {
        let strategy = probe.strategy.name().to_owned();
        let mut totals = self
            .totals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *totals
            .probes
            .entry((
                strategy.clone(),
                probe.verdict.name(),
                probe.replica.clone(),
            ))
            .or_default() += 1;
        if let Some(visible_after) = probe.visible_after {
            totals
                .visible_after
                .entry(strategy.clone())
                .or_default()
                .observe(millis(visible_after) / 1000.0);
        }
        if let Some(read_latency) = probe.read_latency {
            totals
                .read_latency
                .entry(strategy.clone())
                .or_default()
                .observe(millis(read_latency) / 1000.0);
        }
        if probe.served_by == Some(super::ServedBy::Fallback) {
            *totals.fallbacks.entry(strategy).or_default() += 1;
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        self.totals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let mut histogram = Histogram::default();
        for seconds in [0.0005, 0.02, 1.2, 100.0] {
            histogram.observe(seconds);
        }
        assert_eq!(histogram.count, 4);
        assert_eq!(histogram.buckets[0], 1); // <= 1 ms
        assert_eq!(histogram.buckets[3], 2); // <= 25 ms
        assert_eq!(histogram.buckets[9], 3); // <= 1.5 s
        assert_eq!(histogram.buckets[13], 3); // 100 s is above every bound
        assert!((histogram.sum_seconds - 101.2205).abs() < 1e-9);
    }
}
