"""The vLLM back end against vLLM itself: the CPU build that ``make vllm-env`` installs in
``.venv-vllm`` (llm-compressor in ``.venv-quant``), serving the reference model.

Skipped, with the reason, where ``make vllm-env`` has not been run; ``.ci/run`` runs it, so
CI always runs these. Each evaluation starts a real server (about 30-60 s on two cores). The
servers run without torch.compile (``--enforce-eager``) and with the engine in the API
server's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): both only shorten the start; the
model, kernels and API are the same.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.fitness import EVALUATORS, EvaluationContext
from evo_compress.fitness.vllm.compile import CPU_BUILD
from evo_compress.fitness.vllm.environment import (
    QUANT_ENV,
    QUANT_ENV_VAR,
    SERVING_ENV,
    SERVING_ENV_VAR,
    cpu_isa,
    find_environment,
)
from evo_compress.genomes import SearchSpace

SERVING = find_environment(SERVING_ENV, SERVING_ENV_VAR)
QUANT = find_environment(QUANT_ENV, QUANT_ENV_VAR)
pytestmark = [
    pytest.mark.vllm_real,
    pytest.mark.slow,
    pytest.mark.skipif(
        SERVING is None or QUANT is None,
        reason="no real vLLM: `make vllm-env` makes .venv-vllm and .venv-quant",
    ),
]
SPACE = SearchSpace.builtin()
LIMIT = 60  # accuracy items per evaluation
FAST_START = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
ROOT = Path(__file__).resolve().parents[3]
ISA = cpu_isa()


def _context(model: str = "reference") -> EvaluationContext:
    return EvaluationContext(ModelConfig(id=model), HardwareConfig(device="cpu"), CarbonConfig())


def real_evaluator(tmp_path: Path, model: str = "reference", **settings: Any) -> Any:
    """The vLLM evaluator with its defaults: no `command`, no `python`, so the environments
    of `make vllm-env` are used."""
    base = {
        "latency_requests": 4,
        "max_new_tokens": 4,
        "warmup_requests": 1,
        "limit": LIMIT,
        "startup_timeout_s": 300,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "threads": 1,
        "extra_args": ["--enforce-eager"],
        "env": FAST_START,
    }
    ev = EVALUATORS.get("vllm")(base | settings, _context(model))
    ev.set_run_dir(tmp_path / "run")
    return ev


def _servers_of(folder: Path) -> list[int]:
    """Processes whose command line names ``folder`` (a server serving from it)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())  # None: not ours to read
        if process.pid != os.getpid() and str(folder) in cmdline and "vllm" in cmdline:
            found.append(process.pid)
    return found


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The baseline, raced (``fidelity.racing``) against an empty front: its quick stage
    cannot stop it, so both stages are scored, on one server start."""
    from evo_compress.fitness.racing import RaceRule

    tmp = tmp_path_factory.mktemp("baseline")
    ev = real_evaluator(tmp)
    result = ev.evaluate(SPACE.recipe({}), SPACE, race=RaceRule(quick_limit=10, z=2.0))
    assert result.ok, result.reason
    return ev, result, tmp


def test_the_baseline_is_served_by_the_cpu_build(baseline: Any) -> None:
    ev, result, tmp = baseline
    meta = result.metadata
    assert meta["vllm_build"] == "vllm-cpu" and meta["vllm_version"] == "0.32.0"
    assert meta["command"][0] == str(SERVING / "bin" / "vllm")
    assert ev.caps.cpu_build and ev.caps.quantizer
    assert result.objectives["accuracy"] > 0.5
    # Generation time, not chunks that arrived together (a token takes milliseconds here;
    # measured 5-20 ms): from the paced streams or, failing them, the server's own mean.
    latency = meta["objectives"]["latency"]
    assert latency["source"] in ("stream", "server") and result.objectives["latency"] > 1.0
    assert latency["server_mean_ms"] is not None and latency["server_mean_ms"] > 1.0
    assert "resident memory" in meta["objectives"]["memory"]["how"]
    split = meta["seconds_split"]
    assert set(split) >= {"checkpoint", "server_start", "latency", "accuracy"}, split
    assert split["server_start"] > 1.0 and split["accuracy"] > 0.0
    # Raced: both stages scored, every item, on the one server start.
    from evo_compress.fitness.racing import FULL, STAGE_KEY

    assert meta[STAGE_KEY] == FULL and meta["accuracy_n"] == LIMIT
    assert split["accuracy_quick"] > 0 and split["accuracy_rest"] > 0
    assert len(list((tmp / "run" / "logs").glob("vllm-*.log"))) == 1
    assert "--max-num-seqs" in meta["engine_args"]


def test_the_baseline_accuracy_agrees_with_the_transformers_back_end(
    baseline: Any, tmp_path: Path
) -> None:
    _, served, _ = baseline
    local = EVALUATORS.get("transformers")(
        {"limit": LIMIT, "threads": 1, "latency_prompts": 2, "max_new_tokens": 2},
        _context(),
    )
    result = local.evaluate(SPACE.recipe({}), SPACE)
    assert result.ok, result.reason
    a, b = served.objectives["accuracy"], result.objectives["accuracy"]
    se = math.hypot(served.metadata["accuracy_stderr"], result.metadata["accuracy_stderr"])
    assert abs(a - b) <= 2 * max(se, 1e-9), (a, b, se)


def _served_or_refused(ev: Any, recipe: Any, gene: str, value: Any) -> Any:
    """Evaluate ``recipe`` where this CPU's kernels serve ``gene`` = ``value``; elsewhere
    check that it is refused before any step, with the reason, and return None."""
    if value in CPU_BUILD[ISA][gene]:
        result = ev.evaluate(recipe, SPACE)
        assert result.ok, result.reason
        return result
    result = ev.evaluate(recipe, SPACE)
    assert result.status == "infeasible" and f"CPU build ({ISA})" in result.reason
    return None


@pytest.mark.parametrize(("method", "scheme"), [("gptq", "W4A16")], ids=["gptq"])
def test_quantized_checkpoints_are_built_and_served(
    tmp_path: Path, method: str, scheme: str
) -> None:
    """GPTQ W4A16 needs the build's AVX-512 kernels: on an AVX2 CPU it is refused. (W8A8 is
    built and served by `test_a_failure_the_environment_caused_is_not_served_once_it_is_fixed`,
    the same checks on its second evaluation: one server start fewer.)"""
    ev = real_evaluator(tmp_path)
    recipe = SPACE.recipe({"quant.method": method, "quant.group_size": 64})
    result = _served_or_refused(ev, recipe, "quant.method", method)
    if result is None:
        return
    (step,) = result.metadata["checkpoint"]["steps"]
    assert step["step"] == "quantize" and step["scheme"] == scheme
    assert result.metadata["seconds_split"]["quantization"] > 0
    assert result.objectives["accuracy"] > 0.5


def test_an_fp8_kv_cache_is_served_where_the_cpu_has_avx512(tmp_path: Path) -> None:
    ev = real_evaluator(tmp_path)
    result = _served_or_refused(ev, SPACE.recipe({"kv.dtype": "fp8"}), "kv.dtype", "fp8")
    if result is not None:
        assert result.metadata["engine_args"][:2] == ["--kv-cache-dtype", "fp8"]


def test_a_pruned_recovered_recipe_is_served_with_another_max_num_seqs(
    baseline: Any, tmp_path: Path
) -> None:
    """A Wanda 2:4 checkpoint with LoRA recovery, served with `max_num_seqs` 4 where the
    baseline had 32: a second engine configuration on one more start. Scored on a user's
    task list (a generated and a multiple-choice task over local JSONL, weights 2:1), whose
    documents also give the calibration and recovery text."""
    from evo_compress.testing.user_tasks import write_user_tasks

    _, first, _ = baseline
    user = write_user_tasks(tmp_path / "tasks")
    tasks = [
        {"name": user["generate"], "weight": 2, "limit": 20},
        {"name": user["multiple_choice"], "weight": 1, "limit": 20},
    ]
    recipe = SPACE.recipe(
        {
            "prune.method": "wanda",
            "prune.pattern": "2:4",
            "recovery.method": "lora",
            "recovery.lora_rank": 4,
            "recovery.steps": 50,
            "serve.max_num_seqs": 4,
        }
    )
    # The user's tasks on the reference model's weights as a model folder of their own (the
    # name `reference` stands for the reference task too).
    from evo_compress.reference import default_cache_dir, ensure_reference_model

    folder = str(ensure_reference_model(default_cache_dir()))
    ev = real_evaluator(
        tmp_path, model=folder, tasks=tasks, task_include_path=str(user["include_path"])
    )
    result = ev.evaluate(recipe, SPACE)
    assert result.ok, result.reason
    scores = result.metadata["tasks"]
    assert set(scores) == {user["generate"], user["multiple_choice"]}
    assert all(scores[name]["n"] == 20 for name in scores)
    mean = (2 * scores[user["generate"]]["score"] + scores[user["multiple_choice"]]["score"]) / 3
    assert result.objectives["accuracy"] == pytest.approx(mean)
    assert result.metadata["checkpoint"]["steps"][0]["step"] == "prune+recover"
    assert result.metadata["seconds_split"]["checkpoint"] > 0
    args, before = result.metadata["engine_args"], first.metadata["engine_args"]
    assert args[args.index("--max-num-seqs") + 1] == "4"
    assert before[before.index("--max-num-seqs") + 1] == "32"
    assert result.metadata["objectives"]["latency"]["concurrency"] == 4


def test_what_the_cpu_build_cannot_serve_is_refused_before_any_step(tmp_path: Path) -> None:
    ev = real_evaluator(tmp_path)
    for data, words in (
        ({"quant.method": "fp8"}, "engine fails to start"),
        ({"quant.method": "int8_weight_only"}, "W8A16"),
        ({"serve.attention_backend": "flashinfer"}, "CUDA kernel"),
    ):
        started = time.perf_counter()
        result = ev.evaluate(SPACE.recipe(data), SPACE)
        assert result.status == "infeasible" and "CPU build" in result.reason, result.reason
        assert words in result.reason
        assert time.perf_counter() - started < 5  # no quantization, no server
    assert not (tmp_path / "ckpt").exists()


def test_a_server_killed_mid_measurement_is_a_failure_with_its_log(tmp_path: Path) -> None:
    ev = real_evaluator(tmp_path, latency_requests=400, max_new_tokens=16)
    box: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: box.update(result=ev.evaluate(SPACE.recipe({}), SPACE)), daemon=True
    )
    worker.start()
    logs = tmp_path / "run" / "logs"
    deadline = time.monotonic() + 300
    killed = False
    while time.monotonic() < deadline and worker.is_alive() and not killed:
        for log in logs.glob("vllm-*.log"):
            if "POST /v1/completions" in log.read_text(errors="replace"):
                pgid = int(log.with_name(log.name + ".pgid").read_text().split()[0])
                os.killpg(pgid, signal.SIGKILL)
                killed = True
        time.sleep(0.2)
    assert killed, "the latency measurement never started"
    worker.join(timeout=120)
    result = box["result"]
    assert not result.ok and "died while being measured" in result.reason, result.reason
    assert str(logs) in result.reason  # names its log
    assert _servers_of(tmp_path) == []


def test_a_request_timeout_is_a_failure_and_leaves_no_server(tmp_path: Path) -> None:
    ev = real_evaluator(tmp_path, request_timeout_s=0.001)
    result = ev.evaluate(SPACE.recipe({}), SPACE)
    assert not result.ok and "no response within 0.001s" in result.reason, result.reason
    assert _servers_of(tmp_path) == []


def test_ctrl_c_of_a_search_stops_its_server(tmp_path: Path) -> None:
    config = tmp_path / "search.yaml"
    config.write_text(
        f"""
name: ctrl-c
model: {{id: reference}}
hardware: {{device: cpu}}
search: {{population_size: 4, generations: 1, seed: 0, recipes: conservative}}
cache: {{enabled: false}}
evaluator:
  name: vllm
  settings:
    latency_requests: 400
    max_new_tokens: 16
    limit: {LIMIT}
    threads: 1
    checkpoint_dir: {tmp_path / "ckpt"}
    extra_args: [--enforce-eager]
    env: {{VLLM_CPU_KVCACHE_SPACE: "1", VLLM_ENABLE_V1_MULTIPROCESSING: "0"}}
output: {{runs_root: {tmp_path / "runs"}}}
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "evo_compress.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 300
    serving = False
    while time.monotonic() < deadline and proc.poll() is None and not serving:
        serving = any(
            "POST /v1/completions" in log.read_text(errors="replace")
            for log in (tmp_path / "runs").glob("*/logs/vllm-*.log")
        )
        time.sleep(0.2)
    assert serving, f"the search never reached a measurement: {proc.communicate()[1]}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    time.sleep(1.0)
    assert _servers_of(tmp_path) == [], "a vLLM process outlived the search"


def test_the_exported_checkpoint_is_what_vllm_serves(tmp_path: Path) -> None:
    """`compress` of a W8A8 recipe on the vLLM back end writes the compressed-tensors
    checkpoint it serves; served as `model.id`, it measures as the recipe did."""
    from evo_compress.app import checked_config, compress_recipe
    from evo_compress.runs.weights import PROVENANCE_FILE

    settings = {
        "latency_requests": 4,
        "max_new_tokens": 4,
        "warmup_requests": 1,
        "limit": LIMIT,
        "threads": 1,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "extra_args": ["--enforce-eager"],
        "env": FAST_START,
    }
    data = {
        "name": "export",
        "model": {"id": "reference"},
        "hardware": {"device": "cpu"},
        "evaluator": {"name": "vllm", "settings": settings},
        "output": {"runs_root": str(tmp_path / "runs")},
    }
    recipe = SPACE.recipe({"quant.method": "int8_w8a8"})
    out = tmp_path / "w8a8"
    compress_recipe(checked_config(data), recipe, out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["evaluator"] == "vllm" and record["compression"]["format"] == (
        "compressed-tensors"
    )
    # Served as a model of its own, with no recipe applied on top.
    served = EVALUATORS.get("vllm")(
        settings,
        EvaluationContext(ModelConfig(id=str(out)), HardwareConfig(device="cpu"), CarbonConfig()),
    )
    served.set_run_dir(tmp_path / "run")
    result = served.evaluate(SPACE.recipe({}), SPACE)
    assert result.ok, result.reason
    assert result.objectives["accuracy"] > 0.5


def test_a_failure_the_environment_caused_is_not_served_once_it_is_fixed(
    tmp_path: Path,
) -> None:
    """The reproduction of the cache issue: `evaluate` with `python:` naming a quantization
    environment that lacks llm-compressor fails; once it has it, the same command (same
    cache, same key: the package metadata is unchanged) gives the real outcome."""
    assert QUANT is not None
    shadow = tmp_path / "shadow" / "llmcompressor"
    shadow.mkdir(parents=True)
    # What a missing package looks like to the quantization job, without changing the
    # environment's package metadata (so the cache key stays the same).
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'llmcompressor'\")\n"
    )
    python = tmp_path / "quant" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        f'#!/bin/sh\nif [ -e "{tmp_path}/missing" ]; then\n'
        f'  export PYTHONPATH="{shadow.parent}"\nfi\n'
        f'exec "{QUANT}/bin/python" "$@"\n'
    )
    python.chmod(0o755)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
name: env-failure
model: {{id: reference}}
hardware: {{device: cpu}}
cache: {{path: {tmp_path / "fitness.sqlite"}}}
evaluator:
  name: vllm
  settings:
    python: {python}
    latency_requests: 4
    max_new_tokens: 4
    warmup_requests: 1
    limit: 20
    threads: 1
    checkpoint_dir: {tmp_path / "ckpt"}
    extra_args: [--enforce-eager]
    env: {{VLLM_CPU_KVCACHE_SPACE: "1", VLLM_ENABLE_V1_MULTIPROCESSING: "0"}}
"""
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("quant: {method: int8_w8a8}\n")

    def evaluate() -> dict[str, Any]:
        command = (sys.executable, "-m", "evo_compress.cli", "evaluate", "-c", str(config))
        proc = subprocess.run(
            [*command, "-r", str(recipe), "--format", "json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
        assert proc.stdout, proc.stderr
        return dict(json.loads(proc.stdout))

    (tmp_path / "missing").touch()
    first = evaluate()
    assert first["status"] == "failed" and "llm-compressor is not installed" in first["reason"]
    assert first["cache_hit"] is False
    assert first["metadata"]["failure_class"] == "environment"
    assert first["metadata"]["packages"]["quantization llmcompressor"] is not None
    (tmp_path / "missing").unlink()  # the user installs it, as the message says
    second = evaluate()
    assert second["status"] == "ok", second.get("reason")
    assert second["cache_hit"] is False
    # The W8A8 checkpoint was built by llm-compressor and served.
    (step,) = second["metadata"]["checkpoint"]["steps"]
    assert step["step"] == "quantize" and step["scheme"] == "W8A8"
    assert second["metadata"]["seconds_split"]["quantization"] > 0
    assert second["objectives"]["accuracy"] > 0.5
