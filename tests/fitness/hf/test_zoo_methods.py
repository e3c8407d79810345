"""Every zoo architecture through the transformers back end: one recipe per method family is
applied and measured (five finite objectives), or refused from the model's config before any
weight is loaded; structured pruning of fused layouts (Phi-3, Mixtral's experts) is exact."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig  # noqa: E402
from evo_compress.fitness import EvaluationContext, make_evaluator  # noqa: E402
from evo_compress.fitness._base import EvaluationResult  # noqa: E402
from evo_compress.fitness.hf import evaluator as hf_evaluator  # noqa: E402
from evo_compress.fitness.model.prune import apply_pruning, decoder_experts  # noqa: E402
from evo_compress.genomes import SearchSpace  # noqa: E402
from evo_compress.reference.zoo import (  # noqa: E402
    SIZE_100M,
    ZOO,
    ensure_zoo_model,
    model_config,
)

SPACE = SearchSpace.builtin()
SETTINGS = {
    "threads": 1,
    "limit": 8,
    "latency_prompts": 2,
    "max_new_tokens": 2,
    "latency_repeats": 1,
    "calibration_samples": 8,
    "recovery_batch_size": 8,
}
# One representative per method family (the CI part of benchmarks/bench_zoo.py's matrix).
FAMILIES: dict[str, dict[str, Any]] = {
    "rtn": {"quant": {"method": "rtn", "group_size": 32}},
    "wanda_2:4": {"prune": {"method": "wanda", "pattern": "2:4"}},
    "structured_mlp": {"prune": {"method": "structured_mlp", "sparsity": 0.25}},
    "structured_heads": {"prune": {"method": "structured_heads", "sparsity": 0.5}},
    "lora": {"recovery": {"method": "lora", "lora_rank": 4, "steps": 50}},
}


def evaluator_for(folder: Path) -> Any:
    context = EvaluationContext(
        ModelConfig(id=str(folder)), HardwareConfig(device="cpu"), CarbonConfig()
    )
    return make_evaluator("transformers", SETTINGS, context)


@pytest.fixture(scope="module")
def prepared() -> Any:
    """One prepared evaluator per architecture (preparing writes the task files and
    fingerprints the model: seconds each)."""
    evaluators: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in evaluators:
            evaluators[arch] = evaluator_for(ensure_zoo_model(arch))
            evaluators[arch].prepare()
        return evaluators[arch]

    yield get
    for evaluator in evaluators.values():
        evaluator.close()


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Run the worker's function in this process (the worker's spawn and imports would cost
    seconds per evaluation); the payloads it was given are collected."""
    calls: list[dict[str, Any]] = []

    def run(target: str, payload: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(payload)
        module, function = target.split(":")
        result: EvaluationResult = getattr(importlib.import_module(module), function)(payload)
        return result

    monkeypatch.setattr(hf_evaluator, "run_in_worker", run)
    return calls


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a worker is started or a model's weights are loaded."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the recipe reached the worker: it should be refused before")

    monkeypatch.setattr(hf_evaluator, "run_in_worker", refuse)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("arch", sorted(ZOO))
def test_each_family_applies_and_measures_on_each_architecture(arch, family, prepared, in_process):
    evaluator = prepared(arch)
    recipe = SPACE.recipe({**FAMILIES[family], "serve": {"max_num_seqs": 2}})
    result = evaluator.evaluate(recipe, SPACE)
    assert result.ok, result.reason
    assert in_process, "the evaluation did not run"
    objectives = result.objectives or {}
    assert len(objectives) == 5 and all(math.isfinite(v) for v in objectives.values())
    details = result.metadata["compression"]
    if family.startswith("structured"):
        assert details["prune"]["units_removed"] > 0
        assert details["prune"]["measured_sparsity"] > 0.05
    if family == "wanda_2:4":
        assert details["prune"]["measured_sparsity"] >= 0.5
    if arch == "mixtral":
        experts = details["quant"]["experts"]
        assert experts["bytes_before"] > 0 and experts["bytes_after"] > 0
        if family == "wanda_2:4":  # the experts are pruned too, not only the attention
            pruned = [n for n in details["prune"]["layers"] if n.endswith("experts.down_proj")]
            assert pruned and all(details["prune"]["layers"][n] >= 0.5 for n in pruned)


def test_quantization_leaves_mixtral_experts_as_they_are_and_says_so(prepared, in_process):
    evaluator = prepared("mixtral")
    result = evaluator.evaluate(SPACE.recipe({"quant": {"method": "int8_weight_only"}}), SPACE)
    assert result.ok, result.reason
    quant = result.metadata["compression"]["quant"]
    experts = quant["experts"]
    # 2 layers x 4 experts x (2*256*128 + 128*256) float32 parameters.
    assert experts["params"] == 2 * 4 * 3 * 256 * 128
    assert experts["bytes_before"] == experts["bytes_after"] == experts["params"] * 4
    assert quant["weight_bytes"] > experts["bytes_after"]


REFUSED = [
    ("phi3", {"quant": {"method": "awq", "group_size": 32}}, "awq (hand-written) cannot"),
    ("gemma3", {"quant": {"method": "awq", "group_size": 32}}, "(1 + w)"),
    ("mixtral", {"quant": {"method": "awq", "group_size": 32}}, "fused 3-D expert"),
    # 4 heads over 2 KV groups of head_dim 32: one group is left, o_proj 64 wide.
    (
        "llama",
        {
            "prune": {"method": "structured_heads", "sparsity": 0.5},
            "quant": {"method": "nf4", "group_size": 128},
        },
        "widths [64] after pruning",
    ),
    ("qwen3", {"kv": {"sliding_window": True}}, "no sliding-window attention"),
    ("gemma3", {"kv": {"dtype": "fp8"}}, "only full-attention layers"),
]


@pytest.mark.parametrize(("arch", "genes", "reason"), REFUSED)
def test_what_an_architecture_cannot_take_is_refused_before_loading(
    arch, genes, reason, no_loading
):
    evaluator = evaluator_for(ensure_zoo_model(arch))
    result = evaluator.evaluate(SPACE.recipe(genes), SPACE)
    assert result.status == "infeasible"
    assert reason in (result.reason or "")


def test_a_shape_is_refused_from_config_json_alone(tmp_path, no_loading):
    """The measured case: a 576-wide Llama with nf4 at group size 128. The folder holds only
    config.json, so nothing could have been loaded."""
    model_config(SIZE_100M).save_pretrained(tmp_path)
    evaluator = evaluator_for(tmp_path)
    result = evaluator.evaluate(
        SPACE.recipe({"quant": {"method": "nf4", "group_size": 128}}), SPACE
    )
    assert result.status == "infeasible"
    assert "multiple of it" in (result.reason or "") and "[576]" in (result.reason or "")
    ok = SPACE.recipe({"quant": {"method": "nf4", "group_size": 64}})
    assert evaluator.infeasible_reason(ok, SPACE) is None


def test_the_search_space_drops_whole_choices_the_model_cannot_take():
    space = evaluator_for(ensure_zoo_model("phi3")).restrict_space(SPACE)
    assert "awq" not in space.genes["quant.method"].choices
    assert "gptq" in space.genes["quant.method"].choices
    assert list(space.genes["kv.sliding_window"].choices) == [False]  # pinned
    mistral = evaluator_for(ensure_zoo_model("mistral")).restrict_space(SPACE)
    assert "awq" in mistral.genes["quant.method"].choices
    assert mistral.genes["kv.sliding_window"] == SPACE.genes["kv.sliding_window"]


# ---------------------------------------------------------------- exactness of fused layouts


def _load(arch: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ensure_zoo_model(arch), dtype=torch.float32).eval()


def _logits(model: Any) -> torch.Tensor:
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def test_phi3_fused_mlp_pruning_removes_exactly_the_dead_channels():
    model = _load("phi3")
    size = model.config.intermediate_size
    dead = torch.arange(0, size, 4)  # a quarter of the channels contribute nothing
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_up_proj.weight[dead] = 0
            layer.mlp.gate_up_proj.weight[dead + size] = 0
            layer.mlp.down_proj.weight[:, dead] = 0
    before = _logits(model)
    details = apply_pruning(model, {"prune.method": "structured_mlp", "prune.sparsity": 0.25})
    assert details.details["units_after"] == size - len(dead)
    assert model.model.layers[0].mlp.gate_up_proj.out_features == 2 * (size - len(dead))
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-5)


def test_phi3_fused_qkv_head_pruning_removes_exactly_the_dead_group():
    model = _load("phi3")
    head_dim = model.model.layers[0].self_attn.head_dim
    group_width = model.config.num_attention_heads // model.config.num_key_value_heads * head_dim
    with torch.no_grad():
        for layer in model.model.layers:  # KV group 1's heads add nothing to the output
            layer.self_attn.o_proj.weight[:, group_width : 2 * group_width] = 0
    before = _logits(model)
    apply_pruning(model, {"prune.method": "structured_heads", "prune.sparsity": 0.5})
    assert model.config.num_key_value_heads == 1
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-5)


def test_mixtral_expert_channel_pruning_removes_exactly_each_experts_dead_channels():
    model = _load("mixtral")
    size = model.config.intermediate_size
    with torch.no_grad():
        for experts in decoder_experts(model).values():
            for e in range(experts.gate_up_proj.shape[0]):  # other dead channels per expert
                dead = torch.arange(e, size, 4)
                experts.gate_up_proj[e, dead] = 0
                experts.gate_up_proj[e, dead + size] = 0
                experts.down_proj[e, :, dead] = 0
    before = _logits(model)
    apply_pruning(model, {"prune.method": "structured_mlp", "prune.sparsity": 0.25})
    for experts in decoder_experts(model).values():
        assert experts.gate_up_proj.shape[1:] == (2 * (size - size // 4), 128)
        assert experts.down_proj.shape[2] == size - size // 4
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-5)


def test_mixtral_n_m_pruning_reaches_every_expert_matrix():
    model = _load("mixtral")
    calibration = torch.randint(
        0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1)
    )
    result = apply_pruning(model, {"prune.method": "wanda", "prune.pattern": "2:4"}, calibration)
    for name, experts in decoder_experts(model).items():
        for param in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, param).detach()
            groups = weight.reshape(-1, 4)
            assert int((groups != 0).sum(dim=1).max()) <= 2, f"{name}.{param} is not 2:4"
            assert f"{name}.{param}" in result.masks


@pytest.mark.parametrize(
    ("arch", "method"),
    [("phi3", "structured_heads"), ("phi3", "structured_mlp"), ("mixtral", "structured_mlp")],
)
def test_a_pruned_fused_layout_saves_and_reloads_to_the_same_logits(arch, method, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _load(arch)
    apply_pruning(model, {"prune.method": method, "prune.sparsity": 0.5})
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(model))


def test_config_rules_for_shapes_and_unknown_layouts():
    from evo_compress.fitness.model.architecture import unsupported_reason

    shape = {"model_type": "llama", "hidden_size": 128, "num_attention_heads": 4}
    odd = model_config({**shape, "intermediate_size": 250, "num_key_value_heads": 1})
    assert "divisible by 4" in (
        unsupported_reason(odd, {"prune.method": "magnitude", "prune.pattern": "2:4"}) or ""
    )
    assert "[250]" in (
        unsupported_reason(odd, {"quant.method": "rtn", "quant.group_size": 32}) or ""
    )
    assert "1 KV head" in (unsupported_reason(odd, {"prune.method": "structured_heads"}) or "")
    unknown = model_config(
        {"model_type": "gpt_neox", "hidden_size": 128, "intermediate_size": 256}
    )
    assert "not one of" in (unsupported_reason(unknown, {"prune.method": "structured_mlp"}) or "")
    assert unsupported_reason(unknown, {"quant.method": "rtn", "quant.group_size": 32}) is None


def test_in_a_run_the_workers_output_goes_to_the_runs_logs(prepared, monkeypatch, tmp_path):
    evaluator = prepared(sorted(ZOO)[0])
    kept: list[Any] = []

    def run(*args: Any, log_path: Any = None, **kwargs: Any) -> Any:
        kept.append(log_path)
        return EvaluationResult.failure("not evaluated here")

    monkeypatch.setattr(hf_evaluator, "run_in_worker", run)
    recipe = SPACE.recipe({"quant": {"method": "rtn"}})
    evaluator.evaluate(recipe, SPACE)  # outside a run: a temporary file, removed
    evaluator.set_run_dir(tmp_path)
    try:
        evaluator.evaluate(recipe, SPACE)
    finally:
        evaluator.set_run_dir(None)
    assert kept[0] is None
    assert kept[1].parent == tmp_path / "logs"
    assert kept[1].name.startswith(f"worker-{recipe.short_hash}-")
