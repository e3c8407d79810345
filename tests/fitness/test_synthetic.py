"""Tests of the synthetic evaluator: determinism, landscape shape, failures and settings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evo_compress.exceptions import ConfigError
from evo_compress.fitness._base import EvaluationContext, EvaluationResult, make_evaluator
from evo_compress.fitness.synthetic import SyntheticEvaluator
from evo_compress.genomes import SearchSpace
from evo_compress.objectives import OBJECTIVE_NAMES

SPACE = SearchSpace.builtin()
ROOT = Path(__file__).resolve().parents[2]


def evaluate(recipe: dict[str, Any], **settings: Any) -> EvaluationResult:
    evaluator = SyntheticEvaluator(settings, EvaluationContext())
    return evaluator.evaluate(SPACE.recipe(recipe), SPACE)


def objectives(recipe: dict[str, Any], **settings: Any) -> dict[str, float]:
    result = evaluate(recipe, **settings)
    assert result.ok, result.reason
    assert result.objectives is not None
    return result.objectives


AWQ = {"quant.method": "awq", "quant.group_size": 128}
WANDA_HALF = {"prune.method": "wanda", "prune.sparsity": 0.5}
MIXED = {
    "quant.method": "gptq",
    "quant.group_size": 64,
    "prune.method": "magnitude",
    "prune.sparsity": 0.3,
    "kv.dtype": "fp8",
    "serve.max_num_seqs": 8,
}


def test_registry_builds_the_synthetic_evaluator() -> None:
    evaluator = make_evaluator("synthetic", {"seed": 3}, EvaluationContext())
    assert isinstance(evaluator, SyntheticEvaluator)
    assert evaluator.name == "synthetic"
    assert set(evaluator.capabilities()) == set(SPACE.genes)
    caps = dict(evaluator.capabilities())
    # Every built-in quantization method has synthetic terms, so nothing is narrowed.
    assert caps.pop("quant.method") == SPACE.genes["quant.method"].to_data()["choices"]
    assert all(v is None for v in caps.values())
    assert evaluator.restrict_space(SPACE) is SPACE


def test_a_method_without_synthetic_terms_is_narrowed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from evo_compress.methods import METHODS, MethodRegistry

    registry = MethodRegistry()
    for method in METHODS:
        registry.register(replace(method, synthetic=None) if method.name == "gptq" else method)
    monkeypatch.setattr("evo_compress.fitness.synthetic.METHODS", registry)
    evaluator = SyntheticEvaluator({}, EvaluationContext())
    restricted = evaluator.restrict_space(SPACE)
    assert "gptq" not in restricted.genes["quant.method"].to_data()["choices"]
    reason = evaluator.infeasible_reason(SPACE.recipe({"quant.method": "gptq"}), SPACE)
    assert reason is not None and "`quant.method` = 'gptq'" in reason


def test_five_finite_objectives_and_synthetic_metadata() -> None:
    for recipe in ({}, AWQ, WANDA_HALF, MIXED):
        result = evaluate(recipe)
        assert result.ok, result.reason
        assert result.objectives is not None
        assert list(result.objectives) == list(OBJECTIVE_NAMES)
        assert all(math.isfinite(v) for v in result.objectives.values())
        assert 0.0 <= result.objectives["accuracy"] <= 1.0
        assert all(result.objectives[n] > 0 for n in OBJECTIVE_NAMES if n != "accuracy")
        meta = result.metadata
        assert meta["evaluator"] == "synthetic"
        assert meta["synthetic"] is True
        assert "not a measurement" in meta["note"]
        assert set(meta["objectives"]) == set(OBJECTIVE_NAMES)
        assert all(v["how"] == "synthetic" for v in meta["objectives"].values())
        json.dumps(meta)  # stored as plain JSON


def test_same_recipe_is_bit_identical_in_any_call_order() -> None:
    recipes = [SPACE.recipe(r) for r in ({}, AWQ, WANDA_HALF, MIXED)]
    forward = SyntheticEvaluator({}, EvaluationContext())
    first = [forward.evaluate(r, SPACE).objectives for r in recipes]
    again = [forward.evaluate(r, SPACE).objectives for r in recipes]
    backward = SyntheticEvaluator({}, EvaluationContext())
    reversed_run = [backward.evaluate(r, SPACE).objectives for r in reversed(recipes)]
    assert first == again
    assert first == list(reversed(reversed_run))


def test_same_recipe_is_bit_identical_in_another_process() -> None:
    code = (
        "import json\n"
        "from evo_compress.fitness._base import EvaluationContext\n"
        "from evo_compress.fitness.synthetic import SyntheticEvaluator\n"
        "from evo_compress.genomes import SearchSpace\n"
        "space = SearchSpace.builtin()\n"
        f"recipe = space.recipe({MIXED!r})\n"
        "result = SyntheticEvaluator({}, EvaluationContext()).evaluate(recipe, space)\n"
        "print(json.dumps(result.objectives))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert json.loads(out.stdout) == objectives(MIXED)


def test_seed_changes_only_the_noise() -> None:
    seed0, seed1 = objectives(MIXED, seed=0), objectives(MIXED, seed=1)
    assert seed0["accuracy"] != seed1["accuracy"]
    assert seed0["latency"] != seed1["latency"]
    assert seed0["memory"] == seed1["memory"]  # memory carries no noise
    quiet0, quiet1 = objectives(MIXED, seed=0, noise=0.0), objectives(MIXED, seed=1, noise=0.0)
    assert quiet0 == quiet1
    assert abs(seed0["accuracy"] - quiet0["accuracy"]) < 0.05


def test_baseline_is_near_the_base_accuracy_and_plausibly_sized() -> None:
    base = objectives({})
    assert base["accuracy"] == pytest.approx(0.80, abs=0.015)
    assert 14 * 1024 <= base["memory"] <= 20 * 1024
    assert 7.0 <= base["latency"] <= 12.0


def test_awq_saves_memory_and_latency_for_a_little_accuracy() -> None:
    base, awq = objectives({}, noise=0.0), objectives(AWQ, noise=0.0)
    assert 0.25 < awq["memory"] / base["memory"] < 0.45
    assert awq["latency"] < base["latency"]
    assert 0.005 < base["accuracy"] - awq["accuracy"] < 0.03


def test_smaller_groups_cost_memory_and_buy_accuracy() -> None:
    g32 = objectives({"quant.method": "rtn", "quant.group_size": 32}, noise=0.0)
    g128 = objectives({"quant.method": "rtn", "quant.group_size": 128}, noise=0.0)
    assert g32["memory"] > g128["memory"]
    assert g32["accuracy"] > g128["accuracy"]


def test_quantization_methods_rank_plausibly() -> None:
    acc = {
        m: objectives({"quant.method": m}, noise=0.0)["accuracy"]
        for m in ("none", "int8_weight_only", "fp8", "int8_w8a8", "awq", "gptq", "rtn")
    }
    assert acc["none"] > acc["int8_weight_only"] > acc["fp8"] > acc["int8_w8a8"] > acc["awq"]
    assert acc["awq"] > acc["rtn"] and acc["gptq"] > acc["rtn"]


def test_unstructured_pruning_loses_accuracy_but_saves_no_memory() -> None:
    base, wanda = objectives({}, noise=0.0), objectives(WANDA_HALF, noise=0.0)
    assert base["accuracy"] - wanda["accuracy"] > 0.02
    assert wanda["memory"] == pytest.approx(base["memory"])
    magnitude = objectives({**WANDA_HALF, "prune.method": "magnitude"}, noise=0.0)
    assert magnitude["accuracy"] < wanda["accuracy"]


def test_pruning_loss_grows_super_linearly() -> None:
    acc = [
        objectives({"prune.method": "wanda", "prune.sparsity": s}, noise=0.0)["accuracy"]
        for s in (0.0 + 0.05, 0.35, 0.65)
    ]
    base = objectives({}, noise=0.0)["accuracy"]
    first, second = acc[0] - acc[1], acc[1] - acc[2]
    assert base >= acc[0] > acc[1] > acc[2]
    assert second > 2 * first


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_costs_more_than_four_eight_and_unstructured(method: str) -> None:
    unstructured = objectives({"prune.method": method, "prune.sparsity": 0.5}, noise=0.0)
    four_eight = objectives({"prune.method": method, "prune.pattern": "4:8"}, noise=0.0)
    two_four = objectives({"prune.method": method, "prune.pattern": "2:4"}, noise=0.0)
    assert two_four["accuracy"] < four_eight["accuracy"] < unstructured["accuracy"]
    assert two_four["latency"] < unstructured["latency"]  # sparse tensor cores
    assert two_four["memory"] < unstructured["memory"]


def test_heavy_structured_pruning_with_rtn_wrecks_accuracy_and_compounds() -> None:
    prune = {"prune.method": "structured_mlp", "prune.sparsity": 0.7}
    both = objectives({**prune, "quant.method": "rtn"}, noise=0.0)
    assert both["accuracy"] < 0.5
    base = objectives({}, noise=0.0)
    assert both["memory"] < base["memory"] / 3
    # Super-additive: the joint loss exceeds the sum of the separate losses.
    mild = {"prune.method": "wanda", "prune.sparsity": 0.4}
    loss_q = base["accuracy"] - objectives({"quant.method": "rtn"}, noise=0.0)["accuracy"]
    loss_p = base["accuracy"] - objectives(mild, noise=0.0)["accuracy"]
    joint = base["accuracy"] - objectives({**mild, "quant.method": "rtn"}, noise=0.0)["accuracy"]
    assert joint > loss_q + loss_p


def test_recovery_buys_accuracy_back_and_costs_co2() -> None:
    pruned = objectives(WANDA_HALF, noise=0.0)
    short = objectives({**WANDA_HALF, "recovery.method": "lora", "recovery.steps": 100}, noise=0)
    long = objectives({**WANDA_HALF, "recovery.method": "lora", "recovery.steps": 2000}, noise=0)
    assert pruned["accuracy"] < short["accuracy"] < long["accuracy"]
    assert pruned["co2"] < short["co2"] < long["co2"]
    assert long["energy"] == pytest.approx(pruned["energy"], rel=0.01)  # one-time cost only
    result = evaluate({**WANDA_HALF, "recovery.method": "lora"})
    assert result.metadata["compression_energy_j"]["recovery_j"] > 0


def test_distillation_has_a_temperature_optimum_near_two() -> None:
    acc = {
        t: objectives(
            {**WANDA_HALF, "recovery.method": "distill", "recovery.temperature": t}, noise=0.0
        )["accuracy"]
        for t in (1.0, 2.0, 4.0)
    }
    assert acc[2.0] > acc[1.0] and acc[2.0] > acc[4.0]


def test_serving_knobs_trade_latency_memory_and_energy() -> None:
    one = objectives({"serve.max_num_seqs": 1}, noise=0.0)
    many = objectives({"serve.max_num_seqs": 128}, noise=0.0)
    assert many["latency"] > one["latency"]
    assert many["memory"] > one["memory"]
    assert many["energy"] < one["energy"]
    eager = objectives({"serve.attention_backend": "eager"}, noise=0.0)
    flash = objectives({"serve.attention_backend": "flash_attention_2"}, noise=0.0)
    assert eager["latency"] > flash["latency"]
    window = {"kv.sliding_window": True, "kv.window": 512}
    windowed = objectives({**window, "serve.max_num_seqs": 128}, noise=0.0)
    assert windowed["memory"] < many["memory"]
    assert windowed["accuracy"] < many["accuracy"]
    kv8 = objectives({"kv.dtype": "fp8", "serve.max_num_seqs": 128}, noise=0.0)
    assert kv8["memory"] < many["memory"]


def test_no_recipe_dominates_the_sample() -> None:
    rng = np.random.default_rng(0)
    evaluator = SyntheticEvaluator({}, EvaluationContext())
    rows = []
    for _ in range(150):
        result = evaluator.evaluate(SPACE.sample(rng), SPACE)
        if result.ok and result.objectives is not None:
            o = result.objectives
            rows.append([-o["accuracy"], o["latency"], o["memory"], o["energy"], o["co2"]])
    points = np.array(rows)
    assert len(points) > 50
    front = [
        i
        for i, p in enumerate(points)
        if not any(np.all(q <= p) and np.any(q < p) for q in points)
    ]
    assert len(front) > 3
    assert int(points[:, 0].argmin()) != int(points[:, 2].argmin())


def test_out_of_memory_is_a_recorded_failure() -> None:
    recipe = {"serve.max_num_seqs": 256, "serve.gpu_memory_utilization": 0.5}
    result = evaluate(recipe, n_params_b=70)
    assert result.status == "failed"
    assert result.reason is not None and "out of memory" in result.reason
    assert "0.5 x 80 GiB" in result.reason
    # The same recipe fits a smaller model, and a bigger device setting is honoured.
    assert evaluate(recipe, n_params_b=1).ok
    huge = evaluate({"quant.method": "awq"}, n_params_b=70, device_memory_gb=141)
    assert huge.ok, huge.reason


def test_device_memory_defaults_to_the_hardware_config() -> None:
    from evo_compress.config import HardwareConfig

    context = EvaluationContext(hardware=HardwareConfig(memory_gb=24))
    evaluator = SyntheticEvaluator({}, context)
    assert evaluator.device_memory_gb == 24
    result = evaluator.evaluate(SPACE.recipe({"serve.max_num_seqs": 256}), SPACE)
    assert result.status == "failed" and "24 GiB" in (result.reason or "")


def test_fail_if_injects_a_failure() -> None:
    settings = {"fail_if": {"quant.method": ["rtn"], "prune.sparsity": [0.3]}}
    failed = evaluate({"quant.method": "rtn"}, **settings)
    assert failed.status == "failed"
    assert failed.reason is not None
    assert "fail_if" in failed.reason and "quant.method = rtn" in failed.reason
    assert (
        evaluate({"prune.method": "wanda", "prune.sparsity": 0.3}, **settings).status == "failed"
    )
    assert evaluate({"quant.method": "awq"}, **settings).ok
    assert evaluate({"prune.method": "wanda", "prune.sparsity": 0.35}, **settings).ok


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"cost_s": -1}, "`evaluator.settings.cost_s` must be >= 0, got -1"),
        ({"n_params_b": 0}, "`evaluator.settings.n_params_b` must be > 0"),
        ({"base_accuracy": 1.5}, "`evaluator.settings.base_accuracy` must be <= 1"),
        ({"noise": -0.1}, "`evaluator.settings.noise`"),
        ({"device_memory_gb": -8}, "`evaluator.settings.device_memory_gb`"),
        ({"context_tokens": "long"}, "`evaluator.settings.context_tokens`"),
        ({"n_params_b": float("nan")}, "`evaluator.settings.n_params_b`"),
        ({"nosie": 0.1}, "`evaluator.settings.nosie` is not a setting"),
        ({"fail_if": {"quant.methd": ["rtn"]}}, "did you mean `quant.method`"),
        ({"fail_if": {"quant.method": ["int3"]}}, "`evaluator.settings.fail_if.quant.method`"),
        ({"fail_if": {"quant.method": "rtn"}}, "`evaluator.settings.fail_if.quant.method`"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_field(
    settings: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        SyntheticEvaluator(settings, EvaluationContext())
    assert field in str(info.value)
    assert "\n" not in str(info.value)


def test_cost_s_sleeps_per_evaluation() -> None:
    evaluator = SyntheticEvaluator({"cost_s": 0.05}, EvaluationContext())
    start = time.perf_counter()
    result = evaluator.evaluate(SPACE.baseline(), SPACE)
    assert time.perf_counter() - start >= 0.05
    assert result.ok and result.duration_s >= 0.05
