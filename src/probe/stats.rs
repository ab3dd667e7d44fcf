//! Statistics over a run's probes: verdict counts and commit-to-visible percentiles.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{ProbeResult, Verdict, millis};

/// Counts and commit-to-visible percentiles (ms) over a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunSummary {
    pub probe_count: u32,
    pub fresh_count: u32,
    pub stale_count: u32,
    pub replica_error_count: u32,
    pub visibility_timeout_count: u32,
    /// stale / (fresh + stale); 0 when no read succeeded.
    pub stale_ratio: f64,
    pub visible_after_p50_ms: f64,
    pub visible_after_p90_ms: f64,
    pub visible_after_p99_ms: f64,
    pub visible_after_max_ms: f64,
    pub lsn_gap_max_bytes: u64,
    pub elapsed_ms: f64,
}

/// Microsecond histogram up to an hour, 3 significant digits: 0.1% error, which keeps a
/// 1000 ms delay readable to the millisecond.
fn microsecond_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

impl RunSummary {
    pub fn of(probes: &[ProbeResult], elapsed: Duration) -> Self {
        let count = |verdict| {
            probes
                .iter()
                .filter(|probe| probe.verdict == verdict)
                .count() as u32
        };
        let fresh_count = count(Verdict::Fresh);
        let stale_count = count(Verdict::Stale);
        let judged = fresh_count + stale_count;

        let mut visible_after = microsecond_histogram();
        for probe in probes {
            if let Some(duration) = probe.visible_after {
                visible_after.saturating_record(duration.as_micros().max(1) as u64);
            }
        }
        let percentile_ms = |quantile: f64| {
            if visible_after.is_empty() {
                0.0
            } else {
                millis(Duration::from_micros(
                    visible_after.value_at_quantile(quantile),
                ))
            }
        };

        RunSummary {
            probe_count: probes.len() as u32,
            fresh_count,
            stale_count,
            replica_error_count: count(Verdict::ReplicaError),
            visibility_timeout_count: probes.iter().filter(|p| p.visibility_timed_out).count()
                as u32,
            stale_ratio: if judged == 0 {
                0.0
            } else {
                f64::from(stale_count) / f64::from(judged)
            },
            visible_after_p50_ms: percentile_ms(0.5),
            visible_after_p90_ms: percentile_ms(0.9),
            visible_after_p99_ms: percentile_ms(0.99),
            visible_after_max_ms: probes
                .iter()
                .filter_map(|probe| probe.visible_after)
                .max()
                .map_or(0.0, millis),
            lsn_gap_max_bytes: probes
                .iter()
                .filter_map(|p| p.lsn_gap_bytes)
                .max()
                .unwrap_or(0),
            elapsed_ms: millis(elapsed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn probe(verdict: Verdict, visible_after_ms: Option<u64>) -> ProbeResult {
        ProbeResult {
            token: "t".into(),
            written_value: "v".into(),
            read_value: None,
            verdict,
            commit_lsn: Lsn(10),
            replica_replay_lsn: None,
            lsn_gap_bytes: Some(7),
            replay_timestamp_lag_ms: None,
            write_latency: Duration::from_millis(1),
            read_latency: None,
            visible_after: visible_after_ms.map(Duration::from_millis),
            still_stale_at: None,
            visibility_timed_out: visible_after_ms.is_none() && verdict == Verdict::Stale,
            replica_reads: 1,
            error: None,
        }
    }

    #[test]
    fn counts_and_percentiles() {
        let mut probes: Vec<_> = (1..=100)
            .map(|ms| probe(Verdict::Stale, Some(ms * 10)))
            .collect();
        probes.push(probe(Verdict::Fresh, Some(1)));
        probes.push(probe(Verdict::ReplicaError, None));
        probes.push(probe(Verdict::Stale, None));
        let summary = RunSummary::of(&probes, Duration::from_secs(2));
        assert_eq!(summary.probe_count, 103);
        assert_eq!(summary.stale_count, 101);
        assert_eq!(summary.fresh_count, 1);
        assert_eq!(summary.replica_error_count, 1);
        assert_eq!(summary.visibility_timeout_count, 1);
        assert!((summary.stale_ratio - 101.0 / 102.0).abs() < 1e-12);
        assert!(
            (summary.visible_after_p50_ms - 500.0).abs() <= 1.0,
            "{summary:?}"
        );
        assert!(
            (summary.visible_after_p90_ms - 900.0).abs() <= 1.0,
            "{summary:?}"
        );
        assert_eq!(summary.visible_after_max_ms, 1000.0);
        assert_eq!(summary.lsn_gap_max_bytes, 7);
        assert_eq!(summary.elapsed_ms, 2000.0);
    }

    #[test]
    fn empty_run_is_all_zero() {
        let summary = RunSummary::of(&[], Duration::ZERO);
        assert_eq!(summary, RunSummary::default());
    }
}
