//! The recent history as two charts, drawn per page view from the service's last probes of
//! the page's strategy: commit-to-visible per probe (a strip chart; the marker's shape and
//! colour say the verdict) with the stale ratio and its 95% interval, and the visibility
//! curve P(visible | read issued t ms after the commit). Each has a text equivalent: the
//! strip chart a `<desc>` and a `<title>` per probe (its number, verdict and time), the
//! curve a table behind a `<details>` toggle, which works without JavaScript. (A table of
//! every probe cost a fifth of the page's rate in the benchmark and said no more.)

use std::{fmt::Write as _, sync::Arc, time::Duration};

use super::{
    escape_into, ms_text,
    svg::{self, DELAY_COLOUR, PLOT_LEFT, PLOT_RIGHT, Scale, Tenths, WIDTH},
};
use crate::{
    lab::DelaySettings,
    probe::{
        ProbeResult, VISIBILITY_CURVE_MS, Verdict, millis, visibility_steps, wilson_interval_95,
    },
    settings::Strategy,
};

const HEIGHT: f64 = 220.0;
const PLOT_TOP: f64 = 40.0;
const PLOT_BOTTOM: f64 = 180.0;

/// The history section (`id="history"`): both charts, their tables, and the ratio.
pub fn history(
    all: &[Arc<ProbeResult>],
    capacity: usize,
    strategy: Strategy,
    link: Option<&DelaySettings>,
) -> String {
    let probes: Vec<&ProbeResult> = all
        .iter()
        .map(Arc::as_ref)
        .filter(|probe| probe.strategy == strategy)
        .collect();
    // One string for the whole section, written in place: the drawing is per page view.
    let mut html = String::with_capacity(4096 + 200 * probes.len());
    let _ = write!(
        html,
        "<section id=\"history\"><h2>The last {} {strategy} probes</h2>",
        probes.len()
    );
    if probes.is_empty() {
        let _ = write!(
            html,
            "<p class=\"note\">No {strategy} probe yet among the last {capacity} the service \
             kept. Each load of this page adds one.</p></section>"
        );
        return html;
    }
    let summary = Tally::of(&probes);
    let words = ratio_words(&summary);
    html.push_str("<p id=\"stale-ratio\">");
    escape_into(&mut html, &words);
    html.push_str(
        "</p><h3>Commit to visible, per probe</h3><p class=\"note\">Oldest on the left; a probe \
         whose write was never seen on the replica sits at the top edge.</p>",
    );
    strip_chart(&mut html, &probes, link, &words);
    html.push_str(
        "<h3>Visibility curve</h3><p class=\"note\">P(the write is visible | a replica read \
         issued t ms after the commit), over the same probes.</p>",
    );
    let steps = visibility_steps(probes.iter().copied());
    visibility_chart(&mut html, &steps);
    curve_table(&mut html, &steps);
    let _ = write!(
        html,
        "<p class=\"note\">From the last {} probes the service kept (of any strategy, from \
         this page, the API or gRPC), the {strategy} ones.</p></section>",
        all.len()
    );
    html
}

/// The verdicts counted, with the stale ratio and its 95% interval: what a run's summary
/// says, without the percentiles this page does not show (their histograms would cost more
/// than the rest of the page).
struct Tally {
    stale_count: u32,
    fresh_count: u32,
    replica_error_count: u32,
    stale_ratio: f64,
    stale_ratio_ci95_low: f64,
    stale_ratio_ci95_high: f64,
}

impl Tally {
    fn of(probes: &[&ProbeResult]) -> Tally {
        let count = |verdict| probes.iter().filter(|p| p.verdict == verdict).count() as u32;
        let (stale_count, fresh_count) = (count(Verdict::Stale), count(Verdict::Fresh));
        let judged = stale_count + fresh_count;
        let (low, high) = wilson_interval_95(stale_count, judged);
        Tally {
            stale_count,
            fresh_count,
            replica_error_count: count(Verdict::ReplicaError),
            stale_ratio: if judged == 0 {
                0.0
            } else {
                f64::from(stale_count) / f64::from(judged)
            },
            stale_ratio_ci95_low: low,
            stale_ratio_ci95_high: high,
        }
    }
}

fn ratio_words(summary: &Tally) -> String {
    format!(
        "{} stale, {} consistent, {} replica errors: stale ratio {:.2} (95% interval {:.2} to {:.2})",
        summary.stale_count,
        summary.fresh_count,
        summary.replica_error_count,
        summary.stale_ratio,
        summary.stale_ratio_ci95_low,
        summary.stale_ratio_ci95_high
    )
}

fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Stale => "stale",
        Verdict::Fresh => "consistent",
        Verdict::ReplicaError => "replica error",
    }
}

/// One marker per probe, oldest on the left, at its commit-to-visible time; a probe never
/// seen (timed out, or an error) sits at the top edge. `words` is the tally in words.
fn strip_chart(
    svg: &mut String,
    probes: &[&ProbeResult],
    link: Option<&DelaySettings>,
    words: &str,
) {
    let delay_ms = link.filter(|l| !l.link_down).map(|l| millis(l.delay));
    let top_ms = probes
        .iter()
        .filter_map(|p| p.visible_after.map(millis))
        .chain(delay_ms)
        .fold(1.0, f64::max)
        * 1.1;
    let y = Scale {
        max: top_ms,
        from: PLOT_BOTTOM,
        to: PLOT_TOP,
    };
    let step = (PLOT_RIGHT - PLOT_LEFT - 40.0) / probes.len().max(2) as f64;
    let _ = write!(
        svg,
        "<svg id=\"history-chart\" class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         role=\"img\" aria-labelledby=\"history-title history-desc\">\
         <title id=\"history-title\">Commit to visible, per probe, oldest first</title>\
         <desc id=\"history-desc\">"
    );
    escape_into(svg, words);
    svg.push_str("</desc>");
    value_axis(svg, y);
    if let Some(delay_ms) = delay_ms {
        let at = y.at(delay_ms);
        let _ = write!(
            svg,
            "<line x1=\"{PLOT_LEFT}\" y1=\"{at}\" x2=\"{PLOT_RIGHT}\" y2=\"{at}\" \
             stroke=\"{DELAY_COLOUR}\" stroke-dasharray=\"6 4\"/>",
            at = Tenths(at)
        );
        svg::label(svg, PLOT_RIGHT, at - 6.0, "lab delay now", "mark delay");
    }
    for (index, probe) in probes.iter().enumerate() {
        let x = PLOT_LEFT + 52.0 + step * index as f64;
        let at = probe.visible_after.map_or(PLOT_TOP, |v| y.at(millis(v)));
        svg.push_str("<g class=\"probe\"><title>");
        probe_words(svg, index, probe);
        svg.push_str("</title>");
        svg::marker(svg, x, at, probe.verdict, 6.0);
        svg.push_str("</g>");
    }
    legend(svg);
    svg.push_str("</svg>");
}

/// Tick labels up the left side, ms.
fn value_axis(svg: &mut String, y: Scale) {
    for tick in svg::ticks(y.max) {
        let at = y.at(tick);
        let _ = write!(
            svg,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{PLOT_RIGHT}\" y2=\"{}\" class=\"grid\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\" class=\"tick\">{}</text>",
            Tenths(PLOT_LEFT + 44.0),
            Tenths(at),
            Tenths(at),
            Tenths(PLOT_LEFT + 40.0),
            Tenths(at + 5.0),
            svg::ms_label(tick)
        );
    }
}

/// What the markers mean, in shapes and words.
fn legend(svg: &mut String) {
    let entries = [
        (Verdict::Fresh, "consistent"),
        (Verdict::Stale, "stale"),
        (Verdict::ReplicaError, "replica error"),
    ];
    let mut x = PLOT_LEFT + 52.0;
    for (verdict, words) in entries {
        svg::marker(svg, x, 20.0, verdict, 6.0);
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"26\" class=\"tick\">{words}</text>",
            Tenths(x + 10.0)
        );
        x += 26.0 + 7.5 * words.len() as f64;
    }
}

/// A probe's marker title: its number, verdict and time (our own words and figures only,
/// so nothing to escape).
fn probe_words(svg: &mut String, index: usize, probe: &ProbeResult) {
    let _ = write!(
        svg,
        "probe {}: {}, ",
        index + 1,
        verdict_word(probe.verdict)
    );
    match probe.visible_after {
        Some(v) => {
            let _ = write!(svg, "visible after {} ms", Tenths(millis(v)));
        }
        None => svg.push_str("never seen"),
    }
}

/// P(visible | read issued t ms after the commit) as a step line.
fn visibility_chart(svg: &mut String, steps: &[(Duration, f64)]) {
    let horizon_ms = steps.last().map_or(1.0, |(t, _)| millis(*t)).max(1.0) * 1.1;
    let x = Scale {
        max: horizon_ms,
        from: PLOT_LEFT + 52.0,
        to: PLOT_RIGHT,
    };
    let y = Scale {
        max: 1.0,
        from: PLOT_BOTTOM - 30.0,
        to: PLOT_TOP - 20.0,
    };
    let _ = write!(
        svg,
        "<svg id=\"visibility-chart\" class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         role=\"img\" aria-labelledby=\"curve-title curve-desc\">\
         <title id=\"curve-title\">P(visible | a replica read issued t ms after the commit)</title>\
         <desc id=\"curve-desc\">"
    );
    escape_into(svg, &curve_words(steps));
    svg.push_str("</desc>");
    for (tick, words) in [(0.0, "0"), (0.5, "0.5"), (1.0, "1")] {
        let at = Tenths(y.at(tick));
        let _ = write!(
            svg,
            "<line x1=\"{}\" y1=\"{at}\" x2=\"{PLOT_RIGHT}\" y2=\"{at}\" class=\"grid\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\" class=\"tick\">{words}</text>",
            Tenths(x.from),
            Tenths(x.from - 6.0),
            Tenths(at.0 + 5.0)
        );
    }
    let _ = write!(
        svg,
        "<path d=\"M{} {}",
        Tenths(x.at(0.0)),
        Tenths(y.at(0.0))
    );
    for (after, probability) in steps {
        let _ = write!(
            svg,
            "H{}V{}",
            Tenths(x.at(millis(*after))),
            Tenths(y.at(*probability))
        );
    }
    let _ = write!(svg, "H{PLOT_RIGHT}\" class=\"curve\"/>");
    svg::time_axis(svg, x, PLOT_BOTTOM - 30.0);
    svg.push_str("</svg>");
}

fn curve_words(steps: &[(Duration, f64)]) -> String {
    match (steps.first(), steps.last()) {
        (Some((first, _)), Some((last, probability))) => format!(
            "The first write became visible {} after its commit; by {} the share visible \
             reached {probability:.2}.",
            ms_text(millis(*first)),
            ms_text(millis(*last))
        ),
        _ => "No write became visible in this window.".to_owned(),
    }
}

/// The curve at the fixed points every run's summary uses.
fn curve_table(html: &mut String, steps: &[(Duration, f64)]) {
    html.push_str(
        "<details><summary>The curve as a table</summary><table class=\"data\">\
         <tr><th>read issued after</th><th>P(visible)</th></tr>",
    );
    for after_ms in VISIBILITY_CURVE_MS {
        let limit = Duration::from_millis(u64::from(after_ms));
        let probability = steps
            .iter()
            .take_while(|(after, _)| *after <= limit)
            .last()
            .map_or(0.0, |(_, probability)| *probability);
        let _ = write!(
            html,
            "<tr><td>{after_ms} ms</td><td>{probability:.2}</td></tr>"
        );
    }
    html.push_str("</table></details>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::probe_with_token;

    #[test]
    fn charts_only_this_strategy_and_tells_the_verdict_in_words() {
        let mut fresh = probe_with_token("b");
        fresh.verdict = Verdict::Fresh;
        fresh.visible_after = Some(Duration::from_millis(2));
        let mut other = probe_with_token("c");
        other.strategy = Strategy::Primary;
        let html = history(
            &[probe_with_token("a"), fresh, other].map(Arc::new),
            100,
            Strategy::Replica,
            None,
        );
        assert!(html.contains("The last 2 replica probes"), "{html}");
        assert!(
            html.contains("1 stale, 1 consistent, 0 replica errors"),
            "{html}"
        );
        assert!(html.contains("stale ratio 0.50 (95% interval"), "{html}");
        assert!(
            html.contains("probe 1: stale, visible after 1003.0 ms"),
            "{html}"
        );
        assert!(html.contains("id=\"visibility-chart\""), "{html}");
        let empty = history(&[], 100, Strategy::LsnWait, None);
        assert!(empty.contains("No lsn-wait probe yet"), "{empty}");
    }
}
