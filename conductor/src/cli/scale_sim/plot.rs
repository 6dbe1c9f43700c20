//! The simulator's picture: load with the forecast and its bounds on top,
//! replicas per policy below, sharing the trace's time axis.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use demi_conductor::scaler::decision::Ahead;

use super::sim::{Kind, Outcome};
use super::sweep::{self, Sweep};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(
        "no TrueType font for the plot's labels (looked in {looked}); install fonts-dejavu-core \
         or set DEMI_PLOT_FONT to a .ttf file"
    )]
    NoFont { looked: String },
    #[error("{}: {reason}", path.display())]
    Draw { path: PathBuf, reason: String },
}

/// Fonts looked for, Debian's first; `DEMI_PLOT_FONT` wins.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers a system font once per process: plotters' pure-Rust text
/// renderer ships none.
fn ensure_font() -> Result<(), PlotError> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    let result = FONT.get_or_init(|| {
        let wanted = std::env::var("DEMI_PLOT_FONT").ok();
        let candidates: Vec<&str> = wanted
            .as_deref()
            .into_iter()
            .chain(FONTS.iter().copied())
            .collect();
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // Registered fonts live as long as the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(candidates.join(", "))
    });
    result
        .clone()
        .map_err(|looked| PlotError::NoFont { looked })
}

/// What the axes say.
pub struct Labels<'a> {
    pub title: &'a str,
    /// The load's unit, e.g. "jobs/s".
    pub unit: &'a str,
    /// Trace time of one bucket, in the x axis unit.
    pub step: f64,
    /// The x axis unit, e.g. "days".
    pub time_unit: &'a str,
    /// Coverage of the forecast's interval.
    pub level: f64,
}

/// Writes `<prefix>.svg` and `<prefix>.png`; returns their paths.
pub fn write(
    prefix: &Path,
    values: &[f64],
    outcome: &Outcome,
    labels: &Labels<'_>,
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        prefix,
        |area| draw(area, values, outcome, labels),
        |area| draw(area, values, outcome, labels),
    )
}

/// Writes the sweep's frontier as `<prefix>.svg` and `<prefix>.png`.
pub fn write_frontier(
    prefix: &Path,
    swept: &Sweep,
    title: &str,
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        prefix,
        |area| draw_frontier(area, swept, title),
        |area| draw_frontier(area, swept, title),
    )
}

type Area<DB> = DrawingArea<DB, Shift>;

/// The same picture drawn twice, once per backend (their types differ).
fn both(
    prefix: &Path,
    svg_draw: impl FnOnce(Area<SVGBackend<'_>>) -> Result<(), String>,
    png_draw: impl FnOnce(Area<BitMapBackend<'_>>) -> Result<(), String>,
) -> Result<Vec<PathBuf>, PlotError> {
    ensure_font()?;
    let svg = prefix.with_extension("svg");
    let png = prefix.with_extension("png");
    let size = (1400, 900);
    let error = |path: &Path| {
        let path = path.to_owned();
        move |reason: String| PlotError::Draw { path, reason }
    };
    svg_draw(SVGBackend::new(&svg, size).into_drawing_area()).map_err(error(&svg))?;
    png_draw(BitMapBackend::new(&png, size).into_drawing_area()).map_err(error(&png))?;
    Ok(vec![svg, png])
}

/// Every setting as a faint dot, each policy's frontier as a line, the
/// configuration given as a ringed point.
fn draw_frontier<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    swept: &Sweep,
    title: &str,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, ("sans-serif", 26)).map_err(e)?;
    let shown: Vec<&sweep::Point> = swept
        .points
        .iter()
        .filter(|p| p.kind != Kind::Static)
        .collect();
    let fixed = sweep::frontier(&swept.points, Kind::Static);
    // The static pool's cheap end starves the queue for the whole trace;
    // zoom on where the scalers are, with the static frontier clipped.
    let x_low = shown
        .iter()
        .map(|p| p.replica_seconds)
        .fold(f64::INFINITY, f64::min);
    let x_high = shown.iter().map(|p| p.replica_seconds).fold(0.0, f64::max);
    let y_high = shown.iter().map(|p| p.violation).fold(0.0, f64::max);
    if !(x_low.is_finite() && x_high > x_low) {
        return Err("nothing to plot".to_owned());
    }
    let pad = (x_high - x_low) * 0.05;
    let (x0, x1) = (x_low - pad, x_high + pad);
    let y1 = (y_high * 1.05).max(1.0);
    let mut chart = panel(
        &root,
        x0..x1,
        0.0..y1,
        "replica-seconds",
        "SLO violation (s of queue wait over the SLO)",
    )
    .map_err(e)?;
    for (kind, color) in Kind::SWEPT.into_iter().zip(POLICY_COLORS) {
        let own = swept.points.iter().filter(|p| p.kind == kind);
        chart
            .draw_series(
                own.clone()
                    .filter(|p| p.replica_seconds >= x0 && p.replica_seconds <= x1)
                    .map(|p| {
                        Circle::new(
                            (p.replica_seconds, p.violation.min(y1)),
                            3,
                            color.mix(0.35).filled(),
                        )
                    }),
            )
            .map_err(e)?;
        let line: Vec<(f64, f64)> = if kind == Kind::Static {
            fixed
                .iter()
                .map(|p| (p.replica_seconds, p.violation.min(y1)))
                .collect()
        } else {
            sweep::frontier(&swept.points, kind)
                .iter()
                .map(|p| (p.replica_seconds, p.violation))
                .collect()
        };
        chart
            .draw_series(LineSeries::new(
                line.into_iter().filter(|(x, _)| *x >= x0 && *x <= x1),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(format!("{} frontier", kind.name()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                own.filter(|p| p.default && p.replica_seconds >= x0 && p.replica_seconds <= x1)
                    .map(|p| {
                        Circle::new(
                            (p.replica_seconds, p.violation.min(y1)),
                            9,
                            color.stroke_width(3),
                        )
                    }),
            )
            .map_err(e)?;
    }
    chart
        .draw_series(std::iter::once(Circle::new(
            (x0, -y1),
            9,
            BLACK.stroke_width(3),
        )))
        .map_err(e)?
        .label("the configuration given")
        .legend(|(x, y)| Circle::new((x + 10, y), 6, BLACK.stroke_width(2)));
    legend_at(&mut chart, SeriesLabelPosition::UpperRight).map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

const POLICY_COLORS: [RGBColor; 4] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(120, 120, 120),
    RGBColor(204, 121, 167),
];

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    values: &[f64],
    outcome: &Outcome,
    labels: &Labels<'_>,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(labels.title, ("sans-serif", 26)).map_err(e)?;
    let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 / 2);
    let x_end = values.len().max(1) as f64 * labels.step;
    let x = |i: usize| i as f64 * labels.step;
    let highest = values
        .iter()
        .copied()
        .chain(outcome.forecast.iter().flatten().map(|a| a.upper))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let x_desc = format!("trace time ({})", labels.time_unit);

    let y_desc = format!("load ({})", labels.unit);
    let mut load = panel(
        &top,
        0.0..x_end,
        0.0..(highest * 1.05).max(1.0),
        &x_desc,
        &y_desc,
    )
    .map_err(e)?;
    let band = RGBColor(0, 158, 115);
    for segment in segments(&outcome.forecast) {
        let mut polygon: Vec<(f64, f64)> = segment.iter().map(|&(i, a)| (x(i), a.upper)).collect();
        polygon.extend(segment.iter().rev().map(|&(i, a)| (x(i), a.lower)));
        load.draw_series(std::iter::once(Polygon::new(polygon, band.mix(0.2))))
            .map_err(e)?;
    }
    load.draw_series(std::iter::once(Rectangle::new(
        [(0.0, 0.0), (0.0, 0.0)],
        band.mix(0.2).filled(),
    )))
    .map_err(e)?
    .label(format!("forecast {:.0} % interval", labels.level * 100.0))
    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], band.mix(0.2).filled()));
    load.draw_series(LineSeries::new(
        outcome
            .forecast
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.map(|a| (x(i), a.point))),
        band.stroke_width(1),
    ))
    .map_err(e)?
    .label("forecast")
    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], band.stroke_width(2)));
    load.draw_series(LineSeries::new(
        values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| (x(i), *v)),
        BLACK.stroke_width(1),
    ))
    .map_err(e)?
    .label("load")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    legend(&mut load).map_err(e)?;

    let most = outcome
        .runs
        .iter()
        .flat_map(|r| r.replicas.iter().copied())
        .max()
        .unwrap_or(1);
    let mut pool = panel(
        &bottom,
        0.0..x_end,
        0.0..f64::from(most) + 1.0,
        &x_desc,
        "replicas",
    )
    .map_err(e)?;
    for (run, color) in outcome.runs.iter().zip(POLICY_COLORS) {
        // Steps: a count holds until the next decision.
        let mut points = Vec::with_capacity(run.replicas.len() * 2);
        let mut previous = None;
        for (i, r) in run.replicas.iter().enumerate() {
            let y = f64::from(*r);
            if let Some(p) = previous {
                points.push((x(i), p));
            }
            points.push((x(i), y));
            previous = Some(y);
        }
        pool.draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(e)?
            .label(run.policy)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut pool).map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart with its axes drawn and named.
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    x_desc: &str,
    y_desc: &str,
) -> Result<Chart<'a, DB>, DrawingAreaErrorKind<DB::ErrorType>> {
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 16))
        .draw()?;
    Ok(chart)
}

fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    legend_at(chart, SeriesLabelPosition::UpperLeft)
}

fn legend_at<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    position: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
}

/// Runs of consecutive buckets that have a forecast.
fn segments(forecast: &[Option<Ahead>]) -> Vec<Vec<(usize, Ahead)>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    for (i, f) in forecast.iter().enumerate() {
        match f {
            Some(a) => current.push((i, *a)),
            None if !current.is_empty() => out.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}
