//! The configuration of a prior: what it models (a code grid of K codes, conditioned on a class or
//! not), its transformer's shape and block style, and the named presets of the references.

use serde::{Deserialize, Serialize};

use crate::error::{PriorError, Result};

/// How the prior orders its predictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriorKind {
    /// Causal, one code at a time in raster order (taming's `Net2NetTransformer`, LlamaGen).
    Autoregressive,
    /// Bidirectional over a partly masked grid, decoded in parallel over a few iterations
    /// (MaskGIT, Chang et al. 2022).
    Masked,
}

/// The transformer block's style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockStyle {
    /// LlamaGen (`autoregressive/models/gpt.py`): RMSNorm (ε = 1e-5), one bias-free `wqkv`
    /// projection, 2-D rotary positions on the code grid, SwiGLU feed-forward of width
    /// `find_multiple(⌊2·4d/3⌋, 256)`, bias-free output head initialised to zero.
    Llama,
    /// minGPT as taming-transformers ships it (`taming/modules/transformer/mingpt.py`):
    /// LayerNorm, separate `key`/`query`/`value` projections with bias, learned absolute
    /// positions (`pos_emb`, `block_size` rows, zero at start), GELU MLP of width 4d, bias-free
    /// head.
    MinGpt,
}

/// What the first position holds: the class of a class-conditional prior, or a start token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Conditioning {
    /// One start token of its own (LlamaGen's unconditional form, one learned row).
    Unconditional,
    /// taming's unconditional `SOSProvider`: the start token is code `code` of the code
    /// embedding (no table of its own).
    StartCode {
        /// The code used as start token (taming: 0).
        code: u32,
    },
    /// A class token (LlamaGen's `LabelEmbedder`): `classes` rows, plus one "no class" row when
    /// `dropout > 0` — in training each label is replaced by it with probability `dropout`, which
    /// classifier-free guidance needs.
    Classes {
        /// Number of classes.
        classes: usize,
        /// Probability of dropping a label in training (LlamaGen: 0.1).
        dropout: f64,
    },
}

impl Conditioning {
    /// Rows of the condition table (0 for [`Conditioning::StartCode`]).
    pub fn table_rows(&self) -> usize {
        match *self {
            Self::Unconditional => 1,
            Self::StartCode { .. } => 0,
            Self::Classes { classes, dropout } => classes + usize::from(dropout > 0.0),
        }
    }

    /// The number of class labels a caller passes (0 when unconditional).
    pub fn classes(&self) -> usize {
        match *self {
            Self::Classes { classes, .. } => classes,
            _ => 0,
        }
    }

    /// Whether classifier-free guidance is possible (a "no class" row exists).
    pub fn guidable(&self) -> bool {
        matches!(*self, Self::Classes { dropout, .. } if dropout > 0.0)
    }
}

/// Configuration of a prior over `(grid_h, grid_w)` grids of `codebook_size` codes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorConfig {
    /// Autoregressive or masked.
    pub kind: PriorKind,
    /// Block style.
    pub style: BlockStyle,
    /// Codes K of the tokenizer (the prior's vocabulary; a masked prior adds a mask token).
    pub codebook_size: usize,
    /// Code grid height.
    pub grid_h: usize,
    /// Code grid width.
    pub grid_w: usize,
    /// Width d.
    pub width: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads (d divisible by it; a multiple of 4 head dims for 2-D rotary positions).
    pub heads: usize,
    /// Rows of learned positions ([`BlockStyle::MinGpt`]; at least the sequence length); 0 for
    /// [`BlockStyle::Llama`].
    #[serde(default)]
    pub block_size: usize,
    /// The first position's token.
    pub conditioning: Conditioning,
    /// Dropout of tokens, residual branches and the feed-forward (LlamaGen: 0.1 each).
    #[serde(default)]
    pub dropout: f64,
    /// taming's `pkeep`: in training each input code is kept with this probability and otherwise
    /// replaced by a uniformly drawn code (the target stays the true code). 1 keeps every code.
    #[serde(default = "one")]
    pub pkeep: f64,
    /// Seed of the initial weights.
    #[serde(default)]
    pub seed: u64,
}

fn one() -> f64 {
    1.0
}

/// `n` rounded up to a multiple of `k` (LlamaGen's `find_multiple`).
pub fn find_multiple(n: usize, k: usize) -> usize {
    n.div_ceil(k) * k
}

impl PriorConfig {
    /// Codes per grid.
    pub fn tokens(&self) -> usize {
        self.grid_h * self.grid_w
    }

    /// The sequence the transformer reads: the condition token and the grid's codes but the
    /// last (autoregressive), or the condition token and the whole grid (masked).
    pub fn sequence(&self) -> usize {
        match self.kind {
            PriorKind::Autoregressive => self.tokens(),
            PriorKind::Masked => self.tokens() + 1,
        }
    }

    /// Rows of the code embedding: K, and the mask token of a masked prior.
    pub fn vocabulary(&self) -> usize {
        self.codebook_size + usize::from(self.kind == PriorKind::Masked)
    }

    /// The feed-forward width: SwiGLU's `find_multiple(⌊2·4d/3⌋, 256)` or 4d.
    pub fn hidden(&self) -> usize {
        match self.style {
            BlockStyle::Llama => find_multiple(2 * 4 * self.width / 3, 256),
            BlockStyle::MinGpt => 4 * self.width,
        }
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.width / self.heads.max(1)
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`PriorError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, why: String| Err(PriorError::Config { field, why });
        for (field, v) in [
            ("codebook_size", self.codebook_size),
            ("grid_h", self.grid_h),
            ("grid_w", self.grid_w),
            ("width", self.width),
            ("layers", self.layers),
            ("heads", self.heads),
        ] {
            if v == 0 {
                return bad(field, "must be > 0".into());
            }
        }
        if i32::try_from(self.vocabulary()).is_err() {
            return bad("codebook_size", "must fit in i32".into());
        }
        if !self.width.is_multiple_of(self.heads) {
            return bad("heads", format!("must divide width {}", self.width));
        }
        match self.style {
            BlockStyle::Llama if !self.head_dim().is_multiple_of(4) => {
                return bad(
                    "heads",
                    format!(
                        "2-D rotary positions need a head dimension divisible by 4, got {}",
                        self.head_dim()
                    ),
                );
            }
            BlockStyle::MinGpt if self.block_size < self.sequence() => {
                return bad(
                    "block_size",
                    format!(
                        "learned positions need at least the sequence length {}",
                        self.sequence()
                    ),
                );
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} is not in [0, 1)", self.dropout));
        }
        if !(self.pkeep > 0.0 && self.pkeep <= 1.0) {
            return bad("pkeep", format!("{} is not in (0, 1]", self.pkeep));
        }
        match self.conditioning {
            Conditioning::Classes { classes, dropout } => {
                if classes == 0 {
                    return bad(
                        "conditioning",
                        "a class-conditional prior needs classes".into(),
                    );
                }
                if !(0.0..1.0).contains(&dropout) {
                    return bad(
                        "conditioning",
                        format!("class dropout {dropout} is not in [0, 1)"),
                    );
                }
            }
            Conditioning::StartCode { code } if code as usize >= self.codebook_size => {
                return bad(
                    "conditioning",
                    format!(
                        "start code {code} is not one of the {} codes",
                        self.codebook_size
                    ),
                );
            }
            _ => {}
        }
        if self.kind == PriorKind::Masked && self.pkeep < 1.0 {
            return bad(
                "pkeep",
                "input corruption is the autoregressive prior's".into(),
            );
        }
        Ok(())
    }

    /// The named preset `name` ([`PRESETS`]) for a tokenizer of `codebook_size` codes on a
    /// `(grid_h, grid_w)` grid; `classes` > 0 makes it class-conditional (with LlamaGen's 10%
    /// label dropout for guidance).
    ///
    /// ```
    /// use vq_prior::PriorConfig;
    /// let gpt_b = PriorConfig::preset("llamagen-gpt-b", 16384, 16, 16, 1000).unwrap();
    /// assert_eq!((gpt_b.layers, gpt_b.width, gpt_b.heads), (12, 768, 12));
    /// assert!(PriorConfig::preset("gpt-z", 1024, 16, 16, 0).is_err());
    /// ```
    ///
    /// # Errors
    /// [`PriorError::UnknownPreset`]; [`PriorError::Config`] if the result is invalid.
    pub fn preset(
        name: &str,
        codebook_size: usize,
        grid_h: usize,
        grid_w: usize,
        classes: usize,
    ) -> Result<Self> {
        let conditioning = match classes {
            0 => Conditioning::Unconditional,
            classes => Conditioning::Classes {
                classes,
                dropout: 0.1,
            },
        };
        let base = Self {
            kind: PriorKind::Autoregressive,
            style: BlockStyle::Llama,
            codebook_size,
            grid_h,
            grid_w,
            width: 768,
            layers: 12,
            heads: 12,
            block_size: 0,
            conditioning,
            dropout: 0.1,
            pkeep: 1.0,
            seed: 0,
        };
        let config = match name {
            // LlamaGen's GPT-B (111M with K = 16384 on 16×16 and 1000 classes).
            "llamagen-gpt-b" => base,
            // LlamaGen's GPT-L (343M).
            "llamagen-gpt-l" => Self {
                width: 1024,
                layers: 24,
                heads: 16,
                ..base
            },
            // taming-transformers' shipped transformer shape for 16×16 grids
            // (configs/faceshq_transformer.yaml, drin_transformer.yaml): minGPT, 24 layers,
            // 16 heads, width 1024, block_size 512, unconditional with code 0 as start token.
            "taming-16x16" => Self {
                style: BlockStyle::MinGpt,
                width: 1024,
                layers: 24,
                heads: 16,
                block_size: 512,
                conditioning: match classes {
                    0 => Conditioning::StartCode { code: 0 },
                    _ => conditioning,
                },
                dropout: 0.0,
                ..base
            },
            // A small prior for the demo tokenizers' 8×8 grids (minutes on two CPU cores).
            "demo" => Self {
                width: 128,
                layers: 4,
                heads: 4,
                dropout: 0.0,
                ..base
            },
            // The demo shape as a MaskGIT prior.
            "demo-maskgit" => Self {
                kind: PriorKind::Masked,
                width: 128,
                layers: 4,
                heads: 4,
                dropout: 0.0,
                ..base
            },
            _ => {
                return Err(PriorError::UnknownPreset {
                    name: name.into(),
                    known: PRESETS.join(", "),
                });
            }
        };
        config.validate()?;
        Ok(config)
    }
}

/// The named presets of [`PriorConfig::preset`].
pub const PRESETS: [&str; 5] = [
    "demo",
    "demo-maskgit",
    "llamagen-gpt-b",
    "llamagen-gpt-l",
    "taming-16x16",
];
