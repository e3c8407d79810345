"""Quantization and serving measurements of the transformers back end on a tiny random Llama."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")

from torch import nn  # noqa: E402

from evo_compress.exceptions import EvaluationError  # noqa: E402
from evo_compress.fitness.energy import EnergyMeter  # noqa: E402
from evo_compress.fitness.hf.measure import (  # noqa: E402
    MemoryMeter,
    apply_kv,
    kv_unsupported,
    measure_latency,
    measure_memory,
    set_attention,
)
from evo_compress.fitness.model.environments import (  # noqa: E402
    QUANT_ENV,
    QUANT_ENV_VAR,
    find_environment,
)
from evo_compress.fitness.model.quantize import (  # noqa: E402
    QuantizationUnsupportedError,
    apply_quantization,
    model_weight_bytes,
    quantization_unsupported,
    target_linears,
)
from evo_compress.fitness.model.quantize_library import library_unsupported  # noqa: E402

TINY = {
    "vocab_size": 32,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PROMPTS = ["the quick brown fox", "hello there", "a b c d e f", "jumps over the lazy dog"]
# gptq runs llm-compressor in the quantization environment of `make vllm-env`
# (test_quantize_library.py); without it, the gptq cases are skipped with the reason.
HAS_QUANT_ENV = find_environment(QUANT_ENV, QUANT_ENV_VAR) is not None
NO_QUANT_ENV = "no quantization environment for gptq: `make vllm-env` makes .venv-quant"
GPTQ = pytest.param(
    "gptq", marks=pytest.mark.skipif(not HAS_QUANT_ENV, reason=NO_QUANT_ENV), id="gptq"
)
INT4_CALIBRATED = ("awq", "gptq") if HAS_QUANT_ENV else ("awq",)


def _tiny_llama(seed: int = 0, outliers: bool = True) -> Any:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    if outliers:
        # A few large input channels, as real LLMs have: the regime AWQ is built for, and one
        # where plain round-to-nearest int4 visibly loses accuracy.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[:4] = 20.0
                layer.post_attention_layernorm.weight[:4] = 20.0
    return model


@pytest.fixture(scope="module")
def base_model() -> Any:
    return _tiny_llama()


@pytest.fixture
def model(base_model: Any) -> Any:
    return copy.deepcopy(base_model)


@pytest.fixture(scope="module")
def calibration() -> Any:
    return torch.randint(3, 32, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def held_out() -> Any:
    return torch.randint(3, 32, (4, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def reference_logits(base_model: Any, held_out: Any) -> Any:
    with torch.no_grad():
        return base_model(held_out).logits


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in "abcdefghijklmnopqrstuvwxyz .":
        vocab.setdefault(char, len(vocab))
    assert len(vocab) == TINY["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _rel_error(model: Any, held_out: Any, reference: Any) -> float:
    with torch.no_grad():
        logits = model(held_out).logits
    return float((logits - reference).norm() / reference.norm())


def _linear_fp32_bytes(model: Any) -> int:
    return sum(m.weight.numel() * 4 for m in target_linears(model).values())


_cache: dict[tuple[str, int | None], Any] = {}


def _quantized(
    base_model: Any,
    calibration: Any,
    tmp_path_factory: Any,
    method: str,
    group_size: int | None = None,
) -> Any:
    """One quantization per (method, group size) for the whole module."""
    key = (method, group_size)
    if key not in _cache:
        recipe: dict[str, Any] = {"quant.method": method}
        if group_size is not None:
            recipe["quant.group_size"] = group_size
        _cache[key] = apply_quantization(
            copy.deepcopy(base_model),
            recipe,
            "cpu",
            calibration=calibration,
            workdir=tmp_path_factory.mktemp(method),
        )
    return _cache[key]


@pytest.fixture
def quantized(base_model: Any, calibration: Any, tmp_path_factory: Any) -> Any:
    def get(method: str, group_size: int | None = None) -> Any:
        return _quantized(base_model, calibration, tmp_path_factory, method, group_size)

    return get


# --------------------------------------------------------------------------- support


def test_fp8_is_unsupported_on_cpu_with_the_reason(model: Any) -> None:
    reason = quantization_unsupported("fp8", "cpu")
    assert reason == "fp8 needs a CUDA GPU with compute capability >= 8.9 (this device: cpu)"
    with pytest.raises(QuantizationUnsupportedError, match=r"compute capability >= 8\.9"):
        apply_quantization(model, {"quant.method": "fp8"}, "cpu")
    assert issubclass(QuantizationUnsupportedError, EvaluationError)


@pytest.mark.parametrize(
    "method", ["none", "int8_weight_only", "int8_w8a8", "rtn", "awq", GPTQ, "nf4", "int8_bnb"]
)
def test_every_other_method_runs_on_cpu(method: str) -> None:
    assert quantization_unsupported(method, "cpu") is None


def test_every_registered_transformers_method_names_a_kernel_that_loads() -> None:
    from evo_compress.fitness.model.quantize import resolve
    from evo_compress.methods import METHODS

    for method in METHODS.methods("quantization", backend="transformers"):
        support = method.transformers
        assert support is not None
        if method.weight_bits == 16:  # leaves the weights as they are
            assert support.kernel is None, method.name
            continue
        for reference in (support.kernel, support.probe, support.storage):
            assert reference is None or callable(resolve(reference)), (method.name, reference)


def test_a_kernel_that_cannot_load_is_one_line(model: Any, monkeypatch: Any) -> None:
    from dataclasses import replace

    from evo_compress.fitness.model import quantize
    from evo_compress.methods import METHODS, MethodRegistry

    registry = MethodRegistry()
    for method in METHODS:
        registry.register(method)
    rtn = METHODS.get("rtn")
    assert rtn.transformers is not None
    broken = replace(rtn.transformers, kernel="evo_compress_no_such_module:kernel", probe=None)
    registry.register(replace(rtn, name="int4_broken", transformers=broken))
    monkeypatch.setattr(quantize, "METHODS", registry)
    with pytest.raises(QuantizationUnsupportedError, match="No module named") as info:
        apply_quantization(model, {"quant.method": "int4_broken", "quant.group_size": 32}, "cpu")
    assert "`evo_compress_no_such_module:kernel` cannot be loaded" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_method_and_group_size_the_model_cannot_take(model: Any) -> None:
    assert "unknown quantization method" in (quantization_unsupported("int3", "cpu") or "")
    # The tiny model's attention layers are 64 wide: int4 groups of 128 cannot tile them.
    for method in ("rtn", *INT4_CALIBRATED, "nf4"):
        reason = quantization_unsupported(method, "cpu", group_size=128, model=model)
        assert reason is not None and "widths [64]" in reason
        assert quantization_unsupported(method, "cpu", group_size=64, model=model) is None
    with pytest.raises(QuantizationUnsupportedError, match="group size 128"):
        apply_quantization(model, {"quant.method": "rtn", "quant.group_size": 128}, "cpu")


def test_calibration_and_workdir_are_required(model: Any) -> None:
    for method in ("awq", "gptq"):
        with pytest.raises(ValueError, match="calibration"):
            apply_quantization(model, {"quant.method": method, "quant.group_size": 32}, "cpu")
    with pytest.raises(ValueError, match="workdir"):
        apply_quantization(model, {"quant.method": "nf4", "quant.group_size": 64}, "cpu")
    with pytest.raises(ValueError, match="workdir"):
        apply_quantization(model, {"quant.method": "int8_bnb"}, "cpu")


# --------------------------------------------------------------------------- weight bytes


def test_weight_bytes_of_an_unquantized_model(model: Any) -> None:
    result = apply_quantization(model, {}, "cpu")
    assert result.model is model and result.details["method"] == "none"
    params = {id(p): p for p in model.parameters()}.values()
    expected = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    assert result.weight_bytes == model_weight_bytes(model) == expected


def test_tied_weights_count_once() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=True)
    tied = transformers.LlamaForCausalLM(config)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = _tiny_llama(outliers=False)
    embedding = TINY["vocab_size"] * TINY["hidden_size"] * 4
    assert model_weight_bytes(untied) - model_weight_bytes(tied) == embedding


def test_int8_weights_take_a_quarter_of_fp32_and_stay_close(
    quantized: Any, base_model: Any, held_out: Any, reference_logits: Any
) -> None:
    fp32 = _linear_fp32_bytes(base_model)
    for method in ("int8_weight_only", "int8_w8a8"):
        result = quantized(method)
        layer_bytes = result.details["quantized_layer_bytes"]
        # int8 values + one scale and zero point per row: just over a quarter.
        assert 0.25 * fp32 < layer_bytes < 0.28 * fp32
        assert result.weight_bytes == model_weight_bytes(result.model)
        assert 8.0 < result.details["bits_per_weight_measured"] < 9.0
        assert _rel_error(result.model, held_out, reference_logits) < 0.06
        q_proj = result.model.model.layers[0].self_attn.q_proj.weight
        assert type(q_proj).__name__ == "Int8Tensor"
        # Embeddings and the output head stay in full precision.
        assert type(result.model.lm_head.weight) is nn.Parameter
        assert result.model.lm_head.weight.dtype == torch.float32
        assert result.model.model.embed_tokens.weight.dtype == torch.float32


def test_int4_paths_store_unpacked_int8_and_say_so(quantized: Any, base_model: Any) -> None:
    fp32 = _linear_fp32_bytes(base_model)
    int8 = quantized("int8_weight_only").details["quantized_layer_bytes"]
    for method in ("rtn", *INT4_CALIBRATED):
        # One group size for gptq: each one is a run of the llm-compressor job.
        for group in (32, 64) if method != "gptq" else (32,):
            result = quantized(method, group)
            details = result.details
            assert details["bits"] == 4 and details["group_size"] == group
            assert "unpacked" in details["storage"]
            weight = result.model.model.layers[1].mlp.down_proj.weight
            assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
            assert weight.qdata.dtype == torch.int8
            assert int(weight.qdata.min()) >= -8 and int(weight.qdata.max()) <= 7
            # Measured, not nominal: 8 bits per value plus a 4-byte scale and a 1-byte zero
            # point per group, i.e. more than int8's per-row scales.
            expected_bits = 8 + 8 * 5 / group
            assert details["bits_per_weight_measured"] == pytest.approx(expected_bits, rel=0.01)
            assert int8 < details["quantized_layer_bytes"] < 0.3 * fp32


def test_nf4_is_smaller_than_int8_and_honours_the_block_size(
    quantized: Any, held_out: Any, reference_logits: Any
) -> None:
    import bitsandbytes as bnb

    int8 = quantized("int8_weight_only")
    errors = {}
    for group in (32, 64):
        result = quantized("nf4", group)
        assert result.model is not None and result.details["config"]["blocksize"] == group
        layers = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(layers) == 14
        assert {m.weight.quant_state.blocksize for m in layers} == {group}
        assert result.weight_bytes < int8.weight_bytes
        # 4 bits per weight + one fp32 absmax per block (+ a 16-entry code per layer).
        bits = result.details["bits_per_weight_measured"]
        assert 4 + 32 / group < bits < 4 + 32 / group + 0.2
        errors[group] = _rel_error(result.model, held_out, reference_logits)
        assert errors[group] < 0.4
        assert type(result.model.lm_head).__name__ == "Linear"


def test_int8_bnb_is_llm_int8_with_real_int8_storage(
    quantized: Any, base_model: Any, held_out: Any, reference_logits: Any
) -> None:
    import bitsandbytes as bnb

    fp32 = _linear_fp32_bytes(base_model)
    result = quantized("int8_bnb")
    details = result.details
    assert details["algorithm"].startswith("llm.int8 (bitsandbytes ")
    assert details["config"]["llm_int8_threshold"] == 6.0 and details["bits"] == 8
    layers = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 14 and {m.state.threshold for m in layers} == {6.0}
    assert all(m.weight.dtype == torch.int8 for m in layers)
    # int8 values + one fp32 scale per output row (SCB), measured from the tensors.
    layer_bytes = details["quantized_layer_bytes"]
    assert 0.25 * fp32 < layer_bytes < 0.28 * fp32
    assert 8.0 < details["bits_per_weight_measured"] < 9.0
    assert result.weight_bytes == model_weight_bytes(result.model)
    assert _rel_error(result.model, held_out, reference_logits) < 0.06
    assert type(result.model.lm_head).__name__ == "Linear"


def test_every_record_names_its_algorithm_and_library(quantized: Any) -> None:
    expected = {
        "int8_weight_only": "rtn per output channel (torchao ",
        "rtn": "rtn (torchao ",
        "awq": "awq (llm-compressor "
        if library_unsupported("awq", torch.device("cpu")) is None
        else "awq (evo-compress, no quantization environment)",
        "nf4": "nf4 (bitsandbytes ",
        "int8_bnb": "llm.int8 (bitsandbytes ",
    }
    for method, algorithm in expected.items():
        group = 32 if method in ("rtn", "awq", "nf4") else None
        details = quantized(method, group).details
        assert details["algorithm"].startswith(algorithm), details["algorithm"]
        assert details["library"] and details["bits"] in (4, 8)
    # gptq's record ("gptq (llm-compressor ...)") is checked in test_quantize_library.py,
    # where the quantization environment it needs is present.


# --------------------------------------------------------------------------- accuracy


def test_errors_order_as_bits_and_methods_should(
    quantized: Any, held_out: Any, reference_logits: Any
) -> None:
    def err(method: str, group: int | None = None) -> float:
        return _rel_error(quantized(method, group).model, held_out, reference_logits)

    int8, w8a8 = err("int8_weight_only"), err("int8_w8a8")
    rtn32, rtn64 = err("rtn", 32), err("rtn", 64)
    awq32 = err("awq", 32)
    assert int8 < w8a8 < rtn32  # activation quantization costs a little, int4 much more
    assert rtn32 < rtn64  # smaller groups, finer scales
    assert 0.05 < rtn64 < 0.5  # a broken quantizer (zeros, no scales) would be ~1 or more
    assert awq32 < rtn32
    if HAS_QUANT_ENV:
        assert err("gptq", 32) < rtn32


def test_awq_uses_calibration_and_differs_from_rtn(quantized: Any, base_model: Any) -> None:
    awq, rtn = quantized("awq", 32), quantized("rtn", 32)
    if HAS_QUANT_ENV:  # llm-compressor's AWQ: its rescaled norms are copied in too
        rescaled = awq.details["llmcompressor"]["rescaled_tensors"]
        assert "model.layers.0.input_layernorm.weight" in rescaled
        assert awq.details["algorithm"].startswith("awq (llm-compressor ")
    else:  # the hand-written AWQ
        info = awq.details["awq"]
        assert set(info["alphas"]) == {
            f"layers.{i}.{g}" for i in range(2) for g in ("qkv", "o", "gate_up", "down")
        }
        assert any(alpha > 0 for alpha in info["alphas"].values())
        assert all(ratio <= 1.0 for ratio in info["error_vs_rtn"].values())
    assert awq.details["calibration_shape"] == [8, 32]
    # The 1/s folds into the norms: a norm weight changed, and so did the int4 values.
    norm_awq = awq.model.model.layers[0].input_layernorm.weight
    norm_base = base_model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm_awq, norm_base)
    q_awq = awq.model.model.layers[0].self_attn.q_proj.weight.qdata
    q_rtn = rtn.model.model.layers[0].self_attn.q_proj.weight.qdata
    assert not torch.equal(q_awq, q_rtn)


@pytest.mark.skipif(not HAS_QUANT_ENV, reason=NO_QUANT_ENV)
def test_gptq_is_llmcompressors_stored_as_torchao_int4(
    quantized: Any, held_out: Any, reference_logits: Any
) -> None:
    result = quantized("gptq", 32)
    details = result.details
    version = details["llmcompressor"]["version"]
    assert details["algorithm"] == f"gptq (llm-compressor {version})"
    assert details["library"].startswith(f"llm-compressor {version} (quantization environment)")
    job = details["llmcompressor"]
    assert job["recipe"][0]["class"] == "GPTQModifier" and job["symmetric"]
    assert job["job_seconds"] > 0 and Path(job["log"]).is_file()
    assert details["subprocess_cpu_seconds"] > 0  # for the energy estimate (compress.py)
    assert 0 < details["weight_relative_error_mean"] < 0.5
    weight = result.model.model.layers[0].self_attn.v_proj.weight
    assert torch.equal(weight.zero_point, torch.zeros_like(weight.zero_point))
    scales = weight.scale.repeat_interleave(32, dim=1)
    assert torch.equal(weight.dequantize(), weight.qdata.float() * scales)
    with torch.no_grad():
        logits = result.model(held_out).logits
    assert torch.isfinite(logits).all()
    assert _rel_error(result.model, held_out, reference_logits) < 0.5


# --------------------------------------------------------------------------- measure


def test_latency_numbers_and_batching(model: Any, tokenizer: Any) -> None:
    results = {}
    for batch in (1, 4):
        results[batch] = measure_latency(
            model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=batch, warmup=1, repeats=2
        )
    for batch, r in results.items():
        for key in ("ms_per_token_median", "ms_per_token_p95", "ttft_ms_median", "ttft_ms_p95"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["ms_per_token_p95"] >= r["ms_per_token_median"]
        assert r["ttft_ms_p95"] >= r["ttft_ms_median"]
        assert r["objective"] == "ms_per_token_median"
        assert r["samples"] == 2 * (4 // batch)
        assert r["tokens_generated"] == r["samples"] * batch * 8
        assert r["wall_s"] > 0 and r["cpu_s"] > 0
        assert r["decode_ms_per_token_median"] > 0
    assert results[1]["ms_per_token_median"] != results[4]["ms_per_token_median"]
    # The tokenizer is left as it was.
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None


def test_latency_meters_energy_over_the_timed_runs(model: Any, tokenizer: Any) -> None:
    meter = EnergyMeter(powercap_root="/nonexistent")
    r = measure_latency(
        model, tokenizer, PROMPTS[:2], 4, batch_size=2, repeats=1, energy_meter=meter
    )
    energy = r["energy"]
    assert energy["method"] == "cpu-time-estimate" and energy["measured"] is False
    assert energy["joules"] == pytest.approx(r["cpu_s"] * meter.watts_per_core, rel=0.2)


def test_memory_is_weights_plus_peak_growth(model: Any, tokenizer: Any) -> None:
    result, latency = measure_memory(
        model,
        lambda: measure_latency(model, tokenizer, PROMPTS, 8, batch_size=4, repeats=1),
        "cpu",
    )
    assert latency["tokens_generated"] == 32
    assert result["mib"] > 0
    assert result["weights_mib"] == pytest.approx(model_weight_bytes(model) / 2**20)
    assert result["mib"] == pytest.approx(result["weights_mib"] + result["peak_rss_growth_mib"])
    assert "weight footprint" in result["how"]
    with MemoryMeter(model) as meter:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del big
    assert meter.result["peak_rss_growth_mib"] > 32


def test_attention_backends(model: Any) -> None:
    assert set_attention(model, "eager", "cpu") is None
    assert model.config._attn_implementation == "eager"
    assert set_attention(model, "auto", "cpu") is None
    assert model.config._attn_implementation == "sdpa"
    assert "CUDA" in (set_attention(model, "flash_attention_2", "cpu") or "")
    assert "flashinfer" in (set_attention(model, "flashinfer", "cpu") or "")
    assert model.config._attn_implementation == "sdpa"


def test_fp8_kv_cache_stores_float8(model: Any, tokenizer: Any) -> None:
    recipe = {"kv.dtype": "fp8", "kv.sliding_window": False}
    assert kv_unsupported(recipe, "cpu", model) is None
    kwargs = apply_kv(model, recipe, "cpu")
    enc = tokenizer(["hello there"], return_tensors="pt")
    out = model.generate(
        **enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    cache = out.past_key_values
    keys, _scale = cache.layers[0]._quantized_keys
    assert keys.dtype == torch.float8_e4m3fn
    r = measure_latency(model, tokenizer, PROMPTS, 4, batch_size=2, generate_kwargs=kwargs)
    assert r["ms_per_token_median"] > 0


def test_sliding_window_only_where_the_model_has_it(model: Any) -> None:
    recipe = {"kv.sliding_window": True, "kv.window": 4}
    reason = kv_unsupported(recipe, "cpu", model)
    assert reason is not None and "llama" in reason
    with pytest.raises(ValueError, match="sliding-window"):
        apply_kv(model, recipe, "cpu")
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(
        transformers.MistralConfig(**TINY, sliding_window=None)
    ).eval()
    ids = torch.randint(3, 32, (1, 12))
    with torch.no_grad():
        full = mistral(ids).logits
        assert apply_kv(mistral, recipe, "cpu") == {}
        windowed = mistral(ids).logits
    assert mistral.config.sliding_window == 4
    assert torch.allclose(full[0, :4], windowed[0, :4], atol=1e-5)
    assert not torch.allclose(full[0, 8:], windowed[0, 8:], atol=1e-3)
    assert "full-attention" in (
        kv_unsupported({**recipe, "kv.dtype": "fp8"}, "cpu", mistral) or ""
    )


def test_workdir_is_left_with_the_saved_source(tmp_path: Path, model: Any) -> None:
    apply_quantization(model, {"quant.method": "nf4", "quant.group_size": 64}, "cpu",
                       workdir=tmp_path)  # fmt: skip
    assert any(tmp_path.rglob("*.safetensors"))
