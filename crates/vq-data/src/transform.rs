//! Image preprocessing as the paper's code bases do it: resampling, crops, flips and the
//! normalisations, on `u8` images in HWC layout (the layout decoders produce).
//!
//! Resampling follows PyTorch's definitions so results can be checked against `torch`:
//! [`Filter::Bilinear`] is `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`
//! (also OpenCV's `INTER_LINEAR`, which taming-transformers uses through albumentations), and
//! [`Filter::BilinearAntialias`] is `antialias=True`, i.e. PIL's `BILINEAR` as torchvision applies
//! it to PIL images. Both compute in `f32` and round to the nearest `u8`.

use ndarray::{Array3, ArrayView3, Axis};
use rand::Rng;

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Filter {
    /// Half-pixel bilinear interpolation of the two nearest source pixels (no low-pass when
    /// shrinking): torch `antialias=False`, OpenCV `INTER_LINEAR`.
    Bilinear,
    /// Triangle filter widened by the shrink factor (PIL `BILINEAR`, torch `antialias=True`).
    BilinearAntialias,
}

/// Contributions of source pixels to each output pixel along one axis.
#[derive(Debug)]
struct Taps {
    /// First source index per output pixel.
    start: Vec<usize>,
    /// `width` weights per output pixel.
    weights: Vec<f32>,
    width: usize,
}

impl Taps {
    /// Taps for output pixels `first..first + count` of a resize of `len` source pixels
    /// (starting at source pixel `offset`) to `out` pixels.
    fn new(
        filter: Filter,
        offset: usize,
        len: usize,
        out: usize,
        first: usize,
        count: usize,
    ) -> Self {
        match filter {
            Filter::Bilinear => {
                // ATen's upsample_bilinear2d: src = max(scale·(i + ½) − ½, 0), taps ⌊src⌋ and
                // ⌊src⌋ + 1 (the last pixel takes the whole weight at the far edge).
                let mut start = Vec::with_capacity(count);
                let mut weights = Vec::with_capacity(2 * count);
                // In f32 like ATen, so coordinates round the same way.
                if len == 1 {
                    return Self {
                        start: vec![offset; count],
                        weights: vec![1.0; count],
                        width: 1,
                    };
                }
                let scale = len as f32 / out as f32;
                for i in first..first + count {
                    let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
                    let i0 = (src as usize).min(len - 1);
                    if i0 + 1 < len {
                        let l1 = src - i0 as f32;
                        start.push(offset + i0);
                        weights.extend([1.0 - l1, l1]);
                    } else {
                        // The far edge: all weight on the last pixel, taps kept inside.
                        start.push(offset + len - 2);
                        weights.extend([0.0, 1.0]);
                    }
                }
                Self {
                    start,
                    weights,
                    width: 2,
                }
            }
            Filter::BilinearAntialias => {
                // ATen's _upsample_bilinear2d_aa weights (PIL's), computed in f32 like ATen.
                let scale = len as f32 / out as f32;
                let support = scale.max(1.0);
                let inv = 1.0 / scale.max(1.0);
                let width = (support.ceil() as usize) * 2 + 1;
                let mut start = Vec::with_capacity(count);
                let mut weights = vec![0f32; width * count];
                for (k, i) in (first..first + count).enumerate() {
                    let center = scale * (i as f32 + 0.5);
                    let lo = ((center - support + 0.5).max(0.0)) as usize;
                    let hi = ((center + support + 0.5) as usize).min(len);
                    let mut ws: Vec<f32> = (lo..hi)
                        .map(|j| (1.0 - ((j as f32 - center + 0.5) * inv).abs()).max(0.0))
                        .collect();
                    let total: f32 = ws.iter().sum();
                    if total > 0.0 {
                        ws.iter_mut().for_each(|w| *w /= total);
                    }
                    // Keep the taps inside the source even near the far edge.
                    let lo_fit = lo.min(len.saturating_sub(width));
                    for (j, w) in (lo..hi).zip(ws) {
                        weights[k * width + (j - lo_fit)] = w;
                    }
                    start.push(offset + lo_fit);
                }
                Self {
                    start,
                    weights,
                    width: width.min(len),
                }
                .compact(width)
            }
        }
    }

    /// Rebuilds the weight table when the source is narrower than the nominal tap width.
    fn compact(self, nominal: usize) -> Self {
        if self.width == nominal {
            return self;
        }
        let weights = self
            .weights
            .chunks(nominal)
            .flat_map(|c| c[..self.width].to_vec())
            .collect();
        Self { weights, ..self }
    }
}

/// Resamples the region `(top, left, height, width)` of an HWC image to a virtual
/// `out_h × out_w` image and returns its window `(win_top, win_left, win_h, win_w)`, in `f32`
/// HWC. One routine covers resize, resize-then-crop and crop-then-resize.
///
/// ```
/// use ndarray::Array3;
/// use vq_data::transform::{Filter, resample};
/// let img = Array3::from_shape_fn((4, 4, 1), |(y, x, _)| (10 * y + x) as f32);
/// let half = resample(img.view(), (0, 0, 4, 4), (2, 2), (0, 0, 2, 2), Filter::Bilinear);
/// assert_eq!(half[[0, 0, 0]], 5.5); // the mean of the top-left 2×2 block
/// ```
///
/// # Panics
/// If the region is empty or outside the image, or the window outside the virtual output.
pub fn resample(
    src: ArrayView3<'_, f32>,
    region: (usize, usize, usize, usize),
    out: (usize, usize),
    window: (usize, usize, usize, usize),
    filter: Filter,
) -> Array3<f32> {
    resample_any(src, region, out, window, filter)
}

/// [`resample`] of a `u8` image, rounded back to `u8` (no `f32` copy of the source is made).
///
/// # Panics
/// As [`resample`].
pub fn resample_u8(
    src: ArrayView3<'_, u8>,
    region: (usize, usize, usize, usize),
    out: (usize, usize),
    window: (usize, usize, usize, usize),
    filter: Filter,
) -> Array3<u8> {
    resample_any(src, region, out, window, filter).mapv(|v| v.round().clamp(0.0, 255.0) as u8)
}

fn resample_any<T: Copy + Into<f32>>(
    src: ArrayView3<'_, T>,
    region: (usize, usize, usize, usize),
    out: (usize, usize),
    window: (usize, usize, usize, usize),
    filter: Filter,
) -> Array3<f32> {
    let (h, w, c) = src.dim();
    let (top, left, rh, rw) = region;
    assert!(
        rh > 0 && rw > 0 && top + rh <= h && left + rw <= w,
        "region outside the image"
    );
    let (wt, wl, wh, ww) = window;
    assert!(
        wt + wh <= out.0 && wl + ww <= out.1,
        "window outside the output"
    );
    let src = src.as_standard_layout();
    let src = src.as_slice().expect("standard layout");
    let ty = Taps::new(filter, top, rh, out.0, wt, wh);
    let tx = Taps::new(filter, left, rw, out.1, wl, ww);
    // Source rows the vertical pass reads.
    let row_lo = *ty.start.iter().min().expect("non-empty window");
    let row_hi = (ty.start.iter().max().expect("non-empty window") + ty.width).min(h);
    // Horizontal pass over those rows (every tap lies inside the source).
    let line = ww * c;
    let mut tmp = vec![0f32; (row_hi - row_lo) * line];
    for (r, trow) in tmp.chunks_exact_mut(line).enumerate() {
        let srow = &src[(row_lo + r) * w * c..(row_lo + r + 1) * w * c];
        match c {
            3 => horizontal::<T, 3>(srow, trow, &tx),
            1 => horizontal::<T, 1>(srow, trow, &tx),
            _ => {
                for (x, px) in trow.chunks_exact_mut(c).enumerate() {
                    let taps = &tx.weights[x * tx.width..(x + 1) * tx.width];
                    let p = &srow[tx.start[x] * c..(tx.start[x] + tx.width) * c];
                    for (wgt, p) in taps.iter().zip(p.chunks_exact(c)) {
                        for (o, &v) in px.iter_mut().zip(p) {
                            *o += wgt * v.into();
                        }
                    }
                }
            }
        }
    }
    // Vertical pass: whole rows at a time.
    let mut dst = vec![0f32; wh * line];
    for (y, drow) in dst.chunks_exact_mut(line).enumerate() {
        let s = ty.start[y] - row_lo;
        for (k, &wgt) in ty.weights[y * ty.width..(y + 1) * ty.width]
            .iter()
            .enumerate()
        {
            if wgt != 0.0 {
                let trow = &tmp[(s + k) * line..(s + k + 1) * line];
                for (o, &v) in drow.iter_mut().zip(trow) {
                    *o += wgt * v;
                }
            }
        }
    }
    Array3::from_shape_vec((wh, ww, c), dst).expect("sizes match")
}

/// One row of the horizontal pass with `C` channels known at compile time.
fn horizontal<T: Copy + Into<f32>, const C: usize>(src: &[T], dst: &mut [f32], tx: &Taps) {
    for (x, px) in dst.chunks_exact_mut(C).enumerate() {
        let taps = &tx.weights[x * tx.width..(x + 1) * tx.width];
        let p = &src[tx.start[x] * C..(tx.start[x] + tx.width) * C];
        let mut acc = [0f32; C];
        for (wgt, p) in taps.iter().zip(p.chunks_exact(C)) {
            for ch in 0..C {
                acc[ch] += wgt * p[ch].into();
            }
        }
        px.copy_from_slice(&acc);
    }
}

/// Where a crop goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Crop {
    /// Centred (offsets rounded down).
    Center,
    /// Uniformly random offsets.
    Random,
}

/// A preprocessing pipeline from a decoded RGB image to a square `size × size` crop.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)
)]
pub enum Transform {
    /// Shorter side resized to `size` (the other side rounded to nearest), then a crop
    /// (taming-transformers: albumentations `SmallestMaxSize` + `RandomCrop`/`CenterCrop`).
    ResizeShorterCrop {
        /// Output side.
        size: usize,
        /// Crop placement.
        crop: Crop,
        /// Resampling filter.
        filter: Filter,
    },
    /// A centred `size × size` crop of the image as stored, zero-padded where the image is
    /// smaller (torchvision `CenterCrop` without `Resize`; the rotation-trick repository's
    /// Table 1 loader).
    CenterCropNoResize {
        /// Output side.
        size: usize,
    },
    /// torchvision `RandomResizedCrop(size, scale, ratio)` followed by an optional random
    /// horizontal flip (enhancing-transformers' ViT-VQGAN training transform).
    RandomResizedCrop {
        /// Output side.
        size: usize,
        /// Range of the crop's area as a fraction of the image's.
        scale: (f64, f64),
        /// Range of the crop's aspect ratio (width / height).
        ratio: (f64, f64),
        /// Flip horizontally with probability ½.
        flip: bool,
        /// Resampling filter.
        filter: Filter,
    },
    /// The whole image resized to `size × size`, aspect ratio not kept (the ViT-VQGAN
    /// validation transform).
    Resize {
        /// Output side.
        size: usize,
        /// Resampling filter.
        filter: Filter,
    },
}

impl Transform {
    /// taming-transformers' ImageNet pipeline (Tables 2–3): shorter side to `size`, random crop
    /// for training, centre crop for evaluation.
    pub fn taming(size: usize, train: bool) -> Self {
        Self::ResizeShorterCrop {
            size,
            crop: if train { Crop::Random } else { Crop::Center },
            filter: Filter::Bilinear,
        }
    }

    /// enhancing-transformers' ViT-VQGAN pipeline (Table 4): random-resized crop (scale
    /// 0.75–1, square) + flip for training, plain resize for evaluation (PIL bilinear).
    pub fn vit_vqgan(size: usize, train: bool) -> Self {
        if train {
            Self::RandomResizedCrop {
                size,
                scale: (0.75, 1.0),
                ratio: (1.0, 1.0),
                flip: true,
                filter: Filter::BilinearAntialias,
            }
        } else {
            Self::Resize {
                size,
                filter: Filter::BilinearAntialias,
            }
        }
    }

    /// The output side length.
    pub fn size(&self) -> usize {
        match *self {
            Self::ResizeShorterCrop { size, .. }
            | Self::CenterCropNoResize { size }
            | Self::RandomResizedCrop { size, .. }
            | Self::Resize { size, .. } => size,
        }
    }

    /// Applies the transform to an RGB image `(H, W, 3)`, returning `(size, size, 3)`.
    /// Random choices are drawn from `rng` (pass a generator seeded per sample for
    /// reproducible augmentation).
    ///
    /// ```
    /// use ndarray::Array3;
    /// use rand::SeedableRng;
    /// use vq_data::transform::Transform;
    /// let img = Array3::<u8>::from_elem((375, 500, 3), 7);
    /// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    /// let out = Transform::taming(256, true).apply(img.view(), &mut rng);
    /// assert_eq!(out.dim(), (256, 256, 3));
    /// assert!(out.iter().all(|&v| v == 7));
    /// ```
    ///
    /// # Panics
    /// If the image is empty.
    pub fn apply(&self, img: ArrayView3<'_, u8>, rng: &mut impl Rng) -> Array3<u8> {
        let (h, w, c) = img.dim();
        assert!(h > 0 && w > 0, "empty image");
        match *self {
            Self::CenterCropNoResize { size } => {
                // torchvision: offsets int(round((H − size) / 2)); pads with zeros when smaller.
                let mut out = Array3::<u8>::zeros((size, size, c));
                let off = |n: usize| ((n as f64 - size as f64) / 2.0).round_ties_even() as isize;
                let (oy, ox) = (off(h), off(w));
                for y in 0..size {
                    let sy = y as isize + oy;
                    if sy < 0 || sy >= h as isize {
                        continue;
                    }
                    for x in 0..size {
                        let sx = x as isize + ox;
                        if sx < 0 || sx >= w as isize {
                            continue;
                        }
                        for ch in 0..c {
                            out[[y, x, ch]] = img[[sy as usize, sx as usize, ch]];
                        }
                    }
                }
                out
            }
            Self::ResizeShorterCrop { size, crop, filter } => {
                let s = size as f64 / h.min(w) as f64;
                let (nh, nw) = if h <= w {
                    (size, ((w as f64 * s).round() as usize).max(size))
                } else {
                    (((h as f64 * s).round() as usize).max(size), size)
                };
                let (top, left) = match crop {
                    Crop::Center => ((nh - size) / 2, (nw - size) / 2),
                    Crop::Random => (rng.gen_range(0..=nh - size), rng.gen_range(0..=nw - size)),
                };
                resample_u8(img, (0, 0, h, w), (nh, nw), (top, left, size, size), filter)
            }
            Self::Resize { size, filter } => {
                resample_u8(img, (0, 0, h, w), (size, size), (0, 0, size, size), filter)
            }
            Self::RandomResizedCrop {
                size,
                scale,
                ratio,
                flip,
                filter,
            } => {
                let region = random_resized_crop_region(h, w, scale, ratio, rng);
                let mut out = resample_u8(img, region, (size, size), (0, 0, size, size), filter);
                if flip && rng.gen_bool(0.5) {
                    out.invert_axis(Axis(1));
                    out = out.as_standard_layout().into_owned();
                }
                out
            }
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries of a random area fraction in
/// `scale` and log-uniform aspect ratio in `ratio`, then a centre crop clamped to `ratio`.
/// Returns `(top, left, height, width)`.
fn random_resized_crop_region(
    h: usize,
    w: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(scale.0..=scale.1);
        let ar = if lr0 < lr1 {
            rng.gen_range(lr0..lr1).exp()
        } else {
            ratio.0
        };
        let cw = (target * ar).sqrt().round() as usize;
        let ch = (target / ar).sqrt().round() as usize;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = rng.gen_range(0..=h - ch);
            let left = rng.gen_range(0..=w - cw);
            return (top, left, ch, cw);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio.0.min(ratio.1) {
        ((w as f64 / ratio.0.min(ratio.1)).round() as usize, w)
    } else if in_ratio > ratio.0.max(ratio.1) {
        (h, (h as f64 * ratio.0.max(ratio.1)).round() as usize)
    } else {
        (h, w)
    };
    let (ch, cw) = (ch.clamp(1, h), cw.clamp(1, w));
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// How `u8` pixels become model inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Normalization {
    /// `x / 127.5 − 1` ∈ [−1, 1] (taming-transformers).
    MinusOneOne,
    /// `x / 255` ∈ [0, 1] (enhancing-transformers).
    ZeroOne,
    /// `(x / 255 − mean) / std` with CLIP's statistics (the rotation-trick repository's Table 1).
    ClipMeanStd,
    /// `x / 255 − 0.5` ∈ [−0.5, 0.5] (VideoGPT's video loaders).
    MinusHalfHalf,
}

/// CLIP's per-channel mean.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl Normalization {
    /// Normalises a batch of channel-first `u8` samples: images `(N, C, H, W)` or clips
    /// `(N, C, T, H, W)` (any layout with channels on axis 1).
    ///
    /// ```
    /// use ndarray::Array4;
    /// use vq_data::transform::Normalization;
    /// let x = Array4::<u8>::from_elem((1, 3, 2, 2), 255);
    /// assert_eq!(Normalization::MinusOneOne.apply(x.view())[[0, 0, 0, 0]], 1.0);
    /// ```
    ///
    /// # Panics
    /// [`Normalization::ClipMeanStd`] on samples that do not have 3 channels.
    pub fn apply<D: ndarray::RemoveAxis>(
        &self,
        x: ndarray::ArrayView<'_, u8, D>,
    ) -> ndarray::Array<f32, D> {
        match self {
            Self::MinusOneOne => x.mapv(|v| f32::from(v) / 127.5 - 1.0),
            Self::ZeroOne => x.mapv(|v| f32::from(v) / 255.0),
            Self::MinusHalfHalf => x.mapv(|v| f32::from(v) / 255.0 - 0.5),
            Self::ClipMeanStd => {
                assert_eq!(
                    x.shape().get(1),
                    Some(&3),
                    "CLIP statistics are for RGB images"
                );
                let mut out = x.mapv(|v| f32::from(v) / 255.0);
                for (ch, mut plane) in out.axis_iter_mut(Axis(1)).enumerate() {
                    plane.mapv_inplace(|v| (v - CLIP_MEAN[ch]) / CLIP_STD[ch]);
                }
                out
            }
        }
    }
}

/// HWC → CHW.
pub fn hwc_to_chw(img: Array3<u8>) -> Array3<u8> {
    img.permuted_axes([2, 0, 1])
        .as_standard_layout()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn ramp(h: usize, w: usize) -> Array3<f32> {
        Array3::from_shape_fn((h, w, 2), |(y, x, c)| (3 * y + 7 * x + 50 * c) as f32)
    }

    /// A linear image stays linear under bilinear resampling away from the clamped border.
    #[test]
    fn bilinear_reproduces_linear_ramps_in_the_interior() {
        let img = ramp(20, 30);
        let out = resample(
            img.view(),
            (0, 0, 20, 30),
            (7, 11),
            (0, 0, 7, 11),
            Filter::Bilinear,
        );
        for y in 1..6 {
            for x in 1..10 {
                let sy = (y as f64 + 0.5) * 20.0 / 7.0 - 0.5;
                let sx = (x as f64 + 0.5) * 30.0 / 11.0 - 0.5;
                let want = 3.0 * sy + 7.0 * sx + 50.0;
                assert!((f64::from(out[[y, x, 1]]) - want).abs() < 1e-3, "{y} {x}");
            }
        }
    }

    #[test]
    fn a_window_equals_the_same_part_of_the_full_resize() {
        let img = Array3::from_shape_fn((37, 53, 3), |(y, x, c)| {
            ((y * 31 + x * 17 + c * 5) % 256) as f32
        });
        for filter in [Filter::Bilinear, Filter::BilinearAntialias] {
            let full = resample(img.view(), (3, 2, 30, 50), (19, 23), (0, 0, 19, 23), filter);
            let win = resample(img.view(), (3, 2, 30, 50), (19, 23), (4, 5, 10, 12), filter);
            let part = full.slice(ndarray::s![4..14, 5..17, ..]);
            assert!(
                win.iter()
                    .zip(part.iter())
                    .all(|(a, b)| (a - b).abs() < 1e-4),
                "{filter:?}"
            );
        }
    }

    #[test]
    fn antialias_averages_whole_blocks_when_shrinking_by_an_integer() {
        let img = Array3::from_shape_fn((8, 8, 1), |(y, x, _)| ((y * 8 + x) % 5) as f32);
        let out = resample(
            img.view(),
            (0, 0, 8, 8),
            (2, 2),
            (0, 0, 2, 2),
            Filter::BilinearAntialias,
        );
        // The triangle of half-width 4 centred on each 4×4 block: weights 1,3,5,7,7,5,3,1 /32
        // over the block and its neighbours' near halves, truncated at the border.
        let w = |d: f64| (1.0 - (d / 4.0).abs()).max(0.0);
        let taps = |c: f64| -> Vec<(usize, f64)> {
            let ws: Vec<(usize, f64)> = (0..8).map(|j| (j, w(j as f64 + 0.5 - c))).collect();
            let t: f64 = ws.iter().map(|p| p.1).sum();
            ws.into_iter().map(|(j, v)| (j, v / t)).collect()
        };
        for oy in 0..2 {
            for ox in 0..2 {
                let mut want = 0.0;
                for (y, wy) in taps(4.0 * oy as f64 + 2.0) {
                    for (x, wx) in taps(4.0 * ox as f64 + 2.0) {
                        want += wy * wx * f64::from(img[[y, x, 0]]);
                    }
                }
                assert!((f64::from(out[[oy, ox, 0]]) - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn transforms_give_the_requested_size_for_any_shape() {
        let mut rng = StdRng::seed_from_u64(1);
        for (h, w) in [
            (1, 1),
            (1, 300),
            (300, 1),
            (17, 256),
            (256, 256),
            (375, 500),
            (640, 427),
        ] {
            let img = Array3::from_shape_fn((h, w, 3), |(y, x, c)| ((y + x + c) % 256) as u8);
            for t in [
                Transform::taming(64, true),
                Transform::taming(64, false),
                Transform::vit_vqgan(64, true),
                Transform::vit_vqgan(64, false),
                Transform::CenterCropNoResize { size: 64 },
            ] {
                assert_eq!(
                    t.apply(img.view(), &mut rng).dim(),
                    (64, 64, 3),
                    "{t:?} {h}×{w}"
                );
            }
        }
    }

    #[test]
    fn center_crop_without_resize_matches_torchvision_offsets_and_padding() {
        let img = Array3::from_shape_fn((5, 9, 1), |(y, x, _)| (10 * y + x) as u8 + 1);
        let out = Transform::CenterCropNoResize { size: 4 }
            .apply(img.view(), &mut StdRng::seed_from_u64(0));
        // torchvision: top = round(0.5) = 0 (ties to even), left = round(2.5) = 2.
        assert_eq!(out[[0, 0, 0]], img[[0, 2, 0]]);
        let out = Transform::CenterCropNoResize { size: 7 }
            .apply(img.view(), &mut StdRng::seed_from_u64(0));
        // top = round(−1) = −1: the first row is padding.
        assert_eq!(out[[0, 3, 0]], 0);
        assert_eq!(out[[1, 0, 0]], img[[0, 1, 0]]);
    }

    #[test]
    fn random_crops_are_reproducible_and_flip_sometimes() {
        let img =
            Array3::from_shape_fn((400, 400, 3), |(y, x, c)| ((y * 3 + x * 5 + c) % 256) as u8);
        let t = Transform::vit_vqgan(32, true);
        let a = t.apply(img.view(), &mut StdRng::seed_from_u64(9));
        let b = t.apply(img.view(), &mut StdRng::seed_from_u64(9));
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<Vec<u8>> = (0..20)
            .map(|s| {
                t.apply(img.view(), &mut StdRng::seed_from_u64(s))
                    .into_raw_vec_and_offset()
                    .0
            })
            .collect();
        assert!(distinct.len() > 10);
        // Square crops of at least 75% of the area of a 300×400 image would need a side ≥ 300 but
        // rarely fit: torchvision falls back to the centred 300×300 square.
        let (top, _, ch, cw) = random_resized_crop_region(
            300,
            400,
            (0.75, 1.0),
            (1.0, 1.0),
            &mut StdRng::seed_from_u64(3),
        );
        assert_eq!((top, ch, cw), (0, 300, 300));
    }

    #[test]
    fn normalisations() {
        let x = Array4::from_shape_vec((1, 3, 1, 1), vec![0u8, 128, 255]).unwrap();
        assert_eq!(
            Normalization::MinusOneOne
                .apply(x.view())
                .into_raw_vec_and_offset()
                .0,
            vec![-1.0, 128.0 / 127.5 - 1.0, 1.0]
        );
        assert_eq!(Normalization::ZeroOne.apply(x.view())[[0, 2, 0, 0]], 1.0);
        assert_eq!(
            Normalization::MinusHalfHalf.apply(x.view())[[0, 0, 0, 0]],
            -0.5
        );
        let c = Normalization::ClipMeanStd.apply(x.view());
        assert!((c[[0, 0, 0, 0]] + CLIP_MEAN[0] / CLIP_STD[0]).abs() < 1e-6);
        // Clips (N, C, T, H, W): channels are still axis 1.
        let clip =
            ndarray::Array5::from_shape_fn((1, 3, 2, 1, 1), |(_, c, _, _, _)| [0u8, 128, 255][c]);
        let n = Normalization::ClipMeanStd.apply(clip.view());
        assert_eq!(n[[0, 1, 1, 0, 0]], c[[0, 1, 0, 0]]);
    }
}
