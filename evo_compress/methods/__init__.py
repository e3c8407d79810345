"""The registry of compression methods: one typed entry per method (bits, calibration need,
group sizes, what each back end supports), read by the search space, the back ends, the
synthetic landscape, the expert mutation and the docs.

To add a method: append its entry to ``quantization.py``, naming its transformers kernel
(``"module:attr"``) and what vLLM does with it (``VllmSupport``); write the kernel and its
test, and regenerate ``docs/methods.md``. A plugin distribution adds one through the
``evo_compress.methods`` entry-point group (``docs/plugins.md``).
"""

from __future__ import annotations

from evo_compress.methods._base import (
    BACKENDS,
    CPU_ISAS,
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

ENTRY_POINT_GROUP = "evo_compress.methods"
METHODS = MethodRegistry(ENTRY_POINT_GROUP)
for _method in _QUANTIZATION:
    METHODS.register(_method)


def get_method(name: str, kind: Kind | None = None) -> CompressionMethod:
    """The registered method ``name`` (``METHODS.get``).

    Args:
        name: The method's name.
        kind: Only a method of this kind; None: any.

    Returns:
        The method.

    Raises:
        RegistryError: No method of that name (and kind) is registered ("did you mean" and
            the known names), or the plugin method of that name failed to load.
    """
    return METHODS.get(name, kind)


__all__ = [
    "BACKENDS",
    "CPU_ISAS",
    "ENTRY_POINT_GROUP",
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
