"""The registry of compression methods: one typed entry per method (bits, calibration need,
group sizes, what each back end supports), read by the search space, the back ends, the
synthetic landscape, the expert mutation and the docs.

To add a method: register its entry in ``quantization.py`` and write its kernels in the back
ends that run it (``fitness/model/quantize.py``, ``fitness/vllm/compile.py``).
"""

from __future__ import annotations

from evo_compress.methods._base import (
    BACKENDS,
    KINDS,
    VLLM_SCHEMES,
    CompressionMethod,
    Kind,
    MethodRegistry,
    SyntheticTraits,
    TransformersSupport,
    VllmSupport,
)
from evo_compress.methods.quantization import BUILTIN as _QUANTIZATION

METHODS = MethodRegistry()
for _method in _QUANTIZATION:
    METHODS.register(_method)


def get_method(name: str, kind: Kind | None = None) -> CompressionMethod:
    """The registered method ``name``; unknown names raise with "did you mean"."""
    return METHODS.get(name, kind)


__all__ = [
    "BACKENDS",
    "KINDS",
    "METHODS",
    "VLLM_SCHEMES",
    "CompressionMethod",
    "Kind",
    "MethodRegistry",
    "SyntheticTraits",
    "TransformersSupport",
    "VllmSupport",
    "get_method",
]
