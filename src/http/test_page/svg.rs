//! What the page's inline SVG pictures share: a linear scale from milliseconds (or a
//! probability) to picture units, round tick values, and escaped text at a point.

use std::fmt::Write as _;

use super::escape_into;

/// The pictures' width in viewBox units; they scale to the page (and to a 390 px phone).
pub const WIDTH: f64 = 480.0;
/// Left and right ends of the plotting area.
pub const PLOT_LEFT: f64 = 16.0;
pub const PLOT_RIGHT: f64 = 464.0;

pub const STALE_COLOUR: &str = "#c62828";
pub const FRESH_COLOUR: &str = "#2e7d32";
pub const ERROR_COLOUR: &str = "#ef6c00";
pub const DELAY_COLOUR: &str = "#1565c0";

/// A picture coordinate (or any figure) as `{:.1}` would print it, from integer digits
/// written straight out: formatting floats with a precision, then even formatting the
/// parts through `write!`, took most of what the charts' hundred markers cost a page
/// (profiled under the page bench).
#[derive(Debug, Clone, Copy)]
pub struct Tenths(pub f64);

impl std::fmt::Display for Tenths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.0.is_finite() || self.0.abs() >= 1e15 {
            return write!(f, "{:.1}", self.0);
        }
        let tenths = (self.0 * 10.0).round() as i64;
        // Right to left: the tenth, the point, the whole part (at least a 0), the sign.
        let mut text = [0u8; 20];
        let mut at = text.len();
        let mut rest = tenths.unsigned_abs();
        let mut push = |byte: u8| {
            at -= 1;
            text[at] = byte;
        };
        push(b'0' + (rest % 10) as u8);
        rest /= 10;
        push(b'.');
        loop {
            push(b'0' + (rest % 10) as u8);
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if tenths < 0 {
            push(b'-');
        }
        f.write_str(std::str::from_utf8(&text[at..]).unwrap_or_default())
    }
}

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
        "<text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\" class=\"{class}\">",
        Tenths(x + dx),
        Tenths(y)
    );
    escape_into(svg, text);
    svg.push_str("</text>");
}

/// A horizontal axis at `y` with tick marks and labels.
pub fn time_axis(svg: &mut String, scale: Scale, y: f64) {
    let _ = write!(
        svg,
        "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" class=\"axis\"/>",
        Tenths(scale.from),
        Tenths(scale.to),
        y = Tenths(y)
    );
    for tick in ticks(scale.max) {
        let x = Tenths(scale.at(tick));
        let _ = write!(
            svg,
            "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" class=\"axis\"/>\
             <text x=\"{x}\" y=\"{}\" text-anchor=\"middle\" class=\"tick\">{}</text>",
            Tenths(y),
            Tenths(y + 6.0),
            Tenths(y + 22.0),
            ms_label(tick)
        );
    }
}

/// The marker of a verdict: a triangle for stale, a circle for fresh, a cross for an
/// error, so that shape tells what colour does.
pub fn marker(svg: &mut String, x: f64, y: f64, verdict: crate::probe::Verdict, size: f64) {
    use crate::probe::Verdict;
    let (x, y, s) = (Tenths(x), Tenths(y), size);
    match verdict {
        Verdict::Stale => {
            let _ = write!(
                svg,
                "<path d=\"M{x} {}L{} {}L{} {}Z\" fill=\"{STALE_COLOUR}\"/>",
                Tenths(y.0 - s),
                Tenths(x.0 + s),
                Tenths(y.0 + s * 0.8),
                Tenths(x.0 - s),
                Tenths(y.0 + s * 0.8)
            );
        }
        Verdict::Fresh => {
            let _ = write!(
                svg,
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"{}\" fill=\"{FRESH_COLOUR}\"/>",
                Tenths(s * 0.8)
            );
        }
        Verdict::ReplicaError => {
            let s = s * 0.8;
            let (left, right) = (Tenths(x.0 - s), Tenths(x.0 + s));
            let (top, bottom) = (Tenths(y.0 - s), Tenths(y.0 + s));
            let _ = write!(
                svg,
                "<path d=\"M{left} {top}L{right} {bottom}M{left} {bottom}L{right} {top}\" \
                 stroke=\"{ERROR_COLOUR}\" stroke-width=\"3\"/>"
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

    #[test]
    fn tenths_print_as_one_decimal_does() {
        for value in [0.0, 0.04, 1.25, 12.35, 167.96, 464.0, -6.0, -0.4, 1e9 + 0.3] {
            let shown = Tenths(value).to_string();
            let expected = format!("{value:.1}");
            let parsed: f64 = shown.parse().unwrap();
            assert!((parsed - value).abs() <= 0.05 + 1e-9, "{value}: {shown}");
            // Ties may round either way; anything else prints exactly as {:.1} does.
            if ((value * 10.0).fract().abs() - 0.5).abs() > 1e-6 {
                assert_eq!(shown, expected);
            }
        }
        assert_eq!(Tenths(f64::NAN).to_string(), "NaN");
    }
}
