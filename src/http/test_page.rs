//! The `/test/` page: the old demo's view, done right, and one you can watch and steer. It
//! shows one probe (what was written to the primary, what the replica returned straight
//! after the commit, the verdict, how long the write took to become visible, the lag by two
//! measures with their caveats) as a table and as a timeline picture; the recent history as
//! charts; and the controls: the strategy, and in a lab the delay link and the servers.
//! With `?watch=1` the live part is redrawn as probes stream in (`live.js`, server-sent
//! events); without JavaScript that page reloads itself instead.

mod charts;
mod controls;
pub(super) mod query;
mod svg;
mod timeline;

use std::fmt::Write as _;

use crate::{
    error::Error,
    lab::{DelaySettings, ServerStatus},
    probe::{ProbeResult, ServedBy, Verdict, millis},
    settings::Strategy,
};
use query::{PAGE_ONLY_FIELDS, PageQuery};

/// The live mode's script, served by lagprobe itself at `/test/live.js`.
pub const LIVE_JS: &str = include_str!("test_page/live.js");

/// Seconds between reloads of the live page when JavaScript is off.
const NOSCRIPT_REFRESH_SECONDS: u32 = 2;

/// Escapes text for HTML element content and attribute values (the `/proxy/` page too).
pub(super) fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    escape_into(&mut escaped, text);
    escaped
}

/// [`escape`], appended to `html` (no string of its own: the charts escape a text per probe).
fn escape_into(html: &mut String, text: &str) {
    let mut rest = text;
    while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
        html.push_str(&rest[..at]);
        html.push_str(match rest.as_bytes()[at] {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            _ => "&#39;",
        });
        rest = &rest[at + 1..];
    }
    html.push_str(rest);
}

// Narrow screens (390 px phones) stack each table row's label over its value, and every
// long word (tokens, LSNs, error text) may break so that nothing scrolls sideways; breaks
// still fall at word boundaries where there are any.
const STYLE: &str = "\
*{box-sizing:border-box}\
body{font-family:system-ui,sans-serif;max-width:52rem;margin:1.5rem auto;padding:0 .75rem;color:#1d1d1f}\
h1{font-size:1.3rem;font-weight:600}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}\
.verdict{font-size:2.4rem;font-weight:800;padding:1rem 1.5rem;border-radius:.6rem;color:#fff;margin:1rem 0}\
.verdict small{display:block;font-size:1rem;font-weight:400;opacity:.95;overflow-wrap:anywhere}\
.stale{background:#c62828}.consistent{background:#2e7d32}.error{background:#ef6c00}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid #ddd;vertical-align:top;overflow-wrap:anywhere}\
th{width:16rem;font-weight:600}.data th{width:auto}.data td{overflow-wrap:normal}h3{font-size:1rem;margin:1rem 0 .2rem}\
label{display:inline-block;white-space:nowrap;margin:.2rem 0}caption{text-align:left;font-weight:600;padding:.3rem 0}\
.note{color:#555;font-size:.85rem}\
a.button{display:inline-block;margin-top:1rem;padding:.5rem 1rem;background:#1d1d1f;color:#fff;border-radius:.4rem;text-decoration:none}\
nav{display:flex;flex-wrap:wrap;gap:.4rem;align-items:center;margin:.5rem 0}\
a.strategy{padding:.3rem .6rem;border:1px solid #999;border-radius:.4rem;text-decoration:none;color:#1d1d1f}\
a.strategy.current{border:2px solid #1d1d1f;font-weight:700;background:#eee}.hint{font-weight:400;font-size:.8rem}\
figure{margin:0}svg.chart{display:block;width:100%;max-width:36rem;height:auto;margin:.5rem 0}\
svg text{font-size:16px;fill:#1d1d1f}svg .tick{font-size:13px;fill:#444}svg .lane{font-weight:600}svg .mark{font-size:14px}\
svg .axis{stroke:#444}svg .grid{stroke:#ddd}svg .commit{stroke:#1d1d1f;stroke-width:2}\
svg .read{fill:#9e9e9e}svg .wait{fill:#ffb74d}svg .polling{fill:#e0e0e0}svg .bracket{fill:#ffe082}\
svg .curve{fill:none;stroke:#1565c0;stroke-width:3}svg .cut{fill:#c62828;font-weight:700}\
form{margin:.3rem 0}form.inline{display:inline-block;margin-right:.6rem}\
input[type=number]{width:7rem}button{font:inherit;padding:.3rem .7rem}\
details{margin:.3rem 0 1rem}\
@media (max-width:40rem){#probe th,#probe td{display:block;width:auto}#probe th{border-bottom:0;padding-bottom:0}.verdict{font-size:1.8rem;padding:.8rem 1rem}}";

/// Everything one view of the page shows; the handlers gather it from the service.
pub struct PageView {
    /// The probe this view ran, or why none could run.
    pub probe: Result<ProbeResult, Error>,
    /// The page's strategy (asked for, or the server's default).
    pub strategy: Strategy,
    /// The lab's delay link; `None` outside a lab.
    pub link: Option<DelaySettings>,
    /// The lab's servers; `None` outside a lab.
    pub servers: Option<Vec<ServerStatus>>,
    /// The service's last probes, oldest first, and how many it keeps.
    pub history: Vec<std::sync::Arc<ProbeResult>>,
    pub history_capacity: usize,
    pub query: PageQuery,
    /// Live mode (`?watch=1`).
    pub watch: bool,
}

/// The whole page.
pub fn render(view: &PageView) -> String {
    let title = match &view.probe {
        Ok(probe) => verdict_text(probe.verdict).1,
        Err(_) => "no probe",
    };
    let mut html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <link rel=\"icon\" href=\"data:,\">\
         <title>lagprobe: {}</title><style>{STYLE}</style>{}</head><body>\
         <h1>lagprobe: read-after-write on a replica</h1>",
        escape(title),
        live_head(view.watch),
    );
    html.push_str(&controls::strategy_links(&view.query, view.strategy));
    let _ = write!(html, "<div id=\"live\">{}</div>", render_live(view));
    if let Some(link) = &view.link {
        html.push_str(&controls::delay_forms(link, &view.query));
    }
    html.push_str(&footer(view));
    html.push_str("</body></html>\n");
    html
}

/// Live mode's script, or the reload that stands in for it without JavaScript.
fn live_head(watch: bool) -> String {
    if !watch {
        return String::new();
    }
    format!(
        "<noscript><meta http-equiv=\"refresh\" content=\"{NOSCRIPT_REFRESH_SECONDS}\"></noscript>\
         <script src=\"/test/live.js\" defer></script>"
    )
}

/// The links under the page: again (every query field kept), the same probe as JSON (the
/// probe's fields kept), and live mode on or off.
fn footer(view: &PageView) -> String {
    let again = view.query.url("/test/");
    let json = view.query.without(&PAGE_ONLY_FIELDS).url("/api/probe");
    let (live_href, live_words) = if view.watch {
        (
            view.query.without(&["watch"]).url("/test/"),
            "Stop live mode",
        )
    } else {
        (view.query.with("watch", "1").url("/test/"), "Live mode")
    };
    let status = if view.watch {
        "<p id=\"live-status\" class=\"note\" role=\"status\">Live mode: this page reloads \
         every few seconds (with JavaScript, probes stream in instead).</p>"
    } else {
        ""
    };
    format!(
        "{status}<p><a class=\"button\" id=\"again\" href=\"{}\">Write and read again</a> \
         <a id=\"json\" href=\"{}\">same probe as JSON</a> · \
         <a id=\"live-toggle\" href=\"{}\">{live_words}</a></p>",
        escape(&again),
        escape(&json),
        escape(&live_href)
    )
}

/// The part of the page that live mode redraws with every probe: the verdict, the
/// timeline, the figures, the history and the lab's state.
pub fn render_live(view: &PageView) -> String {
    let mut html = match &view.probe {
        Ok(probe) => probe_section(probe, view.link.as_ref()),
        Err(error) => error_section(error, view.link.as_ref()),
    };
    html.push_str(&charts::history(
        &view.history,
        view.history_capacity,
        view.strategy,
        view.link.as_ref(),
    ));
    if let Some(servers) = &view.servers {
        html.push_str(&controls::servers_table(servers, &view.query));
    }
    html
}

fn row(html: &mut String, label: &str, value_html: &str, note: &str) {
    let _ = write!(html, "<tr><th>{}</th><td>{value_html}", escape(label));
    if !note.is_empty() {
        let _ = write!(html, "<div class=\"note\">{}</div>", escape(note));
    }
    html.push_str("</td></tr>");
}

fn delay_row(html: &mut String, link: Option<&DelaySettings>) {
    if let Some(link) = link {
        row(
            html,
            "Lab delay (primary → replica)",
            // The link's settings as data too, for live mode to refresh the lab's form
            // (outside the redrawn part) when they change elsewhere.
            &format!(
                "<span id=\"lab-link\" data-delay-ms=\"{}\" data-jitter-ms=\"{}\" \
                 data-link-down=\"{}\">{}</span>",
                link.delay.as_millis(),
                link.jitter.as_millis(),
                link.link_down,
                escape(&controls::link_words(link))
            ),
            "held by the lab's delay link on the WAL stream",
        );
    }
}

fn ms_text(ms: f64) -> String {
    format!("{} ms", svg::Tenths(ms))
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

/// A probe that ran: its verdict, its timeline and its figures.
fn probe_section(probe: &ProbeResult, link: Option<&DelaySettings>) -> String {
    let (class, headline, explanation) = verdict_text(probe.verdict);
    let mut body = format!(
        "<div class=\"verdict {class}\" id=\"verdict\">{headline}<small>{}</small></div>\
         <figure>{}<figcaption class=\"note\">The probe on one clock from the acknowledged \
         COMMIT; the figures are in the table below.</figcaption></figure><table id=\"probe\">",
        escape(explanation),
        timeline::timeline(probe, link)
    );
    written_row(&mut body, probe);
    read_back_row(&mut body, probe);
    visibility_row(&mut body, probe);
    replay_lag_rows(&mut body, probe);
    optional_lag_rows(&mut body, probe);
    lsn_and_latency_rows(&mut body, probe);
    delay_row(&mut body, link);
    error_row(&mut body, probe);
    body.push_str("</table>");
    body
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
    let read = match (&probe.read_value, probe.verdict) {
        (Some(value), _) => format!("<code>{}</code>", escape(value)),
        (None, Verdict::ReplicaError) => "<em>nothing: the replica could not be read</em>".into(),
        (None, _) => "<em>(row not there yet)</em>".to_owned(),
    };
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

/// The section when no probe could run (bad input, primary unavailable).
fn error_section(error: &Error, link: Option<&DelaySettings>) -> String {
    let mut body = format!(
        "<div class=\"verdict error\" id=\"verdict\">NO PROBE<small>{}</small></div><table id=\"probe\">",
        escape(&error.to_string())
    );
    delay_row(&mut body, link);
    body.push_str("</table>");
    body
}

/// The page when a control's change was refused (a server already stopped, a delay out of
/// range): the reason, and the way back to the page as it was.
pub fn render_refused(error: &Error, query: &PageQuery) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <link rel=\"icon\" href=\"data:,\">\
         <title>lagprobe: not changed</title><style>{STYLE}</style></head><body>\
         <h1>lagprobe: read-after-write on a replica</h1>\
         <div class=\"verdict error\" id=\"verdict\">NOT CHANGED<small>{}</small></div>\
         <p><a class=\"button\" href=\"{}\">Back to the page</a></p></body></html>\n",
        escape(&error.to_string()),
        escape(&query.url("/test/"))
    )
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

    fn view(probe: Result<ProbeResult, Error>, query: &str) -> PageView {
        PageView {
            probe,
            strategy: Strategy::Replica,
            link: Some(DelaySettings {
                delay: std::time::Duration::from_millis(5),
                jitter: std::time::Duration::ZERO,
                link_down: false,
            }),
            servers: None,
            history: Vec::new(),
            history_capacity: 100,
            query: PageQuery::parse(Some(query)),
            watch: query.contains("watch=1"),
        }
    }

    #[test]
    fn the_visibility_bracket_is_markup_not_text() {
        let mut probe = crate::probe::tests::probe_with_token("t");
        probe.replica = "<r1>".into();
        let html = render(&view(Ok(probe), "strategy=replica&poll_interval_ms=3"));
        assert!(
            html.contains("<span class=\"note\">(between 1000.0 ms and 1003.0 ms"),
            "{html}"
        );
        assert!(!html.contains("&lt;span"), "{html}");
        assert!(html.contains("replica &lt;r1&gt;"), "{html}");
        assert!(html.contains("<svg id=\"timeline\""), "{html}");
        assert!(html.contains("(row not there yet)"), "{html}");
    }

    #[test]
    fn again_and_json_keep_the_query_and_live_mode_degrades_to_a_reload() {
        let probe = crate::probe::tests::probe_with_token("t");
        let html = render(&view(
            Ok(probe),
            "watch=1&strategy=replica&poll_interval_ms=3",
        ));
        assert!(
            html.contains(
                "id=\"again\" href=\"/test/?watch=1&amp;strategy=replica&amp;poll_interval_ms=3\""
            ),
            "{html}"
        );
        assert!(
            html.contains(
                "id=\"json\" href=\"/api/probe?strategy=replica&amp;poll_interval_ms=3\""
            ),
            "{html}"
        );
        assert!(
            html.contains("<noscript><meta http-equiv=\"refresh\""),
            "{html}"
        );
        assert!(html.contains("<script src=\"/test/live.js\""), "{html}");
    }

    #[test]
    fn a_replica_error_does_not_say_the_row_is_not_there_yet() {
        let mut probe = crate::probe::tests::probe_with_token("t");
        probe.verdict = Verdict::ReplicaError;
        probe.served_by = None;
        probe.read_latency = None;
        probe.error = Some("connection refused ".repeat(20));
        let html = render(&view(Ok(probe), ""));
        assert!(!html.contains("row not there yet"), "{html}");
        assert!(html.contains("the replica could not be read"), "{html}");
    }

    #[test]
    fn error_page_escapes_the_message() {
        let html = render(&view(Err(Error::invalid("query", "<script>")), ""));
        assert!(html.contains("&lt;script&gt;"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("5 ms"));
        // Live mode refreshes the lab's form from these.
        assert!(
            html.contains(
                "id=\"lab-link\" data-delay-ms=\"5\" data-jitter-ms=\"0\" data-link-down=\"false\""
            ),
            "{html}"
        );
        let refused = render_refused(&Error::invalid("delay_ms", "<b>"), &PageQuery::default());
        assert!(refused.contains("&lt;b&gt;") && refused.contains("href=\"/test/\""));
    }
}
