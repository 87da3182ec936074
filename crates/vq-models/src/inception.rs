//! The Inception-v3 network of the FID / IS metrics (pytorch-fid's `fid_inception_v3`: the
//! TensorFlow 2015-12-05 Inception ported to PyTorch, with its three deviations from
//! torchvision's: average pools that exclude padding in Mixed_5b–5d, 6b–6e and 7b, a max pool in
//! Mixed_7c, and 1008 classes), plus the Fréchet distance, the Inception score and improved
//! precision / recall.
//!
//! Weights: a safetensors file with pytorch-fid's state-dict names (`Conv2d_1a_3x3.conv.weight`,
//! `Mixed_5b.branch_pool.bn.running_var`, ..., `fc.weight`; float32, without the BatchNorm
//! counters). `cargo xtask download-weights inception` downloads pytorch-fid's file and writes it
//! without Python (`vq_weights::convert::inception`); or, from PyTorch:
//!
//! ```text
//! from pytorch_fid.inception import fid_inception_v3
//! from safetensors.torch import save_file
//! sd = fid_inception_v3().state_dict()
//! save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")},
//!           "fid_inception.safetensors")
//! ```

use std::path::Path;

use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// torchvision's BasicConv2d: convolution without bias, BatchNorm (ε 1e-3), ReLU.
#[derive(Debug)]
struct BasicConv {
    conv: nn::Conv<[i64; 2]>,
    bn: nn::BatchNorm,
}

impl BasicConv {
    fn new(p: nn::Path, cin: i64, cout: i64, k: [i64; 2], pad: [i64; 2], stride: i64) -> Self {
        let cfg = nn::ConvConfigND::<[i64; 2]> {
            stride: [stride, stride],
            padding: pad,
            bias: false,
            ..Default::default()
        };
        let bn = nn::BatchNormConfig {
            eps: 0.001,
            ..Default::default()
        };
        Self {
            conv: nn::conv(&p / "conv", cin, cout, k, cfg),
            bn: nn::batch_norm2d(&p / "bn", cout, bn),
        }
    }

    fn sq(p: nn::Path, cin: i64, cout: i64, k: i64, pad: i64, stride: i64) -> Self {
        Self::new(p, cin, cout, [k, k], [pad, pad], stride)
    }

    fn f(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv).apply_t(&self.bn, false).relu()
    }
}

/// How a block's pooling branch pools.
#[derive(Debug, Clone, Copy)]
enum Pool {
    /// 3×3 average, stride 1, padding 1, padded zeros not counted (TensorFlow's).
    AvgExcludePad,
    /// 3×3 max, stride 1, padding 1.
    Max,
}

fn pool(x: &Tensor, p: Pool) -> Tensor {
    match p {
        Pool::AvgExcludePad => x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>),
        Pool::Max => x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false),
    }
}

fn max_pool_s2(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

#[derive(Debug)]
enum Block {
    A(Vec<BasicConv>),
    B(Vec<BasicConv>),
    C(Vec<BasicConv>),
    D(Vec<BasicConv>),
    E(Vec<BasicConv>, Pool),
}

impl Block {
    fn a(p: nn::Path, cin: i64, pool_features: i64) -> Self {
        Block::A(vec![
            BasicConv::sq(&p / "branch1x1", cin, 64, 1, 0, 1),
            BasicConv::sq(&p / "branch5x5_1", cin, 48, 1, 0, 1),
            BasicConv::sq(&p / "branch5x5_2", 48, 64, 5, 2, 1),
            BasicConv::sq(&p / "branch3x3dbl_1", cin, 64, 1, 0, 1),
            BasicConv::sq(&p / "branch3x3dbl_2", 64, 96, 3, 1, 1),
            BasicConv::sq(&p / "branch3x3dbl_3", 96, 96, 3, 1, 1),
            BasicConv::sq(&p / "branch_pool", cin, pool_features, 1, 0, 1),
        ])
    }

    fn b(p: nn::Path, cin: i64) -> Self {
        Block::B(vec![
            BasicConv::sq(&p / "branch3x3", cin, 384, 3, 0, 2),
            BasicConv::sq(&p / "branch3x3dbl_1", cin, 64, 1, 0, 1),
            BasicConv::sq(&p / "branch3x3dbl_2", 64, 96, 3, 1, 1),
            BasicConv::sq(&p / "branch3x3dbl_3", 96, 96, 3, 0, 2),
        ])
    }

    fn c(p: nn::Path, cin: i64, c7: i64) -> Self {
        let r = |n: &str, i, o, k: [i64; 2], pad: [i64; 2]| BasicConv::new(&p / n, i, o, k, pad, 1);
        Block::C(vec![
            BasicConv::sq(&p / "branch1x1", cin, 192, 1, 0, 1),
            BasicConv::sq(&p / "branch7x7_1", cin, c7, 1, 0, 1),
            r("branch7x7_2", c7, c7, [1, 7], [0, 3]),
            r("branch7x7_3", c7, 192, [7, 1], [3, 0]),
            BasicConv::sq(&p / "branch7x7dbl_1", cin, c7, 1, 0, 1),
            r("branch7x7dbl_2", c7, c7, [7, 1], [3, 0]),
            r("branch7x7dbl_3", c7, c7, [1, 7], [0, 3]),
            r("branch7x7dbl_4", c7, c7, [7, 1], [3, 0]),
            r("branch7x7dbl_5", c7, 192, [1, 7], [0, 3]),
            BasicConv::sq(&p / "branch_pool", cin, 192, 1, 0, 1),
        ])
    }

    fn d(p: nn::Path, cin: i64) -> Self {
        let r = |n: &str, i, o, k: [i64; 2], pad: [i64; 2]| BasicConv::new(&p / n, i, o, k, pad, 1);
        Block::D(vec![
            BasicConv::sq(&p / "branch3x3_1", cin, 192, 1, 0, 1),
            BasicConv::sq(&p / "branch3x3_2", 192, 320, 3, 0, 2),
            BasicConv::sq(&p / "branch7x7x3_1", cin, 192, 1, 0, 1),
            r("branch7x7x3_2", 192, 192, [1, 7], [0, 3]),
            r("branch7x7x3_3", 192, 192, [7, 1], [3, 0]),
            BasicConv::sq(&p / "branch7x7x3_4", 192, 192, 3, 0, 2),
        ])
    }

    fn e(p: nn::Path, cin: i64, pool: Pool) -> Self {
        let r = |n: &str, i, o, k: [i64; 2], pad: [i64; 2]| BasicConv::new(&p / n, i, o, k, pad, 1);
        Block::E(
            vec![
                BasicConv::sq(&p / "branch1x1", cin, 320, 1, 0, 1),
                BasicConv::sq(&p / "branch3x3_1", cin, 384, 1, 0, 1),
                r("branch3x3_2a", 384, 384, [1, 3], [0, 1]),
                r("branch3x3_2b", 384, 384, [3, 1], [1, 0]),
                BasicConv::sq(&p / "branch3x3dbl_1", cin, 448, 1, 0, 1),
                BasicConv::sq(&p / "branch3x3dbl_2", 448, 384, 3, 1, 1),
                r("branch3x3dbl_3a", 384, 384, [1, 3], [0, 1]),
                r("branch3x3dbl_3b", 384, 384, [3, 1], [1, 0]),
                BasicConv::sq(&p / "branch_pool", cin, 192, 1, 0, 1),
            ],
            pool,
        )
    }

    fn f(&self, x: &Tensor) -> Tensor {
        match self {
            Block::A(c) => Tensor::cat(
                &[
                    c[0].f(x),
                    c[2].f(&c[1].f(x)),
                    c[5].f(&c[4].f(&c[3].f(x))),
                    c[6].f(&pool(x, Pool::AvgExcludePad)),
                ],
                1,
            ),
            Block::B(c) => {
                Tensor::cat(&[c[0].f(x), c[3].f(&c[2].f(&c[1].f(x))), max_pool_s2(x)], 1)
            }
            Block::C(c) => Tensor::cat(
                &[
                    c[0].f(x),
                    c[3].f(&c[2].f(&c[1].f(x))),
                    c[8].f(&c[7].f(&c[6].f(&c[5].f(&c[4].f(x))))),
                    c[9].f(&pool(x, Pool::AvgExcludePad)),
                ],
                1,
            ),
            Block::D(c) => Tensor::cat(
                &[
                    c[1].f(&c[0].f(x)),
                    c[5].f(&c[4].f(&c[3].f(&c[2].f(x)))),
                    max_pool_s2(x),
                ],
                1,
            ),
            Block::E(c, p) => {
                let b3 = c[1].f(x);
                let b3 = Tensor::cat(&[c[2].f(&b3), c[3].f(&b3)], 1);
                let bd = c[5].f(&c[4].f(x));
                let bd = Tensor::cat(&[c[6].f(&bd), c[7].f(&bd)], 1);
                Tensor::cat(&[c[0].f(x), b3, bd, c[8].f(&pool(x, *p))], 1)
            }
        }
    }
}

/// The FID Inception-v3 (evaluation mode: BatchNorm uses its running statistics).
#[derive(Debug)]
pub struct FidInception {
    stem: [BasicConv; 5],
    blocks: Vec<Block>,
    fc: nn::Linear,
}

impl FidInception {
    /// Builds the network on `device` and loads `weights` (see the module docs); the weights
    /// are frozen.
    ///
    /// # Errors
    /// [`ModelError::Weights`](crate::ModelError::Weights) naming the file when it cannot be read, or naming the tensors
    /// that are missing, unexpected, mis-shaped or not float32.
    pub fn load(weights: &Path, device: Device) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let net = Self::new(&vs.root());
        crate::frozen::load(&mut vs, weights)?;
        Ok(net)
    }

    /// The network with its variables declared under `p` (tch's default initialisation; load
    /// pretrained values into the store, as [`load`](Self::load) does). Also gives the exact
    /// variable layout a weights file must have.
    pub fn new(p: &nn::Path) -> Self {
        let blocks = vec![
            Block::a(p / "Mixed_5b", 192, 32),
            Block::a(p / "Mixed_5c", 256, 64),
            Block::a(p / "Mixed_5d", 288, 64),
            Block::b(p / "Mixed_6a", 288),
            Block::c(p / "Mixed_6b", 768, 128),
            Block::c(p / "Mixed_6c", 768, 160),
            Block::c(p / "Mixed_6d", 768, 160),
            Block::c(p / "Mixed_6e", 768, 192),
            Block::d(p / "Mixed_7a", 768),
            Block::e(p / "Mixed_7b", 1280, Pool::AvgExcludePad),
            Block::e(p / "Mixed_7c", 2048, Pool::Max),
        ];
        let stem = [
            BasicConv::sq(p / "Conv2d_1a_3x3", 3, 32, 3, 0, 2),
            BasicConv::sq(p / "Conv2d_2a_3x3", 32, 32, 3, 0, 1),
            BasicConv::sq(p / "Conv2d_2b_3x3", 32, 64, 3, 1, 1),
            BasicConv::sq(p / "Conv2d_3b_1x1", 64, 80, 1, 0, 1),
            BasicConv::sq(p / "Conv2d_4a_3x3", 80, 192, 3, 0, 1),
        ];
        Self {
            stem,
            blocks,
            fc: nn::linear(p / "fc", 2048, 1008, Default::default()),
        }
    }

    /// The device the network lives on.
    pub fn device(&self) -> Device {
        self.fc.ws.device()
    }

    /// Pool features (B, 2048) and class logits (B, 1008) of images in [−1, 1] (B, 3 or 1, H, W;
    /// grayscale is repeated to RGB), resized to 299² bilinearly as pytorch-fid does.
    pub fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let x = if x.size()[1] == 1 {
            x.repeat([1, 3, 1, 1])
        } else {
            x.shallow_clone()
        };
        let x = x
            .to_kind(Kind::Float)
            .upsample_bilinear2d([299, 299], false, None, None);
        let s = &self.stem;
        let h = max_pool_s2(&s[2].f(&s[1].f(&s[0].f(&x))));
        let mut h = max_pool_s2(&s[4].f(&s[3].f(&h)));
        for b in &self.blocks {
            h = b.f(&h);
        }
        let pool = h.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        let logits = pool.apply(&self.fc);
        (pool, logits)
    }
}

/// Fréchet distance between Gaussians fitted to two feature sets (rows = samples):
/// ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁^½ Σ₂ Σ₁^½)^½, in f64 (covariances with N − 1).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// // Two 1-D Gaussians: FID = (μ₁ − μ₂)² + (σ₁ − σ₂)².
/// let a = Tensor::from_slice(&[-1.0f64, 1.0]).view([2, 1]); // μ 0, σ² 2
/// let b = Tensor::from_slice(&[1.0f64, 5.0]).view([2, 1]); //  μ 3, σ² 8
/// let fid = vq_models::frechet_distance(&a, &b);
/// assert!((fid - (9.0 + (8f64.sqrt() - 2f64.sqrt()).powi(2))).abs() < 1e-9);
/// ```
pub fn frechet_distance(a: &Tensor, b: &Tensor) -> f64 {
    let stats = |x: &Tensor| {
        let x = x.to_kind(Kind::Double);
        let mu = x.mean_dim([0i64].as_slice(), false, Kind::Double);
        let c = &x - &mu;
        let cov = c.transpose(0, 1).matmul(&c) / (x.size()[0] - 1).max(1) as f64;
        (mu, cov)
    };
    let (m1, s1) = stats(a);
    let (m2, s2) = stats(b);
    let sqrt_psd = |m: &Tensor| {
        let (w, v) = m.linalg_eigh("L");
        (&v * w.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&v.transpose(0, 1))
    };
    let r1 = sqrt_psd(&s1);
    let inner = r1.matmul(&s2).matmul(&r1);
    let (w, _) = ((&inner + inner.transpose(0, 1)) / 2.0).linalg_eigh("L");
    let tr_sqrt = f64::try_from(w.clamp_min(0.0).sqrt().sum(Kind::Double)).unwrap_or(f64::NAN);
    let diff = f64::try_from((m1 - m2).square().sum(Kind::Double)).unwrap_or(f64::NAN);
    let tr = |m: &Tensor| f64::try_from(m.trace()).unwrap_or(f64::NAN);
    diff + tr(&s1) + tr(&s2) - 2.0 * tr_sqrt
}

/// Improved precision and recall of generated features against real ones (Kynkäänniemi et al.,
/// "Improved Precision and Recall Metric for Assessing Generative Models", NeurIPS 2019): each
/// set's manifold is the union of balls around its points, of radius the distance to the
/// point's `k`-th nearest neighbour in its own set (the point itself excluded);
/// precision = the fraction of generated points inside the real manifold,
/// recall = the fraction of real points inside the generated manifold. Distances in f64; a point
/// on a ball's boundary is inside (`≤`, as torch-fidelity's `prc_features_to_metric`, whose
/// `prc_neighborhood` is `k`; the paper's k is 3). Rows are compared in blocks of 1024, so
/// memory stays O(1024 · N) whatever the set sizes.
///
/// ```
/// use tch::Tensor;
/// // k = 1: every real ball has radius 1. The generated 100 lies in none; 4 lies on the
/// // boundary of 3's ball, which counts as inside (precision 3/4). Generated balls: 1 and 2
/// // have radius 1, 4 radius 2, 100 radius 96; the real 0 lies on the boundary of 1's
/// // (recall 4/4).
/// let real = Tensor::from_slice(&[0.0f64, 1.0, 2.0, 3.0]).view([4, 1]);
/// let fake = Tensor::from_slice(&[4.0f64, 100.0, 1.0, 2.0]).view([4, 1]);
/// let (precision, recall) = vq_models::precision_recall(&fake, &real, 1);
/// assert_eq!((precision, recall), (0.75, 1.0));
/// ```
pub fn precision_recall(generated: &Tensor, real: &Tensor, k: usize) -> (f64, f64) {
    let (g, r) = (generated.to_kind(Kind::Double), real.to_kind(Kind::Double));
    let precision = coverage(&g, &r, &knn_radii(&r, k));
    let recall = coverage(&r, &g, &knn_radii(&g, k));
    (precision, recall)
}

/// Rows per block of the pairwise distances of [`precision_recall`].
const DISTANCE_BLOCK: i64 = 1024;

/// Per row of `x`, the distance to its `k`-th nearest other row (the row itself at distance 0
/// is the first; with fewer than k + 1 rows, the farthest).
fn knn_radii(x: &Tensor, k: usize) -> Tensor {
    let n = x.size()[0];
    let kth = (k as i64 + 1).min(n).max(1);
    let parts: Vec<Tensor> = (0..n)
        .step_by(DISTANCE_BLOCK as usize)
        .map(|s| {
            let block = x.narrow(0, s, DISTANCE_BLOCK.min(n - s));
            Tensor::cdist(&block, x, 2.0, None::<i64>)
                .kthvalue(kth, 1, false)
                .0
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// The fraction of rows of `x` within `radii[j]` of some row j of `centres`.
fn coverage(x: &Tensor, centres: &Tensor, radii: &Tensor) -> f64 {
    let n = x.size()[0];
    if n == 0 || centres.size()[0] == 0 {
        return 0.0;
    }
    let inside: i64 = (0..n)
        .step_by(DISTANCE_BLOCK as usize)
        .map(|s| {
            let block = x.narrow(0, s, DISTANCE_BLOCK.min(n - s));
            let d = Tensor::cdist(&block, centres, 2.0, None::<i64>);
            i64::try_from(
                d.le_tensor(&radii.unsqueeze(0))
                    .any_dim(1, false)
                    .sum(Kind::Int64),
            )
            .unwrap_or(0)
        })
        .sum();
    inside as f64 / n as f64
}

/// Inception score `exp(E_x KL(p(y|x) ‖ p(y)))` from logits (N, classes), averaged over `splits`
/// equal parts: returns (mean, standard deviation) over the splits.
///
/// ```
/// use tch::Tensor;
/// // Confident and uniformly spread over 4 classes: IS = 4.
/// let logits = Tensor::eye(4, (tch::Kind::Float, tch::Device::Cpu)) * 50.0;
/// let (is, _) = vq_models::inception_score(&logits, 1);
/// assert!((is - 4.0).abs() < 1e-6);
/// ```
pub fn inception_score(logits: &Tensor, splits: usize) -> (f64, f64) {
    let p = logits.to_kind(Kind::Double).softmax(1, Kind::Double);
    let n = p.size()[0];
    let splits = (splits.max(1) as i64).min(n.max(1));
    let scores: Vec<f64> = (0..splits)
        .map(|k| {
            let (lo, hi) = (k * n / splits, (k + 1) * n / splits);
            let part = p.narrow(0, lo, hi - lo);
            let py = part.mean_dim([0i64].as_slice(), true, Kind::Double);
            let kl = (&part * ((&part + 1e-12).log() - (py + 1e-12).log()))
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
                .mean(Kind::Double);
            f64::try_from(kl).unwrap_or(f64::NAN).exp()
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / scores.len() as f64;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter count and variable names as torchvision's `inception_v3(num_classes=1008,
    /// aux_logits=False)` (23 850 960 parameters; 566 state-dict entries, 94 of them
    /// `num_batches_tracked` counters that tch does not keep).
    #[test]
    fn the_network_has_pytorch_fid_shapes_and_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = FidInception::new(&vs.root());
        let n: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(n, 23_850_960);
        let v = vs.variables();
        assert_eq!(v.len(), 566 - 94);
        for k in [
            "Conv2d_1a_3x3.conv.weight",
            "Mixed_5b.branch_pool.bn.running_var",
            "Mixed_7c.branch3x3dbl_3b.conv.weight",
            "fc.bias",
        ] {
            assert!(v.contains_key(k), "{k}");
        }
        let _guard = tch::no_grad_guard();
        let (pool, logits) =
            net.forward(&Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu)));
        assert_eq!(pool.size(), [2, 2048]);
        assert_eq!(logits.size(), [2, 1008]);
    }

    #[test]
    fn frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift() {
        let a = Tensor::randn([200, 5], (Kind::Double, Device::Cpu));
        assert!(frechet_distance(&a, &a).abs() < 1e-9);
        let shifted = &a + 2.0;
        assert!((frechet_distance(&a, &shifted) - 5.0 * 4.0).abs() < 1e-6);
    }
}
