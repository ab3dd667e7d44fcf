//! `/metrics` in the Prometheus text exposition format (version 0.0.4): probe counts by
//! strategy, verdict and replica; commit-to-visible and read-latency histograms; lag gauges
//! by method, measured at scrape time; and the lab's delay link settings.

use std::fmt::Write as _;

use crate::probe::{BUCKETS_SECONDS, Histogram, LagMeasures, LagReport, MetricsSnapshot};

/// Escapes a label value (backslash, double quote, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, strategy: &str, histogram: &Histogram) {
    let strategy = label(strategy);
    for (bound, count) in BUCKETS_SECONDS.iter().zip(histogram.buckets) {
        let _ = writeln!(
            out,
            "{name}_bucket{{strategy=\"{strategy}\",le=\"{bound}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{strategy=\"{strategy}\",le=\"+Inf\"}} {}",
        histogram.count
    );
    let _ = writeln!(
        out,
        "{name}_sum{{strategy=\"{strategy}\"}} {}",
        histogram.sum_seconds
    );
    let _ = writeln!(
        out,
        "{name}_count{{strategy=\"{strategy}\"}} {}",
        histogram.count
    );
}

/// Lab delay link settings, when running a lab: (delay s, jitter s, down).
pub type LinkGauges = Option<(f64, f64, bool)>;

/// Renders everything; `lag` is `Err` with the reason when it could not be measured.
pub fn render(
    snapshot: &MetricsSnapshot,
    lag: Result<&LagReport, String>,
    link: LinkGauges,
) -> String {
    let mut out = String::new();
    probe_families(&mut out, snapshot);
    lag_families(&mut out, lag);
    link_families(&mut out, link);
    out
}

/// `key="value"` pairs for inside a sample's braces, the values escaped.
pub(super) fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{key}=\"{}\"", label(value)))
        .collect::<Vec<_>>()
        .join(",")
}

/// One sample line; `labels` as made by [`labels`], empty for none.
fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// A family of plain samples: its header, then one line per `(labels, value)`.
pub(super) fn family<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, V)>,
) {
    header(out, name, kind, help);
    for (labels, value) in samples {
        sample(out, name, &labels, value);
    }
}

/// A histogram family with one histogram per strategy.
fn histogram_family(
    out: &mut String,
    name: &str,
    help: &str,
    by_strategy: &std::collections::BTreeMap<String, Histogram>,
) {
    header(out, name, "histogram", help);
    for (strategy, values) in by_strategy {
        histogram(out, name, strategy, values);
    }
}

/// What the engine recorded: probe counts, the two histograms and lsn-wait fallbacks.
fn probe_families(out: &mut String, snapshot: &MetricsSnapshot) {
    family(
        out,
        "lagprobe_probes_total",
        "counter",
        "Probes run, by read strategy, verdict and replica.",
        snapshot
            .probes
            .iter()
            .map(|((strategy, verdict, replica), count)| {
                let pairs = [
                    ("strategy", strategy.as_str()),
                    ("verdict", verdict),
                    ("replica", replica.as_str()),
                ];
                (labels(&pairs), count)
            }),
    );
    histogram_family(
        out,
        "lagprobe_commit_to_visible_seconds",
        "Time from an acknowledged COMMIT until the replica showed the row (upper bound).",
        &snapshot.visible_after,
    );
    histogram_family(
        out,
        "lagprobe_read_latency_seconds",
        "Time from an acknowledged COMMIT until the strategy's read returned.",
        &snapshot.read_latency,
    );
    family(
        out,
        "lagprobe_fallbacks_total",
        "counter",
        "lsn-wait reads that timed out and went to the primary.",
        snapshot
            .fallbacks
            .iter()
            .map(|(strategy, count)| (labels(&[("strategy", strategy)]), count)),
    );
}

/// A lag family's samples: per replica, a line for each method that was measured.
fn lag_samples<'a, V: std::fmt::Display, const N: usize>(
    out: &mut String,
    name: &str,
    by_replica: impl Iterator<Item = (&'a str, [(&'static str, Option<V>); N])>,
) {
    for (replica, by_method) in by_replica {
        for (method, value) in by_method {
            if let Some(value) = value {
                let pairs = [("replica", replica), ("method", method)];
                sample(out, name, &labels(&pairs), value);
            }
        }
    }
}

/// Lag measured at this scrape: bytes, whether the scrape could measure it, seconds.
fn lag_families(out: &mut String, lag: Result<&LagReport, String>) {
    const BYTES: &str = "lagprobe_lag_bytes";
    const SECONDS: &str = "lagprobe_lag_seconds";
    // Each family's samples directly under its own HELP and TYPE: parsers file a sample
    // under the last header they read.
    header(
        out,
        "lagprobe_lag_scrape_ok",
        "gauge",
        "1 if lag could be measured at this scrape.",
    );
    let report = scrape_ok_sample(out, lag);
    header(
        out,
        BYTES,
        "gauge",
        "Replication lag in bytes, by method (see the API's LagReport.methods).",
    );
    lag_samples(out, BYTES, lag_bytes(report));
    header(
        out,
        SECONDS,
        "gauge",
        "Replication lag in seconds, by method (see the API's LagReport.methods).",
    );
    lag_samples(out, SECONDS, lag_seconds(report));
}

/// `lagprobe_lag_scrape_ok`'s sample, after a comment with the reason when lag could not
/// be measured; the report when it could.
fn scrape_ok_sample<'a>(
    out: &mut String,
    lag: Result<&'a LagReport, String>,
) -> Option<&'a LagReport> {
    match lag {
        Ok(report) => {
            let _ = writeln!(out, "lagprobe_lag_scrape_ok 1");
            Some(report)
        }
        Err(reason) => {
            let _ = writeln!(out, "# lag not measured: {}", reason.replace('\n', " "));
            let _ = writeln!(out, "lagprobe_lag_scrape_ok 0");
            None
        }
    }
}

/// `(replica, by_method(its lag))` for every replica the report measured.
fn per_replica<'a, T>(
    report: Option<&'a LagReport>,
    by_method: impl Fn(&LagMeasures) -> T + 'a,
) -> impl Iterator<Item = (&'a str, T)> + 'a {
    report
        .into_iter()
        .flat_map(|report| &report.replicas)
        .map(move |replica| (replica.replica.as_str(), by_method(&replica.lag)))
}

/// Each replica's lag in bytes, by method.
fn lag_bytes(
    report: Option<&LagReport>,
) -> impl Iterator<Item = (&str, [(&'static str, Option<u64>); 2])> {
    per_replica(report, |lag| {
        [
            ("lsn_gap", lag.lsn_gap_bytes),
            ("receive_replay_gap", lag.receive_replay_gap_bytes),
        ]
    })
}

/// Each replica's lag in seconds, by method.
fn lag_seconds(
    report: Option<&LagReport>,
) -> impl Iterator<Item = (&str, [(&'static str, Option<f64>); 5])> {
    per_replica(report, |lag| {
        [
            ("heartbeat", lag.heartbeat_lag_ms),
            ("replay_timestamp", lag.replay_timestamp_lag_ms),
            ("stat_write", lag.stat_write_lag_ms),
            ("stat_flush", lag.stat_flush_lag_ms),
            ("stat_replay", lag.stat_replay_lag_ms),
        ]
        .map(|(method, ms)| (method, ms.map(|ms| ms / 1000.0)))
    })
}

/// The lab's delay link settings, when running a lab: one unlabelled gauge each.
fn link_families(out: &mut String, link: LinkGauges) {
    let Some((delay_seconds, jitter_seconds, down)) = link else {
        return;
    };
    for (name, help, value) in [
        (
            "lagprobe_delay_link_delay_seconds",
            "The lab's delay from primary to replica.",
            delay_seconds.to_string(),
        ),
        (
            "lagprobe_delay_link_jitter_seconds",
            "The lab's uniform jitter bound.",
            jitter_seconds.to_string(),
        ),
        (
            "lagprobe_delay_link_down",
            "1 while the lab's delay link is cut.",
            u8::from(down).to_string(),
        ),
    ] {
        family(out, name, "gauge", help, [(String::new(), value)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labels_escaped_and_histograms_cumulative() {
        let mut snapshot = MetricsSnapshot::default();
        snapshot
            .probes
            .insert(("replica".into(), "stale", "we\"ird".into()), 3);
        let text = render(
            &snapshot,
            Err("primary down".into()),
            Some((1.0, 0.0, false)),
        );
        assert!(text.contains(
            "lagprobe_probes_total{strategy=\"replica\",verdict=\"stale\",replica=\"we\\\"ird\"} 3"
        ));
        assert!(text.contains("lagprobe_lag_scrape_ok 0"));
        assert!(text.contains("lagprobe_delay_link_delay_seconds 1"));
        assert!(text.contains("# TYPE lagprobe_commit_to_visible_seconds histogram"));
    }
}
