//! The `/proxy/` page: the proxy's audit for people. Queries that read a replica before it
//! had the session's own write come first, with their normalized text and counts, so the
//! page answers "which of my queries read stale?" at a glance.

use std::fmt::Write as _;

use super::test_page::escape;
use crate::service::{ProxyReport, QueryCounts, QueryReport};

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#1d1d1f}\
h1{font-size:1.3rem;font-weight:600}h2{font-size:1.1rem;font-weight:600;margin-top:2rem}\
table{border-collapse:collapse;width:100%}th,td{text-align:right;padding:.4rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}\
th:first-child,td:first-child{text-align:left}td code{white-space:pre-wrap;word-break:break-all}\
tr.risk td{background:#fdecea}.note{color:#666;font-size:.85rem}";

const COLUMNS: [&str; 9] = [
    "reads",
    "replica",
    "primary",
    "at risk",
    "unsure",
    "replayed",
    "waits",
    "wait ms",
    "fallbacks",
];

fn counts_cells(out: &mut String, counts: &QueryCounts) {
    let cells = [
        counts.reads,
        counts.replica_reads,
        counts.primary_reads,
        counts.reads_at_risk,
        counts.reads_unsure,
        counts.reads_replayed,
        counts.waits,
    ];
    for cell in cells {
        let _ = write!(out, "<td>{cell}</td>");
    }
    let _ = write!(
        out,
        "<td>{:.1}</td><td>{}</td>",
        counts.wait_seconds * 1000.0,
        counts.fallbacks
    );
}

fn query_row(out: &mut String, query: &QueryReport) {
    let class = if query.counts.reads_at_risk > 0 {
        " class=\"risk\""
    } else {
        ""
    };
    let _ = write!(
        out,
        "<tr{class}><td><code>{}</code><br><span class=\"note\">{}",
        escape(&query.text),
        query.fingerprint
    );
    if let Some(evidence) = &query.last_at_risk {
        let watcher = evidence
            .watcher_lsn
            .map_or("nothing".to_owned(), |lsn| lsn.to_string());
        let age = evidence.watcher_age_ms.map_or(String::new(), |age| {
            format!(", polled {age:.1} ms after the read")
        });
        let _ = write!(
            out,
            " · last at risk: token {}, replica at {watcher}{age}",
            evidence.token
        );
    }
    out.push_str("</span></td>");
    counts_cells(out, &query.counts);
    out.push_str("</tr>");
}

/// The whole page.
pub fn render(report: &ProxyReport) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>lagprobe proxy audit</title><style>{STYLE}</style></head><body>\
         <h1>Which of your queries read stale</h1>"
    );
    if !report.running {
        out.push_str("<p>The proxy is not running here (<code>--proxy-addr none</code>).</p>");
    }
    let totals = &report.totals;
    let _ = write!(
        out,
        "<p>{} sessions, {} writes, {} replica reads, {} primary reads, {} waits ({} ended by the \
         replica's WAIT FOR LSN), {} fallbacks.</p>",
        totals.sessions,
        totals.writes,
        totals.replica_reads,
        totals.primary_reads,
        totals.waits,
        totals.server_waits,
        totals.fallbacks
    );
    out.push_str(
        "<p class=\"note\">At risk: the read ran on a replica that had not yet replayed the \
         session's own last write (a watcher poll sent after the read still showed it behind). \
         Unsure: the watcher's evidence cannot settle it. Replayed: the watcher had seen the \
         write replayed before the read was sent.</p><table><tr><th>query</th>",
    );
    for column in COLUMNS {
        let _ = write!(out, "<th>{column}</th>");
    }
    out.push_str("</tr>");
    for query in &report.queries {
        query_row(&mut out, query);
    }
    if report.other.reads > 0 {
        let _ = write!(
            out,
            "<tr><td>other queries (past the {} the audit keeps, or not fingerprinted)</td>",
            report.max_queries
        );
        counts_cells(&mut out, &report.other);
        out.push_str("</tr>");
    }
    out.push_str(
        "</table><p class=\"note\">JSON: <a href=\"/api/proxy\">/api/proxy</a></p></body></html>\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ProxyStats;

    #[test]
    fn query_text_is_escaped() {
        let stats = ProxyStats::new(10);
        stats.admit(7, || "SELECT '<b>' || $1".into());
        let page = render(&stats.report());
        assert!(page.contains("SELECT &#39;&lt;b&gt;&#39; || $1"), "{page}");
        assert!(!page.contains("<b>"), "{page}");
    }
}
