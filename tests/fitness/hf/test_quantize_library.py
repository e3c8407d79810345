"""GPTQ on the transformers back end is llm-compressor's, the vLLM back end's algorithm: the
int4 values and scales it stores equal those of the checkpoint the vLLM back end builds.

The tests that run llm-compressor need the quantization environment of `make vllm-env`
(``.venv-quant``) and are skipped, with the reason, without it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchao")

from evo_compress.fitness._base import EvaluationResult, classify_failure  # noqa: E402
from evo_compress.fitness.model.environments import (  # noqa: E402
    QUANT_ENV,
    QUANT_ENV_VAR,
    default_python,
    find_environment,
)
from evo_compress.fitness.model.quantize import (  # noqa: E402
    QuantizationUnsupportedError,
    apply_quantization,
    quantization_unsupported,
    target_linears,
)
from evo_compress.fitness.model.quantize_library import unpack_int4  # noqa: E402

QUANT = find_environment(QUANT_ENV, QUANT_ENV_VAR)
needs_quant_env = pytest.mark.skipif(
    QUANT is None, reason="no quantization environment: `make vllm-env` makes .venv-quant"
)
GROUP = 64
SETTINGS = {
    "calibration_samples": 16,
    "recovery_lr": 1e-3,
    "recovery_batch_size": 16,
    "seed": 0,
    "watts_per_core": 15.0,
    "build_timeout_s": 600,
}
# Calibration text of one length (8 tokens): the transformers back end pads its calibration
# ids to the longest text, the vLLM back end's job takes each text as it is; equal lengths
# make them the same tokens.
TEXTS = [f"{a}+{b}={a + b}" for a, b in zip(range(11, 50, 3), range(20, 36), strict=False)]


def test_unpacking_follows_compressed_tensors_layout() -> None:
    # Nibble i of a word (lowest first) is element i, stored as value + 8: the word
    # 0x76543210 holds -8..-1, and 0xFEDCBA98 holds 0..7.
    words = torch.tensor([[0x76543210, -0x01234568]], dtype=torch.int32)  # 0xFEDCBA98
    assert unpack_int4(words, (1, 16)).tolist() == [list(range(-8, 8))]
    assert unpack_int4(words, (1, 12)).tolist() == [list(range(-8, 4))]
    # Packed along the rows (zero points): the same, transposed.
    assert unpack_int4(words.t().contiguous(), (16, 1), packed_dim=0).tolist() == [
        [v] for v in range(-8, 8)
    ]


def test_without_the_quantization_environment_gptq_is_left_out_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(QUANT_ENV_VAR, "")  # set to nothing: no environment is used
    reason = quantization_unsupported("gptq", "cpu")
    assert reason is not None
    assert "`make vllm-env`" in reason and QUANT_ENV_VAR in reason
    # A missing environment is not the recipe's fault: never cached as its outcome.
    failed = EvaluationResult("failed", None, reason, {})
    assert classify_failure(failed) == "environment"
    assert quantization_unsupported("rtn", "cpu") is None
    # AWQ keeps its hand-written kernel where llm-compressor cannot run.
    assert quantization_unsupported("awq", "cpu") is None
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=4,
        )
    )  # fmt: skip
    ids = torch.randint(3, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(QuantizationUnsupportedError, match="make vllm-env"):
        apply_quantization(model, {"quant.method": "gptq", "quant.group_size": 32}, "cpu", ids)
    awq = apply_quantization(model, {"quant.method": "awq", "quant.group_size": 32}, "cpu", ids)
    assert awq.details["algorithm"] == "awq (evo-compress, no quantization environment)"


def test_a_quantization_environment_named_wrongly_is_the_environments_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(QUANT_ENV_VAR, str(tmp_path / "nowhere"))
    reason = quantization_unsupported("gptq", "cpu")
    assert reason is not None and str(tmp_path / "nowhere") in reason
    assert classify_failure(EvaluationResult("failed", None, reason, {})) == "environment"


_PACK = """
import json, sys
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors.torch import save_file

folder = sys.argv[1]
gen = torch.Generator().manual_seed(0)
q = torch.randint(-8, 8, (24, 64), generator=gen, dtype=torch.int8)
zero = torch.randint(-8, 8, (24, 2), generator=gen, dtype=torch.int8)
scale = torch.rand(24, 2, generator=gen)
save_file(
    {
        "layer.weight_packed": pack_to_int32(q, 4),
        "layer.weight_zero_point": pack_to_int32(zero, 4, packed_dim=0).contiguous(),
        "layer.weight_scale": scale,
        "layer.weight_shape": torch.tensor([24, 64]),
        "q": q, "zero": zero,
    },
    folder + "/model.safetensors",
)
weights = {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False}
config = {"format": "pack-quantized", "config_groups": {"g": {"weights": weights}}}
json.dump({"quantization_config": config}, open(folder + "/config.json", "w"))
"""


@needs_quant_env
def test_zero_points_are_read_as_compressed_tensors_packs_them(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from evo_compress.fitness.model.quantize_library import read_int4

    subprocess.run([default_python(), "-c", _PACK, str(tmp_path)], check=True, timeout=300)
    packed = load_file(tmp_path / "model.safetensors")
    ((qdata, scale, zero_point),) = read_int4(tmp_path, ["layer"], 32).values()
    assert torch.equal(qdata, packed["q"])
    assert zero_point is not None and torch.equal(zero_point, packed["zero"])
    assert torch.equal(scale, packed["layer.weight_scale"])


# --------------------------------------------------------------------------- same numbers


def _reference_model() -> Path:
    from evo_compress.reference import default_cache_dir
    from evo_compress.reference.model import is_complete, reference_model_dir

    model = reference_model_dir(default_cache_dir())
    if not is_complete(model):
        pytest.skip("the reference model is not trained in this checkout")
    return Path(model)


_DECODE = """
import json, sys
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
from safetensors.torch import save_file

folder, names, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
tensors = {}
with safe_open(folder + "/model.safetensors", "pt") as f:
    for name in names:
        shape = f.get_tensor(name + ".weight_shape").tolist()
        packed = f.get_tensor(name + ".weight_packed")
        tensors[name + ".qdata"] = unpack_from_int32(packed, 4, shape).contiguous()
        tensors[name + ".scale"] = f.get_tensor(name + ".weight_scale").contiguous()
save_file(tensors, out)
"""


@pytest.mark.slow
@needs_quant_env
def test_gptq_stores_the_int4_values_and_scales_of_the_vllm_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from evo_compress.fitness.model.load import load_model, tokenize
    from evo_compress.fitness.vllm import checkpoint
    from evo_compress.fitness.vllm.compile import VLLMCapabilities, compile_recipe
    from evo_compress.genomes import SearchSpace

    model_path = _reference_model()
    recipe = dict(SearchSpace.builtin().recipe({"quant": {"method": "gptq", "group_size": GROUP}}))
    task = {"train_texts": TEXTS, "calibration_samples": len(TEXTS)}

    # The vLLM back end: its checkpoint, built by its own code.
    plan = compile_recipe(recipe, VLLMCapabilities(quantizer=True))
    built = checkpoint.ensure_checkpoint(
        plan,
        model_path=model_path,
        model_fingerprint="reference",
        cache_root=tmp_path / "ckpt",
        device="cpu",
        dtype="float32",
        task=task,
        settings=SETTINGS,
        python=default_python(),
    )

    # The transformers back end: the model and calibration ids as its worker makes them.
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    ids = tokenize(tokenizer, TEXTS, "cpu")["input_ids"]
    assert ids.shape == (len(TEXTS), 8)  # no padding: the same tokens as the job's
    model = load_model(str(model_path), "float32", "cpu")
    names = sorted(target_linears(model))
    result = apply_quantization(model, recipe, "cpu", calibration=ids, workdir=tmp_path / "hf")
    assert result.details["algorithm"].startswith("gptq (llm-compressor ")

    # The checkpoint's tensors as compressed-tensors itself decodes them.
    decoded = tmp_path / "decoded.safetensors"
    subprocess.run(
        [default_python(), "-c", _DECODE, str(built.path), json.dumps(names), str(decoded)],
        check=True,
        timeout=300,
    )
    expected = load_file(decoded)
    stored = dict(result.model.named_modules())
    assert len(names) == 4 * 7
    for name in names:
        weight = stored[name].weight
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
        assert torch.equal(weight.qdata, expected[f"{name}.qdata"]), name
        assert torch.equal(weight.scale, expected[f"{name}.scale"]), name
        assert not weight.zero_point.any()  # symmetric: no zero points


def test_the_jobs_cpu_time_joins_a_cpu_time_estimate_only() -> None:
    from evo_compress.fitness.energy import EnergyMeter, EnergyResult
    from evo_compress.fitness.model.compress import _with_subprocess

    with EnergyMeter(powercap_root="/nonexistent") as meter:  # no counter: the estimate
        sum(range(10**5))
    own = meter.result
    details = {"quant": {"subprocess_cpu_seconds": 2.0}}
    total = _with_subprocess(own, details, 15.0)
    assert total.method == "cpu-time-estimate" and not total.measured
    assert total.joules == pytest.approx(own.joules + 30.0)
    assert total.details["subprocess_cpu_seconds"] == 2.0
    assert "quantization job" in total.details["scope"]
    # A power counter covers the whole CPU or GPU, the job included: nothing to add.
    rapl = EnergyResult(50.0, 3.0, "rapl", True, {})
    assert _with_subprocess(rapl, details, 15.0) is rapl
    assert _with_subprocess(own, {"quant": {}}, 15.0) is own


def test_a_requires_reference_that_does_not_load_is_a_reason(monkeypatch) -> None:
    from dataclasses import replace

    import evo_compress.fitness.model.quantize as quantize

    entry = quantize._method("gptq")
    assert entry is not None and entry.transformers is not None
    broken = replace(
        entry, transformers=replace(entry.transformers, requires="no_such_module:check")
    )
    monkeypatch.setattr(quantize, "_method", lambda name: broken)
    reason = quantize.quantization_unsupported("gptq", "cpu")
    assert reason is not None and "no_such_module:check" in reason
