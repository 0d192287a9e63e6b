//! The bar chart of `pvstack bench`: median IOPS (for network workloads,
//! frames per second) per workload, one bar per mode, min-max whiskers, on
//! a log scale (the modes differ by orders of magnitude).

use std::path::Path;

use plotters::prelude::*;

use super::summary::Report;
use crate::error::{Error, Result};

const MODE_COLOURS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// Draws `report` as an SVG bar chart into `path`.
pub fn draw(report: &Report, path: &Path) -> Result<()> {
    draw_svg(report, path).map_err(|e| Error::Bench {
        what: format!("chart {}", path.display()),
        reason: e.to_string(),
    })
}

fn draw_svg(report: &Report, path: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut workloads: Vec<&str> = Vec::new();
    let mut modes: Vec<&str> = Vec::new();
    for s in &report.results {
        if !workloads.contains(&s.workload.as_str()) {
            workloads.push(&s.workload);
        }
        if !modes.contains(&s.mode.as_str()) {
            modes.push(&s.mode);
        }
    }
    let top = report
        .results
        .iter()
        .map(|s| s.iops.max)
        .fold(10.0f64, f64::max);
    let bottom = report
        .results
        .iter()
        .map(|s| s.iops.min)
        .filter(|&v| v > 0.0)
        .fold(top, f64::min)
        .min(10.0)
        / 2.0;
    // Network rows plot frames from the guest per second on the same axis.
    let rate = if workloads.iter().any(|w| w.starts_with("net-")) {
        "IOPS or net frames/s"
    } else {
        "IOPS"
    };
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = workloads.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "pvstack bench: median {rate} (log scale) of {} run(s) of {} s, whiskers min-max",
                report.repetitions, report.duration_secs
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups, (bottom..top * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(workloads.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 {
                workloads.get(i).map_or(String::new(), |w| w.to_string())
            } else {
                String::new()
            }
        })
        .y_desc(rate)
        .y_label_formatter(&|v| iops_label(*v))
        .draw()?;
    let width = 0.8 / modes.len().max(1) as f64;
    for (m, mode) in modes.iter().enumerate() {
        let colour = MODE_COLOURS[m % MODE_COLOURS.len()];
        let bars: Vec<_> = report
            .results
            .iter()
            .filter(|s| s.mode == *mode)
            .filter_map(|s| {
                let g = workloads.iter().position(|w| *w == s.workload)? as f64;
                Some((g + 0.1 + width * m as f64, s))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|(x, s)| {
                Rectangle::new(
                    [(*x, bottom), (*x + width * 0.9, s.iops.median.max(bottom))],
                    colour.filled(),
                )
            }))?
            .label(*mode)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
        chart.draw_series(bars.iter().map(|(x, s)| {
            let mid = *x + width * 0.45;
            PathElement::new(
                vec![(mid, s.iops.min.max(bottom)), (mid, s.iops.max.max(bottom))],
                BLACK.stroke_width(2),
            )
        }))?;
        chart.draw_series(bars.iter().map(|(x, s)| {
            Text::new(
                iops_label(s.iops.median),
                // Above the whisker, so the two never overlap.
                (*x, s.iops.max.max(bottom) * 1.25),
                ("sans-serif", 11),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// An IOPS value with as many decimals as its size needs (the legacy
/// controller moves a 1 MiB request in several seconds).
fn iops_label(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
