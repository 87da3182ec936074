//! The project's figures, every one of which explains itself: a title, axis labels with units,
//! tick labels and a legend ([`line_panels`]), or labelled rows of images ([`image_grid`]).
//!
//! Text is drawn with DejaVu Sans, shipped in this crate (`fonts/`, with its licence) and
//! rendered by `ab_glyph` through plotters, so no system font is read and every machine draws
//! the same pixels.
//!
//! ```
//! use vq_plot::{Figure, Panel, Scale, Series};
//!
//! let dir = std::env::temp_dir().join(format!("vq-plot-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let loss = Panel::new("Training loss", "step", "MSE", Scale::Log)
//!     .with(Series::line("STE", vec![(1.0, 0.5), (2.0, 0.1), (3.0, 0.05)]));
//! let figure = Figure::new("A run").panel(loss);
//! vq_plot::line_panels(&dir.join("curves.png"), &figure).unwrap();
//! assert!(dir.join("curves.png").exists());
//! ```

mod chart;
mod grid;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use chart::{Figure, Mark, Panel, Scale, Series, line_panels, tick_label};
pub use grid::{ImageRow, image_grid, image_grid_image};
use plotters::style::{FontStyle, IntoFont, RGBColor, TextStyle};

/// The family name the shipped font is registered under.
pub const FONT_FAMILY: &str = "DejaVu Sans";

static FONT_BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// Failures of drawing a figure.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The shipped font could not be parsed (a damaged checkout).
    #[error("the shipped font fonts/DejaVuSans.ttf could not be read by ab_glyph")]
    Font,
    /// Drawing or writing the file failed.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The figure's file.
        path: PathBuf,
        /// What plotters or the image encoder said.
        message: String,
    },
    /// A figure with nothing to draw, or images of differing sizes in one grid.
    #[error("{path}: {message}")]
    Invalid {
        /// The figure's file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl PlotError {
    pub(crate) fn draw(path: &Path, e: impl std::fmt::Display) -> Self {
        Self::Draw {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

/// Encodes `img` as PNG in memory and writes it with `std::fs::write`, so that a failed write
/// (a full disk) is an error: `image`'s own `save` writes through a `BufWriter` whose last
/// flush happens on drop, where an error is lost and an empty or cut file is left behind.
pub(crate) fn write_png(path: &Path, img: &image::RgbImage) -> Result<(), PlotError> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| PlotError::draw(path, e))?;
    std::fs::write(path, bytes.into_inner()).map_err(|e| PlotError::draw(path, e))
}

/// Registers the shipped font with plotters (once per process; later calls are free). Every
/// drawing function here calls it; call it yourself before drawing with plotters directly.
///
/// # Errors
/// [`PlotError::Font`] if the embedded file does not parse.
pub fn register_font() -> Result<(), PlotError> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// The shipped font at `size` pixels, black.
#[must_use]
pub fn text(size: f64) -> TextStyle<'static> {
    (FONT_FAMILY, size).into_font().color(&RGBColor(0, 0, 0))
}

/// Colours of successive series (matplotlib's "tab10"): blue, orange, green, red, purple,
/// brown, pink, grey, olive, cyan.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_font_registers_and_measures_text() {
        register_font().unwrap();
        let (w, h) = text(20.0).font.box_size("step").unwrap();
        // Four glyphs of a 20 px font: tens of pixels wide, about one em high.
        assert!((25..80).contains(&w), "width {w}");
        assert!((10..30).contains(&h), "height {h}");
        let (w2, _) = text(20.0).font.box_size("step step").unwrap();
        assert!(w2 > 2 * w, "{w2} vs {w}");
    }
}
