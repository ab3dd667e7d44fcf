//! `/metrics` in the Prometheus text exposition format (version 0.0.4): probe counts by
//! strategy, verdict and replica; commit-to-visible and read-latency histograms; lag gauges
//! by method, measured at scrape time; and the lab's delay link settings.

use std::fmt::Write as _;

use crate::probe::{BUCKETS_SECONDS, Histogram, LagReport, MetricsSnapshot};

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
    header(
        &mut out,
        "lagprobe_probes_total",
        "counter",
        "Probes run, by read strategy, verdict and replica.",
    );
    for ((strategy, verdict, replica), count) in &snapshot.probes {
        let _ = writeln!(
            out,
            "lagprobe_probes_total{{strategy=\"{}\",verdict=\"{}\",replica=\"{}\"}} {count}",
            label(strategy),
            verdict,
            label(replica)
        );
    }
    header(
        &mut out,
        "lagprobe_commit_to_visible_seconds",
        "histogram",
        "Time from an acknowledged COMMIT until the replica showed the row (upper bound).",
    );
    for (strategy, values) in &snapshot.visible_after {
        histogram(
            &mut out,
            "lagprobe_commit_to_visible_seconds",
            strategy,
            values,
        );
    }
    header(
        &mut out,
        "lagprobe_read_latency_seconds",
        "histogram",
        "Time from an acknowledged COMMIT until the strategy's read returned.",
    );
    for (strategy, values) in &snapshot.read_latency {
        histogram(&mut out, "lagprobe_read_latency_seconds", strategy, values);
    }
    header(
        &mut out,
        "lagprobe_fallbacks_total",
        "counter",
        "lsn-wait reads that timed out and went to the primary.",
    );
    for (strategy, count) in &snapshot.fallbacks {
        let _ = writeln!(
            out,
            "lagprobe_fallbacks_total{{strategy=\"{}\"}} {count}",
            label(strategy)
        );
    }

    header(
        &mut out,
        "lagprobe_lag_bytes",
        "gauge",
        "Replication lag in bytes, by method (see the API's LagReport.methods).",
    );
    let mut seconds = String::new();
    header(
        &mut seconds,
        "lagprobe_lag_seconds",
        "gauge",
        "Replication lag in seconds, by method (see the API's LagReport.methods).",
    );
    header(
        &mut out,
        "lagprobe_lag_scrape_ok",
        "gauge",
        "1 if lag could be measured at this scrape.",
    );
    match lag {
        Ok(report) => {
            let _ = writeln!(out, "lagprobe_lag_scrape_ok 1");
            for replica in &report.replicas {
                let name = label(&replica.replica);
                let lag = &replica.lag;
                for (method, value) in [
                    ("lsn_gap", lag.lsn_gap_bytes),
                    ("receive_replay_gap", lag.receive_replay_gap_bytes),
                ] {
                    if let Some(bytes) = value {
                        let _ = writeln!(
                            out,
                            "lagprobe_lag_bytes{{replica=\"{name}\",method=\"{method}\"}} {bytes}"
                        );
                    }
                }
                for (method, value) in [
                    ("heartbeat", lag.heartbeat_lag_ms),
                    ("replay_timestamp", lag.replay_timestamp_lag_ms),
                    ("stat_write", lag.stat_write_lag_ms),
                    ("stat_flush", lag.stat_flush_lag_ms),
                    ("stat_replay", lag.stat_replay_lag_ms),
                ] {
                    if let Some(ms) = value {
                        let _ = writeln!(
                            seconds,
                            "lagprobe_lag_seconds{{replica=\"{name}\",method=\"{method}\"}} {}",
                            ms / 1000.0
                        );
                    }
                }
            }
        }
        Err(reason) => {
            let _ = writeln!(out, "# lag not measured: {}", reason.replace('\n', " "));
            let _ = writeln!(out, "lagprobe_lag_scrape_ok 0");
        }
    }
    out.push_str(&seconds);

    if let Some((delay_seconds, jitter_seconds, down)) = link {
        header(
            &mut out,
            "lagprobe_delay_link_delay_seconds",
            "gauge",
            "The lab's delay from primary to replica.",
        );
        let _ = writeln!(out, "lagprobe_delay_link_delay_seconds {delay_seconds}");
        header(
            &mut out,
            "lagprobe_delay_link_jitter_seconds",
            "gauge",
            "The lab's uniform jitter bound.",
        );
        let _ = writeln!(out, "lagprobe_delay_link_jitter_seconds {jitter_seconds}");
        header(
            &mut out,
            "lagprobe_delay_link_down",
            "gauge",
            "1 while the lab's delay link is cut.",
        );
        let _ = writeln!(out, "lagprobe_delay_link_down {}", u8::from(down));
    }
    out
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
