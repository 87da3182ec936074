"""The PyTorch twin of a vq-train prior: LlamaGen's GPT (autoregressive/models/gpt.py) written with
torch ops in the shapes of a prior configuration as `examples/prior_bench.rs` writes it
(`prior.json`: the prior and its training), trained on random codes and timed, then sampled with a
key/value cache and timed. `cargo xtask bench-train --prior PRESET` runs it beside vq-train's side
and prints the ratios.

The network: a class (or start) token then the codes in raster order; pre-norm blocks of RMSNorm
(eps 1e-5, in float32), a fused bias-free wqkv, 2-D rotary positions as LlamaGen's
`precompute_freqs_cis_2d` (zero rows for the condition token), attention through
`F.scaled_dot_product_attention`, SwiGLU with find_multiple(8d/3, 256) hidden units, the
configuration's dropout on the tokens and after each residual branch (LlamaGen's tok_dropout,
resid_dropout, ffn_dropout); weights
normal(0, 0.02), the output head zero (LlamaGen's `_init_weights` and its zeroed `output`). Training:
next-code cross-entropy with 10% label dropout to the null class, torch.optim.AdamW with the run's
betas and weight decay, linear warm-up + cosine learning rate, global gradient-norm clip. Sampling:
temperature 1 without filters, one batch of grids (classes cycled), preallocated key/value caches.

Usage: python torch_prior_twin.py PRIOR.json --steps N --warmup W --batch-size B --samples S
       [--data N] [--device cpu|cuda] [--threads T] [--seed S]
       python torch_prior_twin.py PRIOR.json --describe
Prints one JSON line: parameters, steps/s, tokens/s of the sampler, peak memory, last loss; with
--describe the trainable parameters' names (LlamaGen's, as vq-prior's) and shapes."""

import argparse
import json
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch
import torch.nn as nn
import torch.nn.functional as F

# The schedule, peak memory and error exit of the autoencoder's twin beside this file.
from torch_twin import fail, learning_rate, peak_memory


def find_multiple(n, k):
    return n if n % k == 0 else n + k - n % k


def rope_2d(h, w, head_dim, prefix, base=10000.0):
    """(prefix + h*w, head_dim/2, 2) of (cos, sin): first half of the pairs by row, second by
    column; condition rows zero (LlamaGen's precompute_freqs_cis_2d)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].double() / half))
    rows = torch.arange(h).double()[:, None].expand(h, w).reshape(-1)
    cols = torch.arange(w).double()[None, :].expand(h, w).reshape(-1)
    angles = torch.cat([rows[:, None] * freqs[None], cols[:, None] * freqs[None]], dim=1)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).float()
    return torch.cat([torch.zeros(prefix, half, 2), table], dim=0)


def rotate(x, table):
    b, s, hh, hd = x.shape
    xs = x.float().reshape(b, s, hh, hd // 2, 2)
    t = table.view(1, s, 1, hd // 2, 2)
    x0, x1 = xs[..., 0], xs[..., 1]
    cos, sin = t[..., 0], t[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, d, heads, dropout):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, table, cache=None, start=0):
        b, s, d = x.shape
        q, k, v = self.wqkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, self.head_dim) for t in (q, k, v))
        q, k = rotate(q, table), rotate(k, table)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        causal = True
        if cache is not None:
            keys, values = cache
            keys[:, :, start:start + s] = k
            values[:, :, start:start + s] = v
            k, v = keys[:, :, :start + s], values[:, :, :start + s]
            causal = s > 1
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.resid_dropout(self.wo(o.transpose(1, 2).contiguous().view(b, s, d)))


class FeedForward(nn.Module):
    def __init__(self, d, hidden, dropout):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """LlamaGen's TransformerBlock, with its module names."""

    def __init__(self, d, heads, hidden, dropout):
        super().__init__()
        self.attention_norm = RMSNorm(d)
        self.attention = Attention(d, heads, dropout)
        self.ffn_norm = RMSNorm(d)
        self.feed_forward = FeedForward(d, hidden, dropout)

    def forward(self, x, table, cache=None, start=0):
        x = x + self.attention(self.attention_norm(x), table, cache, start)
        return x + self.feed_forward(self.ffn_norm(x))


class Gpt(nn.Module):
    def __init__(self, c):
        super().__init__()
        if c["kind"] != "autoregressive" or c["style"] != "llama":
            fail(f"the twin rebuilds LlamaGen's autoregressive GPT; got kind {c['kind']}, style {c['style']}")
        d, self.k = c["width"], c["codebook_size"]
        self.grid = (c["grid_h"], c["grid_w"])
        cond = c["conditioning"]
        if isinstance(cond, dict) and "classes" in cond:
            self.classes = cond["classes"]["classes"]
            self.label_dropout = cond["classes"]["dropout"]
            rows = self.classes + (1 if self.label_dropout > 0 else 0)
        elif cond == "unconditional":
            self.classes, self.label_dropout, rows = 0, 0.0, 1
        else:
            fail(f"conditioning {cond!r} is not LlamaGen's")
        self.cls_embedding = nn.Module()
        self.cls_embedding.embedding_table = nn.Embedding(rows, d)
        self.tok_embeddings = nn.Embedding(self.k, d)
        hidden = find_multiple(2 * 4 * d // 3, 256)
        self.tok_dropout = nn.Dropout(c.get("dropout", 0.0))
        self.layers = nn.ModuleList(Block(d, c["heads"], hidden, c.get("dropout", 0.0)) for _ in range(c["layers"]))
        self.norm = RMSNorm(d)
        self.output = nn.Linear(d, self.k, bias=False)
        self.register_buffer("rope", rope_2d(*self.grid, d // c["heads"], 1), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def condition(self, labels, b, device):
        table = self.cls_embedding.embedding_table
        if self.classes:
            return table(labels).unsqueeze(1)
        return table(torch.zeros(b, dtype=torch.long, device=device)).unsqueeze(1)

    def run(self, x, start, caches=None):
        s = x.shape[1]
        table = self.rope[start:start + s]
        for i, block in enumerate(self.layers):
            x = block(x, table, None if caches is None else caches[i], start)
        return self.output(self.norm(x)).float()

    def loss(self, codes, labels):
        b = codes.shape[0]
        if self.classes and self.label_dropout > 0:
            drop = torch.rand(b, device=codes.device) < self.label_dropout
            labels = labels.masked_fill(drop, self.classes)
        x = torch.cat([self.condition(labels, b, codes.device), self.tok_embeddings(codes[:, :-1])], 1)
        logits = self.run(self.tok_dropout(x), 0)
        return F.cross_entropy(logits.reshape(-1, self.k), codes.reshape(-1))

    @torch.inference_mode()
    def sample(self, labels, n, device):
        length = self.grid[0] * self.grid[1]
        d = self.tok_embeddings.weight.shape[1]
        heads = self.layers[0].attention.heads
        shape = (n, heads, length, d // heads)
        caches = [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in self.layers]
        x = self.condition(labels, n, device)
        out = []
        for i in range(length):
            logits = self.run(x, i, caches)[:, -1]
            code = torch.multinomial(F.softmax(logits, dim=-1), 1)
            out.append(code)
            x = self.tok_embeddings(code)
        return torch.cat(out, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--data", type=int, default=0, help="random grids to draw from (default 16 batches)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--describe", action="store_true",
                   help="print the trainable parameters' names and shapes and train nothing")
    a = p.parse_args()
    with open(a.config) as f:
        cfg = json.load(f)
    c, t = cfg["prior"], cfg["training"]
    # vq-train's prior schedule: cosine decay over the steps after the warm-up.
    schedule = {**t, "decay_steps": t["steps"] - t["warmup_steps"]}
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    model = Gpt(c).to(device).train()
    params = [q for q in model.parameters() if q.requires_grad]
    if a.describe:
        print(json.dumps({n: list(q.shape) for n, q in model.named_parameters() if q.requires_grad}))
        return
    opt = torch.optim.AdamW(params, lr=t["learning_rate"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])
    n = a.data or 16 * a.batch_size
    length = c["grid_h"] * c["grid_w"]
    data = torch.randint(0, c["codebook_size"], (n, length))
    labels = torch.randint(0, max(model.classes, 1), (n,))

    def step(i):
        for g in opt.param_groups:
            g["lr"] = learning_rate(i, schedule)
        opt.zero_grad(set_to_none=True)
        idx = torch.randint(0, n, (a.batch_size,))
        loss = model.loss(data[idx].to(device), labels[idx].to(device))
        loss.backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
        opt.step()
        return loss.detach()

    for i in range(a.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.steps):
        loss = step(i)
    loss = float(loss)
    elapsed = time.perf_counter() - start
    model.eval()
    y = torch.arange(a.samples, device=device) % max(model.classes, 1)
    model.sample(y[:2], 2, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    s0 = time.perf_counter()
    codes = model.sample(y, a.samples, device)
    codes = codes.cpu()
    sampled = time.perf_counter() - s0
    print(json.dumps({
        "parameters": sum(q.numel() for q in params),
        "steps_per_s": a.steps / elapsed,
        "tokens_per_s": a.samples * length / sampled,
        "peak_memory_bytes": peak_memory(device),
        "loss": loss,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
