//! `vq_data::transform::resample` (pure Rust) against libtorch's own bilinear resampling:
//! `upsample_bilinear2d(align_corners = false)` and its antialiased variant, the operations
//! PyTorch's `F.interpolate(mode="bilinear")` runs.

use ndarray::Array3;
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};
use vq_data::transform::{Filter, resample};

fn torch_resize(img: &Array3<f32>, out: (usize, usize), filter: Filter) -> Array3<f32> {
    let (h, w, c) = img.dim();
    let t = Tensor::from_slice(img.as_slice().unwrap())
        .view([1, h as i64, w as i64, c as i64])
        .permute([0, 3, 1, 2])
        .contiguous();
    let size = [out.0 as i64, out.1 as i64];
    let r = match filter {
        Filter::Bilinear => t.upsample_bilinear2d(size, false, None, None),
        Filter::BilinearAntialias => t.internal_upsample_bilinear2d_aa(size, false, None, None),
    };
    let r = r
        .permute([0, 2, 3, 1])
        .contiguous()
        .view([-1])
        .to_kind(Kind::Float);
    Array3::from_shape_vec((out.0, out.1, c), Vec::<f32>::try_from(r).unwrap()).unwrap()
}

#[test]
fn resampling_matches_libtorch_for_shrinking_and_enlarging() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    // (source, output): ImageNet-like shrink to 256, odd factors, enlargement, single pixels.
    for ((h, w), (oh, ow)) in [
        ((375, 500), (256, 341)),
        ((97, 61), (31, 40)),
        ((20, 30), (47, 33)),
        ((1, 9), (4, 3)),
        ((64, 64), (64, 64)),
        ((240, 320), (128, 171)),
    ] {
        let img = Array3::from_shape_fn((h, w, 3), |_| rng.gen_range(0.0f32..255.0));
        for filter in [Filter::Bilinear, Filter::BilinearAntialias] {
            let ours = resample(img.view(), (0, 0, h, w), (oh, ow), (0, 0, oh, ow), filter);
            let theirs = torch_resize(&img, (oh, ow), filter);
            let worst = ours
                .iter()
                .zip(theirs.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // f32 accumulation in a different order: a few ulps of 255.
            assert!(
                worst < 2e-3,
                "{h}×{w} → {oh}×{ow} {filter:?}: max |diff| {worst}"
            );
        }
    }
}
