//! PNG outputs: labelled reconstruction grids and training curves (drawn by `vq-plot`).

use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};
use vq_plot::{Figure, ImageRow, Panel, Scale, Series};

use crate::metrics::StepMetrics;

/// Images in [−1, 1], (B, C, H, W) with C = 1 or 3, as 8-bit RGB images.
///
/// # Errors
/// A tensor that is not 4-D with 1 or 3 channels.
pub fn rgb_images(t: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = t.size4()?;
    anyhow::ensure!(
        c == 1 || c == 3,
        "images with {c} channels cannot be shown (1 or 3)"
    );
    let px = ((t
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .clamp(-1.0, 1.0)
        + 1.0)
        * 127.5)
        .round()
        .to_kind(Kind::Uint8)
        .expand([b, 3, h, w], false)
        .permute([0, 2, 3, 1])
        .contiguous();
    let v = Vec::<u8>::try_from(px.reshape([-1]))?;
    let one = (h * w * 3) as usize;
    Ok(v.chunks_exact(one)
        .map(|p| image::RgbImage::from_raw(w as u32, h as u32, p.to_vec()).expect("h·w·3 bytes"))
        .collect())
}

/// The zoom that shows images of (B, C, H, W) `t` about 96 pixels high: ×3 for 32², ×1 from
/// 96 pixels up (ImageNet-sized grids stay at their own size).
#[must_use]
pub fn zoom_for(t: &Tensor) -> u32 {
    let h = t.size().get(2).copied().unwrap_or(96).max(1);
    (96 / h).clamp(1, 3) as u32
}

/// A grid under `title` with one labelled row per `(label, images)` (images as for
/// [`rgb_images`]), each image scaled ×`zoom`.
///
/// # Errors
/// Images that cannot be shown; an unwritable file.
pub fn reconstruction_grid(
    path: &Path,
    title: &str,
    rows: &[(&str, &Tensor)],
    zoom: u32,
) -> Result<()> {
    let rows = rows
        .iter()
        .map(|&(label, t)| {
            Ok(ImageRow {
                label: label.to_owned(),
                images: rgb_images(t)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    crate::checkpoint::replace_file(path, |tmp| {
        vq_plot::image_grid(tmp, title, &rows, zoom).context("writing a reconstruction grid")
    })
}

/// The training curves of one run or of several overlaid (`runs`: legend name and metrics),
/// one panel each: reconstruction loss (`rec_loss` names it, log scale), codebook usage per
/// batch, quantization error (log), perplexity, learning rate, and for a VQGAN the
/// discriminator's and generator's adversarial losses.
#[must_use]
pub fn curves_figure(title: &str, rec_loss: &str, runs: &[(&str, &[StepMetrics])]) -> Figure {
    let series = |f: &dyn Fn(&StepMetrics) -> f64| -> Vec<Series> {
        runs.iter()
            .map(|(name, h)| Series::line(*name, h.iter().map(|m| (m.step as f64, f(m))).collect()))
            .collect()
    };
    let panel = |title: &str, unit: &str, scale, f: &dyn Fn(&StepMetrics) -> f64| {
        let mut p = Panel::new(title, "step", unit, scale);
        p.series = series(f);
        p
    };
    let mut fig = Figure::new(title)
        .columns(2)
        .panel_size(640, 320)
        .panel(panel(
            &format!("Training reconstruction loss ({rec_loss})"),
            rec_loss,
            Scale::Log,
            &|m| m.rec,
        ))
        .panel(panel(
            "Codebook usage (codes used per batch)",
            "%",
            Scale::Linear,
            &|m| 100.0 * m.usage,
        ))
        .panel(panel(
            "Quantization error mean((e − q)²) per element",
            "QE",
            Scale::Log,
            &|m| m.quantization_error,
        ))
        .panel(panel(
            "Code perplexity per batch",
            "codes",
            Scale::Linear,
            &|m| m.perplexity,
        ))
        .panel(panel("Learning rate", "lr", Scale::Linear, &|m| m.lr));
    let adversarial = runs
        .iter()
        .any(|(_, h)| h.iter().any(|m| m.d_loss != 0.0 || m.g_loss != 0.0));
    if adversarial {
        fig = fig
            .panel(panel(
                "Discriminator hinge loss",
                "loss",
                Scale::Linear,
                &|m| m.d_loss,
            ))
            .panel(panel(
                "Generator adversarial loss −mean D(x̃)",
                "loss",
                Scale::Linear,
                &|m| m.g_loss,
            ));
    }
    fig
}

/// Draws [`curves_figure`] into the PNG `path`.
///
/// # Errors
/// An unwritable file; no metrics at all.
pub fn curves(
    path: &Path,
    title: &str,
    rec_loss: &str,
    runs: &[(&str, &[StepMetrics])],
) -> Result<()> {
    let figure = curves_figure(title, rec_loss, runs);
    crate::checkpoint::replace_file(path, |tmp| {
        vq_plot::line_panels(tmp, &figure).context("writing training curves")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_minus_one_to_black_one_to_white_and_grey_to_three_equal_channels() {
        // (B=2, C=1, H=1, W=3): −1, 0, 1 and values beyond the range, which are clamped.
        let t = Tensor::from_slice(&[-1.0f32, 0.0, 1.0, -5.0, 0.5, 7.0]).view([2, 1, 1, 3]);
        let imgs = rgb_images(&t).unwrap();
        assert_eq!(imgs.len(), 2);
        let px = |i: usize, x: u32| imgs[i].get_pixel(x, 0).0;
        assert_eq!([px(0, 0), px(0, 1), px(0, 2)], [[0; 3], [128; 3], [255; 3]]);
        assert_eq!([px(1, 0), px(1, 1), px(1, 2)], [[0; 3], [191; 3], [255; 3]]);
        // Colour images keep their channel order.
        let rgb = Tensor::from_slice(&[1.0f32, -1.0, 0.0]).view([1, 3, 1, 1]);
        assert_eq!(
            rgb_images(&rgb).unwrap()[0].get_pixel(0, 0).0,
            [255, 0, 128]
        );
        assert!(rgb_images(&Tensor::zeros([1, 2, 1, 1], (Kind::Float, Device::Cpu))).is_err());
        assert_eq!(zoom_for(&t), 3);
        assert_eq!(
            zoom_for(&Tensor::zeros([1, 3, 256, 256], (Kind::Float, Device::Cpu))),
            1
        );
    }
}
