//! Statistics over probes: verdict counts with a confidence interval, latency percentiles
//! (HDR histograms), where reads were served, and the visibility curve.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{ProbeResult, Verdict, millis};
use super::{ServedBy, WaitMethod};

/// A latency distribution, ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u32,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// P(visible | a replica read issued `after_ms` after the commit).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VisibilityPoint {
    pub after_ms: u32,
    pub fresh_probability: f64,
}

/// Where the visibility curve is sampled, ms after the commit.
pub const VISIBILITY_CURVE_MS: [u32; 8] = [0, 10, 50, 100, 250, 500, 1000, 2000];

/// Statistics over a set of probes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunSummary {
    pub probe_count: u32,
    pub fresh_count: u32,
    pub stale_count: u32,
    pub replica_error_count: u32,
    pub visibility_timeout_count: u32,
    /// stale / (fresh + stale); 0 when no read succeeded.
    pub stale_ratio: f64,
    /// 95% Wilson score interval of `stale_ratio` ([0, 1] when nothing was judged).
    pub stale_ratio_ci95_low: f64,
    pub stale_ratio_ci95_high: f64,
    pub visible_after: Percentiles,
    pub read_latency: Percentiles,
    /// The write's round trip (remote-apply's cost shows here).
    pub write_latency: Percentiles,
    /// Share of answered reads that the primary served (by strategy or as a fallback).
    pub primary_share: f64,
    pub wait_count: u32,
    pub fallback_count: u32,
    /// How the lsn-wait probes waited, each method once.
    pub wait_methods: Vec<WaitMethod>,
    pub visibility_curve: Vec<VisibilityPoint>,
    pub remote_apply_ineffective_count: u32,
    pub lsn_gap_max_bytes: u64,
    pub elapsed_ms: f64,
}

/// The statistics of the probes that read one replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaSummary {
    pub replica: String,
    pub summary: RunSummary,
}

/// Microsecond histogram up to an hour, 3 significant digits: 0.1% error, which keeps a
/// 1000 ms delay readable to the millisecond.
fn percentiles(samples: impl Iterator<Item = Duration>) -> Percentiles {
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds");
    let mut max = Duration::ZERO;
    for sample in samples {
        histogram.saturating_record(sample.as_micros().max(1) as u64);
        max = max.max(sample);
    }
    if histogram.is_empty() {
        return Percentiles::default();
    }
    let at = |quantile| millis(Duration::from_micros(histogram.value_at_quantile(quantile)));
    Percentiles {
        count: histogram.len() as u32,
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: millis(max),
    }
}

/// The 95% Wilson score interval for `successes` of `trials`.
pub fn wilson_interval_95(successes: u32, trials: u32) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let n = f64::from(trials);
    let p = f64::from(successes) / n;
    let denominator = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denominator;
    let half_width = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denominator;
    (
        (centre - half_width).max(0.0),
        (centre + half_width).min(1.0),
    )
}

/// The visibility curve at every probe's own commit-to-visible time: steps `(t, P(visible
/// | read issued t after the commit))`, sorted by `t`, over the probes whose visibility was
/// followed to an end (a probe that timed out counts, and never becomes visible). Empty
/// when there is none.
pub fn visibility_steps<'a>(
    probes: impl IntoIterator<Item = &'a ProbeResult>,
) -> Vec<(Duration, f64)> {
    let mut measured = 0;
    let mut seen: Vec<Duration> = Vec::new();
    for probe in probes {
        measured += usize::from(probe.visible_after.is_some() || probe.visibility_timed_out);
        seen.extend(probe.visible_after);
    }
    seen.sort_unstable();
    seen.iter()
        .enumerate()
        .map(|(index, &after)| (after, (index + 1) as f64 / measured as f64))
        .collect()
}

impl RunSummary {
    pub fn of(probes: &[ProbeResult], elapsed: Duration) -> Self {
        let count_where = |predicate: &dyn Fn(&ProbeResult) -> bool| {
            probes.iter().filter(|probe| predicate(probe)).count() as u32
        };
        let fresh_count = count_where(&|p| p.verdict == Verdict::Fresh);
        let stale_count = count_where(&|p| p.verdict == Verdict::Stale);
        let judged = fresh_count + stale_count;
        let (stale_ratio_ci95_low, stale_ratio_ci95_high) = wilson_interval_95(stale_count, judged);
        let served = count_where(&|p| p.served_by.is_some());
        let by_primary =
            count_where(&|p| matches!(p.served_by, Some(ServedBy::Primary | ServedBy::Fallback)));

        let visible_after = percentiles(probes.iter().filter_map(|p| p.visible_after));
        // Probes whose visibility was followed to an end: seen, or timed out.
        let measured: Vec<_> = probes
            .iter()
            .filter(|p| p.visible_after.is_some() || p.visibility_timed_out)
            .collect();
        let visibility_curve = VISIBILITY_CURVE_MS
            .iter()
            .map(|&after_ms| VisibilityPoint {
                after_ms,
                fresh_probability: if measured.is_empty() {
                    0.0
                } else {
                    let limit = Duration::from_millis(u64::from(after_ms));
                    measured
                        .iter()
                        .filter(|p| p.visible_after.is_some_and(|v| v <= limit))
                        .count() as f64
                        / measured.len() as f64
                },
            })
            .collect();

        RunSummary {
            probe_count: probes.len() as u32,
            fresh_count,
            stale_count,
            replica_error_count: count_where(&|p| p.verdict == Verdict::ReplicaError),
            visibility_timeout_count: count_where(&|p| p.visibility_timed_out),
            stale_ratio: if judged == 0 {
                0.0
            } else {
                f64::from(stale_count) / f64::from(judged)
            },
            stale_ratio_ci95_low,
            stale_ratio_ci95_high,
            visible_after,
            read_latency: percentiles(probes.iter().filter_map(|p| p.read_latency)),
            write_latency: percentiles(probes.iter().map(|p| p.write_latency)),
            primary_share: if served == 0 {
                0.0
            } else {
                f64::from(by_primary) / f64::from(served)
            },
            wait_count: count_where(&|p| p.waited.is_some()),
            fallback_count: count_where(&|p| p.served_by == Some(ServedBy::Fallback)),
            wait_methods: probes
                .iter()
                .filter_map(|p| p.wait_method)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
            visibility_curve,
            remote_apply_ineffective_count: count_where(&|p| {
                p.remote_apply_effective == Some(false)
            }),
            lsn_gap_max_bytes: probes
                .iter()
                .filter_map(|p| p.lsn_gap_bytes)
                .max()
                .unwrap_or(0),
            elapsed_ms: millis(elapsed),
        }
    }

    /// One summary per replica, in `replica_order`, skipping replicas no probe read.
    pub fn per_replica(
        probes: &[ProbeResult],
        replica_order: &[String],
        elapsed: Duration,
    ) -> Vec<ReplicaSummary> {
        replica_order
            .iter()
            .filter_map(|name| {
                let own: Vec<_> = probes
                    .iter()
                    .filter(|p| &p.replica == name)
                    .cloned()
                    .collect();
                (!own.is_empty()).then(|| ReplicaSummary {
                    replica: name.clone(),
                    summary: RunSummary::of(&own, elapsed),
                })
            })
            .collect()
    }
}

/// A markdown table with one row per `(label, summary)`: what a comparison looks like on a
/// terminal or in a note. A row whose remote-apply commits did not wait (no synchronous
/// standby) is marked ineffective, with a note under the table: its stale ratio is the
/// replica baseline's, and a bare 100% stale would read as remote-apply failing at its job.
pub fn markdown_table(rows: &[(String, &RunSummary)]) -> String {
    let mut notes = String::new();
    let mut table = String::from(
        "| strategy | probes | stale | stale ratio (95% CI) | write p50 ms | read p50 ms | \
         read p99 ms | visible p50 ms | visible p99 ms | primary share | waits | fallbacks | errors |\n\
         |---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (label, summary) in rows {
        let ineffective = summary.remote_apply_ineffective_count;
        let label = if ineffective == 0 {
            label.clone()
        } else {
            notes.push_str(&format!(
                "\n{label} was ineffective for {ineffective} of {} probes: no synchronous standby \
                 named the replica (`synchronous_standby_names`), so the commit did not wait for \
                 the replica to apply the write and the reads are the `replica` baseline's. \
                 `lagprobe lab --sync-replica` makes the lab's replicas synchronous standbys.\n",
                summary.probe_count
            ));
            format!("{label} (ineffective)")
        };
        table.push_str(&format!(
            "| {label} | {} | {} | {:.3} ({:.3}-{:.3}) | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {} | {} | {} |\n",
            summary.probe_count,
            summary.stale_count,
            summary.stale_ratio,
            summary.stale_ratio_ci95_low,
            summary.stale_ratio_ci95_high,
            summary.write_latency.p50_ms,
            summary.read_latency.p50_ms,
            summary.read_latency.p99_ms,
            summary.visible_after.p50_ms,
            summary.visible_after.p99_ms,
            summary.primary_share,
            summary.wait_count,
            summary.fallback_count,
            summary.replica_error_count,
        ));
    }
    table + &notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{lsn::Lsn, probe::LagMeasures, settings::Strategy};

    fn probe(verdict: Verdict, visible_after_ms: Option<u64>, served_by: ServedBy) -> ProbeResult {
        ProbeResult {
            token: "t".into(),
            strategy: Strategy::Replica,
            replica: "r1".into(),
            written_value: "v".into(),
            read_value: None,
            verdict,
            served_by: (verdict != Verdict::ReplicaError).then_some(served_by),
            commit_lsn: Lsn(10),
            replica_replay_lsn: None,
            lsn_gap_bytes: Some(7),
            replay_timestamp_lag_ms: None,
            write_latency: Duration::from_millis(1),
            read_latency: Some(Duration::from_millis(2)),
            waited: None,
            wait_method: None,
            visible_after: visible_after_ms.map(Duration::from_millis),
            still_stale_at: None,
            visibility_resolution: None,
            visibility_timed_out: visible_after_ms.is_none() && verdict == Verdict::Stale,
            replica_reads: 1,
            remote_apply_effective: None,
            lag: LagMeasures::default(),
            error: None,
        }
    }

    #[test]
    fn the_table_marks_an_ineffective_remote_apply_and_says_what_it_needs() {
        let effective = RunSummary::of(
            &[probe(Verdict::Fresh, Some(1), ServedBy::Replica)],
            Duration::from_secs(1),
        );
        let mut ineffective = effective.clone();
        ineffective.probe_count = 30;
        ineffective.remote_apply_ineffective_count = 30;
        let table = markdown_table(&[
            ("replica".into(), &effective),
            ("remote-apply".into(), &ineffective),
        ]);
        assert!(
            table.contains("| remote-apply (ineffective) | 30 |"),
            "{table}"
        );
        assert!(table.contains("ineffective for 30 of 30 probes"), "{table}");
        assert!(table.contains("--sync-replica"), "{table}");
        assert!(table.contains("| replica | 1 |"), "{table}");

        let table = markdown_table(&[("remote-apply".into(), &effective)]);
        assert!(!table.contains("ineffective"), "{table}");
    }

    #[test]
    fn visibility_steps_count_timeouts_but_not_errors() {
        let probes = [
            probe(Verdict::Stale, Some(30), ServedBy::Replica),
            probe(Verdict::Fresh, Some(10), ServedBy::Replica),
            probe(Verdict::Stale, None, ServedBy::Replica),
            probe(Verdict::ReplicaError, None, ServedBy::Replica),
        ];
        let steps = visibility_steps(&probes);
        let ms = Duration::from_millis;
        assert_eq!(steps, [(ms(10), 1.0 / 3.0), (ms(30), 2.0 / 3.0)]);
        assert!(visibility_steps(&[] as &[ProbeResult]).is_empty());
    }

    #[test]
    fn counts_percentiles_and_shares() {
        let mut probes: Vec<_> = (1..=100)
            .map(|ms| probe(Verdict::Stale, Some(ms * 10), ServedBy::Replica))
            .collect();
        probes.push(probe(Verdict::Fresh, Some(1), ServedBy::Primary));
        probes.push(probe(Verdict::ReplicaError, None, ServedBy::Replica));
        probes.push(probe(Verdict::Stale, None, ServedBy::Replica));
        let summary = RunSummary::of(&probes, Duration::from_secs(2));
        assert_eq!(summary.probe_count, 103);
        assert_eq!(summary.stale_count, 101);
        assert_eq!(summary.fresh_count, 1);
        assert_eq!(summary.replica_error_count, 1);
        assert_eq!(summary.visibility_timeout_count, 1);
        assert!((summary.stale_ratio - 101.0 / 102.0).abs() < 1e-12);
        assert!(summary.stale_ratio_ci95_low < summary.stale_ratio);
        assert!(summary.stale_ratio_ci95_high > summary.stale_ratio);
        assert!(
            (summary.visible_after.p50_ms - 500.0).abs() <= 1.0,
            "{summary:?}"
        );
        assert!(
            (summary.visible_after.p90_ms - 900.0).abs() <= 1.0,
            "{summary:?}"
        );
        assert_eq!(summary.visible_after.max_ms, 1000.0);
        assert_eq!(summary.visible_after.count, 101);
        assert!((summary.primary_share - 1.0 / 102.0).abs() < 1e-12);
        assert_eq!(summary.lsn_gap_max_bytes, 7);
        assert_eq!(summary.elapsed_ms, 2000.0);
        // 102 probes followed to an end; 1 (the fresh one) was visible by 0 ms... well, 1 ms.
        let at = |ms: u32| {
            summary
                .visibility_curve
                .iter()
                .find(|point| point.after_ms == ms)
                .unwrap()
                .fresh_probability
        };
        assert_eq!(at(0), 0.0);
        assert!((at(10) - 2.0 / 102.0).abs() < 1e-12);
        assert!((at(500) - 51.0 / 102.0).abs() < 1e-12);
        assert!((at(2000) - 101.0 / 102.0).abs() < 1e-12);
    }

    #[test]
    fn wilson_interval_matches_known_values() {
        // 0 of 30: [0, 0.1135]; 15 of 30: [0.3315, 0.6685] (standard tables).
        let (low, high) = wilson_interval_95(0, 30);
        assert_eq!(low, 0.0);
        assert!((high - 0.1135).abs() < 1e-3, "{high}");
        let (low, high) = wilson_interval_95(15, 30);
        assert!((low - 0.3315).abs() < 1e-3, "{low}");
        assert!((high - 0.6685).abs() < 1e-3, "{high}");
        assert_eq!(wilson_interval_95(0, 0), (0.0, 1.0));
    }

    #[test]
    fn empty_run_is_all_zero_but_the_unknown_interval() {
        let summary = RunSummary::of(&[], Duration::ZERO);
        assert_eq!(summary.probe_count, 0);
        assert_eq!(summary.visible_after, Percentiles::default());
        assert_eq!(
            (summary.stale_ratio_ci95_low, summary.stale_ratio_ci95_high),
            (0.0, 1.0)
        );
    }
}
