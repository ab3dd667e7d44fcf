//! The probe as a picture, drawn on the server: a time axis from the acknowledged COMMIT
//! at 0, the strategy's read and its verdict on one lane (with lsn-wait's wait or fallback),
//! the replica's polling on the other (the last read that missed the row and the first
//! that saw it), and the lab's configured delay. A `<title>` and `<desc>` say the same in
//! words for screen readers; the table beside it has every figure.

use std::fmt::Write as _;

use super::{
    escape, ms_text,
    svg::{self, DELAY_COLOUR, PLOT_LEFT, PLOT_RIGHT, Scale, WIDTH},
};
use crate::{
    lab::DelaySettings,
    probe::{ProbeResult, ServedBy, Verdict, millis},
};

// Rows from the top: the commit's label, the delay's, the read lane (label, bar, words),
// the replica lane (label, bar, its two marks' labels), the axis.
const HEIGHT: f64 = 272.0;
const MARK_ROW_Y: f64 = 42.0;
const READ_LANE_Y: f64 = 84.0;
const REPLICA_LANE_Y: f64 = 160.0;
const AXIS_Y: f64 = 236.0;

/// The last millisecond the picture shows: a little past everything it marks.
fn horizon_ms(probe: &ProbeResult, link: Option<&DelaySettings>) -> f64 {
    let delay_ms = link
        .filter(|link| !link.link_down)
        .map_or(0.0, |link| millis(link.delay + link.jitter));
    [
        probe.read_latency,
        probe.visible_after,
        probe.still_stale_at,
        probe.waited,
    ]
    .into_iter()
    .flatten()
    .map(millis)
    .fold(delay_ms, f64::max)
    .max(4.0)
        * 1.12
}

/// The timeline as an inline `<svg>` (`id="timeline"`).
pub fn timeline(probe: &ProbeResult, link: Option<&DelaySettings>) -> String {
    let scale = Scale {
        max: horizon_ms(probe, link),
        from: PLOT_LEFT,
        to: PLOT_RIGHT,
    };
    let mut svg = format!(
        "<svg id=\"timeline\" class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" \
         aria-labelledby=\"timeline-title timeline-desc\">\
         <title id=\"timeline-title\">Timeline of this probe</title>\
         <desc id=\"timeline-desc\">{}</desc>",
        escape(&description(probe, link))
    );
    delay_mark(&mut svg, scale, link);
    let zero = scale.at(0.0);
    let _ = write!(
        svg,
        "<line x1=\"{zero:.1}\" y1=\"30\" x2=\"{zero:.1}\" y2=\"{AXIS_Y}\" class=\"commit\"/>"
    );
    svg::label(
        &mut svg,
        zero - 4.0,
        22.0,
        "COMMIT acknowledged (0)",
        "mark",
    );
    read_lane(&mut svg, scale, probe);
    replica_lane(&mut svg, scale, probe);
    svg::time_axis(&mut svg, scale, AXIS_Y);
    svg.push_str("</svg>");
    svg
}

/// The configured delay as a dashed line (and its jitter as a band), or the cut link.
fn delay_mark(svg: &mut String, scale: Scale, link: Option<&DelaySettings>) {
    let Some(link) = link else { return };
    if link.link_down {
        svg::label(
            svg,
            PLOT_RIGHT,
            MARK_ROW_Y,
            "link cut: no WAL reaches the replica",
            "mark cut",
        );
        return;
    }
    let x = scale.at(millis(link.delay));
    if !link.jitter.is_zero() {
        let end = scale.at(millis(link.delay + link.jitter));
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"30\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{DELAY_COLOUR}\" \
             opacity=\"0.12\"/>",
            end - x,
            AXIS_Y - 30.0
        );
    }
    let _ = write!(
        svg,
        "<line x1=\"{x:.1}\" y1=\"30\" x2=\"{x:.1}\" y2=\"{AXIS_Y}\" stroke=\"{DELAY_COLOUR}\" \
         stroke-width=\"2\" stroke-dasharray=\"6 4\"/>"
    );
    let mut text = format!("lab delay {} ms", link.delay.as_millis());
    if !link.jitter.is_zero() {
        let _ = write!(text, " + up to {} ms jitter", link.jitter.as_millis());
    }
    svg::label(svg, x, MARK_ROW_Y, &text, "mark delay");
}

/// The strategy's read: a bar from the commit to its answer, the wait inside it, and the
/// verdict's marker and words at its end.
fn read_lane(svg: &mut String, scale: Scale, probe: &ProbeResult) {
    svg::label(
        svg,
        PLOT_LEFT - 6.0,
        READ_LANE_Y - 16.0,
        &format!("the strategy's read ({})", probe.strategy),
        "lane",
    );
    let Some(read_latency) = probe.read_latency else {
        svg::label(
            svg,
            PLOT_LEFT,
            READ_LANE_Y + 5.0,
            "no answer: the replica could not be read",
            "mark",
        );
        return;
    };
    let end = scale.at(millis(read_latency));
    bar(svg, scale.at(0.0), end, READ_LANE_Y, "read");
    if let Some(waited) = probe.waited {
        bar(
            svg,
            scale.at(0.0),
            scale.at(millis(waited)),
            READ_LANE_Y,
            "wait",
        );
    }
    svg::marker(svg, end, READ_LANE_Y, probe.verdict, 8.0);
    // From the left edge: the words can be as wide as the picture, wherever the read ends.
    let words = read_words(probe);
    svg::label(svg, PLOT_LEFT - 6.0, READ_LANE_Y + 26.0, &words, "mark");
}

fn bar(svg: &mut String, from: f64, to: f64, y: f64, class: &str) {
    let _ = write!(
        svg,
        "<rect x=\"{from:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"10\" class=\"{class}\"/>",
        y - 5.0,
        (to - from).max(1.0)
    );
}

/// The read's verdict in words (never by colour alone), with who served it and the wait.
fn read_words(probe: &ProbeResult) -> String {
    let verdict = match probe.verdict {
        Verdict::Stale => "STALE",
        Verdict::Fresh => "CONSISTENT",
        Verdict::ReplicaError => "REPLICA ERROR",
    };
    let served = match probe.served_by {
        Some(ServedBy::Replica) => "replica".to_owned(),
        Some(ServedBy::Primary) => "primary".to_owned(),
        Some(ServedBy::Fallback) => "primary after the wait timed out".to_owned(),
        None => "nobody".to_owned(),
    };
    let read_ms = probe.read_latency.map_or(0.0, millis);
    match probe.waited {
        Some(waited) if probe.served_by == Some(ServedBy::Fallback) => format!(
            "{verdict}: fell back to the primary after {}",
            ms_text(millis(waited))
        ),
        Some(waited) => format!(
            "{verdict}: waited {}, read at {}",
            ms_text(millis(waited)),
            ms_text(read_ms)
        ),
        None => format!("{verdict} read ({served}) at {}", ms_text(read_ms)),
    }
}

/// The replica polled until the row showed: the bracket between the last miss and the
/// first hit, shaded, each end marked and labelled.
fn replica_lane(svg: &mut String, scale: Scale, probe: &ProbeResult) {
    svg::label(
        svg,
        PLOT_LEFT - 6.0,
        REPLICA_LANE_Y - 16.0,
        &format!(
            "the replica ({}), polled until the row shows",
            probe.replica
        ),
        "lane",
    );
    let y = REPLICA_LANE_Y;
    match (probe.still_stale_at, probe.visible_after) {
        (Some(missed), Some(seen)) => {
            let (from, to) = (scale.at(millis(missed)), scale.at(millis(seen)));
            bar(svg, scale.at(0.0), from, y, "polling");
            bar(svg, from, to, y, "bracket");
            svg::marker(svg, from, y, Verdict::Stale, 7.0);
            svg::marker(svg, to, y, Verdict::Fresh, 7.0);
            let missed_text = format!("last miss {}", ms_text(millis(missed)));
            svg::label(svg, from, y + 26.0, &missed_text, "mark");
            let seen_text = format!("first hit {}", ms_text(millis(seen)));
            svg::label(svg, to, y + 46.0, &seen_text, "mark");
        }
        (None, Some(seen)) => {
            let to = scale.at(millis(seen));
            svg::marker(svg, to, y, Verdict::Fresh, 7.0);
            let text = format!("there at the first read, {}", ms_text(millis(seen)));
            svg::label(svg, to, y + 26.0, &text, "mark");
        }
        (Some(missed), None) => {
            let to = scale.at(millis(missed));
            bar(svg, scale.at(0.0), to, y, "polling");
            svg::marker(svg, to, y, Verdict::Stale, 7.0);
            let text = if probe.visibility_timed_out {
                "still missing at the timeout"
            } else {
                "still missing when polling stopped"
            };
            svg::label(svg, to, y + 26.0, text, "mark");
        }
        (None, None) => {
            let text = probe.error.as_ref().map_or(
                "not measured",
                |_| "not measured: the replica could not be read",
            );
            svg::label(svg, PLOT_LEFT, y + 5.0, text, "mark");
        }
    }
}

/// The picture in words: what a screen reader says instead.
fn description(probe: &ProbeResult, link: Option<&DelaySettings>) -> String {
    let mut text = String::from("The COMMIT was acknowledged at 0 ms. ");
    match probe.read_latency {
        Some(_) => {
            let _ = write!(text, "The strategy's read: {}. ", read_words(probe));
        }
        None => text.push_str("The replica could not be read. "),
    }
    if let Some(missed) = probe.still_stale_at {
        let _ = write!(
            text,
            "The last replica read that missed the row was sent at {}. ",
            ms_text(millis(missed))
        );
    }
    if let Some(seen) = probe.visible_after {
        let _ = write!(
            text,
            "The first that saw it returned at {}. ",
            ms_text(millis(seen))
        );
    }
    match link {
        Some(link) if link.link_down => text.push_str("The lab's link is cut."),
        Some(link) => {
            let _ = write!(
                text,
                "The lab delays the WAL by {} ms.",
                link.delay.as_millis()
            );
        }
        None => {}
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::probe_with_token;
    use std::time::Duration;

    #[test]
    fn marks_the_commit_the_read_the_bracket_and_the_delay() {
        let probe = probe_with_token("t");
        let link = DelaySettings {
            delay: Duration::from_millis(1000),
            jitter: Duration::ZERO,
            link_down: false,
        };
        let svg = timeline(&probe, Some(&link));
        for expected in [
            "COMMIT acknowledged (0)",
            "STALE read (replica) at 1.0 ms",
            "last miss 1000.0 ms",
            "first hit 1003.0 ms",
            "lab delay 1000 ms",
            "<title id=\"timeline-title\">",
        ] {
            assert!(svg.contains(expected), "{expected} in {svg}");
        }
        let cut = timeline(
            &probe,
            Some(&DelaySettings {
                link_down: true,
                ..link
            }),
        );
        assert!(cut.contains("link cut"), "{cut}");
        assert!(!cut.contains("lab delay"), "{cut}");
    }
}
