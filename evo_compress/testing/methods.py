"""The contract every compression method passes on every back end that claims it, built in or
from a plugin (PEFT's per-method test matrix; Optuna's ``testing/pytest_samplers.py``)::

    import pytest
    from evo_compress.testing.methods import check_method, method_cases

    @pytest.mark.parametrize(("method", "backend"), method_cases(["my_int3"]))
    def test_my_method(method, backend, tmp_path):
        skipped = check_method(method, backend, tmp_path)
        if skipped:
            pytest.skip(skipped)

- transformers: the kernel applies to a tiny random Llama on the CPU (unless
  ``quantization_unsupported`` says why not: then the check is skipped with that reason);
  the record names ``library``, ``algorithm`` and ``bits``; the quantized layers take about
  as many bits per weight as the method stores (at least its bits, at most int8's plus
  scales when it stores values unpacked in int8); the outputs are finite and near the
  original model's.
- vllm: for vLLM releases and GPUs of each kind and vLLM's CPU build, the compiled recipe
  is either refused with a reason naming the gene, or served exactly as the entry says (an
  online ``--quantization``, an llm-compressor step of its scheme and algorithm, or
  nothing); the CPU build serves it exactly on the instruction sets the entry lists.
- synthetic: evaluates with five finite objectives, a quantized method taking less memory
  than the unquantized model.

Needs torch and transformers for the transformers checks.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evo_compress.methods import METHODS, CompressionMethod

__all__ = ["check_method", "method_cases"]


def method_cases(names: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """The cases for ``check_method``: one per method and back end it claims.

    Args:
        names: The methods to check, by name; None: every registered method (built-ins and
            installed plugins).

    Returns:
        ``(method name, back end)`` pairs, for ``pytest.mark.parametrize``.

    Raises:
        RegistryError: A name is not a registered method, or names a plugin that failed to
            load.
    """
    methods = [METHODS.get(n) for n in names] if names is not None else list(METHODS)
    return [(m.name, backend) for m in methods for backend in m.backends]


def check_method(
    method: CompressionMethod | str, backend: str, workdir: Path | None = None
) -> str | None:
    """Check ``method`` on ``backend`` against the contract the module describes.

    Args:
        method: The method entry, or the name of a registered one.
        backend: One of the back ends the method claims (``transformers``, ``vllm``,
            ``synthetic``).
        workdir: Scratch directory for the transformers check; None: a temporary one.

    Returns:
        None when it passed; else why it cannot be checked here (skip with it), such as a
        kernel that does not run on the CPU.

    Raises:
        AssertionError: The contract is broken (the message names what broke), or the
            method does not claim ``backend``.
        RegistryError: ``method`` names no registered method.
        ImportError: torch or transformers is missing, for the transformers check.
    """
    entry = METHODS.get(method) if isinstance(method, str) else method
    assert backend in entry.backends, f"`{entry.name}` does not claim back end `{backend}`"
    if backend == "transformers":
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="evo-method-") as tmp:
                return _check_transformers(entry, Path(tmp))
        return _check_transformers(entry, workdir)
    if backend == "vllm":
        return _check_vllm(entry)
    return _check_synthetic(entry)


# --------------------------------------------------------------------------- transformers


def _tiny_llama(hidden: int) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


def _check_transformers(entry: CompressionMethod, workdir: Path) -> str | None:
    import torch

    from evo_compress.fitness.model.quantize import (
        apply_quantization,
        model_weight_bytes,
        quantization_unsupported,
        target_linears,
        torchao_storage_config,
    )

    name = entry.name
    support = entry.transformers
    assert support is not None
    group = min(entry.group_sizes) if entry.grouped else None
    model = _tiny_llama(max(64, group or 64))
    reason = quantization_unsupported(name, "cpu", group_size=group, model=model)
    if reason is not None:
        return reason
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randint(3, 32, (4, 16), generator=generator)
    held_out = torch.randint(3, 32, (2, 12), generator=generator)
    with torch.no_grad():
        reference = model(held_out).logits
    recipe: dict[str, Any] = {"quant.method": name}
    if group is not None:
        recipe["quant.group_size"] = group
    result = apply_quantization(model, recipe, "cpu", calibration=calibration, workdir=workdir)
    details = result.details
    assert details["method"] == name, details
    assert result.weight_bytes == model_weight_bytes(result.model), name

    if support.kernel is None:  # leaves the weights as they are
        assert details["bits"] is None and entry.weight_bits == 16, details
        return None
    for key in ("library", "algorithm"):
        assert isinstance(details.get(key), str) and details[key], f"{name}: no `{key}`"
    assert details["bits"] == entry.weight_bits, f"{name}: bits {details['bits']}"
    assert details["quantized_layers"] == len(target_linears(model)), details
    # The bytes the quantized layers really take shrink with the method's bits: at least its
    # bits per weight, at most int8's (a 4-bit value held unpacked in a byte) plus scales.
    measured = float(details["bits_per_weight_measured"])
    most = max(entry.weight_bits, 8) * 1.25 + 2 * entry.scale_bits / (group or 64)
    assert entry.weight_bits <= measured <= most, (
        f"{name}: {measured:.2f} bits per weight stored for a {entry.weight_bits}-bit method"
    )
    with torch.no_grad():
        logits = result.model(held_out).logits.float()
    assert torch.isfinite(logits).all(), f"{name}: non-finite outputs"
    error = float((logits - reference).norm() / reference.norm())
    assert error < 0.5, f"{name}: outputs {error:.2f} (relative) away from the original's"
    if support.storage is not None:
        config = torchao_storage_config(name, group or 64, "cpu", torch.float32)
        assert config is not None, f"{name}: a storage reference that gives no config"
    return None


# --------------------------------------------------------------------------- vLLM


def _vllm_caps() -> dict[str, Any]:
    from evo_compress.fitness.vllm.compile import CPU_ISAS, VLLMCapabilities

    caps = {
        "vLLM 0.33, H100": VLLMCapabilities((0, 33, 0), (9, 0), quantizer=True),
        "vLLM 0.10, A10": VLLMCapabilities((0, 10, 1), (8, 6), quantizer=True),
    }
    for isa in CPU_ISAS:
        caps[f"vLLM CPU build, {isa}"] = VLLMCapabilities(
            (0, 32, 0), None, quantizer=True, cpu_build=True, cpu_isa=isa
        )
    return caps


def _check_vllm(entry: CompressionMethod) -> str | None:
    from evo_compress.exceptions import EvaluationError
    from evo_compress.fitness.vllm.compile import compile_recipe
    from evo_compress.genomes import SearchSpace

    support = entry.vllm
    assert support is not None
    name = entry.name
    space = SearchSpace.builtin()
    defaults = {gene: spec.default for gene, spec in space.genes.items()}
    served = 0
    for where, caps in _vllm_caps().items():
        for group in entry.group_sizes or (None,):
            recipe = {**defaults, "quant.method": name}
            if group is not None:
                recipe["quant.group_size"] = group
            label = f"{name}" + (f" g{group}" if group else "") + f" on {where}"
            try:
                plan = compile_recipe(recipe, caps, defaults=defaults)
            except EvaluationError as exc:
                text = str(exc)
                assert "`quant." in text, f"{label}: refused without naming the gene: {text}"
                if caps.cpu_build and caps.cpu_isa not in support.cpu_isas:
                    assert support.cpu_refused in text, f"{label}: {text}"
                continue
            served += 1
            if caps.cpu_build:
                assert caps.cpu_isa in support.cpu_isas, f"{label}: served, not listed"
            args = list(plan.engine_args)
            step = plan.quant_step
            if support.quantization is not None:
                i = args.index("--quantization")
                assert args[i + 1] == support.quantization and step is None, label
            elif support.offline:
                assert step is not None, f"{label}: no llm-compressor step"
                assert (step.scheme, step.algorithm) == (support.scheme, support.algorithm)
                assert step.group_size == (group if step.scheme == "W4A16" else None), label
                assert "--quantization" not in args, label
                assert plan.weight_genes.get("quant.method") == name, label
            else:
                assert step is None and "--quantization" not in args, label
    assert served, f"`{name}` claims vLLM, but no release, GPU or CPU build serves it"
    return None


# --------------------------------------------------------------------------- synthetic


def _check_synthetic(entry: CompressionMethod) -> str | None:
    from evo_compress.fitness import EVALUATORS, EvaluationContext
    from evo_compress.genomes import SearchSpace
    from evo_compress.objectives import OBJECTIVE_NAMES

    space = SearchSpace.builtin()
    evaluator = EVALUATORS.get("synthetic")({}, EvaluationContext())
    quant: dict[str, Any] = {"method": entry.name}
    if entry.grouped:
        quant["group_size"] = max(entry.group_sizes)
    results = {}
    for label, genes in (("method", {"quant": quant}), ("none", {})):
        result = evaluator.evaluate(space.recipe(genes), space)
        assert result.ok, f"{entry.name}: {result.status}: {result.reason}"
        objectives = result.objectives or {}
        assert set(objectives) == set(OBJECTIVE_NAMES), objectives
        assert all(math.isfinite(v) for v in objectives.values()), objectives
        results[label] = objectives
    if entry.weight_bits < 16:
        assert results["method"]["memory"] < results["none"]["memory"], results
    return None
