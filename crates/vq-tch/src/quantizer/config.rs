//! The layer's configuration: [`VectorQuantizerConfig`] and its parts (codebook learning and
//! initialisation, the [`Family`], projections), its validation, names and the paper's presets.

use rand::Rng;
pub use vq_core::family::HeadCodebooks;
use vq_core::gumbel::{GumbelForward, TemperatureSchedule};
use vq_core::{BetaPlacement, CodebookTerm, EmaConfig, Estimator, LossWeights, Metric};

use crate::error::{Result, VqTchError};

/// How the codebook is learned.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
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
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
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

/// Configuration of a [`VectorQuantizer`](crate::VectorQuantizer); checked by [`VectorQuantizerConfig::validate`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
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
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
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
        /// [`VectorQuantizer::set_step`](crate::VectorQuantizer::set_step).
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
    /// [`VectorQuantizer::embed`](crate::VectorQuantizer::embed)); K must be `Π L_i` and D the number of levels. No loss
    /// terms; the estimator maps the bounded vector to its rounded one.
    Fsq {
        /// Levels per dimension.
        levels: FsqLevels,
    },
    /// DiVeQ ([`vq_core::diveq`]): the nearest code, reached by `z + ‖q − z‖·sg(d)` with `d`
    /// the unit direction to the code, noised by `N(0, σ²)` per entry (σ = 0: the detached
    /// variant). The gradient moves both the input and the code, so the codebook learns by
    /// gradient with no codebook loss (β, 0 by default, weighs an optional commitment term);
    /// the estimator must be straight-through (DiVeQ is the gradient path). Unused codes are
    /// replaced as the official code does ([`CodeReplacement`]). Euclidean only.
    Diveq {
        /// σ, the noise's standard deviation (the official `noise_var`, which is passed to
        /// `Normal(0, ·)` as its scale: 1e-3).
        noise_std: f32,
        /// Dead-code replacement.
        replacement: CodeReplacement,
    },
    /// SF-DiVeQ ([`vq_core::diveq`]): the K codes are the vertices of a polyline and its K − 1
    /// segments are the tokens; training draws a dither per segment and quantizes to the
    /// nearest dithered point with DiVeQ's reparameterisation (both end codes learn);
    /// evaluation uses each segment's midpoint (`λ = ½`), so a token decodes to one vector.
    /// The first `warmup_forwards` training forwards pass the input through; at the next one the
    /// codebook is set from that batch (the means of K consecutive runs of its rows, as the
    /// official initialisation does with the latents of its last warm-up iterations).
    SfDiveq {
        /// σ, as for [`Family::Diveq`] (0: detached).
        noise_std: f32,
        /// Training forwards without quantization before the codebook is set from the data.
        warmup_forwards: u64,
    },
    /// IBQ ([`vq_core::ibq`]): the code of largest inner product, with a straight-through
    /// one-hot over `softmax(z Cᵀ)`, so every code gets a gradient; the losses are
    /// `mean((z_q − z)²) + mean((sg(q) − z)²)` (commitment) and `β·mean((q − sg(z))²)` plus
    /// SEED-Voken's entropy penalty on `softmax(z Cᵀ · inv_temperature)` (codebook). Euclidean
    /// codes learned by gradient; straight-through estimator only.
    Ibq {
        /// The entropy penalty (SEED-Voken: weight 0.05, diversity 1, temperature 0.01 —
        /// inverse temperature 100 — on the logits themselves, no factor 2).
        entropy: EntropyPenalty,
    },
    /// LFQ ([`vq_core::lfq`], MAGVIT-v2): `sign(z)` per dimension, K = 2^D implicit codes
    /// `{±1}^D` (the `codebook` variable holds them, frozen), the entropy penalty as the
    /// codebook loss and β on the commitment term; the estimator maps the input to its code (the
    /// rotation trick applies).
    Lfq {
        /// The entropy penalty.
        entropy: EntropyPenalty,
    },
    /// BSQ ([`vq_core::lfq`]): LFQ on the unit sphere, input l2-normalised, codes `{±1/√D}^D`.
    Bsq {
        /// The entropy penalty.
        entropy: EntropyPenalty,
    },
    /// Soft convex quantization ([`vq_core::scq`]): the input becomes a convex combination of
    /// the codes (ridge regression towards the nearest code, projected onto the simplex),
    /// differentiable in the input and every code; the token is the code of largest weight.
    /// Evaluation outputs the same soft value (decoding a token gives its code). Euclidean
    /// codes learned by gradient, no codebook loss, β on an optional commitment term;
    /// straight-through estimator only (there is no hard step to estimate).
    Scq {
        /// The ridge weight λ > 0.
        lambda: f32,
    },
}

/// DiVeQ's dead-code replacement (the official `_replace_unused_entries`): every `every`
/// training forwards, the codes chosen fewer than `min_usage · every` times in that window are
/// replaced by copies of used codes (drawn in proportion to their use, from
/// `StdRng::seed_from_u64(seed ^ REPLACEMENT_SALT + forwards)`; counts summed over the ranks).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct CodeReplacement {
    /// Window length in training forwards (≥ 1; official: 100).
    pub every: u64,
    /// Uses per forward under which a code is replaced (official: 0.01; 0 never replaces).
    pub min_usage: f32,
}

/// The entropy penalty of LFQ and BSQ ([`vq_core::lfq`]) and IBQ ([`vq_core::ibq`]):
/// `weight · (mean H(p) − diversity · H(mean p))` with `p` the softmax over the codes of
/// `2·inv_temperature·x·c` (LFQ / BSQ, lucidrains) or `inv_temperature·z·c` (IBQ, SEED-Voken).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct EntropyPenalty {
    /// The penalty's weight (lucidrains: 0.1; 0 turns it off).
    pub weight: f32,
    /// γ, the weight of the codebook entropy (1).
    pub diversity: f32,
    /// The inverse temperature τ (100).
    pub inv_temperature: f32,
}

impl EntropyPenalty {
    /// Weight and diversity finite and ≥ 0, inverse temperature finite and > 0.
    ///
    /// # Errors
    /// [`VqTchError::Config`] naming the family field.
    pub fn validate(&self) -> Result<()> {
        let finite = |v: f32| v.is_finite() && v >= 0.0;
        match finite(self.weight)
            && finite(self.diversity)
            && self.inv_temperature.is_finite()
            && self.inv_temperature > 0.0
        {
            true => Ok(()),
            false => Err(VqTchError::Config {
                field: "family",
                why: "the entropy penalty's weight and diversity must be finite and >= 0, its inverse temperature > 0",
            }),
        }
    }

    /// SEED-Voken's IBQ training (`imagenet_ibqgan_1024.yaml`): weight 0.05, γ = 1,
    /// temperature 0.01 (τ = 100).
    pub const IBQ: Self = Self {
        weight: 0.05,
        diversity: 1.0,
        inv_temperature: 100.0,
    };

    /// lucidrains' `LFQ` defaults: weight 0.1, γ = 1, τ = 100.
    pub const REFERENCE: Self = Self {
        weight: 0.1,
        diversity: 1.0,
        inv_temperature: 100.0,
    };
}

impl CodeReplacement {
    /// The official DiVeQ code's defaults: every 100 forwards, under 0.01 uses per forward.
    pub const REFERENCE: Self = Self {
        every: 100,
        min_usage: 0.01,
    };
}

/// Salt of DiVeQ's replacement draws ([`CodeReplacement`]).
pub const REPLACEMENT_SALT: u64 = 0x6469_7665_7172_6570;

/// Quantizer dropout of [`Family::Residual`] (SoundStream; lucidrains' `quantize_dropout`):
/// every training forward keeps only the first n stages, n drawn uniformly from
/// `min_stages..=stages` by `StdRng::seed_from_u64(seed ^ STAGE_DROPOUT_SALT + draw)` (the same
/// on every rank, and again after a resume); the dropped stages give index −1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
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
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
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
            Self::Diveq { noise_std: 0.0, .. } => "diveq-detach".into(),
            Self::Diveq { .. } => "diveq".into(),
            Self::SfDiveq { noise_std: 0.0, .. } => "sf-diveq-detach".into(),
            Self::SfDiveq { .. } => "sf-diveq".into(),
            Self::Ibq { .. } => "ibq".into(),
            Self::Lfq { .. } => "lfq".into(),
            Self::Bsq { .. } => "bsq".into(),
            Self::Scq { .. } => "scq".into(),
        }
    }

    /// The families that followed the rotation trick, by name, with their references'
    /// settings: `diveq`, `diveq-detach`, `sf-diveq`, `sf-diveq-detach` (σ = 1e-3 or 0;
    /// SF-DiVeQ's 1000 warm-up forwards), `ibq` ([`EntropyPenalty::IBQ`]), `lfq`, `bsq`
    /// ([`EntropyPenalty::REFERENCE`]), `scq` (λ = 1).
    pub fn successor(name: &str) -> Option<Self> {
        const SIGMA: f32 = 1e-3;
        Some(match name {
            "diveq" | "diveq-detach" => Self::Diveq {
                noise_std: if name == "diveq" { SIGMA } else { 0.0 },
                replacement: CodeReplacement::REFERENCE,
            },
            "sf-diveq" | "sf-diveq-detach" => Self::SfDiveq {
                noise_std: if name == "sf-diveq" { SIGMA } else { 0.0 },
                warmup_forwards: 1000,
            },
            "ibq" => Self::Ibq {
                entropy: EntropyPenalty::IBQ,
            },
            "lfq" => Self::Lfq {
                entropy: EntropyPenalty::REFERENCE,
            },
            "bsq" => Self::Bsq {
                entropy: EntropyPenalty::REFERENCE,
            },
            "scq" => Self::Scq { lambda: 1.0 },
            _ => return None,
        })
    }

    /// Whether the family makes its own gradient path, so that the layer's [`Estimator`] must
    /// be straight-through (DiVeQ, SF-DiVeQ, IBQ, SCQ). Gumbel ignores the estimator too; its
    /// configurations keep whatever they were written with.
    pub fn own_gradient_path(&self) -> bool {
        matches!(
            self,
            Self::Diveq { .. } | Self::SfDiveq { .. } | Self::Ibq { .. } | Self::Scq { .. }
        )
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
        if let Some(family) = Self::successor(name) {
            return Ok(family);
        }
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

    /// The number of distinct tokens: K, or K − 1 segments for SF-DiVeQ.
    pub fn tokens(&self) -> usize {
        match self.family {
            Family::SfDiveq { .. } => self.codebook_size - 1,
            _ => self.codebook_size,
        }
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
            Family::Lfq { entropy } | Family::Bsq { entropy } => {
                let k = self.codebook_size;
                if !k.is_power_of_two() || !(2..=1 << vq_core::lfq::MAX_BITS).contains(&k) {
                    return bad(
                        "codebook_size",
                        "LFQ / BSQ have 2^D implicit codes: a power of two from 2 to 65,536",
                    );
                }
                if self.codebook_dim != k.trailing_zeros() as usize {
                    return bad(
                        "codebook_dim",
                        "LFQ / BSQ codes have log2(codebook_size) bits",
                    );
                }
                if !gradient || self.metric != Metric::Euclidean {
                    return bad(
                        "learning",
                        "LFQ / BSQ have no codebook to learn: learning gradient (unused), metric euclidean",
                    );
                }
                entropy.validate()?;
            }
            Family::Diveq { .. }
            | Family::SfDiveq { .. }
            | Family::Ibq { .. }
            | Family::Scq { .. } => {
                self.validate_learned_successor()?;
            }
        }
        if self.family.own_gradient_path() && self.estimator != Estimator::StraightThrough {
            return bad(
                "estimator",
                "DiVeQ, SF-DiVeQ, IBQ and SCQ make their own gradient path: the rotation trick and the other estimators do not apply to them (use ste)",
            );
        }
        Ok(())
    }

    /// The rules of DiVeQ, SF-DiVeQ, IBQ and SCQ: codes of their own learned by gradient.
    fn validate_learned_successor(&self) -> Result<()> {
        let bad = |field: &'static str, why: &'static str| Err(VqTchError::Config { field, why });
        if !matches!(self.learning, CodebookLearning::Gradient { .. }) {
            return bad(
                "learning",
                "DiVeQ, SF-DiVeQ, IBQ and SCQ move the codes by their own gradient: an EMA codebook would get none (use learning gradient)",
            );
        }
        if self.metric != Metric::Euclidean {
            return bad(
                "metric",
                "DiVeQ, SF-DiVeQ, IBQ and SCQ take raw (euclidean) codes",
            );
        }
        match self.family {
            Family::Diveq {
                noise_std,
                replacement,
            } => {
                if !(noise_std.is_finite() && noise_std >= 0.0) {
                    return bad("family", "DiVeQ's noise_std must be finite and >= 0");
                }
                if replacement.every == 0
                    || !(replacement.min_usage.is_finite() && replacement.min_usage >= 0.0)
                {
                    return bad(
                        "family",
                        "DiVeQ's replacement window must be >= 1 forward and its min_usage finite and >= 0",
                    );
                }
            }
            Family::SfDiveq { noise_std, .. } => {
                if !(noise_std.is_finite() && noise_std >= 0.0) {
                    return bad("family", "SF-DiVeQ's noise_std must be finite and >= 0");
                }
                if self.codebook_size < 2 {
                    return bad(
                        "codebook_size",
                        "SF-DiVeQ needs at least 2 codes (one segment)",
                    );
                }
            }
            Family::Ibq { entropy } => entropy.validate()?,
            Family::Scq { lambda } if !(lambda.is_finite() && lambda > 0.0) => {
                return bad("family", "SCQ's ridge weight lambda must be finite and > 0");
            }
            _ => {}
        }
        Ok(())
    }

    /// This configuration with `family` and what the family fixes, validated:
    /// * FSQ: K = `Π L_i`, D = the number of levels with a `Linear` projection from the input's
    ///   channels when they differ (as lucidrains' `FSQ` projects), learning by gradient
    ///   (unused), Euclidean;
    /// * SimVQ: learning by gradient with β = 0.25 on the commitment term (lucidrains' `SimVQ`
    ///   weights: 1 on the term that trains the map, 0.25 on the one that moves the input);
    /// * LFQ / BSQ: D = log2 K (K must be a power of two) with a `Linear` projection from the
    ///   input's channels when they differ (lucidrains' `LFQ` projects), learning by gradient
    ///   (unused), Euclidean, β = 0 (lucidrains' commitment weight);
    /// * DiVeQ, SF-DiVeQ, SCQ: learning by gradient, Euclidean, β = 0 (no commitment term);
    ///   IBQ: the same with β = 0.25 and the codebook drawn N(0, 1) (SEED-Voken's);
    /// * the families with their own gradient path (DiVeQ, SF-DiVeQ, IBQ, SCQ): the
    ///   straight-through estimator (the field is unused);
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
                self.codebook_size = levels.codebook_size();
                self.fixed_codes(levels.as_slice().len());
            }
            Family::SimVq => {
                self.learning = CodebookLearning::Gradient {
                    placement: BetaPlacement::Commitment,
                };
                self.beta = 0.25;
            }
            Family::Lfq { .. } | Family::Bsq { .. } => {
                // A size that is not a power of two keeps its dimension and is refused below.
                let bits = match self.codebook_size.is_power_of_two() {
                    true => self.codebook_size.trailing_zeros() as usize,
                    false => self.codebook_dim,
                };
                self.fixed_codes(bits);
                self.beta = 0.0;
            }
            Family::Diveq { .. }
            | Family::SfDiveq { .. }
            | Family::Ibq { .. }
            | Family::Scq { .. } => {
                let ibq = matches!(family, Family::Ibq { .. });
                self.learning = CodebookLearning::Gradient {
                    placement: BetaPlacement::Commitment,
                };
                self.metric = Metric::Euclidean;
                self.beta = if ibq { 0.25 } else { 0.0 };
                if ibq {
                    // SEED-Voken's `nn.Embedding`, not re-initialised: inner products pick
                    // the code, so the codes' scale against the input's matters.
                    self.init = CodebookInit::Normal;
                }
            }
            _ => {}
        }
        if family.own_gradient_path() {
            self.estimator = Estimator::StraightThrough;
        }
        self.validate()?;
        Ok(self)
    }

    /// A family whose codes are fixed (FSQ, LFQ, BSQ): code dimension `dim` with a `Linear`
    /// projection from the input's channels when they differ, learning by gradient (unused),
    /// Euclidean.
    fn fixed_codes(&mut self, dim: usize) {
        let channels = self.input_channels();
        self.codebook_dim = dim;
        self.projection = match channels == dim {
            true => Projection::Identity,
            false => Projection::Linear { channels },
        };
        self.learning = CodebookLearning::Gradient {
            placement: BetaPlacement::Commitment,
        };
        self.metric = Metric::Euclidean;
    }

    /// The nearest-code layers a residual or multi-head quantizer is made of: (variable path,
    /// configuration); empty for the other families.
    pub(super) fn part_configs(&self) -> Vec<(String, Self)> {
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
