//! Image grids: one labelled row per image set (originals, each estimator's reconstructions),
//! under a title that says what is shown.

use std::path::Path;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{PlotError, register_font, text};

/// One row of a grid: its label (drawn left of the images) and its images.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    /// Drawn left of the row, e.g. "original", "rotation trick".
    pub label: String,
    /// The images, left to right; all images of a grid have one size.
    pub images: Vec<RgbImage>,
}

const GAP: u32 = 4;
const TITLE_HEIGHT: u32 = 34;
const LABEL_SIZE: f64 = 16.0;

/// Writes the PNG `path`: `title` on top, then each row's label and its images, each image
/// scaled ×`zoom` (nearest neighbour, so pixels stay visible).
///
/// # Errors
/// [`PlotError::Invalid`] for no images or images of differing sizes; [`PlotError::Draw`] if
/// drawing or writing fails.
pub fn image_grid(path: &Path, title: &str, rows: &[ImageRow], zoom: u32) -> Result<(), PlotError> {
    let img = image_grid_image(title, rows, zoom).map_err(|message| PlotError::Invalid {
        path: path.to_owned(),
        message,
    })?;
    crate::write_png(path, &img)
}

/// The grid of [`image_grid`] as an image.
///
/// # Errors
/// A message for no images, images of differing sizes, or a drawing failure.
pub fn image_grid_image(title: &str, rows: &[ImageRow], zoom: u32) -> Result<RgbImage, String> {
    register_font().map_err(|e| e.to_string())?;
    let zoom = zoom.max(1);
    let first = rows
        .iter()
        .flat_map(|r| r.images.first())
        .next()
        .ok_or("an image grid without images")?;
    let (w, h) = first.dimensions();
    if let Some((r, i)) = rows.iter().find_map(|r| {
        r.images
            .iter()
            .position(|i| i.dimensions() != (w, h))
            .map(|i| (r, i))
    }) {
        return Err(format!(
            "image {i} of row '{}' is {:?}, the grid's images are {w}×{h}",
            r.label,
            r.images[i].dimensions()
        ));
    }
    let label_w = rows
        .iter()
        .map(|r| text(LABEL_SIZE).font.box_size(&r.label).map_or(0, |b| b.0))
        .max()
        .unwrap_or(0)
        + 2 * GAP
        + 8;
    let per_row = rows.iter().map(|r| r.images.len()).max().unwrap_or(0) as u32;
    let (cw, ch) = (w * zoom, h * zoom);
    let title_w = text(18.0).font.box_size(title).map_or(0, |b| b.0) + 2 * GAP;
    let width = (label_w + per_row * (cw + GAP) + GAP).max(title_w);
    let height = TITLE_HEIGHT + rows.len() as u32 * (ch + GAP) + GAP;
    let mut canvas = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        let top = TITLE_HEIGHT + r as u32 * (ch + GAP);
        for (i, im) in row.images.iter().enumerate() {
            let big = image::imageops::resize(im, cw, ch, image::imageops::FilterType::Nearest);
            let left = label_w + i as u32 * (cw + GAP);
            image::imageops::replace(&mut canvas, &big, i64::from(left), i64::from(top));
        }
    }
    {
        let area = BitMapBackend::with_buffer(canvas.as_mut(), (width, height)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        area.draw_text(title, &text(18.0), (GAP as i32, 8))
            .map_err(e)?;
        let right_centre = Pos::new(HPos::Right, VPos::Center);
        for (r, row) in rows.iter().enumerate() {
            let mid = TITLE_HEIGHT + r as u32 * (ch + GAP) + ch / 2;
            let at = ((label_w - GAP - 4) as i32, mid as i32);
            area.draw_text(&row.label, &text(LABEL_SIZE).pos(right_centre), at)
                .map_err(e)?;
        }
        area.present().map_err(e)?;
    }
    Ok(canvas)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(v: u8) -> RgbImage {
        RgbImage::from_pixel(8, 6, image::Rgb([v, 255 - v, 128]))
    }

    #[test]
    fn rows_are_placed_zoomed_right_of_their_labels_under_the_title() {
        let rows = [
            ImageRow {
                label: "original".into(),
                images: vec![solid(10), solid(20)],
            },
            ImageRow {
                label: "rotation trick".into(),
                images: vec![solid(30), solid(40)],
            },
        ];
        let img = image_grid_image("step 1", &rows, 3).unwrap();
        // A title wider than the images widens the grid.
        let wide = image_grid_image(&"held-out split, step 1000 ".repeat(4), &rows, 3).unwrap();
        assert!(wide.width() > 400 && wide.height() == img.height());
        let (cw, ch) = (24, 18);
        let label_w = img.width() - 2 * (cw + GAP) - GAP;
        assert!(label_w > 60, "labels take room: {label_w}");
        assert_eq!(img.height(), TITLE_HEIGHT + 2 * (ch + GAP) + GAP);
        for (r, row) in rows.iter().enumerate() {
            for (i, src) in row.images.iter().enumerate() {
                let x0 = label_w + i as u32 * (cw + GAP);
                let y0 = TITLE_HEIGHT + r as u32 * (ch + GAP);
                for (dx, dy) in [(0, 0), (cw - 1, ch - 1), (cw / 2, ch / 2)] {
                    assert_eq!(img.get_pixel(x0 + dx, y0 + dy), src.get_pixel(0, 0));
                }
            }
        }
        // Text: dark pixels in the title band and in each label cell.
        let dark = |xs: std::ops::Range<u32>, ys: std::ops::Range<u32>| {
            ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
                .count()
        };
        assert!(dark(0..img.width(), 0..TITLE_HEIGHT) > 40);
        for r in 0..2 {
            let y0 = TITLE_HEIGHT + r * (ch + GAP);
            assert!(dark(0..label_w, y0..y0 + ch) > 20, "label of row {r}");
        }
    }

    #[test]
    fn mismatched_or_missing_images_are_refused() {
        let rows = [ImageRow {
            label: "a".into(),
            images: vec![solid(1), RgbImage::new(3, 3)],
        }];
        let err = image_grid(Path::new("/tmp/x.png"), "t", &rows, 1).unwrap_err();
        assert!(err.to_string().contains("image 1 of row 'a'"), "{err}");
        assert!(image_grid_image("t", &[], 1).is_err());
    }
}
