//! The benchmark's plots, as SVG. Plotters' SVG backend writes text as `<text>` elements that the
//! viewer renders, so plotters is built without its `ttf` feature and nothing here needs
//! fontconfig, freetype or a font file. A PNG would need a font to rasterize its text, so there
//! is none.

use std::path::Path;

use anyhow::ensure;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

const SIZE: (u32, u32) = (960, 600);
/// Tableau's ten colours minus grey and olive: all readable on white, unlike some of plotters'
/// palettes.
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// One point of a curve against the connection count: the median of repeated runs and their
/// range, in milliseconds.
#[derive(Clone, Debug)]
pub struct Point {
    pub method: String,
    pub connections: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// A time against the connection count on log-log axes (blackout against N), one line per
/// method in order of first appearance, with an error bar from min to max at each point.
pub fn against_connections(
    path: &Path,
    title: &str,
    y_label: &str,
    points: &[Point],
) -> anyhow::Result<()> {
    ensure!(!points.is_empty(), "nothing to plot in {}", path.display());
    let (x_lo, x_hi) = log_bounds(points.iter().map(|p| p.connections as f64));
    let (y_lo, y_hi) = log_bounds(
        points
            .iter()
            .flat_map(|p| [p.min_ms, p.median_ms, p.max_ms]),
    );
    // Log axes cannot show zero: a zero sits on the bottom edge.
    let y = |v: f64| v.max(y_lo);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc(y_label)
        // Log axes have a light line at every minor step, which drowns the data.
        .light_line_style(TRANSPARENT)
        .x_label_formatter(&log_label)
        .y_label_formatter(&log_label)
        .draw()?;
    for (i, method) in in_order(points.iter().map(|p| p.method.as_str()))
        .into_iter()
        .enumerate()
    {
        let color = color(i);
        let mut series: Vec<&Point> = points.iter().filter(|p| p.method == method).collect();
        series.sort_by_key(|p| p.connections);
        chart
            .draw_series(LineSeries::new(
                series
                    .iter()
                    .map(|p| (p.connections as f64, y(p.median_ms))),
                color.stroke_width(2),
            ))?
            .label(method)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(series.iter().map(|p| {
            ErrorBar::new_vertical(
                p.connections as f64,
                y(p.min_ms),
                y(p.median_ms),
                y(p.max_ms),
                color.filled(),
                10,
            )
        }))?;
    }
    finish(&mut chart, &root)
}

/// The phases of one migration at one connection count, in milliseconds, in the order they
/// happen (freeze, dump, transfer, restore, address move, unfreeze).
#[derive(Clone, Debug)]
pub struct PhaseBar {
    pub connections: usize,
    pub phases: Vec<(String, f64)>,
}

/// One stacked bar per connection count, a colour per phase (in order of first appearance).
pub fn phases(path: &Path, title: &str, bars: &[PhaseBar]) -> anyhow::Result<()> {
    ensure!(!bars.is_empty(), "nothing to plot in {}", path.display());
    let names = in_order(
        bars.iter()
            .flat_map(|b| b.phases.iter().map(|(name, _)| name.as_str())),
    );
    let total = |bar: &PhaseBar| bar.phases.iter().map(|(_, ms)| ms).sum::<f64>();
    let y_hi = bars.iter().map(total).fold(0.0, f64::max).max(1e-3) * 1.15;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((0..bars.len()).into_segmented(), 0.0..y_hi)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("connections")
        .y_desc("time (ms)")
        .y_label_formatter(&|v| format!("{v}"))
        .x_label_formatter(&|segment| match segment {
            SegmentValue::CenterOf(i) => bars
                .get(*i)
                .map_or_else(String::new, |b| b.connections.to_string()),
            _ => String::new(),
        })
        .draw()?;
    for (j, name) in names.into_iter().enumerate() {
        let color = color(j);
        let rects = bars.iter().enumerate().map(|(i, bar)| {
            // The phases before this one in the bar lie below it.
            let below: f64 = bar
                .phases
                .iter()
                .filter(|(other, _)| names_before(&bar.phases, other, name))
                .map(|(_, ms)| ms)
                .sum();
            let own: f64 = bar
                .phases
                .iter()
                .filter(|(other, _)| other == name)
                .map(|(_, ms)| ms)
                .sum();
            let mut rect = Rectangle::new(
                [
                    (SegmentValue::Exact(i), below),
                    (SegmentValue::Exact(i + 1), below + own),
                ],
                color.filled(),
            );
            rect.set_margin(0, 0, 15, 15);
            rect
        });
        chart
            .draw_series(rects)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    finish(&mut chart, &root)
}

/// Draws the legend in the upper left and writes the file: the end of every plot here.
fn finish<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Whether `other` comes before `name` among a bar's phases.
fn names_before(phases: &[(String, f64)], other: &str, name: &str) -> bool {
    let at = |wanted: &str| phases.iter().position(|(n, _)| n == wanted);
    matches!((at(other), at(name)), (Some(a), Some(b)) if a < b)
}

/// Distinct names in order of first appearance.
fn in_order<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = Vec::new();
    for name in names {
        if !seen.contains(&name) {
            seen.push(name);
        }
    }
    seen
}

/// Labels at 1, 2 and 5 times a power of ten only: a log axis has a grid line at every step,
/// and labelling them all makes the labels overlap.
fn log_label(v: &f64) -> String {
    let exponent = v.log10().floor();
    let mantissa = v / 10_f64.powf(exponent);
    if [1.0, 2.0, 5.0, 10.0]
        .iter()
        .any(|m| (mantissa - m).abs() < 1e-6)
    {
        // As many decimals as the power of ten needs, so that float noise does not show.
        let decimals = (-exponent).max(0.0) as usize;
        format!("{v:.decimals$}")
    } else {
        String::new()
    }
}

/// A range around the positive values for a log axis, half a decade of air on each side.
fn log_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if hi == 0.0 {
        return (0.1, 10.0);
    }
    (lo / 3.0, hi * 3.0)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn svg_written(path: &Path) {
        let svg = fs::read_to_string(path).unwrap();
        assert!(svg.starts_with("<svg") && svg.len() > 1000, "{svg}");
    }

    #[test]
    fn plots_made_up_data() {
        let dir = std::env::temp_dir().join(format!("tcpmig-plot-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let ns = [1, 10, 100, 1_000, 10_000, 50_000];
        let methods = [
            ("tcpmig", 20.0, 0.001),
            ("CRIU iptables lock", 5.0, 1.0),
            ("CRIU nftables lock", 5.0, 0.1),
            ("CRIU + tcpmig hook", 30.0, 0.01),
        ];
        let points: Vec<Point> = methods
            .iter()
            .flat_map(|&(method, base, per_conn)| {
                ns.iter().map(move |&n| {
                    let median = base + per_conn * n as f64;
                    Point {
                        method: method.to_owned(),
                        connections: n,
                        median_ms: median,
                        min_ms: median * 0.8,
                        max_ms: median * 1.3,
                    }
                })
            })
            .collect();
        let blackout = dir.join("blackout.svg");
        against_connections(&blackout, "Blackout against N", "blackout (ms)", &points).unwrap();
        svg_written(&blackout);

        let names = [
            "freeze",
            "dump",
            "transfer",
            "restore",
            "address move",
            "unfreeze",
        ];
        let bars: Vec<PhaseBar> = ns
            .iter()
            .map(|&n| PhaseBar {
                connections: n,
                phases: names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| ((*name).to_owned(), (i as f64 + 0.5) * n as f64 / 1e3))
                    .collect(),
            })
            .collect();
        let stacked = dir.join("phases.svg");
        phases(&stacked, "Migration phases", &bars).unwrap();
        svg_written(&stacked);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn phases_stack_in_order() {
        let phases = [("a".to_owned(), 1.0), ("b".to_owned(), 2.0)];
        assert!(names_before(&phases, "a", "b"));
        assert!(!names_before(&phases, "b", "a"));
        assert!(!names_before(&phases, "c", "b"));
        assert_eq!(in_order(["x", "y", "x", "z"].into_iter()), ["x", "y", "z"]);
        let labels: Vec<String> = [0.01, 0.03, 0.1 + 0.2 - 0.1, 1.0, 7.0, 500.0, 10_000.0]
            .iter()
            .map(log_label)
            .collect();
        assert_eq!(labels, ["0.01", "", "0.2", "1", "", "500", "10000"]);
    }
}
