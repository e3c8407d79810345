"""Recipe -> vLLM serve plan: every gene and value of the built-in space has a defined
outcome (engine arguments, a quantization step, or a reason) on the GPUs and vLLM releases
the back end meets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from evo_compress.exceptions import EvaluationError, RecipeError
from evo_compress.fitness.vllm.compile import (
    GENES,
    QuantStep,
    ServePlan,
    VLLMCapabilities,
    capabilities,
    compile_recipe,
    unsupported_reason,
)
from evo_compress.genomes import BoolGene, ChoiceGene, SearchSpace

SPACE = SearchSpace.builtin()

V33, V10, V9 = (0, 33, 0), (0, 10, 1), (0, 9, 2)
H100, A10, T4, V100 = (9, 0), (8, 6), (7, 5), (7, 0)
CAPS = {
    "h100": VLLMCapabilities(V33, H100),
    "a10": VLLMCapabilities(V33, A10),
    "t4": VLLMCapabilities(V33, T4),
    "h100+q": VLLMCapabilities(V33, H100, quantizer=True),
    "t4+q": VLLMCapabilities(V33, T4, quantizer=True),
    "0.10 a10": VLLMCapabilities(V10, A10),
    "0.10 t4": VLLMCapabilities(V10, T4),
    "0.10 t4+q": VLLMCapabilities(V10, T4, quantizer=True),
}
SERVE = ("--max-num-seqs", "32", "--gpu-memory-utilization", "0.9")  # always given


@dataclass(frozen=True)
class No:
    """Expected: unsupported, with these words in the reason."""

    words: str


@dataclass(frozen=True)
class Step:
    """Expected: served from a llm-compressor checkpoint, no --quantization argument."""

    scheme: str
    algorithm: str
    group_size: int | None


Outcome = tuple[str, ...] | No | Step


def quant_row(method: str, group_size: int | None = None) -> dict[str, Any]:
    return {"quant.method": method} | (
        {} if group_size is None else {"quant.group_size": group_size}
    )


# (recipe changes from the baseline, outcome on every caps unless overridden, overrides)
ROWS: list[tuple[dict[str, Any], Outcome, dict[str, Outcome]]] = [
    (quant_row("none"), SERVE, {}),
    (
        quant_row("fp8"),
        ("--quantization", "fp8", *SERVE),
        {"0.10 t4": No("compute capability 8.0"), "0.10 t4+q": No("compute capability 8.0")},
    ),
    (
        quant_row("int8_weight_only"),
        No("int8_per_channel_weight_only"),
        {
            "h100+q": Step("W8A16", "rtn", None),
            "t4+q": Step("W8A16", "rtn", None),
            "0.10 t4+q": No("compute capability 8.0"),  # Marlin on sm 7.5 only from 0.30
        },
    ),
    (
        quant_row("int8_w8a8"),
        No("no quantization environment"),
        {
            "h100+q": Step("W8A8", "smoothquant-gptq", None),
            "t4+q": Step("W8A8", "smoothquant-gptq", None),
            "0.10 t4+q": Step("W8A8", "smoothquant-gptq", None),
        },
    ),
    (
        quant_row("nf4"),  # the default group size, 128
        No("bitsandbytes loader, which vLLM 0.33.0 no longer has"),
        {key: No("blocks of 64") for key in CAPS if key.startswith("0.10")},
    ),
    (
        quant_row("nf4", 64),
        No("bitsandbytes loader"),
        {
            key: ("--quantization", "bitsandbytes", *SERVE)
            for key in CAPS
            if key.startswith("0.10")
        },
    ),
    (quant_row("nf4", 32), No("bitsandbytes"), {}),
]
for _method in ("awq", "gptq", "rtn"):
    for _size in (32, 64, 128):
        ROWS.append(
            (
                quant_row(_method, _size),
                No("no quantization environment"),
                {
                    "h100+q": Step("W4A16", _method, _size),
                    "t4+q": Step("W4A16", _method, _size),
                    # Marlin runs on sm 7.5 only from vLLM 0.30.
                    "0.10 t4+q": No("compute capability 8.0"),
                },
            )
        )
for _method in ("none", "magnitude", "wanda", "structured_mlp", "structured_heads"):
    ROWS.append(({"prune.method": _method}, SERVE, {}))
for _pattern in ("unstructured", "2:4", "4:8"):
    for _method in ("magnitude", "wanda"):
        ROWS.append(({"prune.method": _method, "prune.pattern": _pattern}, SERVE, {}))
for _method in ("none", "lora", "distill"):
    ROWS.append(({"recovery.method": _method}, SERVE, {}))
for _rank in (4, 8, 16, 32, 64):
    ROWS.append(({"recovery.method": "lora", "recovery.lora_rank": _rank}, SERVE, {}))
ROWS += [
    ({"kv.dtype": "auto"}, SERVE, {}),
    (
        {"kv.dtype": "fp8"},
        ("--kv-cache-dtype", "fp8", *SERVE),
        {k: No("compute capability 8.0") for k in CAPS if "t4" in k},
    ),
    ({"kv.sliding_window": False}, SERVE, {}),
    ({"kv.sliding_window": True}, No("implement one"), {}),
    ({"serve.attention_backend": "auto"}, SERVE, {}),
    ({"serve.attention_backend": "sdpa"}, No("vision encoders"), {}),
    ({"serve.attention_backend": "eager"}, No("no eager"), {}),
    (
        {"serve.attention_backend": "flash_attention_2"},
        (
            *SERVE,
            "--attention-backend",
            "FLASH_ATTN",
            "--attention-config.flash_attn_version",
            "2",
        ),
        {
            **{k: No("compute capability 8.0") for k in CAPS if "t4" in k},
            "0.10 a10": SERVE,  # through VLLM_ATTENTION_BACKEND, checked below
        },
    ),
    (
        {"serve.attention_backend": "flashinfer"},
        (*SERVE, "--attention-backend", "FLASHINFER"),
        {k: SERVE for k in CAPS if k.startswith("0.10")},
    ),
]
for _n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
    ROWS.append(
        (
            {"serve.max_num_seqs": _n},
            ("--max-num-seqs", str(_n), "--gpu-memory-utilization", "0.9"),
            {},
        )
    )
for _f, _text in ((0.5, "0.5"), (0.75, "0.75"), (0.95, "0.95")):
    ROWS.append(
        (
            {"serve.gpu_memory_utilization": _f},
            ("--max-num-seqs", "32", "--gpu-memory-utilization", _text),
            {},
        )
    )


def _check(changes: dict[str, Any], caps_name: str, expected: Outcome) -> None:
    recipe = SPACE.recipe(changes)
    caps = CAPS[caps_name]
    reason = unsupported_reason(recipe, caps)
    if isinstance(expected, No):
        assert reason is not None, (changes, caps_name)
        assert expected.words in reason, reason
        gene = sorted(changes)[0] if len(changes) == 1 else None
        assert gene is None or f"`{gene.split('.')[0]}" in reason
        with pytest.raises(EvaluationError, match=r"^`"):
            compile_recipe(recipe, caps)
        return
    assert reason is None, (changes, caps_name, reason)
    plan = compile_recipe(recipe, caps)
    if isinstance(expected, Step):
        assert plan.quant_step == QuantStep(
            expected.scheme, expected.algorithm, expected.group_size
        )
        assert plan.engine_args == SERVE
        assert "--quantization" not in plan.engine_args
        assert {k: v for k, v in plan.weight_genes.items() if k.startswith("quant.")} == {
            k: v for k, v in recipe.items() if k.startswith("quant.")
        }
    else:
        assert plan.engine_args == expected, (changes, caps_name)
        if not any(k.startswith(("prune.", "recovery.")) for k in changes):
            assert plan.quant_step is None


@pytest.mark.parametrize(
    ("changes", "default", "overrides"),
    ROWS,
    ids=[",".join(f"{k}={v}" for k, v in row[0].items()) for row in ROWS],
)
def test_outcome_on_every_gpu_and_release(
    changes: dict[str, Any], default: Outcome, overrides: dict[str, Outcome]
) -> None:
    for caps_name in CAPS:
        _check(changes, caps_name, overrides.get(caps_name, default))


def test_the_table_covers_every_value_of_the_builtin_space() -> None:
    """Every value has a row above, except quantization methods the method registry gives
    no vLLM path: those are refused with that reason on every GPU and release."""
    from evo_compress.methods import METHODS

    covered = {(gene, value) for changes, _, _ in ROWS for gene, value in changes.items()}
    for method in METHODS.methods("quantization"):
        if method.vllm is None:
            covered.add(("quant.method", method.name))
            for caps in CAPS.values():
                reason = unsupported_reason(SPACE.recipe({"quant.method": method.name}), caps)
                assert reason == f"`quant.method` {method.name} has no vLLM path"
    for name, gene in SPACE.genes.items():
        if isinstance(gene, ChoiceGene):
            values: tuple[Any, ...] = gene.choices
        elif isinstance(gene, BoolGene):
            values = (False, True)
        else:
            continue  # numeric: checked over their range below
        for value in values:
            if (name, value) == ("recovery.method", "qlora"):
                continue  # forbidden without nf4: its own test
            assert (name, value) in covered, (name, value)


@pytest.mark.parametrize("caps_name", list(CAPS))
def test_numeric_genes_over_their_range(caps_name: str) -> None:
    caps = CAPS[caps_name]
    for changes in (
        {"prune.method": "wanda", "prune.sparsity": 0.05},
        {"prune.method": "structured_heads", "prune.sparsity": 0.7},
        {"recovery.method": "distill", "recovery.steps": 2000, "recovery.temperature": 4.0},
        {"recovery.method": "lora", "recovery.steps": 50},
    ):
        recipe = SPACE.recipe(changes)
        plan = compile_recipe(recipe, caps)
        assert plan.engine_args == SERVE
        group = tuple({name.split(".")[0] + "." for name in changes})
        assert plan.weight_genes == {k: v for k, v in recipe.items() if k.startswith(group)}


def test_sliding_window_needs_an_architecture_that_has_one() -> None:
    recipe = SPACE.recipe({"kv.sliding_window": True, "kv.window": 1024})
    reason = unsupported_reason(recipe, VLLMCapabilities(V33, H100))
    assert reason is not None and "`kv.sliding_window`" in reason
    plan = compile_recipe(recipe, VLLMCapabilities(V33, H100, sliding_window_model=True))
    assert plan.engine_args == ("--hf-overrides", '{"sliding_window":1024}', *SERVE)
    assert json.loads(plan.engine_args[1]) == {"sliding_window": 1024}
    for window in (256, 8192):
        r = SPACE.recipe({"kv.sliding_window": True, "kv.window": window})
        args = compile_recipe(r, VLLMCapabilities(sliding_window_model=True)).engine_args
        assert args[:2] == ("--hf-overrides", f'{{"sliding_window":{window}}}')


def test_a_sliding_window_behind_a_switch_turns_the_switch_on() -> None:
    # vLLM's get_hf_config_sliding_window: a config with `use_sliding_window` false (Qwen2)
    # has no window whatever `sliding_window` says, so the override sets both.
    recipe = SPACE.recipe({"kv.sliding_window": True, "kv.window": 1024})
    caps = VLLMCapabilities(V33, H100, sliding_window_model=True, sliding_window_switch=True)
    plan = compile_recipe(recipe, caps)
    assert plan.engine_args[:1] == ("--hf-overrides",)
    assert json.loads(plan.engine_args[1]) == {"use_sliding_window": True, "sliding_window": 1024}
    assert any("every layer" in note for note in plan.notes)
    with pytest.raises(ValueError, match="sliding_window_switch"):
        VLLMCapabilities(sliding_window_switch=True)  # a switch without a window


def test_nf4_on_old_releases_uses_the_bitsandbytes_loader() -> None:
    recipe = SPACE.recipe({"quant.method": "nf4", "quant.group_size": 64})
    plan = compile_recipe(recipe, VLLMCapabilities(V10, T4))
    assert plan.engine_args == ("--quantization", "bitsandbytes", *SERVE)
    assert plan.quant_step is None and plan.weight_genes == {}
    assert any("bitsandbytes" in note for note in plan.notes)
    # Before 0.10 the loader had to be named as well.
    old = compile_recipe(recipe, VLLMCapabilities(V9, T4)).engine_args
    assert old == ("--quantization", "bitsandbytes", "--load-format", "bitsandbytes", *SERVE)
    # bitsandbytes runs on Volta; vLLM 0.33 has no loader at all.
    assert unsupported_reason(recipe, VLLMCapabilities(V10, V100)) is None
    reason = unsupported_reason(recipe, VLLMCapabilities(V33, H100, quantizer=True))
    assert reason == (
        "`quant.method` nf4 needs vLLM's bitsandbytes loader, which vLLM 0.33.0 no longer has"
    )


def test_qlora_keys_its_checkpoint_by_the_nf4_base() -> None:
    recipe = SPACE.recipe(
        {"quant.method": "nf4", "quant.group_size": 64, "recovery.method": "qlora"}
    )
    plan = compile_recipe(recipe, VLLMCapabilities(V10, A10))
    assert plan.engine_args[:2] == ("--quantization", "bitsandbytes")
    assert plan.weight_genes == {
        "quant.group_size": 64,
        "quant.method": "nf4",
        "recovery.lora_rank": 16,
        "recovery.method": "qlora",
        "recovery.steps": 200,
    }
    assert unsupported_reason(recipe, VLLMCapabilities(V33, H100)) is not None


def test_quant_steps_for_int4_methods_and_w8a8() -> None:
    caps = VLLMCapabilities(V33, H100, quantizer=True)
    for method in ("awq", "gptq", "rtn"):
        for size in (32, 64, 128):
            plan = compile_recipe(SPACE.recipe(quant_row(method, size)), caps)
            assert plan.quant_step == QuantStep("W4A16", method, size)
            assert plan.weight_genes == {"quant.group_size": size, "quant.method": method}
            assert plan.quant_step.to_json() == {
                "scheme": "W4A16",
                "algorithm": method,
                "group_size": size,
            }
    plan = compile_recipe(SPACE.recipe({"quant.method": "int8_w8a8"}), caps)
    assert plan.quant_step == QuantStep("W8A8", "smoothquant-gptq", None)
    assert plan.weight_genes == {"quant.method": "int8_w8a8"}
    # A custom space's group size that vLLM's int4 kernels cannot take.
    reason = unsupported_reason({"quant.method": "gptq", "quant.group_size": 256}, caps)
    assert reason is not None and "`quant.group_size` 256" in reason
    # Volta has no int8 tensor cores / Marlin.
    for method in ("int8_w8a8", "gptq"):
        reason = unsupported_reason(
            SPACE.recipe({"quant.method": method}), VLLMCapabilities(V33, V100, quantizer=True)
        )
        assert reason is not None and "compute capability 7.5" in reason


def test_fp8_below_ada_is_weight_only_and_says_so() -> None:
    recipe = SPACE.recipe({"quant.method": "fp8"})
    assert compile_recipe(recipe, VLLMCapabilities(V33, H100)).notes == ()
    for cc in (A10, T4):
        notes = compile_recipe(recipe, VLLMCapabilities(V33, cc)).notes
        assert len(notes) == 1 and "weight-only" in notes[0]
    reason = unsupported_reason(recipe, VLLMCapabilities(V33, V100))
    assert reason == (
        "`quant.method` fp8 needs a GPU of compute capability 7.5 or newer in vLLM, "
        "this one is 7.0"
    )


def test_unknown_compute_capability_skips_kernel_checks() -> None:
    caps = VLLMCapabilities(V33, None)
    for changes in (
        {"quant.method": "fp8"},
        {"kv.dtype": "fp8"},
        {"serve.attention_backend": "flash_attention_2"},
    ):
        assert unsupported_reason(SPACE.recipe(changes), caps) is None


def test_two_to_four_sparsity_is_noted_as_dense() -> None:
    caps = VLLMCapabilities(V33, H100)
    for pattern in ("2:4", "4:8"):
        plan = compile_recipe(
            SPACE.recipe({"prune.method": "wanda", "prune.pattern": pattern}), caps
        )
        assert plan.engine_args == SERVE
        assert plan.weight_genes == {"prune.method": "wanda", "prune.pattern": pattern}
        assert len(plan.notes) == 1
        assert f"`prune.pattern` {pattern} is served with dense kernels" in plan.notes[0]
        assert "no speedup" in plan.notes[0]
    plan = compile_recipe(SPACE.recipe({"prune.method": "magnitude"}), caps)
    assert plan.weight_genes == {
        "prune.method": "magnitude",
        "prune.pattern": "unstructured",
        "prune.sparsity": 0.5,
    }
    assert "served dense" in plan.notes[0]
    structured = compile_recipe(SPACE.recipe({"prune.method": "structured_mlp"}), caps)
    assert structured.notes == ()


def test_recovery_before_quantization_is_noted() -> None:
    caps = VLLMCapabilities(V33, H100, quantizer=True)
    plan = compile_recipe(SPACE.recipe({"quant.method": "gptq", "recovery.method": "lora"}), caps)
    assert any("not quantization loss" in note for note in plan.notes)
    assert plan.weight_genes == {
        "quant.group_size": 128,
        "quant.method": "gptq",
        "recovery.lora_rank": 16,
        "recovery.method": "lora",
        "recovery.steps": 200,
    }


A100, L4 = (8, 0), (8, 9)


@pytest.mark.parametrize("gpu", [A100, A10, L4, H100], ids=["8.0", "8.6", "8.9", "9.0"])
def test_an_fp8_kv_cache_is_not_served_by_flash_attention_2(gpu: tuple[int, int]) -> None:
    # vLLM's FLASH_ATTN reads an fp8 KV cache only with FlashAttention 3 on Hopper
    # (flash_attn_supports_fp8); flash_attention_2 runs FlashAttention 2 everywhere.
    recipe = SPACE.recipe({"kv.dtype": "fp8", "serve.attention_backend": "flash_attention_2"})
    for version in (V33, V10):
        reason = unsupported_reason(recipe, VLLMCapabilities(version, gpu))
        assert reason is not None
        assert "`kv.dtype` fp8" in reason and "flash_attention_2" in reason
        assert "FlashAttention 3" in reason and "9.0" in reason
    # Each alone is servable there, and so is an fp8 cache with FlashInfer or vLLM's choice.
    for changes in (
        {"kv.dtype": "fp8"},
        {"serve.attention_backend": "flash_attention_2"},
        {"kv.dtype": "fp8", "serve.attention_backend": "flashinfer"},
        {"kv.dtype": "fp8", "serve.attention_backend": "auto"},
    ):
        assert unsupported_reason(SPACE.recipe(changes), VLLMCapabilities(V33, gpu)) is None


def test_flash_attention_2_is_pinned_to_version_2() -> None:
    # On Hopper vLLM's FLASH_ATTN runs FlashAttention 3 unless version 2 is asked for.
    recipe = SPACE.recipe({"serve.attention_backend": "flash_attention_2"})
    plan = compile_recipe(recipe, VLLMCapabilities(V33, H100))
    assert plan.engine_args[-4:] == (
        "--attention-backend", "FLASH_ATTN", "--attention-config.flash_attn_version", "2"
    )  # fmt: skip
    old = compile_recipe(recipe, VLLMCapabilities(V10, H100))
    assert old.env == {"VLLM_ATTENTION_BACKEND": "FLASH_ATTN", "VLLM_FLASH_ATTN_VERSION": "2"}
    flashinfer = compile_recipe(
        SPACE.recipe({"serve.attention_backend": "flashinfer"}), VLLMCapabilities(V33, H100)
    )
    assert "--attention-config.flash_attn_version" not in flashinfer.engine_args


def test_old_releases_take_the_attention_backend_from_the_environment() -> None:
    recipe = SPACE.recipe({"serve.attention_backend": "flash_attention_2"})
    old = compile_recipe(recipe, VLLMCapabilities(V10, A10))
    assert old.env["VLLM_ATTENTION_BACKEND"] == "FLASH_ATTN"
    assert "--attention-backend" not in old.engine_args
    new = compile_recipe(recipe, VLLMCapabilities(V33, A10))
    assert new.env == {}
    old = compile_recipe(SPACE.recipe({"serve.attention_backend": "flashinfer"}), CAPS["0.10 t4"])
    assert old.env == {"VLLM_ATTENTION_BACKEND": "FLASHINFER"}


# --------------------------------------------------------------------------- checkpoint key


def _key(changes: dict[str, Any], caps: VLLMCapabilities | None = None) -> str:
    caps = caps or VLLMCapabilities(V33, H100, quantizer=True, sliding_window_model=True)
    return compile_recipe(SPACE.recipe(changes), caps).checkpoint_key("model-abc")


def test_checkpoint_key_ignores_serving_and_kv_genes() -> None:
    weights = {"prune.method": "wanda", "prune.sparsity": 0.3, "quant.method": "awq"}
    serving: list[dict[str, Any]] = [
        {},
        {"kv.dtype": "fp8"},
        {"kv.sliding_window": True, "kv.window": 512},
        {"serve.max_num_seqs": 4, "serve.gpu_memory_utilization": 0.6},
        {"serve.attention_backend": "flashinfer"},
    ]
    keys = {_key({**weights, **extra}) for extra in serving}
    assert len(keys) == 1
    # Online quantization is an engine argument, not a weight change.
    assert _key({"quant.method": "fp8"}) == _key({}) == _key({"kv.dtype": "fp8"})
    base = compile_recipe(SPACE.recipe({}), VLLMCapabilities())
    assert base.weight_genes == {} and base.quant_step is None


def test_checkpoint_key_changes_with_the_weights_and_the_model() -> None:
    variants: list[dict[str, Any]] = [
        {},
        {"prune.method": "wanda"},
        {"prune.method": "wanda", "prune.sparsity": 0.3},
        {"prune.method": "magnitude"},
        {"prune.method": "wanda", "prune.pattern": "2:4"},
        {"recovery.method": "lora"},
        {"recovery.method": "lora", "recovery.lora_rank": 8},
        {"recovery.method": "distill", "recovery.temperature": 3.0},
        {"quant.method": "gptq"},
        {"quant.method": "gptq", "quant.group_size": 64},
        {"quant.method": "awq"},
        {"quant.method": "int8_w8a8"},
        {"quant.method": "int8_weight_only"},
        {"quant.method": "gptq", "prune.method": "wanda"},
    ]
    keys = [_key(v) for v in variants]
    assert len(set(keys)) == len(keys)
    plan = compile_recipe(SPACE.recipe({"prune.method": "wanda"}), VLLMCapabilities())
    assert plan.checkpoint_key("model-a") != plan.checkpoint_key("model-b")
    assert len(plan.checkpoint_key("model-a")) == 64


def test_checkpoint_key_is_stable_across_mapping_order() -> None:
    caps = VLLMCapabilities(V33, H100, quantizer=True)
    a = compile_recipe(
        {
            "quant.method": "awq",
            "quant.group_size": 32,
            "prune.method": "wanda",
            "prune.pattern": "2:4",
        },
        caps,
    )
    b = compile_recipe(
        {
            "prune.pattern": "2:4",
            "prune.method": "wanda",
            "quant.group_size": 32,
            "quant.method": "awq",
        },
        caps,
    )
    assert a.checkpoint_key("m") == b.checkpoint_key("m")
    assert a.to_json() == b.to_json()
    assert json.loads(json.dumps(a.to_json())) == a.to_json()


# --------------------------------------------------------------------------- capabilities


def _single_gene_changes() -> list[tuple[str, Any, dict[str, Any]]]:
    """Every single-gene change from the baseline that the space allows."""
    baseline = SPACE.baseline()
    out = []
    for name, gene in SPACE.genes.items():
        if name not in baseline:
            continue  # inactive at the baseline: changes only with its parent
        if isinstance(gene, ChoiceGene):
            values: tuple[Any, ...] = gene.choices
        elif isinstance(gene, BoolGene):
            values = (False, True)
        else:
            values = (gene.low, gene.default, gene.high)  # type: ignore[attr-defined]
        for value in values:
            try:
                recipe = SPACE.recipe({**baseline, name: value})
            except RecipeError:
                continue  # a forbidden combination
            out.append((name, value, dict(recipe)))
    return out


ALL_CAPS = {
    **CAPS,
    "h100 window": VLLMCapabilities(V33, H100, sliding_window_model=True),
    "0.10 a10+q window": VLLMCapabilities(V10, A10, quantizer=True, sliding_window_model=True),
    "0.9 v100": VLLMCapabilities(V9, V100),
    "cpu stand-in": VLLMCapabilities(V33, None),
}


@pytest.mark.parametrize("caps_name", list(ALL_CAPS))
def test_capabilities_agree_with_unsupported_reason(caps_name: str) -> None:
    caps = ALL_CAPS[caps_name]
    allowed = capabilities(caps)
    assert set(allowed) == set(SPACE.genes)
    listed_but_unsupported = []
    for name, value, recipe in _single_gene_changes():
        supported = unsupported_reason(recipe, caps) is None
        listed = allowed[name] is None or value in allowed[name]  # type: ignore[operator]
        if supported:
            assert listed, (name, value)
        elif listed:
            listed_but_unsupported.append((name, value))
    # The one combination rule: before 0.33 nf4 works, but only with bitsandbytes' block of
    # 64, which capabilities() then lists as the only group size (without a quantizer).
    expected = [("quant.method", "nf4")] if caps.version < V33 else []
    assert listed_but_unsupported == expected
    if caps.version < V33 and not caps.quantizer:
        assert allowed["quant.group_size"] == [64]
        nf4 = SPACE.recipe({"quant.method": "nf4", "quant.group_size": 64})
        assert unsupported_reason(nf4, caps) is None
    for values in allowed.values():
        assert values is None or len(values) > 0


def test_capabilities_on_an_h100_with_vllm_033() -> None:
    assert capabilities(VLLMCapabilities(V33, H100)) == {
        "quant.method": ["none", "fp8"],
        "quant.group_size": None,  # no int4 method without a quantizer: never active
        "prune.method": ["none", "magnitude", "wanda", "structured_mlp", "structured_heads"],
        "prune.pattern": ["unstructured", "2:4", "4:8"],
        "prune.sparsity": None,
        "recovery.method": ["none", "lora", "qlora", "distill"],
        "recovery.lora_rank": [4, 8, 16, 32, 64],
        "recovery.steps": None,
        "recovery.temperature": None,
        "kv.dtype": ["auto", "fp8"],
        "kv.sliding_window": [False],
        "kv.window": None,
        "serve.max_num_seqs": [1, 2, 4, 8, 16, 32, 64, 128, 256],
        "serve.gpu_memory_utilization": None,
        "serve.attention_backend": ["auto", "flash_attention_2", "flashinfer"],
    }
    with_quantizer = capabilities(VLLMCapabilities(V33, T4, quantizer=True))
    assert with_quantizer["quant.method"] == [
        "none",
        "int8_weight_only",
        "int8_w8a8",
        "fp8",
        "awq",
        "gptq",
        "rtn",
    ]
    assert with_quantizer["quant.group_size"] == [32, 64, 128]
    assert with_quantizer["kv.dtype"] == ["auto"]
    assert with_quantizer["serve.attention_backend"] == ["auto", "flashinfer"]


# --------------------------------------------------------------------------- table, order


def test_every_registered_vllm_method_has_a_path() -> None:
    """The registry's vLLM facts name only online quantizations and llm-compressor
    algorithms this back end drives; a method without vLLM support is a reason, not a crash."""
    from dataclasses import replace

    from evo_compress.fitness.vllm import compile as vllm_compile
    from evo_compress.methods import METHODS, MethodRegistry

    for method in METHODS.methods("quantization", backend="vllm"):
        assert method.vllm is not None
        if method.vllm.quantization is not None:
            assert method.vllm.quantization in vllm_compile._ONLINE, method.name
        if method.vllm.offline:
            assert method.vllm.algorithm in vllm_compile.QUANT_ALGORITHMS, method.name
    registry = MethodRegistry()
    for method in METHODS:
        registry.register(replace(method, vllm=None) if method.name == "rtn" else method)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm_compile, "METHODS", registry)
        reason = unsupported_reason({"quant.method": "rtn"}, CAPS["h100+q"])
        assert reason == "`quant.method` rtn has no vLLM path"
        assert "rtn" not in (capabilities(CAPS["h100+q"])["quant.method"] or [])


def test_gene_table_matches_the_builtin_space() -> None:
    assert list(GENES) == list(SPACE.genes)
    for name, gene in SPACE.genes.items():
        entry = GENES[name]
        assert entry.default == gene.default, name
        if isinstance(gene, ChoiceGene):
            assert entry.domain == gene.choices, name
        elif isinstance(gene, BoolGene):
            assert entry.domain == (False, True), name
        else:
            assert entry.domain is None, name
        if entry.active_if is not None:
            (clause,) = gene.active_if.clauses
            ((parent, negated, values),) = clause.terms
            assert (parent, tuple(entry.active_if[1])) == (entry.active_if[0], tuple(values))
            assert not negated


def test_engine_args_are_deterministic() -> None:
    caps = VLLMCapabilities(V33, H100, sliding_window_model=True)
    changes = {
        "quant.method": "fp8",
        "kv.dtype": "fp8",
        "kv.sliding_window": True,
        "kv.window": 2048,
        "serve.max_num_seqs": 8,
        "serve.gpu_memory_utilization": 0.8,
        "serve.attention_backend": "flashinfer",
    }
    expected = (
        "--quantization", "fp8",
        "--kv-cache-dtype", "fp8",
        "--hf-overrides", '{"sliding_window":2048}',
        "--max-num-seqs", "8",
        "--gpu-memory-utilization", "0.8",
        "--attention-backend", "FLASHINFER",
    )  # fmt: skip
    forward = compile_recipe(dict(changes), caps)
    backward = compile_recipe(dict(reversed(list(changes.items()))), caps)
    assert forward.engine_args == backward.engine_args == expected
    assert compile_recipe(SPACE.recipe(changes), caps) == forward


def test_unknown_genes_of_a_custom_space() -> None:
    caps = VLLMCapabilities(V33, H100)
    reason = unsupported_reason({"distill.teacher": "big"}, caps)
    assert reason == "vLLM back end cannot apply gene `distill.teacher` (= 'big')"
    for neutral in ("none", "auto", False, None):
        assert unsupported_reason({"extra.thing": neutral}, caps) is None
    # With the space's defaults, any value equal to its default is fine and nothing else.
    assert unsupported_reason({"extra.n": 5}, caps, defaults={"extra.n": 5}) is None
    reason = unsupported_reason({"extra.n": 6}, caps, defaults={"extra.n": 5})
    assert reason is not None and "`extra.n`" in reason
    with pytest.raises(EvaluationError, match=r"`extra\.n`"):
        compile_recipe({"extra.n": 6}, caps, defaults={"extra.n": 5})
    # A built-in gene at a value vLLM's table does not know (a custom space's choices).
    reason = unsupported_reason({"quant.method": "hqq"}, caps)
    assert reason == "`quant.method` = 'hqq' is not a value the vLLM back end knows"


# --------------------------------------------------------------------------- version, data


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("0.33.0", (0, 33, 0)),
        ("0.10.1.dev3+gabc", (0, 10, 1)),
        ("vllm 0.9.2", (0, 9, 2)),
        ("0.33", (0, 33, 0)),
        ("  0.11.0rc1\n", (0, 11, 0)),
        ("v0.12.0", (0, 12, 0)),
        ("0.8.5.post1", (0, 8, 5)),
        ("0.6.4+cu121", (0, 6, 4)),
        ("vLLM version 0.7.3", (0, 7, 3)),
    ],
)
def test_parse_version(text: str, version: tuple[int, int, int]) -> None:
    assert VLLMCapabilities.parse_version(text) == version


@pytest.mark.parametrize(
    "text",
    [
        "",
        "vllm",
        "abc",
        "33",
        "INFO 09-01 12:34:56 [__init__.py:241] Automatically detected platform cuda.",
        "Python 3.11.7",
        "0.33.0 extra words",
    ],
)
def test_parse_version_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a vLLM version"):
        VLLMCapabilities.parse_version(text)


def test_capabilities_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="version"):
        VLLMCapabilities(version=(0, 33))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compute_capability"):
        VLLMCapabilities(compute_capability=(9,))  # type: ignore[arg-type]
    assert VLLMCapabilities(compute_capability=(8, 6)).sm == 86
    assert VLLMCapabilities().sm is None


def test_plan_round_trips_through_json() -> None:
    caps = VLLMCapabilities(V33, A10, quantizer=True)
    plan = compile_recipe(
        SPACE.recipe({"quant.method": "awq", "prune.method": "wanda", "kv.dtype": "fp8"}), caps
    )
    data = json.loads(json.dumps(plan.to_json()))
    assert data == plan.to_json()
    again = ServePlan(
        weight_genes=data["weight_genes"],
        quant_step=QuantStep(**data["quant_step"]),
        engine_args=tuple(data["engine_args"]),
        env=data["env"],
        notes=tuple(data["notes"]),
    )
    assert again == plan
    assert again.checkpoint_key("m") == plan.checkpoint_key("m")
