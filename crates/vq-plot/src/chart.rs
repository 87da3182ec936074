//! Line charts: a titled figure of panels, each with its own axes, scale and legend.

use std::ops::Range;
use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use crate::{PALETTE, PlotError, register_font, text};

/// How a panel's y axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear.
    Linear,
    /// Base-10 logarithmic; values ≤ 0 (and non-finite ones) are not drawn.
    Log,
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A line in the series' palette colour.
    Line,
    /// A line with a dot at every point.
    LinePoints,
    /// A thin grey line: a reference level (e.g. "STE = 1"), not a result.
    Reference,
    /// A dot per point with a vertical bar of ± its [`Series::spread`] (a mean ± standard
    /// deviation), no connecting line.
    ErrorBars,
}

/// One named series of (x, y) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub label: String,
    /// Points in drawing order; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// How it is drawn.
    pub mark: Mark,
    /// Half-width of each point's bar ([`Mark::ErrorBars`]; missing entries are 0).
    pub spread: Vec<f64>,
}

impl Series {
    /// Dots with bars of ± `spread` (same order as `points`).
    #[must_use]
    pub fn error_bars(label: impl Into<String>, points: Vec<(f64, f64)>, spread: Vec<f64>) -> Self {
        Self {
            label: label.into(),
            points,
            mark: Mark::ErrorBars,
            spread,
        }
    }

    /// A line.
    #[must_use]
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            mark: Mark::Line,
            spread: Vec::new(),
        }
    }

    /// The same series drawn as `mark`.
    #[must_use]
    pub fn marked(mut self, mark: Mark) -> Self {
        self.mark = mark;
        self
    }
}

/// One chart: title, axis labels (units in them, e.g. "step", "MSE per pixel"), y scale and
/// its series.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Caption above the chart.
    pub title: String,
    /// x axis label.
    pub x_label: String,
    /// y axis label, drawn unrotated left of the axis (ab_glyph does not rotate text): keep it
    /// to a unit or a word and say more in the title.
    pub y_label: String,
    /// y axis mapping.
    pub scale: Scale,
    /// Series, coloured in order from [`PALETTE`] (reference series are grey).
    pub series: Vec<Series>,
    /// Names of the x positions 0, 1, 2, …: when given, the x axis is labelled by them (a
    /// categorical axis) instead of by numbers.
    pub categories: Vec<String>,
}

impl Panel {
    /// An empty panel.
    #[must_use]
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
        scale: Scale,
    ) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            scale,
            series: Vec::new(),
            categories: Vec::new(),
        }
    }

    /// The panel with a categorical x axis: position i is named `categories[i]`.
    #[must_use]
    pub fn categorical(mut self, categories: Vec<String>) -> Self {
        self.categories = categories;
        self
    }

    /// The panel with one more series.
    #[must_use]
    pub fn with(mut self, series: Series) -> Self {
        self.series.push(series);
        self
    }

    /// The points that can be drawn on this panel's scale, with their bars' half-widths.
    fn drawable(&self, s: &Series) -> Vec<(f64, f64, f64)> {
        let ok = |&(x, y, _): &(f64, f64, f64)| {
            x.is_finite() && y.is_finite() && (self.scale == Scale::Linear || y > 0.0)
        };
        s.points
            .iter()
            .enumerate()
            .map(|(i, &(x, y))| {
                let d = s
                    .spread
                    .get(i)
                    .copied()
                    .filter(|d| d.is_finite())
                    .unwrap_or(0.0);
                (x, y, d.abs())
            })
            .filter(ok)
            .collect()
    }
}

/// A titled figure of panels laid out in `columns` columns (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Title above all panels.
    pub title: String,
    /// The panels.
    pub panels: Vec<Panel>,
    /// Panels per row (≥ 1).
    pub columns: usize,
    /// Size of one panel in pixels (width, height).
    pub panel_size: (u32, u32),
}

impl Figure {
    /// A figure with one column of 900×300 panels.
    #[must_use]
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            panels: Vec::new(),
            columns: 1,
            panel_size: (900, 300),
        }
    }

    /// The figure with one more panel.
    #[must_use]
    pub fn panel(mut self, panel: Panel) -> Self {
        self.panels.push(panel);
        self
    }

    /// The figure laid out in `columns` columns.
    #[must_use]
    pub fn columns(mut self, columns: usize) -> Self {
        self.columns = columns.max(1);
        self
    }

    /// The figure with panels of `width`×`height` pixels.
    #[must_use]
    pub fn panel_size(mut self, width: u32, height: u32) -> Self {
        self.panel_size = (width.max(200), height.max(150));
        self
    }
}

const TITLE_HEIGHT: u32 = 40;

/// Draws `figure` into the PNG `path`. A panel without a drawable point shows "no data".
///
/// # Errors
/// [`PlotError::Invalid`] for a figure without panels; [`PlotError::Draw`] if drawing or
/// writing fails.
pub fn line_panels(path: &Path, figure: &Figure) -> Result<(), PlotError> {
    register_font()?;
    if figure.panels.is_empty() {
        return Err(PlotError::Invalid {
            path: path.to_owned(),
            message: "a figure without panels".into(),
        });
    }
    let cols = figure.columns.max(1);
    let rows = figure.panels.len().div_ceil(cols);
    let (pw, ph) = figure.panel_size;
    let size = (pw * cols as u32, ph * rows as u32 + TITLE_HEIGHT);
    // Drawn into memory, then written by `write_png` (which reports a failed write).
    let mut pixels = vec![0u8; 3 * size.0 as usize * size.1 as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| PlotError::draw(path, e);
        root.fill(&WHITE).map_err(err)?;
        let body = root
            .margin(8, 0, 0, 0)
            .titled(&figure.title, text(24.0))
            .map_err(err)?;
        for (area, panel) in body.split_evenly((rows, cols)).iter().zip(&figure.panels) {
            draw_panel(area, panel).map_err(|m| PlotError::draw(path, m))?;
        }
        root.present().map_err(err)?;
    }
    let img = image::RgbImage::from_raw(size.0, size.1, pixels).expect("w·h·3 bytes");
    crate::write_png(path, &img)
}

/// Draws one panel into `area`.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
) -> Result<(), String> {
    let drawn: Vec<Vec<(f64, f64, f64)>> = panel.series.iter().map(|s| panel.drawable(s)).collect();
    // The extent includes the bars (their lower ends only where the scale can show them).
    let points: Vec<(f64, f64)> = drawn
        .concat()
        .into_iter()
        .flat_map(|(x, y, d)| [(x, y), (x, y + d), (x, y - d)])
        .filter(|&(_, y)| panel.scale == Scale::Linear || y > 0.0)
        .collect();
    let Some((x, y)) = bounds(&points) else {
        let (w, h) = area.dim_in_pixel();
        let caption = format!("{}: no data", panel.title);
        let style = text(16.0).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ));
        return area
            .draw_text(&caption, &style, (w as i32 / 2, h as i32 / 2))
            .map_err(|e| e.to_string());
    };
    let x = match panel.categories.len() {
        0 => padded(x, Scale::Linear),
        n => -0.5..(n as f64 - 0.5).max(x.end + 0.5),
    };
    let y = padded(y, panel.scale);
    let corner = legend_corner(&points, &x, &y, panel.scale);
    match panel.scale {
        Scale::Linear => {
            let span = y.end - y.start;
            draw_chart(area, panel, &drawn, x, y, span, corner)
        }
        Scale::Log => {
            let ticks = log_ticks(&y);
            let y = y.log_scale().with_key_points(ticks);
            draw_chart(area, panel, &drawn, x, y, 0.0, corner)
        }
    }
}

/// The x and y extents of `points`, or `None` if there are none.
fn bounds(points: &[(f64, f64)]) -> Option<(Range<f64>, Range<f64>)> {
    let first = points.first()?;
    let mut r = (first.0..first.0, first.1..first.1);
    for &(x, y) in points {
        r.0 = r.0.start.min(x)..r.0.end.max(x);
        r.1 = r.1.start.min(y)..r.1.end.max(y);
    }
    Some(r)
}

/// Tick values of a log axis over `r` (0 < start < end): the powers of ten inside, or where
/// fewer than three fall inside, 1-2-5 steps, or every 1…9 multiple (at most about ten); on
/// a range too narrow for those, evenly spaced values.
fn log_ticks(r: &Range<f64>) -> Vec<f64> {
    let (lo, hi) = (r.start.log10().floor() as i32, r.end.log10().ceil() as i32);
    let within = |mantissas: &[f64]| -> Vec<f64> {
        (lo..=hi)
            .flat_map(|k| mantissas.iter().map(move |m| m * 10f64.powi(k)))
            .filter(|v| r.contains(v))
            .collect()
    };
    for mantissas in [
        &[1.0][..],
        &[1.0, 2.0, 5.0],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    ] {
        let t = within(mantissas);
        if t.len() >= 3 {
            let every = t.len().div_ceil(10);
            return t.into_iter().step_by(every).collect();
        }
    }
    // Less than a factor of ~2 wide: evenly spaced 1-2-5 steps, as on a linear axis.
    let raw = (r.end - r.start) / 4.0;
    let unit = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * unit)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * unit);
    let first = (r.start / step).ceil() as i64;
    (first..)
        .map(|i| i as f64 * step)
        .take_while(|v| *v < r.end)
        .collect()
}

/// The corner of the plot area where the legend covers the fewest of `points` (ties: upper
/// right, upper left, lower right, lower left).
fn legend_corner(
    points: &[(f64, f64)],
    x: &Range<f64>,
    y: &Range<f64>,
    scale: Scale,
) -> SeriesLabelPosition {
    let fy = |v: f64| match scale {
        Scale::Linear => (v - y.start) / (y.end - y.start),
        Scale::Log => (v / y.start).ln() / (y.end / y.start).ln(),
    };
    let fx = |v: f64| (v - x.start) / (x.end - x.start);
    // The legend box takes about the outer 40 % of the width and 35 % of the height.
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let covered = |right: bool, upper: bool| {
        points
            .iter()
            .filter(|&&(px, py)| {
                let (u, v) = (fx(px), fy(py));
                (if right { u > 0.6 } else { u < 0.4 }) && (if upper { v > 0.65 } else { v < 0.35 })
            })
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|&(_, right, upper)| covered(right, upper))
        .map_or(SeriesLabelPosition::UpperRight, |c| c.0)
}

/// `r` with a margin: 4 % of the span on a linear axis (or ±1 / ±10 % of the value for a
/// single value), a factor of the span's 4th root on a log axis (or ×/÷ 2).
fn padded(r: Range<f64>, scale: Scale) -> Range<f64> {
    match scale {
        Scale::Linear if r.end > r.start => {
            let pad = (r.end - r.start) * 0.04;
            r.start - pad..r.end + pad
        }
        Scale::Linear => {
            let pad = if r.start == 0.0 {
                1.0
            } else {
                r.start.abs() * 0.1
            };
            r.start - pad..r.end + pad
        }
        Scale::Log => {
            let f = if r.end > r.start {
                (r.end / r.start).powf(0.04).max(1.05)
            } else {
                2.0
            };
            r.start / f..r.end * f
        }
    }
}

/// Draws `panel` on axes `x`, `y`: `drawn` holds each series' drawable points; linear tick
/// values below `y_snap`·1e-9 in magnitude read "0" (0 for a log axis: no snapping).
fn draw_chart<DB, Y>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    drawn: &[Vec<(f64, f64, f64)>],
    x: Range<f64>,
    y: Y,
    y_snap: f64,
    corner: SeriesLabelPosition,
) -> Result<(), String>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    // Key points of a linear axis are multiples of the tick step computed in floating point:
    // a "0" can come out as −2.8e-17. Values that small against the span are zero.
    let snap = |span: f64| move |v: &f64| tick_label(if v.abs() < span * 1e-9 { 0.0 } else { *v });
    let (x_num, y_tick) = (snap(x.end - x.start), snap(y_snap));
    let categories = &panel.categories;
    let x_tick = |v: &f64| match categories.is_empty() {
        true => x_num(v),
        false => {
            let i = v.round();
            match (i - v).abs() < 1e-6 && i >= 0.0 {
                true => categories.get(i as usize).cloned().unwrap_or_default(),
                false => String::new(),
            }
        }
    };
    let x_labels = match categories.len() {
        0 => 8,
        n => n + 1,
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, text(18.0))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(78)
        .build_cartesian_2d(x, y)
        .map_err(e)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .axis_desc_style(text(15.0))
        .label_style(text(13.0))
        .x_labels(x_labels)
        .y_labels(6)
        .x_label_formatter(&x_tick)
        .y_label_formatter(&y_tick)
        .draw()
        .map_err(e)?;
    let mut colours = PALETTE.iter().cycle();
    for (s, pts) in panel.series.iter().zip(drawn) {
        let colour = match s.mark {
            Mark::Reference => RGBColor(150, 150, 150),
            _ => *colours.next().expect("a cycle"),
        };
        let width = if s.mark == Mark::Reference { 1 } else { 2 };
        let line: Vec<(f64, f64)> = match s.mark {
            Mark::ErrorBars => Vec::new(),
            _ => pts.iter().map(|&(x, y, _)| (x, y)).collect(),
        };
        chart
            .draw_series(LineSeries::new(line, colour.stroke_width(width)))
            .map_err(e)?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(width + 1))
            });
        if matches!(s.mark, Mark::LinePoints | Mark::ErrorBars) {
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(x, y, _)| Circle::new((x, y), 4, colour.filled())),
                )
                .map_err(e)?;
        }
        if s.mark == Mark::ErrorBars {
            // On a log axis a bar that would reach 0 or below starts at the mean.
            let low = |y: f64, d: f64| match panel.scale {
                Scale::Log if y - d <= 0.0 => y,
                _ => y - d,
            };
            let bars = pts.iter().filter(|p| p.2 > 0.0).map(|&(x, y, d)| {
                PathElement::new(vec![(x, low(y, d)), (x, y + d)], colour.stroke_width(2))
            });
            chart.draw_series(bars).map_err(e)?;
        }
    }
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(170, 170, 170))
        .label_font(text(14.0))
        .draw()
        .map_err(e)
}

/// A short tick label: up to 4 significant decimals, exponent form outside [1e-3, 1e5).
///
/// ```
/// assert_eq!(vq_plot::tick_label(0.25), "0.25");
/// assert_eq!(vq_plot::tick_label(1000.0), "1000");
/// assert_eq!(vq_plot::tick_label(0.0001), "1e-4");
/// assert_eq!(vq_plot::tick_label(2.5e-5), "2.5e-5");
/// assert_eq!(vq_plot::tick_label(0.30000000000000004), "0.3");
/// ```
#[must_use]
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}").replace(".0e", "e");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vq-plot-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Pixels that are neither white nor grey (the coloured ink of the series).
    fn coloured(img: &image::RgbImage, rows: Range<u32>) -> usize {
        img.enumerate_pixels()
            .filter(|(_, y, p)| {
                rows.contains(y) && {
                    let [r, g, b] = p.0.map(i32::from);
                    (r - g).abs() + (g - b).abs() + (r - b).abs() > 60
                }
            })
            .count()
    }

    /// Dark pixels (text, axes).
    fn dark(img: &image::RgbImage, rows: Range<u32>) -> usize {
        img.enumerate_pixels()
            .filter(|(_, y, p)| rows.contains(y) && p.0.iter().all(|&c| c < 90))
            .count()
    }

    #[test]
    fn panels_have_their_size_title_text_and_coloured_series() {
        let d = dir("panels");
        let steps: Vec<f64> = (1..=50).map(f64::from).collect();
        let a: Vec<(f64, f64)> = steps.iter().map(|&s| (s, 1.0 / s)).collect();
        let b: Vec<(f64, f64)> = steps.iter().map(|&s| (s, 2.0 / s)).collect();
        let fig = Figure::new("Title")
            .panel(
                Panel::new("loss", "step", "MSE", Scale::Log)
                    .with(Series::line("STE", a.clone()))
                    .with(Series::line("rotation trick", b)),
            )
            .panel(Panel::new("usage", "step", "%", Scale::Linear).with(Series::line("STE", a)))
            .panel(
                Panel::new("empty", "step", "x", Scale::Log).with(Series::line(
                    "nothing positive",
                    vec![(1.0, 0.0), (2.0, -1.0), (3.0, f64::NAN)],
                )),
            );
        let path = d.join("f.png");
        line_panels(&path, &fig).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (900, 3 * 300 + TITLE_HEIGHT));
        // The title band holds text; both drawn panels hold coloured lines and text; the
        // "no data" panel holds text but no series.
        assert!(dark(&img, 0..TITLE_HEIGHT) > 50);
        for p in 0..2 {
            let rows = TITLE_HEIGHT + 300 * p..TITLE_HEIGHT + 300 * (p + 1);
            assert!(coloured(&img, rows.clone()) > 200, "panel {p}");
            assert!(dark(&img, rows) > 500, "panel {p}");
        }
        let last = TITLE_HEIGHT + 600..TITLE_HEIGHT + 900;
        assert_eq!(coloured(&img, last.clone()), 0);
        assert!(dark(&img, last) > 50);
    }

    #[test]
    fn error_bars_span_their_spread_on_a_categorical_axis() {
        let d = dir("bars");
        let panel = |spread: f64| {
            Panel::new("usage", "method", "%", Scale::Linear)
                .categorical(vec!["ste".into(), "rotation".into()])
                .with(Series::error_bars(
                    "mean ± sd",
                    vec![(0.0, 0.5), (1.0, 0.6)],
                    vec![spread, spread],
                ))
                .with(Series::error_bars(
                    "reference",
                    vec![(0.0, 0.2), (1.0, 0.9)],
                    vec![],
                ))
        };
        let draw = |spread: f64| {
            let path = d.join(format!("bars-{spread}.png"));
            line_panels(&path, &Figure::new("bars").panel(panel(spread))).unwrap();
            image::open(&path).unwrap().to_rgb8()
        };
        let (thin, wide) = (draw(0.0), draw(0.2));
        let rows = TITLE_HEIGHT..TITLE_HEIGHT + 300;
        // Dots only, then dots with bars: the bars add coloured pixels; no line joins the points.
        assert!(coloured(&thin, rows.clone()) > 50);
        assert!(coloured(&wide, rows.clone()) > coloured(&thin, rows) + 100);
        let p = panel(0.1);
        let drawn = p.drawable(&p.series[1]);
        assert_eq!(drawn, vec![(0.0, 0.2, 0.0), (1.0, 0.9, 0.0)]);
    }

    #[test]
    fn an_empty_figure_is_refused_naming_the_file() {
        let d = dir("empty");
        let err = line_panels(&d.join("none.png"), &Figure::new("x")).unwrap_err();
        assert!(err.to_string().contains("none.png"), "{err}");
    }

    #[test]
    fn an_unwritable_path_is_an_error_not_a_panic() {
        let fig = Figure::new("x").panel(
            Panel::new("p", "a", "b", Scale::Linear).with(Series::line("s", vec![(0.0, 1.0)])),
        );
        let err = line_panels(Path::new("/nonexistent-dir/f.png"), &fig).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/f.png"), "{err}");
    }

    #[test]
    fn log_ticks_are_inside_the_range_and_several() {
        for (lo, hi) in [
            (0.03, 0.4),
            (1e-4, 1.0),
            (0.0095, 0.012),
            (1e-30, 1e30),
            (2.0, 2.5),
        ] {
            let t = log_ticks(&(lo..hi));
            assert!(t.len() >= 2 && t.len() <= 11, "{lo}..{hi}: {t:?}");
            assert!(t.iter().all(|v| (lo..hi).contains(v)), "{t:?}");
            assert!(t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
        }
        assert_eq!(log_ticks(&(0.03..0.4)), [0.05, 0.1, 0.2]);
    }

    #[test]
    fn the_legend_goes_where_the_lines_are_not() {
        let (x, y) = (0.0..10.0, 0.0..10.0);
        // A curve rising to the upper right: the legend goes upper left.
        let rising: Vec<(f64, f64)> = (0..=10).map(|i| (f64::from(i), f64::from(i))).collect();
        let pos = |p: &[(f64, f64)]| format!("{:?}", legend_corner(p, &x, &y, Scale::Linear));
        assert_eq!(pos(&rising), "UpperLeft");
        let flat_top: Vec<(f64, f64)> = (0..=10).map(|i| (f64::from(i), 9.5)).collect();
        assert_eq!(pos(&flat_top), "LowerRight");
    }

    #[test]
    fn padding_keeps_single_values_and_log_ranges_drawable() {
        assert_eq!(padded(0.0..0.0, Scale::Linear), -1.0..1.0);
        assert_eq!(padded(5.0..5.0, Scale::Linear), 4.5..5.5);
        assert_eq!(padded(1e-3..1e-3, Scale::Log), 5e-4..2e-3);
        let r = padded(1e-4..1.0, Scale::Log);
        assert!(r.start < 1e-4 && r.start > 0.0 && r.end > 1.0, "{r:?}");
    }
}
