//! [`Prior`]: the transformer over a code grid, autoregressive or masked, with its condition
//! token, training loss and held-out likelihood.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::nn::{self, Init};
use tch::{Device, Kind, Reduction, Tensor};

use crate::config::{BlockStyle, Conditioning, PriorConfig, PriorKind};
use crate::error::{PriorError, Result};
use crate::transformer::{Block, INIT, LayerCache, Norm, Pass, linear_no_bias, rope_2d};

/// The key/value caches of every block, for sampling one position at a time.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Positions written.
    len: i64,
}

impl KvCache {
    /// Positions written so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A prior over `(grid_h, grid_w)` grids of codes.
///
/// The transformer reads the condition token (class, or start) followed by codes in raster
/// order. Autoregressive: position `i` predicts code `i` from the condition and codes `< i`
/// (taming's `Net2NetTransformer`, LlamaGen's `Transformer`). Masked: every position reads the
/// whole grid, some of it replaced by the mask token K, and predicts the codes there (MaskGIT).
///
/// Weights start as the references start them (normal(0, 0.02) for linear and embedding layers,
/// zero biases, unit norms; LlamaGen's head zero, minGPT's positions zero), drawn on the host
/// from the configuration's seed.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use vq_prior::{Prior, PriorConfig};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let cfg = PriorConfig::preset("demo", 64, 4, 4, 10).unwrap();
/// let prior = Prior::new(&vs.root(), cfg).unwrap();
/// let codes = Tensor::randint(64, [2, 4, 4], (Kind::Int64, Device::Cpu));
/// let labels = Tensor::from_slice(&[3i64, 7]);
/// let logits = prior.logits(&codes, Some(&labels), false).unwrap();
/// assert_eq!(logits.size(), [2, 16, 64]);
/// ```
#[derive(Debug)]
pub struct Prior {
    config: PriorConfig,
    codes: nn::Embedding,
    condition: Option<nn::Embedding>,
    positions: Option<Tensor>,
    rope: Option<Tensor>,
    blocks: Vec<Block>,
    norm: Norm,
    head: nn::Linear,
}

impl Prior {
    /// A prior whose variables live under `path`, named as the reference names them
    /// (LlamaGen: `tok_embeddings`, `cls_embedding.embedding_table`, `layers.{i}`, `norm`,
    /// `output`; minGPT: `tok_emb`, `pos_emb`, `blocks.{i}`, `ln_f`, `head`).
    ///
    /// # Errors
    /// [`PriorError::Config`] for an invalid configuration.
    pub fn new(path: &nn::Path, config: PriorConfig) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (d, v) = (c.width as i64, c.vocabulary() as i64);
        let emb = nn::EmbeddingConfig {
            ws_init: INIT,
            ..Default::default()
        };
        let llama = c.style == BlockStyle::Llama;
        let (codes_name, blocks_name, norm_name, head_name) = match llama {
            true => ("tok_embeddings", "layers", "norm", "output"),
            false => ("tok_emb", "blocks", "ln_f", "head"),
        };
        let condition = match c.conditioning.table_rows() {
            0 => None,
            rows => {
                let p = path / "cls_embedding" / "embedding_table";
                Some(nn::embedding(p, rows as i64, d, emb))
            }
        };
        let codes = nn::embedding(path / codes_name, v, d, emb);
        let positions =
            (!llama).then(|| path.var("pos_emb", &[1, c.block_size as i64, d], Init::Const(0.0)));
        let blocks = (0..c.layers)
            .map(|i| Block::new(&(path / blocks_name / i), c))
            .collect();
        let norm = Norm::new(path / norm_name, c.style, c.width);
        let head = linear_no_bias(path / head_name, c.width, c.codebook_size);
        let rope = llama.then(|| {
            rope_2d(c.grid_h, c.grid_w, c.head_dim(), 1, 10_000.0).to_device(path.device())
        });
        let prior = Self {
            config,
            codes,
            condition,
            positions,
            rope,
            blocks,
            norm,
            head,
        };
        prior.draw_weights();
        Ok(prior)
    }

    /// Draws the linear and embedding weights normal(0, 0.02) from
    /// `StdRng::seed_from_u64(seed)` on the host, in a fixed order (LlamaGen's output head stays
    /// zero, as LlamaGen zeroes it).
    fn draw_weights(&self) {
        let mut rng = StdRng::seed_from_u64(self.config.seed);
        let mut weights = vec![&self.codes.ws];
        weights.extend(self.condition.as_ref().map(|c| &c.ws));
        for block in &self.blocks {
            weights.extend(block.normal_weights());
        }
        if self.config.style == BlockStyle::MinGpt {
            weights.push(&self.head.ws);
        }
        let normal = rand_distr::Normal::new(0.0f32, 0.02).expect("a valid deviation");
        for w in weights {
            let values: Vec<f32> = (0..w.numel()).map(|_| rng.sample(normal)).collect();
            let drawn = Tensor::from_slice(&values)
                .view(w.size().as_slice())
                .to_device(w.device());
            tch::no_grad(|| w.shallow_clone().copy_(&drawn));
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PriorConfig {
        &self.config
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.codes.ws.device()
    }

    /// Checks `codes` (B, h, w) or (B, h·w) and `labels` (B) against the configuration; the codes
    /// flattened to (B, h·w) i64 on the prior's device.
    ///
    /// # Errors
    /// [`PriorError::Input`] for another shape, [`PriorError::Index`] for a code or label out
    /// of range, a label missing or given where the prior has no classes.
    pub fn check_input(&self, codes: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let c = &self.config;
        let l = c.tokens() as i64;
        let size = codes.size();
        let fits = match size.as_slice() {
            [_, h, w] => (*h, *w) == (c.grid_h as i64, c.grid_w as i64),
            [_, n] => *n == l,
            _ => false,
        };
        if !fits {
            return Err(PriorError::Input {
                what: "codes",
                expected: format!("(B, {}, {}) or (B, {l})", c.grid_h, c.grid_w),
                got: size,
            });
        }
        let flat = codes
            .reshape([size[0], l])
            .to_kind(Kind::Int64)
            .to_device(self.device());
        check_range(&flat, "code", c.codebook_size as i64)?;
        match (c.conditioning, labels) {
            (Conditioning::Classes { classes, .. }, Some(y)) => {
                if y.size() != [size[0]] {
                    return Err(PriorError::Input {
                        what: "labels",
                        expected: format!("({})", size[0]),
                        got: y.size(),
                    });
                }
                check_range(y, "class", classes as i64)?;
            }
            (Conditioning::Classes { .. }, None) => {
                return Err(PriorError::Input {
                    what: "labels",
                    expected: "class labels for a class-conditional prior".into(),
                    got: vec![],
                });
            }
            (_, Some(y)) => {
                return Err(PriorError::Input {
                    what: "labels",
                    expected: "none: the prior is unconditional".into(),
                    got: y.size(),
                });
            }
            (_, None) => {}
        }
        Ok(flat)
    }

    /// The condition token's embedding (B, 1, d) for `labels` (class indices; the "no class"
    /// row is index `classes`), or the start token.
    pub(crate) fn condition(&self, labels: Option<&Tensor>, batch: i64) -> Tensor {
        let dev = self.device();
        match (self.config.conditioning, &self.condition) {
            (Conditioning::StartCode { code }, _) => self
                .codes
                .ws
                .get(i64::from(code))
                .view([1, 1, -1])
                .expand([batch, 1, -1], false),
            (_, Some(table)) => {
                let idx = match labels {
                    Some(y) => y.to_kind(Kind::Int64).to_device(dev),
                    None => Tensor::zeros([batch], (Kind::Int64, dev)),
                };
                table.ws.index_select(0, &idx).unsqueeze(1)
            }
            (_, None) => unreachable!("every conditioning but a start code has a table"),
        }
    }

    /// The "no class" index that classifier-free guidance conditions on (`classes`).
    pub fn null_class(&self) -> Option<i64> {
        self.config
            .conditioning
            .guidable()
            .then_some(self.config.conditioning.classes() as i64)
    }

    /// The transformer on embedded tokens `x` (B, S, d) at positions `start..start+S`.
    pub(crate) fn run(
        &self,
        x: Tensor,
        start: i64,
        train: bool,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let s = x.size()[1];
        let dropout = if train { self.config.dropout } else { 0.0 };
        let mut h = match &self.positions {
            Some(p) => x + p.narrow(1, start, s),
            None => x,
        };
        h = h.dropout(dropout, train);
        let rope = self.rope.as_ref().map(|r| r.narrow(0, start, s));
        let pass = Pass {
            rope: rope.as_ref(),
            causal: self.config.kind == PriorKind::Autoregressive,
            dropout,
            train,
        };
        match cache {
            None => {
                for block in &self.blocks {
                    h = block.forward(&h, pass, None);
                }
            }
            Some(cache) => {
                for (block, layer) in self.blocks.iter().zip(&mut cache.layers) {
                    h = block.forward(&h, pass, Some((layer, start)));
                }
                cache.len = start + s;
            }
        }
        self.norm.forward(&h).apply(&self.head).to_kind(Kind::Float)
    }

    /// An empty key/value cache for `batch` sequences.
    pub fn cache(&self, batch: i64) -> KvCache {
        let like = &self.codes.ws;
        let len = self.config.sequence() as i64;
        KvCache {
            layers: self
                .blocks
                .iter()
                .map(|b| b.cache(batch, len, like))
                .collect(),
            len: 0,
        }
    }

    /// The code embeddings of `tokens` (B, S).
    pub(crate) fn embed(&self, tokens: &Tensor) -> Tensor {
        tokens.apply(&self.codes)
    }

    /// Autoregressive logits (B, h·w, K), f32: row `i` is the distribution of code `i` given the
    /// condition and codes `< i` (teacher forcing). In `train`, dropout is active.
    ///
    /// # Errors
    /// As [`check_input`](Self::check_input); [`PriorError::Config`] for a masked prior.
    pub fn logits(&self, codes: &Tensor, labels: Option<&Tensor>, train: bool) -> Result<Tensor> {
        if self.config.kind != PriorKind::Autoregressive {
            return Err(PriorError::Config {
                field: "kind",
                why: "teacher-forced logits are the autoregressive prior's".into(),
            });
        }
        let flat = self.check_input(codes, labels)?;
        Ok(self.teacher_forced(&flat, labels, train))
    }

    /// Autoregressive logits given `inputs` (B, L) (which may be corrupted copies of the
    /// targets) and labels (already dropped where training drops them).
    pub(crate) fn teacher_forced(
        &self,
        inputs: &Tensor,
        labels: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let (b, l) = (inputs.size()[0], inputs.size()[1]);
        let cond = self.condition(labels, b);
        let x = Tensor::cat(&[cond, self.embed(&inputs.narrow(1, 0, l - 1))], 1);
        self.run(x, 0, train, None)
    }

    /// Mean negative log-likelihood of `codes` in nats per code (no dropout, no corruption, the
    /// true labels): the autoregressive prior's exact `−log p(codes | label) / (h·w)`. (A masked
    /// prior defines no likelihood of a grid, so it has none.)
    ///
    /// # Errors
    /// As [`logits`](Self::logits).
    pub fn nll(&self, codes: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let flat = self.check_input(codes, labels)?;
        let logits = tch::no_grad(|| self.logits(&flat, labels, false))?;
        Ok(cross_entropy(&logits, &flat))
    }
}

/// Mean cross-entropy (nats) of logits (B, L, K) against targets (B, L).
pub(crate) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let k = logits.size()[2];
    logits.view([-1, k]).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]),
        None,
        Reduction::Mean,
        -100,
        0.0,
    )
}

/// [`PriorError::Index`] for an entry of `t` outside `0..count`.
fn check_range(t: &Tensor, what: &'static str, count: i64) -> Result<()> {
    if t.numel() == 0 {
        return Ok(());
    }
    let t = t.to_kind(Kind::Int64);
    let (lo, hi) = (i64::try_from(t.min())?, i64::try_from(t.max())?);
    match [lo, hi].into_iter().find(|v| !(0..count).contains(v)) {
        Some(index) => Err(PriorError::Index { what, index, count }),
        None => Ok(()),
    }
}
