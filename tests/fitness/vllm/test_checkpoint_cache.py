"""The checkpoint cache is keyed by everything a build reads, not only the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evo_compress.fitness.vllm import checkpoint as ckpt
from evo_compress.fitness.vllm.compile import VLLMCapabilities, compile_recipe
from evo_compress.genomes import SearchSpace

SPACE = SearchSpace.builtin()
SETTINGS = {"calibration_samples": 64, "recovery_lr": 1e-3, "recovery_batch_size": 16, "seed": 0}


def test_other_calibration_texts_or_settings_build_another_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[list[str]] = []

    def fake_build(plan: Any, work: Path, *args: Any) -> dict[str, Any]:
        task = args[3]
        builds.append(list(task["train_texts"]))
        (work / "final").mkdir()
        return {"steps": [], "energy_joules": 0.0}

    monkeypatch.setattr(ckpt, "_build", fake_build)
    plan = compile_recipe(
        dict(SPACE.recipe({"prune.method": "magnitude", "prune.pattern": "2:4"})),
        VLLMCapabilities(quantizer=True),
    )

    def ensure(texts: list[str], **settings: Any) -> Any:
        return ckpt.ensure_checkpoint(
            plan,
            model_path=tmp_path / "model",
            model_fingerprint="m",
            cache_root=tmp_path / "cache",
            device="cpu",
            dtype="float32",
            task={"train_texts": texts},
            settings={**SETTINGS, **settings},
            python=None,
        )

    first = ensure(["a b c"])
    assert not first.reused and ensure(["a b c"]).reused  # the same inputs: reused
    assert ensure(["other text"]).path != first.path
    assert ensure(["a b c"], recovery_lr=5e-4).path != first.path
    assert builds == [["a b c"], ["other text"], ["a b c"]]
