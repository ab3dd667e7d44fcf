//! What the page's inline SVG pictures share: a linear scale from milliseconds (or a
//! probability) to picture units, round tick values, and escaped text at a point.

use std::fmt::Write as _;

use super::escape;

/// The pictures' width in viewBox units; they scale to the page (and to a 390 px phone).
pub const WIDTH: f64 = 480.0;
/// Left and right ends of the plotting area.
pub const PLOT_LEFT: f64 = 16.0;
pub const PLOT_RIGHT: f64 = 464.0;

pub const STALE_COLOUR: &str = "#c62828";
pub const FRESH_COLOUR: &str = "#2e7d32";
pub const ERROR_COLOUR: &str = "#ef6c00";
pub const DELAY_COLOUR: &str = "#1565c0";

/// Maps `0..=max` onto `from..=to` (picture units; `to < from` for an upward y axis).
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub max: f64,
    pub from: f64,
    pub to: f64,
}

impl Scale {
    pub fn at(&self, value: f64) -> f64 {
        let share = if self.max > 0.0 {
            (value / self.max).clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.from + share * (self.to - self.from)
    }
}

/// About four round ticks from 0 up to `max` (steps of 1, 2 or 5 times a power of ten).
pub fn ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 {
        return vec![0.0];
    }
    let rough = max / 4.0;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * power)
        .find(|step| *step >= rough)
        .unwrap_or(10.0 * power);
    (0..)
        .map(|index| f64::from(index) * step)
        .take_while(|tick| *tick <= max + step * 1e-9)
        .collect()
}

/// A tick's label: whole milliseconds from 10 ms up, one decimal below.
pub fn ms_label(ms: f64) -> String {
    if ms >= 10.0 || ms == 0.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// Text at `(x, y)`, anchored at its start, or at its end in the right part of the
/// picture so that it stays inside.
pub fn label(svg: &mut String, x: f64, y: f64, text: &str, class: &str) {
    let (anchor, dx) = if x > WIDTH * 0.6 {
        ("end", -6.0)
    } else {
        ("start", 6.0)
    };
    let _ = write!(
        svg,
        "<text x=\"{:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\" class=\"{class}\">{}</text>",
        x + dx,
        escape(text)
    );
}

/// A horizontal axis at `y` with tick marks and labels.
pub fn time_axis(svg: &mut String, scale: Scale, y: f64) {
    let _ = write!(
        svg,
        "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" class=\"axis\"/>",
        scale.from, scale.to
    );
    for tick in ticks(scale.max) {
        let x = scale.at(tick);
        let _ = write!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" class=\"axis\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" class=\"tick\">{}</text>",
            y + 6.0,
            y + 22.0,
            escape(&ms_label(tick))
        );
    }
}

/// The marker of a verdict: a triangle for stale, a circle for fresh, a cross for an
/// error, so that shape tells what colour does.
pub fn marker(svg: &mut String, x: f64, y: f64, verdict: crate::probe::Verdict, size: f64) {
    use crate::probe::Verdict;
    match verdict {
        Verdict::Stale => {
            let _ = write!(
                svg,
                "<path d=\"M{:.1} {:.1}L{:.1} {:.1}L{:.1} {:.1}Z\" fill=\"{STALE_COLOUR}\"/>",
                x,
                y - size,
                x + size,
                y + size * 0.8,
                x - size,
                y + size * 0.8
            );
        }
        Verdict::Fresh => {
            let _ = write!(
                svg,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{:.1}\" fill=\"{FRESH_COLOUR}\"/>",
                size * 0.8
            );
        }
        Verdict::ReplicaError => {
            let s = size * 0.8;
            let _ = write!(
                svg,
                "<path d=\"M{:.1} {:.1}L{:.1} {:.1}M{:.1} {:.1}L{:.1} {:.1}\" \
                 stroke=\"{ERROR_COLOUR}\" stroke-width=\"3\"/>",
                x - s,
                y - s,
                x + s,
                y + s,
                x - s,
                y + s,
                x + s,
                y - s
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(1100.0), [0.0, 500.0, 1000.0]);
        assert_eq!(ticks(8.0), [0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(ticks(0.0), [0.0]);
        let scale = Scale {
            max: 100.0,
            from: 10.0,
            to: 110.0,
        };
        assert_eq!(scale.at(50.0), 60.0);
        assert_eq!(scale.at(500.0), 110.0);
    }
}
