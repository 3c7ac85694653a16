//! The benchmarks' pictures: latency CDFs per method or rig, idle and
//! under `pgbench -c 4`, side by side in one SVG (plotters): commit to
//! durable for the main bench, commit to visible for `bench --visible`.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::{Latency, MethodResult};

const COLORS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// One line of each panel: a label and its samples (ms), each sorted.
pub struct Series {
    pub label: String,
    pub idle: Vec<f64>,
    pub pgbench: Vec<f64>,
}

/// Draws the commit-to-durable CDFs of the main bench into `path`.
pub fn latency_cdfs(rs: &[MethodResult], path: &Path) -> Result<()> {
    let all = |l: &Option<Latency>| l.as_ref().map(|l| l.all_ms.clone()).unwrap_or_default();
    let series: Vec<Series> = rs
        .iter()
        .map(|r| Series {
            label: r.label.clone(),
            idle: all(&r.idle),
            pgbench: all(&r.pgbench),
        })
        .collect();
    cdfs(&series, "commit-to-durable", path)
}

/// Two panels of CDFs of `what` (idle, under pgbench) into the SVG `path`.
pub fn cdfs(series: &[Series], what: &str, path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    let all: Vec<f64> = series
        .iter()
        .flat_map(|r| r.idle.iter().chain(&r.pgbench).copied())
        .collect();
    let lo = all.iter().copied().fold(f64::MAX, f64::min).max(0.1) * 0.8;
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0) * 1.25;
    type Pick = fn(&Series) -> &Vec<f64>;
    let sides: [(&str, Pick); 2] = [
        ("idle: single commits", |r| &r.idle),
        ("under pgbench -c 4", |r| &r.pgbench),
    ];
    for (panel, (title, pick)) in panels.iter().zip(sides) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{what} latency, {title}"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("ms (log scale)")
            .y_desc("fraction of commits")
            .draw()
            .map_err(|e| err(&e))?;
        for (i, r) in series.iter().enumerate() {
            let l = pick(r);
            if l.is_empty() {
                continue;
            }
            let n = l.len() as f64;
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = l
                .iter()
                .enumerate()
                .flat_map(|(k, &v)| [(v.max(lo), k as f64 / n), (v.max(lo), (k + 1) as f64 / n)])
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(r.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
