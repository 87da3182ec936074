//! [`VectorQuantizer`]: the paper's VQ layer for tch models.
//!
//! Input: encoder output `(B, C, H, W)`, `(B, C, T, H, W)` (channels = code dimension) or
//! `(N, D)`, on any device, f32/f64/bf16/f16 (the lookup and the estimator run in f32).
//! Output: the quantized tensor in the input's layout and dtype (value `q`, gradient to the input
//! through the chosen [`Estimator`]), the code indices, and the loss terms.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Reduction, Tensor, nn};
pub use vq_core::family::HeadCodebooks;
use vq_core::gumbel::{GumbelForward, TemperatureSchedule, gumbel_noise};
use vq_core::{
    BetaPlacement, CodebookTerm, EmaCodebook, EmaConfig, Estimator, LossWeights, Metric,
};
use vq_dist::ProcessGroup;

use crate::error::{Result, VqTchError};
use crate::estimator::apply_estimator;
use crate::precision::{Autocast, Precision};
use crate::search::{FiniteCheck, FiniteVerdict, nearest_codes_checked};

/// How the codebook is learned.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
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

/// How the codebook's entries are drawn when a layer is built (from
/// `StdRng::seed_from_u64(seed)`, on the host; l2-normalised afterwards for the cosine metric),
/// as each reference implementation draws them. A k-means start is an option of EMA codebooks
/// ([`CodebookLearning::Ema`]'s `kmeans_iters`), run on the first training batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum CodebookInit {
    /// N(0, 1) per entry: enhancing-transformers' `embedding.weight.data.normal_()` (ViT-VQGAN
    /// and the video tokenizers, Tables 4–5). The default of configurations written before the
    /// field existed.
    #[default]
    Normal,
    /// U(−b, b) with `b = √(6 / (K·D))`: `torch.nn.init.kaiming_uniform_` (a = 0, fan-in, gain
    /// √2) on lucidrains' `(1, K, D)` codebook tensor, whose fan-in is K·D — the Table-1
    /// quantizer (`EuclideanCodebook`, `CosineSimCodebook`).
    KaimingUniform,
    /// U(−1/K, 1/K): taming-transformers' and latent-diffusion's
    /// `embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)` (Tables 2–3).
    UniformInverseK,
    /// U(−b, b) with the given bound.
    Uniform {
        /// The bound b > 0.
        bound: f32,
    },
}

impl CodebookInit {
    /// The `K·D` entries (row-major) drawn from `rng`.
    ///
    /// ```
    /// use rand::SeedableRng;
    /// use vq_tch::CodebookInit;
    /// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    /// let v = CodebookInit::KaimingUniform.draw(1024, 32, &mut rng);
    /// let b = (6.0f32 / (1024.0 * 32.0)).sqrt();
    /// assert!(v.iter().all(|x| x.abs() <= b));
    /// ```
    pub fn draw(&self, k: usize, d: usize, rng: &mut impl Rng) -> Vec<f32> {
        let n = k * d;
        let uniform = |b: f32, rng: &mut dyn rand::RngCore| -> Vec<f32> {
            let dist = rand_distr::Uniform::new_inclusive(-b, b);
            (0..n).map(|_| rng.sample(dist)).collect()
        };
        match *self {
            Self::Normal => {
                let normal = rand_distr::StandardNormal;
                (0..n).map(|_| rng.sample(normal)).collect()
            }
            Self::KaimingUniform => uniform((6.0 / (k as f64 * d as f64)).sqrt() as f32, rng),
            Self::UniformInverseK => uniform((1.0 / k as f64) as f32, rng),
            Self::Uniform { bound } => uniform(bound, rng),
        }
    }
}

/// Configuration of a [`VectorQuantizer`]; checked by [`VectorQuantizerConfig::validate`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
    /// Projection between the input's channels and the code dimension.
    pub projection: Projection,
    /// Seed of the codebook initialisation and of EMA sampling.
    pub seed: u64,
    /// How the codebook starts.
    #[cfg_attr(feature = "serde", serde(default))]
    pub init: CodebookInit,
    /// How an input becomes a code: the nearest code, or Gumbel-softmax sampling.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Family::is_nearest")
    )]
    pub family: Family,
}

/// How the layer turns an input vector into a code: one nearest-code lookup, Gumbel sampling, or
/// one of the families of [`vq_core::family`] (formulas there).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Family {
    /// The nearest code under the metric; the gradient reaches the input through the
    /// [`Estimator`]. The default of configurations written before the field existed.
    #[default]
    Nearest,
    /// Gumbel-softmax quantization ([`vq_core::gumbel`]): `Linear(D → K)` logits per position
    /// (`gumbel_proj`, PyTorch's default init, as taming's 1×1 `proj` conv), the relaxed one-hot
    /// `y = softmax((l + g)/τ)` mixes the codes, `z = yC`; the prior term
    /// `kl_weight · KL(softmax(l) ‖ uniform)` is the layer's codebook loss and there is no
    /// commitment term. The estimator and β are not used. Needs the Euclidean metric, a codebook
    /// learned by gradient and no projection (the input has D channels). Evaluation takes
    /// `argmax l`.
    Gumbel {
        /// Weight of the prior term (karpathy's 5e-4; taming's `GumbelVQ` 1e-8).
        kl_weight: f32,
        /// Soft or straight-through hard forward in training.
        forward: GumbelForward,
        /// τ by optimizer step; the trainer sets the step with
        /// [`VectorQuantizer::set_step`].
        temperature: TemperatureSchedule,
    },
    /// Residual VQ ([`vq_core::family::ResidualQuantizer`]): `stages` codebooks of K codes, each
    /// a nearest-code layer (variables under `stage{g}.`, seed `seed + g`, its own EMA, dead
    /// codes and k-means) on the residual the stages before it leave; the estimator acts per
    /// stage and the losses are summed. Indices gain a last axis of `stages`. Euclidean only.
    Residual {
        /// Number of stages (codebooks), ≥ 1.
        stages: usize,
        /// Quantizer dropout in training.
        dropout: StageDropout,
    },
    /// Multi-head VQ ([`vq_core::family::MultiHeadQuantizer`]): the D code channels split into
    /// `heads` blocks of D/H, each quantized with a shared codebook (K×D/H, under `head.`) or its
    /// own (`head{h}.`); losses are the mean over heads. Indices gain a last axis of `heads`.
    MultiHead {
        /// Number of heads H (divides D).
        heads: usize,
        /// One shared codebook or one per head.
        codebooks: HeadCodebooks,
    },
    /// SimVQ ([`vq_core::family::SimVq`]): the codebook variable is frozen, drawn N(0, 1/D)
    /// (whatever [`CodebookInit`] says, as lucidrains' `SimVQ` draws it), and the codes are
    /// `codebook · Wᵀ` with `W` the trainable `sim_transform.weight` (D×D, PyTorch's `nn.Linear`
    /// default init, no bias). Losses `‖sg(e) − q‖² + β‖e − sg(q)‖²`: a codebook learned by
    /// gradient with β on the commitment term (lucidrains: β = 0.25).
    SimVq,
    /// Finite scalar quantization ([`vq_core::family::Fsq`]): no codebook to learn (the
    /// `codebook` variable holds the frozen grid of `Π L_i` codes in index order, for
    /// [`VectorQuantizer::embed`]); K must be `Π L_i` and D the number of levels. No loss
    /// terms; the estimator maps the bounded vector to its rounded one.
    Fsq {
        /// Levels per dimension.
        levels: FsqLevels,
    },
}

/// Quantizer dropout of [`Family::Residual`] (SoundStream; lucidrains' `quantize_dropout`):
/// every training forward keeps only the first n stages, n drawn uniformly from
/// `min_stages..=stages` by `StdRng::seed_from_u64(seed ^ STAGE_DROPOUT_SALT + draw)` (the same
/// on every rank, and again after a resume); the dropped stages give index −1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum StageDropout {
    /// Every stage always runs.
    #[default]
    Off,
    /// Dropout down to `min_stages` (≥ 1).
    On {
        /// The fewest stages a training forward keeps.
        min_stages: usize,
    },
}

/// Salt of the stage-dropout draws ([`StageDropout`]).
pub const STAGE_DROPOUT_SALT: u64 = 0x7374_6167_6564_726f;

/// The levels of [`Family::Fsq`]: 1 to 8 dimensions of at least 2 levels each (serialised as a
/// list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "Vec<u32>", try_from = "Vec<u32>")
)]
pub struct FsqLevels {
    len: usize,
    levels: [u32; 8],
}

impl FsqLevels {
    /// Most dimensions FSQ takes here (the paper's largest setting has 8).
    pub const MAX: usize = 8;

    /// Levels per dimension.
    ///
    /// ```
    /// let l = vq_tch::FsqLevels::new(&[8, 5, 5, 5]).unwrap();
    /// assert_eq!(l.as_slice(), &[8, 5, 5, 5]);
    /// assert_eq!(l.codebook_size(), 1000);
    /// assert!(vq_tch::FsqLevels::new(&[8, 1]).is_err());
    /// ```
    ///
    /// # Errors
    /// [`VqTchError::Config`] for no levels, more than [`Self::MAX`], a level below 2, or more
    /// codes than u32 holds.
    pub fn new(levels: &[u32]) -> Result<Self> {
        if levels.len() > Self::MAX || vq_core::family::Fsq::new(levels).is_err() {
            return Err(VqTchError::Config {
                field: "family",
                why: "FSQ takes 1 to 8 levels of at least 2 each, whose product fits in u32",
            });
        }
        let mut out = [0; 8];
        out[..levels.len()].copy_from_slice(levels);
        Ok(Self {
            len: levels.len(),
            levels: out,
        })
    }

    /// The levels.
    pub fn as_slice(&self) -> &[u32] {
        &self.levels[..self.len]
    }

    /// The number of codes `Π L_i`.
    pub fn codebook_size(&self) -> usize {
        self.as_slice().iter().map(|&l| l as usize).product()
    }

    /// vq-core's FSQ with these levels.
    pub fn fsq(&self) -> vq_core::family::Fsq {
        vq_core::family::Fsq::new(self.as_slice()).expect("checked by FsqLevels::new")
    }
}

impl From<FsqLevels> for Vec<u32> {
    fn from(l: FsqLevels) -> Self {
        l.as_slice().to_vec()
    }
}

impl TryFrom<Vec<u32>> for FsqLevels {
    type Error = VqTchError;
    fn try_from(v: Vec<u32>) -> Result<Self> {
        Self::new(&v)
    }
}

/// Projection between the input's channels C and the code dimension D (factorised codes,
/// ViT-VQGAN): `Linear(C → D)` before the lookup and `Linear(D → C)` after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Projection {
    /// The input has D channels; no projection.
    Identity,
    /// `Linear(C → D)` in, `Linear(D → C)` out.
    Linear {
        /// Input channels C.
        channels: usize,
    },
    /// `Linear(C → D)` then `LayerNorm(D)` in, `Linear(D → C)` out (lucidrains' choice for
    /// cosine codebooks).
    LinearLayerNorm {
        /// Input channels C.
        channels: usize,
    },
}

impl Family {
    /// Whether this is [`Family::Nearest`] (configurations leave the field out then, so records
    /// written before it existed compare equal).
    pub fn is_nearest(&self) -> bool {
        *self == Self::Nearest
    }

    /// Code groups per position: the stages of residual VQ, the heads of multi-head VQ, else 1.
    pub fn code_groups(&self) -> usize {
        self.group_axis().unwrap_or(1)
    }

    /// The length of the indices' last axis for the families that have one (residual: stages,
    /// multi-head: heads); `None` for one code per position.
    pub fn group_axis(&self) -> Option<usize> {
        match *self {
            Self::Residual { stages, .. } => Some(stages),
            Self::MultiHead { heads, .. } => Some(heads),
            _ => None,
        }
    }

    /// A short stable name: `nearest`, `gumbel`, `residual4`, `residual4-dropout`,
    /// `heads4`, `heads4-separate`, `simvq`, `fsq8-5-5-5` (the inverse of
    /// [`from_name`](Self::from_name) except for Gumbel's settings).
    pub fn name(&self) -> String {
        match *self {
            Self::Nearest => "nearest".into(),
            Self::Gumbel { .. } => "gumbel".into(),
            Self::Residual { stages, dropout } => match dropout {
                StageDropout::Off => format!("residual{stages}"),
                StageDropout::On { min_stages: 1 } => format!("residual{stages}-dropout"),
                StageDropout::On { min_stages } => format!("residual{stages}-dropout{min_stages}"),
            },
            Self::MultiHead { heads, codebooks } => match codebooks {
                HeadCodebooks::Shared => format!("heads{heads}"),
                HeadCodebooks::Separate => format!("heads{heads}-separate"),
            },
            Self::SimVq => "simvq".into(),
            Self::Fsq { levels } => {
                let l: Vec<String> = levels.as_slice().iter().map(u32::to_string).collect();
                format!("fsq{}", l.join("-"))
            }
        }
    }

    /// Parses [`name`](Self::name)'s forms (Gumbel is chosen as a training method, not here).
    ///
    /// ```
    /// use vq_tch::{Family, StageDropout};
    /// assert_eq!(
    ///     Family::from_name("residual4-dropout").unwrap(),
    ///     Family::Residual { stages: 4, dropout: StageDropout::On { min_stages: 1 } }
    /// );
    /// assert_eq!(Family::from_name("fsq8-5-5-5").unwrap().name(), "fsq8-5-5-5");
    /// assert!(Family::from_name("residual0").is_err());
    /// ```
    ///
    /// # Errors
    /// [`VqTchError::UnknownFamily`] naming the text and the forms.
    pub fn from_name(name: &str) -> Result<Self> {
        let unknown = || VqTchError::UnknownFamily(name.to_owned());
        let count = |t: &str| {
            t.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(unknown)
        };
        let family = match name {
            "nearest" | "vq" => Self::Nearest,
            "simvq" => Self::SimVq,
            _ => {
                if let Some(rest) = name.strip_prefix("residual") {
                    let (n, drop) = rest.split_once("-dropout").unwrap_or((rest, "none"));
                    let stages = count(n)?;
                    let dropout = match drop {
                        "none" => StageDropout::Off,
                        "" => StageDropout::On { min_stages: 1 },
                        m => StageDropout::On {
                            min_stages: count(m)?,
                        },
                    };
                    Self::Residual { stages, dropout }
                } else if let Some(rest) = name.strip_prefix("heads") {
                    let (n, codebooks) = match rest.strip_suffix("-separate") {
                        Some(n) => (n, HeadCodebooks::Separate),
                        None => (rest, HeadCodebooks::Shared),
                    };
                    Self::MultiHead {
                        heads: count(n)?,
                        codebooks,
                    }
                } else if let Some(rest) = name.strip_prefix("fsq") {
                    let levels: Vec<u32> = rest
                        .split('-')
                        .map(|l| l.parse().map_err(|_| unknown()))
                        .collect::<Result<_>>()?;
                    Self::Fsq {
                        levels: FsqLevels::new(&levels).map_err(|_| unknown())?,
                    }
                } else {
                    return Err(unknown());
                }
            }
        };
        Ok(family)
    }
}

impl VectorQuantizerConfig {
    /// The weights of the commitment and codebook terms: vq-core's [`LossWeights`] for β, its
    /// placement and whether the codebook learns by gradient (EMA: no codebook term).
    ///
    /// # Errors
    /// A negative or non-finite β.
    pub fn loss_weights(&self) -> Result<LossWeights> {
        let (placement, term) = match self.learning {
            CodebookLearning::Ema { .. } => (BetaPlacement::Commitment, CodebookTerm::Exclude),
            CodebookLearning::Gradient { placement } => (placement, CodebookTerm::Include),
        };
        Ok(LossWeights::new(self.beta, placement, term)?)
    }

    /// Channels of the layer's input: C with a projection, else D.
    pub fn input_channels(&self) -> usize {
        match self.projection {
            Projection::Identity => self.codebook_dim,
            Projection::Linear { channels } | Projection::LinearLayerNorm { channels } => channels,
        }
    }

    /// Paper Table 1 (VQ-VAE, lucidrains quantizer): EMA decay 0.8, Laplace 1e-5, no dead-code
    /// replacement, no k-means, kaiming-uniform codebook, β = 1, rotation trick. `latent` picks the row: 16×16×32 with
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
            projection: Projection::Identity,
            seed: 0,
            init: CodebookInit::KaimingUniform,
            family: Family::Nearest,
        }
    }

    /// Paper Tables 2–3 (taming / latent-diffusion VQGAN): codebook learned by gradient from
    /// U(−1/K, 1/K), β = 0.25 in taming's legacy placement (on the codebook term), Euclidean,
    /// rotation trick.
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
            projection: Projection::Identity,
            seed: 0,
            init: CodebookInit::UniformInverseK,
            family: Family::Nearest,
        }
    }

    /// Paper Table 4 (ViT-VQGAN small, enhancing-transformers' quantizer): 8192 codes of
    /// dimension 32, l2-normalised (cosine) lookup, `Linear(512 → 32)` / `Linear(32 → 512)`
    /// projections, codebook drawn from N(0, 1) and learned by gradient with β = 0.25 on the
    /// commitment term, rotation trick. The video models of Table 5 use the same quantizer with 1024 / 2048 codes and
    /// `channels` = 256.
    pub fn paper_vit_vqgan(codebook_size: usize, channels: usize) -> Self {
        Self {
            codebook_size,
            codebook_dim: 32,
            metric: Metric::Cosine,
            estimator: Estimator::Rotation,
            beta: 0.25,
            learning: CodebookLearning::Gradient {
                placement: BetaPlacement::Commitment,
            },
            projection: Projection::Linear { channels },
            seed: 0,
            init: CodebookInit::Normal,
            family: Family::Nearest,
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
        if self.input_channels() == 0 {
            return bad("projection", "channels must be > 0");
        }
        if self.loss_weights().is_err() {
            return bad("beta", "must be finite and >= 0");
        }
        if let CodebookInit::Uniform { bound } = self.init
            && !(bound.is_finite() && bound > 0.0)
        {
            return bad("init", "a uniform bound must be finite and > 0");
        }
        if let Family::Gumbel {
            kl_weight,
            temperature,
            ..
        } = self.family
        {
            if !(kl_weight.is_finite() && kl_weight >= 0.0) {
                return bad("family", "the Gumbel kl_weight must be finite and >= 0");
            }
            if temperature.validate().is_err() {
                return bad("family", "every Gumbel temperature must be finite and > 0");
            }
            if self.metric != Metric::Euclidean {
                return bad(
                    "metric",
                    "a Gumbel quantizer mixes raw codes: euclidean only",
                );
            }
            if self.projection != Projection::Identity {
                return bad(
                    "projection",
                    "a Gumbel quantizer reads logits from its D-channel input: identity only",
                );
            }
            if !matches!(self.learning, CodebookLearning::Gradient { .. }) {
                return bad("learning", "a Gumbel codebook is learned by gradient");
            }
        }
        self.validate_family()?;
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

impl VectorQuantizerConfig {
    /// The rules of the families of [`vq_core::family`].
    fn validate_family(&self) -> Result<()> {
        let bad = |field: &'static str, why: &'static str| Err(VqTchError::Config { field, why });
        let gradient = matches!(self.learning, CodebookLearning::Gradient { .. });
        match self.family {
            Family::Nearest | Family::Gumbel { .. } => {}
            Family::Residual { stages, dropout } => {
                if stages == 0 {
                    return bad("family", "a residual quantizer needs at least one stage");
                }
                if let StageDropout::On { min_stages } = dropout
                    && !(1..=stages).contains(&min_stages)
                {
                    return bad("family", "stage dropout keeps between 1 and all the stages");
                }
                if self.metric != Metric::Euclidean {
                    return bad(
                        "metric",
                        "residual VQ subtracts codes from its input: euclidean only",
                    );
                }
            }
            Family::MultiHead { heads, .. } => {
                if heads == 0 || !self.codebook_dim.is_multiple_of(heads) {
                    return bad("family", "the number of heads must divide codebook_dim");
                }
            }
            Family::SimVq => {
                if !gradient {
                    return bad(
                        "learning",
                        "SimVQ learns its codebook's linear map by gradient",
                    );
                }
            }
            Family::Fsq { levels } => {
                if self.codebook_size != levels.codebook_size() {
                    return bad(
                        "codebook_size",
                        "FSQ has the product of its levels as codes",
                    );
                }
                if self.codebook_dim != levels.as_slice().len() {
                    return bad("codebook_dim", "FSQ has one dimension per level count");
                }
                if !gradient || self.metric != Metric::Euclidean {
                    return bad(
                        "learning",
                        "FSQ has no codebook to learn: learning gradient (unused), metric euclidean",
                    );
                }
            }
        }
        Ok(())
    }

    /// This configuration with `family` and what the family fixes, validated:
    /// * FSQ: K = `Π L_i`, D = the number of levels with a `Linear` projection from the input's
    ///   channels when they differ (as lucidrains' `FSQ` projects), learning by gradient
    ///   (unused), Euclidean;
    /// * SimVQ: learning by gradient with β = 0.25 on the commitment term (lucidrains' `SimVQ`
    ///   weights: 1 on the term that trains the map, 0.25 on the one that moves the input);
    /// * the others keep every other field.
    ///
    /// ```
    /// use vq_tch::{Family, FsqLevels, Metric, Projection, VectorQuantizerConfig, VqVaeLatent};
    /// let base = VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean);
    /// let fsq = base.with_family(Family::Fsq { levels: FsqLevels::new(&[8, 5, 5, 5]).unwrap() }).unwrap();
    /// assert_eq!((fsq.codebook_size, fsq.codebook_dim), (1000, 4));
    /// assert_eq!(fsq.projection, Projection::Linear { channels: 32 });
    /// assert!(base.with_family(Family::from_name("heads5").unwrap()).is_err()); // 5 ∤ 32
    /// ```
    ///
    /// # Errors
    /// [`VqTchError::Config`] naming the field the result breaks.
    pub fn with_family(mut self, family: Family) -> Result<Self> {
        self.family = family;
        match family {
            Family::Fsq { levels } => {
                let channels = self.input_channels();
                self.codebook_size = levels.codebook_size();
                self.codebook_dim = levels.as_slice().len();
                self.projection = match channels == self.codebook_dim {
                    true => Projection::Identity,
                    false => Projection::Linear { channels },
                };
                self.learning = CodebookLearning::Gradient {
                    placement: BetaPlacement::Commitment,
                };
                self.metric = Metric::Euclidean;
            }
            Family::SimVq => {
                self.learning = CodebookLearning::Gradient {
                    placement: BetaPlacement::Commitment,
                };
                self.beta = 0.25;
            }
            _ => {}
        }
        self.validate()?;
        Ok(self)
    }

    /// The nearest-code layers a residual or multi-head quantizer is made of: (variable path,
    /// configuration); empty for the other families.
    fn part_configs(&self) -> Vec<(String, Self)> {
        let part = |g: usize, dim: usize| Self {
            codebook_dim: dim,
            projection: Projection::Identity,
            family: Family::Nearest,
            seed: self.seed.wrapping_add(g as u64),
            ..*self
        };
        match self.family {
            Family::Residual { stages, .. } => (0..stages)
                .map(|g| (format!("stage{g}"), part(g, self.codebook_dim)))
                .collect(),
            Family::MultiHead { heads, codebooks } => {
                let dim = self.codebook_dim / heads;
                match codebooks {
                    HeadCodebooks::Shared => vec![("head".into(), part(0, dim))],
                    HeadCodebooks::Separate => (0..heads)
                        .map(|h| (format!("head{h}"), part(h, dim)))
                        .collect(),
                }
            }
            _ => Vec::new(),
        }
    }
}

/// Whether a forward pass may update the codebook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Mode {
    /// Training: EMA codebooks learn from the batch.
    Train,
    /// Evaluation: the codebook is left as it is.
    Eval,
}

/// The two latent settings of the paper's Table 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
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
    /// The vectors that were quantized, `e` (after any input projection and normalisation;
    /// detached), in the input's layout with D channels: without a projection, the value
    /// `quantized` would have if the layer passed its input through.
    pub latents: Tensor,
    /// Weighted commitment loss (scalar, differentiable w.r.t. the input).
    pub commitment_loss: Tensor,
    /// Weighted codebook loss (scalar; zero for EMA codebooks).
    pub codebook_loss: Tensor,
    /// Quantization error `mean((e − q)²)` per element, in code space (scalar, detached).
    pub quantization_error: Tensor,
    /// `mean(e²)` per element, in code space (scalar, detached): the scale against which the
    /// quantization error can be compared across models whose latents have different scales.
    pub latent_power: Tensor,
    /// Under [`FiniteCheck::Deferred`] on a device: whether the search's inputs were finite, still
    /// on the device ([`VectorQuantizer::set_finite_check`]); `None` when the check already ran.
    pub finite_verdict: Option<FiniteVerdict>,
}

/// The VQ layer.
///
/// All state lives in a [`tch::nn::VarStore`] under the path given to [`new`](Self::new), so the
/// store's `save`/`load` checkpoint it:
///
/// | name | shape | trainable | what |
/// | --- | --- | --- | --- |
/// | `codebook` | (K, D) f32 | with [`CodebookLearning::Gradient`] | the codes |
/// | `ema_cluster_size` | (K) f32 | no | EMA cluster sizes `N_k` (EMA only) |
/// | `ema_running_sum` | (K, D) f32 | no | EMA running sums `m_k` (EMA only) |
/// | `ema_steps` | () i64 | no | EMA updates done (EMA only) |
/// | `initialised` | () i64 | no | 1 once k-means initialisation has run or was not asked for |
/// | `project_in.{weight,bias}`, `project_in_norm.{weight,bias}`, `project_out.{weight,bias}` | | yes | [`Projection`] layers |
///
/// EMA updates run in vq-core on the CPU and as the same tensor ops on the layer's device
/// elsewhere (tested to agree). Dead-code replacement at EMA step
/// `s` draws from `StdRng::seed_from_u64(seed + s)`, so a resumed run replaces the same codes as
/// an uninterrupted one.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use vq_tch::{Metric, Mode, VectorQuantizer, VectorQuantizerConfig, VqVaeLatent};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let cfg = VectorQuantizerConfig::paper_vqvae(VqVaeLatent::F16x16x32, Metric::Euclidean);
/// let mut vq = VectorQuantizer::new(&vs.root().sub("quantizer"), cfg).unwrap();
/// let z = Tensor::randn([2, 32, 16, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let out = vq.forward(&z, Mode::Train).unwrap();
/// assert_eq!(out.quantized.size(), [2, 32, 16, 16]);
/// assert_eq!(out.indices.size(), [2, 16, 16]);
/// (out.quantized.square().mean(Kind::Float) + out.commitment_loss).backward();
/// assert_eq!(z.grad().size(), [2, 32, 16, 16]);
/// assert!(vs.variables().contains_key("quantizer.ema_running_sum"));
/// ```
#[derive(Debug)]
pub struct VectorQuantizer {
    config: VectorQuantizerConfig,
    codebook: Tensor,
    ema: Option<EmaTensors>,
    initialised: Tensor,
    project_in: Option<nn::Linear>,
    project_in_norm: Option<nn::LayerNorm>,
    project_out: Option<nn::Linear>,
    group: Option<Arc<ProcessGroup>>,
    finite_check: FiniteCheck,
    gumbel: Option<GumbelState>,
    /// The nearest-code layers of a residual or multi-head quantizer.
    parts: Vec<VectorQuantizer>,
    /// Stage-dropout draws done (residual VQ with [`StageDropout::On`]).
    stage_draws: Option<Tensor>,
    /// SimVQ's `W` (D, D).
    sim_transform: Option<Tensor>,
}

/// The Gumbel family's own variables and the temperature's step.
#[derive(Debug)]
struct GumbelState {
    proj: nn::Linear,
    /// Training forwards done (the noise of forward `s` is drawn from `seed + s`).
    draws: Tensor,
    step: usize,
}

/// The rows' part of a forward pass, before the layout is restored.
struct Rows {
    out: Tensor,
    /// The codes `q` (detached), (N, D).
    codes: Tensor,
    idx: Tensor,
    commitment_loss: Tensor,
    codebook_loss: Tensor,
    quantization_error: Tensor,
    finite_verdict: Option<FiniteVerdict>,
}

mod family;

/// A counter variable (EMA steps, Gumbel draws) read back to the host.
fn read_counter(t: &Tensor) -> Result<i64> {
    i64::try_from(t).map_err(|err| VqTchError::Torch(err.to_string()))
}

/// EMA state as variables of the store.
#[derive(Debug)]
struct EmaTensors {
    config: EmaConfig,
    kmeans_iters: usize,
    sizes: Tensor,
    sums: Tensor,
    steps: Tensor,
}

impl VectorQuantizer {
    /// A layer whose variables live under `path` (device: the store's). The codebook is drawn
    /// as the config's [`CodebookInit`] says (l2-normalised for cosine) by the config's seed;
    /// projections start as PyTorch's `nn.Linear` / `nn.LayerNorm` do ([`crate::init`]).
    ///
    /// # Errors
    /// [`VqTchError::Config`] for an invalid config.
    pub fn new(path: &nn::Path, config: VectorQuantizerConfig) -> Result<Self> {
        config.validate()?;
        let (k, d) = (config.codebook_size as i64, config.codebook_dim as i64);
        let device = path.device();
        let scalar = |v: i64| Tensor::from(v).to_device(device);
        let parts = config
            .part_configs()
            .into_iter()
            .map(|(name, cfg)| Self::new(&(path / name.as_str()), cfg))
            .collect::<Result<Vec<_>>>()?;
        let (codebook, ema) = match (parts.is_empty(), config.learning) {
            // A residual / multi-head layer's codes live in its parts.
            (false, _) => (Tensor::zeros([0, d], (Kind::Float, device)), None),
            (true, learning) => Self::new_codebook(path, &config, learning)?,
        };
        let pending = matches!(&ema, Some(e) if e.kmeans_iters > 0);
        let initialised = match parts.is_empty() {
            true => path.add("initialised", scalar(i64::from(!pending)), false),
            false => scalar(1),
        };
        let (project_in, project_in_norm, project_out) = match config.projection {
            Projection::Identity => (None, None, None),
            Projection::Linear { channels } | Projection::LinearLayerNorm { channels } => {
                let c = channels as i64;
                // nn.Linear's defaults, as lucidrains' and enhancing-transformers' projections.
                let lin = crate::init::torch_linear();
                let norm = matches!(config.projection, Projection::LinearLayerNorm { .. })
                    .then(|| nn::layer_norm(path / "project_in_norm", vec![d], Default::default()));
                (
                    Some(nn::linear(path / "project_in", c, d, lin)),
                    norm,
                    Some(nn::linear(path / "project_out", d, c, lin)),
                )
            }
        };
        let gumbel = matches!(config.family, Family::Gumbel { .. }).then(|| GumbelState {
            proj: nn::linear(path / "gumbel_proj", d, k, crate::init::torch_linear()),
            draws: path.add("gumbel_draws", scalar(0), false),
            step: 0,
        });
        let stage_draws = matches!(
            config.family,
            Family::Residual {
                dropout: StageDropout::On { .. },
                ..
            }
        )
        .then(|| path.add("stage_draws", scalar(0), false));
        let sim_transform = (config.family == Family::SimVq).then(|| {
            let cfg = nn::LinearConfig {
                bias: false,
                ..crate::init::torch_linear()
            };
            nn::linear(path / "sim_transform", d, d, cfg).ws
        });
        Ok(Self {
            config,
            codebook,
            ema,
            initialised,
            project_in,
            project_in_norm,
            project_out,
            group: None,
            finite_check: FiniteCheck::Eager,
            gumbel,
            parts,
            stage_draws,
            sim_transform,
        })
    }

    /// The `codebook` variable and the EMA state of a layer with codes of its own: drawn as the
    /// config's [`CodebookInit`] says (SimVQ: N(0, 1/D), frozen; FSQ: the frozen grid).
    fn new_codebook(
        path: &nn::Path,
        config: &VectorQuantizerConfig,
        learning: CodebookLearning,
    ) -> Result<(Tensor, Option<EmaTensors>)> {
        let (k, d) = (config.codebook_size as i64, config.codebook_dim as i64);
        let device = path.device();
        let mut rng = StdRng::seed_from_u64(config.seed);
        let values = match config.family {
            Family::SimVq => {
                let scale = (config.codebook_dim as f32).sqrt().recip();
                CodebookInit::Normal
                    .draw(config.codebook_size, config.codebook_dim, &mut rng)
                    .into_iter()
                    .map(|v| v * scale)
                    .collect()
            }
            Family::Fsq { levels } => levels.fsq().codebook().into_raw_vec_and_offset().0,
            _ => config
                .init
                .draw(config.codebook_size, config.codebook_dim, &mut rng),
        };
        let mut init = Tensor::from_slice(&values).view([k, d]);
        if config.metric == Metric::Cosine && config.family != Family::SimVq {
            init = crate::rows::l2_normalise_rows(&init);
        }
        let init = init.to_device(device);
        let scalar = |v: i64| Tensor::from(v).to_device(device);
        Ok(match learning {
            CodebookLearning::Ema {
                decay,
                laplace_eps,
                dead_code_threshold,
                kmeans_iters,
            } => {
                let cfg = EmaConfig::new(decay, laplace_eps, dead_code_threshold, config.metric)?;
                let ema = EmaTensors {
                    config: cfg,
                    kmeans_iters,
                    sizes: path.add(
                        "ema_cluster_size",
                        Tensor::ones([k], (Kind::Float, device)),
                        false,
                    ),
                    sums: path.add("ema_running_sum", init.copy(), false),
                    steps: path.add("ema_steps", scalar(0), false),
                };
                (path.add("codebook", init, false), Some(ema))
            }
            CodebookLearning::Gradient { .. } => {
                let trainable = matches!(config.family, Family::Nearest | Family::Gumbel { .. });
                (path.add("codebook", init, trainable), None)
            }
        })
    }

    /// Trains data-parallel in `group` (or alone with `None`): every EMA step sums the batch
    /// statistics (per-code counts and sums) over the ranks before updating, so every rank
    /// holds the same codebook, equal to one process's on the union of the ranks' batches
    /// (lucidrains' `sync_codebook`); dead-code replacement draws from the union of the ranks'
    /// rows (all-gathered, in the order of the union batch), and k-means initialisation runs on
    /// the union and is broadcast from rank 0. Every rank must call [`forward`](Self::forward)
    /// in [`Mode::Train`] equally often (batch sizes may differ, e.g. after skipped samples).
    pub fn set_process_group(&mut self, group: Option<Arc<ProcessGroup>>) {
        for part in &mut self.parts {
            part.set_process_group(group.clone());
        }
        self.group = group;
    }

    /// When the device search checks its inputs for NaN / ±∞ ([`FiniteCheck::Eager`] by
    /// default). With [`FiniteCheck::Deferred`] a forward pass on a GPU never waits for the
    /// device: the verdict comes back in [`VqOutput::finite_verdict`] for the caller to read
    /// later, and a training loop must not apply an update made from a bad batch before it has.
    /// (The EMA step of a non-finite batch writes NaN into the codebook either way.)
    pub fn set_finite_check(&mut self, check: FiniteCheck) {
        for part in &mut self.parts {
            part.set_finite_check(check);
        }
        self.finite_check = check;
    }

    /// Tells the layer the optimizer step (0-based) about to be trained, which sets the Gumbel
    /// family's temperature ([`Family::Gumbel`]); other families ignore it.
    pub fn set_step(&mut self, step: usize) {
        if let Some(g) = &mut self.gumbel {
            g.step = step;
        }
    }

    /// The Gumbel family's temperature at the step set by [`set_step`](Self::set_step).
    pub fn temperature(&self) -> Option<f64> {
        match (self.config.family, &self.gumbel) {
            (Family::Gumbel { temperature, .. }, Some(g)) => Some(temperature.at(g.step)),
            _ => None,
        }
    }

    /// The `codebook` variable (K, D): SimVQ's frozen codebook, FSQ's grid; empty (0, D) for
    /// residual and multi-head layers, whose codebooks are their [`parts`](Self::parts)'.
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    /// The codes the layer outputs (detached, f32): (K, D), or (G, K, D/G′) stacked for the
    /// G codebooks of a residual or multi-head layer (one for shared heads); SimVQ's are
    /// `codebook · Wᵀ`.
    pub fn codes_table(&self) -> Tensor {
        match self.parts.is_empty() {
            true => self.codes().detach(),
            false => Tensor::stack(
                &self
                    .parts
                    .iter()
                    .map(|p| p.codes().detach())
                    .collect::<Vec<_>>(),
                0,
            ),
        }
    }

    /// The nearest-code layers of a residual (stages) or multi-head (heads; one when they
    /// share a codebook) layer; empty for the other families.
    pub fn parts(&self) -> &[VectorQuantizer] {
        &self.parts
    }

    /// The quantized output of code indices, in the layout [`forward`](Self::forward) returns
    /// it: indices (N), (B, H, W) or (B, T, H, W) of any integer type give (N, C),
    /// (B, C, H, W) or (B, C, T, H, W) f32 — the codebook rows, through the output projection
    /// if the layer has one. For the indices `forward` returned, this is its `quantized` value.
    ///
    /// # Errors
    /// [`VqTchError::Shape`] for another rank, [`VqTchError::IndexKind`] for non-integer
    /// indices, [`VqTchError::Code`] for an index outside `0..K` (naming it).
    pub fn embed(&self, indices: &Tensor) -> Result<Tensor> {
        let groups = self.config.family.group_axis();
        let rank = indices.dim() - usize::from(groups.is_some());
        let last_ok = groups.is_none_or(|g| indices.size().last() == Some(&(g as i64)));
        if !matches!(rank, 1 | 3 | 4) || !last_ok {
            return Err(VqTchError::Shape {
                what: "code indices (N), (B, H, W) or (B, T, H, W), with a last axis of the code groups for residual and multi-head layers",
                e: indices.size(),
                q: groups.map(|g| vec![g as i64]).unwrap_or_default(),
            });
        }
        if !matches!(
            indices.kind(),
            Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
        ) {
            return Err(VqTchError::IndexKind(indices.kind()));
        }
        let k = self.config.codebook_size as i64;
        let g = groups.unwrap_or(1) as i64;
        let flat = indices
            .reshape([-1, g])
            .to_kind(Kind::Int64)
            .to_device(self.codebook.device());
        if flat.numel() > 0 {
            let range = Vec::<i64>::try_from(Tensor::stack(&[flat.min(), flat.max()], 0))
                .map_err(|e| VqTchError::Torch(e.to_string()))?;
            if let Some(&bad) = range.iter().find(|&&v| !(0..k).contains(&v)) {
                return Err(VqTchError::Code {
                    index: bad,
                    codes: k,
                });
            }
        }
        let mut out = match self.parts.is_empty() {
            true => self.codes().detach().index_select(0, &flat.reshape([-1])),
            false => self.embed_groups(&flat),
        };
        if let Some(lin) = &self.project_out {
            out = out.apply(lin);
        }
        let c = out.size()[1];
        let mut lead = indices.size()[..rank].to_vec();
        lead.push(c);
        let inverse: Vec<i64> = match rank {
            1 => vec![0, 1],
            3 => vec![0, 3, 1, 2],
            _ => vec![0, 4, 1, 2, 3],
        };
        Ok(out.reshape(&lead[..]).permute(&inverse[..]))
    }

    /// A copy of the EMA state as vq-core's type, for EMA codebooks.
    ///
    /// # Errors
    /// [`VqTchError::Core`] if the stored state is not valid (e.g. a checkpoint with negative
    /// cluster sizes).
    pub fn ema(&self) -> Result<Option<EmaCodebook>> {
        self.ema
            .as_ref()
            .map(|ema| {
                Ok(EmaCodebook::from_parts(
                    to_array(&self.codebook),
                    to_array(&ema.sums),
                    ndarray::Array1::from(
                        Vec::<f32>::try_from(ema.sizes.to_device(Device::Cpu))
                            .map_err(|err| VqTchError::Torch(err.to_string()))?,
                    ),
                    ema.config,
                )?)
            })
            .transpose()
    }

    /// The configuration.
    pub fn config(&self) -> &VectorQuantizerConfig {
        &self.config
    }

    /// Quantizes `x`. In [`Mode::Train`], EMA codebooks are updated from this batch (after
    /// k-means initialisation on the first one, if configured); [`Mode::Eval`] changes nothing.
    /// Runs in f32 inside any autocast region (an f16/bf16 `x` is read as f32); the output
    /// `quantized` has `x`'s dtype.
    ///
    /// # Errors
    /// [`VqTchError::Shape`] if the channel dimension is not the layer's input channels or the
    /// rank is not 2, 4 or 5; errors of the search and the estimator.
    pub fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<VqOutput> {
        // The search, the estimator, the EMA and the losses run in f32 even inside an autocast
        // region (autocast exists for CPU and CUDA only; elsewhere there is none to close).
        let _f32 = Autocast::enter(x.device(), Precision::F32).ok();
        let train = mode == Mode::Train;
        let c = self.config.input_channels() as i64;
        let rank = x.dim();
        let channels = match rank {
            2 | 4 | 5 => x.size()[1],
            _ => -1,
        };
        if channels != c {
            return Err(VqTchError::Shape {
                what: "input (N, C), (B, C, H, W) or (B, C, T, H, W) with C the layer's channels",
                e: x.size(),
                q: vec![c],
            });
        }
        // Channels last, flattened to (N, C), computed in f32.
        let perm: Vec<i64> = match rank {
            2 => vec![0, 1],
            4 => vec![0, 2, 3, 1],
            _ => vec![0, 2, 3, 4, 1],
        };
        let xl = x.permute(&perm[..]);
        let lead: Vec<i64> = xl.size()[..rank - 1].to_vec();
        let mut e = xl.reshape([-1, c]).to_kind(Kind::Float);
        if let Some(lin) = &self.project_in {
            e = e.apply(lin);
        }
        if let Some(norm) = &self.project_in_norm {
            e = e.apply(norm);
        }
        if self.config.metric == Metric::Cosine {
            e = crate::rows::l2_normalise_rows(&e);
        }
        // Rows per sample: a data-parallel union batch interleaves whole samples.
        let per_sample = lead[1..].iter().product::<i64>().max(1);
        let Rows {
            mut out,
            idx,
            commitment_loss,
            codebook_loss,
            quantization_error,
            finite_verdict,
            ..
        } = self.rows(&e, train, per_sample)?;
        let latent_power = e.detach().square().mean(Kind::Float);
        if let Some(lin) = &self.project_out {
            out = out.apply(lin);
        }
        let inverse: Vec<i64> = match rank {
            2 => vec![0, 1],
            4 => vec![0, 3, 1, 2],
            _ => vec![0, 4, 1, 2, 3],
        };
        let layout = |t: &Tensor| {
            let mut shape = lead.clone();
            shape.push(t.size()[1]);
            t.reshape(&shape[..])
                .permute(&inverse[..])
                .to_kind(x.kind())
        };
        let quantized = layout(&out);
        let mut index_shape = lead.clone();
        index_shape.extend(self.config.family.group_axis().map(|g| g as i64));
        Ok(VqOutput {
            quantized,
            latents: layout(&e.detach()),
            indices: idx.reshape(&index_shape[..]),
            commitment_loss,
            codebook_loss,
            quantization_error,
            latent_power,
            finite_verdict,
        })
    }

    /// The codes as the layer uses them: the codebook, l2-normalised per row (differentiably)
    /// for a cosine codebook learned by gradient, as enhancing-transformers' quantizer does at
    /// every use (an EMA cosine codebook is renormalised by each EMA step instead).
    fn codes(&self) -> Tensor {
        let codes = match &self.sim_transform {
            Some(w) => self.codebook.matmul(&w.tr()),
            None => self.codebook.shallow_clone(),
        };
        match (self.config.metric, self.config.learning) {
            (Metric::Cosine, CodebookLearning::Gradient { .. }) => {
                crate::rows::l2_normalise_rows(&codes)
            }
            _ => codes,
        }
    }

    /// Nearest-code lookup, estimator, commitment / codebook losses and the EMA step on rows
    /// `e` (N, D).
    fn nearest_rows(&mut self, e: &Tensor, train: bool, per_sample: i64) -> Result<Rows> {
        let codes = self.codes();
        let (idx, finite_verdict) = nearest_codes_checked(
            &e.detach(),
            &codes.detach(),
            self.config.metric,
            self.finite_check,
        )?;
        let idx = idx.to_device(e.device());
        let q_live = codes.index_select(0, &idx);
        let q = q_live.detach();
        let out = apply_estimator(e, &q, self.config.estimator)?;
        let commit_mse = e.mse_loss(&q, Reduction::Mean);
        let weights = self.config.loss_weights()?;
        let (wc, wb) = (weights.commitment(), weights.codebook());
        let quantization_error = commit_mse.detach();
        let commitment_loss = commit_mse * f64::from(wc);
        let codebook_loss = if wb > 0.0 {
            q_live.mse_loss(&e.detach(), Reduction::Mean) * f64::from(wb)
        } else {
            Tensor::zeros([], (Kind::Float, e.device()))
        };
        if train && self.ema.is_some() {
            self.ema_update(&e.detach(), &idx, per_sample)?;
        }
        Ok(Rows {
            out,
            codes: q,
            idx,
            commitment_loss,
            codebook_loss,
            quantization_error,
            finite_verdict,
        })
    }

    /// Gumbel-softmax quantization of rows `e` (N, D) ([`Family::Gumbel`], the formulas of
    /// [`vq_core::gumbel`]). Training draws the noise on the host from
    /// `StdRng::seed_from_u64(seed + draws)`, so a resumed run draws what an uninterrupted one
    /// does. The quantization error is `mean((z − q)²)` between the mixture the decoder sees and
    /// the hard code (0 in evaluation and with the hard forward).
    fn gumbel_rows(&mut self, e: &Tensor, train: bool) -> Result<Rows> {
        let Family::Gumbel {
            kl_weight,
            forward,
            temperature,
        } = self.config.family
        else {
            unreachable!("called for the Gumbel family only")
        };
        let g = self
            .gumbel
            .as_ref()
            .expect("Gumbel state exists for the family");
        let logits = e.apply(&g.proj);
        let (n, k) = (logits.size()[0], self.config.codebook_size as i64);
        let (y, idx) = if train {
            let draws = read_counter(&g.draws)?;
            let mut rng = StdRng::seed_from_u64(self.config.seed.wrapping_add(draws as u64));
            let noise = gumbel_noise(n as usize, k as usize, &mut rng);
            let noise = Tensor::from_slice(noise.as_slice().expect("standard layout"))
                .view([n, k])
                .to_device(e.device());
            let _ = tch::no_grad(|| g.draws.shallow_clone().g_add_scalar_(1));
            let tau = temperature.at(g.step);
            let soft = ((&logits + noise) / tau).softmax(-1, Kind::Float);
            let idx = soft.argmax(-1, false);
            let y = match forward {
                GumbelForward::Soft => soft,
                GumbelForward::Hard => {
                    let hard = idx.one_hot(k).to_kind(Kind::Float);
                    hard - soft.detach() + soft
                }
            };
            (y, idx)
        } else {
            let idx = logits.argmax(-1, false);
            (idx.one_hot(k).to_kind(Kind::Float), idx)
        };
        let out = y.matmul(&self.codebook);
        let q = self.codebook.detach().index_select(0, &idx);
        let quantization_error = out.detach().mse_loss(&q, Reduction::Mean);
        let p = logits.softmax(-1, Kind::Float);
        let kl = (&p * (&p * k as f64 + vq_core::gumbel::KL_EPS).log())
            .sum_dim_intlist(-1, false, Kind::Float)
            .mean(Kind::Float);
        Ok(Rows {
            out,
            codes: q,
            idx,
            commitment_loss: Tensor::zeros([], (Kind::Float, e.device())),
            codebook_loss: kl * f64::from(kl_weight),
            quantization_error,
            finite_verdict: None,
        })
    }

    /// Whether k-means initialisation is asked for and has not run yet (a host read of the
    /// `initialised` flag, made only for layers configured with k-means).
    fn kmeans_pending(&self) -> bool {
        matches!(&self.ema, Some(e) if e.kmeans_iters > 0)
            && i64::try_from(&self.initialised).unwrap_or(1) == 0
    }

    /// One EMA step: vq-core on the CPU, the same step as tensor ops ([`crate::ema`]) on other
    /// devices. Dead-code rows are drawn from `StdRng::seed_from_u64(seed + step)` either way.
    fn ema_update(&mut self, e: &Tensor, idx: &Tensor, per_sample: i64) -> Result<()> {
        let ema = self.ema.as_ref().expect("called for EMA codebooks only");
        let seeded = |step: i64| StdRng::seed_from_u64(self.config.seed.wrapping_add(step as u64));
        if let Some(group) = self.group.clone() {
            let step = read_counter(&ema.steps)?;
            return self.ema_update_synced(&group, e, idx, per_sample, &mut seeded(step), step);
        }
        if self.codebook.device() != Device::Cpu {
            // The step number seeds the dead-code draws only: without them it is not read back
            // from the device (the host does not wait), and advances there.
            let mut rng = match ema.config.dead_code_threshold() > 0.0 {
                true => seeded(read_counter(&ema.steps)?),
                false => seeded(0),
            };
            let ema = self.ema.as_mut().expect("called for EMA codebooks only");
            crate::ema::ema_step(
                crate::ema::EmaTensorsMut {
                    codes: &mut self.codebook,
                    sums: &mut ema.sums,
                    sizes: &mut ema.sizes,
                },
                e,
                idx,
                &ema.config,
                &mut rng,
            );
            let _ = tch::no_grad(|| ema.steps.g_add_scalar_(1));
            return Ok(());
        }
        let step = read_counter(&ema.steps)?;
        let mut rng = seeded(step);
        let mut state = self.ema()?.expect("called for EMA codebooks only");
        state.update(to_array(e).view(), &indices_u32(idx)?, &mut rng)?;
        self.store_ema(&state, step + 1);
        Ok(())
    }

    fn store_ema(&mut self, state: &EmaCodebook, steps: i64) {
        let ema = self.ema.as_mut().expect("called for EMA codebooks only");
        let device = self.codebook.device();
        let sizes = Tensor::from_slice(state.cluster_sizes().as_slice().expect("contiguous"));
        tch::no_grad(|| {
            self.codebook
                .copy_(&from_array(state.codebook().to_owned()).to_device(device));
            ema.sums
                .copy_(&from_array(state.running_sums().to_owned()).to_device(device));
            ema.sizes.copy_(&sizes.to_device(device));
            let _ = ema.steps.fill_(steps);
        });
    }

    fn kmeans_init(&mut self, e: &Tensor, per_sample: i64) -> Result<()> {
        let Some(ema) = self.ema.as_ref() else {
            return Ok(());
        };
        let samples = match &self.group {
            Some(g) => to_array(&union_rows(g, &e.detach(), per_sample)?),
            None => to_array(&e.detach()),
        };
        if samples.nrows() < self.config.codebook_size {
            // Too few samples for k-means: keep the random init, try again on the next batch.
            return Ok(());
        }
        let mut rng = StdRng::seed_from_u64(self.config.seed ^ 0x6b6d_6561_6e73);
        let fresh = EmaCodebook::kmeans_init(
            samples.view(),
            self.config.codebook_size,
            ema.kmeans_iters,
            ema.config,
            &mut rng,
        )?;
        let steps = i64::try_from(&ema.steps).map_err(|err| VqTchError::Torch(err.to_string()))?;
        self.store_ema(&fresh, steps);
        if let Some(g) = &self.group {
            let ema = self.ema.as_ref().expect("EMA codebook");
            for t in [&self.codebook, &ema.sums, &ema.sizes] {
                g.broadcast(t, 0)?;
            }
        }
        let _ = tch::no_grad(|| self.initialised.fill_(1));
        Ok(())
    }

    /// The EMA step of a data-parallel group: statistics summed over ranks, replacement rows from
    /// the union of the ranks' rows.
    fn ema_update_synced(
        &mut self,
        group: &ProcessGroup,
        e: &Tensor,
        idx: &Tensor,
        per_sample: i64,
        rng: &mut StdRng,
        step: i64,
    ) -> Result<()> {
        let ema = self.ema.as_ref().expect("called for EMA codebooks only");
        let k = self.config.codebook_size as i64;
        // On the CPU, vq-core's state and statistics (f64 accumulation), as the single-process
        // step uses.
        let mut cpu_state = match self.codebook.device() {
            Device::Cpu => self.ema()?,
            _ => None,
        };
        let (counts, sums) = match &cpu_state {
            Some(state) => {
                let stats = state.statistics(to_array(e).view(), &indices_u32(idx)?)?;
                (
                    Tensor::from_slice(stats.counts.as_slice().expect("contiguous")),
                    from_array(stats.sums),
                )
            }
            None => crate::ema::batch_statistics(e, idx, k),
        };
        let (counts, sums) = (
            counts.to_device(group.device()),
            sums.to_device(group.device()),
        );
        group.all_reduce_sum(&counts)?;
        group.all_reduce_sum(&sums)?;
        let pool = if ema.config.dead_code_threshold() > 0.0 {
            union_rows(group, e, per_sample)?
        } else {
            e.shallow_clone()
        };
        let Some(mut state) = cpu_state.take() else {
            let ema = self.ema.as_mut().expect("called for EMA codebooks only");
            let device = self.codebook.device();
            crate::ema::ema_apply(
                crate::ema::EmaTensorsMut {
                    codes: &mut self.codebook,
                    sums: &mut ema.sums,
                    sizes: &mut ema.sizes,
                },
                &counts.to_device(device),
                &sums.to_device(device),
                &pool.to_device(device),
                &ema.config,
                rng,
            );
            let _ = tch::no_grad(|| ema.steps.fill_(step + 1));
            return Ok(());
        };
        let stats = vq_core::EmaStatistics {
            counts: ndarray::Array1::from(
                Vec::<f32>::try_from(counts.to_device(Device::Cpu))
                    .map_err(|err| VqTchError::Torch(err.to_string()))?,
            ),
            sums: to_array(&sums),
        };
        let pool = state.prepare_rows(to_array(&pool).view());
        state.update_with(&stats, pool.view(), rng)?;
        self.store_ema(&state, step + 1);
        Ok(())
    }
}

/// The rows of every rank's `e` (N, D) in the order of the union batch, where `e` holds
/// `per_sample` consecutive rows per sample (H·W latents of an image): rank r's sample j is
/// sample `j·world + r` of the union, the order in which the data-parallel trainer deals a
/// batch out to the ranks. Ranks with fewer rows (samples skipped as unreadable) are padded for
/// the all-gather and their rows then taken rank after rank.
fn union_rows(group: &ProcessGroup, e: &Tensor, per_sample: i64) -> Result<Tensor> {
    let (n, d) = (e.size()[0], e.size()[1]);
    let dev = group.device();
    let sizes = group.all_gather(&Tensor::from_slice(&[n]).to_device(dev))?;
    let sizes = Vec::<i64>::try_from(sizes.to_device(Device::Cpu).view([-1]))
        .map_err(|err| VqTchError::Torch(err.to_string()))?;
    let most = sizes.iter().copied().max().unwrap_or(n);
    let world = group.world() as i64;
    let rows = e.to_device(dev).to_kind(Kind::Float);
    let padded = if n < most {
        Tensor::cat(&[rows, Tensor::zeros([most - n, d], (Kind::Float, dev))], 0)
    } else {
        rows
    };
    let all = group.all_gather(&padded.contiguous())?;
    let union = if sizes.iter().all(|&s| s == n) {
        all.view([world, n / per_sample, per_sample, d])
            .transpose(0, 1)
            .reshape([-1, d])
    } else {
        let parts: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(r, &s)| all.get(r as i64).narrow(0, 0, s))
            .collect();
        Tensor::cat(&parts, 0)
    };
    Ok(union.to_device(e.device()))
}

fn indices_u32(idx: &Tensor) -> Result<Vec<u32>> {
    Ok(Vec::<i64>::try_from(idx.to_device(Device::Cpu))
        .map_err(|err| VqTchError::Torch(err.to_string()))?
        .into_iter()
        .map(|i| i as u32)
        .collect())
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
