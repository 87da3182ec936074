"""Writes crates/vq-core/tests/fixtures/successors.safetensors: forward values and gradients of the
published implementations of the quantizers that followed the rotation trick, for
tests/successors.rs to compare vq-core's formulas with.

- lucidrains' vector-quantize-pytorch 1.32.0 (PyPI; requirements.txt): DiVeQ as
  `directional_reparam` (the function VectorQuantize(directional_reparam=True) calls), LFQ and
  BSQ (`LFQ(spherical=True)`), in training mode with their entropy penalty and commitment term;
- the official DiVeQ code (AaltoML/DiVeQ, not on PyPI: a checkout at 9b288d0, given as DIVEQ):
  `DIVEQ`, `DIVEQDetach` and `SFDIVEQ` from vqvae_compression/ (SF-DiVeQ with skip_iters=0, so
  that it quantizes from the first call);
- IBQ from its official code (TencentARC/SEED-Voken, not on PyPI: a checkout at b9a17ea, given as
  SEED_VOKEN): `IndexPropagationQuantize` of src/IBQ/modules/vqvae/quantize.py, alone and with its
  entropy penalty (`compute_entropy_loss`) weighted as its training config weighs it;
- SCQ: no implementation is published as a package or with the paper; its scalable relaxation
  (arXiv:2310.03004, §3.2) is written below in PyTorch (torch.linalg.solve and a sort-based
  simplex projection), so that autograd, not a hand-derived backward, gives its gradients.

The random draws of each call (noise, dithers) are replayed from the same seed and stored, so the
tests feed vq-core the same ones. Every case stores its inputs, the upstream gradient `w` of
`L = Σ w ⊙ out (+ the method's loss)`, the outputs and the gradients.

    pip install --no-deps --target /tmp/refpy -r crates/vq-core/tests/reference/requirements.txt
    git clone https://github.com/AaltoML/DiVeQ /tmp/DiVeQ && git -C /tmp/DiVeQ checkout 9b288d0
    git clone https://github.com/TencentARC/SEED-Voken /tmp/SEED-Voken && git -C /tmp/SEED-Voken checkout b9a17ea
    DIVEQ=/tmp/DiVeQ SEED_VOKEN=/tmp/SEED-Voken PYTHONPATH=/tmp/refpy:.libtorch/site \\
        python3 crates/vq-core/tests/reference/make_fixtures.py
"""
import math
import os
import sys

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "successors.safetensors")
N, D, K = 40, 6, 12


def checkout(var, what):
    root = os.environ.get(var)
    if not root:
        sys.exit(f"set {var} to a checkout of {what}")
    return root


def inputs(seed, n=N, d=D, k=K):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    c = torch.randn(k, d, generator=g) * 0.8
    w = torch.randn(n, d, generator=g)
    return z, c, w


def nearest(z, c):
    return torch.cdist(z.double(), c.double()).argmin(1)


def lucidrains_diveq(out):
    from vector_quantize_pytorch.vector_quantize_pytorch import directional_reparam

    z, c, w = inputs(1)
    z.requires_grad_(True)
    c.requires_grad_(True)
    q = c[nearest(z.detach(), c.detach())]
    var = 5e-3
    torch.manual_seed(11)
    y = directional_reparam(z, q, var)
    torch.manual_seed(11)
    noise = torch.randn_like(z) * math.sqrt(var)
    (y * w).sum().backward()
    out.update({"lucidrains-diveq:z": z.detach(), "lucidrains-diveq:codebook": c.detach(),
                "lucidrains-diveq:w": w, "lucidrains-diveq:noise": noise,
                "lucidrains-diveq:out": y.detach(), "lucidrains-diveq:grad_z": z.grad,
                "lucidrains-diveq:grad_codebook": c.grad})


def official_diveq(out):
    sys.path.insert(0, os.path.join(checkout("DIVEQ", "AaltoML/DiVeQ at 9b288d0"), "vqvae_compression"))
    from diveq import DIVEQ
    from diveq_detach import DIVEQDetach
    from sf_diveq import SFDIVEQ
    from torch.distributions import normal

    for name, cls in [("official-diveq", DIVEQ), ("official-diveq-detach", DIVEQDetach)]:
        z, c, w = inputs(2)
        kw = dict(noise_var=1e-3) if cls is DIVEQ else {}
        m = cls(K, D, replacement_iters=100, allow_warning=False, verbose=False, **kw)
        with torch.no_grad():
            m.codebook.copy_(c)
        z.requires_grad_(True)
        torch.manual_seed(12)
        y, idx, _ = m(z)
        torch.manual_seed(12)
        noise = normal.Normal(0, 1e-3).sample(z.shape) if cls is DIVEQ else torch.zeros_like(z)
        (y * w).sum().backward()
        out.update({f"{name}:z": z.detach(), f"{name}:codebook": c, f"{name}:w": w,
                    f"{name}:noise": noise, f"{name}:out": y.detach(), f"{name}:indices": idx,
                    f"{name}:grad_z": z.grad, f"{name}:grad_codebook": m.codebook.grad})

    z, c, w = inputs(3)
    m = SFDIVEQ(K, D, noise_var=1e-3, skip_iters=0, avg_iters=0, allow_warning=False)
    with torch.no_grad():
        m.codebook.copy_(c)
    z.requires_grad_(True)
    torch.manual_seed(13)
    y, idx, _ = m(z)
    torch.manual_seed(13)
    dither = torch.rand((K - 1, 1))
    n1 = normal.Normal(0, 1e-3).sample(z.shape)
    n2 = normal.Normal(0, 1e-3).sample(z.shape)
    (y * w).sum().backward()
    out.update({"official-sf-diveq:z": z.detach(), "official-sf-diveq:codebook": c,
                "official-sf-diveq:w": w, "official-sf-diveq:dither": dither.view(-1),
                "official-sf-diveq:noise1": n1, "official-sf-diveq:noise2": n2,
                "official-sf-diveq:out": y.detach(), "official-sf-diveq:indices": idx,
                "official-sf-diveq:grad_z": z.grad, "official-sf-diveq:grad_codebook": m.codebook.grad})


def lucidrains_lfq(out):
    from vector_quantize_pytorch import LFQ

    bits = 4
    for name, spherical in [("lfq", False), ("bsq", True)]:
        for tau in [100.0, 2.0]:
            key = f"lucidrains-{name}-tau{int(tau)}"
            g = torch.Generator().manual_seed(4)
            x = torch.randn(1, 30, bits, generator=g)
            w = torch.randn(1, 30, bits, generator=g)
            m = LFQ(dim=bits, codebook_size=2 ** bits, entropy_loss_weight=0.1,
                    commitment_loss_weight=0.25, diversity_gamma=0.9, spherical=spherical)
            m.train()
            x.requires_grad_(True)
            (y, idx, aux), (per_sample, codebook, commit) = m(x, inv_temperature=tau,
                                                               return_loss_breakdown=True)
            ((y * w).sum() + aux).backward()
            out.update({f"{key}:x": x.detach()[0], f"{key}:w": w[0], f"{key}:out": y.detach()[0],
                        f"{key}:indices": idx[0], f"{key}:aux": aux.detach().view(1).double(),
                        f"{key}:per_sample": per_sample.detach().view(1).double(),
                        f"{key}:codebook_entropy": codebook.detach().view(1).double(),
                        f"{key}:commitment": commit.detach().view(1).double(),
                        f"{key}:grad_x": x.grad[0]})


def official_ibq(out):
    sys.path.insert(0, os.path.join(checkout("SEED_VOKEN", "TencentARC/SEED-Voken at b9a17ea"),
                                    "src", "IBQ", "modules", "vqvae"))
    from quantize import IndexPropagationQuantize

    # The quantizer's own loss, then its entropy penalty as imagenet_ibqgan_1024.yaml trains it
    # (temperature 0.01) and at a soft temperature, each weighted as VQLPIPSWithDiscriminator does
    # (quant_loss_weight 1, entropy_loss_weight 0.05).
    for key, entropy, temperature in [("seed-voken-ibq", False, 0.01),
                                      ("seed-voken-ibq-entropy", True, 0.01),
                                      ("seed-voken-ibq-entropy-soft", True, 0.5)]:
        z, c, w = inputs(5, n=32)
        m = IndexPropagationQuantize(K, D, beta=0.25, use_entropy_loss=entropy,
                                     entropy_temperature=temperature)
        with torch.no_grad():
            m.embedding.weight.copy_(c)
        # (b, d, h, w) = (2, D, 4, 4) from the rows in (b, h, w) order.
        zi = z.view(2, 4, 4, D).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        wi = w.view(2, 4, 4, D).permute(0, 3, 1, 2)
        zq, diff, (_, _, idx) = m(zi)
        if entropy:
            quant, sample, average, penalty = diff
            loss = quant + 0.05 * penalty
            out.update({f"{key}:sample": sample.detach().view(1).double(),
                        f"{key}:average": average.detach().view(1).double(),
                        f"{key}:temperature": torch.tensor([temperature], dtype=torch.float64)})
        else:
            loss = diff
        ((zq * wi).sum() + loss).backward()
        rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, D)
        out.update({f"{key}:z": z, f"{key}:codebook": c, f"{key}:w": w,
                    f"{key}:out": rows(zq.detach()), f"{key}:indices": idx.view(-1),
                    f"{key}:loss": loss.detach().view(1).double(), f"{key}:grad_z": rows(zi.grad),
                    f"{key}:grad_codebook": m.embedding.weight.grad})


def simplex(v):
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ks = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    cond = (u - css / ks) > 0
    rho = cond.sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


def scq(out):
    z, c, w = inputs(6)
    z, c, w = z.double(), c.double(), w.double()
    lam = 0.7
    z.requires_grad_(True)
    c.requires_grad_(True)
    p_vq = torch.nn.functional.one_hot(nearest(z.detach(), c.detach()), K).double()
    a = c @ c.T + lam * torch.eye(K, dtype=torch.float64)
    ridge = torch.linalg.solve(a, (z @ c.T + lam * p_vq).T).T
    p = simplex(ridge)
    y = p @ c
    (y * w).sum().backward()
    out.update({"scq:z": z.detach().float(), "scq:codebook": c.detach().float(), "scq:w": w.float(),
                "scq:lambda": torch.tensor([lam], dtype=torch.float64), "scq:weights": p.detach(),
                "scq:out": y.detach(), "scq:grad_z": z.grad, "scq:grad_codebook": c.grad})


def main():
    out = {}
    lucidrains_diveq(out)
    official_diveq(out)
    lucidrains_lfq(out)
    official_ibq(out)
    scq(out)
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, OUT)
    print(f"wrote {len(out)} tensors to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
