//! The ViT encoder and decoder of ViT-VQGAN as enhancing-transformers builds them (the code the
//! paper's Table 4 ran): a strided-convolution patch embedding plus fixed 2-D sine-cosine
//! position embeddings, pre-norm transformer blocks (multi-head attention without qkv bias, a
//! Tanh MLP), a final LayerNorm; the decoder mirrors it and ends in a transposed convolution
//! back to pixels. Variable names follow that code's state dict (`to_patch_embedding.0.*`,
//! `transformer.layers.{i}.0.fn.to_qkv.weight`, `to_pixel.conv_out.*`, ...), and so does the
//! initialisation: the version with these names (a top-level `norm`, `to_pixel.conv_out`) has
//! no init function, so every layer starts as PyTorch's `nn.Linear` / `nn.Conv2d` /
//! `nn.ConvTranspose2d` / `nn.LayerNorm` defaults ([`vq_tch::init`]). (Later versions of that
//! repository renamed `to_pixel.conv_out` to `to_pixel.1`, moved the final norm into the
//! transformer and added a xavier-uniform `init_weights`.)

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result, require_patch_grid, require_positive};

/// Shape of a ViT encoder / decoder pair.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Input side length.
    pub image_size: usize,
    /// Patch side length (the latent grid is `image_size / patch_size` per side).
    pub patch_size: usize,
    /// Image channels.
    pub channels: usize,
    /// Token width.
    pub dim: usize,
    /// Transformer blocks (each of encoder and decoder).
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of one head (enhancing-transformers: 64; `heads · dim_head` need not equal `dim`).
    /// The attention's output projection is always present (enhancing-transformers replaces it
    /// by the identity when `heads = 1` and `dim_head = dim`, a case no preset uses).
    pub dim_head: usize,
    /// Hidden width of the MLP.
    pub mlp_dim: usize,
}

impl VitConfig {
    /// Tokens per side.
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
            ("patch_size", self.patch_size),
            ("channels", self.channels),
            ("depth", self.depth),
            ("heads", self.heads),
            ("dim_head", self.dim_head),
            ("mlp_dim", self.mlp_dim),
        ])?;
        require_patch_grid(self.image_size, self.patch_size)?;
        if self.dim == 0 || !self.dim.is_multiple_of(4) {
            return bad(
                "dim",
                format!(
                    "{} must be a positive multiple of 4 (2-D sine-cosine embeddings)",
                    self.dim
                ),
            );
        }
        Ok(())
    }
}

/// The fixed 2-D sine-cosine position embedding `(grid², dim)`, tokens in row-major order: the
/// first half of the channels encodes the column x, the second half the row y (MAE's
/// `get_2d_sincos_pos_embed`, whose `meshgrid(w, h)` puts x first); each half is
/// `[sin(p·ω), cos(p·ω)]` with `ω_k = 10000^(−k / (dim/4))`, `k < dim/4`.
pub fn sincos_2d(dim: usize, grid: usize) -> Tensor {
    let quarter = dim / 4;
    let mut out = vec![0f32; grid * grid * dim];
    for y in 0..grid {
        for x in 0..grid {
            let row = &mut out[(y * grid + x) * dim..(y * grid + x + 1) * dim];
            for (half, pos) in [(0, x), (1, y)] {
                for k in 0..quarter {
                    let omega = 1.0 / 10000f64.powf(k as f64 / quarter as f64);
                    let a = pos as f64 * omega;
                    row[half * 2 * quarter + k] = a.sin() as f32;
                    row[half * 2 * quarter + quarter + k] = a.cos() as f32;
                }
            }
        }
    }
    Tensor::from_slice(&out).view([1, (grid * grid) as i64, dim as i64])
}

#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    to_qkv: nn::Linear,
    to_out: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
    dim_head: i64,
}

impl Block {
    fn new(p: &nn::Path, c: &VitConfig) -> Self {
        let (dim, inner) = (c.dim as i64, (c.heads * c.dim_head) as i64);
        let ln = nn::LayerNormConfig::default();
        let lin = vq_tch::init::torch_linear();
        let no_bias = nn::LinearConfig { bias: false, ..lin };
        let attn = p / "0";
        let ff = p / "1";
        Self {
            norm1: nn::layer_norm(&attn / "norm", vec![dim], ln),
            to_qkv: nn::linear(&attn / "fn" / "to_qkv", dim, 3 * inner, no_bias),
            to_out: nn::linear(&attn / "fn" / "to_out", inner, dim, lin),
            norm2: nn::layer_norm(&ff / "norm", vec![dim], ln),
            fc1: nn::linear(&ff / "fn" / "net" / "0", dim, c.mlp_dim as i64, lin),
            fc2: nn::linear(&ff / "fn" / "net" / "2", c.mlp_dim as i64, dim, lin),
            heads: c.heads as i64,
            dim_head: c.dim_head as i64,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n) = (x.size()[0], x.size()[1]);
        let qkv = x.apply(&self.norm1).apply(&self.to_qkv);
        let split = |t: &Tensor| {
            t.view([b, n, self.heads, self.dim_head])
                .permute([0, 2, 1, 3])
        };
        let parts = qkv.chunk(3, -1);
        let (q, k, v) = (split(&parts[0]), split(&parts[1]), split(&parts[2]));
        let attn = (q.matmul(&k.transpose(-1, -2)) * (self.dim_head as f64).powf(-0.5))
            .softmax(-1, Kind::Float);
        let out = attn
            .matmul(&v)
            .permute([0, 2, 1, 3])
            .reshape([b, n, self.heads * self.dim_head])
            .apply(&self.to_out);
        let x = x + out;
        let h = x
            .apply(&self.norm2)
            .apply(&self.fc1)
            .tanh()
            .apply(&self.fc2);
        x + h
    }
}

fn transformer(p: &nn::Path, c: &VitConfig) -> Vec<Block> {
    (0..c.depth)
        .map(|i| Block::new(&(p / "transformer" / "layers" / i), c))
        .collect()
}

fn fixed_position(p: &nn::Path, name: &str, c: &VitConfig) -> Tensor {
    let mut t = p.zeros_no_train(name, &[1, (c.grid() * c.grid()) as i64, c.dim as i64]);
    let values = sincos_2d(c.dim, c.grid()).to_device(t.device());
    tch::no_grad(|| t.copy_(&values));
    t
}

/// ViT encoder: image `(B, C, S, S)` → latent map `(B, dim, S/p, S/p)` (the token grid, channel
/// first, so that it feeds the quantizer like a convolutional encoder's output).
#[derive(Debug)]
pub struct VitEncoder {
    patch: nn::Conv2D,
    pos: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    grid: i64,
}

impl VitEncoder {
    /// Builds the variables under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, c: &VitConfig) -> Result<Self> {
        c.validate()?;
        let k = c.patch_size as i64;
        Ok(Self {
            patch: nn::conv2d(
                p / "to_patch_embedding" / "0",
                c.channels as i64,
                c.dim as i64,
                k,
                vq_tch::init::torch_conv(c.channels, c.patch_size, k, 0),
            ),
            pos: fixed_position(p, "en_pos_embedding", c),
            blocks: transformer(p, c),
            norm: nn::layer_norm(p / "norm", vec![c.dim as i64], Default::default()),
            grid: c.grid() as i64,
        })
    }
}

impl Module for VitEncoder {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.patch);
        let (b, d) = (h.size()[0], h.size()[1]);
        let mut t = h.flatten(2, 3).transpose(1, 2) + &self.pos;
        for block in &self.blocks {
            t = block.forward(&t);
        }
        t.apply(&self.norm)
            .transpose(1, 2)
            .reshape([b, d, self.grid, self.grid])
    }
}

/// ViT decoder: latent map `(B, dim, S/p, S/p)` → image `(B, C, S, S)`.
#[derive(Debug)]
pub struct VitDecoder {
    pos: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    to_pixel: nn::ConvTranspose2D,
}

impl VitDecoder {
    /// Builds the variables under `p`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(p: &nn::Path, c: &VitConfig) -> Result<Self> {
        c.validate()?;
        let k = c.patch_size as i64;
        Ok(Self {
            pos: fixed_position(p, "de_pos_embedding", c),
            blocks: transformer(p, c),
            norm: nn::layer_norm(p / "norm", vec![c.dim as i64], Default::default()),
            to_pixel: nn::conv_transpose2d(
                p / "to_pixel" / "conv_out",
                c.dim as i64,
                c.channels as i64,
                k,
                vq_tch::init::torch_conv_transpose(c.channels, c.patch_size, k),
            ),
        })
    }

    /// The weight of the last layer (VQGAN's adaptive adversarial weight is computed on it).
    pub fn last_layer_weight(&self) -> &Tensor {
        &self.to_pixel.ws
    }
}

impl Module for VitDecoder {
    fn forward(&self, z: &Tensor) -> Tensor {
        let s = z.size();
        let (b, d, gh, gw) = (s[0], s[1], s[2], s[3]);
        let mut t = z.flatten(2, 3).transpose(1, 2) + &self.pos;
        for block in &self.blocks {
            t = block.forward(&t);
        }
        t.apply(&self.norm)
            .transpose(1, 2)
            .reshape([b, d, gh, gw])
            .apply(&self.to_pixel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn position_embedding_matches_the_mae_formula() {
        let e = sincos_2d(8, 3);
        assert_eq!(e.size(), [1, 9, 8]);
        let v = |i: i64, k: i64| f64::try_from(e.get(0).get(i).get(k)).unwrap();
        // Token (y=1, x=2) = index 5: channel 0 = sin(x·1), 1 = sin(x·10000^-½), 2 = cos(x),
        // channel 4 = sin(y).
        assert!((v(5, 0) - 2f64.sin()).abs() < 1e-6);
        assert!((v(5, 1) - (2.0 / 100.0f64).sin()).abs() < 1e-6);
        assert!((v(5, 2) - 2f64.cos()).abs() < 1e-6);
        assert!((v(5, 4) - 1f64.sin()).abs() < 1e-6);
    }

    #[test]
    fn names_and_shapes_follow_enhancing_transformers() {
        let vs = nn::VarStore::new(Device::Cpu);
        let c = VitConfig {
            image_size: 16,
            patch_size: 4,
            channels: 3,
            dim: 32,
            depth: 2,
            heads: 2,
            dim_head: 8,
            mlp_dim: 48,
        };
        let enc = VitEncoder::new(&(vs.root() / "encoder"), &c).unwrap();
        let dec = VitDecoder::new(&(vs.root() / "decoder"), &c).unwrap();
        let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let z = enc.forward(&x);
        assert_eq!(z.size(), [2, 32, 4, 4]);
        assert_eq!(dec.forward(&z).size(), [2, 3, 16, 16]);
        let names = vs.variables();
        for n in [
            "encoder.to_patch_embedding.0.weight",
            "encoder.en_pos_embedding",
            "encoder.transformer.layers.1.0.fn.to_qkv.weight",
            "encoder.transformer.layers.1.1.fn.net.2.bias",
            "decoder.de_pos_embedding",
            "decoder.to_pixel.conv_out.weight",
            "decoder.norm.weight",
        ] {
            assert!(names.contains_key(n), "{n} missing");
        }
        assert!(!names.contains_key("encoder.transformer.layers.0.0.fn.to_qkv.bias"));
        // The position embeddings are not trained.
        assert_eq!(vs.trainable_variables().len(), names.len() - 2);
        let bad = VitConfig {
            image_size: 18,
            ..c.clone()
        };
        assert!(VitEncoder::new(&vs.root(), &bad).is_err());
    }

    /// Every weight and bias within PyTorch's default bound 1/√fan_in (weights filling it with
    /// the uniform's spread b/√3), LayerNorms at (1, 0).
    #[test]
    fn layers_start_as_pytorchs_module_defaults() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let c = VitConfig {
            image_size: 32,
            patch_size: 8,
            channels: 3,
            dim: 64,
            depth: 1,
            heads: 2,
            dim_head: 32,
            mlp_dim: 256,
        };
        VitEncoder::new(&(vs.root() / "encoder"), &c).unwrap();
        VitDecoder::new(&(vs.root() / "decoder"), &c).unwrap();
        let fan_in = |name: &str| -> usize {
            match name {
                n if n.contains("to_patch_embedding") => 3 * 64,
                // A transposed convolution's fan-in is out · k² in PyTorch.
                n if n.contains("to_pixel") => 3 * 64,
                n if n.contains("net.2") => 256,
                _ => 64,
            }
        };
        let mut checked = 0;
        for (name, t) in vs.variables() {
            if name.contains("pos_embedding") {
                continue;
            }
            let t = t.to_kind(Kind::Double);
            let (max, std) = (
                f64::try_from(t.abs().max()).unwrap(),
                f64::try_from(t.std(true)).unwrap(),
            );
            if name.contains("norm") {
                let expected = if name.ends_with("weight") { 1.0 } else { 0.0 };
                assert!(
                    (t - expected).abs().max().double_value(&[]) == 0.0,
                    "{name}"
                );
                continue;
            }
            let b = 1.0 / (fan_in(&name) as f64).sqrt();
            assert!(max <= b * (1.0 + 1e-6), "{name}: max {max} > {b}");
            if name.ends_with("weight") {
                assert!(
                    (std * 3f64.sqrt() / b - 1.0).abs() < 0.1,
                    "{name}: std {std}, b {b}"
                );
            }
            checked += 1;
        }
        assert!(checked >= 10, "{checked}");
    }
}
