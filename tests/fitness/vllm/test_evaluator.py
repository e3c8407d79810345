"""The vLLM evaluator end to end on the CPU: the reference model, checkpoints built and
cached, served by the stand-in server (transformers behind vLLM's API), measured through the
same client and lm-eval path a real vLLM server gets."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness import EVALUATORS, EvaluationContext
from evo_compress.fitness.racing import FULL, QUICK, STAGE_KEY, RaceMember, RaceRule
from evo_compress.fitness.vllm.evaluator import VLLMEvaluator, VLLMSettings, probe_version
from evo_compress.genomes import SearchSpace
from evo_compress.objectives import task_scores
from evo_compress.testing.user_tasks import write_user_tasks

STANDIN = [sys.executable, "-m", "evo_compress_doubles.vllm_server"]
SPACE = SearchSpace.builtin()


def evaluator(tmp_path: Path, device: str = "cpu", **settings: object) -> VLLMEvaluator:
    context = EvaluationContext(
        ModelConfig(id="reference"), HardwareConfig(device=device), CarbonConfig()
    )
    base = {
        "command": STANDIN,
        "vllm_version": "0.33.0",
        "latency_requests": 4,
        "max_new_tokens": 4,
        "warmup_requests": 1,
        "limit": 12,
        "startup_timeout_s": 120,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "threads": 1,
    }
    ev = EVALUATORS.get("vllm")(base | settings, context)
    assert isinstance(ev, VLLMEvaluator)
    ev.set_run_dir(tmp_path / "run")
    return ev


def test_settings_are_validated_with_the_field_named(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluator\.settings\.latency_requests"):
        evaluator(tmp_path, latency_requests=0)
    with pytest.raises(ConfigError, match=r"evaluator\.settings\.command"):
        evaluator(tmp_path, command=[])
    assert evaluator(tmp_path, command="vllm serve --x 1").config.command == (
        "vllm",
        "serve",
        "--x",
        "1",
    )


def test_what_vllm_cannot_serve_is_infeasible_with_a_reason(tmp_path):
    ev = evaluator(tmp_path)
    nf4 = SPACE.recipe({"quant.method": "nf4"})
    assert "bitsandbytes" in (ev.infeasible_reason(nf4, SPACE) or "")
    eager = SPACE.recipe({"serve.attention_backend": "eager"})
    assert "eager" in (ev.infeasible_reason(eager, SPACE) or "")
    # Without `python` (no llm-compressor) the 4-bit methods are out of the space.
    restricted = ev.restrict_space(SPACE)
    methods = restricted.genes["quant.method"].choices  # type: ignore[attr-defined]
    assert "awq" not in methods and "nf4" not in methods and "fp8" in methods
    assert "qlora" not in restricted.genes["recovery.method"].choices  # type: ignore[attr-defined]
    with_quantizer = evaluator(tmp_path, python=sys.executable).restrict_space(SPACE)
    assert "gptq" in with_quantizer.genes["quant.method"].choices  # type: ignore[attr-defined]


def test_a_qwen2_style_sliding_window_takes_effect_in_the_server(tmp_path):
    from evo_compress.fitness.vllm.client import kv_cache_figures, scrape_metrics
    from evo_compress.fitness.vllm.compile import compile_recipe
    from evo_compress.fitness.vllm.server import ServerSpec, VLLMServer

    # Qwen2's config: a window size, switched off by `use_sliding_window`.
    model = tmp_path / "qwen2"
    model.mkdir()
    config = {
        "model_type": "qwen2",
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 28,
    }
    (model / "config.json").write_text(json.dumps(config))
    context = EvaluationContext(ModelConfig(id=str(model)), HardwareConfig(), CarbonConfig())
    ev = EVALUATORS.get("vllm")({"command": STANDIN, "vllm_version": "0.33.0"}, context)
    assert isinstance(ev, VLLMEvaluator)
    recipe = SPACE.recipe({"kv.sliding_window": True, "kv.window": 1024})
    assert ev.infeasible_reason(recipe, SPACE) is None
    plan = compile_recipe(dict(recipe), ev.caps)
    # The stand-in applies --hf-overrides to config.json and reports the window vLLM would
    # use in vllm:cache_config_info, as vLLM does.
    spec = ServerSpec(tuple(STANDIN), str(model), (*plan.engine_args, "--fake-echo"))
    with VLLMServer(spec, tmp_path / "vllm.log", health_interval_s=0.05) as server:
        figures = kv_cache_figures(scrape_metrics(server.base_url))
    assert figures["sliding_window"] == 1024


def test_the_version_is_asked_of_the_command(tmp_path):
    fake = tmp_path / "vllm"
    fake.write_text("#!/bin/sh\necho 0.31.2\n")
    fake.chmod(0o755)
    assert probe_version((str(fake), "serve")) == "0.31.2"
    assert probe_version((str(tmp_path / "missing"), "serve")) is None


def test_the_fingerprint_names_the_vllm_version_and_settings(tmp_path):
    a = evaluator(tmp_path).fingerprint()
    assert a == evaluator(tmp_path, startup_timeout_s=5).fingerprint()  # limits change nothing
    assert a != evaluator(tmp_path, vllm_version="0.32.0").fingerprint()
    assert a != evaluator(tmp_path, max_new_tokens=8).fingerprint()


@pytest.mark.slow
def test_a_recipe_is_served_and_measured_through_the_api(tmp_path):
    ev = evaluator(tmp_path)
    baseline = SPACE.baseline()
    result = ev.evaluate(baseline, SPACE)
    assert result.ok, result.reason
    objectives = result.objectives or {}
    assert 0.5 <= objectives["accuracy"] <= 1.0  # the reference model answers through the API
    # The accuracy's noise over the `limit` items, in the record's documented place.
    p, n = objectives["accuracy"], result.metadata["accuracy_n"]
    assert n == 12
    assert result.metadata["accuracy_stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)
    # One `task`: one entry of `metadata["tasks"]`, under the configured name.
    [(name, scored)] = result.metadata["tasks"].items()
    assert name == "reference" and scored["score"] == objectives["accuracy"]
    assert scored["n"] == 12 and scored["weight"] == 1.0
    assert objectives["latency"] > 0 and objectives["memory"] > 0 and objectives["energy"] > 0
    meta = result.metadata
    latency = meta["objectives"]["latency"]
    # The server's own figure, the same way for every evaluation; the stream's beside it.
    assert latency["source"] == "server" and objectives["latency"] == latency["server_mean_ms"]
    assert latency["paced_requests"] >= 2 and latency["tpot_median_ms"] > 0  # of 4
    assert "streamed median" in latency["how"]
    assert meta["vllm_version"] == "0.33.0" and "--max-num-seqs" in meta["engine_args"]
    assert meta["objectives"]["energy"]["measured"] is False  # estimated on this CPU
    assert "estimated" in meta["objectives"]["energy"]["how"]
    assert "resident memory" in meta["objectives"]["memory"]["how"]
    assert meta["checkpoint"]["steps"] == []  # the base model is served as it is
    assert Path(meta["server_log"]).is_file()
    assert Path(meta["server_log"]).parent == tmp_path / "run" / "logs"
    # vLLM's KV-cache figures from /metrics, named (the docs promise them).
    kv = meta["kv_cache"]
    assert kv["block_size"] == 16 and kv["cache_dtype"] == "auto"
    assert kv["capacity_tokens"] == kv["num_gpu_blocks"] * 16 > 0
    assert kv["gpu_memory_utilization"] == 0.9 and kv["sliding_window"] is None
    assert kv["usage_samples"] >= 1 and 0 <= kv["usage_peak"] <= 1
    assert "/metrics" in kv["how"]

    pruned = SPACE.recipe({"prune.method": "magnitude", "prune.sparsity": 0.3})
    first = ev.evaluate(pruned, SPACE)
    assert first.ok, first.reason
    assert first.metadata["checkpoint"]["reused"] is False
    assert first.metadata["objectives"]["co2"]["compression_g_per_1k"] > 0
    # Only a serving setting differs: the same checkpoint is served again.
    served = SPACE.recipe(
        {"prune.method": "magnitude", "prune.sparsity": 0.3, "serve.max_num_seqs": 4}
    )
    second = ev.evaluate(served, SPACE)
    assert second.ok, second.reason
    assert second.metadata["checkpoint"]["reused"] is True
    assert second.metadata["checkpoint"]["key"] == first.metadata["checkpoint"]["key"]
    assert "4" in second.metadata["engine_args"]


def test_streams_held_back_by_the_server_take_its_own_time_per_token(tmp_path):
    # Every stream arrives in one burst (the CPU build's API server starved of CPU): the
    # chunk times say ~0 ms per token; the objective is the server's histogram mean.
    result = evaluator(tmp_path, extra_args=["--fake-burst-stream"]).evaluate(
        SPACE.baseline(), SPACE
    )
    assert result.ok, result.reason
    latency = result.metadata["objectives"]["latency"]
    assert latency["source"] == "server" and latency["paced_requests"] == 0
    assert "none of the 4 streams arrived paced" in latency["how"]
    # The stand-in waits 2 ms a token by default, then generates with the model.
    objectives = result.objectives or {}
    assert objectives["latency"] == latency["server_mean_ms"] >= 1.8


@pytest.mark.slow
def test_output_tokens_are_fitted_to_the_served_context(tmp_path):
    # The default 64 new tokens plus any prompt exceed the reference model's 64-token
    # context: vLLM would answer HTTP 400 to every request, so the evaluator asks less.
    ev = evaluator(tmp_path, max_new_tokens=VLLMSettings().max_new_tokens)
    result = ev.evaluate(SPACE.baseline(), SPACE)
    assert result.ok, result.reason
    latency = result.metadata["objectives"]["latency"]
    assert 2 <= latency["max_tokens"] < 64
    assert latency["output_tokens"] == latency["requests"] * latency["max_tokens"]
    # Five requests of tens of tokens, one at a time: sampled while they held cache.
    assert 0 < result.metadata["kv_cache"]["usage_peak"] <= 1
    notes = [n for n in result.metadata["notes"] if "max_new_tokens" in n]
    assert len(notes) == 1 and "context of 64 tokens" in notes[0], result.metadata["notes"]


@pytest.mark.slow
def test_a_failed_measurement_names_its_cause_not_a_dead_server(tmp_path):
    # The server hangs: every request times out, and it is still alive when that is seen.
    stalled = evaluator(
        tmp_path, request_timeout_s=1, extra_args=["--fake-stall-s", "30"]
    ).evaluate(SPACE.baseline(), SPACE)
    assert stalled.status == "failed"
    assert "within 1s" in (stalled.reason or "")
    assert "died" not in (stalled.reason or "")


@pytest.mark.slow
def test_a_server_that_dies_while_measured_is_reported_dead(tmp_path):
    died = evaluator(tmp_path, extra_args=["--fake-exit-on-request", "2"]).evaluate(
        SPACE.baseline(), SPACE
    )
    assert died.status == "failed"
    reason = died.reason or ""
    assert "the vLLM server died while being measured" in reason
    assert "fake crash at completion request 2" in reason  # the log's tail says why


RACING = {"latency_requests": 2, "max_new_tokens": 2, "warmup_requests": 0, "limit": 12}


def server_starts(ev: VLLMEvaluator) -> int:
    """How many times ``ev`` started a server: one log per start under its run's logs."""
    assert ev.run_dir is not None
    return len(list((ev.run_dir / "logs").glob("vllm-*.log")))


@pytest.mark.slow
def test_racing_stops_a_dominated_recipe_after_its_quick_stage(tmp_path):
    ev = evaluator(tmp_path, **RACING)
    # A member better in every objective, even against the quick accuracy as it is (z = 0).
    best = RaceMember((-1.0, 0.0, 0.0, 0.0, 0.0), 0.0)
    quick = ev.evaluate(SPACE.baseline(), SPACE, race=RaceRule(4, 0.0, (best,)))
    assert quick.ok, quick.reason
    assert quick.metadata[STAGE_KEY] == QUICK
    assert quick.metadata["accuracy_n"] == 4 and quick.metadata["tasks"]["reference"]["n"] == 4
    split = quick.metadata["seconds_split"]
    assert split["accuracy"] == split["accuracy_quick"] and "accuracy_rest" not in split
    assert server_starts(ev) == 1


@pytest.mark.slow
def test_racing_finishes_on_the_same_server_as_one_stage_measures(tmp_path):
    plain = evaluator(tmp_path / "plain", **RACING).evaluate(SPACE.baseline(), SPACE)
    assert plain.ok, plain.reason
    assert STAGE_KEY not in plain.metadata
    ev = evaluator(tmp_path / "raced", **RACING)
    # No front: nothing can stop the recipe, so the rest is scored on the same server.
    full = ev.evaluate(SPACE.baseline(), SPACE, race=RaceRule(4, 2.0))
    assert full.ok, full.reason
    assert full.metadata[STAGE_KEY] == FULL
    assert server_starts(ev) == 1
    assert full.metadata["accuracy_run"]["racing"] == {"quick_n": 4, "rest_n": 8}
    assert full.metadata["accuracy_n"] == plain.metadata["accuracy_n"] == 12
    assert (full.objectives or {})["accuracy"] == pytest.approx(
        (plain.objectives or {})["accuracy"]
    )
    assert full.metadata["accuracy_stderr"] == pytest.approx(plain.metadata["accuracy_stderr"])
    split = full.metadata["seconds_split"]
    assert split["accuracy"] == pytest.approx(
        split["accuracy_quick"] + split["accuracy_rest"], abs=0.002
    )


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory) -> dict:
    return write_user_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def user_model(tmp_path_factory) -> Path:
    """The reference model as a user's model folder: one that may take lm-eval tasks."""
    from evo_compress.reference import default_cache_dir, ensure_reference_model

    model = tmp_path_factory.mktemp("user") / "mymodel"
    shutil.copytree(ensure_reference_model(default_cache_dir(), progress=False), model)
    return model


def user_evaluator(tmp_path: Path, model: Path, folder: dict, **settings: object) -> VLLMEvaluator:
    context = EvaluationContext(
        ModelConfig(id=str(model)), HardwareConfig(device="cpu"), CarbonConfig()
    )
    base = {
        "command": STANDIN,
        "vllm_version": "0.33.0",
        "latency_requests": 2,
        "max_new_tokens": 2,
        "warmup_requests": 0,
        "startup_timeout_s": 120,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "threads": 1,
        "task_include_path": str(folder["include_path"]),
    }
    ev = EVALUATORS.get("vllm")(base | settings, context)
    assert isinstance(ev, VLLMEvaluator)
    ev.set_run_dir(tmp_path / "run")
    return ev


@pytest.mark.slow
def test_two_weighted_tasks_are_scored_against_the_server(tmp_path, user_model, user_tasks):
    gen, mc = user_tasks["generate"], user_tasks["multiple_choice"]
    tasks = [{"name": gen, "weight": 2, "limit": 10}, {"name": mc, "limit": 8}]
    ev = user_evaluator(tmp_path, user_model, user_tasks, tasks=tasks)
    ev.prepare()
    assert ev._task is not None
    # Latency prompts are the tasks' documents, as for the transformers back end.
    assert [e["name"] for e in ev._task["entries"]] == [gen, mc]
    assert all(re.fullmatch(r"\d{3}\+\d{3}=", p) for p in ev._task["prompts"])
    result = ev.evaluate(SPACE.baseline(), SPACE)
    assert result.ok and result.objectives, result.reason
    meta = result.metadata
    scored = meta["tasks"]
    assert set(scored) == {gen, mc}
    assert (scored[gen]["metric"], scored[gen]["n"], scored[gen]["weight"]) == (
        "exact_match",
        10,
        2.0,
    )
    assert (scored[mc]["metric"], scored[mc]["n"], scored[mc]["weight"]) == ("acc", 8, 1.0)
    # The trained model adds well through the API: neither score is a broken constant.
    assert scored[gen]["score"] > 0.5 and scored[mc]["score"] > 0.25
    mean = (2 * scored[gen]["score"] + scored[mc]["score"]) / 3
    assert result.objectives["accuracy"] == pytest.approx(mean, rel=1e-12)
    stderr = math.sqrt(
        (2 / 3) ** 2 * scored[gen]["stderr"] ** 2 + (1 / 3) ** 2 * scored[mc]["stderr"] ** 2
    )
    assert meta["accuracy_stderr"] == pytest.approx(stderr, rel=1e-12)
    assert meta["accuracy_n"] == 18
    how = meta["objectives"]["accuracy"]["how"]
    assert f"`{gen}`" in how and f"`{mc}`" in how and "local-completions" in how
    # What `constraints.max_task_drop` reads: each task's score by its configured name.
    assert ev.scored_tasks() == ("tasks", (gen, mc))
    assert task_scores(meta) == {gen: scored[gen]["score"], mc: scored[mc]["score"]}


def test_latency_prompts_and_calibration_come_from_the_settings(tmp_path, user_tasks):
    from evo_compress.reference import default_cache_dir, ensure_reference_model

    model = ensure_reference_model(default_cache_dir(), progress=False)
    prompts, texts = tmp_path / "prompts.txt", tmp_path / "cal.txt"
    prompts.write_text("12+34=\n56+78=\n")
    texts.write_text("1+1=2\n2+2=4\n3+3=6\n")
    ev = user_evaluator(
        tmp_path,
        model,
        user_tasks,
        tasks=[{"name": user_tasks["generate"]}],
        latency_prompt_file=str(prompts),
        calibration={"source": "file", "path": str(texts), "samples": 2},
    )
    ev.prepare()
    assert ev._task is not None
    assert ev._task["prompts"] == ["12+34=", "56+78="]
    assert ev._task["train_texts"] == ["1+1=2", "2+2=4", "3+3=6"]
    assert ev._task["calibration_samples"] == 2  # what the quantization job takes
    # Without either: the task's documents and examples, 64 calibration texts.
    default = user_evaluator(tmp_path, model, user_tasks, task=user_tasks["generate"])
    default.prepare()
    assert default._task is not None and default._task["calibration_samples"] == 64
    assert all(re.fullmatch(r"\d{3}\+\d{3}=", p) for p in default._task["prompts"])


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"task": "my_gen", "tasks": [{"name": "my_mc"}]}, "`evaluator.settings.task` and"),
        pytest.param(  # looked up among lm-eval's own tasks too: seconds to index them
            {"tasks": [{"name": "no_such_task"}]},
            "`evaluator.settings.tasks`: lm-eval knows no",
            marks=pytest.mark.slow,
        ),
        (
            {"calibration_samples": 8, "calibration": {"samples": 16}},
            "`evaluator.settings.calibration_samples` and",
        ),
    ],
)
def test_bad_task_settings_are_one_line_naming_the_field(tmp_path, user_tasks, settings, fragment):
    from evo_compress.reference import default_cache_dir, ensure_reference_model

    model = ensure_reference_model(default_cache_dir(), progress=False)
    with pytest.raises(ConfigError) as raised:
        user_evaluator(tmp_path, model, user_tasks, **settings).prepare()
    message = str(raised.value)
    assert fragment in message and "\n" not in message


def _real_vllm() -> str | None:
    """The serve command of an installed vLLM on a CUDA machine, else None."""
    import os
    import shlex
    import shutil

    command = os.environ.get("EVO_VLLM_COMMAND", "vllm serve")
    if shutil.which(shlex.split(command)[0]) is None:
        return None
    try:
        import torch
    except ImportError:
        return None
    return command if torch.cuda.is_available() else None


@pytest.mark.gpu
@pytest.mark.skipif(_real_vllm() is None, reason="needs a CUDA GPU and vLLM (EVO_VLLM_COMMAND)")
def test_real_vllm_serves_and_measures_the_reference_model(tmp_path):
    ev = evaluator(tmp_path, "cuda", command=_real_vllm(), vllm_version=None, latency_requests=16)
    assert ev.gpu["name"] is not None
    for data in ({}, {"quant.method": "fp8"}, {"kv.dtype": "fp8"}):
        recipe = SPACE.recipe(data)
        reason = ev.infeasible_reason(recipe, SPACE)
        if reason is not None:
            continue
        result = ev.evaluate(recipe, SPACE)
        assert result.ok, result.reason
        assert result.metadata["gpu"] and "NVML" in result.metadata["objectives"]["memory"]["how"]


def test_auto_picks_transformers_without_a_gpu_or_vllm(tmp_path):
    from evo_compress.fitness.hf.evaluator import TransformersEvaluator

    def make(device: str, settings: dict[str, object]) -> object:
        context = EvaluationContext(
            ModelConfig(id="reference"), HardwareConfig(device=device), CarbonConfig()
        )
        return EVALUATORS.get("auto")(settings, context)

    chosen = make("cpu", {"transformers": {"max_new_tokens": 4}, "vllm": {"command": "vllm"}})
    assert isinstance(chosen, TransformersEvaluator) and chosen.config.max_new_tokens == 4
    missing = {"vllm": {"command": str(tmp_path / "no-such-vllm") + " serve"}}
    assert isinstance(make("cuda", missing), TransformersEvaluator)
    with pytest.raises(ConfigError, match="one section per back end"):
        make("cpu", {"max_new_tokens": 4})


def test_recipes_differing_only_in_max_num_seqs_share_one_server(tmp_path):
    ev = evaluator(tmp_path, latency_requests=6)
    base = {"prune.method": "magnitude", "prune.sparsity": 0.3}
    recipes = [
        SPACE.recipe({**base, "serve.max_num_seqs": 16}),
        SPACE.recipe({"serve.max_num_seqs": 8}),  # alone: a server of its own
        SPACE.recipe({**base, "serve.max_num_seqs": 2}),
    ]
    order = ev.plan_batch(recipes, SPACE)
    assert order == [0, 2, 1]  # the group together, where its first member stood
    results = [ev.evaluate(recipes[i], SPACE) for i in order]
    ev.close()
    assert all(r.ok for r in results), [r.reason for r in results]
    first, second, alone = results
    # One start for the group, with its largest max_num_seqs; each measured with its own.
    assert first.metadata["server"] == {
        "shared": True,
        "reused": False,
        "started_with_max_num_seqs": 16,
        "max_num_seqs": 16,
    }
    assert second.metadata["server"]["reused"] is True
    assert second.metadata["seconds_split"]["server_start"] == 0
    assert second.metadata["objectives"]["latency"]["concurrency"] == 2
    assert second.metadata["server_log"] == first.metadata["server_log"]
    assert "server" not in alone.metadata
    assert alone.metadata["seconds_split"]["server_start"] > 0
    logs = sorted((tmp_path / "run" / "logs").glob("vllm-*.log"))
    assert len(logs) == 2  # two starts for three recipes
    # Without sharing (or with evaluations in parallel) every recipe starts its own.
    off = evaluator(tmp_path / "off", latency_requests=6, share_servers=False)
    assert off.plan_batch(recipes, SPACE) == [0, 1, 2]
    ev.sequential = False
    assert ev.plan_batch(recipes, SPACE) == [0, 1, 2]


def test_without_the_server_s_histogram_the_paced_streams_time_tokens():
    from evo_compress.fitness.vllm.client import LatencyReport
    from evo_compress.fitness.vllm.evaluator import _time_per_output_token

    def report(paced: int) -> LatencyReport:
        median = 12.5 if paced else math.nan
        return LatencyReport(4, 2, 8, 32, 1.0, 3.0, 4.0, median, median, 32.0, paced)

    stream = _time_per_output_token(report(3), {}, {})
    assert stream["source"] == "stream" and stream["ms"] == 12.5
    assert stream["server_mean_ms"] is None
    with pytest.raises(EvaluationError, match="4 of 4 streams arrived in bursts"):
        _time_per_output_token(report(0), {}, {})
