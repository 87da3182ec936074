"""Writes PyTorch state-dict files (`torch.save`) for tests/converted.rs, in the layouts of the
public files `cargo xtask download-weights` converts; the Rust test gives the entries and the values.

    PYTHONPATH=.libtorch/site python3 write_pth.py SPEC.json

SPEC: {"blob": float32 little-endian values, "files": [{"path", "format": "legacy" | "zip",
"entries": [{"key", "shape", "values": "blob" (with "offset", in elements) | "expanded-zeros"
(the real shape, one stored element) | "counter" (an int64 scalar, BatchNorm's
num_batches_tracked)}]}]}. "legacy" is the pickle stream of PyTorch <= 1.5 (the format of
torchvision's VGG16 file and of the LPIPS heads), "zip" today's.
"""
import collections
import json
import math
import sys

import torch

spec = json.load(open(sys.argv[1]))
data = torch.frombuffer(bytearray(open(spec["blob"], "rb").read()), dtype=torch.float32)
for f in spec["files"]:
    sd = collections.OrderedDict()
    for e in f["entries"]:
        shape = e.get("shape", [])
        if e["values"] == "blob":
            n = math.prod(shape)
            sd[e["key"]] = data[e["offset"] : e["offset"] + n].clone().reshape(shape)
        elif e["values"] == "expanded-zeros":
            sd[e["key"]] = torch.zeros(1).expand(*shape)
        elif e["values"] == "counter":
            sd[e["key"]] = torch.tensor(0, dtype=torch.long)
        else:
            raise ValueError(e["values"])
    torch.save(sd, f["path"], _use_new_zipfile_serialization=f["format"] == "zip")
