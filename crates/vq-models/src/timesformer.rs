//! TimeSformer (Bertasius et al. 2021) with divided space-time attention, as Hugging Face
//! `transformers` implements it (`TimesformerModel`), used as encoder and as decoder of the
//! paper's video tokenizers (Table 5 / Table 11: 8 layers, hidden 256, 4 heads, MLP 768).
//!
//! Each layer: temporal attention over the frames of every patch position (pre-LayerNorm, then
//! `temporal_dense`), spatial attention over the patches of every frame together with the CLS
//! token (pre-LayerNorm; the CLS outputs are averaged over frames), a GELU MLP; all residual.
//! Tokens are ordered patch-major, frame-minor (`n · T + t`), as in `transformers`.
//!
//! The paper does not say how its decoder turns tokens back into pixels. Here the decoder is a
//! second TimeSformer whose input tokens are the quantized latents (plus its own CLS token,
//! position and time embeddings), followed by a final LayerNorm and, per frame, a transposed
//! convolution `hidden → channels` with kernel and stride = patch size — the same head as the
//! ViT-VQGAN decoder the paper's video models borrow their quantizer from.
//! Variable names follow `transformers` (`embeddings.patch_embeddings.projection.*`,
//! `encoder.layer.{i}.temporal_attention.attention.qkv.*`, `layernorm.*`, ...).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result, require_patch_grid, require_positive};

/// Shape of a TimeSformer encoder / decoder pair.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeSformerConfig {
    /// Frames per clip.
    pub frames: usize,
    /// Frame side length.
    pub image_size: usize,
    /// Patch side length.
    pub patch_size: usize,
    /// Image channels.
    pub channels: usize,
    /// Token width.
    pub hidden: usize,
    /// Layers (each of encoder and decoder).
    pub layers: usize,
    /// Attention heads (`hidden` must be divisible).
    pub heads: usize,
    /// MLP width.
    pub intermediate: usize,
    /// LayerNorm ε (`transformers`: 1e-6).
    pub layer_norm_eps: f64,
}

impl TimeSformerConfig {
    /// Patches per frame side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Checks the shape once.
    ///
    /// # Errors
    /// [`ModelError::Config`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, why: String| Err(ModelError::Config { field, why });
        require_positive(&[
            ("frames", self.frames),
            ("patch_size", self.patch_size),
            ("channels", self.channels),
            ("layers", self.layers),
            ("heads", self.heads),
            ("intermediate", self.intermediate),
        ])?;
        require_patch_grid(self.image_size, self.patch_size)?;
        if self.hidden == 0 || !self.hidden.is_multiple_of(self.heads) {
            return bad(
                "hidden",
                format!(
                    "{} must be a positive multiple of heads {}",
                    self.hidden, self.heads
                ),
            );
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return bad("layer_norm_eps", "must be finite and > 0".into());
        }
        Ok(())
    }
}

fn linear(p: nn::Path, din: usize, dout: usize) -> nn::Linear {
    nn::linear(
        p,
        din as i64,
        dout as i64,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

fn layer_norm(p: nn::Path, c: &TimeSformerConfig) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![c.hidden as i64],
        nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        },
    )
}

/// `transformers`' `TimesformerAttention`: fused qkv (with bias), softmax attention, output
/// projection.
#[derive(Debug)]
struct Attention {
    qkv: nn::Linear,
    out: nn::Linear,
    heads: i64,
}

impl Attention {
    fn new(p: &nn::Path, c: &TimeSformerConfig) -> Self {
        Self {
            qkv: linear(p / "attention" / "qkv", c.hidden, 3 * c.hidden),
            out: linear(p / "output" / "dense", c.hidden, c.hidden),
            heads: c.heads as i64,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (b, n, d) = (s[0], s[1], s[2]);
        let qkv = x
            .apply(&self.qkv)
            .reshape([b, n, 3, self.heads, d / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let scale = ((d / self.heads) as f64).powf(-0.5);
        (q.matmul(&k.transpose(-2, -1)) * scale)
            .softmax(-1, Kind::Float)
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b, n, d])
            .apply(&self.out)
    }
}

/// One divided space-time layer.
#[derive(Debug)]
struct Layer {
    temporal_norm: nn::LayerNorm,
    temporal_attention: Attention,
    temporal_dense: nn::Linear,
    norm_before: nn::LayerNorm,
    attention: Attention,
    norm_after: nn::LayerNorm,
    intermediate: nn::Linear,
    output: nn::Linear,
}

impl Layer {
    fn new(p: &nn::Path, c: &TimeSformerConfig) -> Self {
        Self {
            temporal_norm: layer_norm(p / "temporal_layernorm", c),
            temporal_attention: Attention::new(&(p / "temporal_attention"), c),
            temporal_dense: linear(p / "temporal_dense", c.hidden, c.hidden),
            norm_before: layer_norm(p / "layernorm_before", c),
            attention: Attention::new(&(p / "attention"), c),
            norm_after: layer_norm(p / "layernorm_after", c),
            intermediate: linear(p / "intermediate" / "dense", c.hidden, c.intermediate),
            output: linear(p / "output" / "dense", c.intermediate, c.hidden),
        }
    }

    /// `h`: (B, 1 + N·T, D), CLS first, then patch-major / frame-minor tokens.
    fn forward(&self, h: &Tensor, n: i64, t: i64) -> Tensor {
        let s = h.size();
        let (b, d) = (s[0], s[2]);
        let cls = h.narrow(1, 0, 1);
        let tokens = h.narrow(1, 1, n * t);
        // Temporal attention: the T frames of each patch position.
        let xt = tokens.reshape([b * n, t, d]);
        let res_t = self
            .temporal_attention
            .forward(&xt.apply(&self.temporal_norm))
            .reshape([b, n * t, d])
            .apply(&self.temporal_dense);
        let xt = &tokens + res_t;
        // Spatial attention: the N patches of each frame, with the CLS token.
        let xs = xt
            .reshape([b, n, t, d])
            .permute([0, 2, 1, 3])
            .reshape([b * t, n, d]);
        let cls_rep = cls.repeat([1, t, 1]).reshape([b * t, 1, d]);
        let res = self
            .attention
            .forward(&Tensor::cat(&[cls_rep, xs], 1).apply(&self.norm_before));
        let res_cls = res
            .select(1, 0)
            .reshape([b, t, d])
            .mean_dim(1, true, Kind::Float);
        let res_s = res
            .narrow(1, 1, n)
            .reshape([b, t, n, d])
            .permute([0, 2, 1, 3])
            .reshape([b, n * t, d]);
        let h = Tensor::cat(&[cls, xt], 1) + Tensor::cat(&[res_cls, res_s], 1);
        let m = h
            .apply(&self.norm_after)
            .apply(&self.intermediate)
            .gelu("none")
            .apply(&self.output);
        h + m
    }
}

/// CLS token, position and time embeddings, layers and final LayerNorm: the part shared by
/// encoder and decoder.
#[derive(Debug)]
struct Trunk {
    cls: Tensor,
    pos: Tensor,
    time: Tensor,
    layers: Vec<Layer>,
    norm: nn::LayerNorm,
    n: i64,
    t: i64,
}

impl Trunk {
    fn new(p: &nn::Path, c: &TimeSformerConfig) -> Self {
        let e = p / "embeddings";
        let d = c.hidden as i64;
        let n = (c.grid() * c.grid()) as i64;
        let small = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Self {
            cls: e.var("cls_token", &[1, 1, d], small),
            pos: e.var("position_embeddings", &[1, n + 1, d], small),
            time: e.var(
                "time_embeddings",
                &[1, c.frames as i64, d],
                nn::Init::Const(0.0),
            ),
            layers: (0..c.layers)
                .map(|i| Layer::new(&(p / "encoder" / "layer" / i), c))
                .collect(),
            norm: layer_norm(p / "layernorm", c),
            n,
            t: c.frames as i64,
        }
    }

    /// `x`: per-frame patch tokens (B·T, N, D) → all tokens without CLS (B, N·T, D).
    fn forward(&self, x: &Tensor, b: i64) -> Tensor {
        let d = x.size()[2];
        let (n, t) = (self.n, self.t);
        // Position embeddings per frame (the CLS slot's goes to the CLS token).
        let x = x + self.pos.narrow(1, 1, n);
        let cls = &self.cls + self.pos.narrow(1, 0, 1);
        let x = x.reshape([b, t, n, d]).permute([0, 2, 1, 3]) + self.time.unsqueeze(1);
        let mut h = Tensor::cat(&[cls.expand([b, 1, d], false), x.reshape([b, n * t, d])], 1);
        for layer in &self.layers {
            h = layer.forward(&h, n, t);
        }
        h.apply(&self.norm).narrow(1, 1, n * t)
    }
}

/// TimeSformer encoder: video `(B, C, T, S, S)` → latent map `(B, hidden, T, S/p, S/p)`.
#[derive(Debug)]
pub struct TimeSformerEncoder {
    patch: nn::Conv2D,
    trunk: Trunk,
    config: TimeSformerConfig,
}

impl TimeSformerEncoder {
    /// Builds the variables under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, c: &TimeSformerConfig) -> Result<Self> {
        c.validate()?;
        let k = c.patch_size as i64;
        Ok(Self {
            patch: nn::conv2d(
                p / "embeddings" / "patch_embeddings" / "projection",
                c.channels as i64,
                c.hidden as i64,
                k,
                nn::ConvConfig {
                    stride: k,
                    // transformers' `_init_weights` treats the patch projection as a Linear.
                    ws_init: nn::Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                    bs_init: nn::Init::Const(0.0),
                    ..Default::default()
                },
            ),
            trunk: Trunk::new(p, c),
            config: c.clone(),
        })
    }
}

impl Module for TimeSformerEncoder {
    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (b, c, t, h, w) = (s[0], s[1], s[2], s[3], s[4]);
        let g = self.config.grid() as i64;
        let d = self.config.hidden as i64;
        let frames = x.permute([0, 2, 1, 3, 4]).reshape([b * t, c, h, w]);
        let tokens = frames.apply(&self.patch).flatten(2, 3).transpose(1, 2);
        self.trunk
            .forward(&tokens, b)
            .reshape([b, g, g, t, d])
            .permute([0, 4, 3, 1, 2])
    }
}

/// TimeSformer decoder: latent map `(B, hidden, T, S/p, S/p)` → video `(B, C, T, S, S)`.
#[derive(Debug)]
pub struct TimeSformerDecoder {
    trunk: Trunk,
    to_pixel: nn::ConvTranspose2D,
    config: TimeSformerConfig,
}

impl TimeSformerDecoder {
    /// Builds the variables under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, c: &TimeSformerConfig) -> Result<Self> {
        c.validate()?;
        let k = c.patch_size as i64;
        Ok(Self {
            trunk: Trunk::new(p, c),
            to_pixel: nn::conv_transpose2d(
                p / "to_pixel" / "conv_out",
                c.hidden as i64,
                c.channels as i64,
                k,
                // Not a transformers module: PyTorch's ConvTranspose2d default.
                vq_tch::init::torch_conv_transpose(c.channels, c.patch_size, k),
            ),
            config: c.clone(),
        })
    }

    /// The weight of the last layer (for VQGAN's adaptive weight).
    pub fn last_layer_weight(&self) -> &Tensor {
        &self.to_pixel.ws
    }
}

impl Module for TimeSformerDecoder {
    fn forward(&self, z: &Tensor) -> Tensor {
        let s = z.size();
        let (b, d, t, g) = (s[0], s[1], s[2], s[3]);
        let n = g * s[4];
        // (B, D, T, h, w) → per-frame tokens (B·T, N, D).
        let tokens = z.permute([0, 2, 3, 4, 1]).reshape([b * t, n, d]);
        let out = self.trunk.forward(&tokens, b); // (B, N·T, D), patch-major
        let c = self.config.channels as i64;
        let frames = out
            .reshape([b, g, s[4], t, d])
            .permute([0, 3, 4, 1, 2])
            .reshape([b * t, d, g, s[4]])
            .apply(&self.to_pixel);
        let (h, w) = (frames.size()[2], frames.size()[3]);
        frames.reshape([b, t, c, h, w]).permute([0, 2, 1, 3, 4])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny() -> TimeSformerConfig {
        TimeSformerConfig {
            frames: 3,
            image_size: 8,
            patch_size: 2,
            channels: 3,
            hidden: 16,
            layers: 2,
            heads: 4,
            intermediate: 24,
            layer_norm_eps: 1e-6,
        }
    }

    #[test]
    fn shapes_and_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let c = tiny();
        let enc = TimeSformerEncoder::new(&(vs.root() / "encoder"), &c).unwrap();
        let dec = TimeSformerDecoder::new(&(vs.root() / "decoder"), &c).unwrap();
        let x = Tensor::randn([2, 3, 3, 8, 8], (Kind::Float, Device::Cpu));
        let z = enc.forward(&x);
        assert_eq!(z.size(), [2, 16, 3, 4, 4]);
        assert_eq!(dec.forward(&z).size(), [2, 3, 3, 8, 8]);
        let v = vs.variables();
        for n in [
            "encoder.embeddings.patch_embeddings.projection.weight",
            "encoder.embeddings.time_embeddings",
            "encoder.encoder.layer.1.temporal_attention.attention.qkv.bias",
            "encoder.encoder.layer.1.temporal_dense.weight",
            "encoder.encoder.layer.0.attention.output.dense.weight",
            "encoder.layernorm.weight",
            "decoder.to_pixel.conv_out.weight",
        ] {
            assert!(v.contains_key(n), "{n}");
        }
    }

    /// Temporal attention mixes frames: changing the last frame changes the first frame's
    /// latents (a per-frame model would not).
    #[test]
    fn frames_interact() {
        let vs = nn::VarStore::new(Device::Cpu);
        let enc = TimeSformerEncoder::new(&vs.root(), &tiny()).unwrap();
        let x = Tensor::randn([1, 3, 3, 8, 8], (Kind::Float, Device::Cpu));
        let y = x.copy();
        let _ = y.narrow(2, 2, 1).fill_(0.5);
        let (a, b) = (enc.forward(&x), enc.forward(&y));
        let d0 = f64::try_from((a.narrow(2, 0, 1) - b.narrow(2, 0, 1)).abs().max()).unwrap();
        assert!(d0 > 1e-6, "{d0}");
    }

    /// transformers' `_init_weights`: Linear and the patch projection N(0, 0.02) with zero
    /// biases, the class token and position embeddings N(0, 0.02), time embeddings zero.
    #[test]
    fn layers_start_as_transformers_init_weights() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let c = TimeSformerConfig {
            hidden: 64,
            intermediate: 128,
            ..tiny()
        };
        TimeSformerEncoder::new(&(vs.root() / "encoder"), &c).unwrap();
        let vars = vs.variables();
        let stat = |n: &str| {
            let t = vars[n].to_kind(Kind::Double);
            (
                f64::try_from(t.abs().max()).unwrap(),
                f64::try_from(t.std(true)).unwrap(),
            )
        };
        for n in [
            "encoder.embeddings.patch_embeddings.projection.weight",
            "encoder.encoder.layer.0.attention.attention.qkv.weight",
            "encoder.encoder.layer.0.intermediate.dense.weight",
        ] {
            let (_, std) = stat(n);
            assert!((std / 0.02 - 1.0).abs() < 0.15, "{n}: std {std}");
        }
        for n in [
            "encoder.embeddings.patch_embeddings.projection.bias",
            "encoder.embeddings.time_embeddings",
            "encoder.encoder.layer.0.intermediate.dense.bias",
        ] {
            assert_eq!(stat(n).0, 0.0, "{n}");
        }
    }
}
