"""The PyTorch twin of a vq-train run: the same network, quantizer, optimiser, batch and precision,
built from a run configuration as `vq-train presets <name>` prints it, trained for a few steps and
timed. `cargo xtask bench-train` runs it beside `vq-train train` and prints the ratio.

The network is taming-transformers' Encoder / Decoder (taming/modules/diffusionmodules/model.py,
as crates/vq-models/src/taming.rs rebuilds it) with the optional 1x1 quant_conv pair,
enhancing-transformers' ViT encoder / decoder (as crates/vq-models/src/vit.rs rebuilds it), or
transformers' TimeSformer (divided space-time attention) as video encoder / decoder (as
crates/vq-models/src/timesformer.rs rebuilds it; the discriminator sees the clips' frames); the quantizer
is lucidrains' vector-quantize-pytorch layer written with torch ops (EMA codebook with Laplace
smoothing, or a learned one; Euclidean or cosine lookup; straight-through or the rotation trick of
`rotate_to`; commitment loss beta * mse(e, sg(q))); the optimiser torch.optim.AdamW with the
run's betas, weight decay, warm-up + cosine schedule and global gradient-norm clip. The quantizer
runs outside autocast in float32, as the paper's code does. A configuration with a PatchGAN `gan`
section (the taming and latent-diffusion VQGANs) trains as taming's VQLPIPSWithDiscriminator
does, without LPIPS (vq-train has it only with user-supplied weights): the generator minimises
l1·|x − x̃| + l2·(x − x̃)² + codebook_weight·qloss and, from `disc_start` on, adds the adaptive
weight times −mean D(x̃); the NLayerDiscriminator then takes one step on the hinge loss of the
same images and the detached reconstructions (AdamW, the run's betas, lr × disc_lr_multiplier).
ViT-VQGAN's configuration trains the same way with its own parts: the StyleGAN2-type
discriminator, the non-saturating ("vanilla") losses, a fixed adversarial weight, and the lazy R1
penalty γ·every/2 · E‖∇_x D(x)‖² on real images every `every` steps.

Usage: python torch_twin.py CONFIG.json --steps N --warmup W --device cpu|cuda --precision f32|bf16|f16
       [--batch-size B] [--threads T] [--images N] [--seed S]
       python torch_twin.py CONFIG.json --describe | --init-stats
       python torch_twin.py CONFIG.json --export-reference FILE
Prints one JSON line: trainable parameters, steps/s, images/s, peak memory, last loss; with
--describe the trainable parameters' names and shapes (the references' names, as vq-train's
checkpoints use them; the discriminator's under `discriminator.`) and nothing is trained."""

import argparse
import json
import math
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def fail(msg):
    print(f"torch_twin: {msg}", file=sys.stderr)
    sys.exit(2)


# --- taming-transformers Encoder / Decoder ---------------------------------------------------

def normalize(c, groups):
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = normalize(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = normalize(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0) if cin != cout else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.norm = normalize(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w).permute(0, 2, 1)
        k = self.k(hn).reshape(b, c, h * w)
        v = self.v(hn).reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if i < len(self.attn):
                h = self.attn[i](h)
        return h


class Mid(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, t):
        super().__init__()
        g, ch, mult = t["norm_groups"], t["ch"], t["ch_mult"]
        self.conv_in = nn.Conv2d(t["in_channels"], ch, 3, 1, 1)
        res, block_in = t["resolution"], ch
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            level = Level()
            for _ in range(t["num_res_blocks"]):
                level.block.append(ResnetBlock(block_in, ch * m, g))
                block_in = ch * m
                if res in t["attn_resolutions"]:
                    level.attn.append(AttnBlock(block_in, g))
            if i + 1 != len(mult):
                level.downsample = nn.Module()
                level.downsample.conv = nn.Conv2d(block_in, block_in, 3, 2, 0)
                res //= 2
            self.down.append(level)
        self.mid = Mid(block_in, g)
        self.norm_out = normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, t["z_channels"], 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, t):
        super().__init__()
        g, ch, mult = t["norm_groups"], t["ch"], t["ch_mult"]
        block_in = ch * mult[-1]
        res = t["resolution"] // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(t["z_channels"], block_in, 3, 1, 1)
        self.mid = Mid(block_in, g)
        up = []
        for i in reversed(range(len(mult))):
            level = Level()
            for _ in range(t["num_res_blocks"] + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[i], g))
                block_in = ch * mult[i]
                if res in t["attn_resolutions"]:
                    level.attn.append(AttnBlock(block_in, g))
            if i != 0:
                level.upsample = nn.Module()
                level.upsample.conv = nn.Conv2d(block_in, block_in, 3, 1, 1)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)  # PyTorch index up.{i} holds resolution level i
        self.norm_out = normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, t["out_channels"], 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(swish(self.norm_out(h)))


# --- enhancing-transformers' ViT encoder / decoder -------------------------------------------

def sincos_2d(dim, grid):
    """MAE's 2-D sine-cosine position embedding (1, grid², dim), as vq_models::vit::sincos_2d."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (xs.reshape(-1), ys.reshape(-1)):
        a = pos[:, None] * omega[None, :]
        parts += [a.sin(), a.cos()]
    return torch.cat(parts, 1).float().unsqueeze(0)


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Attention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, self.dim_head).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, -1))
        attn = ((q @ k.transpose(-1, -2)) * self.dim_head ** -0.5).softmax(-1, dtype=torch.float32)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, v):
        super().__init__()
        d = v["dim"]
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(d, Attention(d, v["heads"], v["dim_head"])),
                           PreNorm(d, FeedForward(d, v["mlp_dim"]))])
            for _ in range(v["depth"]))

    def forward(self, x):
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return x


class VitEncoder(nn.Module):
    def __init__(self, v):
        super().__init__()
        p, self.grid = v["patch_size"], v["image_size"] // v["patch_size"]
        self.to_patch_embedding = nn.Sequential(nn.Conv2d(v["channels"], v["dim"], p, stride=p))
        self.register_buffer("en_pos_embedding", sincos_2d(v["dim"], self.grid))
        self.transformer = Transformer(v)
        self.norm = nn.LayerNorm(v["dim"])

    def forward(self, x):
        h = self.to_patch_embedding(x)
        b, d = h.shape[:2]
        t = self.transformer(h.flatten(2).transpose(1, 2) + self.en_pos_embedding)
        return self.norm(t).transpose(1, 2).reshape(b, d, self.grid, self.grid)


class VitDecoder(nn.Module):
    def __init__(self, v):
        super().__init__()
        p, grid = v["patch_size"], v["image_size"] // v["patch_size"]
        self.register_buffer("de_pos_embedding", sincos_2d(v["dim"], grid))
        self.transformer = Transformer(v)
        self.norm = nn.LayerNorm(v["dim"])
        self.to_pixel = nn.Module()
        self.to_pixel.conv_out = nn.ConvTranspose2d(v["dim"], v["channels"], p, stride=p)

    def forward(self, z):
        b, d, gh, gw = z.shape
        t = self.transformer(z.flatten(2).transpose(1, 2) + self.de_pos_embedding)
        return self.to_pixel.conv_out(self.norm(t).transpose(1, 2).reshape(b, d, gh, gw))


# --- transformers' TimeSformer as encoder / decoder ------------------------------------------

class TsAttention(nn.Module):
    """TimesformerAttention: `attention.qkv` and `output.dense` (transformers' names)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.attention, self.output = nn.Module(), nn.Module()
        self.attention.qkv = nn.Linear(d, 3 * d)
        self.output.dense = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.attention.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1, dtype=torch.float32)
        return self.output.dense((attn @ v).transpose(1, 2).reshape(b, n, d))


def dense(din, dout):
    return nn.Linear(din, dout)


class TsLayer(nn.Module):
    """TimesformerLayer with divided space-time attention, as crates/vq-models/src/timesformer.rs."""

    def __init__(self, s):
        super().__init__()
        d, eps = s["hidden"], s["layer_norm_eps"]
        self.temporal_layernorm = nn.LayerNorm(d, eps=eps)
        self.temporal_attention = TsAttention(d, s["heads"])
        self.temporal_dense = dense(d, d)
        self.layernorm_before = nn.LayerNorm(d, eps=eps)
        self.attention = TsAttention(d, s["heads"])
        self.layernorm_after = nn.LayerNorm(d, eps=eps)
        self.intermediate, self.output = nn.Module(), nn.Module()
        self.intermediate.dense = dense(d, s["intermediate"])
        self.output.dense = dense(s["intermediate"], d)

    def forward(self, h, n, t):
        b, _, d = h.shape
        cls, tokens = h[:, :1], h[:, 1:]
        res_t = self.temporal_attention(self.temporal_layernorm(tokens.reshape(b * n, t, d)))
        xt = tokens + self.temporal_dense(res_t.reshape(b, n * t, d))
        xs = xt.reshape(b, n, t, d).permute(0, 2, 1, 3).reshape(b * t, n, d)
        cls_rep = cls.repeat(1, t, 1).reshape(b * t, 1, d)
        res = self.attention(self.layernorm_before(torch.cat([cls_rep, xs], 1)))
        res_cls = res[:, 0].reshape(b, t, d).mean(1, keepdim=True)
        res_s = res[:, 1:].reshape(b, t, n, d).permute(0, 2, 1, 3).reshape(b, n * t, d)
        h = torch.cat([cls, xt], 1) + torch.cat([res_cls, res_s], 1)
        return h + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(h))))


class TsTrunk(nn.Module):
    """Embeddings (CLS, space and time positions), the layers and the final LayerNorm."""

    def __init__(self, s):
        super().__init__()
        d, self.t = s["hidden"], s["frames"]
        self.n = (s["image_size"] // s["patch_size"]) ** 2
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.embeddings.position_embeddings = nn.Parameter(torch.randn(1, self.n + 1, d) * 0.02)
        self.embeddings.time_embeddings = nn.Parameter(torch.zeros(1, self.t, d))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(TsLayer(s) for _ in range(s["layers"]))
        self.layernorm = nn.LayerNorm(d, eps=s["layer_norm_eps"])

    def trunk(self, x, b):
        e, n, t = self.embeddings, self.n, self.t
        d = x.shape[2]
        x = x + e.position_embeddings[:, 1:]
        cls = e.cls_token + e.position_embeddings[:, :1]
        x = x.reshape(b, t, n, d).permute(0, 2, 1, 3) + e.time_embeddings.unsqueeze(1)
        h = torch.cat([cls.expand(b, 1, d), x.reshape(b, n * t, d)], 1)
        for layer in self.encoder.layer:
            h = layer(h, n, t)
        return self.layernorm(h)[:, 1:]


class TsEncoder(TsTrunk):
    def __init__(self, s):
        super().__init__(s)
        p, self.g, self.d = s["patch_size"], s["image_size"] // s["patch_size"], s["hidden"]
        self.embeddings.patch_embeddings = nn.Module()
        self.embeddings.patch_embeddings.projection = nn.Conv2d(s["channels"], self.d, p, stride=p)

    def forward(self, x):
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        tokens = self.embeddings.patch_embeddings.projection(frames).flatten(2).transpose(1, 2)
        return self.trunk(tokens, b).reshape(b, self.g, self.g, t, self.d).permute(0, 4, 3, 1, 2)


class TsDecoder(TsTrunk):
    def __init__(self, s):
        super().__init__(s)
        p, self.c = s["patch_size"], s["channels"]
        self.to_pixel = nn.Module()
        self.to_pixel.conv_out = nn.ConvTranspose2d(s["hidden"], s["channels"], p, stride=p)

    def forward(self, z):
        b, d, t, g, gw = z.shape
        tokens = z.permute(0, 2, 3, 4, 1).reshape(b * t, g * gw, d)
        out = self.trunk(tokens, b)
        frames = self.to_pixel.conv_out(out.reshape(b, g, gw, t, d).permute(0, 3, 4, 1, 2).reshape(b * t, d, g, gw))
        h, w = frames.shape[2:]
        return frames.reshape(b, t, self.c, h, w).permute(0, 2, 1, 3, 4)


def frames_as_images(x):
    """(B, C, T, H, W) → (B·T, C, H, W); images unchanged (vq_train::data::frames_as_images)."""
    if x.dim() == 5:
        b, c, t, h, w = x.shape
        return x.transpose(1, 2).reshape(b * t, c, h, w)
    return x


# --- lucidrains-style vector quantizer --------------------------------------------------------

def l2norm(t, eps=1e-12):
    return F.normalize(t, dim=-1, eps=eps)


def rotate_to(src, tgt):
    """lucidrains' rotate_to: the rotation + rescale that carries src onto tgt, as a constant."""
    n_src = src.norm(dim=-1, keepdim=True)
    n_tgt = tgt.norm(dim=-1, keepdim=True)
    u = (src / n_src.clamp(min=1e-6)).detach()
    q = (tgt / n_tgt.clamp(min=1e-6)).detach()
    w = l2norm(u + q).detach()
    rotated = src - 2 * (src * w).sum(-1, keepdim=True) * w + 2 * (src * u).sum(-1, keepdim=True) * q
    return rotated * (n_tgt / n_src.clamp(min=1e-6)).detach()


def codebook_init(init, k, d):
    """The codebook's first values as vq_tch::CodebookInit draws them (other random numbers)."""
    if init == "normal":
        return torch.randn(k, d)
    if init == "kaiming_uniform":  # lucidrains: kaiming_uniform_ on a (1, K, D) tensor
        t = torch.empty(1, k, d)
        nn.init.kaiming_uniform_(t)
        return t[0]
    if init == "uniform_inverse_k":  # taming: uniform_(-1/K, 1/K)
        return torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)
    if isinstance(init, dict) and "uniform" in init:
        b = init["uniform"]["bound"]
        return torch.empty(k, d).uniform_(-b, b)
    fail(f"codebook init {init!r}")


class VectorQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        k, d = cfg["codebook_size"], cfg["codebook_dim"]
        self.metric, self.beta, self.estimator = cfg["metric"], cfg["beta"], cfg["estimator"]
        if self.estimator not in ("ste", "rotation"):
            fail(f"estimator {self.estimator!r}: the twin has ste and rotation")
        learning = cfg["learning"]
        self.ema = learning.get("ema") if isinstance(learning, dict) else None
        proj = cfg["projection"]
        if proj == "identity":
            self.project_in = self.project_in_norm = self.project_out = None
        else:
            kind, channels = next(iter(proj.items()))
            self.project_in = nn.Linear(channels["channels"], d)
            self.project_in_norm = nn.LayerNorm(d) if kind == "linear_layer_norm" else None
            self.project_out = nn.Linear(d, channels["channels"])
        embed = codebook_init(cfg.get("init", "normal"), k, d)
        if self.metric == "cosine":
            embed = l2norm(embed)
        if self.ema is not None:
            self.register_buffer("codebook", embed)
            self.register_buffer("cluster_size", torch.zeros(k))
            self.register_buffer("embed_avg", embed.clone())
        else:
            self.codebook = nn.Parameter(embed)
            self.legacy = learning["gradient"]["placement"] == "legacy_codebook"

    def forward(self, x):
        # (B, C, [T,] h, w) -> (B*[T*]h*w, C), float32 whatever the autocast region around it.
        c = x.shape[1]
        last = x.float().movedim(1, -1)
        lead = last.shape[:-1]
        flat = last.reshape(-1, c)
        e = self.project_in(flat) if self.project_in is not None else flat
        if self.project_in_norm is not None:
            e = self.project_in_norm(e)
        if self.metric == "cosine":
            e = l2norm(e)
        codebook = self.codebook
        if self.metric == "cosine" and self.ema is None:
            # enhancing-transformers normalises a learned cosine codebook at every use.
            codebook = l2norm(codebook)
        with torch.no_grad():
            cb = codebook.detach()
            if self.metric == "cosine":
                idx = (e.detach() @ cb.t()).argmax(1)
            else:
                dist = (e.detach() ** 2).sum(1, keepdim=True) - 2 * e.detach() @ cb.t() + (cb ** 2).sum(1)
                idx = dist.argmin(1)
        q = F.embedding(idx, codebook)
        if self.ema is not None:
            commit = self.beta * F.mse_loss(e, q.detach())
            loss = commit
            if self.training:
                self.ema_update(e.detach(), idx)
        else:
            commit = F.mse_loss(e, q.detach())
            code = F.mse_loss(q, e.detach())
            loss = (commit + self.beta * code) if self.legacy else (self.beta * commit + code)
        out = rotate_to(e, q) if self.estimator == "rotation" else e + (q - e).detach()
        if self.project_out is not None:
            out = self.project_out(out)
        out = out.reshape(*lead, -1).movedim(-1, 1)
        return out, loss, idx, commit

    @torch.no_grad()
    def ema_update(self, e, idx):
        k = self.codebook.shape[0]
        decay, eps = self.ema["decay"], self.ema["laplace_eps"]
        onehot = F.one_hot(idx, k).type(e.dtype)
        self.cluster_size.lerp_(onehot.sum(0), 1 - decay)
        self.embed_avg.lerp_(onehot.t() @ e, 1 - decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + eps) / (n + k * eps) * n
        embed = self.embed_avg / smoothed.unsqueeze(1)
        self.codebook.copy_(l2norm(embed) if self.metric == "cosine" else embed)


class VqAutoencoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        kind, t = backbone(model)
        if kind == "vit":
            self.encoder, self.decoder = VitEncoder(t), VitDecoder(t)
        elif kind == "timesformer":
            self.encoder, self.decoder = TsEncoder(t), TsDecoder(t)
        else:
            self.encoder, self.decoder = Encoder(t), Decoder(t)
        q = model["quantizer"]
        if model["quant_conv"] != "none":
            d = q["codebook_dim"] if q["projection"] == "identity" else next(iter(q["projection"].values()))["channels"]
            self.quant_conv = nn.Conv2d(t["z_channels"], d, 1)
            self.post_quant_conv = nn.Conv2d(d, t["z_channels"], 1)
        else:
            self.quant_conv = self.post_quant_conv = None
        self.quantize = VectorQuantizer(q)

    def forward(self, x, precision, device):
        with autocast(device, precision):
            h = self.encoder(x)
            if self.quant_conv is not None:
                h = self.quant_conv(h)
        with torch.autocast(device_type=device.type, enabled=False):
            quantized, qloss, idx, commit = self.quantize(h)
        with autocast(device, precision):
            if self.post_quant_conv is not None:
                quantized = self.post_quant_conv(quantized)
            rec = self.decoder(quantized)
        return rec.float(), qloss, idx, commit


# --- taming's PatchGAN discriminator and VQGAN losses ----------------------------------------

class NLayerDiscriminator(nn.Module):
    """taming/modules/discriminator/model.py with BatchNorm, weights N(0, 0.02) (BN: N(1, 0.02))."""

    def __init__(self, gan):
        super().__init__()
        ndf, n = gan["ndf"], gan["n_layers"]
        layers = [nn.Conv2d(gan["in_channels"], ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, n + 1):
            prev, mult = mult, min(2 ** i, 8)
            stride = 2 if i < n else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


class EqualConv(nn.Module):
    """An equalised-learning-rate convolution (weights N(0, 1) scaled by 1/√fan_in at run time),
    with the scaled leaky ReLU when `act`."""

    def __init__(self, cin, cout, k, stride, padding, act):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale, self.stride, self.padding, self.act = 1 / math.sqrt(cin * k * k), stride, padding, act

    def forward(self, x):
        y = F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)
        return leaky(y) if self.act else y


class EqualLinear(nn.Module):
    def __init__(self, din, dout, act):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din))
        self.bias = nn.Parameter(torch.zeros(dout))
        self.scale, self.act = 1 / math.sqrt(din), act

    def forward(self, x):
        y = F.linear(x, self.weight * self.scale, self.bias)
        return leaky(y) if self.act else y


def leaky(x):
    return torch.maximum(x, x * 0.2) * math.sqrt(2)


def blur(x):
    """The [1, 3, 3, 1] ⊗ [1, 3, 3, 1] / 64 blur per channel, reflection-padded (1, 2)."""
    c = x.shape[1]
    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0], device=x.device)
    k = (k1[:, None] * k1[None, :] / 64.0).to(x.dtype).view(1, 1, 4, 4).repeat(c, 1, 1, 1)
    return F.conv2d(F.pad(x, (1, 2, 1, 2), mode="reflect"), k, groups=c)


class StyleBlock(nn.Module):
    def __init__(self, cin, cout, downsample):
        super().__init__()
        self.conv_res = EqualConv(cin, cout, 1, 2 if downsample else 1, 0, False)
        self.net = nn.ModuleList([EqualConv(cin, cout, 3, 1, 1, True), EqualConv(cout, cout, 3, 1, 1, True)])
        self.downsample = nn.ModuleList([nn.Identity(), EqualConv(cout, cout, 3, 2, 1, False)]) if downsample else None

    def forward(self, x):
        res = self.conv_res(x)
        h = self.net[1](self.net[0](x))
        if self.downsample is not None:
            h = self.downsample[1](blur(h))
        return (h + res) / math.sqrt(2)


class StyleDiscriminator(nn.Module):
    """ViT-VQGAN's StyleGAN2-type discriminator (enhancing-transformers' StyleDiscriminator, as
    crates/vq-models/src/stylegan.rs rebuilds it): one logit per image."""

    def __init__(self, cfg, channels):
        super().__init__()
        layers = int(math.log2(cfg["image_size"])) - 1
        filters = [channels] + [min(cfg["network_capacity"] * 4 * 2 ** i, cfg["fmap_max"]) for i in range(layers + 1)]
        pairs = list(zip(filters[:-1], filters[1:]))
        self.blocks = nn.ModuleList(StyleBlock(a, b, i + 1 != len(pairs)) for i, (a, b) in enumerate(pairs))
        last = filters[-1]
        self.final_conv = EqualConv(last, last, 3, 1, 1, True)
        self.final_linear = nn.ModuleList([EqualLinear(last * 4, last, True), EqualLinear(last, 1, False)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        h = self.final_conv(x).flatten(1)
        return self.final_linear[1](self.final_linear[0](h)).view(-1)


def r1_penalty(real_logits, x):
    """mean over images of ‖∇_x Σ D(x)‖² (the graph kept, for the penalty's own gradient)."""
    g = torch.autograd.grad(real_logits.sum(), x, create_graph=True)[0]
    return g.pow(2).flatten(1).sum(1).mean()


def vqgan_parts(cfg, device):
    """The discriminator and its optimiser of a PatchGAN VQGAN configuration, or None."""
    gan = cfg.get("gan")
    if gan is None:
        return None
    kind = gan["discriminator"]
    if kind == "patch_gan":
        disc = NLayerDiscriminator(gan)
    elif isinstance(kind, dict) and "style_gan" in kind:
        disc = StyleDiscriminator(kind["style_gan"], gan["in_channels"])
    else:
        fail(f"discriminator {kind!r}: the twin has the PatchGAN and the StyleGAN2-type one")
    if gan["adversarial_loss"] not in ("hinge", "vanilla"):
        fail(f"adversarial loss {gan['adversarial_loss']!r}: the twin has hinge and vanilla")
    disc = disc.to(device).train()
    t = cfg["training"]
    opt = torch.optim.AdamW(disc.parameters(), lr=t["learning_rate"] * gan["disc_lr_multiplier"],
                            betas=tuple(t["betas"]), weight_decay=0.0)
    return gan, disc, opt


def adaptive_weight(nll, g_loss, last_layer, disc_weight):
    """taming's calculate_adaptive_weight: ‖∇nll‖ / (‖∇g‖ + 1e-4), clamped to [0, 1e4], × disc_weight."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(w, 0.0, 1e4).detach() * disc_weight


def hinge_d_loss(real, fake):
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def d_loss(gan, real, fake):
    if gan["adversarial_loss"] == "hinge":
        return hinge_d_loss(real, fake)
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def g_loss(gan, fake):
    return -fake.mean() if gan["adversarial_loss"] == "hinge" else F.softplus(-fake).mean()


def backbone(model):
    """("vit" | "taming", its settings) of a model configuration (the backbone is untagged in the
    JSON: the ViT has a patch size, the taming CNN channel multipliers)."""
    b = model["autoencoder"]
    if "frames" in b:
        return "timesformer", b
    if "patch_size" in b:
        return "vit", b
    if "ch_mult" in b:
        return "taming", b
    fail(f"unknown backbone {sorted(b)}: the twin has the taming CNN, the ViT and TimeSformer")


def sample_shape(model):
    """The shape of one input sample: (C, S, S), or (C, T, S, S) for video."""
    kind, b = backbone(model)
    if kind == "taming":
        return (b["in_channels"], b["resolution"], b["resolution"])
    if kind == "vit":
        return (b["channels"], b["image_size"], b["image_size"])
    return (b["channels"], b["frames"], b["image_size"], b["image_size"])


def autocast(device, precision):
    dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def learning_rate(step, t):
    """vq_train::optim::learning_rate: linear warm-up, cosine to final_lr_fraction, constant."""
    peak, warm, decay, final = t["learning_rate"], t["warmup_steps"], t["decay_steps"], t["final_lr_fraction"]
    if step < warm:
        return peak * (step + 1) / warm
    s = step - warm
    if decay == 0 or s >= decay:
        return peak * final
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * s / decay)))


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reference_state_dict(cfg, model, disc):
    """The freshly built model in its reference code's checkpoint layout: taming-transformers /
    latent-diffusion (`quantize.embedding.weight`, the discriminator under `loss.discriminator.`)
    or enhancing-transformers (`quantizer.embedding.weight`, `pre_quant`, `post_quant`), plus a
    perceptual-loss buffer as those checkpoints carry. EMA buffers are not in the references."""
    vit = backbone(cfg["model"])[0] in ("vit", "timesformer")
    sd = {}
    for n, p in model.state_dict().items():
        if n == "quantize.codebook":
            n = "quantizer.embedding.weight" if vit else "quantize.embedding.weight"
        elif n.startswith("quantize.project_in."):
            n = "pre_quant." + n.rsplit(".", 1)[1]
        elif n.startswith("quantize.project_out."):
            n = "post_quant." + n.rsplit(".", 1)[1]
        elif n.startswith("quantize."):
            continue
        sd[n] = p.detach().clone()
    if disc is not None:
        for n, p in disc.state_dict().items():
            sd["loss.discriminator." + n] = p.detach().clone()
    sd["loss.perceptual_loss.scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    return sd


def checksums(model, disc):
    """vq-train's name of every exported tensor -> [sum, sum of (index + 1) * value] (f64, over
    the row-major elements): a check of names, values and layout."""
    out = {}
    named = [(n, p) for n, p in model.state_dict().items()
             if not n.startswith("quantize.") or n == "quantize.codebook" or ".project_" in n]
    if disc is not None:
        named += [("discriminator." + n, p) for n, p in disc.state_dict().items()
                  if not n.endswith("num_batches_tracked")]
    for n, p in named:
        v = p.detach().double().reshape(-1)
        out[n] = [v.sum().item(), (v * torch.arange(1, v.numel() + 1, dtype=torch.float64)).sum().item()]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--describe", action="store_true")
    ap.add_argument("--init-stats", action="store_true",
                    help="print each trainable parameter's largest |value| and standard deviation "
                         "at initialisation (as PyTorch's modules draw them) and exit")
    ap.add_argument("--export-reference", metavar="FILE",
                    help="write the freshly initialised model (and discriminator) as a Lightning "
                         "checkpoint in the reference code's layout, print per-tensor checksums "
                         "under vq-train's names and exit")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True (as vq-train's --cudnn-benchmark)")
    ap.add_argument("--profile", metavar="TRACE",
                    help="after the timed steps, profile --profile-steps more with torch.profiler "
                         "and write a Chrome trace (summarise with `vq-train trace-summary`)")
    ap.add_argument("--profile-steps", type=int, default=3)
    a = ap.parse_args()
    with open(a.config) as f:
        cfg = json.load(f)
    if a.init_stats:
        torch.manual_seed(a.seed)
        model = VqAutoencoder(cfg["model"])
        print(json.dumps({n: [p.detach().abs().max().item(), p.detach().double().std().item() if p.numel() > 1 else 0.0]
                          for n, p in model.named_parameters() if p.requires_grad}))
        return
    if a.export_reference:
        torch.manual_seed(a.seed)
        model = VqAutoencoder(cfg["model"])
        parts = vqgan_parts(cfg, torch.device("cpu"))
        disc = parts[1] if parts is not None else None
        opt = torch.optim.Adam(model.parameters())
        torch.save({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.4.2",
                    "state_dict": reference_state_dict(cfg, model, disc),
                    "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
                    "hyper_parameters": argparse.Namespace(embed_dim=7, ckpt_path=None)},
                   a.export_reference)
        print(json.dumps(checksums(model, disc)))
        return
    if a.describe:
        model = VqAutoencoder(cfg["model"])
        names = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        parts = vqgan_parts(cfg, torch.device("cpu"))
        if parts is not None:
            names.update({f"discriminator.{n}": list(p.shape) for n, p in parts[1].named_parameters()})
        print(json.dumps(names))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    t = cfg["training"]
    batch = a.batch_size or t["batch_size"]
    micro = min(cfg.get("micro_batch") or batch, batch)
    if batch % micro:
        fail(f"batch size {batch} is not a multiple of the micro-batch {micro}")
    model = VqAutoencoder(cfg["model"]).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=t["learning_rate"], betas=tuple(t["betas"]),
                            weight_decay=t["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=a.precision == "f16")
    vqgan = vqgan_parts(cfg, device)
    disc_steps = [0]
    d_scaler = torch.amp.GradScaler(device.type, enabled=a.precision == "f16")
    images = torch.rand(a.images, *sample_shape(cfg["model"])) * 2 - 1
    accum = batch // micro

    def step(i):
        for g in opt.param_groups:
            g["lr"] = learning_rate(i, t)
        opt.zero_grad(set_to_none=True)
        idx = torch.randint(0, a.images, (batch,))
        x_all = images[idx].to(device, non_blocking=True)
        total = 0.0
        pairs = []
        adversarial = vqgan is not None and i >= vqgan[0]["disc_start"]
        for x in x_all.split(micro):
            rec, qloss, _, _ = model(x, a.precision, device)
            if vqgan is None:
                loss = F.mse_loss(rec, x) + qloss
            else:
                gan, disc, _ = vqgan
                nll = gan["l1_weight"] * (x - rec).abs().mean()
                if gan["l2_weight"] > 0:
                    nll = nll + gan["l2_weight"] * ((x - rec) ** 2).mean()
                loss = nll + gan["codebook_weight"] * qloss
                if adversarial:
                    with autocast(device, a.precision):
                        g_adv = g_loss(gan, disc(frames_as_images(rec)).float())
                    if gan["adversarial_weighting"] == "adaptive":
                        last = (model.decoder.to_pixel.conv_out if hasattr(model.decoder, "to_pixel")
                                else model.decoder.conv_out).weight
                        w = adaptive_weight(nll, g_adv, last, gan["disc_weight"])
                    else:
                        w = gan["disc_weight"]
                    loss = loss + w * g_adv
                pairs.append((frames_as_images(x), frames_as_images(rec.detach())))
            scaler.scale(loss / accum).backward()
            total = total + loss.detach()
        scaler.unscale_(opt)
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
        scaler.step(opt)
        scaler.update()
        if adversarial:
            disc_steps[0] += 1
            _, disc, d_opt = vqgan
            for g in d_opt.param_groups:
                g["lr"] = learning_rate(i, t) * vqgan[0]["disc_lr_multiplier"]
            d_opt.zero_grad(set_to_none=True)
            gan = vqgan[0]
            r1 = gan.get("r1") if gan.get("r1") and i % gan["r1"]["every"] == 0 else None
            for x, rec in pairs:
                if r1 is not None:
                    x = x.detach().requires_grad_(True)
                with autocast(device, a.precision):
                    real, fake = disc(x).float(), disc(rec).float()
                loss_d = d_loss(gan, real, fake)
                if r1 is not None:
                    loss_d = loss_d + r1_penalty(real, x) * (r1["gamma"] * r1["every"] / 2)
                d_scaler.scale(loss_d / accum).backward()
            d_scaler.step(d_opt)
            d_scaler.update()
        return total / accum

    for i in range(a.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.steps):
        loss = step(i)
    loss = float(loss)  # waits for the device
    elapsed = time.perf_counter() - start
    peak = peak_memory(device)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        first = a.warmup + a.steps
        with profile(activities=activities) as prof:
            for i in range(first, first + a.profile_steps):
                step(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
        prof.export_chrome_trace(a.profile)
    print(json.dumps({
        "parameters": n_params,
        "steps": a.steps,
        "steps_per_s": a.steps / elapsed,
        "images_per_s": a.steps * batch / elapsed,
        "peak_memory_bytes": peak,
        "loss": loss,
        "discriminator_steps": disc_steps[0],
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
