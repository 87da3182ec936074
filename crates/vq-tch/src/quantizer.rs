//! [`VectorQuantizer`]: the paper's VQ layer for tch models.
//!
//! Input: encoder output `(B, C, H, W)`, `(B, C, T, H, W)` (channels = code dimension) or
//! `(N, D)`, on any device, f32/f64/bf16/f16 (the lookup and the estimator run in f32).
//! Output: the quantized tensor in the input's layout and dtype (value `q`, gradient to the input
//! through the chosen [`Estimator`]), the code indices, and the loss terms.

use rand::SeedableRng;
use rand::rngs::StdRng;
use tch::{Device, Kind, Reduction, Tensor};
use vq_core::{BetaPlacement, EmaCodebook, EmaConfig, Estimator, Metric};

use crate::error::{Result, VqTchError};
use crate::{apply_estimator, nearest_codes};

/// How the codebook is learned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CodebookLearning {
    /// Exponential moving averages (no codebook loss).
    Ema {
        /// EMA decay γ ∈ [0, 1).
        decay: f32,
        /// Laplace smoothing ε > 0.
        laplace_eps: f32,
        /// Cluster size under which a code is replaced by a batch sample (0: never).
        dead_code_threshold: f32,
        /// Lloyd iterations of k-means on the first training batch (0: keep the random init).
        kmeans_iters: usize,
    },
    /// By gradient of the codebook loss `mean((sg(e) − q)²)`.
    Gradient {
        /// Which term β weighs (taming-transformers' legacy placement: the codebook term).
        placement: BetaPlacement,
    },
}

/// Configuration of a [`VectorQuantizer`]; checked by [`VectorQuantizerConfig::validate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VectorQuantizerConfig {
    /// Number of codes K.
    pub codebook_size: usize,
    /// Code dimension D (= the input's channels).
    pub codebook_dim: usize,
    /// Euclidean or cosine (l2-normalised) lookup.
    pub metric: Metric,
    /// Gradient estimator.
    pub estimator: Estimator,
    /// Commitment weight β.
    pub beta: f32,
    /// Codebook learning.
    pub learning: CodebookLearning,
    /// Seed of the codebook initialisation and of EMA sampling.
    pub seed: u64,
}

impl VectorQuantizerConfig {
    /// Paper Table 1 (VQ-VAE, lucidrains quantizer): EMA decay 0.8, Laplace 1e-5, no dead-code
    /// replacement, no k-means, β = 1, rotation trick. `latent` picks the row: 16×16×32 with
    /// 1024 codes or 64×64×3 with 8192 codes.
    pub fn paper_vqvae(latent: VqVaeLatent, metric: Metric) -> Self {
        let (codebook_size, codebook_dim) = match latent {
            VqVaeLatent::F16x16x32 => (1024, 32),
            VqVaeLatent::F64x64x3 => (8192, 3),
        };
        Self {
            codebook_size,
            codebook_dim,
            metric,
            estimator: Estimator::Rotation,
            beta: 1.0,
            learning: CodebookLearning::Ema {
                decay: 0.8,
                laplace_eps: 1e-5,
                dead_code_threshold: 0.0,
                kmeans_iters: 0,
            },
            seed: 0,
        }
    }

    /// Paper Tables 2–3 (taming / latent-diffusion VQGAN): codebook learned by gradient, β = 0.25
    /// in taming's legacy placement (on the codebook term), Euclidean, rotation trick.
    pub fn paper_vqgan(codebook_size: usize, codebook_dim: usize) -> Self {
        Self {
            codebook_size,
            codebook_dim,
            metric: Metric::Euclidean,
            estimator: Estimator::Rotation,
            beta: 0.25,
            learning: CodebookLearning::Gradient {
                placement: BetaPlacement::LegacyCodebook,
            },
            seed: 0,
        }
    }

    /// Checks every field once.
    ///
    /// # Errors
    /// [`VqTchError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, why: &'static str| Err(VqTchError::Config { field, why });
        if self.codebook_size == 0 || u32::try_from(self.codebook_size).is_err() {
            return bad("codebook_size", "must be in 1..=u32::MAX");
        }
        if self.codebook_dim == 0 {
            return bad("codebook_dim", "must be > 0");
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad("beta", "must be finite and >= 0");
        }
        if let CodebookLearning::Ema {
            decay,
            laplace_eps,
            dead_code_threshold,
            ..
        } = self.learning
        {
            EmaConfig::new(decay, laplace_eps, dead_code_threshold, self.metric).map_err(|_| {
                VqTchError::Config {
                    field: "learning",
                    why: "EMA decay in [0, 1), laplace_eps > 0, threshold >= 0",
                }
            })?;
        }
        Ok(())
    }
}

/// Whether a forward pass may update the codebook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Training: EMA codebooks learn from the batch.
    Train,
    /// Evaluation: the codebook is left as it is.
    Eval,
}

/// The two latent settings of the paper's Table 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VqVaeLatent {
    /// 16×16 latents of dimension 32, 1024 codes.
    F16x16x32,
    /// 64×64 latents of dimension 3, 8192 codes.
    F64x64x3,
}

/// What [`VectorQuantizer::forward`] returns.
#[derive(Debug)]
pub struct VqOutput {
    /// Quantized input, in the input's layout and dtype.
    pub quantized: Tensor,
    /// Code index per position: `(B, H, W)`, `(B, T, H, W)` or `(N)`, i64.
    pub indices: Tensor,
    /// Weighted commitment loss (scalar, differentiable w.r.t. the input).
    pub commitment_loss: Tensor,
    /// Weighted codebook loss (scalar; zero for EMA codebooks).
    pub codebook_loss: Tensor,
}

/// The VQ layer. The codebook is a (K, D) f32 tensor on the layer's device; with
/// [`CodebookLearning::Gradient`] it requires grad (hand it to the optimizer via
/// [`codebook`](Self::codebook)); with EMA it is updated in [`forward`](Self::forward) during
/// training by [`vq_core::EmaCodebook`].
#[derive(Debug)]
pub struct VectorQuantizer {
    config: VectorQuantizerConfig,
    codebook: Tensor,
    ema: Option<EmaCodebook>,
    kmeans_pending: bool,
    rng: StdRng,
}

impl VectorQuantizer {
    /// A layer with a codebook drawn from N(0, 1) (l2-normalised for cosine) by the config's seed.
    ///
    /// # Errors
    /// [`VqTchError::Config`] for an invalid config.
    pub fn new(config: VectorQuantizerConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let (k, d) = (config.codebook_size as i64, config.codebook_dim as i64);
        tch::manual_seed(config.seed as i64);
        let mut init = Tensor::randn([k, d], (Kind::Float, Device::Cpu));
        if config.metric == Metric::Cosine {
            init = &init
                / init
                    .norm_scalaropt_dim(2, [1i64].as_slice(), true)
                    .clamp_min(1e-12);
        }
        let (ema, kmeans_pending) = match config.learning {
            CodebookLearning::Ema {
                decay,
                laplace_eps,
                dead_code_threshold,
                kmeans_iters,
            } => {
                let cfg = EmaConfig::new(decay, laplace_eps, dead_code_threshold, config.metric)?;
                (
                    Some(EmaCodebook::new(to_array(&init), cfg)?),
                    kmeans_iters > 0,
                )
            }
            CodebookLearning::Gradient { .. } => (None, false),
        };
        let codebook = init
            .to_device(device)
            .set_requires_grad(matches!(config.learning, CodebookLearning::Gradient { .. }));
        Ok(Self {
            config,
            codebook,
            ema,
            kmeans_pending,
            rng: StdRng::seed_from_u64(config.seed),
        })
    }

    /// The codebook (K, D).
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    /// The EMA state, for EMA codebooks.
    pub fn ema(&self) -> Option<&EmaCodebook> {
        self.ema.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &VectorQuantizerConfig {
        &self.config
    }

    /// Quantizes `x`. In [`Mode::Train`], EMA codebooks are updated from this batch (after
    /// k-means initialisation on the first one, if configured); [`Mode::Eval`] changes nothing.
    ///
    /// # Errors
    /// [`VqTchError::Shape`] if the channel dimension is not the code dimension or the rank is
    /// not 2, 4 or 5; errors of the search and the estimator.
    pub fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<VqOutput> {
        let train = mode == Mode::Train;
        let d = self.config.codebook_dim as i64;
        let rank = x.dim();
        let channels = match rank {
            2 | 4 | 5 => x.size()[1],
            _ => -1,
        };
        if channels != d {
            return Err(VqTchError::Shape {
                what: "input (N, D), (B, D, H, W) or (B, D, T, H, W)",
                e: x.size(),
                q: vec![d],
            });
        }
        // Channels last, flattened to (N, D), computed in f32.
        let perm: Vec<i64> = match rank {
            2 => vec![0, 1],
            4 => vec![0, 2, 3, 1],
            _ => vec![0, 2, 3, 4, 1],
        };
        let xl = x.permute(&perm[..]);
        let lead: Vec<i64> = xl.size()[..rank - 1].to_vec();
        let mut e = xl.reshape([-1, d]).to_kind(Kind::Float);
        if self.config.metric == Metric::Cosine {
            e = &e
                / e.norm_scalaropt_dim(2, [1i64].as_slice(), true)
                    .clamp_min(1e-12);
        }
        if train && self.kmeans_pending {
            self.kmeans_init(&e)?;
        }
        let idx = nearest_codes(&e.detach(), &self.codebook.detach(), self.config.metric)?
            .to_device(e.device());
        let q_live = self.codebook.index_select(0, &idx);
        let q = q_live.detach();
        let out = apply_estimator(&e, &q, self.config.estimator)?;
        let commit_mse = e.mse_loss(&q, Reduction::Mean);
        let (wc, wb) = match self.config.learning {
            CodebookLearning::Ema { .. } => (self.config.beta, 0.0),
            CodebookLearning::Gradient {
                placement: BetaPlacement::Commitment,
            } => (self.config.beta, 1.0),
            CodebookLearning::Gradient {
                placement: BetaPlacement::LegacyCodebook,
            } => (1.0, self.config.beta),
        };
        let commitment_loss = commit_mse * f64::from(wc);
        let codebook_loss = if wb > 0.0 {
            q_live.mse_loss(&e.detach(), Reduction::Mean) * f64::from(wb)
        } else {
            Tensor::zeros([], (Kind::Float, e.device()))
        };
        if let (true, Some(ema)) = (train, self.ema.as_mut()) {
            let idx_u32: Vec<u32> = Vec::<i64>::try_from(idx.to_device(Device::Cpu))
                .map_err(|err| VqTchError::Torch(err.to_string()))?
                .into_iter()
                .map(|i| i as u32)
                .collect();
            ema.update(to_array(&e.detach()).view(), &idx_u32, &mut self.rng)?;
            let cb = from_array(ema.codebook().to_owned()).to_device(self.codebook.device());
            tch::no_grad(|| self.codebook.copy_(&cb));
        }
        let mut lead_with_d = lead.clone();
        lead_with_d.push(d);
        let inverse: Vec<i64> = match rank {
            2 => vec![0, 1],
            4 => vec![0, 3, 1, 2],
            _ => vec![0, 4, 1, 2, 3],
        };
        let quantized = out
            .reshape(&lead_with_d[..])
            .permute(&inverse[..])
            .to_kind(x.kind());
        Ok(VqOutput {
            quantized,
            indices: idx.reshape(&lead[..]),
            commitment_loss,
            codebook_loss,
        })
    }

    fn kmeans_init(&mut self, e: &Tensor) -> Result<()> {
        self.kmeans_pending = false;
        let (Some(ema), CodebookLearning::Ema { kmeans_iters, .. }) =
            (self.ema.as_ref(), self.config.learning)
        else {
            return Ok(());
        };
        let samples = to_array(&e.detach());
        if samples.nrows() < self.config.codebook_size {
            return Ok(()); // too few samples for k-means: keep the random init
        }
        let cfg = *ema.config();
        let fresh = EmaCodebook::kmeans_init(
            samples.view(),
            self.config.codebook_size,
            kmeans_iters,
            cfg,
            &mut self.rng,
        )?;
        let cb = from_array(fresh.codebook().to_owned()).to_device(self.codebook.device());
        tch::no_grad(|| self.codebook.copy_(&cb));
        self.ema = Some(fresh);
        Ok(())
    }
}

/// A 2-D tensor (any dtype; moved to the CPU if needed) as an owned f32 ndarray.
fn to_array(t: &Tensor) -> ndarray::Array2<f32> {
    let cpu = crate::search::f32_contiguous(&t.to_device(Device::Cpu));
    crate::search::view2(&cpu).to_owned()
}

fn from_array(a: ndarray::Array2<f32>) -> Tensor {
    let (k, d) = a.dim();
    Tensor::from_slice(a.as_standard_layout().as_slice().expect("standard layout"))
        .view([k as i64, d as i64])
}
