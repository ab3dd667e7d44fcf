//! The proxy's `lagprobe_proxy_*` families for `/metrics`: totals over every session, and the
//! audit's counts per normalized query, labelled by fingerprint (the table's cap bounds the
//! series; queries past it are `fingerprint="other"`). Each family sits under its own HELP
//! and TYPE, as the probe families do.

use super::metrics::{family, labels};
use crate::service::{ProxyReport, QueryCounts};

/// Characters of a query's text in its info label; the full text is in `/api/proxy`.
const QUERY_LABEL_CHARS: usize = 200;

/// A per-query family: its name's middle, its help, and the count it shows.
type QueryFamily = (&'static str, &'static str, fn(&QueryCounts) -> f64);

/// Every proxy family, appended to `out`.
pub fn render(out: &mut String, report: &ProxyReport) {
    totals(out, report);
    let per_query = |pick: fn(&QueryCounts) -> f64| {
        let mut samples: Vec<(String, f64)> = report
            .queries
            .iter()
            .map(|query| {
                let labels = labels(&[("fingerprint", &query.fingerprint)]);
                (labels, pick(&query.counts))
            })
            .collect();
        samples.push((labels(&[("fingerprint", "other")]), pick(&report.other)));
        samples
    };
    let query_families: [QueryFamily; 7] = [
        ("reads", "Reads of the query the strategy placed.", |c| {
            c.reads as f64
        }),
        (
            "replica_reads",
            "Of those, reads that ran on a replica.",
            |c| c.replica_reads as f64,
        ),
        (
            "reads_at_risk",
            "Replica reads that ran before the replica had replayed the session's own last write.",
            |c| c.reads_at_risk as f64,
        ),
        (
            "reads_unsure",
            "Replica reads whose freshness the replay watcher's evidence cannot settle.",
            |c| c.reads_unsure as f64,
        ),
        (
            "waits",
            "Reads that waited for the replica to replay.",
            |c| c.waits as f64,
        ),
        (
            "wait_seconds",
            "Time reads spent waiting for replay.",
            |c| c.wait_seconds,
        ),
        (
            "fallbacks",
            "Reads meant for a replica that went to the primary.",
            |c| c.fallbacks as f64,
        ),
    ];
    for (name, help, pick) in query_families {
        let name = format!("lagprobe_proxy_query_{name}_total");
        family(out, &name, "counter", help, per_query(pick));
    }
    family(
        out,
        "lagprobe_proxy_query_info",
        "gauge",
        "The normalized text of each audited query (truncated; the full text is in /api/proxy).",
        report.queries.iter().map(|query| {
            let text: String = query.text.chars().take(QUERY_LABEL_CHARS).collect();
            let pairs = [
                ("fingerprint", query.fingerprint.as_str()),
                ("query", &text),
            ];
            (labels(&pairs), 1)
        }),
    );
}

fn totals(out: &mut String, report: &ProxyReport) {
    let totals = &report.totals;
    family(
        out,
        "lagprobe_proxy_running",
        "gauge",
        "1 if the proxy runs in this process.",
        [(String::new(), u8::from(report.running))],
    );
    let counters: [(&str, &str, u64); 5] = [
        ("sessions", "Client sessions started.", totals.sessions),
        (
            "writes",
            "Write transactions committed through the proxy.",
            totals.writes,
        ),
        (
            "waits",
            "Reads that waited for a replica to replay.",
            totals.waits,
        ),
        (
            "server_waits",
            "Replay waits a replica's own WAIT FOR LSN ended (PostgreSQL 19 and later).",
            totals.server_waits,
        ),
        (
            "fallbacks",
            "Reads meant for a replica that went to the primary.",
            totals.fallbacks,
        ),
    ];
    for (name, help, value) in counters {
        let name = format!("lagprobe_proxy_{name}_total");
        family(out, &name, "counter", help, [(String::new(), value)]);
    }
    family(
        out,
        "lagprobe_proxy_reads_total",
        "counter",
        "Reads the strategy placed, by where they ran.",
        [
            (labels(&[("target", "replica")]), totals.replica_reads),
            (labels(&[("target", "primary")]), totals.primary_reads),
        ],
    );
}
