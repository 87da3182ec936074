//! PNG outputs: reconstruction grids and training curves.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use tch::{Device, Kind, Tensor};

/// A grid with the originals on the top row and their reconstructions below (images in
/// [−1, 1], (B, C, H, W) with C = 1 or 3), each image scaled ×`zoom`.
///
/// # Errors
/// Unwritable file.
pub fn reconstruction_grid(
    path: &Path,
    originals: &Tensor,
    reconstructions: &Tensor,
    zoom: u32,
) -> Result<()> {
    let rows = [originals, reconstructions];
    let (b, c, h, w) = originals.size4()?;
    let (h, w, b) = (h as u32, w as u32, b as u32);
    let mut img = image::RgbImage::new(b * w * zoom, 2 * h * zoom);
    for (r, t) in rows.iter().enumerate() {
        let px = ((t
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .clamp(-1.0, 1.0)
            + 1.0)
            * 127.5)
            .round()
            .to_kind(Kind::Uint8)
            .contiguous();
        let v = Vec::<u8>::try_from(px.reshape([-1]))?;
        let at = |i: u32, ch: i64, y: u32, x: u32| {
            let ch = if c == 1 { 0 } else { ch };
            v[(((i as i64 * c + ch) * h as i64 + y as i64) * w as i64 + x as i64) as usize]
        };
        for i in 0..b {
            for y in 0..h * zoom {
                for x in 0..w * zoom {
                    let (sy, sx) = (y / zoom, x / zoom);
                    let p = image::Rgb([at(i, 0, sy, sx), at(i, 1, sy, sx), at(i, 2, sy, sx)]);
                    img.put_pixel(i * w * zoom + x, r as u32 * h * zoom + y, p);
                }
            }
        }
    }
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Line chart of several named series (x = step) on one panel per metric, stacked vertically;
/// no text (no font backend): colours in order blue, red, green, black.
///
/// # Errors
/// Unwritable file.
pub fn curves(path: &Path, panels: &[Vec<Vec<(f64, f64)>>]) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 300 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let colours = [BLUE, RED, GREEN, BLACK];
    for (area, series) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let pts = series.iter().flatten();
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            continue;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-12);
        let mut chart = ChartBuilder::on(area)
            .margin(15)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (s, colour) in series.iter().zip(colours.iter().cycle()) {
            chart
                .draw_series(LineSeries::new(s.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))
}
