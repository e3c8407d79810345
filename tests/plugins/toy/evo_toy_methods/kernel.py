"""The transformers kernel of ``toy_int4``: each linear layer's weight becomes int4 values
(held one per int8) and one fp32 scale per group of input columns, max|w| / 7; the layer
dequantizes them at each forward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ToyInt4Linear(nn.Linear):
    """A linear layer whose weight is stored as int4 values and per-group scales (buffers)."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        self.compute_dtype = linear.weight.dtype
        w = linear.weight.detach().float()
        groups = w.reshape(self.out_features, -1, group_size)
        scales = groups.abs().amax(dim=-1).clamp(min=1e-8) / 7
        values = torch.clamp(torch.round(groups / scales[..., None]), -8, 7).to(torch.int8)
        self.register_buffer("qweight", values.reshape(self.out_features, self.in_features))
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        groups = self.qweight.reshape(self.out_features, -1, self.group_size).float()
        w = (groups * self.scales[..., None]).reshape(self.out_features, self.in_features)
        return w.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def quantize(job: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Replace ``job.targets`` of ``job.model`` by ``ToyInt4Linear`` layers, in place."""
    modules = dict(job.model.named_modules())
    for name in sorted(job.targets):
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else job.model
        setattr(parent, child, ToyInt4Linear(modules[name], job.group_size))
    return job.model, {
        "library": "evo-toy-plugin 0.1.0",
        "algorithm": "symmetric int4 rtn (evo-toy-plugin)",
        "bits": 4,
        "group_size": job.group_size,
        "storage": "int4 values held one per int8, one fp32 scale per group",
    }


def probe(layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    quantized = ToyInt4Linear(layer, 64)
    return quantized(x), x @ quantized.weight.t()
