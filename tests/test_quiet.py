"""A first run shows the project's own output: other libraries' notices stay off stderr."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evo_compress.quiet import LIBRARY_ENV, LIBRARY_LOGGERS, quiet_libraries

ROOT = Path(__file__).resolve().parents[1]
# What other libraries print: a path inside one of them, a glog/c10 prefix
# (`W1207 23:21:49.671000 20291 torch/...`), torchao's kernel notices, transformers' bars.
THIRD_PARTY = re.compile(
    r"(site-packages|torch/|torchao|transformers/|huggingface_hub|lm_eval"
    r"|^[IWEF]\d{4} \d\d:\d\d:\d\d|Failed to load|Writing model shards|it/s\])"
)


def third_party_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if THIRD_PARTY.search(line)]


def test_the_pattern_knows_the_notices_of_issue_23():
    seen = [
        "W1207 21:41:08.188153923 utils.cpp:68] Warning: NUMA binding: ...",
        "W1207 23:21:49.671000 20291 torch/utils/_pytree.py:630] <enum 'KernelPreference'> "
        "is an Enum subclass and is now natively supported by torch.compile",
        "Failed to load /x/.venv/lib/python3.11/site-packages/torchao/_C_cutlass_90a.abi3.so",
        "Writing model shards: 0%|          | 0/1 [00:00<?, ?it/s]",
    ]
    assert third_party_lines("\n".join(seen)) == seen
    assert third_party_lines("run runs/x  (nsga2, population 8, 3 generations)") == []


def test_quiet_libraries_raises_their_loggers_and_keeps_a_users_setting(monkeypatch):
    for key in LIBRARY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")  # the user's choice wins
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    try:
        quiet_libraries()
        assert all(logging.getLogger(n).level == logging.ERROR for n in LIBRARY_LOGGERS)
        assert os.environ["TORCH_CPP_LOG_LEVEL"] == "INFO"
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.slow
def test_importing_torchao_after_quiet_libraries_prints_nothing():
    pytest.importorskip("torchao")
    code = "from evo_compress.quiet import quiet_libraries; quiet_libraries(); import torchao"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TORCH_CPP_LOG_LEVEL", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert third_party_lines(proc.stderr) == [], proc.stderr


@pytest.mark.slow
def test_the_demos_first_evaluation_prints_no_third_party_line(tmp_path):
    """`make demo`'s first seed recipe, evaluated as the CLI does: a worker process loads,
    compresses and measures the reference model (trained first on a fresh machine)."""
    pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("TORCH_CPP_LOG_LEVEL", None)
    recipe = "{quant: {method: int8_weight_only}, prune: {method: magnitude, sparsity: 0.1}}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "evo_compress",
            "evaluate",
            "-c",
            str(ROOT / "configs" / "demo.yaml"),
            "-r",
            recipe,
            "--cache",
            str(tmp_path / "cache.sqlite"),
            # Fewer latency runs and accuracy items than the demo: the same code paths,
            # in less time.
            "--set",
            "evaluator.settings.latency_prompts=2",
            "--set",
            "evaluator.settings.latency_repeats=1",
            "--set",
            "evaluator.settings.limit=40",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"accuracy"' in proc.stdout
    assert third_party_lines(proc.stderr) == [], proc.stderr
