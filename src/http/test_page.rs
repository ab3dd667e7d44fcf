//! The `/test/` page: the old demo's view, done right. It shows one probe: what was written
//! to the primary, what the replica returned straight after the commit, the verdict, how long
//! the write took to become visible, and the lag by two measures with their caveats.

use std::fmt::Write as _;

use crate::{
    error::Error,
    probe::{ProbeResult, ServedBy, Verdict, millis},
};

/// Escapes text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#1d1d1f}\
h1{font-size:1.3rem;font-weight:600}\
.verdict{font-size:2.4rem;font-weight:800;padding:1rem 1.5rem;border-radius:.6rem;color:#fff;margin:1rem 0}\
.verdict small{display:block;font-size:1rem;font-weight:400;opacity:.95}\
.stale{background:#c62828}.consistent{background:#2e7d32}.error{background:#ef6c00}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid #ddd;vertical-align:top}\
th{width:16rem;font-weight:600}td code{word-break:break-all}.note{color:#666;font-size:.85rem}\
a.button{display:inline-block;margin-top:1rem;padding:.5rem 1rem;background:#1d1d1f;color:#fff;border-radius:.4rem;text-decoration:none}";

fn page(title: &str, body: &str, again: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title}</title><style>{STYLE}</style></head><body>\
         <h1>lagprobe: read-after-write on a replica</h1>{body}\
         <p><a class=\"button\" href=\"{again}\">Write and read again</a> \
         <a href=\"/api/probe\">same probe as JSON</a></p></body></html>\n",
        title = escape(title),
        again = escape(again),
    )
}

fn row(html: &mut String, label: &str, value_html: &str, note: &str) {
    let _ = write!(html, "<tr><th>{}</th><td>{value_html}", escape(label));
    if !note.is_empty() {
        let _ = write!(html, "<div class=\"note\">{}</div>", escape(note));
    }
    html.push_str("</td></tr>");
}

fn delay_row(html: &mut String, lab_delay_ms: Option<u64>) {
    if let Some(delay_ms) = lab_delay_ms {
        row(
            html,
            "Lab delay (primary → replica)",
            &format!("{delay_ms} ms"),
            "held by the lab's delay link on the WAL stream",
        );
    }
}

fn ms_text(ms: f64) -> String {
    format!("{ms:.1} ms")
}

/// The verdict's CSS class, headline and one-line explanation.
fn verdict_text(verdict: Verdict) -> (&'static str, &'static str, &'static str) {
    match verdict {
        Verdict::Stale => (
            "stale",
            "STALE",
            "The read did not see the row that had just been committed on the primary.",
        ),
        Verdict::Fresh => (
            "consistent",
            "CONSISTENT",
            "The read saw the row that had just been committed on the primary.",
        ),
        Verdict::ReplicaError => ("error", "REPLICA ERROR", "The replica could not be read."),
    }
}

/// The page for a probe that ran.
pub fn render(probe: &ProbeResult, lab_delay_ms: Option<u64>) -> String {
    let (class, headline, explanation) = verdict_text(probe.verdict);
    let mut body = format!(
        "<div class=\"verdict {class}\" id=\"verdict\">{headline}<small>{}</small></div><table>",
        escape(explanation)
    );
    written_row(&mut body, probe);
    read_back_row(&mut body, probe);
    visibility_row(&mut body, probe);
    replay_lag_rows(&mut body, probe);
    optional_lag_rows(&mut body, probe);
    lsn_and_latency_rows(&mut body, probe);
    delay_row(&mut body, lab_delay_ms);
    error_row(&mut body, probe);
    body.push_str("</table>");
    // Strategy names are URL-safe, so the same strategy is kept for the next load.
    page(
        &format!("lagprobe: {headline}"),
        &body,
        &format!("/test/?strategy={}", probe.strategy),
    )
}

/// What the probe wrote to the primary.
fn written_row(html: &mut String, probe: &ProbeResult) {
    row(
        html,
        "Written to the primary",
        &format!(
            "<code id=\"written\">{}</code>",
            escape(&probe.written_value)
        ),
        "commit timestamp (primary clock) and this probe's own token; committed before the read",
    );
}

/// Which server answered the strategy's read.
fn served_by_text(probe: &ProbeResult) -> String {
    match probe.served_by {
        Some(ServedBy::Replica) => format!("replica {}", probe.replica),
        Some(ServedBy::Primary) => "the primary".to_owned(),
        Some(ServedBy::Fallback) => "the primary (waiting on the replica timed out)".to_owned(),
        None => format!("nobody (replica {} failed)", probe.replica),
    }
}

/// What the strategy's read returned, and who served it.
fn read_back_row(html: &mut String, probe: &ProbeResult) {
    let read = probe.read_value.as_deref().map_or_else(
        || "<em>(row not there yet)</em>".to_owned(),
        |v| format!("<code>{}</code>", escape(v)),
    );
    row(
        html,
        "Read back",
        &format!("<span id=\"read\">{read}</span>"),
        &format!(
            "strategy {}, served by {}; read right after the COMMIT returned",
            probe.strategy,
            served_by_text(probe)
        ),
    );
}

/// Commit to visible on the replica, with the bracket when it is known.
fn visibility_row(html: &mut String, probe: &ProbeResult) {
    let visible = match (probe.visible_after, probe.still_stale_at) {
        (Some(after), Some(before)) => format!(
            "{} <span class=\"note\">(between {} and {} after the commit)</span>",
            ms_text(millis(after)),
            ms_text(millis(before)),
            ms_text(millis(after))
        ),
        (Some(after), None) => format!(
            "{} (already there at the first read)",
            ms_text(millis(after))
        ),
        (None, _) if probe.visibility_timed_out => "not visible before the timeout".to_owned(),
        (None, _) => "not measured".to_owned(),
    };
    row(
        html,
        "Commit to visible on the replica",
        // `visible` holds only numbers and our own markup.
        &format!("<span id=\"visible-after\">{visible}</span>"),
        "measured on one monotonic clock from the acknowledged COMMIT",
    );
}

/// The two lags every probe reports: WAL not yet replayed, and the replay timestamp's.
fn replay_lag_rows(html: &mut String, probe: &ProbeResult) {
    let gap = probe
        .lsn_gap_bytes
        .map_or_else(|| "unknown".to_owned(), |bytes| format!("{bytes} bytes"));
    row(
        html,
        "Lag: WAL not yet replayed",
        &escape(&gap),
        "commit LSN minus the replica's replay LSN at the immediate read: exact for \"has my write arrived\"",
    );
    let timestamp_lag = probe
        .replay_timestamp_lag_ms
        .map_or_else(|| "unknown".to_owned(), ms_text);
    row(
        html,
        "Lag: replica's replay timestamp",
        &escape(&timestamp_lag),
        "now() - pg_last_xact_replay_timestamp() on the replica (the old demo's figure): \
         unreliable, it keeps growing while the primary is idle",
    );
}

/// The lags shown only when measured: heartbeat, and received but not replayed.
fn optional_lag_rows(html: &mut String, probe: &ProbeResult) {
    if let Some(heartbeat_ms) = probe.lag.heartbeat_lag_ms {
        row(
            html,
            "Lag: heartbeat",
            &escape(&ms_text(heartbeat_ms)),
            "primary clock now minus the newest heartbeat the replica shows: true data lag, \
             at the heartbeat's resolution",
        );
    }
    if let Some(gap) = probe.lag.receive_replay_gap_bytes {
        row(
            html,
            "Lag: received but not replayed",
            &escape(&format!("{gap} bytes")),
            "blind to WAL still on the network: reads about 0 while the delay holds the WAL back",
        );
    }
}

/// Commit and replay LSNs, then write and read latency.
fn lsn_and_latency_rows(html: &mut String, probe: &ProbeResult) {
    row(
        html,
        "Commit LSN / replica replay LSN",
        &escape(&format!(
            "{} / {}",
            probe.commit_lsn,
            probe
                .replica_replay_lsn
                .map_or_else(|| "unknown".to_owned(), |lsn| lsn.to_string())
        )),
        "",
    );
    row(
        html,
        "Write latency / read latency",
        &escape(&format!(
            "{} / {}",
            ms_text(millis(probe.write_latency)),
            probe
                .read_latency
                .map_or_else(|| "n/a".to_owned(), |d| ms_text(millis(d)))
        )),
        "",
    );
}

/// The probe's error, if it had one.
fn error_row(html: &mut String, probe: &ProbeResult) {
    if let Some(error) = &probe.error {
        row(
            html,
            "Error",
            &format!("<code>{}</code>", escape(error)),
            "",
        );
    }
}

/// The page when no probe could run (bad input, primary unavailable).
pub fn render_error(error: &Error, lab_delay_ms: Option<u64>) -> String {
    let mut body = format!(
        "<div class=\"verdict error\" id=\"verdict\">NO PROBE<small>{}</small></div><table>",
        escape(&error.to_string())
    );
    delay_row(&mut body, lab_delay_ms);
    body.push_str("</table>");
    page("lagprobe: no probe", &body, "/test/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }

    #[test]
    fn the_visibility_bracket_is_markup_not_text() {
        use std::time::Duration;
        let probe = ProbeResult {
            token: "t".into(),
            strategy: crate::settings::Strategy::Replica,
            replica: "<r1>".into(),
            written_value: "w".into(),
            read_value: None,
            verdict: Verdict::Stale,
            served_by: Some(ServedBy::Replica),
            commit_lsn: crate::lsn::Lsn(2),
            replica_replay_lsn: Some(crate::lsn::Lsn(1)),
            lsn_gap_bytes: Some(1),
            replay_timestamp_lag_ms: None,
            write_latency: Duration::from_millis(1),
            read_latency: Some(Duration::from_millis(1)),
            waited: None,
            wait_method: None,
            visible_after: Some(Duration::from_millis(1003)),
            still_stale_at: Some(Duration::from_millis(1000)),
            visibility_resolution: Some(Duration::from_millis(3)),
            visibility_timed_out: false,
            replica_reads: 3,
            remote_apply_effective: None,
            lag: crate::probe::LagMeasures::default(),
            error: None,
        };
        let html = render(&probe, Some(1000));
        assert!(
            html.contains("<span class=\"note\">(between 1000.0 ms and 1003.0 ms"),
            "{html}"
        );
        assert!(!html.contains("&lt;span"), "{html}");
        assert!(html.contains("replica &lt;r1&gt;"), "{html}");
        assert!(html.contains("href=\"/test/?strategy=replica\""), "{html}");
    }

    #[test]
    fn error_page_escapes_the_message() {
        let html = render_error(&Error::invalid("query", "<script>"), Some(5));
        assert!(html.contains("&lt;script&gt;"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("5 ms"));
    }
}
