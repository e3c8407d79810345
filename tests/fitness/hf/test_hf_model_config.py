"""configs/hf-model.yaml (a hub model on hub benchmarks) offline: it validates, and a run
stops with one line naming what it cannot reach, never a traceback or a hang."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.exceptions import EvaluationError
from evo_compress.fitness import EvaluationContext, make_evaluator
from evo_compress.testing import assert_one_line_error, run_cli, save_random_llama

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "hf-model.yaml"


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_the_hf_model_config_validates_offline():
    proc = run_cli("validate", CONFIG, env=offline_env())
    assert "valid config `hf-model`" in proc.stdout
    assert "evaluator transformers" in proc.stdout


def test_a_run_offline_names_the_model_it_cannot_reach(tmp_path):
    # The CI machine has no GPU: the config's CUDA device is swapped for the CPU.
    proc = run_cli(
        "run",
        "--config",
        CONFIG,
        "--set",
        f"output.runs_root={tmp_path}",
        "--set",
        "hardware.device=cpu",
        check=False,
        env=offline_env(),
    )
    assert_one_line_error(proc, "`model.id` 'Qwen/Qwen2.5-0.5B-Instruct'")


def test_a_task_whose_data_set_cannot_be_reached_is_one_line_naming_it(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        """\
task: hub_task
dataset_path: no-such-org/no-such-benchmark
output_type: generate_until
test_split: test
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: exact_match
"""
    )
    model = save_random_llama(
        tmp_path / "model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    context = EvaluationContext(
        ModelConfig(id=str(model)), HardwareConfig(device="cpu"), CarbonConfig()
    )
    evaluator = make_evaluator(
        "transformers",
        {"tasks": [{"name": "hub_task"}], "task_include_path": str(tasks)},
        context,
    )
    with pytest.raises(EvaluationError) as caught:
        evaluator.prepare()
    message = str(caught.value)
    assert "\n" not in message
    assert "`evaluator.settings.tasks`: cannot load lm-eval task `hub_task`" in message
    assert "no-such-org/no-such-benchmark" in message


def test_a_cuda_device_without_a_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    context = EvaluationContext(
        ModelConfig(id="Qwen/Qwen2.5-0.5B-Instruct"), HardwareConfig(device="cuda"), CarbonConfig()
    )
    evaluator = make_evaluator("transformers", {"tasks": [{"name": "gsm8k"}]}, context)
    with pytest.raises(EvaluationError, match=r"`hardware.device` is cuda but torch sees no"):
        evaluator.prepare()
