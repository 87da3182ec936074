"""Writes checkpoints with the real PyTorch Lightning trainer, as taming-transformers (Lightning
1.0.8) and latent-diffusion (1.4.2) wrote their public VQGAN files, for vq-train's tests.

    PYTHONPATH=LIGHTNING_SITE:.libtorch/site python3 \
        crates/vq-train/tests/reference/make_lightning_checkpoints.py

with LIGHTNING_SITE a folder holding one Lightning version and what it imports, e.g. for 1.0.8
    pip install --no-deps --target LIGHTNING_SITE pytorch-lightning==1.0.8 "numpy<2" tqdm \
        fsspec pyyaml future tensorboard protobuf packaging six absl-py
and for 1.4.2 the same with pytorch-lightning==1.4.2 torchmetrics==0.4.1 pyDeprecate==0.3.1
tqdm==4.62.0 typing-extensions. Run once per version.

The model is the taming-transformers VQGAN of `tests/fixtures/lightning/run.json`, built by
`examples/torch_twin.py` (PyTorch's own initialisation) and trained for two steps by
`Trainer.fit` with Adam; its state dict carries taming's names (`quantize.embedding.weight`, the
discriminator under `loss.discriminator.`, a perceptual-loss buffer). Lightning < 1.5 keys the
checkpoint's `callbacks` dict by the callback's class, and `save_hyperparameters` pickles the
model's arguments as an `AttributeDict` holding nested configuration dicts, as the references'
files do. The `ModelCheckpoint` callback's `last.ckpt` is kept as
`lightning-<version>.ckpt`, with `lightning-<version>.json`: vq-train's name of each tensor ->
[sum, sum of (index + 1) * value] of the trained weights.

Also writes, with torch only, `keys.pt`: tensors under dict keys of every hashable type Python
pickles, beside str keys with the same text (`None` and `'None'`, `1` and `'1'`); and
`extras.pt`: a state dict beside values no reader of weights needs and vq-train's reader cannot
represent — a sparse tensor, a complex one, an object whose attributes hold a tensor.
"""
import json
import os
import shutil
import sys
import tempfile

import pytorch_lightning as pl
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "examples"))
import torch_twin  # noqa: E402

FIXTURES = os.path.join(HERE, "..", "fixtures", "lightning")


class VQModel(pl.LightningModule):
    """taming-transformers' VQModel as far as a checkpoint shows it: its submodules under their
    names, its constructor arguments as hyperparameters."""

    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, cfg=None):
        super().__init__()
        self.save_hyperparameters("ddconfig", "lossconfig", "n_embed", "embed_dim")
        self.cfg = cfg
        self.model = torch_twin.VqAutoencoder(cfg["model"])
        self.disc = torch_twin.vqgan_parts(cfg, torch.device("cpu"))[1]

    def training_step(self, batch, batch_idx):
        # A real step through the weights: every parameter moves and Adam keeps state for it.
        params = list(self.model.parameters()) + list(self.disc.parameters())
        return sum((p - 0.1).pow(2).mean() for p in params) + 0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, betas=(0.5, 0.9))

    def state_dict(self, *args, **kwargs):
        return torch_twin.reference_state_dict(self.cfg, self.model, self.disc)


def odd_keys():
    """A dict keyed by every hashable type, each key's value a distinct one-element tensor."""
    keys = ["None", None, False, 1, "1", 1.5, (1, "a"), b"k\x00", pl.callbacks.ModelCheckpoint,
            frozenset({3})]
    extra = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    torch.save({"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "extra": extra},
               os.path.join(FIXTURES, "keys.pt"))


class Holder:
    """A user object whose attributes hold a tensor (pickled by reference to this module)."""

    def __init__(self):
        self.scale = torch.ones(2)


def extras():
    """A checkpoint whose state dict is plain but whose other entries are not."""
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (3,))
    torch.save({"state_dict": {"w": torch.arange(6.0).view(2, 3)},
                "callbacks": {pl.callbacks.ModelCheckpoint: {"sparse": sparse,
                                                             "complex": torch.zeros(2, dtype=torch.complex64)}},
                "hyper_parameters": {"holder": Holder()}},
               os.path.join(FIXTURES, "extras.pt"))


def main():
    odd_keys()
    extras()
    with open(os.path.join(FIXTURES, "run.json")) as f:
        cfg = json.load(f)
    torch.manual_seed(0)
    a = cfg["model"]["autoencoder"]
    model = VQModel(ddconfig={k: a[k] for k in ("ch", "ch_mult", "num_res_blocks", "resolution")},
                    lossconfig={"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                "params": {"disc_start": 0, "disc_weight": 0.75}},
                    n_embed=cfg["model"]["quantizer"]["codebook_size"],
                    embed_dim=cfg["model"]["quantizer"]["codebook_dim"], cfg=cfg)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=2)
    out = tempfile.mkdtemp()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True)
    pl.Trainer(max_steps=2, callbacks=[checkpoint], logger=False, weights_summary=None,
               progress_bar_refresh_rate=0).fit(model, data)
    name = f"lightning-{pl.__version__}"
    shutil.copyfile(os.path.join(out, "last.ckpt"), os.path.join(FIXTURES, name + ".ckpt"))
    shutil.rmtree(out)
    with open(os.path.join(FIXTURES, name + ".json"), "w") as f:
        json.dump(torch_twin.checksums(model.model, model.disc), f, indent=0, sort_keys=True)
    saved = torch.load(os.path.join(FIXTURES, name + ".ckpt"), weights_only=False)
    print(name, sorted(saved), {str(k): v for k, v in saved["callbacks"].items()})


if __name__ == "__main__":
    main()
