"""Writes crates/vq-prior/tests/fixtures/references.safetensors with the reference priors themselves:
LlamaGen's GPT (FoundationVision/LlamaGen, autoregressive/models/gpt.py, not on PyPI: a checkout at
commit ce98ec4, given as LLAMAGEN) and taming-transformers' minGPT (taming/modules/transformer/
mingpt.py, from the PyPI package in requirements.txt); torch 2.13.0 as `cargo xtask setup` installs.

    git clone https://github.com/FoundationVision/LlamaGen /tmp/LlamaGen && git -C /tmp/LlamaGen checkout ce98ec4
    pip install --no-deps --target /tmp/refpy -r crates/vq-prior/tests/reference/requirements.txt
    LLAMAGEN=/tmp/LlamaGen PYTHONPATH=/tmp/refpy:.libtorch/site python3 crates/vq-prior/tests/reference/make_fixtures.py

For each reference, a small model (every parameter redrawn normal(0, 0.1) so that norms, biases,
positions and the zero-initialised heads all matter), its state dict under `<ref>.` , codes
`<ref>:codes` and labels `<ref>:labels`, and its teacher-forced logits `<ref>:logits`:

- llamagen: `Transformer(ModelArgs(dim=32, n_layer=2, n_head=4, vocab_size=48, num_classes=5,
  block_size=16, class_dropout_prob=0.1, dropouts 0))` in training mode with the label dropout
  switched off, `model(idx=codes[:, :-1], cond_idx=labels)` — the class token (with its zero rotary
  row), then the codes of a 4×4 grid;
- taming: `GPT(vocab_size=48, block_size=16, n_layer=2, n_head=4, n_embd=32)` on
  `cat([sos], codes)[:, :-1]` with start code 3 (Net2NetTransformer's unconditional SOS token).

And the parameter counts of the full-size references, built: `count:llamagen-gpt-b` / `-gpt-l`
(GPT_B / GPT_L with vocab_size 16384, block_size 256, 1000 classes) and `count:taming-16x16`
(GPT(1024, 512, n_layer=24, n_head=16, n_embd=1024), as configs/faceshq_transformer.yaml).
"""
import os
import sys

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "references.safetensors")


def redraw(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def count(model):
    return torch.tensor(sum(p.numel() for p in model.parameters()), dtype=torch.int64)


def llamagen():
    root = os.environ.get("LLAMAGEN")
    if not root:
        sys.exit("set LLAMAGEN to a checkout of FoundationVision/LlamaGen at ce98ec4")
    sys.path.insert(0, root)
    from autoregressive.models.gpt import GPT_B, GPT_L, ModelArgs, Transformer

    out = {
        "count:llamagen-gpt-b": count(GPT_B(vocab_size=16384, block_size=256, num_classes=1000)),
        "count:llamagen-gpt-l": count(GPT_L(vocab_size=16384, block_size=256, num_classes=1000)),
    }
    args = ModelArgs(dim=32, n_layer=2, n_head=4, vocab_size=48, num_classes=5, block_size=16,
                     class_dropout_prob=0.1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    model = Transformer(args)
    redraw(model, 1)
    model.train()
    model.cls_embedding.dropout_prob = 0.0  # the table keeps its null-class row
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 48, (3, 16), generator=g)
    labels = torch.tensor([0, 4, 5])  # 5: the null class of guidance
    with torch.no_grad():
        logits, _ = model(idx=codes[:, :-1], cond_idx=labels)
    out.update({f"llamagen.{k}": v.contiguous() for k, v in model.state_dict().items()})
    out.update({"llamagen:codes": codes, "llamagen:labels": labels, "llamagen:logits": logits})
    return out


def taming():
    # mingpt.py imports transformers' top_k_top_p_filtering (gone from transformers since 4.39)
    # for its sampling helper only, which is not called here: a stand-in module satisfies it.
    import types
    if "transformers" not in sys.modules:
        stand_in = types.ModuleType("transformers")
        stand_in.top_k_top_p_filtering = None
        sys.modules["transformers"] = stand_in
    from taming.modules.transformer.mingpt import GPT

    out = {"count:taming-16x16": count(GPT(1024, 512, n_layer=24, n_head=16, n_embd=1024))}
    model = GPT(48, 16, n_layer=2, n_head=4, n_embd=32).eval()
    redraw(model, 3)
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 48, (3, 16), generator=g)
    sos = torch.full((3, 1), 3)
    with torch.no_grad():
        logits, _ = model(torch.cat([sos, codes], 1)[:, :-1])
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("attn.mask")}
    out.update({f"taming.{k}": v.contiguous() for k, v in state.items()})
    out.update({"taming:codes": codes, "taming:logits": logits})
    return out


def main():
    torch.set_num_threads(2)
    tensors = {**llamagen(), **taming()}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"torch": torch.__version__, "script": "make_fixtures.py",
                                      "llamagen": "ce98ec4"})
    print(f"{OUT}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items() if ":" in k), file=sys.stderr)


if __name__ == "__main__":
    main()
