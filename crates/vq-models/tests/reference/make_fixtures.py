"""Writes the reference fixtures of crates/vq-models/tests/references.rs with the reference
packages themselves (versions in requirements.txt; torch 2.13.0 as `cargo xtask setup` installs).

    pip install --no-deps --target /tmp/refpy -r crates/vq-models/tests/reference/requirements.txt
    PYTHONPATH=/tmp/refpy:.libtorch/site python3 crates/vq-models/tests/reference/make_fixtures.py [NAME ...]

(NAME: only those fixtures, e.g. `prc`; without: all of them.)

The pretrained weights cannot be shipped, so both networks get deterministic weights from a
formula of the variable's name and index (`formula_weights` below; the Rust test builds the same
values), in the layouts of the real files. Fixtures (small safetensors files, inputs and
outputs) go to crates/vq-models/tests/fixtures/:

- frechet.safetensors: two feature sets with different, non-commuting covariances and
  pytorch-fid's `calculate_frechet_distance` of their statistics (scipy.linalg.sqrtm), plus
  logits and the Inception score by the formula of the original improved-GAN code (numpy);
- prc.safetensors: generated and real feature sets (a shifted, narrower cloud against a wider
  one, duplicates included) and torch-fidelity's `prc_features_to_metric` (improved precision /
  recall, Kynkäänniemi et al. 2019) of them with neighbourhoods 3 and 5, both its full and its
  batched ("save_cpu_ram") paths;
- lpips.safetensors: image pairs in [-1, 1] and `lpips.LPIPS(net="vgg")` distances;
- fid_inception.safetensors: images in [-1, 1], pytorch-fid's `InceptionV3([3])` pool features
  (the FID features; the input given in [0, 1] as pytorch-fid takes it) and the 1008 logits of
  `fid_inception_v3()`'s `fc` on them;
- timesformer.safetensors: a clip (B, C, T, H, W), the configuration of a small
  `transformers.TimesformerModel` (divided space-time attention) and its `last_hidden_state`;
- taming.safetensors: images, the latents of a small taming Encoder (ch 32, ch_mult (1, 2), one
  ResNet block per level, attention at 8², z 4) and that Decoder's images from those latents;
- layouts.json: every state-dict entry (name → shape) of the reference modules the presets
  rebuild at full size — taming's Encoder / Decoder (f16, f4; latent-diffusion's f8, whose
  `model.py` is taming's), taming's NLayerDiscriminator (3 and 2 layers), transformers'
  TimesformerModel with Table 11's settings (BAIR, UCF-101) — and their parameter counts.
"""
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")


def fnv1a(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h ^= b
        h = (h * 0x100000001B3) & (2**64 - 1)
    return h


def formula(name, shape):
    """The deterministic value of every element of variable `name` (see the Rust test)."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    phase = (fnv1a(name) % 1_000_003) / 1_000_003 * 2 * math.pi
    v = torch.sin(i * 0.7548776662466927 + phase) * torch.cos(i * 0.5698402909980532)
    if name.endswith("running_var"):
        v = 1.0 + 0.25 * (v + 1.0)
    elif name.endswith("running_mean"):
        v = 0.1 * v
    elif ".bn." in name and name.endswith("weight"):
        v = 1.0 + 0.1 * v
    elif name.endswith("bias"):
        v = 0.1 * v
    elif name.startswith("lin"):
        v = 0.5 * (v + 1.0)
    else:
        fan_in = math.prod(shape[1:])
        v = v * (2.0 / math.sqrt(fan_in))
    return v.to(torch.float32).reshape(shape)


def frechet():
    from pytorch_fid.fid_score import calculate_frechet_distance

    g = torch.Generator().manual_seed(1)
    n, d = 200, 16
    a = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) * 0.7 + 0.3
    stats = lambda x: (np.mean(x.numpy(), axis=0), np.cov(x.numpy(), rowvar=False))
    fid = calculate_frechet_distance(*stats(a), *stats(b))
    logits = torch.randn(40, 10, generator=g, dtype=torch.float64) * 3.0
    p = torch.softmax(logits, 1).numpy()
    scores = []
    for k in range(2):
        part = p[k * 20:(k + 1) * 20]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return {
        "a": a,
        "b": b,
        "fid": torch.tensor([fid], dtype=torch.float64),
        "logits": logits,
        "is_mean_std": torch.tensor([np.mean(scores), np.std(scores)], dtype=torch.float64),
    }


def prc():
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(3)
    n_fake, n_real, d = 150, 230, 8
    fake = torch.randn(n_fake, d, generator=g, dtype=torch.float64) * 0.6 + 0.8
    real = torch.randn(n_real, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5
    # Exact duplicates: their neighbour distances are 0 for the other copy.
    fake[10:14] = fake[0]
    real[20:22] = real[5]
    out = {"fake": fake, "real": real}
    for k in (3, 5):
        values = []
        for save_cpu_ram in (False, True):
            m = prc_features_to_metric(fake, real, prc_neighborhood=k, prc_batch_size=64,
                                       save_cpu_ram=save_cpu_ram, verbose=False)
            values.append([m["precision"], m["recall"]])
        assert values[0] == values[1], values
        out[f"precision_recall_k{k}"] = torch.tensor(values[0], dtype=torch.float64)
    return out


def images(seed, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1).contiguous()


def lpips_fixture():
    import lpips

    m = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False).eval()
    sd = {}
    for k, v in m.state_dict().items():
        if k.startswith("net.slice"):  # net.slice{s}.{i}.weight -> features.{i}.weight
            _, _, i, what = k.split(".")
            sd[k] = formula(f"features.{i}.{what}", tuple(v.shape))
        elif k.startswith("lin") and not k.startswith("lins."):
            sd[k] = formula(f"{k.split('.')[0]}.weight", tuple(v.shape))
        elif k.startswith("lins."):
            sd[k] = formula(f"lin{k.split('.')[1]}.weight", tuple(v.shape))
        else:
            sd[k] = v  # the scaling layer's constants
    m.load_state_dict(sd)
    x, y = images(2), images(3)
    with torch.no_grad():
        d = m(x, y).reshape(-1)
        d_self = m(x, x).reshape(-1)
    return {"x": x, "y": y, "distance": d.contiguous(), "self_distance": d_self.contiguous()}


def inception_fixture():
    import pytorch_fid.inception as fi

    # The architecture's state-dict layout (its real loader would download the weights): build
    # it once with loading disabled, then let pytorch-fid load the formula's values itself.
    real_url_loader, real_load = fi.load_state_dict_from_url, torch.nn.Module.load_state_dict
    fi.load_state_dict_from_url = lambda *a, **k: None
    torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None
    layout = fi.fid_inception_v3().state_dict()
    torch.nn.Module.load_state_dict = real_load
    weights = {
        k: (v if k.endswith("num_batches_tracked") else formula(k, tuple(v.shape)))
        for k, v in layout.items()
    }
    fi.load_state_dict_from_url = lambda *a, **k: weights
    block = fi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
    net = fi.InceptionV3([block], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    full = fi.fid_inception_v3().eval()
    fi.load_state_dict_from_url = real_url_loader
    x = images(4)
    with torch.no_grad():
        pool = net((x + 1) / 2)[0].flatten(1)
        logits = full.fc(pool)
    return {"x": x, "pool": pool.contiguous(), "logits": logits.contiguous()}


# frames, image size, patch, channels, hidden, layers, heads, MLP width
TIMESFORMER = (4, 16, 4, 3, 32, 2, 4, 48)


def timesformer_fixture():
    from transformers import TimesformerConfig, TimesformerModel

    t, size, patch, ch, hidden, layers, heads, mlp = TIMESFORMER
    config = TimesformerConfig(
        image_size=size, patch_size=patch, num_channels=ch, num_frames=t, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
        layer_norm_eps=1e-6, attention_type="divided_space_time",
    )
    m = TimesformerModel(config).eval()
    m.load_state_dict({k: formula(k, tuple(v.shape)) for k, v in m.state_dict().items()})
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(2, ch, t, size, size, generator=g) * 2 - 1).contiguous()
    with torch.no_grad():
        h = m(pixel_values=x.permute(0, 2, 1, 3, 4)).last_hidden_state
    return {"x": x, "config": torch.tensor(TIMESFORMER, dtype=torch.int64), "last_hidden_state": h.contiguous()}


# ch, ch_mult, ResNet blocks, attention resolution, resolution, z channels
TAMING = (32, (1, 2), 1, 8, 16, 4)


def taming_fixture():
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    ch, ch_mult, blocks, attn, size, z = TAMING
    kw = dict(ch=ch, out_ch=3, ch_mult=ch_mult, num_res_blocks=blocks, attn_resolutions=[attn],
              in_channels=3, resolution=size, z_channels=z, dropout=0.0)
    enc, dec = Encoder(double_z=False, **kw).eval(), Decoder(**kw).eval()
    for prefix, m in [("encoder", enc), ("decoder", dec)]:
        m.load_state_dict({k: formula(f"{prefix}.{k}", tuple(v.shape)) for k, v in m.state_dict().items()})
    x = images(6, size=size)
    with torch.no_grad():
        latents = enc(x)
        out = dec(latents)
    return {"x": x, "latents": latents.contiguous(), "reconstruction": out.contiguous()}


def layouts():
    import json

    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.discriminator.model import NLayerDiscriminator
    from transformers import TimesformerConfig, TimesformerModel

    def autoencoder(ch_mult, attn, z):
        kw = dict(ch=128, out_ch=3, ch_mult=ch_mult, num_res_blocks=2, attn_resolutions=attn,
                  in_channels=3, resolution=256, z_channels=z, dropout=0.0)
        return Encoder(double_z=False, **kw), Decoder(**kw)

    modules = {}
    for key, (ch_mult, attn, z) in {
        "taming_f16": ((1, 1, 2, 2, 4), [16], 256),
        "taming_f4": ((1, 2, 4), [], 3),
        "ldm_f8": ((1, 2, 2, 4), [32], 4),
    }.items():
        enc, dec = autoencoder(ch_mult, attn, z)
        modules[f"{key}_encoder"], modules[f"{key}_decoder"] = enc, dec
    modules["nlayer_discriminator_3"] = NLayerDiscriminator(3, 64, 3)
    modules["nlayer_discriminator_2"] = NLayerDiscriminator(3, 64, 2)
    for key, (size, patch) in {"timesformer_bair": (64, 2), "timesformer_ucf101": (128, 4)}.items():
        modules[key] = TimesformerModel(TimesformerConfig(
            image_size=size, patch_size=patch, num_channels=3, num_frames=16, hidden_size=256,
            num_hidden_layers=8, num_attention_heads=4, intermediate_size=768))
    out = {}
    for key, m in modules.items():
        out[key] = {
            "parameters": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "state_dict": {k: list(v.shape) for k, v in m.state_dict().items()
                           if not k.endswith("num_batches_tracked")},
        }
    path = os.path.join(OUT, "layouts.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"{path}: " + ", ".join(f"{k} {v['parameters']}" for k, v in out.items()), file=sys.stderr)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(2)
    only = sys.argv[1:]
    for name, make in [("frechet", frechet), ("prc", prc), ("lpips", lpips_fixture),
                       ("fid_inception", inception_fixture), ("timesformer", timesformer_fixture),
                       ("taming", taming_fixture)]:
        if only and name not in only:
            continue
        tensors = make()
        path = os.path.join(OUT, f"{name}.safetensors")
        save_file(tensors, path, metadata={"torch": torch.__version__, "script": "make_fixtures.py"})
        print(f"{path}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()), file=sys.stderr)
    if not only or "layouts" in only:
        layouts()


if __name__ == "__main__":
    main()
