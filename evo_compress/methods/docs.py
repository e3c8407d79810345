"""The methods reference (``docs/methods.md``), rendered from the registry.

``python -m evo_compress.methods.docs > docs/methods.md`` rewrites it; a test checks that
the committed file matches the registry.
"""

from __future__ import annotations

from evo_compress.methods import KINDS, METHODS, CompressionMethod

_HEADER = """\
# Compression methods

Generated from the method registry (`evo_compress/methods/`) by
`python -m evo_compress.methods.docs > docs/methods.md`; do not edit by hand.

The built-in search space takes its `quant.method` choices (in this order) and its
`quant.group_size` choices from this registry. A back end left blank cannot apply the
method: recipes with it are infeasible there, and the search space is narrowed to what the
configured back end supports.
"""


def _bits(m: CompressionMethod) -> str:
    return f"W{m.weight_bits}A{m.activation_bits}"


def _vllm(m: CompressionMethod) -> str:
    v = m.vllm
    if v is None:
        return ""
    if v.quantization is not None:
        text = f"`--quantization {v.quantization}`"
    elif v.scheme is not None:
        text = f"llm-compressor {v.scheme} ({v.algorithm})"
    else:
        text = "yes"
    if v.group_sizes is not None:
        text += f", groups of {', '.join(map(str, v.group_sizes))} only"
    return text


def _transformers(m: CompressionMethod) -> str:
    t = m.transformers
    if t is None:
        return ""
    text = t.library
    if t.min_compute_capability is not None:
        major, minor = t.min_compute_capability
        text += f", CUDA sm{major}{minor}+"
    return text


def render() -> str:
    """The whole of ``docs/methods.md``."""
    lines = [_HEADER]
    for kind in KINDS:
        lines += [
            f"## {kind.capitalize()}",
            "",
            "| Method | Bits | Group sizes | Calibration | transformers | vLLM | synthetic "
            "| What it does |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m in METHODS.methods(kind):
            cells = [
                f"`{m.name}`",
                _bits(m),
                ", ".join(map(str, m.group_sizes)),
                "yes" if m.calibration else "",
                _transformers(m),
                _vllm(m),
                "yes" if m.synthetic is not None else "",
                m.description,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "Bits: `WxAy` is x-bit stored weights and y-bit matmul inputs. Grouped methods store "
        "one scale per group of weights; `quant.group_size` picks the group."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
